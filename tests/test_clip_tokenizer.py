"""The bundled CLIP vocabulary: single-file checkpoints tokenize offline with no tokenizer folder and no ComfyUI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from transformers import CLIPTextConfig

from redifine_core import clip_tokenizer as ct


@pytest.fixture(autouse=True)
def no_outside_tokenizers(monkeypatch, tmp_path):
    monkeypatch.delenv("REDIFINE_TOKENIZER_DIR", raising=False)
    monkeypatch.setenv("COMFYUI_ROOT", str(tmp_path / "no_comfyui"))
    monkeypatch.setattr(ct.importlib.util, "find_spec", lambda name: None)  # no installed ComfyUI either


def test_vocabulary_from_the_merges_has_clips_ids():
    vocab = ct.vocab_from_merges(ct.BUNDLED_BPE / "merges.txt")
    assert len(vocab) == ct.CLIP_VOCAB_SIZE
    assert (vocab["!"], vocab["!</w>"], vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (0, 256, 49406, 49407)


def test_vocabulary_equals_comfyuis_copy_where_comfyui_is_installed():
    root = Path(os.environ.get("REDIFINE_COMFYUI_FOR_VOCAB", Path.home() / "ComfyUI"))
    theirs = root / "comfy" / "sd1_tokenizer" / "vocab.json"
    if not theirs.is_file():
        pytest.skip(f"no ComfyUI vocabulary at {theirs} to compare with")
    assert ct.vocab_from_merges(ct.BUNDLED_BPE / "merges.txt") == json.loads(theirs.read_text(encoding="utf-8"))


@pytest.mark.parametrize("kind, name", [("sd1", "tokenizer"), ("sdxl", "tokenizer_2")])
def test_a_clip_sized_text_encoder_gets_the_bundled_tokenizer_with_clips_token_ids(kind, name, tmp_path):
    from redifine_core.single_file import CONFIG_ROOT

    cfg_dir = CONFIG_ROOT / kind
    config = CLIPTextConfig.from_json_file(cfg_dir / name.replace("tokenizer", "text_encoder") / "config.json")
    tok = ct.load_clip_tokenizer(name, config, cfg_dir, None, tmp_path / "model.safetensors")
    ids = tok("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's own ids for this prompt
    assert tok.model_max_length == 77


def test_a_small_text_encoder_is_not_given_the_bundled_vocabulary(tmp_path):
    config = CLIPTextConfig(vocab_size=1000, max_position_embeddings=77)
    places = ct.tokenizer_sources("tokenizer", tmp_path / "cfg", None, config.vocab_size)
    assert ct.BUNDLED_BPE not in places
    with pytest.raises(FileNotFoundError, match="vocabulary was not found"):
        ct.load_clip_tokenizer("tokenizer", config, tmp_path / "cfg", None, tmp_path / "m.safetensors")
