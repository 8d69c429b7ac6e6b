"""Single-file loading internals: the plain-read safetensors reader, cast-as-read, dtypes, no mmap, bounded RSS."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from redifine_core.models import Pipeline
from redifine_core.single_file import SafetensorsFile, checkpoint_shapes, single_file_components

from sd_single_file import sd1_to_original, sdxl_to_original


@pytest.fixture(autouse=True)
def no_outside_tokenizers(monkeypatch, tmp_path):
    monkeypatch.delenv("REDIFINE_TOKENIZER_DIR", raising=False)
    monkeypatch.setenv("COMFYUI_ROOT", str(tmp_path / "no_comfyui"))


def _mixed(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.f16": torch.randn(3, 5, generator=g).half(),
        "a.bf16": torch.randn(7, generator=g).bfloat16(),
        "a.f32": torch.randn(2, 2, 2, generator=g),
        "a.f8": torch.randn(2, 3, generator=g).to(torch.float8_e4m3fn),  # fp8 checkpoints exist
        "b.i64": torch.arange(6).view(2, 3),
        "b.bool": torch.tensor([True, False, True]),
        "b.scalar": torch.tensor(875000),
        "b.empty": torch.zeros(0, 4),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_reader_matches_safetensors_for_every_dtype(tmp_path):
    path = _mixed(tmp_path)
    ref = load_file(str(path))
    st = SafetensorsFile(path)
    assert st.shapes() == {k: tuple(v.shape) for k, v in ref.items()} == checkpoint_shapes(path)
    got = st.read(sorted(ref))
    for k, v in ref.items():
        as_bytes = lambda t: t.reshape(-1).view(torch.uint8)  # noqa: E731  (torch.equal has no fp8 kernel)
        assert got[k].dtype == v.dtype and torch.equal(as_bytes(got[k]), as_bytes(v)), k


def test_reader_casts_floating_tensors_as_read_and_leaves_integers(tmp_path):
    path = _mixed(tmp_path)
    ref = load_file(str(path))
    got = SafetensorsFile(path).read(sorted(ref), torch.float32)
    for k, v in ref.items():
        want = v.float() if v.is_floating_point() else v
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k


@pytest.mark.parametrize("mangle, words", [
    (lambda b: b[:5], ["shorter than the 8-byte header"]),
    (lambda b: struct.pack("<Q", 10**12) + b[8:], ["header length"]),
    (lambda b: b[:8] + b"x" + b[9:], ["JSONDecodeError"]),
    (lambda b: b[: len(b) - 3], ["outside the file"]),
])
def test_reader_rejects_broken_files_in_one_line(tmp_path, mangle, words):
    good = _mixed(tmp_path).read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(mangle(good))
    with pytest.raises(ValueError) as err:
        SafetensorsFile(bad)
    msg = str(err.value)
    assert "bad.safetensors is not a readable safetensors file" in msg and "\n" not in msg
    for w in words:
        assert w in msg


def test_reader_rejects_unknown_dtypes(tmp_path):
    header = json.dumps({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(ValueError, match="unknown dtype"):
        SafetensorsFile(path)


def _file_and_config(pipe, tmp_path: Path, convert, dtype=torch.float16) -> tuple[Path, Path]:
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in convert(pipe).items()}
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    config = tmp_path / "config"
    pipe.save_pretrained(config)
    for f in config.rglob("*.safetensors"):
        f.unlink()
    return path, config


def test_fp16_file_loads_straight_into_each_target_dtype_without_safetensors_mmap(tiny_sdxl, tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch

    path, config = _file_and_config(tiny_sdxl, tmp_path, sdxl_to_original)

    def refuse(*args, **kwargs):
        raise AssertionError("the loader must not map the file through safetensors")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "safe_open", refuse, raising=False)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        pipe = Pipeline(**single_file_components(path, dtype, torch.device("cpu"), config_dir=config))
        assert pipe.dtype == dtype and pipe.kind == "sdxl"
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype  # the tiny VAE sets force_upcast
        for ours, ref, want in ((pipe.unet, tiny_sdxl.unet, dtype), (pipe.text_encoder_2, tiny_sdxl.text_encoder_2, dtype),
                                (pipe.vae, tiny_sdxl.vae, vae_dtype)):
            sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
            for k, v in sd_ref.items():
                if v.is_floating_point():
                    assert sd_ours[k].dtype == want, k
                    assert torch.equal(sd_ours[k], v.half().to(want)), k  # the file's fp16 values, cast once


def test_sd1_file_in_bf16_keeps_every_weight(tiny_sd, tmp_path):
    path, config = _file_and_config(tiny_sd, tmp_path, sd1_to_original, dtype=torch.bfloat16)
    pipe = Pipeline(**single_file_components(path, torch.bfloat16, torch.device("cpu"), config_dir=config))
    for ours, ref in ((pipe.unet, tiny_sd.unet), (pipe.vae, tiny_sd.vae), (pipe.text_encoder, tiny_sd.text_encoder)):
        for k, v in ref.state_dict().items():
            if v.is_floating_point():
                assert torch.equal(ours.state_dict()[k], v.bfloat16()), k


def test_reading_holds_only_the_cast_copy(tmp_path):
    """64 fp16 tensors (128 MB on disk) read as fp32 (256 MB): RSS grows by the fp32 copies, not by the file too."""
    script = textwrap.dedent(f"""
        import resource, torch
        from safetensors.torch import save_file
        path = {str(tmp_path / 'big.safetensors')!r}
        save_file({{f"t{{i}}": torch.full((1024, 1024), float(i), dtype=torch.float16) for i in range(64)}}, path)
        from redifine_core.single_file import SafetensorsFile
        st = SafetensorsFile(path)
        def rss():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
        before = rss()
        out = st.read(sorted(st.entries), torch.float32)
        assert all(float(v[0, 0]) == float(k[1:]) for k, v in out.items())
        print((rss() - before) / (64 * 1024 * 1024 * 4))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    growth = float(res.stdout.strip().splitlines()[-1])
    assert 0.9 < growth < 1.1  # a mapped file would add its 128 MB of pages: 1.5


