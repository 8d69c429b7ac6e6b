"""Training borrows the caller's pipeline: what it reads from it, and everything it changes and puts back.

The accessors work on a :class:`redifine_core.models.Pipeline` and on a plain diffusers pipeline object.
:class:`BorrowedPipeline` records the state training changes (``requires_grad`` flags, train/eval modes, gradient
checkpointing, modules parked on the CPU to free the GPU) and :meth:`BorrowedPipeline.restore` puts it back, on
success, error and cancel alike. Frozen weights that are inference tensors (a pipeline loaded inside ComfyUI's
``torch.inference_mode()``) are replaced in place by ordinary copies with the same values, since autograd cannot save
inference tensors; that is the one change that stays (values are unchanged).
"""

from __future__ import annotations

from typing import Any

import torch

# ------------------------------------------------------------------------------------------------- accessors


def vae_scale_factor(pipeline: Any) -> int:
    v = getattr(pipeline, "vae_scale_factor", None)
    return int(v) if v else 2 ** (len(pipeline.vae.config.block_out_channels) - 1)


def default_size(pipeline: Any) -> int:
    v = getattr(pipeline, "default_size", None)
    if isinstance(v, int) and v > 0:
        return v
    return int(pipeline.unet.config.sample_size) * vae_scale_factor(pipeline)


def is_sdxl(pipeline: Any) -> bool:
    v = getattr(pipeline, "is_sdxl", None)
    return v if isinstance(v, bool) else getattr(pipeline, "text_encoder_2", None) is not None


def pipeline_device(pipeline: Any) -> torch.device:
    d = getattr(pipeline, "device", None)
    return torch.device(d) if d is not None else next(pipeline.unet.parameters()).device


def force_zeros_for_empty_prompt(pipeline: Any) -> bool:
    own = getattr(pipeline, "__dict__", {})
    if "force_zeros_for_empty_prompt" in own:  # redifine_core.models.Pipeline
        return bool(own["force_zeros_for_empty_prompt"])
    cfg = getattr(pipeline, "config", None)  # a diffusers pipeline
    return bool(cfg.get("force_zeros_for_empty_prompt", False)) if isinstance(cfg, dict) else False


def base_model_version(pipeline: Any) -> str:
    """kohya's ``ss_base_model_version`` for the pipeline."""
    kind = getattr(pipeline, "kind", None) or ("sdxl" if is_sdxl(pipeline) else "sd1")
    return {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "toy": "redifine_toy"}.get(kind, str(kind))


def module_device(module: Any) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def empty_cuda_cache(device: torch.device) -> None:
    """Give cached CUDA blocks back between phases (nothing to do on other devices)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def replace_inference_tensors(model: torch.nn.Module) -> int:
    """Swap inference-mode parameters/buffers of ``model`` for ordinary copies (same values); return how many."""
    n = 0
    for mod in model.modules():
        for name, prm in list(mod._parameters.items()):
            if prm is not None and prm.is_inference():
                mod._parameters[name] = torch.nn.Parameter(prm.clone(), requires_grad=prm.requires_grad)
                n += 1
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_inference():
                mod._buffers[name] = buf.clone()
                n += 1
    return n


def _te_checkpointing(te: Any) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in te.modules())


# ---------------------------------------------------------------------------------------------- the loan


class BorrowedPipeline:
    """What training changes on ``pipeline``, recorded before the change so that :meth:`restore` undoes it.

    ``models``: name -> module of every module whose flags training may touch (UNet and text encoders).
    """

    def __init__(self, models: dict[str, Any]) -> None:
        self.models = {k: m for k, m in models.items() if m is not None}
        self._grad = {name: {k: p.requires_grad for k, p in m.named_parameters()} for name, m in self.models.items()}
        self._modes: list[tuple[torch.nn.Module, bool]] = []
        self._checkpointed: list[tuple[Any, bool]] = []
        self._parked: list[tuple[Any, torch.device]] = []

    def train_mode(self, module: torch.nn.Module) -> None:
        """Put ``module`` in train mode (restored per submodule)."""
        self._modes.extend((sub, sub.training) for sub in module.modules())
        module.train()

    def checkpoint_unet(self, unet: Any) -> None:
        self._checkpointed.append((unet, bool(unet.is_gradient_checkpointing)))
        unet.enable_gradient_checkpointing()

    def checkpoint_text_encoder(self, te: Any) -> None:
        self._checkpointed.append((te, _te_checkpointing(te)))
        if hasattr(te, "activation_checkpointing_enable"):  # transformers >= 5.x
            te.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def park(self, module: Any) -> bool:
        """Move ``module`` to the CPU until :meth:`restore` (``Module.to`` keeps the same Parameter objects);
        modules already on the CPU stay. Returns whether it moved."""
        if module is None or module_device(module).type == "cpu":
            return False
        self._parked.append((module, module_device(module)))
        module.to("cpu")
        return True

    @property
    def parked(self) -> list:
        return [m for m, _ in self._parked]

    def restore(self) -> None:
        """Put back flags, modes, checkpointing and parked modules (call after the adapters are removed)."""
        for name, flags in self._grad.items():
            for k, prm in self.models[name].named_parameters():
                if k in flags and prm.requires_grad != flags[k]:
                    prm.requires_grad_(flags[k])
        while self._modes:
            sub, training = self._modes.pop()
            sub.training = training
        while self._checkpointed:
            m, was = self._checkpointed.pop()
            if was:
                continue
            if hasattr(m, "disable_gradient_checkpointing"):  # diffusers
                if m.is_gradient_checkpointing:
                    m.disable_gradient_checkpointing()
            else:
                (getattr(m, "activation_checkpointing_disable", None) or m.gradient_checkpointing_disable)()
        while self._parked:
            module, dev = self._parked.pop()
            module.to(dev)
