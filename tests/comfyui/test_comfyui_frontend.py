"""Each template opened in the real ComfyUI frontend as a user opens it (headless system Chromium driven by
playwright: Browse Templates, the pack's category, the card): its thumbnail shows, no page error or console error
from startup on, every node type is known, no missing-node or invalid-workflow message, and every widget holds the
value of the API twin."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from harness import PACK_FOLDER, REPO, comfyui_python, load_workflow

CHROMIUM = "/usr/bin/chromium"
WORKFLOWS = ("collapse_cfg_sweep", "redifine_chain", "train_then_ksampler", "schedule_explorer", "redifine_check")


def _browser_unavailable() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"no system Chromium at {CHROMIUM} (apt-get install chromium)"
    py = comfyui_python()
    if py is None or not py.exists():
        return "no ComfyUI python"
    r = subprocess.run([str(py), "-c", "import playwright.sync_api"], capture_output=True)
    if r.returncode != 0:
        return f"playwright is not installed in {py} (pip install playwright; no browser download needed)"
    return None


@pytest.fixture(scope="module")
def frontend_report(server, tmp_path_factory):
    reason = _browser_unavailable()
    if reason:
        pytest.skip(reason)
    shots = tmp_path_factory.mktemp("shots")
    r = subprocess.run([str(comfyui_python()), str(REPO / "tests" / "comfyui" / "frontend_script.py"), "check",
                        server.url, PACK_FOLDER, str(shots)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    if os.environ.get("REDIFINE_UPDATE_SCREENSHOTS") == "1":  # maintainer: refresh docs/img
        from PIL import Image

        for name in WORKFLOWS:
            im = Image.open(shots / f"{name}.png").convert("RGB")
            im = im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.LANCZOS)
            im.quantize(colors=128).save(REPO / "docs" / "img" / f"workflow_{name}.png", optimize=True)
    report["_shots"] = str(shots)
    return report


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    return a == b


def test_the_frontend_starts_without_errors_and_lists_every_template(frontend_report):
    assert frontend_report["_startup_errors"] == []
    assert sorted(k for k in frontend_report if not k.startswith("_")) == sorted(WORKFLOWS)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_template_opens_with_its_thumbnail_no_error_every_node_known_and_values_intact(frontend_report, name):
    rep = frontend_report[name]
    assert rep["errors"] == [] and rep["thumbnail_shown"]
    unknown = [n["type"] for n in rep["nodes"] if not n["known"]]
    assert unknown == [] and rep["missing_dialog"] == 0 and rep["invalid_alerts"] == 0
    by_id = {n["id"]: n for n in rep["nodes"]}
    api = load_workflow(name)
    assert set(api) <= set(by_id)
    for node_id, node in api.items():
        ui = by_id[node_id]
        assert ui["type"] == node["class_type"]
        for key, value in node["inputs"].items():
            if isinstance(value, list):  # a link, not a widget
                continue
            assert key in ui["widgets"], f"{name}: node {node_id} has no widget {key}"
            assert _same(ui["widgets"][key], value), f"{name}: {node_id}.{key} = {ui['widgets'][key]!r}, want {value!r}"
    notes = [n for n in rep["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and len(next(iter(notes[0]["widgets"].values()))) > 200
    assert Path(frontend_report["_shots"], f"{name}.png").stat().st_size > 10_000
