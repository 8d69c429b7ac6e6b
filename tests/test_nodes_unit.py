"""Node-layer unit tests that run without ComfyUI: node shapes, validation messages, schedule patch math, names."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_pack

REPO = Path(__file__).resolve().parents[1]




PACK = load_pack()
MAPPINGS = PACK.NODE_CLASS_MAPPINGS
common = sys.modules[PACK.__name__ + ".nodes.common"]
cfg_schedule = sys.modules[PACK.__name__ + ".nodes.cfg_schedule"]
chain_mod = sys.modules[PACK.__name__ + ".nodes.chain"]
train_mod = sys.modules[PACK.__name__ + ".nodes.train"]
native_mod = sys.modules[PACK.__name__ + ".nodes.native"]
comfy_mod = sys.modules[PACK.__name__ + ".nodes._comfy"]
gpu_mod = sys.modules[PACK.__name__ + ".nodes.gpu"]
pipeline_mod = sys.modules[PACK.__name__ + ".nodes.pipeline"]
metrics_mod = sys.modules[PACK.__name__ + ".nodes.metrics"]

# The public contract: saved workflows store node ids and widget values by input order.
INPUT_ORDER = {
    "ReDiFineLoadPipeline": ["model", "precision", "keep_loaded"],
    "ReDiFineDataset": ["source", "folder", "toy_count", "toy_seed", "default_caption", "captions", "images"],
    "ReDiFineTrainLoRA": ["pipeline", "dataset", "lora_name", "cond_drop", "rank", "alpha", "learning_rate", "steps",
                          "batch_size", "resolution", "seed", "precision", "gradient_checkpointing", "keep_loaded"],
    "ReDiFineGenerate": ["pipeline", "prompts", "schedule", "steps", "sampler", "seed", "width", "height",
                         "negative_prompt", "lora_scale", "lora", "keep_loaded"],
    "ReDiFineCFGScheduleModel": ["model", "schedule", "iteration"],
    "ReDiFinePlotSchedule": ["schedules", "steps"],
    "ReDiFineChain": ["pipeline", "dataset", "run_name", "iterations", "methods", "steps", "sampler",
                      "images_per_caption", "seed", "replicates", "train_steps", "rank", "learning_rate", "batch_size",
                      "resolution", "protocol", "resume", "keep_loaded"],
    "ReDiFineCheck": ["lora", "images", "model", "cfg", "rounds"],
    "ReDiFineCollapseMetrics": ["reference", "generated", "features"],
    "ReDiFinePipelineToNative": ["pipeline"],
    "ReDiFinePipelineFromNative": ["model", "clip", "vae", "fallback"],
}


def test_root_package_exports_every_node_with_display_name():
    assert set(MAPPINGS) == set(INPUT_ORDER)
    assert set(PACK.NODE_DISPLAY_NAME_MAPPINGS) == set(MAPPINGS)
    assert all(k.startswith("ReDiFine") for k in MAPPINGS)
    # ComfyUI's own top-level "nodes" module must never be shadowed by ours
    assert "nodes" not in sys.modules or not str(getattr(sys.modules["nodes"], "__file__", "")).startswith(str(REPO))


@pytest.mark.parametrize("node_id", sorted(INPUT_ORDER))
def test_node_shape_tooltips_and_order(node_id):
    cls = MAPPINGS[node_id]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    order = list(spec["required"]) + list(spec.get("optional", {}))
    assert order == INPUT_ORDER[node_id]
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, name
            opts = entry[1] if len(entry) > 1 else {}
            assert opts.get("tooltip", "").strip(), f"{node_id}.{name} has no tooltip"
            if isinstance(entry[0], list):
                assert entry[0], f"{node_id}.{name}: empty combo"
                if "default" in opts:
                    assert opts["default"] in entry[0]
    assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
    assert all(t.strip() for t in cls.OUTPUT_TOOLTIPS)
    assert len(cls.DESCRIPTION) > 40
    assert cls.CATEGORY.startswith("ReDiFine")
    fn = getattr(cls, cls.FUNCTION)
    params = list(inspect.signature(fn).parameters)[1:]
    for name in INPUT_ORDER[node_id]:
        assert name in params, f"{node_id}.{cls.FUNCTION} does not take {name}"
    v = getattr(cls, "VALIDATE_INPUTS", None)
    if v is not None:  # ComfyUI passes only declared inputs by name
        assert set(inspect.signature(v).parameters) <= set(order)


def test_train_validation_messages():
    v = MAPPINGS["ReDiFineTrainLoRA"].VALIDATE_INPUTS
    ok = dict(lora_name="my_lora", cond_drop=0.1, rank=4, alpha=4.0, learning_rate=1e-4, steps=10, batch_size=2,
              resolution=0, precision="no")
    assert v(**ok) is True
    assert "'..'" in v(**{**ok, "lora_name": "..evil"})
    assert "path separators" in v(**{**ok, "lora_name": "../../etc/x"})
    assert "path separators" in v(**{**ok, "lora_name": "sub\\x"})
    assert "non-empty" in v(**{**ok, "lora_name": "  "})
    msg = v(**{**ok, "cond_drop": 1.5})
    assert "cond_drop=1.5" in msg and "in [0, 1]" in msg
    assert "multiple of 8" in v(**{**ok, "resolution": 30})
    assert "precision" in v(**{**ok, "precision": "fp8"})
    # a linked widget arrives as None at validation time and must not be rejected
    assert v(**{**ok, "lora_name": None, "cond_drop": None}) is True


def test_schedule_validation_in_generate_patch_and_plot():
    gen = MAPPINGS["ReDiFineGenerate"].VALIDATE_INPUTS
    assert gen(prompts="a cat", schedule="redifine", steps=10, width=0, height=0) is True
    msg = gen(prompts="a cat", schedule="exp(7.5, 1", steps=10, width=0, height=0)
    assert msg is not True and msg.startswith("schedule='exp(7.5, 1'")
    assert "prompts is empty" in gen(prompts=" \n ", schedule="7", steps=10, width=0, height=0)
    assert "steps=0" in gen(prompts="a", schedule="7", steps=0, width=0, height=0)
    patch = MAPPINGS["ReDiFineCFGScheduleModel"].VALIDATE_INPUTS
    assert patch(schedule="linear(7.5, 1)", iteration=0) is True
    assert "nosuchpreset" in patch(schedule="nosuchpreset", iteration=0)
    plot = MAPPINGS["ReDiFinePlotSchedule"].VALIDATE_INPUTS
    assert plot(schedules="7.5\nredifine", steps=10) is True
    assert "line 2" in plot(schedules="7.5\nlinear(7.5,", steps=10)


class _FakeGuider:
    def __init__(self, cfg):
        self.cfg = cfg


class _FakeExecutor:
    """Stands in for ComfyUI's WrapperExecutor: records the guider's cfg at each model call."""

    def __init__(self, guider):
        self.class_obj = guider
        self.seen = []

    def __call__(self, x, timestep, model_options, seed):
        self.seen.append(self.class_obj.cfg)
        return x


def test_step_index_handles_intermediate_sigmas_and_ends():
    sigmas = [14.6, 7.0, 3.0, 1.0, 0.0]  # 4 steps
    assert [cfg_schedule.step_index(s, sigmas) for s in sigmas[:-1]] == [0, 1, 2, 3]
    assert cfg_schedule.step_index(5.0, sigmas) == 1  # a second-order evaluation between steps 1 and 2
    assert cfg_schedule.step_index(7.0 * (1 - 1e-6), sigmas) == 1  # float noise around a step's own sigma
    assert cfg_schedule.step_index(0.0, sigmas) == 3  # never past the last step
    assert cfg_schedule.step_index(20.0, sigmas) == 0
    assert cfg_schedule.step_progress(3.0, sigmas) == pytest.approx(2 / 3)
    assert cfg_schedule.step_progress(3.0, [3.0, 0.0]) == 0.0


def test_wrapper_sets_cfg_per_step_from_schedule_and_restores_it():
    from redifine_core.guidance import parse_schedule

    sched = parse_schedule("linear(9, 1)")
    sigmas = torch.tensor([10.0, 6.0, 3.0, 1.0, 0.5, 0.0])  # 5 steps, as in transformer_options["sample_sigmas"]
    wrapper = cfg_schedule.make_wrapper(lambda p: sched.scale(p, 0))
    guider = _FakeGuider(4.0)
    ex = _FakeExecutor(guider)
    opts = {"transformer_options": {"sample_sigmas": sigmas}}
    for s in sigmas[:-1]:
        wrapper(ex, torch.zeros(1), torch.tensor([float(s)]), opts, 0)
        assert guider.cfg == 4.0  # restored after every call
    assert ex.seen == pytest.approx(sched.values(5))
    assert ex.seen[0] == pytest.approx(9.0) and ex.seen[-1] == pytest.approx(1.0)
    # denoise < 1: ComfyUI passes only the tail of the sigmas, and the schedule spans that run
    ex2 = _FakeExecutor(guider)
    tail = {"transformer_options": {"sample_sigmas": sigmas[2:]}}
    for s in sigmas[2:-1]:
        wrapper(ex2, torch.zeros(1), torch.tensor([float(s)]), tail, 0)
    assert ex2.seen == pytest.approx(sched.values(3))


def test_wrapper_restores_cfg_when_the_model_call_fails():
    wrapper = cfg_schedule.make_wrapper(lambda p: 1.0)
    guider = _FakeGuider(7.0)

    class Boom(_FakeExecutor):
        def __call__(self, *a):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        wrapper(Boom(guider), torch.zeros(1), torch.tensor([1.0]), {"transformer_options": {}}, 0)
    assert guider.cfg == 7.0


def test_patch_clones_and_replaces_its_own_wrapper(monkeypatch):
    class WrappersMP:
        PREDICT_NOISE = "predict_noise"

    class FakePE:
        pass

    FakePE.WrappersMP = WrappersMP

    class FakeModel:
        def __init__(self, wrappers=None):
            self.wrappers = wrappers or {}

        def clone(self):
            return FakeModel({k: {kk: list(vv) for kk, vv in v.items()} for k, v in self.wrappers.items()})

        def remove_wrappers_with_key(self, t, key):
            self.wrappers.get(t, {}).pop(key, None)

        def add_wrapper_with_key(self, t, key, fn):
            self.wrappers.setdefault(t, {}).setdefault(key, []).append(fn)

    monkeypatch.setattr(comfy_mod, "patcher_extension", lambda: FakePE)
    node = MAPPINGS["ReDiFineCFGScheduleModel"]()
    base = FakeModel()
    (m1,) = node.patch(base, "3", 0)
    (m2,) = node.patch(m1, "5", 0)
    assert base.wrappers == {}
    assert len(m1.wrappers["predict_noise"][cfg_schedule.WRAPPER_KEY]) == 1
    (w,) = m2.wrappers["predict_noise"][cfg_schedule.WRAPPER_KEY]
    ex = _FakeExecutor(_FakeGuider(1.0))
    w(ex, torch.zeros(1), torch.tensor([1.0]), {"transformer_options": {"sample_sigmas": torch.tensor([1.0, 0.0])}}, 0)
    assert ex.seen == [5.0]


def test_names_and_paths_cannot_escape(tmp_path):
    assert common.safe_name(" my lora_v1.2 ") == "my lora_v1.2"
    for bad in ("../x", "a/b", "..", "", "x" * 101, ".hidden", "a\\b"):
        with pytest.raises(ValueError):
            common.safe_name(bad)
    root = tmp_path / "root"
    root.mkdir()
    assert common.path_inside(str(root), "a.safetensors") == str(root.resolve() / "a.safetensors")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(ValueError, match="outside"):
        common.path_inside(str(root), "link", "x.safetensors")
    with pytest.raises(ValueError):
        common.path_inside(str(root), "..", "x")


def test_lora_path_lands_in_the_loras_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(comfy_mod, "loras_directory", lambda: str(tmp_path))
    assert train_mod.lora_path("toy") == str(tmp_path.resolve() / "toy.safetensors")
    assert train_mod.lora_path("toy.safetensors") == str(tmp_path.resolve() / "toy.safetensors")
    with pytest.raises(ValueError):
        train_mod.lora_path("../toy")


def test_method_lines():
    p = chain_mod.parse_method_line
    assert p("baseline 7.5") == {"kind": "baseline", "cfg": 7.5, "name": "baseline-w7.5"}
    assert p("low: baseline cfg=1.5") == {"kind": "baseline", "cfg": 1.5, "name": "low"}
    assert p("redifine") == {"kind": "redifine", "name": "redifine"}
    assert p("rd2: redifine cond_drop=0.2 schedule=keys(0:7, 1:1)") == {
        "kind": "redifine", "cond_drop": 0.2, "schedule": "keys(0:7, 1:1)", "name": "rd2"}
    c = p("custom schedule=interval(7.5, 0.2, 0.8) cond_drop=0", 2)
    assert c == {"kind": "custom", "schedule": "interval(7.5, 0.2, 0.8)", "cond_drop": 0.0, "name": "custom3"}
    for bad, why in (("baseline", "needs its CFG"), ("custom cond_drop=0.1", "needs schedule"),
                     ("redifine cond_drop=2", "between 0 and 1"), ("warp 3", "start with one of"),
                     ("baseline 7 cond_drop=0.1", "without condition drop"), ("custom schedule=lin(", "schedule")):
        with pytest.raises(ValueError, match=why):
            p(bad)
    with pytest.raises(ValueError, match="twice"):
        chain_mod.parse_methods("baseline 7\nbaseline 7")
    v = MAPPINGS["ReDiFineChain"].VALIDATE_INPUTS
    assert v(run_name="ok", methods="baseline 2\nredifine", iterations=2, protocol="restart") is True
    assert "path separators" in v(run_name="a/b", methods="redifine", iterations=2, protocol="restart")
    assert "method line 1" in v(run_name="ok", methods="nonsense", iterations=2, protocol="restart")


def test_cancelled_core_becomes_an_interrupt_and_other_errors_pass():
    from redifine_core.progress import Cancelled

    interrupt = comfy_mod.interrupt_exception_type()
    with pytest.raises(interrupt):
        with common.comfy_cancellation():
            raise Cancelled("stop")
    with pytest.raises(KeyError):
        with common.comfy_cancellation():
            raise KeyError("other")
    assert common.ComfyCancel().is_set() is False  # no ComfyUI: never interrupted


def test_any_type_matches_every_socket_type():
    assert not (common.ANY != "MODEL") and not (common.ANY != ["a.safetensors"])
    assert str(common.ANY) == "*"


def test_ldm_unet_config_for_the_toy_layout():
    from redifine_core.toy.model_config import UNET_CONFIG

    cfg = native_mod.ldm_unet_config(dict(UNET_CONFIG))
    # down: DownBlock2D, CrossAttn, CrossAttn with one resnet each; up mirrors it with two+one resnets per level
    assert cfg["transformer_depth"] == [0, 1, 1]
    assert sorted(cfg["transformer_depth_output"]) == [0, 0, 1, 1, 1, 1]
    assert cfg["transformer_depth_output"][:2] == [0, 0]  # ComfyUI pops from the end: shallowest level first
    assert cfg["model_channels"] == UNET_CONFIG["block_out_channels"][0]
    assert cfg["channel_mult"] == [c // cfg["model_channels"] for c in UNET_CONFIG["block_out_channels"]]
    assert cfg["context_dim"] == UNET_CONFIG["cross_attention_dim"]
    with pytest.raises(ValueError, match="SD1.x-layout"):
        native_mod.ldm_unet_config({**UNET_CONFIG, "use_linear_projection": True})


def test_metrics_table_lists_both_sets():
    t = metrics_mod.metrics_table({"saturation": 0.2, "features": "x"}, {"saturation": 0.3, "features": "hand"})
    assert "saturation" in t and "+50%" in t and "hand" in t


def test_plot_schedule_node_returns_an_image_batch():
    (img,) = MAPPINGS["ReDiFinePlotSchedule"]().plot("7.5\nredifine", 10)
    assert img.ndim == 4 and img.shape[0] == 1 and img.shape[-1] == 3
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0


def test_generate_node_runs_the_core_on_a_tiny_pipeline(tiny_sd):
    from redifine_core.models import Pipeline

    pipe = Pipeline.from_diffusers(tiny_sd)
    node = MAPPINGS["ReDiFineGenerate"]()
    (images,) = node.generate(pipe, "a red circle on a blue background\n\na blue square on a red background", "1",
                              2, "ddim", 3, 0, 0, "", 1.0)
    assert images.shape[0] == 2 and images.shape[-1] == 3 and images.dtype == torch.float32
    (again,) = node.generate(pipe, "a blue square on a red background", "1", 2, "ddim", 4, 0, 0, "", 1.0)
    assert torch.allclose(again[0], images[1], atol=1e-4)  # image i uses seed + i (batching changes only rounding)


def test_dataset_node_builds_from_an_image_batch():
    node = MAPPINGS["ReDiFineDataset"]()
    imgs = torch.rand(3, 16, 16, 3)
    ds, batch, n = node.build("images", "(none)", 1, 0, "", "one caption\n", images=imgs)
    assert n == 3 and list(ds.captions) == ["one caption"] * 3
    assert batch.shape == (3, 16, 16, 3) and torch.allclose(batch, imgs, atol=1 / 255)
    with pytest.raises(ValueError, match="2 lines for 3 images"):
        node.build("images", "(none)", 1, 0, "", "a\nb", images=imgs)


def test_chain_progress_is_one_steady_bar_with_a_preview(tmp_path, monkeypatch):
    from PIL import Image

    from redifine_core.progress import ProgressEvent

    calls = []

    class Bar:
        def update_absolute(self, value, total, preview=None):
            calls.append((value, total, preview))

    monkeypatch.setattr(comfy_mod, "progress_bar", lambda total, node_id=None: Bar())
    img_dir = tmp_path / "m" / "seed_0" / "iter_000" / "images"
    img_dir.mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(img_dir / "0000_00.png")
    prog = chain_mod.ChainProgress("7", str(tmp_path))
    ctx = {"unit": 0, "method": "m", "seed": 0, "iteration": 0}
    prog(ProgressEvent("chain", 0, 2, message="m: training", extra=dict(ctx, stage="training")))
    for s in (1, 2):
        prog(ProgressEvent("train", s, 2, extra=dict(ctx)))
    for s in (1, 2):
        prog(ProgressEvent("sample", s, 2, extra=dict(ctx)))
    prog(ProgressEvent("chain", 0, 2, message="m: metrics", extra=dict(ctx, stage="metrics")))
    prog(ProgressEvent("metrics", 1, 1, extra=dict(ctx)))
    prog(ProgressEvent("chain", 1, 2, message="m: stable", extra=dict(ctx, stage="verdict")))
    values = [v for v, _, _ in calls]
    assert all(t == chain_mod.ChainProgress.RESOLUTION for _, t, _ in calls)
    assert values[2] == 300 and values[4] == 475 and values[-1] == 500  # train 60%, sample 35% of unit 1 of 2
    assert values == sorted(values)
    previews = [p for _, _, p in calls if p is not None]
    assert len(previews) == 1 and previews[0][0] == "JPEG" and previews[0][1].getpixel((0, 0)) == (255, 0, 0)


def test_train_cache_key_is_stable_until_the_file_is_deleted_or_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(comfy_mod, "loras_directory", lambda: str(tmp_path))
    monkeypatch.setattr(train_mod, "_WRITTEN", {})
    changed = MAPPINGS["ReDiFineTrainLoRA"].IS_CHANGED
    before = changed(lora_name="k")
    path = train_mod.lora_path("k")
    state = train_mod.file_state(path)
    Path(path).write_bytes(b"x")  # what a training run writes
    train_mod._WRITTEN[path] = (os.stat(path).st_mtime_ns, state)
    assert changed(lora_name="k") == before  # the next queue reuses the cached training
    os.remove(path)
    deleted = changed(lora_name="k")
    assert deleted != before  # deleted: train again
    Path(path).write_bytes(b"y")
    os.utime(path, ns=(1, 1))
    assert changed(lora_name="k") not in (before, deleted)  # replaced by someone else: train again
    assert changed(lora_name="../k") == "invalid"


def test_dataset_node_reads_an_input_subfolder_and_refuses_escapes(tmp_path, monkeypatch):
    from PIL import Image

    dataset_mod = sys.modules[PACK.__name__ + ".nodes.dataset"]
    monkeypatch.setattr(comfy_mod, "input_directory", lambda: str(tmp_path))
    d = tmp_path / "cats"
    d.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (16, 16), colour).save(d / f"c{i}.png")
        (d / f"c{i}.txt").write_text(f"cat number {i}")
    assert dataset_mod.input_subfolders() == ["cats"]
    spec = MAPPINGS["ReDiFineDataset"].INPUT_TYPES()["required"]["folder"][0]
    assert "cats" in spec
    v = MAPPINGS["ReDiFineDataset"].VALIDATE_INPUTS
    assert v("folder", "cats", 1, 0, "", "") is True
    assert "needs a folder" in v("folder", "(none)", 1, 0, "", "")
    assert "outside" in v("folder", "../../etc", 1, 0, "", "")
    ds, batch, n = MAPPINGS["ReDiFineDataset"]().build("folder", "cats", 1, 0, "", "")
    assert n == 2 and sorted(ds.captions) == ["cat number 0", "cat number 1"]
    assert batch.shape == (2, 16, 16, 3)


# --- sharing the GPU with ComfyUI (nodes/gpu.py); ComfyUI's functions are replaced by recorders ---


class _FakeComfyMemory:
    """Stands in for _comfy's memory functions: a compute device, an offload device, and a call log."""

    def __init__(self, monkeypatch, device="cpu", offload="cpu"):
        self.calls = []
        monkeypatch.setattr(comfy_mod, "torch_device", lambda: torch.device(device))
        monkeypatch.setattr(comfy_mod, "offload_device", lambda: torch.device(offload))
        monkeypatch.setattr(comfy_mod, "minimum_inference_memory", lambda: 1000)
        monkeypatch.setattr(comfy_mod, "free_memory",
                            lambda n, dev, evict=(): self.calls.append(("free", n, str(dev), tuple(evict))))
        monkeypatch.setattr(comfy_mod, "empty_cache", lambda: self.calls.append(("empty",)))


