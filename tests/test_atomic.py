"""Atomic writes: an error mid-write leaves the old file whole and no temp file behind."""

import os
import stat

import pytest
import torch

from redifine_core import atomic


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "run.json"
    atomic.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_written_files_get_umask_mode_not_0600(tmp_path):
    atomic.write_text(tmp_path / "a.txt", "x")
    mode = stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_safetensors_round_trip_and_stale_temp_cleanup(tmp_path):
    from safetensors.torch import load_file

    atomic.save_safetensors(tmp_path / "w.safetensors", {"a": torch.arange(4.0)}, {"k": "v"})
    assert torch.equal(load_file(tmp_path / "w.safetensors")["a"], torch.arange(4.0))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".x.png.abc.tmp").write_bytes(b"partial")
    assert atomic.clean_stale_temps(tmp_path) == 1
    assert not (tmp_path / "sub" / ".x.png.abc.tmp").exists()
