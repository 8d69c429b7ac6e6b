"""The training recipe a LoRA was made with, read from the ``ss_*`` metadata kohya's sd-scripts (and we) write.

    read_recipe(lora_path) -> (kwargs, read, assumed)
        kwargs   TrainConfig keyword arguments; ``TrainConfig(**kwargs)`` is valid
        read     {metadata key: the string found} for every key a value came from
        assumed  {TrainConfig field: why its value is not (exactly) what the file says}

Keys read (sd-scripts' spelling; values are ``str()`` of Python values, so ``"None"`` means unset):
``ss_max_train_steps`` steps, ``ss_learning_rate`` / ``ss_unet_lr`` / ``ss_text_encoder_lr`` learning rates,
``ss_lr_scheduler`` + ``ss_lr_warmup_steps``, ``ss_optimizer`` (``module.Class(args)``; ``weight_decay=`` read
from the args), ``ss_min_snr_gamma``, ``ss_noise_offset``, ``ss_caption_dropout_rate`` (our condition drop),
``ss_clip_skip``, ``ss_resolution`` (``"(512, 512)"``, ``"512,512"`` or ``"512"``), ``ss_batch_size_per_device``,
``ss_gradient_accumulation_steps``, ``ss_flip_aug``, ``ss_random_crop``, ``ss_max_grad_norm``, ``ss_seed``,
``ss_enable_bucket`` + ``ss_bucket_reso_steps`` (aspect-ratio buckets; the sides' range is ours, from the resolution),
and ``ss_datasets`` (a dataset-config run's resolution, batch size, buckets and augmentation). Rank and alpha always come from the
weights (training continues this LoRA, so they must match it); ``ss_network_dim`` / ``ss_network_alpha`` are
checked against them. The trained modules come from the weights too (our own files: ``ss_network_args``' target).

Defaults for a key that is missing, unset or out of bounds are :class:`~redifine_core.training.TrainConfig`'s own,
except ``weight_decay`` (the optimizer's default: 0.01 for AdamW and AdamW8bit, 0 for Prodigy). Never read:
``ss_mixed_precision``, ``ss_gradient_checkpointing``, ``ss_cache_latents`` (they belong to the machine, not the
recipe). Not supported, and said so: schedules other than constant / constant-with-warmup / cosine, optimizers
other than AdamW / AdamW8bit / Prodigy, clip skip on SDXL (always the penultimate layer, as in sd-scripts), bucket
side ranges other than half to twice the resolution.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from typing import Any, Callable, Optional

from .atomic import PathLike
from .lora import TARGET_GROUPS, LoraWeights, load_lora
from .training import TrainConfig
from .training.buckets import side_range
from .training.optim import missing_optimizer_package

# ss_optimizer class name -> (our optimizer, its default weight decay)
_OPTIMIZERS = {"AdamW": ("adamw", 0.01), "AdamW8bit": ("adamw8bit", 0.01), "Prodigy": ("prodigy", 0.0)}
_NOT_READ = {"mixed_precision": "follows the weights and this device (ss_mixed_precision is not read)",
             "gradient_checkpointing": "a memory setting of this machine (ss_gradient_checkpointing is not read)",
             "cache_latents": "a memory setting of this machine (ss_cache_latents is not read)"}


def _unset(s: Optional[str]) -> bool:
    return s is None or s.strip() in ("", "None", "none", "null")


def _float(s: str) -> float:
    v = float(s.strip().strip("[]").split(",")[0])
    if not math.isfinite(v):
        raise ValueError(s)
    return v


def _int(s: str) -> int:
    v = _float(s)
    if not v.is_integer():
        raise ValueError(s)
    return int(v)


def _bool(s: str) -> bool:
    t = s.strip().lower()
    if t not in ("true", "false", "1", "0"):
        raise ValueError(s)
    return t in ("true", "1")


class _Reader:
    """Collects kwargs, the keys they came from and every assumption."""

    def __init__(self, metadata: dict[str, str]) -> None:
        self.md = metadata
        self.kwargs: dict[str, Any] = {}
        self.read: dict[str, str] = {}
        self.assumed: dict[str, str] = {}
        try:
            datasets = json.loads(metadata.get("ss_datasets", "[]"))
            self.dataset = datasets[0] if isinstance(datasets, list) and datasets else {}
            subsets = self.dataset.get("subsets") or [{}]
            self.subset = subsets[0] if isinstance(subsets[0], dict) else {}
        except (ValueError, AttributeError, TypeError):
            self.dataset, self.subset = {}, {}

    def raw(self, key: str) -> Optional[str]:
        """The value of ``key``, or of its ``ss_datasets`` entry (dataset-config runs write those there only)."""
        if not _unset(self.md.get(key)):
            return self.md[key]
        short = key[3:]
        for src in (self.dataset, self.subset):
            if short in src and src[short] is not None:
                return str(src[short])
        return None

    def take(self, field: str, key: str, parse: Callable[[str], Any], missing: str = "") -> None:
        """Set ``field`` from ``key`` when present and parsable; otherwise note TrainConfig's default."""
        s = self.raw(key)
        if s is None:
            self.assume(field, missing or f"{key} is missing or unset")
            return
        try:
            self.kwargs[field] = parse(s)
            self.read[key] = s
        except (ValueError, TypeError):
            self.assume(field, f"{key} = {s!r} is not readable")

    def assume(self, field: str, why: str) -> None:
        self.kwargs.pop(field, None)
        self.assumed[field] = why


