"""The run report on a fake run folder built per the schema: two methods x two seeds, and a partial third method."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from redifine_core import metrics as M
from redifine_core import report as R
from test_metrics import gaussian_blur, saturate, shapes

N_CAPTIONS = 6
SIZE = 32
ITERATIONS = 3
SEEDS = (0, 1)
CAPTIONS = [f"a {c} {s} on white background" for c, s in zip(
    ["red", "blue", "green", "yellow", "purple", "orange"], ["circle", "square", "star", "circle", "square", "star"])]


def _save_set(folder: Path, images: np.ndarray, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for img, name in zip(images, names):
        Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)).save(folder / name)


def _write_iteration(root: Path, method: str, seed: int, it: int, images: np.ndarray, ref: np.ndarray,
                     prev: np.ndarray, it0: dict | None, done: bool = True) -> dict:
    d = root / method / f"seed_{seed}" / f"iter_{it:03d}"
    _save_set(d / "images", images, [f"{c:04d}_00.png" for c in range(len(images))])
    (d / "captions.json").write_text(json.dumps(CAPTIONS))
    (d / "train.json").write_text(json.dumps({"losses": [0.3, 0.2, 0.25], "seconds": 1.0}))
    m = M.set_metrics(images, ref, previous=prev, features="handcrafted")
    feats = m.pop("features")
    v = M.verdict(m, it0 if it0 is not None else m)
    (d / "metrics.json").write_text(json.dumps(
        {"method": method, "seed": seed, "iteration": it, "metrics": m, "verdict": v.to_dict(), "features": feats}))
    if done:
        (d / "DONE").write_text("")
    return m


def build_fake_run(root: Path, status: str = "running") -> Path:
    """baseline-w1 blurs a little more each iteration, baseline-w9 saturates; redifine (seed 0 only) stops early."""
    root.mkdir(parents=True, exist_ok=True)
    ref = shapes(N_CAPTIONS, size=SIZE, seed=100)
    ref[0] = 0.0
    ref[0, ..., 0] = 1.0  # caption 0 is pure red, so the grid layout can be checked pixel-exactly
    _save_set(root / "reference" / "images", ref, [f"{c:04d}.png" for c in range(N_CAPTIONS)])
    (root / "reference" / "metrics.json").write_text(json.dumps({"metrics": M.image_statistics(ref)}))
    config = {
        "iterations": ITERATIONS, "seeds": list(SEEDS), "steps": 20, "sampler": "ddim",
        "methods": [{"name": "baseline-w1", "kind": "baseline", "cfg": 1.0},
                    {"name": "baseline-w9", "kind": "baseline", "cfg": 9.0},
                    {"name": "redifine", "kind": "redifine", "schedule": "redifine", "cond_drop": 0.1}],
    }
    run = {"schema_version": 1, "status": status, "config": config, "seeds": list(SEEDS),
           "versions": {"redifine": "0.1.0", "torch": "2.x", "diffusers": "0.42", "peft": "0.21"},
           "created": "2026-11-27T21:00:00Z", "updated": "2026-11-27T21:05:00Z",
           "dataset": {"n": N_CAPTIONS, "captions": CAPTIONS}, "pipeline": {"source": "tiny", "kind": "sd1"},
           "features": M.FEATURES_HANDCRAFTED}
    (root / "run.json").write_text(json.dumps(run))
    for method, step in (("baseline-w1", lambda x, i: gaussian_blur(x, 0.6 + 0.8 * i)),
                         ("baseline-w9", lambda x, i: saturate(x, 1.3 + 0.7 * i))):
        for seed in SEEDS:
            prev, it0 = ref, None
            for it in range(ITERATIONS):
                imgs = step(shapes(N_CAPTIONS, size=SIZE, seed=100 + 7 * seed + it), it)
                m = _write_iteration(root, method, seed, it, imgs, ref, prev, it0)
                it0 = it0 or m
                prev = imgs
    m0 = _write_iteration(root, "redifine", 0, 0, shapes(N_CAPTIONS, size=SIZE, seed=300), ref, ref, None)
    _write_iteration(root, "redifine", 0, 1, shapes(N_CAPTIONS, size=SIZE, seed=301), ref, ref, m0, done=False)
    return root


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    root = build_fake_run(tmp_path_factory.mktemp("run") / "my-run")
    return root, R.render_report(root)


def test_render_writes_every_file(fake_run):
    root, html_path = fake_run
    assert html_path == root / "report.html"
    for name in ("metrics.csv", "curves.png", "report.html",
                 "grid_baseline-w1.png", "grid_baseline-w9.png", "grid_redifine.png"):
        assert (root / name).is_file(), name
    assert not list(root.glob(".*.tmp"))  # atomic writes leave no temp files


def test_metrics_csv_rows_and_columns(fake_run):
    root, _ = fake_run
    with open(root / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 2 * ITERATIONS + 2
    keys = {(r["method"], int(r["seed"]), int(r["iteration"])) for r in rows}
    assert ("redifine", 0, 1) in keys and ("baseline-w9", 1, 2) in keys
    for col in ("verdict", "reasons", "done", "features", "fid_ref", "kid_ref", "fid_prev", "hf_share",
                "spectral_slope",
                "laplacian_var", "saturation", "colourfulness", "clipped_fraction", "diversity", "std_rgb"):
        assert col in rows[0], col
    by = {(r["method"], int(r["seed"]), int(r["iteration"])): r for r in rows}
    assert by[("baseline-w1", 0, 2)]["verdict"] == "drifting to blur"
    assert by[("baseline-w9", 1, 2)]["verdict"] == "drifting to over-guidance"
    assert by[("baseline-w1", 0, 0)]["verdict"] == "stable"
    assert by[("redifine", 0, 1)]["done"] == "0" and by[("redifine", 0, 0)]["done"] == "1"
    # values round-trip from metrics.json exactly
    mj = json.loads((root / "baseline-w9" / "seed_1" / "iter_002" / "metrics.json").read_text())
    assert float(by[("baseline-w9", 1, 2)]["saturation"]) == mj["metrics"]["saturation"]
    assert by[("baseline-w1", 1, 1)]["features"] == M.FEATURES_HANDCRAFTED


def test_html_is_self_contained_with_verdict_table(fake_run):
    root, html_path = fake_run
    text = html_path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "http://" not in text and "https://" not in text and "@import" not in text
    table = text[text.index("<h2>Verdicts</h2>"): text.index("<h2>Metrics per iteration</h2>")]
    for m in ("baseline-w1", "baseline-w9", "redifine"):
        assert f"<b>{m}</b>" in table
    for label in ("drifting to blur", "drifting to over-guidance", "stable", "pending"):
        assert label in table
    assert "partial" in text and "running" in text
    assert "redifine seed 1: 0/3" in text
    assert text.count("data:image/png;base64,") == 4  # curves + three grids, inlined
    assert M.FEATURES_HANDCRAFTED in text and "ddim" in text and "diffusers" in text


def test_pngs_open_with_expected_sizes(fake_run):
    root, _ = fake_run
    with Image.open(root / "curves.png") as im:
        w, h = im.size
        assert w >= 800 and h >= 400
    n_rows = min(R.GRID_ROWS, N_CAPTIONS)
    cols = 1 + ITERATIONS
    with Image.open(root / "grid_baseline-w1.png") as im:
        assert im.size == (R.ROW_LABEL_W + cols * (R.TILE + R.PAD) + R.PAD,
                           R.HEADER + n_rows * (R.TILE + R.PAD) + R.PAD)
        px = im.convert("RGB").getpixel((R.ROW_LABEL_W + R.PAD + R.TILE // 2, R.HEADER + R.PAD + R.TILE // 2))
        assert px == (255, 0, 0)  # row 0 = caption 0, column 0 = D0 (pure red)
    with Image.open(root / "grid_redifine.png") as im:
        # the partial method still gets every column; its missing iteration is a grey placeholder
        rgb = im.convert("RGB")
        x_missing = R.ROW_LABEL_W + R.PAD + 3 * (R.TILE + R.PAD) + 4
        assert rgb.getpixel((x_missing, R.HEADER + R.PAD + 4)) == (225, 225, 225)


def test_complete_run_has_no_partial_note_and_reports_rerender(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    ref = shapes(3, size=16, seed=1)
    _save_set(root / "reference" / "images", ref, [f"{c:04d}.png" for c in range(3)])
    config = {"iterations": 1, "seeds": [5], "methods": [{"name": "m"}]}
    (root / "run.json").write_text(json.dumps({"schema_version": 1, "status": "complete", "config": config,
                                               "seeds": [5], "dataset": {"n": 3, "captions": ["a", "b", "c"]}}))
    m = _write_iteration(root, "m", 5, 0, shapes(3, size=16, seed=2), ref, ref, None)
    assert m["fid_ref"] > 0
    text = R.render_report(root).read_text()
    assert "partial" not in text
    assert text.count("data:image/png;base64,") == 2
    # rendering again overwrites in place
    assert R.render_report(root).read_text() == text


def test_empty_run_renders_and_bad_folder_raises(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (root / "run.json").write_text(json.dumps({"schema_version": 1, "status": "running", "config": {"iterations": 2}}))
    text = R.render_report(root).read_text()
    assert "partial" in text and (root / "curves.png").is_file()
    with pytest.raises(FileNotFoundError, match="no run.json"):
        R.render_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        R.render_report(tmp_path / "nope")


@pytest.mark.parametrize("content, needle", [
    ('{"a": 1}', "is not a chain run"),
    ("[1, 2]", "is not a chain run"),
    ('{"schema_version": 1, "config": "x"}', "is not a chain run"),
    ('{"schema_version": 1, "config": {', "is not valid JSON"),
    (b"\xff\xfe\x00garbage", "is not UTF-8"),
])
def test_a_run_json_that_is_not_a_run_is_refused_in_one_line_and_nothing_is_written(tmp_path, content, needle):
    root = tmp_path / "run"
    root.mkdir()
    (root / "run.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as e:
        R.render_report(root)
    msg = str(e.value)
    assert needle in msg and str(root / "run.json") in msg and "\n" not in msg
    assert sorted(p.name for p in root.iterdir()) == ["run.json"]  # no report of "0 iterations"


def test_an_unreadable_metrics_file_is_reported_as_a_problem(tmp_path):
    root = build_fake_run(tmp_path / "run")
    bad = root / "baseline-w1" / "seed_0" / "iter_001" / "metrics.json"
    bad.write_text("{not json")
    data = R.read_run(root)
    assert len(data.problems) == 1 and str(bad) in data.problems[0] and "not valid JSON" in data.problems[0]
    assert data.record("baseline-w1", 0, 1) is None and data.record("baseline-w1", 0, 2) is not None
    text = R.render_report(root).read_text()
    assert "not valid JSON" in text


def test_image_grid_layout_and_validation():
    red = np.zeros((10, 10, 3), np.float32)
    red[..., 0] = 1
    blue = np.zeros((20, 20, 3), np.uint8)
    blue[..., 2] = 255
    g = R.image_grid([red, blue, None, Image.new("RGB", (300, 150), (0, 255, 0))], rows=2, labels=["x", "y"], tile=40)
    assert g.size == (2 * (40 + R.PAD) + R.PAD, R.HEADER + 2 * (40 + R.PAD) + R.PAD)
    cell = lambda i, j: (R.PAD + j * (40 + R.PAD) + 20, R.HEADER + R.PAD + i * (40 + R.PAD) + 20)  # noqa: E731
    assert g.getpixel(cell(0, 0)) == (255, 0, 0)
    assert g.getpixel(cell(0, 1)) == (0, 0, 255)
    assert g.getpixel(cell(1, 1)) == (0, 255, 0)
    assert R.image_grid(np.zeros((3, 8, 8, 3)), rows=1).size == (3 * (R.TILE + R.PAD) + R.PAD, R.TILE + 2 * R.PAD)
    with pytest.raises(ValueError, match="labels"):
        R.image_grid([red, red], rows=1, labels=["only one"])
    with pytest.raises(ValueError, match="rows"):
        R.image_grid([red], rows=0)


def test_plot_losses_and_schedule(tmp_path):
    img = R.plot_losses(list(np.linspace(1, 0.1, 50)), path=tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as im:
        assert im.size == img.size and img.size[0] > 300
    with pytest.raises(ValueError, match="losses"):
        R.plot_losses([])
    a = R.plot_schedule(["7.5"], 20)
    b = R.plot_schedule(["redifine"], 20)
    c = R.plot_schedule(["7.5", "linear(1, 9)", "redifine_chain"], 20, path=tmp_path / "s.png", iteration=2)
    assert a.size == b.size and (tmp_path / "s.png").is_file()
    assert c.size[0] == a.size[0] and c.size[1] > a.size[1]  # a taller legend for three schedules
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).sum() > 0  # a different curve is drawn
    with pytest.raises(ValueError):
        R.plot_schedule(["linear(1,"], 20)
    with pytest.raises(ValueError, match="steps"):
        R.plot_schedule(["7.5"], 0)
