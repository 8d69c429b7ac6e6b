"""Optimizers and learning-rate schedules of a training run, chosen by name.

    OPTIMIZERS, LR_SCHEDULERS                                  the names TrainConfig accepts
    missing_optimizer_package(name) -> str | None             one line naming the package to install, or None
    make_optimizer(name, param_groups, weight_decay)           AdamW (torch), AdamW8bit (bitsandbytes), Prodigy
    optimizer_description(optimizer, weight_decay) -> str     sd-scripts' ``ss_optimizer`` spelling
    make_lr_schedule(name, optimizer, warmup_steps, steps)     diffusers' ``get_scheduler``

AdamW8bit and Prodigy come from optional packages (``bitsandbytes``, ``prodigyopt``); a missing one is reported by
:func:`missing_optimizer_package` before any model work. Schedules are diffusers' own, so a warm-up starts at
learning rate 0 on the first step and reaches the set rate after ``warmup_steps`` steps, as in sd-scripts.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Optional

import torch

OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "prodigy")
LR_SCHEDULERS: tuple[str, ...] = ("constant", "constant_with_warmup", "cosine")
# optimizer name -> (import name, pip name) of the package it needs
_PACKAGES: dict[str, tuple[str, str]] = {"adamw8bit": ("bitsandbytes", "bitsandbytes"),
                                         "prodigy": ("prodigyopt", "prodigyopt")}


def missing_optimizer_package(name: str) -> Optional[str]:
    """None when optimizer ``name`` can be built here, else one line naming the package to install."""
    if name not in _PACKAGES:
        return None
    module, pip_name = _PACKAGES[name]
    if importlib.util.find_spec(module) is not None:
        return None
    return f"optimizer {name!r} needs the {pip_name} package, which is not installed: pip install {pip_name}"


def make_optimizer(name: str, param_groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``param_groups`` (each with its own ``lr``)."""
    missing = missing_optimizer_package(name)
    if missing:
        raise ValueError(missing)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, weight_decay=weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(param_groups, weight_decay=weight_decay)
    raise ValueError(f"optimizer = {name!r} is invalid: must be one of {OPTIMIZERS}")


def optimizer_description(optimizer: Any, weight_decay: float) -> str:
    """``module.Class(args)`` as sd-scripts writes ``ss_optimizer``: ``torch.optim.adamw.AdamW(weight_decay=0.01)``."""
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__name__}(weight_decay={weight_decay!r})"


def make_lr_schedule(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int,
                     steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' schedule ``name``: call ``step()`` once after every optimizer step."""
    from diffusers.optimization import get_scheduler

    if name not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler = {name!r} is invalid: must be one of {LR_SCHEDULERS}")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
