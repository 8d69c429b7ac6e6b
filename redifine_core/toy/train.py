"""Train a toy text-to-image model from scratch: ``python -m redifine_core.toy.train [--arch shapes|bed] [--out DIR]``.

``--arch shapes`` (default) trains the shipped 32 px ``toy`` model, ``--arch bed`` the model of the texture and
patterned-shape sets (``registry.TRAINING_SETS``) into ``toy/model_bed``. Seeded; CPU by default, ``--device cuda``
runs the same recipe. Phase 1 trains the VAE, then its decoder alone on the encoder's mean latents; phase 2 trains
the conditional UNet and text encoder on cached latents (epsilon prediction, caption dropout, EMA weights shipped).
Checkpoints (safetensors + JSON, optimizer and RNG state) every ``--checkpoint-every`` steps let a rerun resume; the
finished SD 1.x-layout diffusers folder is written beside ``--out`` and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from redifine_core import atomic, bounds
from redifine_core.models import resolve_device
from redifine_core.toy import model_config as mc
from redifine_core.toy.dataset import DEFAULT_GRAIN, generate
from redifine_core.toy.registry import training_images

DEFAULT_OUT = Path(__file__).resolve().parent / "model"
DEFAULT_OUTS = {"shapes": DEFAULT_OUT, "bed": Path(__file__).resolve().parent / "model_bed"}


MAX_COUNT = 1_000_000
"""Upper bound of every image and step count of the recipe (the shipped one uses at most 20,000)."""


@dataclass(frozen=True)
class ToyTrainConfig:
    seed: int = 0
    n_images: int = 20000
    vae_images: int = 4000
    vae_steps: int = 1200
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    vae_edge: float = 0.25
    decoder_steps: int = 1000
    decoder_lr: float = 3e-4
    decoder_edge: float = 1.0
    steps: int = 2300
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 100
    min_lr_ratio: float = 0.1
    cond_drop: float = 0.15
    ema: float = 0.995
    weight_decay: float = 0.0
    grain: float = DEFAULT_GRAIN
    arch: str = "shapes"
    vae_batch_size: int = 0  # 0: batch_size

    def __post_init__(self) -> None:
        if self.arch not in mc.ARCHITECTURES:
            raise ValueError(f"arch={self.arch!r} is not one of {tuple(mc.ARCHITECTURES)}")
        if not isinstance(self.vae_batch_size, int) or not 0 <= self.vae_batch_size <= MAX_COUNT:
            raise ValueError(f"vae_batch_size={self.vae_batch_size!r} must be an integer in [0, {MAX_COUNT}]")
        for name, lo in (("n_images", 1), ("vae_images", 1), ("batch_size", 1), ("vae_steps", 0),
                         ("decoder_steps", 0), ("steps", 0), ("warmup", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= MAX_COUNT:
                raise ValueError(f"{name}={v!r} must be an integer in [{lo}, {MAX_COUNT}]")
        for name in ("vae_lr", "decoder_lr", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        for name in ("vae_edge", "decoder_edge"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"cond_drop={self.cond_drop!r} must be in [0, 1)")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema={self.ema!r} must be in [0, 1)")
        if not 0.0 < self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} must be in (0, 1]")


RECIPES: dict[str, dict] = {
    "shapes": {},
    "bed": dict(vae_steps=1000, decoder_steps=600, steps=2300),
}
"""Per-architecture overrides of :class:`ToyTrainConfig`'s defaults used by the command line."""


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _lr_factor(step: int, cfg: ToyTrainConfig) -> float:
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    p = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


class _Checkpoint:
    """Safetensors + JSON checkpoint of every tensor the training loop needs to resume bit-for-bit."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.tensors = folder / "state.safetensors"
        self.meta = folder / "state.json"

    def exists(self) -> bool:
        return self.tensors.exists() and self.meta.exists()

    def save(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic.save_safetensors(self.tensors, tensors)
        atomic.write_json(self.meta, meta)

    def load(self) -> tuple[dict, dict[str, torch.Tensor]]:
        from safetensors.torch import load_file

        return json.loads(self.meta.read_text()), load_file(str(self.tensors))


def _optim_state(prefix: str, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{prefix}.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_optim_state(prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def _prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _edge_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 distance between the horizontal and vertical pixel differences of ``rec`` and ``x``.

    MSE alone leaves the VAE's edges soft (a 2x VAE trained on MSE for 300 steps kept a sixth of D0's Laplacian
    variance), and soft edges would leave the chain no detail to lose; matching the differences keeps them hard."""
    return (F.l1_loss(rec[..., 1:, :] - rec[..., :-1, :], x[..., 1:, :] - x[..., :-1, :])
            + F.l1_loss(rec[..., :, 1:] - rec[..., :, :-1], x[..., :, 1:] - x[..., :, :-1]))


