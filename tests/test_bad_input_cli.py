"""Bad input to the `redifine` CLI, one table: each case exits 2 with one line naming the culprit, writes nothing
and loads no model (the CLI runs in-process; loading a model fails the test). Plus the bounds table itself and
`--quiet` through a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from redifine_core import bounds, cli, paths
from helpers import GOOD_CHAIN_TOML

ROOT = Path(__file__).resolve().parents[1]
READ_ONLY = Path("/sys")  # not writable even by root (paths probes by writing)

GOOD = GOOD_CHAIN_TOML


def _sub(old: str, new: str):
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)
    return edit


def _latin1_dataset(tmp: Path) -> None:
    from PIL import Image

    d = tmp / "data"
    d.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(d / f"{i}.png")
    (d / "0.txt").write_text("fine", encoding="utf-8")
    (d / "1.txt").write_bytes("café".encode("latin-1"))


def _chain(edit=None, extra=(), setup=None):
    """A chain case: GOOD edited, written to c.toml, `chain c.toml --out run` plus ``extra``."""
    def build(tmp: Path) -> list[str]:
        if setup is not None:
            setup(tmp)
        (tmp / "c.toml").write_text(edit(GOOD) if edit else GOOD)
        return ["chain", str(tmp / "c.toml"), "--out", str(tmp / "run"), *extra]
    return build


def _run_folder(run_json):
    def setup(tmp: Path) -> None:
        (tmp / "run").mkdir()
        (tmp / "run" / "run.json").write_text(run_json if isinstance(run_json, str) else json.dumps(run_json))
    return setup


def _args(*argv, setup=None):
    def build(tmp: Path) -> list[str]:
        if setup is not None:
            setup(tmp)
        return [a.format(tmp=tmp) for a in argv]
    return build


def _mkdir(*names):
    def setup(tmp: Path) -> None:
        for n in names:
            (tmp / n).mkdir(parents=True)
    return setup


def _touch(*names):
    def setup(tmp: Path) -> None:
        for n in names:
            (tmp / n).parent.mkdir(parents=True, exist_ok=True)
            (tmp / n).write_text("x")
    return setup


RUN = {"schema_version": 1, "status": "complete", "config": {}}

CASES = {
    # schedule: bounds, spec values, plot paths
    "schedule steps huge": (_args("schedule", "7.5", "--steps", "100000000"), "--steps=100000000"),
    "schedule steps 0": (_args("schedule", "7.5", "--steps", "0"), "--steps=0"),
    "schedule 1e308": (_args("schedule", "1e308", "--steps", "5"), "1e308"),
    "schedule cfg 101": (_args("schedule", "linear(101, 1)", "--steps", "5"), "101"),
    "schedule iteration -1": (_args("schedule", "7.5", "--steps", "5", "--iteration", "-1"), "--iteration"),
    "schedule iteration huge": (_args("schedule", "7.5", "--steps", "5", "--iteration", "99999999"), "--iteration"),
    "schedule plot .txt": (_args("schedule", "7.5", "--steps", "5", "--plot", "{tmp}/out.txt"), "--plot"),
    "schedule plot no parent": (_args("schedule", "7.5", "--steps", "5", "--plot", "/nonexistent-redifine/dir/x.png"),
                                "/nonexistent-redifine/dir"),
    "schedule plot missing dir": (_args("schedule", "7.5", "--steps", "5", "--plot", "{tmp}/no/x.png"), "--plot"),
    "schedule plot read-only": (_args("schedule", "7.5", "--steps", "5", "--plot", f"{READ_ONLY}/x.png"), "--plot"),
    "schedule plot is a folder": (_args("schedule", "7.5", "--steps", "5", "--plot", "{tmp}/d.png",
                                        setup=_mkdir("d.png")), "is a folder"),
    "schedule plot parent is a file": (_args("schedule", "7.5", "--steps", "5", "--plot", "{tmp}/f/x.png",
                                             setup=_touch("f")), "--plot"),
    # traits
    "traits generations huge": (_args("traits", "--out", "{tmp}/t.png", "--generations", "100000"), "--generations"),
    "traits generations 0": (_args("traits", "--out", "{tmp}/t.png", "--generations", "0"), "--generations"),
    "traits population huge": (_args("traits", "--out", "{tmp}/t.png", "--population", "1000000000"),
                               "--population"),
    "traits seed -1": (_args("traits", "--out", "{tmp}/t.png", "--seed", "-1"), "--seed"),
    "traits out .jpg": (_args("traits", "--out", "{tmp}/t.jpg"), "--out"),
    "traits out no parent": (_args("traits", "--out", "{tmp}/no/t.png"), "--out"),
    "traits out read-only": (_args("traits", "--out", f"{READ_ONLY}/t.png"), "--out"),
    # demo
    "demo out is a file": (_args("demo", "--out", "{tmp}/f", "--quick", setup=_touch("f")), "--out"),
    "demo out not empty": (_args("demo", "--out", "{tmp}/d", "--quick", setup=_touch("d/x")), "--resume"),
    "demo resume missing": (_args("demo", "--out", "{tmp}/d", "--quick", "--resume"), "nothing to resume"),
    "demo seed -1": (_args("demo", "--out", "{tmp}/d", "--seeds", "-1"), "--seeds"),
    "demo out read-only": (_args("demo", "--out", f"{READ_ONLY}/redifine-demo", "--quick"), "--out"),
    # dataset
    "dataset limit 0": (_args("dataset", "a/b", "--out", "{tmp}/d", "--limit", "0"), "--limit"),
    "dataset limit huge": (_args("dataset", "a/b", "--out", "{tmp}/d", "--limit", "1000000000"), "--limit"),
    "dataset out not empty": (_args("dataset", "a/b", "--out", "{tmp}/d", setup=_touch("d/x")), "--out"),
    "dataset out is a file": (_args("dataset", "a/b", "--out", "{tmp}/f", setup=_touch("f")), "--out"),
    "dataset out read-only": (_args("dataset", "a/b", "--out", f"{READ_ONLY}/redifine-ds"), "--out"),
    # report
    "report missing folder": (_args("report", "{tmp}/nothere"), "nothere"),
    "report no run.json": (_args("report", "{tmp}/d", setup=_mkdir("d")), "run.json"),
    "report run.json not JSON": (_args("report", "{tmp}/run", setup=_run_folder("{not json")), "run.json"),
    "report run.json not a run": (_args("report", "{tmp}/run", setup=_run_folder({"a": 1})), "run.json"),
    "report run.json a list": (_args("report", "{tmp}/run", setup=_run_folder([1, 2])), "run.json"),
    # chain: the config file itself
    "chain config is a folder": (_args("chain", "{tmp}/cfg", "--out", "{tmp}/run", setup=_mkdir("cfg")), "cfg"),
    "chain config missing": (_args("chain", "{tmp}/none.toml", "--out", "{tmp}/run"), "none.toml"),
    "chain config not UTF-8": (_args("chain", "{tmp}/c.toml", "--out", "{tmp}/run",
                                     setup=lambda t: (t / "c.toml").write_bytes(b"\xff\xfe[pipeline]")), "UTF-8"),
    # chain: bounds of every count and scale, the same as in the nodes
    "chain toy:100000": (_chain(_sub('"toy:4"', '"toy:100000"')), "dataset.source"),
    "chain dataset.limit huge": (_chain(_sub('source = "toy:4"', 'source = "toy:4"\nlimit = 1000000000')),
                                 "dataset.limit"),
    "chain steps huge": (_chain(_sub("steps = 2\n[train]", "steps = 100000000\n[train]")), "steps"),
    "chain iterations huge": (_chain(_sub("iterations = 2", "iterations = 100000")), "iterations"),
    "chain width huge": (_chain(_sub("[chain]", "[chain]\nwidth = 1000000")), "width"),
    "chain batch_size huge": (_chain(_sub("[chain]", "[chain]\nbatch_size = 1000000000")), "batch_size"),
    "chain cfg 1000": (_chain(_sub("cfg = 1.5", "cfg = 1000.0")), "cfg"),
    "chain schedule 1e308": (_chain(_sub('kind = "baseline"\ncfg = 1.5', 'kind = "custom"\nschedule = "1e308"')),
                             "1e308"),
    "chain train.rank huge": (_chain(_sub("[train]", "[train]\nrank = 1000000")), "rank"),
    "chain train.alpha 1e30": (_chain(_sub("[train]", "[train]\nalpha = 1e30")), "alpha"),
    "chain train.steps huge": (_chain(_sub("steps = 2\n[[methods]]", "steps = 1000000000\n[[methods]]")), "steps"),
    # chain: paths and devices, all before loading
    "chain features missing": (_chain(_sub("[chain]", '[chain]\nfeatures = "inception:/missing-redifine.safetensors"')),
                               "features"),
    "chain device cuda on CPU": (_chain(_sub('source = "toy"', 'source = "toy"\ndevice = "cuda"')), "pipeline.device"),
    "chain dtype float16 on CPU": (_chain(_sub('source = "toy"', 'source = "toy"\ndevice = "cpu"\ndtype = "float16"')),
                                   "pipeline.dtype"),
    "chain device nonsense": (_chain(_sub('source = "toy"', 'source = "toy"\ndevice = "warp9"')), "pipeline.device"),
    "chain model missing": (_chain(_sub('source = "toy"', 'source = "/missing-redifine/model.safetensors"')),
                            "pipeline.source"),
    "chain model folder not diffusers": (_chain(_sub('source = "toy"', 'source = "m"'), setup=_mkdir("m")),
                                         "model_index.json"),
    "chain model a pickle": (_chain(_sub('source = "toy"', 'source = "m.ckpt"'), setup=_touch("m.ckpt")),
                             "pipeline.source"),
    "chain tokenizer_dir missing": (_chain(_sub('source = "toy"', 'source = "toy"\ntokenizer_dir = "nothere"')),
                                    "pipeline.tokenizer_dir"),
    "chain dataset folder missing": (_chain(_sub('"toy:4"', '"nothere"')), "dataset.source"),
    "chain caption latin-1": (_chain(_sub('"toy:4"', '"data"'), setup=_latin1_dataset), "1.txt"),
    "chain one-image dataset": (_chain(_sub('"toy:4"', '"data"'), setup=lambda t: _latin1_dataset(t) or
                                       (t / "data" / "1.png").unlink()), "at least 2"),
    "chain generated set too big": (_chain(lambda t: _sub("[chain]", "[chain]\nimages_per_caption = 10000")(
                                        _sub('"toy:4"', '"toy:10"')(t))), "images per generated set"),
    "chain out is a file": (_chain(setup=_touch("run")), "--out"),
    "chain out read-only": (lambda t: _chain()(t)[:3] + [f"{READ_ONLY}/redifine-run"], "--out"),
    "chain out not empty": (_chain(setup=_touch("run/x")), "--resume"),
    "chain resume missing": (_chain(extra=["--resume"]), "nothing to resume"),
    "chain resume run.json corrupt": (_chain(extra=["--resume"], setup=_run_folder("{")), "run.json"),
    "chain resume run.json not a run": (_chain(extra=["--resume"], setup=_run_folder({"a": 1})), "run.json"),
    "chain resume and overwrite": (_chain(extra=["--resume", "--overwrite"]), "--overwrite"),
    "chain overwrite a non-run": (_chain(extra=["--overwrite"], setup=_touch("run/keep.txt")), "run.json"),
}


def _snapshot(folder: Path) -> dict:
    """Every file and folder under ``folder``; files with size and mtime (a folder's mtime may change: the write
    probe of redifine_core.paths creates and deletes a temp file)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    if case == "chain device cuda on CPU":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this torch has CUDA")
    if case == "chain dtype float16 on CPU":
        pytest.importorskip("redifine_core.models").__dict__.get("resolve_dtype") or pytest.skip("no resolve_dtype")

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the bad input was found")

    monkeypatch.setattr(cli, "load_job_pipeline", no_model)
    build, needle = CASES[case]
    argv = build(tmp_path)
    before = _snapshot(tmp_path)
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert "error" in lines[0] and needle in lines[0], lines[0]
    assert _snapshot(tmp_path) == before
    assert not Path("/nonexistent-redifine").exists()


