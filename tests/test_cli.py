"""The `redifine` CLI: help, one-line usage errors (exit 2), schedule output, report, Ctrl-C, a tiny chain end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from PIL import Image

from redifine_core import chain as chain_mod
from redifine_core import cli
from redifine_core.progress import check_cancel
from helpers import GOOD_CHAIN_TOML, write_captioned_folder

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["chain", "demo", "science", "report", "schedule", "traits", "dataset"]


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(command + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: redifine") and (not command or command[0] in out)


def test_entry_point_module_runs():
    r = subprocess.run([sys.executable, "-m", "redifine_core.cli", "--help"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0 and all(c in r.stdout for c in COMMANDS)
    script = Path(sys.executable).parent / "redifine"
    if script.exists():  # installed console script (pyproject [project.scripts])
        r = subprocess.run([str(script), "schedule", "2", "--steps", "3", "--json"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and json.loads(r.stdout) == [2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["schedule", "redifine"], "--steps"),
        (["schedule", "redifine", "--steps", "many"], "--steps"),
        (["schedule", "redifine", "--steps", "0"], "--steps"),
        (["schedule", "warp(1,2)", "--steps", "4"], "warp"),
        (["chain", "x.toml"], "--out"),
        (["nosuchcommand"], "nosuchcommand"),
        (["dataset", "a/b", "--out", "x", "--limit", "0"], "--limit"),
        (["report"], "run_dir"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, needle, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    line = _one_line_error(capsys.readouterr().err)
    assert needle in line and "error" in line


GOOD = GOOD_CHAIN_TOML


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda t: t.replace("steps = 2\n[[methods]]", "stepz = 2\n[[methods]]"), "train.stepz"),
        (lambda t: t.replace("iterations = 2", 'iterations = "2"'), "iterations"),
        (lambda t: t.replace("iterations = 2", "iterations = 0"), "iterations"),
        (lambda t: t.replace("cfg = 1.5", "cfg = -1.0"), "cfg"),
        (lambda t: t.replace('kind = "baseline"', 'kind = "magic"'), "kind"),
        (lambda t: t.replace('name = "low"', 'name = "low"\ncolour = "red"'), "methods[0].colour"),
        (lambda t: t + "\n[extras]\nx = 1\n", "extras"),
        (lambda t: t.replace('source = "toy"\n[dataset]', '[dataset]'), "pipeline.source"),
        (lambda t: t.replace('source = "toy:4"', 'source = "toy:1"'), "dataset.source"),
        (lambda t: t.replace('[pipeline]', '[pipeline]\ngpu = true'), "pipeline.gpu"),
        (lambda t: t.replace("[chain]", "[chain]\nsampler = \"warp\""), "sampler"),
        (lambda t: t.replace("[chain]", "[chain]\nprotocol = \"sideways\""), "protocol"),
        (lambda t: t.replace("[train]", "[train]\nlearning_rate = -1.0"), "learning_rate"),
        (lambda t: t.replace("[[methods]]", "[[methods]]\nschedule = 3"), "methods[0].schedule"),
        (lambda t: t.replace("iterations = 2", "iterations = 2 ="), "TOML"),
    ],
)
def test_bad_config_exits_2_naming_the_key(edit, needle, tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text(edit(GOOD))
    rc = cli.main(["chain", str(toml), "--out", str(tmp_path / "run")])
    assert rc == 2
    line = _one_line_error(capsys.readouterr().err)
    assert needle in line
    assert not (tmp_path / "run").exists()  # nothing written


def test_example_config_is_valid():
    job = cli.parse_chain_toml(ROOT / "example_configs" / "chain.toml")
    names = [m.name for m in job.config.methods]
    assert len(names) >= 3 and {m.kind for m in job.config.methods} == {"baseline", "redifine", "custom"}
    assert job.pipeline_source == "toy" and job.dataset_source.startswith("toy:")


def test_existing_run_folder_needs_resume(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text(GOOD)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    assert cli.main(["chain", str(toml), "--out", str(tmp_path / "run")]) == 2
    assert "--resume" in _one_line_error(capsys.readouterr().err)


def test_schedule_json_matches_parse_schedule(capsys):
    from redifine_core.guidance import parse_schedule

    assert cli.main(["schedule", "redifine", "--steps", "7", "--json"]) == 0
    values = json.loads(capsys.readouterr().out)
    assert values == parse_schedule("redifine").values(7)
    assert cli.main(["schedule", "cycle(2, linear(9, 3))", "--steps", "4", "--iteration", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == parse_schedule("cycle(2, linear(9, 3))").values(4, iteration=1)
    assert cli.main(["schedule", "linear(9, 3)", "--steps", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [ln.split() for ln in out if ln.strip() and ln.split()[0].isdigit()]
    assert [float(r[2]) for r in rows] == pytest.approx([9.0, 7.0, 5.0, 3.0])


def test_schedule_plot(tmp_path, capsys):
    pytest.importorskip("redifine_core.report").plot_schedule  # noqa: B018
    png = tmp_path / "s.png"
    assert cli.main(["schedule", "redifine", "--steps", "10", "--plot", str(png)]) == 0
    with Image.open(png) as im:
        assert im.size[0] > 100


def _fake_run(tmp_path: Path) -> Path:
    from test_chain import PIPE, FakeBackend, _cfg, _dataset

    run = tmp_path / "run"
    chain_mod.run_chain(PIPE, _dataset(), _cfg(), run, backend=FakeBackend().backend(), render=False)
    return run


def test_report_re_renders(tmp_path, capsys):
    report = pytest.importorskip("redifine_core.report")
    if not hasattr(report, "render_report"):
        pytest.skip("report.render_report not landed")
    run = _fake_run(tmp_path)
    assert not (run / "report.html").exists()
    assert cli.main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    html = (run / "report.html").read_text()
    assert "low" in html and "rd" in html
    (run / "report.html").unlink()
    assert cli.main(["report", str(run)]) == 0 and (run / "report.html").exists()
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "run.json" in _one_line_error(capsys.readouterr().err)


def test_ctrl_c_stops_cleanly_and_prints_resume(tmp_path, capsys, monkeypatch):
    toml = tmp_path / "c.toml"
    toml.write_text(GOOD)
    seen = {}

    def fake_run_chain(pipeline, dataset, config, run_dir, progress=None, cancel=None, resume=False):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C once
        time.sleep(0.05)
        seen["cancel_set"] = cancel.is_set()
        check_cancel(cancel)  # the next step honours it

    monkeypatch.setattr(chain_mod, "run_chain", fake_run_chain)
    monkeypatch.setattr(cli, "load_job_dataset", lambda job: None)
    monkeypatch.setattr(cli, "load_job_pipeline", lambda job: None)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a job started with `&`
    rc = cli.main(["chain", str(toml), "--out", str(tmp_path / "run"), "--quiet"])
    assert rc == 130 and seen["cancel_set"]
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'run'} --resume" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler restored


def test_demo_calls_run_demo_and_prints_the_report(tmp_path, capsys, monkeypatch):
    calls = {}

    def run_demo(out_dir, quick=False, seeds=(0,), progress=None, cancel=None, resume=False):
        if Path(out_dir).exists() and not resume:
            raise FileExistsError(out_dir)
        calls.update(out=Path(out_dir), quick=quick, seeds=seeds, resume=resume)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "report.html").write_text("<html></html>")
        return Path(out_dir) / "report.html"

    fake = types.ModuleType("redifine_core.toy.demo")
    fake.run_demo = run_demo
    monkeypatch.setitem(sys.modules, "redifine_core.toy.demo", fake)
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--quick", "--seeds", "0", "1", "--quiet"]) == 0
    assert calls == {"out": tmp_path / "d", "quick": True, "seeds": (0, 1), "resume": False}
    assert f"report: {tmp_path / 'd' / 'report.html'}" in capsys.readouterr().out
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert "--resume" in _one_line_error(capsys.readouterr().err)
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--quiet", "--resume"]) == 0 and calls["resume"]


def test_traits_plot(tmp_path, capsys):
    pytest.importorskip("redifine_core.traits")
    out = tmp_path / "t.png"
    assert cli.main(["traits", "--out", str(out), "--generations", "3", "--population", "50", "--quiet"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG"
    assert cli.main(["traits", "--out", str(tmp_path / "t.jpg"), "--quiet"]) == 2


# ------------------------------------------------------------------------------------------------ end to end
def test_tiny_chain_end_to_end(tiny_sd_dir, tmp_path, capsys):
    write_captioned_folder(tmp_path / "data")
    toml = tmp_path / "c.toml"
    toml.write_text(f"""
