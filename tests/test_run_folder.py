"""RunFolder (the one owner of the run layout), starting and restarting runs, streaming generation, config checks.

Driven by the fake backend of test_chain.py (fast and exact); nothing here loads a model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_chain import PIPE, FakeBackend, _cfg, _dataset  # noqa: E402

from redifine_core.chain import (  # noqa: E402
    ChainConfig,
    MethodConfig,
    RunFolder,
    check_run_folder,
    load_run,
    parse_method_line,
    parse_methods,
    run_chain,
)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# ------------------------------------------------------------------------------------------------------ layout
def test_layout_paths_match_what_a_run_writes(tmp_path):
    run = tmp_path / "r"
    run_chain(PIPE, _dataset(), _cfg(iterations=1, images_per_caption=2), run, backend=FakeBackend().backend(),
              render=False)
    f = RunFolder(run)
    assert f.exists() and f.is_done("low", 0, 0) and f.is_done("rd", 0, 0) and not f.is_done("low", 0, 1)
    assert f.iteration_dir("low", 0, 0) == run / "low" / "seed_0" / "iter_000"
    assert [p.name for p in f.iteration_images("low", 0, 0)] == [f.image_name(c, k) for c in range(3) for k in range(2)]
    assert f.caption_image("low", 0, 0, 2) == f.images_dir("low", 0, 0) / "0002_00.png"
    assert f.caption_image(None, 0, 0, 1) == f.reference_image(1) and f.reference_image(1).is_file()
    assert f.caption_image("low", 0, 5, 0) is None
    assert f.read_captions("low", 0, 0) == [f"a red circle {c}" for c in range(3) for _ in range(2)]
    assert [p.name for p in f.method_dirs()] == ["low", "rd"]
    data = f.read()
    assert data.problems == [] and [(r.method, r.iteration, r.done) for r in data.last_done()] == [
        ("low", 0, True), ("rd", 0, True)]


@pytest.mark.parametrize("content, needle", [
    ('{"a": 1}', "is not a chain run"),
    ('"text"', "is not a chain run"),
    ('{"schema_version": "1", "config": {}}', "is not a chain run"),
    ('{"schema_version": 1, "config": {}, "status": 3}', "status=3"),
    ("{", "is not valid JSON"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "is not UTF-8"),
])
def test_a_run_json_that_is_not_a_run_is_one_line_naming_the_file(tmp_path, content, needle):
    (tmp_path / "run.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    for read in (RunFolder(tmp_path).read_manifest, RunFolder(tmp_path).read, lambda: load_run(tmp_path),
                 lambda: check_run_folder(tmp_path, resume=True)):
        with pytest.raises(ValueError) as e:
            read()
        assert needle in str(e.value) and str(tmp_path / "run.json") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="is not"):
        run_chain(PIPE, _dataset(), _cfg(), tmp_path, resume=True, backend=FakeBackend().backend(), render=False)
    assert _tree(tmp_path) == ["run.json"]  # nothing written next to it


def test_load_run_names_an_unreadable_metrics_file_of_a_done_iteration(tmp_path):
    run_chain(PIPE, _dataset(), _cfg(iterations=1), tmp_path / "r", backend=FakeBackend().backend(), render=False)
    bad = RunFolder(tmp_path / "r").metrics_json("rd", 0, 0)
    bad.write_text("[]")
    with pytest.raises(ValueError, match="metrics.json' is not an iteration's metrics"):
        load_run(tmp_path / "r")
    assert "is not an iteration's metrics" in RunFolder(tmp_path / "r").read().problems[0]


# -------------------------------------------------------------------------------------------- starting a run
def test_resume_of_a_folder_without_a_run_is_an_error_and_writes_nothing(tmp_path):
    for target in (tmp_path / "typo", tmp_path / "empty"):
        if target.name == "empty":
            target.mkdir()
        with pytest.raises(FileNotFoundError, match="nothing to resume"):
            run_chain(PIPE, _dataset(), _cfg(), target, resume=True, backend=FakeBackend().backend(), render=False)
    assert _tree(tmp_path) == ["empty"]


def test_a_run_that_failed_before_any_unit_finished_resumes_with_a_fixed_config(tmp_path):
    run = tmp_path / "r"
    b = FakeBackend().backend()
    real = b.generate

    def fail(*a, **k):
        raise RuntimeError("bad schedule found late")

    b.generate = fail
    with pytest.raises(RuntimeError):
        run_chain(PIPE, _dataset(), _cfg(steps=3), run, backend=b, render=False)
    assert json.loads((run / "run.json").read_text())["status"] == "failed" and not RunFolder(run).any_done()
    (run / "notes.txt").write_text("mine")  # a user's file in the folder is kept
    b.generate = real
    fixed = _cfg(steps=2, methods=(MethodConfig("other", cfg=3.0),))
    res = run_chain(PIPE, _dataset(), fixed, run, resume=True, backend=b, render=False)
    assert res.status == "complete"
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["config"] == fixed.to_dict() and "error" not in manifest
    assert sorted(p.name for p in RunFolder(run).method_dirs()) == ["other"]  # the old partial method is gone
    assert (run / "notes.txt").read_text() == "mine"


def test_a_changed_config_after_a_finished_unit_is_refused_and_overwrite_starts_again(tmp_path):
    run = tmp_path / "r"
    run_chain(PIPE, _dataset(), _cfg(iterations=1), run, backend=FakeBackend().backend(), render=False)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = _cfg(iterations=1, steps=5)
    with pytest.raises(ValueError, match=r"config.steps.*overwrite"):
        run_chain(PIPE, _dataset(), other, run, resume=True, backend=FakeBackend().backend(), render=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        run_chain(PIPE, _dataset(), other, run, backend=FakeBackend().backend(), render=False)
    with pytest.raises(ValueError, match=r"config.steps.*overwrite"):  # before any model loads (the CLI's check)
        check_run_folder(run, resume=True, config=other)
    check_run_folder(run, resume=True, config=_cfg(iterations=1))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # refusals touch nothing
    fb = FakeBackend()
    res = run_chain(PIPE, _dataset(), other, run, overwrite=True, backend=fb.backend(), render=False)
    assert res.status == "complete" and len(fb.finetune_calls) == 2
    assert json.loads((run / "run.json").read_text())["config"]["steps"] == 5


# ------------------------------------------------------------------------------------------- recorded schedules
def _scheduled_cfg(schedule: str, iterations: int = 2):
    return _cfg(iterations=iterations, methods=(MethodConfig("low", cfg=1.5), MethodConfig("rd", kind="redifine"),
                                                MethodConfig("s", kind="custom", schedule=schedule, cond_drop=0.1)))


def _rewind(run: Path, iteration: int) -> None:
    """Make every method's ``iteration`` unfinished, as an interrupted run leaves it."""
    f = RunFolder(run)
    for m in ("low", "rd", "s"):
        f.clear_iteration(m, 0, iteration)


