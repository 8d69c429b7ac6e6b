"""One real ComfyUI server (with this pack and the test-only probe pack) shared by every comfyui test."""

from __future__ import annotations

import pytest

from harness import REPO, ComfyServer, unavailable_reason


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/comfyui/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.comfyui)


def toy_available() -> bool:
    return (REPO / "redifine_core" / "toy" / "model" / "model_index.json").is_file()


@pytest.fixture(scope="session")
def server():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    s = ComfyServer(extra_packs={"redifine_probe": REPO / "tests" / "comfyui" / "probe_pack"})
    s.model_choice = "toy (bundled)"
    if not toy_available():  # the toy weights are built separately; a tiny SD-layout model stands in for them
        from redifine_core.tiny import save_tiny_sd

        save_tiny_sd(s.tmp / "models" / "diffusers" / "tiny")
        s.model_choice = "diffusers/tiny"
    yield from s.serve()