class _RecordingPipeline:
    def __init__(self, log):
        self.log = log
        self.lin = torch.nn.Linear(10, 10)  # 110 float32 = 440 bytes

    def modules(self):
        return [self.lin]

    def to(self, device=None, dtype=None):
        self.log.append(("to", str(device)))
        return self


def test_heavy_work_frees_comfy_memory_first_and_parks_after(monkeypatch):
    fake = _FakeComfyMemory(monkeypatch, device="cpu", offload="cpu")
    pipe = _RecordingPipeline(fake.calls)
    assert gpu_mod.weight_bytes(pipe) == 440
    with gpu_mod.on_device(pipe):
        fake.calls.append(("work",))
    assert fake.calls == [("free", 1440, "cpu", ()), ("to", "cpu"), ("work",), ("to", "cpu"), ("empty",)]
    fake.calls.clear()
    with gpu_mod.on_device(pipe, keep_loaded=True, reserve_bytes=60):
        pass
    assert fake.calls == [("free", 500, "cpu", ()), ("to", "cpu")]  # kept on the device: no park, no cache flush
    fake.calls.clear()
    with pytest.raises(RuntimeError, match="out of memory"):
        with gpu_mod.on_device(pipe):
            raise RuntimeError("out of memory")
    assert fake.calls[-2:] == [("to", "cpu"), ("empty",)]  # parked even when the work failed


