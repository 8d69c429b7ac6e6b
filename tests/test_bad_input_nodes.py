"""Bad widget values and paths in the node pack, one table, without a ComfyUI server.

ComfyUI skips its own min/max check for every input a node's VALIDATE_INPUTS takes, so each such input must be
checked there against redifine_core.bounds (the CLI's table): every case here is refused by VALIDATE_INPUTS with one
line naming the input. Values that arrive through links are None at validation and are checked when the node runs,
before any work or write: the run-time cases below.
"""

from __future__ import annotations

import sys
import types

import pytest
from PIL import Image

from redifine_core import bounds
from helpers import load_pack





PACK = load_pack()
NODES = PACK.NODE_CLASS_MAPPINGS
comfy_mod = sys.modules[PACK.__name__ + ".nodes._comfy"]
native_mod = sys.modules[PACK.__name__ + ".nodes.native"]

OK = {
    "ReDiFineDataset": dict(source="toy", folder="(none)", toy_count=8, toy_seed=0, default_caption="", captions=""),
    "ReDiFineTrainLoRA": dict(lora_name="my_lora", cond_drop=0.1, rank=4, alpha=4.0, learning_rate=1e-4, steps=10,
                              batch_size=2, resolution=0, precision="no", seed=0),
    "ReDiFineGenerate": dict(prompts="a cat", schedule="7.5", steps=20, width=0, height=0, seed=0, lora_scale=1.0),
    "ReDiFineCFGScheduleModel": dict(schedule="redifine", iteration=0),
    "ReDiFinePlotSchedule": dict(schedules="7.5\nredifine", steps=30),
}

BIG = 10**12
CASES = [  # (node, input, value, words the message must contain besides the input's name)
    ("ReDiFineDataset", "toy_count", BIG, "[1, 10000]"),
    ("ReDiFineDataset", "toy_count", 0, "[1, 10000]"),
    ("ReDiFineDataset", "toy_count", -5, "[1, 10000]"),
    ("ReDiFineDataset", "toy_seed", -1, "must be an integer"),
    ("ReDiFineDataset", "toy_seed", 2**70, "must be an integer"),
    ("ReDiFineTrainLoRA", "alpha", 1e30, "(0, 4096]"),
    ("ReDiFineTrainLoRA", "alpha", 0.0, "(0, 4096]"),
    ("ReDiFineTrainLoRA", "alpha", float("nan"), "(0, 4096]"),
    ("ReDiFineTrainLoRA", "rank", BIG, "[1, 1024]"),
    ("ReDiFineTrainLoRA", "rank", 0, "[1, 1024]"),
    ("ReDiFineTrainLoRA", "steps", BIG, "[1, 1000000]"),
    ("ReDiFineTrainLoRA", "batch_size", BIG, "[1, 1024]"),
    ("ReDiFineTrainLoRA", "resolution", BIG, "multiple of 8"),
    ("ReDiFineTrainLoRA", "resolution", 12, "multiple of 8"),
    ("ReDiFineTrainLoRA", "learning_rate", 5.0, "(0, 1]"),
    ("ReDiFineTrainLoRA", "cond_drop", -0.1, "[0, 1]"),
    ("ReDiFineTrainLoRA", "seed", -1, "must be an integer"),
    ("ReDiFineGenerate", "steps", BIG, "[1, 10000]"),
    ("ReDiFineGenerate", "width", BIG, "multiple of 8"),
    ("ReDiFineGenerate", "height", BIG, "multiple of 8"),
    ("ReDiFineGenerate", "width", 100, "multiple of 8"),
    ("ReDiFineGenerate", "seed", -1, "must be an integer"),
    ("ReDiFineGenerate", "lora_scale", 1e9, "[-10, 10]"),
    ("ReDiFineGenerate", "schedule", "1e308", "[0, 100]"),
    ("ReDiFineGenerate", "prompts", "a cat\n" * 10_001, "prompt lines"),
    ("ReDiFineCFGScheduleModel", "iteration", BIG, "[0, 10000]"),
    ("ReDiFineCFGScheduleModel", "iteration", -1, "[0, 10000]"),
    ("ReDiFineCFGScheduleModel", "schedule", "linear(101, 1)", "[0, 100]"),
    ("ReDiFinePlotSchedule", "steps", BIG, "[1, 10000]"),
    ("ReDiFinePlotSchedule", "schedules", "7.5\n1e308", "line 2"),
]


