"""The template browser's requests against a real server with the pack installed as a git clone: the list, then every
listed workflow and its thumbnail, fetched from the URLs the ComfyUI frontend builds for a custom pack's template."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request

from PIL import Image

from harness import PACK_FOLDER, WORKFLOW_DIR

WORKFLOWS = ("collapse_cfg_sweep", "redifine_chain", "train_then_ksampler", "schedule_explorer", "redifine_check")


def _fetch(server, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def _workflow_problems(name: str, body: bytes) -> list[str]:
    """What keeps ``body`` from being a UI workflow the frontend can open (empty when it is one)."""
    try:
        wf = json.loads(body)
    except ValueError as e:
        return [f"{name}.json is not JSON: {e}"]
    if not isinstance(wf, dict) or not isinstance(wf.get("nodes"), list) or not isinstance(wf.get("links"), list):
        return [f"{name}.json has no nodes/links lists"]
    problems = []
    ids = {n.get("id") for n in wf["nodes"]}
    if not wf["nodes"] or None in ids or len(ids) != len(wf["nodes"]) or any("type" not in n for n in wf["nodes"]):
        problems.append(f"{name}.json: every node needs a distinct id and a type")
    for link in wf["links"]:  # [id, origin node, origin slot, target node, target slot, type]
        if len(link) != 6 or link[1] not in ids or link[3] not in ids:
            problems.append(f"{name}.json: link {link!r} does not join two nodes of the workflow")
    return problems


def test_the_pack_is_installed_as_a_git_clone(server):
    assert not server.pack.is_symlink() and (server.pack / ".git").is_dir()


def test_every_listed_template_and_its_thumbnail_is_served(server):
    status, body = _fetch(server, "/api/workflow_templates")
    assert status == 200
    listed = json.loads(body)[PACK_FOLDER]
    assert sorted(listed) == sorted(WORKFLOWS)  # exactly these: the API twins in api/ are not templates
    problems = []
    for name in listed:
        base = f"/api/workflow_templates/{PACK_FOLDER}/{name}"
        status, body = _fetch(server, base + ".json")
        if status != 200:
            problems.append(f"GET {base}.json -> {status}")
        else:
            problems += _workflow_problems(name, body)
            if body != (WORKFLOW_DIR / f"{name}.json").read_bytes():
                problems.append(f"{name}.json served differs from the repository's")
        status, body = _fetch(server, base + ".jpg")  # the browser's thumbnail: <name>.jpg beside <name>.json
        if status != 200:
            problems.append(f"GET {base}.jpg -> {status}")
        elif not body.startswith(b"\xff\xd8\xff") or Image.open(io.BytesIO(body)).format != "JPEG":
            problems.append(f"{name}.jpg is not a JPEG")
    assert problems == []