def test_outside_comfyui_nothing_moves(monkeypatch):
    monkeypatch.setattr(comfy_mod, "torch_device", lambda: None)
    log = []
    with gpu_mod.on_device(_RecordingPipeline(log)):
        pass
    assert log == []


def test_train_and_generate_nodes_run_inside_on_device(monkeypatch, tiny_sd):
    from redifine_core.models import Pipeline

    fake = _FakeComfyMemory(monkeypatch)
    pipe = Pipeline.from_diffusers(tiny_sd)
    seen = []
    real = gpu_mod.on_device

    def spy(pipeline, keep_loaded=False, reserve_bytes=None):
        seen.append((pipeline is pipe, keep_loaded))
        return real(pipeline, keep_loaded, reserve_bytes)

    monkeypatch.setattr(sys.modules[PACK.__name__ + ".nodes.generate"], "on_device", spy)
    MAPPINGS["ReDiFineGenerate"]().generate(pipe, "a red circle", "1", 1, "ddim", 0, 0, 0, "", 1.0, keep_loaded=True)
    assert seen == [(True, True)] and fake.calls[0][0] == "free" and fake.calls[0][1] >= gpu_mod.weight_bytes(pipe)
    assert inspect.signature(MAPPINGS["ReDiFineTrainLoRA"].train).parameters["keep_loaded"].default is False
    assert "on_device(pipeline, bool(keep_loaded))" in inspect.getsource(MAPPINGS["ReDiFineTrainLoRA"].train)