def train_vae(cfg: ToyTrainConfig, images: np.ndarray, log=print, device: str = "cpu"):
    """Phase 1: the 2x VAE on reconstruction (MSE + ``vae_edge`` x the edge loss + a tiny KL term)."""
    from tqdm.auto import tqdm

    vae = mc.build_vae(cfg.seed, cfg.arch).to(device)
    vae.train()
    x_all = _to_tensor(images[: cfg.vae_images])
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    bar = tqdm(range(cfg.vae_steps), desc="vae", mininterval=5)
    for step in bar:
        lr = cfg.vae_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.vae_steps))))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(x_all), (cfg.vae_batch_size or cfg.batch_size,), generator=gen)
        x = x_all[idx].to(device)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + cfg.vae_edge * _edge_loss(rec, x) + cfg.vae_kl * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    return vae


def finetune_decoder(cfg: ToyTrainConfig, vae, images: np.ndarray, device: str = "cpu"):
    """Phase 1b: the decoder alone, on the frozen encoder's mean latents (MSE + ``decoder_edge`` x the edge loss).

    Phase 1 decodes posterior samples, and with a near-zero KL weight the posterior stays wide (std about 0.24 against
    a latent spread of 0.87), so the decoder learns to average that noise away and its edges soften: reconstructions
    keep 0.78x of D0's Laplacian variance from samples and from means alike. Decoding the means sharpens them to about
    0.93x, and the UNet's images follow. The encoder, and so the latents phase 2 learns, do not change.
    """
    from tqdm.auto import tqdm

    vae.train()
    trainable = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    x_all = _to_tensor(images[: cfg.vae_images])
    means, _ = encode_all(vae, images[: cfg.vae_images], device=device)
    opt = torch.optim.AdamW(trainable, lr=cfg.decoder_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    bar = tqdm(range(cfg.decoder_steps), desc="decoder", mininterval=5)
    for step in bar:
        idx = torch.randint(0, len(x_all), (cfg.vae_batch_size or cfg.batch_size,), generator=gen)
        x = x_all[idx].to(device)
        rec = vae.decode(means[idx.to(device)]).sample
        loss = F.mse_loss(rec, x) + cfg.decoder_edge * _edge_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    for p in trainable:
        p.requires_grad_(False)
    vae.eval()
    return vae


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 500, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Latent means and stds of every training image (unscaled)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(_to_tensor(images[i : i + batch]).to(device)).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def train(cfg: ToyTrainConfig, out: Path, workdir: Path, minutes: float | None = None, checkpoint_every: int = 250,
          log=print, device: str = "cpu") -> Path:
    """Train the toy model and write the diffusers folder to ``out``; returns ``out``.

    Random numbers are drawn on the CPU whatever ``device`` is, so a GPU run follows the same data order and noise.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    t_start = time.time()
    out, workdir = Path(out), Path(workdir)
    torch.manual_seed(cfg.seed)
    ckpt = _Checkpoint(workdir)
    arch = mc.ARCHITECTURES[cfg.arch]
    if cfg.arch == "shapes":
        images, captions, _ = generate(cfg.n_images, cfg.seed, arch.image_size, cfg.grain)
    else:
        images, captions = training_images(cfg.arch, cfg.n_images, cfg.seed, arch.image_size)
    log(f"[toy] {len(images)} training images, seed {cfg.seed}")

    # Phase 1: VAE (cached in the work folder so a resume does not retrain it)
    vae_file = workdir / "vae.safetensors"
    vae_meta = workdir / "vae.json"
    if vae_file.exists() and vae_meta.exists() and json.loads(vae_meta.read_text()).get("config") == asdict(cfg):
        vae = mc.build_vae(cfg.seed, cfg.arch)
        vae.load_state_dict(load_file(str(vae_file)))
        vae.to(device).eval()
        log("[toy] VAE loaded from the work folder")
    else:
        t0 = time.time()
        vae = finetune_decoder(cfg, train_vae(cfg, images, log, device), images, device)
        workdir.mkdir(parents=True, exist_ok=True)
        atomic.save_safetensors(vae_file, vae.state_dict())
        atomic.write_json(vae_meta, {"config": asdict(cfg), "seconds": time.time() - t0})
        vae_seconds = time.time() - t0
        log(f"[toy] VAE trained in {vae_seconds:.0f} s ({cfg.vae_steps} + {cfg.decoder_steps} decoder steps)")
    for p in vae.parameters():
        p.requires_grad_(False)
    means, stds = encode_all(vae, images, device=device)
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        x = _to_tensor(images[-256:]).to(device)
        rec_err = F.mse_loss(vae.decode(means[-256:]).sample.clamp(-1, 1), x).item()
    log(f"[toy] latent scaling factor {scaling:.4f}; VAE reconstruction MSE {rec_err:.5f} (in [-1, 1] units)")

    # Phase 2: UNet + text encoder
    tok_dir = Path(tempfile.mkdtemp(prefix="redifine_toy_tok_"))
    tokenizer = mc.build_tokenizer(tok_dir, cfg.arch)
    text_encoder = mc.build_text_encoder(tokenizer, cfg.seed).to(device)
    unet = mc.build_unet(cfg.seed, cfg.arch).to(device)
    noise_sched = DDPMScheduler(**{k: v for k, v in mc.SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    ids = tokenizer(captions, padding="max_length", max_length=arch.token_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    empty = tokenizer([""], padding="max_length", max_length=arch.token_length,
                      return_tensors="pt").input_ids[0].to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema_unet = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_te = {k: v.detach().clone() for k, v in text_encoder.state_dict().items()}
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    start, losses, seconds_before = 0, [], 0.0
    if ckpt.exists():
        meta, tensors = ckpt.load()
        if meta.get("config") == asdict(cfg):
            unet.load_state_dict(_unprefixed("unet", tensors))
            text_encoder.load_state_dict(_unprefixed("te", tensors))
            ema_unet = {k: v.to(device) for k, v in _unprefixed("ema_unet", tensors).items()}
            ema_te = {k: v.to(device) for k, v in _unprefixed("ema_te", tensors).items()}
            _load_optim_state("opt", opt, tensors)
            gen.set_state(tensors["rng.gen"])
            torch.set_rng_state(tensors["rng.torch"])
            start, losses, seconds_before = meta["step"], meta["losses"], meta["seconds"]
            log(f"[toy] resumed at step {start}")
        else:
            log("[toy] checkpoint is for another config; starting over")

    unet.train()
    text_encoder.train()
    t_phase = time.time()
    bar = tqdm(range(start, cfg.steps), desc="unet", initial=start, total=cfg.steps, mininterval=5)
    for step in bar:
        if minutes is not None and (time.time() - t_start) / 60 > minutes:
            log(f"[toy] stopping at step {step}: the {minutes}-minute budget is spent")
            break
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, cfg)
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        eps_z = torch.randn(means[idx].shape, generator=gen).to(device)
        noise = torch.randn(eps_z.shape, generator=gen).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cond_drop
        idx_d, t, drop = idx.to(device), t.to(device), drop.to(device)
        z0 = (means[idx_d] + stds[idx_d] * eps_z) * scaling
        zt = noise_sched.add_noise(z0, noise, t)
        tok = ids[idx_d].clone()
        tok[drop] = empty
        cond = text_encoder(tok)[0]
        pred = unet(zt, t, cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, model in ((ema_unet, unet), (ema_te, text_encoder)):
                live = model.state_dict()
                keys = [k for k, v in live.items() if v.dtype.is_floating_point]
                torch._foreach_mul_([ema[k] for k in keys], decay)
                torch._foreach_add_([ema[k] for k in keys], [live[k].detach() for k in keys], alpha=1 - decay)
        losses.append(float(loss.item()))
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.steps:
            tensors = {**_prefixed("unet", unet), **_prefixed("te", text_encoder),
                       **{f"ema_unet.{k}": v for k, v in ema_unet.items()},
                       **{f"ema_te.{k}": v for k, v in ema_te.items()},
                       **_optim_state("opt", opt), "rng.gen": gen.get_state(), "rng.torch": torch.get_rng_state()}
            tensors = {k: v.detach().cpu() for k, v in tensors.items()}
            ckpt.save({"config": asdict(cfg), "step": step + 1, "losses": losses,
                       "seconds": seconds_before + time.time() - t_phase}, tensors)
    train_seconds = seconds_before + time.time() - t_phase
    log(f"[toy] UNet phase: {len(losses)} steps, {train_seconds / 60:.1f} min; final loss {np.mean(losses[-100:]):.4f}")

    # Write the EMA weights as a diffusers folder, atomically
    unet.load_state_dict(ema_unet)
    text_encoder.load_state_dict(ema_te)
    unet, text_encoder, vae = unet.cpu().eval(), text_encoder.cpu().eval(), vae.cpu().eval()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.half(), scheduler=mc.build_scheduler(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        atomic.write_json(tmp / "training.json", {
            "config": asdict(cfg), "steps_done": len(losses), "unet_minutes": round(train_seconds / 60, 2),
            "total_minutes": round((time.time() - t_start) / 60, 2), "threads": torch.get_num_threads(),
            "device": str(device), "seconds_per_unet_step": train_seconds / max(1, len(losses)),
            "vae_reconstruction_mse": rec_err, "latent_scaling_factor": scaling,
            "final_loss": float(np.mean(losses[-100:])) if losses else None,
            "loss_curve": [float(np.mean(losses[i : i + 50])) for i in range(0, len(losses), 50)],
        })
        for path in [tmp, *tmp.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tok_dir, ignore_errors=True)
    log(f"[toy] wrote {out} in {(time.time() - t_start) / 60:.1f} min total")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m redifine_core.toy.train", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="shapes", choices=tuple(mc.ARCHITECTURES),
                    help="shapes: the toy model (default); bed: the texture / patterned-shape model")
    ap.add_argument("--out", type=Path, default=None, help="output diffusers folder (default: the shipped one)")
    ap.add_argument("--workdir", type=Path, default=None, help="checkpoint folder (default: ~/.cache/redifine/toy-train/...)")
    ap.add_argument("--minutes", type=float, default=None, help="stop the UNet phase once this much time is spent")
    ap.add_argument("--steps", type=int, default=None, help="UNet steps (default: the arch's recipe)")
    ap.add_argument("--seed", type=int, default=ToyTrainConfig.seed)
    ap.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default: the arch's recipe)")
    ap.add_argument("--decoder-steps", type=int, default=None, help="decoder steps (default: the arch's recipe)")
    ap.add_argument("--batch-size", type=int, default=None, help="batch size (default: the arch's recipe)")
    ap.add_argument("--n-images", type=int, default=ToyTrainConfig.n_images)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--checkpoint-every", type=int, default=250)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda; the recipe is the same")
    args = ap.parse_args(argv)
    try:  # every argument is checked before anything is trained or written
        if args.minutes is not None and not args.minutes > 0:
            raise ValueError(f"--minutes={args.minutes} must be > 0")
        bounds.check("threads", args.threads, "--threads")
        bounds.check("seed", args.seed, "--seed")
        if args.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every={args.checkpoint_every} must be an integer >= 1")
        device = str(resolve_device(args.device))
        recipe = dict(RECIPES[args.arch], seed=args.seed, arch=args.arch, n_images=args.n_images,
                      vae_images=min(ToyTrainConfig.vae_images, max(args.n_images, 1)))
        for key in ("steps", "vae_steps", "decoder_steps", "batch_size"):
            if getattr(args, key) is not None:
                recipe[key] = getattr(args, key)
        cfg = ToyTrainConfig(**recipe)
    except ValueError as exc:
        ap.error(str(exc))
    torch.set_num_threads(args.threads)
    workdir = args.workdir or (Path.home() / ".cache" / "redifine" / "toy-train"
                               / f"{args.arch}-seed{args.seed}-steps{cfg.steps}")
    train(cfg, args.out or DEFAULT_OUTS[args.arch], workdir, args.minutes, args.checkpoint_every, device=device)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
