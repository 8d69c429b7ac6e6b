"""Test-only ComfyUI pack: records, per model call, whether ComfyUI ran the unconditional pass.

Loaded only by tests/comfyui (never shipped in the node pack). ``ReDiFineTestUncondProbe`` wraps a MODEL with a
CALC_COND_BATCH wrapper that appends one JSON line {"sigma", "uncond"} per call to ``log_path``.
"""

import json


class ReDiFineTestUncondProbe:
    CATEGORY = "ReDiFine/testing"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "log_path": ("STRING", {"default": ""})}}

    def patch(self, model, log_path):
        import comfy.patcher_extension as pe

        def wrapper(executor, model_, conds, x_in, timestep, model_options):
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"sigma": float(timestep.flatten()[0]), "uncond": conds[1] is not None}) + "\n")
            return executor(model_, conds, x_in, timestep, model_options)

        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "redifine_test_probe", wrapper)
        return (m,)


class ReDiFineTestNativeParity:
    """Max abs difference between the pipeline's own text encoder / UNet and the native CLIP / MODEL built from it."""

    CATEGORY = "ReDiFine/testing"
    FUNCTION = "check"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pipeline": ("REDIFINE_PIPELINE",), "model": ("MODEL",), "clip": ("CLIP",),
                             "text": ("STRING", {"default": "a red circle on a blue background"})}}

    def check(self, pipeline, model, clip, text):
        import torch

        import comfy.model_management as mm

        with torch.no_grad():
            native_text = clip.encode_from_tokens(clip.tokenize(text)).float().cpu()
            tok = pipeline.tokenizer
            ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            dev = pipeline.unet.device
            ref_text = pipeline.text_encoder(ids.to(dev))[0].float().cpu()
            mm.load_models_gpu([model])
            g = torch.Generator().manual_seed(0)
            c = pipeline.unet.config
            x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
            t = torch.tensor([900.0, 100.0])
            ctx = ref_text.expand(2, -1, -1)
            ref = pipeline.unet(x.to(dev, pipeline.unet.dtype), t.to(dev), encoder_hidden_states=ctx.to(dev, pipeline.unet.dtype)).sample.float().cpu()
            dm = model.model.diffusion_model
            mdev = next(dm.parameters()).device
            nat = dm(x.to(mdev), timesteps=t.to(mdev), context=ctx.to(mdev)).float().cpu()
        out = {"text_shape": list(native_text.shape), "ref_text_shape": list(ref_text.shape),
               "text_diff": float((native_text - ref_text).abs().max()) if native_text.shape == ref_text.shape else None,
               "unet_diff": float((nat - ref).abs().max()), "unet_scale": float(ref.abs().max())}
        return {"ui": {"text": [json.dumps(out)]}, "result": (json.dumps(out),)}


NODE_CLASS_MAPPINGS = {"ReDiFineTestUncondProbe": ReDiFineTestUncondProbe,
                       "ReDiFineTestNativeParity": ReDiFineTestNativeParity}


class ReDiFineTestMemory:
    """Where a pipeline's weights are and whether they are a stock MODEL/CLIP/VAE's very memory; warms imports.

    ``after`` only orders this node after another (e.g. a training node's lora_name output).
    """

    CATEGORY = "ReDiFine/testing"
    FUNCTION = "check"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {"pipeline": ("REDIFINE_PIPELINE",), "model": ("MODEL",),
                                             "clip": ("CLIP",), "vae": ("VAE",), "after": ("*",)}}

    @classmethod
    def VALIDATE_INPUTS(cls, input_types=None):
        return True

    def check(self, pipeline=None, model=None, clip=None, vae=None, after=None):
        import diffusers  # noqa: F401  (so that a later node's import costs no RSS in the measurement)
        import peft  # noqa: F401
        import transformers  # noqa: F401
        from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
        from transformers import CLIPTextModel  # noqa: F401

        import comfy.model_management as mm

        out = {"offload_device": str(mm.unet_offload_device()), "torch_device": str(mm.get_torch_device())}
        if pipeline is not None:
            out["devices"] = sorted({str(p.device) for m in pipeline.modules() for p in m.parameters()})
            out["pipeline_device"] = str(pipeline.device)
            out["dtypes"] = {name: str(getattr(pipeline, name).dtype) for name in ("unet", "vae", "text_encoder")}
        natives = [m for m in (getattr(model, "model", None), getattr(getattr(clip, "patcher", None), "model", None),
                               getattr(getattr(vae, "patcher", None), "model", None)) if m is not None]
        if pipeline is not None and natives:
            ranges = []
            for m in natives:
                for t in list(m.parameters()) + list(m.buffers()):
                    s = t.untyped_storage()
                    ranges.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
            ranges.sort()
            import bisect

            starts = [r[0] for r in ranges]
            shared = total = 0
            for m in pipeline.modules():
                for p in m.parameters():
                    n = p.numel() * p.element_size()
                    total += n
                    i = bisect.bisect_right(starts, p.data_ptr()) - 1
                    if i >= 0 and p.data_ptr() + n <= ranges[i][1]:
                        shared += n
            out["shared_bytes"], out["pipeline_bytes"] = shared, total
        text = json.dumps(out)
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS["ReDiFineTestMemory"] = ReDiFineTestMemory


class ReDiFineTestVaeParity:
    """Decode one fixed latent with two VAEs; report the class of each and the largest difference."""

    CATEGORY = "ReDiFine/testing"
    FUNCTION = "check"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_a": ("VAE",), "vae_b": ("VAE",)}}

    def check(self, vae_a, vae_b):
        import torch

        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        a, b = vae_a.decode(z).float(), vae_b.decode(z).float()
        out = {"class_a": type(vae_a).__module__ + "." + type(vae_a).__name__,
               "class_b": type(vae_b).__module__ + "." + type(vae_b).__name__,
               "diff": float((a - b).abs().max()), "shape": list(a.shape)}
        text = json.dumps(out)
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS["ReDiFineTestVaeParity"] = ReDiFineTestVaeParity