def test_free_memory_evicts_only_the_models_a_shared_pipeline_borrows_from(monkeypatch):
    import types

    calls = []
    shared_module, other_module = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    loaded = [types.SimpleNamespace(model=types.SimpleNamespace(model=m)) for m in (shared_module, other_module)]
    mm = types.SimpleNamespace(current_loaded_models=loaded,
                               free_memory=lambda n, dev, keep_loaded=(): calls.append((n, dev, list(keep_loaded))))
    comfy = types.ModuleType("comfy")
    comfy.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    comfy_mod.free_memory(123, "cuda", evict=(shared_module,))
    assert calls == [(1e30, "cuda", [loaded[1]]), (123, "cuda", [])]  # the borrowed-from model goes, the other stays
    calls.clear()
    comfy_mod.free_memory(5, "cuda")
    assert calls == [(5, "cuda", [])]


def test_parking_a_shared_pipeline_points_it_back_at_the_shared_memory(monkeypatch):
    _FakeComfyMemory(monkeypatch)
    pipe = _RecordingPipeline([])
    shared = pipe.lin.weight.data
    gpu_mod.mark_shared(pipe, (torch.nn.Linear(1, 1),))
    assert len(gpu_mod.shared_with(pipe)) == 1
    pipe.lin.weight.data = shared.clone()  # what a round trip to the GPU and back leaves: a private copy
    gpu_mod.park(pipe)
    assert pipe.lin.weight.data_ptr() == shared.data_ptr()  # the copy is dropped, the shared memory used again
    assert pipe.log == []  # moved module by module (no Pipeline.to, which could cast)