def _schedules_used(fb: FakeBackend) -> set:
    return {c["schedule"] for c in fb.generate_calls}


def test_a_new_run_records_every_schedule_resolved_and_generates_with_it(tmp_path):
    fb = FakeBackend()
    run_chain(PIPE, _dataset(), _scheduled_cfg("redifine_rising(10)", iterations=1), tmp_path / "r",
              backend=fb.backend(), render=False)
    manifest = json.loads((tmp_path / "r" / "run.json").read_text())
    assert manifest["schedules"] == {
        "low": {"given": 1.5, "resolved": "1.5"},
        "rd": {"given": "redifine", "resolved": "exp(7.5, 1, 3)"},
        "s": {"given": "redifine_rising(10)", "resolved": "linear(3.25, 10)"}}
    assert [m["schedule"] for m in manifest["config"]["methods"]] == [None, "redifine", "redifine_rising(10)"]
    assert _schedules_used(fb) == {1.5, "exp(7.5, 1, 3)", "linear(3.25, 10)"}


def test_a_run_json_of_the_previous_version_resumes_with_the_schedules_it_started_with(tmp_path):
    run = tmp_path / "r"
    cfg = _scheduled_cfg("redifine_rising")
    run_chain(PIPE, _dataset(), cfg, run, backend=FakeBackend().backend(), render=False)
    _rewind(run, 1)
    manifest = json.loads((run / "run.json").read_text())
    del manifest["schedules"]  # what the previous version wrote: the preset names only
    (run / "run.json").write_text(json.dumps(manifest))
    fb = FakeBackend()
    assert run_chain(PIPE, _dataset(), cfg, run, resume=True, backend=fb.backend(), render=False).status == "complete"
    # the previous version's redifine_rising (today's is linear(2.625, 7.5))
    assert _schedules_used(fb) == {1.5, "exp(7.5, 1, 3)", "linear(2, 7.5)"}
    recorded = json.loads((run / "run.json").read_text())["schedules"]
    assert recorded["s"] == {"given": "redifine_rising", "resolved": "linear(2, 7.5)"}