def test_missing_file_is_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors does not exist or is not a file"):
        checkpoint_shapes(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        SafetensorsFile(tmp_path)


def test_the_reason_for_our_reader_diffusers_from_single_file_holds_the_whole_file_at_once(tiny_sd, tmp_path,
                                                                                            monkeypatch):
    """Pins why redifine_core.single_file keeps its own reader instead of diffusers' public ``from_single_file``:
    diffusers (``load_single_file_checkpoint`` -> ``load_state_dict``) materializes every tensor of the file in one
    dict before converting, so its peak is the file plus the model (measured 1.6-2.2x the weights, ours 1.04-1.24x:
    docs/benchmarks.md). If this test fails, diffusers reads lazily now: measure it again and switch to it."""
    import safetensors.torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_model

    path, config = _file_and_config(tiny_sd, tmp_path, sd1_to_original)
    n_file = len(SafetensorsFile(path).shapes())
    whole_reads, checkpoints = [], []
    real_load_file, real_load_checkpoint = safetensors.torch.load_file, single_file_model.load_single_file_checkpoint

    def spy_load_file(filename, *args, **kwargs):
        out = real_load_file(filename, *args, **kwargs)
        whole_reads.append((Path(filename), len(out)))
        return out

    def spy_load_checkpoint(*args, **kwargs):
        out = real_load_checkpoint(*args, **kwargs)
        checkpoints.append(out)
        return out

    monkeypatch.setattr(safetensors.torch, "load_file", spy_load_file)
    monkeypatch.setattr(single_file_model, "load_single_file_checkpoint", spy_load_checkpoint)
    unet = UNet2DConditionModel.from_single_file(str(path), config=str(config), subfolder="unet",
                                                 local_files_only=True)
    assert unet.config.cross_attention_dim == tiny_sd.unet.config.cross_attention_dim  # the public route worked
    assert whole_reads == [(path, n_file)], "diffusers no longer reads the whole file with safetensors' load_file"
    (ckpt,) = checkpoints
    assert isinstance(ckpt, dict) and len(ckpt) == n_file  # every tensor of the file (not only the UNet's) ...
    tensors = list(ckpt.values())
    assert all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors)  # ... materialized ...
    assert len({t.data_ptr() for t in tensors if t.numel()}) == sum(1 for t in tensors if t.numel())  # ... at once
