"""Full-size SD1.5 end to end on CPU: a random-weight original-layout single file (fp16, 2.1 GB) built from the bundled
configs, loaded through ``load_pipeline``, 2 condition-drop LoRA steps at 64 px, 2 images with a schedule and the
LoRA, the kohya file saved and read back. Nothing is downloaded.

The run happens in a child process (this file run as a script) so that its peak RSS is the run's own, not the test
session's; the figure is printed and recorded as the test's ``peak_rss_gb`` property.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CAPTIONS = ["a red circle on a black background", "a photo of a small cat"]
RANK, ALPHA = 4, 8.0  # alpha != rank, so the saved .alpha is checked to be lora_alpha
SD15_ATTENTION_MODULES = 16 * 2 * 4  # 16 transformer blocks x (attn1, attn2) x (to_q, to_k, to_v, to_out.0)


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(model: str, tokenizer: str, out: str) -> None:
    """The run itself (in the child process): writes ``facts.json``, ``images.pt`` and ``lora.safetensors`` to ``out``."""
    import time

    import torch

    torch.set_num_threads(int(os.environ.get("REDIFINE_TEST_THREADS", "1")))
    from safetensors.torch import save_file

    from redifine_core.data import CaptionedImages
    from redifine_core.lora import save_lora
    from redifine_core.models import load_pipeline
    from redifine_core.sampling import generate
    from redifine_core.training import TrainConfig, finetune_lora

    out_dir = Path(out)
    facts: dict = {}
    t0 = time.perf_counter()
    pipe = load_pipeline(model, device="cpu", tokenizer_dir=tokenizer)
    facts.update(load_s=time.perf_counter() - t0, kind=pipe.kind, dtype=str(pipe.dtype),
                 unet_params=sum(p.numel() for p in pipe.unet.parameters()))
    g = torch.Generator().manual_seed(0)
    data = CaptionedImages.from_images(torch.rand(len(CAPTIONS), 64, 64, 3, generator=g), CAPTIONS)
    cfg = TrainConfig(steps=2, batch_size=2, rank=RANK, alpha=ALPHA, cond_drop=0.5, resolution=64, seed=0)
    t0 = time.perf_counter()
    result = finetune_lora(pipe, data, cfg)
    facts.update(train_s=time.perf_counter() - t0, losses=result.losses, drop_masks=result.drop_masks)
    t0 = time.perf_counter()
    images = generate(pipe, CAPTIONS, "redifine", steps=4, seeds=[0, 1], width=64, height=64, lora=result.lora)
    facts["generate_s"] = time.perf_counter() - t0
    save_file({"images": images.contiguous()}, str(out_dir / "images.safetensors"))
    save_lora(result.lora, out_dir / "lora.safetensors", layout="kohya")
    facts["lora_up_abs_sum"] = float(sum(v.abs().sum() for k, v in result.lora.unet.items() if "lora_B" in k))
    facts["peak_rss_bytes"] = _peak_rss_bytes()
    (out_dir / "facts.json").write_text(json.dumps(facts))


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    from redifine_core.random_models import write_single_file, write_tokenizer

    folder = tmp_path_factory.mktemp("full_size_sd15")
    model = write_single_file("sd1", folder / "sd15_random.safetensors")
    return model, write_tokenizer(folder / "tokenizer")


def test_random_sd15_file_is_the_real_architecture(sd15_file):
    from redifine_core.models import checkpoint_shapes, detect_architecture

    shapes = checkpoint_shapes(sd15_file[0])
    assert detect_architecture(shapes) == "sd1"
    assert sd15_file[0].stat().st_size > 2.0e9  # 1.07 B fp16 parameters, like the released SD1.5 file
    assert shapes["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] == (49408, 768)
    assert shapes["first_stage_model.decoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)


def test_full_size_sd15_trains_samples_and_saves_a_kohya_lora(sd15_file, tmp_path, record_property):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from redifine_core.lora import load_lora

    model, tokenizer = sd15_file
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, __file__, str(model), str(tokenizer), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    facts = json.loads((tmp_path / "facts.json").read_text())
    peak_gb = facts["peak_rss_bytes"] / 1e9
    record_property("peak_rss_gb", round(peak_gb, 2))
    print(f"\nfull-size SD1.5 on CPU ({facts['dtype']}): peak RSS {peak_gb:.2f} GB; load {facts['load_s']:.0f} s, "
          f"train 2 steps {facts['train_s']:.0f} s, generate 2 images {facts['generate_s']:.0f} s")

    assert facts["kind"] == "sd1" and facts["unet_params"] > 850e6
    assert len(facts["losses"]) == 2 and all(0 < x < 10 for x in facts["losses"])
    assert [len(m) for m in facts["drop_masks"]] == [2, 2]
    assert facts["lora_up_abs_sum"] > 0  # B starts at zero: two steps moved it

    images = load_file(str(tmp_path / "images.safetensors"))["images"]
    assert images.shape == (2, 64, 64, 3) and torch.isfinite(images).all()
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert float(images.std()) > 0.01 and not torch.equal(images[0], images[1])

    path = tmp_path / "lora.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        alphas = {k: float(fh.get_tensor(k)) for k in keys if k.endswith(".alpha")}
        down = fh.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight")
        up = fh.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight")
    assert len(alphas) == SD15_ATTENTION_MODULES and set(alphas.values()) == {ALPHA}
    assert len(keys) == 3 * SD15_ATTENTION_MODULES and all(k.startswith("lora_unet_") for k in keys)
    assert down.shape == (RANK, 768) and up.shape == (320, RANK)  # attn2.to_k reads the 768-wide CLIP context
    back = load_lora(path)
    assert back.rank == RANK and back.alpha == ALPHA and back.num_modules() == SD15_ATTENTION_MODULES
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert torch.equal(back.unet[f"{key}.lora_A.weight"], down) and torch.equal(back.unet[f"{key}.lora_B.weight"], up)


if __name__ == "__main__":
    _child(*sys.argv[1:4])