[pipeline]
source = "{tiny_sd_dir}"
device = "cpu"
[dataset]
source = "data"
[chain]
iterations = 2
steps = 2
[train]
steps = 2
batch_size = 2
[[methods]]
name = "rd"
kind = "redifine"
""")
    run = tmp_path / "run"
    rc = cli.main(["chain", str(toml), "--out", str(run), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert len(list(run.glob("*/seed_0/iter_*/DONE"))) == 2
    assert "rd seed 0: inconclusive -> inconclusive" in out and (run / "report.html").exists()  # 4 images: < 16
    # a finished run resumes as a no-op
    pngs = list(run.glob("*/seed_0/iter_*/images/*.png")) + list(run.glob("reference/images/*.png"))
    mtimes = {p: p.stat().st_mtime_ns for p in pngs}
    assert len(mtimes) == 8 + 4  # 2 iterations x 4 images + the 4 reference images
    assert cli.main(["chain", str(toml), "--out", str(run), "--resume", "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # a changed config is refused before the model loads; --overwrite starts again; a report of it renders
    capsys.readouterr()
    toml.write_text(toml.read_text().replace("iterations = 2", "iterations = 3"))
    loaded = []
    real = cli.load_job_pipeline
    cli.load_job_pipeline = lambda job: loaded.append(1) or real(job)
    try:
        assert cli.main(["chain", str(toml), "--out", str(run), "--resume", "--quiet"]) == 2
        assert "iterations" in _one_line_error(capsys.readouterr().err) and not loaded
        assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
        toml.write_text(toml.read_text().replace("iterations = 3", "iterations = 1"))
        assert cli.main(["chain", str(toml), "--out", str(run), "--overwrite", "--quiet"]) == 0 and loaded
    finally:
        cli.load_job_pipeline = real
    assert len(list(run.glob("*/seed_0/iter_*/DONE"))) == 1
    assert json.loads((run / "run.json").read_text())["config"]["iterations"] == 1


def test_science_runs_the_study_and_prints_its_answers(tmp_path, capsys, monkeypatch):
    """`redifine science` validates seeds before anything runs, calls run_science, prints the study's answers;
    a Ctrl-C prints the resume command."""
    from redifine_core.toy import science

    calls = {}

    def run_science(out_dir, seeds=5, progress=None, cancel=None, resume=False):
        calls.update(out=Path(out_dir), seeds=seeds, resume=resume)
        if calls.get("interrupt"):
            raise KeyboardInterrupt
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return Path(out_dir) / "report.html"

    monkeypatch.setattr(science, "run_science", run_science)
    monkeypatch.setattr(science, "iteration_records", lambda out: {"m": {}})
    monkeypatch.setattr(science, "study", lambda records: {"records": records})
    monkeypatch.setattr(science, "answers", lambda result: [f"answer about {sorted(result['records'])}"])
    assert cli.main(["science", "--out", str(tmp_path / "s"), "--seeds", "0", "1", "--quiet"]) == 0
    assert calls == {"out": tmp_path / "s", "seeds": (0, 1), "resume": False}
    out = capsys.readouterr().out
    assert "answer about ['m']" in out and f"report: {tmp_path / 's' / 'report.html'}" in out

    assert cli.main(["science", "--out", str(tmp_path / "t"), "--seeds", "-1"]) == 2
    assert "--seeds" in _one_line_error(capsys.readouterr().err) and not (tmp_path / "t").exists()
    assert cli.main(["science", "--out", str(tmp_path / "missing"), "--resume"]) == 2
    assert "nothing to resume" in _one_line_error(capsys.readouterr().err)

    calls["interrupt"] = True
    assert cli.main(["science", "--out", str(tmp_path / "s"), "--resume", "--quiet"]) == 130
    assert f"redifine science --out {tmp_path / 's'} --resume" in capsys.readouterr().err