def test_load_node_keeps_one_pipeline_and_releases_the_old_on_a_changed_choice(monkeypatch, tmp_path):
    import redifine_core.models as models

    fake = _FakeComfyMemory(monkeypatch)
    loaded = []

    def fake_load(source, device=None, dtype=None, tokenizer_dir=None):
        loaded.append(_RecordingPipeline(fake.calls))
        return loaded[-1]

    monkeypatch.setattr(models, "load_pipeline", fake_load)
    monkeypatch.setattr(pipeline_mod, "resolve_source", lambda choice: (str(tmp_path / choice), None))
    node = MAPPINGS["ReDiFineLoadPipeline"]()
    (a,) = node.load("a", "fp32")
    assert node.load("a", "fp32")[0] is a and len(loaded) == 1  # cached
    assert ("to", "cpu") in a.log  # parked on the offload device after loading
    a.log.clear()
    (b,) = node.load("b", "fp32")
    assert b is not a and node._cache[1] is b  # only the pipeline asked for is held
    assert a.log and a.log[0] == ("to", "cpu")  # the old one was parked before the new one loaded
    (c,) = node.load("b", "fp32", keep_loaded=True)
    assert c is b


def test_from_native_refuses_patched_models_clearly_or_loads_the_fallback(monkeypatch):
    import types

    node_cls = MAPPINGS["ReDiFinePipelineFromNative"]
    model = types.SimpleNamespace(patches={"diffusion_model.x": [1]}, model=torch.nn.Linear(1, 1))
    clip = types.SimpleNamespace(patcher=types.SimpleNamespace(patches={}, model=torch.nn.Linear(1, 1)))
    vae = types.SimpleNamespace(patcher=types.SimpleNamespace(model=torch.nn.Linear(1, 1)))
    node = node_cls()
    with pytest.raises(ValueError, match="cannot share the loader's weights: the MODEL has weight patches") as e:
        node.build(model, clip, vae, native_mod.NO_FALLBACK)
    assert "\n" not in str(e.value) and "fallback" in str(e.value)
    monkeypatch.setattr(node._loader, "load", lambda choice, precision: ("loaded:" + choice,))
    pipe, how = node.build(model, clip, vae, "checkpoints/sd15.safetensors")
    assert pipe == "loaded:checkpoints/sd15.safetensors"
    assert how.startswith("loaded checkpoints/sd15.safetensors from the file (not shared: the MODEL has weight patches")