def test_the_table_has_at_least_40_cases():
    assert len(CASES) >= 40


def test_report_on_a_read_only_run_folder(tmp_path, capsys, monkeypatch):
    _run_folder(RUN)(tmp_path)
    run = tmp_path / "run"
    real = paths.is_writable_dir
    monkeypatch.setattr(paths, "is_writable_dir", lambda p: Path(p) != run and real(p))  # root ignores chmod
    before = _snapshot(tmp_path)
    assert cli.main(["report", str(run)]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "RUN_DIR" in line and "cannot write" in line
    assert _snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod")
def test_plot_into_a_chmod_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert cli.main(["schedule", "7.5", "--steps", "3", "--plot", str(ro / "x.png")]) == 2
    finally:
        ro.chmod(0o755)
    assert "cannot write" in capsys.readouterr().err and not list(ro.iterdir())


# --------------------------------------------------------------------------------------------------- bounds table
@pytest.mark.parametrize("key", list(bounds.BOUNDS))
def test_every_bound_accepts_its_ends_and_refuses_past_them(key):
    b = bounds.BOUNDS[key]
    assert bounds.check(key, b.hi) == b.hi
    if not b.lo_open:
        assert bounds.check(key, b.lo) == b.lo
    past = b.hi + b.multiple if b.integer else b.hi * 1.5 + 1
    with pytest.raises(ValueError) as e:
        bounds.check(key, past, f"my.{key}")
    assert str(e.value).startswith(f"my.{key}={past!r} must be ") and b.allowed in str(e.value)
    for bad in (True, "3", float("nan"), None):
        assert not bounds.in_bounds(key, bad)


def test_cli_docs_list_every_bound():
    doc = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert bounds.markdown_table() in doc


# -------------------------------------------------------------------------------------------------------- --quiet
def test_quiet_chain_prints_nothing_but_the_one_error_line_after_loading(tmp_path):
    """Loading the toy model emits no third-party chatter; an error after loading is the only line on stderr."""
    (tmp_path / "c.toml").write_text(GOOD)
    code = textwrap.dedent(f"""
        import sys
        from redifine_core import chain, cli
        loaded = []
        real = cli.load_job_pipeline
        cli.load_job_pipeline = lambda job: loaded.append(1) or real(job)
        def fail(*a, **k):
            assert loaded, "run_chain before the model loaded"
            raise ValueError("found after loading")
        chain.run_chain = fail
        sys.exit(cli.main(["chain", {str(tmp_path / 'c.toml')!r}, "--out", {str(tmp_path / 'run')!r}, "--quiet"]))
    """)
    env = dict(os.environ, PYTHONWARNINGS="default", TRANSFORMERS_VERBOSITY="warning")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "redifine chain: error: found after loading", r.stderr
    assert r.stdout == ""