def test_a_run_resumes_with_its_recorded_schedule_after_the_alias_moved(tmp_path, monkeypatch):
    from redifine_core import guidance, presets

    run = tmp_path / "r"
    run_chain(PIPE, _dataset(), _scheduled_cfg("7.5"), run, backend=FakeBackend().backend(), render=False)
    _rewind(run, 1)
    # what the study's one-line change of presets.REDIFINE_READING does to the name 'redifine'
    monkeypatch.setitem(presets.PRESET_DEFS, "redifine", presets._alias(presets.PRESET_DEFS["redifine_rising"]))
    guidance._parse_text.cache_clear()
    try:
        assert guidance.parse_schedule("redifine").spec == "linear(2.625, 7.5)"
        fb = FakeBackend()
        run_chain(PIPE, _dataset(), _scheduled_cfg("7.5"), run, resume=True, backend=fb.backend(), render=False)
        assert "exp(7.5, 1, 3)" in _schedules_used(fb) and "linear(2.625, 7.5)" not in _schedules_used(fb)
        fb = FakeBackend()
        run_chain(PIPE, _dataset(), _scheduled_cfg("7.5"), tmp_path / "new", backend=fb.backend(), render=False)
        assert "linear(2.625, 7.5)" in _schedules_used(fb)  # a new run takes the new meaning
    finally:
        monkeypatch.undo()
        guidance._parse_text.cache_clear()


def test_a_run_started_with_an_old_call_resumes_with_its_plain_form(tmp_path):
    run = tmp_path / "r"
    run_chain(PIPE, _dataset(), _scheduled_cfg("linear(2, 7.5)"), run, backend=FakeBackend().backend(),
              render=False)
    _rewind(run, 1)
    manifest = json.loads((run / "run.json").read_text())
    del manifest["schedules"]
    manifest["config"]["methods"][2]["schedule"] = "redifine_rising(2, 7.5)"  # refused today, as written before
    (run / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"write linear\(2, 7.5\)"):
        _scheduled_cfg("redifine_rising(2, 7.5)")
    with pytest.raises(ValueError, match=r"config.methods\[2\].schedule"):  # another schedule: refused
        check_run_folder(run, resume=True, config=_scheduled_cfg("redifine_rising"))
    check_run_folder(run, resume=True, config=_scheduled_cfg("linear(2, 7.5)"))
    fb = FakeBackend()
    run_chain(PIPE, _dataset(), _scheduled_cfg("linear(2, 7.5)"), run, resume=True, backend=fb.backend(),
              render=False)
    assert "linear(2, 7.5)" in _schedules_used(fb)


