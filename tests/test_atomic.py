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


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_every_file_type_gets_the_mode_a_plain_open_gives(tmp_path, umask):
    from PIL import Image

    from redifine_core.lora import LoraWeights, save_lora

    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w"):
            pass
        atomic.write_text(tmp_path / "a.txt", "x")
        atomic.write_json(tmp_path / "a.json", {"a": 1})
        atomic.save_safetensors(tmp_path / "w.safetensors", {"a": torch.zeros(2)})
        atomic.save_png(tmp_path / "i.png", Image.new("RGB", (4, 4)))
        lora = LoraWeights(unet={"down.to_q.lora_A.weight": torch.zeros(2, 4),
                                 "down.to_q.lora_B.weight": torch.zeros(4, 2)}, rank=2, alpha=2.0)
        lora_path = save_lora(lora, tmp_path / "l.safetensors")
    finally:
        os.umask(old)
    want = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    assert want == 0o666 & ~umask
    for name in ("a.txt", "a.json", "w.safetensors", "i.png", lora_path.name):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == want, name
