"""redifine_core.share_weights: a Pipeline over another program's original-layout tensors, with no weight copied."""

from __future__ import annotations

import pytest
import torch

from redifine_core.share_weights import copied_parameters, pipeline_from_original, storage_view
from sd_single_file import sd1_to_original, sdxl_to_original


def _config(pipe, tmp_path):
    folder = tmp_path / "config"
    pipe.save_pretrained(folder)
    for f in folder.rglob("*.safetensors"):
        f.unlink()
    return folder


def _inference_tensors(state):
    """The tensors as ComfyUI holds them: made inside torch.inference_mode()."""
    with torch.inference_mode():
        return {k: v.clone() for k, v in state.items()}


def test_pipeline_shares_every_weight_and_matches_the_source(tiny_sd, tmp_path):
    tensors = _inference_tensors(sd1_to_original(tiny_sd))
    pipe = pipeline_from_original(tensors, config_dir=_config(tiny_sd, tmp_path))
    assert pipe.kind == "sd1" and pipe.dtype == torch.float32
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert copied_parameters(module, tensors) == []
        assert not any(p.is_inference() or p.requires_grad for p in module.parameters())
    # a write into the source is seen by the pipeline: it is the same memory
    key = "model.diffusion_model.out.2.bias"
    with torch.inference_mode():
        tensors[key].add_(1.0)
    assert torch.equal(pipe.unet.conv_out.bias, tiny_sd.unet.conv_out.bias + 1.0)
    with torch.inference_mode():
        tensors[key].sub_(1.0)
    g = torch.Generator().manual_seed(0)
    c = tiny_sd.unet.config
    x = torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=g)
    ids = tiny_sd.tokenizer("a red circle", padding="max_length", max_length=tiny_sd.tokenizer.model_max_length,
                            return_tensors="pt").input_ids
    with torch.no_grad():
        ctx, ref_ctx = pipe.text_encoder(ids)[0], tiny_sd.text_encoder(ids)[0]
        assert torch.allclose(ctx, ref_ctx, atol=1e-5)
        out = pipe.unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample
        ref = tiny_sd.unet(x, torch.tensor([500]), encoder_hidden_states=ref_ctx).sample
        assert torch.allclose(out, ref, atol=1e-5)
        img = torch.rand(1, 3, 16, 16) * 2 - 1
        assert torch.allclose(pipe.vae.encode(img).latent_dist.mean, tiny_sd.vae.encode(img).latent_dist.mean,
                              atol=1e-5)


def test_training_through_shared_inference_weights_works_and_the_view_is_still_needed(tiny_sd, tmp_path):
    tensors = _inference_tensors(sd1_to_original(tiny_sd))
    pipe = pipeline_from_original(tensors, config_dir=_config(tiny_sd, tmp_path))
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    w = tensors["first_stage_model.quant_conv.weight"].flatten()[:16].reshape(4, 4)
    # the reason for storage_view: autograd refuses inference tensors (delete the view if this stops raising)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        (lin(x) @ w).sum().backward()
    (lin(x) @ storage_view(w)).sum().backward()
    assert lin.weight.grad is not None
    # and a LoRA-style gradient flows through the whole shared UNet
    c = pipe.unet.config
    x = torch.randn(1, c.in_channels, c.sample_size, c.sample_size, requires_grad=True)
    ctx = torch.randn(1, 77, c.cross_attention_dim)
    pipe.unet(x, torch.tensor([10]), encoder_hidden_states=ctx).sample.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_each_module_keeps_its_own_dtype(tiny_sd, tmp_path):
    state = {k: (v.to(torch.bfloat16) if k.startswith("cond_stage_model.") else v)
             for k, v in sd1_to_original(tiny_sd).items()}
    pipe = pipeline_from_original(_inference_tensors(state), config_dir=_config(tiny_sd, tmp_path))
    assert pipe.dtype == torch.float32 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32


def test_what_cannot_be_shared_is_refused_in_one_line(tiny_sd, tiny_sdxl, tmp_path):
    config = _config(tiny_sd, tmp_path)
    state = sd1_to_original(tiny_sd)
    mixed = {k: (v.to(torch.bfloat16) if k.endswith("norm1.weight") else v) for k, v in state.items()}
    with pytest.raises(ValueError, match=r"the UNet weights are in \['torch.bfloat16', 'torch.float32'\]") as e:
        pipeline_from_original(mixed, config_dir=config)
    assert "\n" not in str(e.value)
    fp8 = {k: (v.to(torch.float8_e4m3fn) if k.startswith("first_stage_model.") else v) for k, v in state.items()}
    with pytest.raises(ValueError, match="the VAE weights are in"):
        pipeline_from_original(fp8, config_dir=config)
    with pytest.raises(ValueError, match="sdxl: sharing weights supports SD1.x only"):
        pipeline_from_original(sdxl_to_original(tiny_sdxl), config_dir=config)
    no_vae = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(ValueError, match=r"no VAE weights \(first_stage_model\.\*\)"):
        pipeline_from_original(no_vae, config_dir=config)
    with pytest.raises(ValueError, match="prediction_type='x'"):
        pipeline_from_original(state, config_dir=config, prediction_type="x")