def test_to_native_refuses_sdxl_and_v_prediction_and_names_the_stock_route():
    import types

    sdxl = types.SimpleNamespace(text_encoder_2=object())
    with pytest.raises(ValueError, match="SDXL pipelines are not supported by this node; load the checkpoint with "
                                         "CheckpointLoaderSimple"):
        MAPPINGS["ReDiFinePipelineToNative"]().convert(sdxl)
    for config, field in (({"prediction_type": "v_prediction"}, "prediction_type='v_prediction'"),
                          ({"beta_schedule": "linear"}, "beta_schedule='linear'")):
        pipe = types.SimpleNamespace(text_encoder_2=None, scheduler=types.SimpleNamespace(config=config))
        with pytest.raises(ValueError, match=f"{field}: only .* load the checkpoint with CheckpointLoaderSimple"):
            MAPPINGS["ReDiFinePipelineToNative"]().convert(pipe)
    ok = types.SimpleNamespace(text_encoder_2=None, scheduler=types.SimpleNamespace(config={}))
    native_mod.check_convertible(ok)  # an SD1.x epsilon model passes


def test_public_vae_construction_only_for_the_layout_comfyui_builds(tiny_sd):
    from redifine_core.single_file import CONFIG_ROOT, read_json

    sd15 = read_json(CONFIG_ROOT / "sd1" / "vae" / "config.json")
    assert native_mod.public_vae_possible(sd15)
    assert native_mod.public_vae_possible(read_json(CONFIG_ROOT / "sdxl" / "vae" / "config.json"))
    assert not native_mod.public_vae_possible({**sd15, "norm_num_groups": 8})
    assert not native_mod.public_vae_possible(tiny_sd.vae.config)  # tiny/toy layouts keep the wrapper


