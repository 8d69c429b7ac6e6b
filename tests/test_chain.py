"""The Chain of Diffusion: config validation, the run-folder schema, seeds, protocols, cancel and resume.

Most tests drive the loop through a fake backend (fast, exact, independent of the model code); the last ones run
the real tiny SD pipeline end to end.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from redifine_core import chain as ch
from redifine_core.chain import ChainConfig, MethodConfig, config_diff, image_seed, load_run, run_chain
from redifine_core.progress import Cancelled, CancelToken
from redifine_core.training import TrainConfig


# ------------------------------------------------------------------------------------------------ configuration
def test_method_defaults_are_filled_and_recorded():
    r = MethodConfig("rd", kind="redifine")
    assert r.schedule == ch.REDIFINE_SCHEDULE and r.cond_drop == ch.REDIFINE_COND_DROP
    b = MethodConfig("b", kind="baseline", cfg=2)
    assert b.cfg == 2.0 and isinstance(b.cfg, float) and b.cond_drop == 0.0 and b.guidance == 2.0
    c = MethodConfig("c", kind="custom", schedule="linear(7, 2)", cond_drop=0.1)
    assert c.guidance == "linear(7, 2)" and c.cond_drop == 0.1


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(name="a/b", cfg=2.0), "name"),
        (dict(name="reference", cfg=2.0), "name"),
        (dict(name="..", cfg=2.0), "name"),
        (dict(name="x", kind="magic", cfg=2.0), "kind"),
        (dict(name="x"), "cfg"),  # baseline needs cfg
        (dict(name="x", cfg=-1.0), "cfg"),
        (dict(name="x", cfg=float("nan")), "cfg"),
        (dict(name="x", cfg=2.0, schedule="linear(7, 1)"), "schedule"),
        (dict(name="x", cfg=2.0, cond_drop=0.2), "cond_drop"),
        (dict(name="x", kind="redifine", cond_drop=1.0), "cond_drop"),
        (dict(name="x", kind="redifine", cfg=3.0), "cfg"),
        (dict(name="x", kind="custom"), "cfg"),
        (dict(name="x", kind="custom", cfg=2.0, schedule="3"), "schedule"),
        (dict(name="x", kind="custom", schedule="nonsense(1"), "schedule"),
    ],
)
def test_method_config_rejects_bad_values_naming_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        MethodConfig(**kwargs)


def _cfg(**kw):
    base = dict(iterations=2, methods=(MethodConfig("low", cfg=1.5), MethodConfig("rd", kind="redifine")),
                train=TrainConfig(steps=2, batch_size=2, resolution=16), steps=2, seeds=(0,))
    base.update(kw)
    return ChainConfig(**base)


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(iterations=0), "iterations"),
        (dict(methods=()), "methods"),
        (dict(methods=(MethodConfig("a", cfg=1.0), MethodConfig("a", cfg=2.0))), "unique"),
        (dict(protocol="sideways"), "protocol"),
        (dict(seeds=(0, 0)), "seeds"),
        (dict(seeds=(-1,)), "seeds"),
        (dict(images_per_caption=0), "images_per_caption"),
        (dict(width=30), "width"),
        (dict(train=TrainConfig(cond_drop=0.3)), "cond_drop"),
        (dict(train={"steps": 3}), "train"),
        (dict(features="clip"), "features"),
    ],
)
def test_chain_config_rejects_bad_values_naming_the_field(kw, needle):
    with pytest.raises(ValueError, match=needle):
        _cfg(**kw)


def test_chain_config_dict_round_trip_and_json():
    cfg = _cfg(seeds=(3, 1), protocol="continue", width=24, height=16)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON-ready
    assert d["methods"][1]["cond_drop"] == ch.REDIFINE_COND_DROP
    assert ChainConfig.from_dict(d) == cfg
    assert ChainConfig.from_dict(json.loads(json.dumps(d))) == cfg


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d.update(bogus=1), "'bogus'"),
        (lambda d: d["train"].update(stepz=3), "'train.stepz'"),
        (lambda d: d["methods"][0].update(colour="red"), r"'methods\[0\].colour'"),
        (lambda d: d.update(iterations="3"), "iterations"),
        (lambda d: d["methods"][1].update(cond_drop="lots"), r"methods\[1\].cond_drop"),
        (lambda d: d["train"].update(steps=2.5), "train.steps"),
        (lambda d: d.update(seeds=[0, "a"]), r"seeds\[1\]"),
        (lambda d: d.update(protocol="sideways"), "protocol"),
    ],
)
def test_from_dict_names_the_bad_key(mutate, needle):
    d = _cfg().to_dict()
    mutate(d)
    with pytest.raises(ValueError, match=needle):
        ChainConfig.from_dict(d)


def test_config_diff_names_dotted_paths():
    a = _cfg().to_dict()
    b = _cfg(steps=3, methods=(MethodConfig("low", cfg=2.5), MethodConfig("rd", kind="redifine")),
             train=TrainConfig(steps=5, batch_size=2, resolution=16)).to_dict()
    assert config_diff(a, b) == ["methods[0].cfg", "steps", "train.steps"]
    assert config_diff(a, a) == []


def test_image_seed_is_a_pure_function_of_replicate_caption_and_index():
    seeds = {(s, c, k): image_seed(s, c, k) for s in range(3) for c in range(20) for k in range(3)}
    assert len(set(seeds.values())) == len(seeds)  # no collisions in a realistic grid
    assert all(0 <= v < 2**32 for v in seeds.values())
    assert image_seed(1, 2, 0) == image_seed(1, 2, 0)
    assert ch.train_seed(0, 0, 0) != ch.train_seed(0, 0, 1) != ch.train_seed(0, 1, 1)


# ------------------------------------------------------------------------------------------------ fake backend
class FakeSummary:
    """A set summary that keeps only a running pixel sum: the chain must never need the images themselves."""

    def __init__(self, features="auto"):
        self.features = features
        self.total, self.pixels, self.n, self.batches = 0.0, 0, 0, 0

    def add(self, images, cancel=None):
        a = np.asarray(images)
        assert a.dtype == np.uint8 and a.ndim == 4  # 8-bit batches, as written to disk
        self.total += float(a.astype(np.float64).sum()) / 255.0
        self.pixels += a.size
        self.n += a.shape[0]
        self.batches += 1

    def __len__(self):
        return self.n

    def mean(self):
        return self.total / self.pixels

    @classmethod
    def from_pngs(cls, paths, batch_size=16, cancel=None, features="auto"):
        s = cls(features)
        for p in paths:
            s.add(np.asarray(Image.open(p).convert("RGB"))[None])
        return s


class FakeBackend:
    """Deterministic stand-ins for finetune/generate/metrics that record how the chain calls them."""

    def __init__(self, cancel_at_generate: int | None = None, token: CancelToken | None = None):
        self.generate_calls: list[dict] = []
        self.finetune_calls: list[dict] = []
        self.cancel_at_generate = cancel_at_generate
        self.token = token
        self.summaries: list[FakeSummary] = []

    def finetune(self, pipeline, dataset, config, progress=None, cancel=None, init_lora=None):
        px = np.stack([np.asarray(im, dtype=np.float32) for im in dataset.images]) / 255.0
        w = torch.tensor([float(px.mean()), config.seed % 1000 / 1000.0, config.cond_drop])
        if init_lora is not None:
            w = w + init_lora["w"]
        self.finetune_calls.append(dict(n=len(dataset.images), mean=float(px.mean()), seed=config.seed,
                                        cond_drop=config.cond_drop, init=init_lora is not None))
        return SimpleNamespace(lora={"w": w}, losses=[0.5, 0.25], seconds=0.0)

    def save_lora(self, lora, path):
        from redifine_core.atomic import save_safetensors

        save_safetensors(path, lora)

    def load_lora(self, path):
        from safetensors.torch import load_file

        return load_file(str(path))

    def generate(self, pipeline, prompts, schedule, steps=20, seeds=0, *, negative_prompt="", sampler="ddim",
                 width=None, height=None, batch_size=8, lora=None, lora_scale=1.0, iteration=0, progress=None,
                 cancel=None):
        self.generate_calls.append(dict(prompts=list(prompts), seeds=list(seeds), schedule=schedule,
                                        iteration=iteration, size=(width, height)))
        if self.cancel_at_generate is not None and len(self.generate_calls) == self.cancel_at_generate:
            self.token.set()
        out = []
        shift = float(lora["w"][0]) * 0.8 + 0.1 * (1 if isinstance(schedule, str) else 0)
        for s in seeds:
            g = torch.Generator().manual_seed(int(s))
            out.append((torch.rand(height, width, 3, generator=g) * 0.2 + shift).clamp(0, 1))
        return torch.stack(out)

    def set_metrics(self, generated, reference, previous=None, features="auto", progress=None, cancel=None):
        assert all(isinstance(x, FakeSummary) for x in (generated, reference, previous))
        self.summaries.append(generated)
        return {"mean": generated.mean(), "fid_ref": abs(generated.mean() - reference.mean()),
                "fid_prev": abs(generated.mean() - previous.mean()), "features": "fake-v1"}

    def verdict(self, current, baseline):
        drift = current["mean"] - baseline["mean"]
        label = "stable" if abs(drift) < 0.02 else "drifting to blur"
        return SimpleNamespace(label=label, reasons=[f"mean moved {drift:+.4f}"])

    def image_statistics(self, images):
        return {"mean": images.mean()}

    def backend(self) -> ch.ChainBackend:
        return ch.ChainBackend(
            finetune=self.finetune, generate=self.generate, save_lora=self.save_lora, load_lora=self.load_lora,
            set_metrics=self.set_metrics, verdict=self.verdict,
            make_dataset=lambda images, captions: SimpleNamespace(images=list(images), captions=list(captions)),
            image_statistics=self.image_statistics, new_summary=FakeSummary, summary_from_pngs=FakeSummary.from_pngs,
        )


def _dataset(n=3, size=20):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)) for _ in range(n)]
    return SimpleNamespace(images=images, captions=[f"a red circle {i}" for i in range(n)])


PIPE = SimpleNamespace(default_size=16, source="fake", kind="fake")


def _files(run: Path) -> dict[str, bytes]:
    """Every output file except the time-stamped ones, by relative path."""
    skip = {"run.json", "DONE", "train.json"}
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name not in skip}


def test_run_writes_the_schema_and_uses_fixed_seeds(tmp_path):
    fb = FakeBackend()
    cfg = _cfg(iterations=3, seeds=(0, 7), images_per_caption=2)
    events = []
    res = run_chain(PIPE, _dataset(), cfg, tmp_path / "run", progress=events.append, backend=fb.backend(), render=False)
    run = tmp_path / "run"
    assert res.status == "complete"
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["schema_version"] == 1
    assert manifest["config"] == cfg.to_dict() and manifest["seeds"] == [0, 7]
    assert manifest["dataset"]["n"] == 3 and manifest["features"] == "fake-v1"
    assert set(manifest["versions"]) >= {"redifine", "torch", "diffusers", "peft"}
    assert sorted(p.name for p in (run / "reference" / "images").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    with Image.open(run / "reference" / "images" / "0000.png") as im:
        assert im.size == (16, 16)  # D0 as used: resized to the generation size
    for m in ("low", "rd"):
        for s in (0, 7):
            for i in range(3):
                d = run / m / f"seed_{s}" / f"iter_{i:03d}"
                assert (d / "DONE").exists() and (d / "lora.safetensors").exists()
                names = sorted(p.name for p in (d / "images").iterdir())
                assert names == [f"{c:04d}_{k:02d}.png" for c in range(3) for k in range(2)]
                assert json.loads((d / "captions.json").read_text()) == [f"a red circle {c}" for c in range(3) for k in range(2)]
                rec = json.loads((d / "metrics.json").read_text())
                assert (rec["method"], rec["seed"], rec["iteration"], rec["features"]) == (m, s, i, "fake-v1")
                assert set(rec["metrics"]) == {"mean", "fid_ref", "fid_prev", "n_images"}
                assert rec["metrics"]["n_images"] == 6  # 3 captions x 2 images, for the verdict
                assert json.loads((d / "train.json").read_text())["losses"] == [0.5, 0.25]
    # seeds: the same per (replicate, caption, k) in every iteration and method; different between replicates
    by_seed = {}
    for call in fb.generate_calls:
        by_seed.setdefault(tuple(call["seeds"]), []).append(call["iteration"])
    assert len(by_seed) == 2
    assert list(by_seed) == [tuple(image_seed(s, c, k) for c in range(3) for k in range(2)) for s in (0, 7)]
    assert all(sorted(v) == [0, 0, 1, 1, 2, 2] for v in by_seed.values())  # 2 methods x 3 iterations
    # training: D_0 = reference (3 images), later D_i = the 6 generated images; cond_drop per method
    assert [c["n"] for c in fb.finetune_calls[:4]] == [3, 3, 3, 3] and fb.finetune_calls[4]["n"] == 6
    assert {c["cond_drop"] for c in fb.finetune_calls} == {0.0, ch.REDIFINE_COND_DROP}
    assert not any(c["init"] for c in fb.finetune_calls)  # restart protocol
    # verdicts: iteration 0 against itself is stable; labels recorded per method/seed/iteration
    assert set(res.verdicts) == {"low", "rd"} and all(len(v) == 3 for per in res.verdicts.values() for v in per.values())
    assert all(per[s][0] == "stable" for per in res.verdicts.values() for s in per)
    chain_events = [e for e in events if e.phase == "chain"]
    assert chain_events[-1].step == chain_events[-1].total == 12
    assert any("low seed 7 iter 2: training" in e.message for e in chain_events)


def test_training_uses_the_8bit_images_that_were_written(tmp_path):
    fb = FakeBackend()
    run_chain(PIPE, _dataset(), _cfg(iterations=2, methods=(MethodConfig("low", cfg=1.5),)), tmp_path / "r",
              backend=fb.backend(), render=False)
    arrays = [np.asarray(Image.open(p), dtype=np.float32) for p in sorted((tmp_path / "r/low/seed_0/iter_000/images").glob("*.png"))]
    assert fb.finetune_calls[1]["mean"] == pytest.approx(float(np.stack(arrays).mean() / 255.0), abs=1e-6)


def test_continue_protocol_and_chain_axis_iteration(tmp_path):
    fb = FakeBackend()
    cfg = _cfg(iterations=3, protocol="continue",
               methods=(MethodConfig("cyc", kind="custom", schedule="cycle(2, 5)", cond_drop=0.1),))
    run_chain(PIPE, _dataset(), cfg, tmp_path / "r", backend=fb.backend(), render=False)
    assert [c["init"] for c in fb.finetune_calls] == [False, True, True]
    assert [c["iteration"] for c in fb.generate_calls] == [0, 1, 2]
    assert all(c["schedule"] == "cycle(2, 5)" for c in fb.generate_calls)


def test_existing_folder_needs_resume_and_resume_checks_the_config(tmp_path):
    fb = FakeBackend()
    run = tmp_path / "r"
    run_chain(PIPE, _dataset(), _cfg(), run, backend=fb.backend(), render=False)
    with pytest.raises(FileExistsError, match="resume"):
        run_chain(PIPE, _dataset(), _cfg(), run, backend=fb.backend(), render=False)
    other = _cfg(steps=5, methods=(MethodConfig("low", cfg=4.0), MethodConfig("rd", kind="redifine")))
    with pytest.raises(ValueError) as e:
        run_chain(PIPE, _dataset(), other, run, resume=True, backend=fb.backend(), render=False)
    assert "config.methods[0].cfg" in str(e.value) and "config.steps" in str(e.value)
    ds = _dataset()
    ds.captions[1] = "another caption"
    with pytest.raises(ValueError, match=r"dataset.captions\[1\]"):
        run_chain(PIPE, ds, _cfg(), run, resume=True, backend=fb.backend(), render=False)
    n_calls = len(fb.finetune_calls)
    res = run_chain(PIPE, _dataset(), _cfg(), run, resume=True, backend=fb.backend(), render=False)
    assert res.status == "complete" and len(fb.finetune_calls) == n_calls  # everything was DONE: nothing redone


def test_cancel_marks_the_run_and_resume_gives_identical_results(tmp_path):
    cfg = _cfg(iterations=3, seeds=(0, 1), protocol="continue")
    ref = tmp_path / "ref"
    run_chain(PIPE, _dataset(), cfg, ref, backend=FakeBackend().backend(), render=False)

    run = tmp_path / "run"
    token = CancelToken()
    fb = FakeBackend(cancel_at_generate=6, token=token)  # cancelled right after the 6th unit's sampling
    with pytest.raises(Cancelled):
        run_chain(PIPE, _dataset(), cfg, run, cancel=token, backend=fb.backend(), render=False)
    assert json.loads((run / "run.json").read_text())["status"] == "cancelled"
    done = sorted(str(p.parent.relative_to(run)) for p in run.rglob("DONE"))
    assert len(done) == 5
    partial = run / "low" / "seed_1" / "iter_001"
    assert partial.exists() and not (partial / "DONE").exists()
    (partial / ".junk.png.123.tmp").write_bytes(b"stale")  # what a killed writer leaves behind
    fb2 = FakeBackend()
    res = run_chain(PIPE, _dataset(), cfg, run, resume=True, backend=fb2.backend(), render=False)
    assert res.status == "complete" and len(fb2.finetune_calls) == 12 - 5
    assert not list(run.rglob("*.tmp"))
    assert _files(run) == _files(ref)
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["resumed"]) == 1


def test_keyboard_interrupt_and_failure_set_the_status(tmp_path):
    fb = FakeBackend()

    def boom(*a, **k):
        raise KeyboardInterrupt

    b = fb.backend()
    b.generate = boom
    with pytest.raises(KeyboardInterrupt):
        run_chain(PIPE, _dataset(), _cfg(), tmp_path / "k", backend=b, render=False)
    assert json.loads((tmp_path / "k" / "run.json").read_text())["status"] == "cancelled"

    def fail(*a, **k):
        raise RuntimeError("out of memory")

    b.generate = fail
    with pytest.raises(RuntimeError):
        run_chain(PIPE, _dataset(), _cfg(), tmp_path / "f", backend=b, render=False)
    m = json.loads((tmp_path / "f" / "run.json").read_text())
    assert m["status"] == "failed" and "out of memory" in m["error"]


def test_load_run_collects_finished_iterations(tmp_path):
    run = tmp_path / "r"
    run_chain(PIPE, _dataset(), _cfg(seeds=(0, 2)), run, backend=FakeBackend().backend(), render=False)
    (run / "rd" / "seed_2" / "iter_001" / "DONE").unlink()  # as if that unit had not finished
    data = load_run(run)
    assert data["status"] == "complete" and data["reference"]["metrics"]["mean"] > 0
    keys = [(r["method"], r["seed"], r["iteration"]) for r in data["records"]]
    assert keys == [("low", 0, 0), ("low", 0, 1), ("low", 2, 0), ("low", 2, 1), ("rd", 0, 0), ("rd", 0, 1), ("rd", 2, 0)]


def test_bad_inputs_fail_before_writing(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        run_chain(PIPE, _dataset(n=1), _cfg(), tmp_path / "x", backend=FakeBackend().backend(), render=False)
    with pytest.raises(ValueError, match="ChainConfig"):
        run_chain(PIPE, _dataset(), {"iterations": 2}, tmp_path / "x", backend=FakeBackend().backend())
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ real tiny model
def tiny_dataset(n: int = 4, size: int = 32):
    from redifine_core.data import CaptionedImages

    rng = np.random.default_rng(1)
    words = ["red circle", "blue square", "green triangle", "yellow star", "white house", "black cat"]
    imgs = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    return CaptionedImages.from_images(imgs, [f"a {words[i % len(words)]}" for i in range(n)])


def test_real_tiny_chain_end_to_end(tiny_sd, tmp_path):
    """The real modules: continue protocol (init_lora from the saved file), metrics per the schema, loadable files."""
    from redifine_core.lora import load_lora
    from redifine_core.models import Pipeline

    pipe = Pipeline.from_diffusers(tiny_sd)
    cfg = ChainConfig(iterations=2, methods=(MethodConfig("rd", kind="redifine"),), protocol="continue",
                      train=TrainConfig(steps=2, batch_size=2), steps=2, seeds=(0,))
    res = run_chain(pipe, tiny_dataset(), cfg, tmp_path / "run", render=False)
    assert res.status == "complete" and len(res.verdicts["rd"][0]) == 2
    data = load_run(tmp_path / "run")
    assert [(r["method"], r["iteration"]) for r in data["records"]] == [("rd", 0), ("rd", 1)]
    assert data["features"] == data["records"][0]["features"] != "auto"  # the feature set actually used
    loras = []
    for rec in data["records"]:
        assert {"fid_ref", "kid_ref", "fid_prev", "kid_prev", "hf_share"} <= set(rec["metrics"])
        assert all(np.isfinite(v) for v in rec["metrics"].values())
        d = Path(rec["dir"])
        loras.append(load_lora(d / "lora.safetensors"))
        with Image.open(d / "images" / "0000_00.png") as im:
            assert im.size == (32, 32)
    # continue protocol: LoRA_1 started from LoRA_0, so it differs from it but has the same modules
    assert sorted(loras[0].unet) == sorted(loras[1].unet)
    assert any(not torch.equal(loras[0].unet[k], loras[1].unet[k]) for k in loras[0].unet)


def test_a_failing_report_does_not_lose_the_run(tmp_path, monkeypatch, caplog):
    import redifine_core.report as report_mod

    rendered = []

    def broken(run_dir):
        rendered.append(Path(run_dir))
        raise RuntimeError("matplotlib exploded")

    monkeypatch.setattr(report_mod, "render_report", broken, raising=False)
    res = run_chain(PIPE, _dataset(), _cfg(), tmp_path / "r", backend=FakeBackend().backend())
    assert res.status == "complete" and res.report is None and rendered == [tmp_path / "r"]
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "complete"
    assert "matplotlib exploded" in caplog.text
    # and on cancel the report is rendered too (a partial report), then Cancelled propagates
    token = CancelToken()
    with pytest.raises(Cancelled):
        run_chain(PIPE, _dataset(), _cfg(), tmp_path / "c", cancel=token,
                  backend=FakeBackend(cancel_at_generate=1, token=token).backend())
    assert rendered[-1] == tmp_path / "c"


def test_resume_refuses_another_kind_of_model_and_clears_a_failure(tmp_path):
    run = tmp_path / "r"
    b = FakeBackend().backend()
    real_generate = b.generate
    calls = []

    def fail_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real_generate(*a, **k)

    b.generate = fail_second
    with pytest.raises(RuntimeError):
        run_chain(PIPE, _dataset(), _cfg(), run, backend=b, render=False)
    assert len(list(run.rglob("DONE"))) == 1  # one unit finished before the failure
    sdxl = SimpleNamespace(default_size=16, source="fake", kind="sdxl")
    with pytest.raises(ValueError, match="pipeline.kind"):
        run_chain(sdxl, _dataset(), _cfg(), run, resume=True, backend=b, render=False)
    b.generate = real_generate
    assert run_chain(PIPE, _dataset(), _cfg(), run, resume=True, backend=b, render=False).status == "complete"
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "complete" and "error" not in manifest