@pytest.mark.parametrize("node, field, value, words", CASES, ids=[f"{n}-{f}-{v!r}"[:60] for n, f, v, _ in CASES])
def test_validate_inputs_refuses_out_of_bounds_values_naming_the_input(node, field, value, words):
    validate = NODES[node].VALIDATE_INPUTS
    assert validate(**OK[node]) is True
    msg = validate(**{**OK[node], field: value})
    assert isinstance(msg, str), msg
    name = "prompt lines" if field == "prompts" else field
    assert "\n" not in msg and msg.startswith(name if field != "schedules" else "schedules line")
    assert words in msg


def test_at_least_20_cases_and_every_bounded_widget_declares_the_bound():
    assert len(CASES) >= 20
    inputs = NODES["ReDiFineTrainLoRA"].INPUT_TYPES()["required"]
    assert inputs["alpha"][1]["max"] == bounds.BOUNDS["alpha"].hi
    assert inputs["rank"][1]["max"] == bounds.BOUNDS["rank"].hi
    assert NODES["ReDiFineDataset"].INPUT_TYPES()["required"]["toy_count"][1]["max"] == bounds.BOUNDS["images"].hi
    assert NODES["ReDiFineGenerate"].INPUT_TYPES()["required"]["steps"][1]["max"] == bounds.BOUNDS["steps"].hi


def test_linked_values_are_checked_when_the_node_runs_before_any_work(tmp_path, monkeypatch):
    """A linked widget is None at validation; the node function refuses the real value before training or writing."""
    monkeypatch.setattr(comfy_mod, "folder_dirs", lambda name: [str(tmp_path)] if name == "loras" else [])
    node = NODES["ReDiFineTrainLoRA"]()
    assert NODES["ReDiFineTrainLoRA"].VALIDATE_INPUTS(**{**OK["ReDiFineTrainLoRA"], "alpha": None}) is True
    args = {k: v for k, v in OK["ReDiFineTrainLoRA"].items()}
    with pytest.raises(ValueError, match=r"^alpha=1e\+30 must be a number in \(0, 4096\]$"):
        node.train(pipeline=None, dataset=None, **{**args, "alpha": 1e30}, gradient_checkpointing=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"^steps=1000000000000 must be"):
        NODES["ReDiFineGenerate"]().generate(pipeline=None, sampler="ddim", negative_prompt="",
                                             **{**OK["ReDiFineGenerate"], "steps": BIG})
    with pytest.raises(ValueError, match=r"^toy_seed=-1 must be"):
        NODES["ReDiFineDataset"]().build(**{**OK["ReDiFineDataset"], "toy_seed": -1})
    with pytest.raises(ValueError, match=r"^iteration=-1 must be"):
        NODES["ReDiFineCFGScheduleModel"]().patch(model=None, schedule="7.5", iteration=-1)
    with pytest.raises(ValueError, match=r"^steps=1000000000000 must be"):
        NODES["ReDiFinePlotSchedule"]().plot(schedules="7.5", steps=BIG)


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_dataset_folder_with_a_non_utf8_caption_is_one_line_naming_the_file(tmp_path, monkeypatch, encoding):
    sub = tmp_path / "set"
    sub.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(sub / f"{i}.png")
    (sub / "0.txt").write_text("fine", encoding="utf-8")
    (sub / "1.txt").write_bytes("café crème".encode(encoding))
    monkeypatch.setattr(comfy_mod, "input_directory", lambda: str(tmp_path))
    args = {**OK["ReDiFineDataset"], "source": "folder", "folder": "set"}
    assert NODES["ReDiFineDataset"].VALIDATE_INPUTS(**args) is True
    with pytest.raises(ValueError) as e:
        NODES["ReDiFineDataset"]().build(**args)
    assert "\n" not in str(e.value) and str(sub / "1.txt") in str(e.value) and "UTF-8" in str(e.value)