def _default(field: str) -> Any:
    return next(f.default for f in fields(TrainConfig) if f.name == field)


def _resolution(s: str) -> int:
    sizes = [int(x) for x in re.findall(r"\d+", s)]
    if not sizes or len(sizes) > 2:
        raise ValueError(s)
    side = math.sqrt(sizes[0] * sizes[-1])  # a non-square size trains at the square of the same area
    return max(8, int(round(side / 8)) * 8)


def _targets(lora: LoraWeights, md: dict[str, str]) -> tuple[tuple[str, ...], list[str]]:
    """(our target groups, names of UNet modules no group trains): ours from ``ss_network_args``, else the weights'."""
    try:
        own = json.loads(md.get("ss_network_args", "{}")).get("target")
    except (ValueError, AttributeError):
        own = None
    if isinstance(own, list) and own and all(isinstance(t, str) for t in own):
        return tuple(own), []
    groups, others = set(), set()
    for path in lora.modules("unet"):
        hit = [g for g, names in TARGET_GROUPS.items() if any(path == n or path.endswith("." + n) for n in names)]
        groups.update(hit)
        if not hit:
            others.add(path.rsplit(".", 1)[-1])
    target = [g for g in TARGET_GROUPS if g in groups] or ["attention"]
    if lora.text_encoder or lora.text_encoder_2:
        target.append("text_encoder")
    return tuple(target), sorted(others)


def _optimizer(r: _Reader) -> None:
    s = r.raw("ss_optimizer")
    if s is None:
        r.assume("optimizer", "ss_optimizer is missing")
        return
    name, _, args = s.partition("(")
    cls = name.strip().rsplit(".", 1)[-1]
    ours, decay = _OPTIMIZERS.get(cls, (None, None))
    r.read["ss_optimizer"] = s
    if ours is None:
        r.assume("optimizer", f"ss_optimizer = {s!r} is not supported (supported: AdamW, AdamW8bit, Prodigy)")
        ours, decay = "adamw", 0.01
    missing = missing_optimizer_package(ours)
    if missing and ours == "prodigy":  # Prodigy's learning rate is a multiplier near 1: no other optimizer can use it
        raise ValueError(f"the LoRA was trained with Prodigy: {missing}")
    if missing:
        r.assume("optimizer", f"{missing} (AdamW8bit is AdamW with 8-bit state)")
        ours = "adamw"
    r.kwargs["optimizer"] = ours
    m = re.search(r"weight_decay\s*=\s*([-+0-9.eE]+)", args)
    if m:
        r.kwargs["weight_decay"] = float(m.group(1))
    else:
        r.kwargs["weight_decay"] = decay
        r.assumed["weight_decay"] = f"the default of {cls} (ss_optimizer names no weight_decay)"