def test_an_unreadable_schedule_record_is_one_line_naming_run_json(tmp_path):
    run = tmp_path / "r"
    run_chain(PIPE, _dataset(), _scheduled_cfg("7.5", iterations=1), run, backend=FakeBackend().backend(),
              render=False)
    manifest = json.loads((run / "run.json").read_text())
    manifest["schedules"]["rd"] = {"given": "redifine"}
    (run / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as e:
        run_chain(PIPE, _dataset(), _scheduled_cfg("7.5", iterations=1), run, resume=True,
                  backend=FakeBackend().backend(), render=False)
    msg = str(e.value)
    assert "\n" not in msg and str(run / "run.json") in msg and "method 'rd'" in msg


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "precious.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a chain run folder"):
        run_chain(PIPE, _dataset(), _cfg(), tmp_path, overwrite=True, backend=FakeBackend().backend(), render=False)
    assert _tree(tmp_path) == ["precious.txt"]


def test_check_run_folder_is_what_run_chain_checks_and_never_writes(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_run_folder(f)
    check_run_folder(tmp_path / "new")
    check_run_folder(tmp_path / "new", overwrite=True)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        check_run_folder(tmp_path / "new", resume=True)
    with pytest.raises(FileExistsError, match="not empty"):
        check_run_folder(tmp_path)
    assert _tree(tmp_path) == ["file"]


# ------------------------------------------------------------------------------------------------- streaming
def test_generation_streams_in_batches_and_uses_generate_batches_when_there(tmp_path):
    cfg = _cfg(iterations=1, images_per_caption=3, batch_size=4, methods=(MethodConfig("low", cfg=1.5),))
    fb = FakeBackend()
    run_chain(PIPE, _dataset(), cfg, tmp_path / "a", backend=fb.backend(), render=False)
    assert [len(c["prompts"]) for c in fb.generate_calls] == [4, 4, 1]  # 9 images, generated 4 at a time
    assert fb.summaries[0].batches == 3 and len(fb.summaries[0]) == 9  # the summary saw each batch once

    streamed = []

    def generate_batches(pipeline, prompts, schedule, steps=20, seeds=0, *, batch_size=8, **kw):
        for start in range(0, len(prompts), batch_size):
            idx = list(range(start, min(start + batch_size, len(prompts))))
            streamed.append(idx)
            yield idx, fb2.generate(pipeline, [prompts[j] for j in idx], schedule, steps, [seeds[j] for j in idx],
                                    batch_size=batch_size, **kw)

    fb2 = FakeBackend()
    b = fb2.backend()
    b.generate_batches = generate_batches
    b.generate = None  # must not be used
    run_chain(PIPE, _dataset(), cfg, tmp_path / "b", backend=b, render=False)
    assert streamed == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    pngs = lambda r: {p.name: p.read_bytes() for p in (r / "low/seed_0/iter_000/images").iterdir()}  # noqa: E731
    assert pngs(tmp_path / "a") == pngs(tmp_path / "b")


def test_generation_out_of_order_is_an_error_and_the_stream_is_closed_at_once(tmp_path):
    closed = []

    def generate_batches(pipeline, prompts, schedule, steps=20, seeds=0, **kw):
        try:
            yield [1], np.zeros((1, 16, 16, 3), np.float32)
            yield [0], np.zeros((1, 16, 16, 3), np.float32)
        finally:
            closed.append(True)  # where sampling removes the LoRA from the pipeline

    b = FakeBackend().backend()
    b.generate_batches = generate_batches
    with pytest.raises(RuntimeError, match="in order") as e:
        run_chain(PIPE, _dataset(), _cfg(iterations=1), tmp_path / "r", backend=b, render=False)
    assert closed == [True] and e.value.__traceback__ is not None  # closed while the error is still alive


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw, needle", [
    (dict(features="inception:/missing/pool3.safetensors"), "missing/pool3.safetensors"),
    (dict(features="clip"), "features"),
    (dict(iterations=1001), "iterations"),
    (dict(batch_size=10**9), "batch_size"),
    (dict(steps=100_000_000), "steps"),
    (dict(images_per_caption=10**6), "images_per_caption"),
    (dict(seeds=(2**70,)), "seeds"),
    (dict(lora_scale=1e30), "lora_scale"),
    (dict(width=10**6), "width"),
])
def test_everything_checkable_without_the_model_is_checked_in_the_config(kw, needle):
    with pytest.raises(ValueError, match=needle) as e:
        _cfg(**kw)
    assert "\n" not in str(e.value)