def test_dataset_folder_that_is_missing_or_escapes_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(comfy_mod, "input_directory", lambda: str(tmp_path))
    v = NODES["ReDiFineDataset"].VALIDATE_INPUTS
    assert "folder='nothere'" in v(**{**OK["ReDiFineDataset"], "source": "folder", "folder": "nothere"})
    assert "outside" in v(**{**OK["ReDiFineDataset"], "source": "folder", "folder": "../x"})


def test_sd1_tokenizer_dir_with_comfy_as_a_namespace_package(tmp_path, monkeypatch):
    """ComfyUI 0.3.64's ``comfy`` has no __init__.py: __file__ is None, __path__ holds its folder."""
    (tmp_path / "sd1_tokenizer").mkdir()
    fake = types.ModuleType("comfy")
    fake.__file__ = None
    fake.__path__ = [str(tmp_path)]
    monkeypatch.setitem(sys.modules, "comfy", fake)
    assert comfy_mod.sd1_tokenizer_dir() == str((tmp_path / "sd1_tokenizer").resolve())
    (tmp_path / "sd1_tokenizer").rmdir()
    assert comfy_mod.sd1_tokenizer_dir() is None


def test_native_bridge_hands_comfy_the_tokenizer_without_a_folder(tmp_path, monkeypatch):
    """SDTokenizer calls tokenizer_class.from_pretrained(path): we answer with a copy of the pipeline's tokenizer,
    so no redifine_tok_* folder is written anywhere (none can survive a SIGTERM)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tok = {"vocab": ["a", "b"]}
    cls = native_mod._PipelineTokenizer.bound_to(tok)
    got = cls.from_pretrained("redifine-pipeline-tokenizer", extra=1)
    assert got == tok and got is not tok
    assert native_mod._PipelineTokenizer.tokenizer is None  # bound per pipeline, not shared
    assert not hasattr(native_mod, "_tokenizer_dir") and list(tmp_path.iterdir()) == []


def test_load_pipeline_refuses_a_precision_the_device_cannot_run(monkeypatch):
    import torch

    models = pytest.importorskip("redifine_core.models")
    if not hasattr(models, "resolve_dtype"):
        pytest.skip("models.resolve_dtype not available")
    monkeypatch.setattr(comfy_mod, "torch_device", lambda: torch.device("cpu"))
    v = NODES["ReDiFineLoadPipeline"].VALIDATE_INPUTS
    assert v(model="toy (bundled)", precision="fp32") is True
    msg = v(model="toy (bundled)", precision="fp16")
    assert isinstance(msg, str) and msg.startswith("precision: ") and "\n" not in msg


def test_dataset_node_stops_drawing_the_toy_set_on_cancel(monkeypatch):
    """The largest toy set takes seconds: Cancel stops it between two images (as ComfyUI's interrupt)."""
    calls = []

    def interrupted():
        calls.append(1)
        return len(calls) > 3

    monkeypatch.setattr(comfy_mod, "processing_interrupted", interrupted)
    with pytest.raises(comfy_mod.interrupt_exception_type()):
        NODES["ReDiFineDataset"]().build(**{**OK["ReDiFineDataset"], "toy_count": bounds.BOUNDS["images"].hi})
    assert len(calls) == 4


def test_train_refuses_an_unwritable_loras_folder_before_training(tmp_path, monkeypatch):
    from redifine_core import paths

    loras = tmp_path / "loras"
    loras.mkdir()
    monkeypatch.setattr(comfy_mod, "folder_dirs", lambda name: [str(loras)] if name == "loras" else [])
    monkeypatch.setattr(paths, "is_writable_dir", lambda p: False)  # root ignores chmod
    trained = []
    train_mod = sys.modules[PACK.__name__ + ".nodes.train"]
    monkeypatch.setitem(sys.modules, "redifine_core.training", types.SimpleNamespace(
        TrainConfig=lambda **k: trained.append(k), finetune_lora=lambda *a, **k: trained.append(a)))
    with pytest.raises(PermissionError, match="loras folder") as e:
        NODES["ReDiFineTrainLoRA"]().train(pipeline=None, dataset=None, gradient_checkpointing=False,
                                           **OK["ReDiFineTrainLoRA"])
    assert "\n" not in str(e.value) and not trained and list(loras.iterdir()) == []
    assert train_mod.lora_path("my_lora").startswith(str(loras.resolve()))