def _learning_rates(r: _Reader, trains_te: bool) -> None:
    r.take("learning_rate", "ss_learning_rate", _float)
    for field, key in (("unet_lr", "ss_unet_lr"), ("text_encoder_lr", "ss_text_encoder_lr")):
        s = r.raw(key)
        if s is None:
            continue
        try:
            v = _float(s)
        except ValueError:
            r.assume(field, f"{key} = {s!r} is not readable")
            continue
        r.read[key] = s
        if field == "text_encoder_lr" and (v == 0 or not trains_te):
            continue  # 0 = the text encoders were not trained (the target says so, from the weights)
        r.kwargs[field] = v
        if "[" in s:
            r.assumed[field] = f"the first of {s} (one rate for both text encoders)"


def _schedule(r: _Reader) -> None:
    r.take("warmup_steps", "ss_lr_warmup_steps", _float, "ss_lr_warmup_steps is missing: no warm-up")
    w = r.kwargs.get("warmup_steps")
    if w is not None and not float(w).is_integer():  # sd-scripts: a value below 1 is a fraction of the steps
        steps = r.kwargs.get("steps", _default("steps"))
        r.kwargs["warmup_steps"] = int(round(w * steps)) if w < 1 else int(w)
        r.assumed["warmup_steps"] = f"{w} of {steps} steps"
    elif w is not None:
        r.kwargs["warmup_steps"] = int(w)
    s = r.raw("ss_lr_scheduler")
    warm = r.kwargs.get("warmup_steps", 0)
    if s is not None and s in ("constant", "constant_with_warmup", "cosine"):
        r.kwargs["lr_scheduler"], r.read["ss_lr_scheduler"] = s, s
        if s == "constant" and warm:
            r.kwargs["warmup_steps"] = 0
            r.assume("warmup_steps", "the constant schedule has no warm-up")
    else:
        fallback = "constant_with_warmup" if warm else "constant"
        r.kwargs["lr_scheduler"] = fallback
        r.assumed["lr_scheduler"] = (f"ss_lr_scheduler = {s!r} is not supported (supported: constant, "
                                     "constant_with_warmup, cosine)" if s else "ss_lr_scheduler is missing")


def _clip_skip(r: _Reader, sdxl: bool) -> None:
    r.take("clip_skip", "ss_clip_skip", _int, "ss_clip_skip is unset: the model's own layer")
    v = r.kwargs.get("clip_skip")
    if sdxl and v not in (None, 2):
        r.assume("clip_skip", f"ss_clip_skip = {v} does not apply to SDXL (sd-scripts ignores it; SDXL always "
                              "uses the penultimate layer)")


def _buckets(r: _Reader) -> None:
    r.take("enable_bucket", "ss_enable_bucket", _bool, "ss_enable_bucket is missing: one square size")
    if not r.kwargs.get("enable_bucket"):
        return
    r.take("bucket_step", "ss_bucket_reso_steps", _int, "ss_bucket_reso_steps is missing: sd-scripts' default")
    resolution = r.kwargs.get("resolution")
    lo, hi = r.raw("ss_min_bucket_reso"), r.raw("ss_max_bucket_reso")
    if resolution and lo and hi:
        ours = side_range(resolution, r.kwargs.get("bucket_step", _default("bucket_step")))
        if (lo, hi) != (str(ours[0]), str(ours[1])):
            r.assumed["enable_bucket"] = f"bucket sides {ours[0]} to {ours[1]} (the file's: {lo} to {hi})"