def test_a_missing_feature_file_is_found_while_reading_the_config_dict():
    d = _cfg().to_dict()
    d["features"] = "inception:/missing.safetensors"
    with pytest.raises(ValueError, match="does not exist"):
        ChainConfig.from_dict(d)


def test_method_lines_are_validated_by_the_core_config():
    assert parse_method_line("rd: redifine cond_drop=0.5") == {"kind": "redifine", "cond_drop": 0.5, "name": "rd"}
    for bad, needle in (("redifine cond_drop=1.0", "cond_drop=1.0"), ("baseline 1000", "cfg=1000.0"),
                        ("custom schedule=nonsense(", "schedule"), ("bad/name: baseline 2", "start with one of")):
        with pytest.raises(ValueError, match=needle) as e:
            parse_method_line(bad)
        assert str(e.value).startswith("method line 1")
    methods = parse_methods("baseline 2\n\n  rd: redifine  \n")
    assert methods == (MethodConfig("baseline-w2", cfg=2.0), MethodConfig("rd", kind="redifine"))


def test_the_chain_node_refuses_what_core_refuses():
    from test_nodes_unit import MAPPINGS

    v = MAPPINGS["ReDiFineChain"].VALIDATE_INPUTS
    assert v(run_name="ok", methods="redifine cond_drop=0.9", iterations=2, protocol="restart") is True
    assert "cond_drop=1.0" in v(run_name="ok", methods="redifine cond_drop=1.0", iterations=2, protocol="restart")
    assert "iterations=1000000000000" in v(run_name="ok", methods="redifine", iterations=10**12, protocol="restart")


def test_final_verdicts_of_the_node_come_from_the_run_folder(tmp_path):
    from test_nodes_unit import chain_mod

    run_chain(PIPE, _dataset(), _cfg(seeds=(0, 3)), tmp_path / "r", backend=FakeBackend().backend(), render=False)
    (tmp_path / "r" / "rd" / "seed_3" / "iter_001" / "DONE").unlink()
    lines = chain_mod.final_verdicts(str(tmp_path / "r"))
    assert [ln.split(":")[0] for ln in lines] == ["low (seed 0), iteration 1", "low (seed 3), iteration 1",
                                                  "rd (seed 0), iteration 1", "rd (seed 3), iteration 0"]


def test_progress_events_carry_the_stage_as_a_field(tmp_path):
    events = []
    run_chain(PIPE, _dataset(), _cfg(iterations=1, methods=(MethodConfig("low", cfg=1.5),)), tmp_path / "r",
              progress=events.append, backend=FakeBackend().backend(), render=False)
    stages = [e.extra.get("stage") for e in events if e.phase == "chain"]
    assert stages == ["training", "sampling", "metrics", "verdict", "complete"]


def test_generation_uses_the_text_layer_the_lora_was_trained_on(tmp_path):
    from dataclasses import replace

    seen = []

    def generate_batches(pipeline, prompts, schedule, steps=20, seeds=0, *, batch_size=8, **kw):
        seen.append(kw.get("clip_skip"))
        yield list(range(len(prompts))), np.zeros((len(prompts), 16, 16, 3), np.float32)

    for clip_skip in (None, 2):
        cfg = _cfg(iterations=1, methods=(MethodConfig("low", cfg=1.5),))
        cfg = replace(cfg, train=replace(cfg.train, clip_skip=clip_skip))
        b = FakeBackend().backend()
        b.generate_batches = generate_batches
        run_chain(PIPE, _dataset(), cfg, tmp_path / f"skip_{clip_skip}", backend=b, render=False)
    assert seen == [None, 2]