def test_native_state_is_the_loaders_tensors_in_original_layout_and_unsafe_cases_are_named():
    import types

    class Clip(torch.nn.Module):
        def __init__(self, extra=False):
            super().__init__()
            self.clip_l = torch.nn.Module()
            self.clip_l.transformer = torch.nn.Linear(2, 2)
            self.clip_l.logit_scale = torch.nn.Parameter(torch.ones(()))
            if extra:
                self.clip_g = torch.nn.Linear(2, 2)

    def objects(model_type="EPS", lowvram=False, extra=False):
        base = torch.nn.Module()
        base.diffusion_model = torch.nn.Linear(3, 3)
        base.model_type = types.SimpleNamespace(name=model_type)
        base.model_lowvram = lowvram
        clip_module = Clip(extra)
        model = types.SimpleNamespace(model=base, patches={})
        clip = types.SimpleNamespace(cond_stage_model=clip_module,
                                     patcher=types.SimpleNamespace(patches={}, model=clip_module))
        vae_module = torch.nn.Conv2d(1, 1, 1)
        vae = types.SimpleNamespace(first_stage_model=vae_module, patcher=types.SimpleNamespace(model=vae_module))
        return model, clip, vae

    model, clip, vae = objects()
    tensors, prediction = comfy_mod.native_sd1_tensors(model, clip, vae)
    assert prediction == "epsilon"
    assert sorted(tensors) == ["cond_stage_model.transformer.bias", "cond_stage_model.transformer.weight",
                               "first_stage_model.bias", "first_stage_model.weight",
                               "model.diffusion_model.bias", "model.diffusion_model.weight"]
    assert tensors["model.diffusion_model.weight"].data_ptr() == model.model.diffusion_model.weight.data_ptr()
    assert comfy_mod.native_sd1_tensors(*objects("V_PREDICTION"))[1] == "v_prediction"
    for kwargs, message in (({"model_type": "FLOW"}, "the MODEL's type is FLOW"),
                            ({"lowvram": True}, "partially loaded"),
                            ({"extra": True}, r"the CLIP holds \['clip_g'\] besides clip_l")):
        with pytest.raises(ValueError, match=message):
            comfy_mod.native_sd1_tensors(*objects(**kwargs))


def test_collapse_metrics_node_reads_the_image_count():
    """The node passes the set size to the verdict: 4 images read 'inconclusive' with the reason, 16 do not."""
    node = MAPPINGS["ReDiFineCollapseMetrics"]()
    g = torch.Generator().manual_seed(0)
    for n, inconclusive in ((4, True), (16, False)):
        ref = torch.rand(n, 32, 32, 3, generator=g)
        table, text = node.measure(ref, ref.clone(), "handcrafted")["result"]
        assert text.startswith("inconclusive") is inconclusive, text
        assert ("only 4 images per set" in text) is inconclusive
        assert "hf_share" in table