def _fit_bounds(r: _Reader) -> TrainConfig:
    """Drop each value TrainConfig refuses (noting why) until the kwargs make a valid config."""
    for _ in range(len(fields(TrainConfig)) + 1):
        try:
            return TrainConfig(**r.kwargs)
        except ValueError as exc:
            m = re.match(r"TrainConfig\.(\w+) = ", str(exc))
            if not m or m.group(1) not in r.kwargs:
                raise
            field = m.group(1)
            r.assume(field, f"the file's value is refused ({exc}): the default")
    raise ValueError("the recipe could not be made valid")  # unreachable: every round drops one field


def _weights(r: _Reader, lora: LoraWeights) -> bool:
    """Rank, alpha and target from the weights (checked against ss_network_dim/alpha); True for SDXL."""
    md = r.md
    target, others = _targets(lora, md)
    r.kwargs.update(rank=lora.rank, alpha=float(lora.alpha), target=target)
    r.read["weights"] = f"rank {lora.rank}, alpha {lora.alpha:g}, trains {', '.join(target)}"
    for key, field, value in (("ss_network_dim", "rank", lora.rank), ("ss_network_alpha", "alpha", lora.alpha)):
        s = md.get(key)
        if _unset(s):
            continue
        r.read[key] = s  # type: ignore[assignment]
        try:
            agrees = math.isclose(_float(s), value, rel_tol=1e-6)  # type: ignore[arg-type]
        except ValueError:
            agrees = False
        if not agrees:
            r.assumed[field] = f"from the weights ({key} says {s})"
    if others:
        r.assumed["target"] = f"the file also has {', '.join(others)} modules, which no target trains"
    return bool(lora.text_encoder_2) or "sdxl" in md.get("ss_base_model_version", "").lower()


def read_recipe(lora_path: PathLike) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """The TrainConfig keyword arguments of the LoRA at ``lora_path``, what was read and what was assumed.

    ``assumed`` maps a field to ``"<value used>: <why>"``; every field not read from the file is in it. Raises
    ValueError (one line) when the file is not a LoRA we can read, or when it was trained with Prodigy and
    ``prodigyopt`` is not installed.
    """
    lora = load_lora(lora_path)
    r = _Reader(dict(lora.metadata))
    sdxl = _weights(r, lora)
    r.take("steps", "ss_max_train_steps", _int)
    _learning_rates(r, "text_encoder" in r.kwargs["target"])
    _schedule(r)
    _optimizer(r)
    for field, key in (("min_snr_gamma", "ss_min_snr_gamma"), ("noise_offset", "ss_noise_offset"),
                       ("cond_drop", "ss_caption_dropout_rate"), ("max_grad_norm", "ss_max_grad_norm")):
        r.take(field, key, _float)
    _clip_skip(r, sdxl)
    r.take("resolution", "ss_resolution", _resolution, "ss_resolution is missing: the model's default size")
    if "resolution" in r.kwargs and len(set(re.findall(r"\d+", r.read["ss_resolution"]))) > 1:
        r.assumed["resolution"] = f"the square with the area of {r.read['ss_resolution']}"
    r.take("batch_size", "ss_batch_size_per_device", _int)
    r.take("grad_accum", "ss_gradient_accumulation_steps", _int)
    r.take("random_flip", "ss_flip_aug", _bool)
    r.take("center_crop", "ss_random_crop", lambda s: not _bool(s))
    r.take("seed", "ss_seed", _int)
    _buckets(r)
    r.assumed.update(_NOT_READ)
    config = _fit_bounds(r)
    kwargs = config.to_dict()
    kwargs["target"] = tuple(kwargs["target"])
    for name in kwargs:
        if name not in r.kwargs and name not in r.assumed:
            r.assumed[name] = "not in the file: the default"
    assumed = {name: f"{kwargs[name]!r}: {why}" for name, why in r.assumed.items() if name in kwargs}
    return kwargs, r.read, assumed
