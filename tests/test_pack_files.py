"""The files the ComfyUI registry and ComfyUI itself read from the pack: requirements.txt against pyproject, the
registry icon, and the template folder (no other folder at the template route, a thumbnail and an API twin each)."""

from __future__ import annotations

import re
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")
"""ComfyUI 0.3.64's template folders (app/custom_node_manager.py), in the order it registers their routes."""


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def test_requirements_carry_pyproject_bounds():
    deps = {_name(d): d for d in PYPROJECT["project"]["dependencies"]}
    lines = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [ln for ln in lines if ln and not ln.startswith("#")]
    assert {_name(r) for r in reqs} >= {"diffusers", "peft", "accelerate", "matplotlib", "transformers"}
    for r in reqs:
        assert r == deps[_name(r)], f"requirements.txt {r!r} differs from pyproject {deps[_name(r)]!r}"


def test_registry_icon_is_a_committed_square_image_at_its_raw_url():
    icon = PYPROJECT["tool"]["comfy"]["Icon"]
    repo = PYPROJECT["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert icon.startswith(prefix)
    im = Image.open(ROOT / icon.removeprefix(prefix))
    assert im.format == "PNG" and im.width == im.height >= 128


def test_only_example_workflows_answers_the_template_route():
    assert [f for f in TEMPLATE_FOLDERS if (ROOT / f).exists()] == ["example_workflows"]


def test_every_template_has_a_thumbnail_and_an_api_twin():
    folder = ROOT / "example_workflows"
    names = sorted(p.stem for p in folder.glob("*.json"))
    assert names
    for name in names:
        thumb = folder / f"{name}.jpg"
        im = Image.open(thumb)
        assert im.format == "JPEG" and im.width == im.height == 512, name
        assert thumb.stat().st_size < 80_000, name
        assert (folder / "api" / f"{name}.api.json").is_file(), name
