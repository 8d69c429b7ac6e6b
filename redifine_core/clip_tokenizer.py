"""The CLIP tokenizer of a single-file checkpoint: where its BPE files are found, and the vocabulary bundled with the
package, so SD1.x/SD2.x/SDXL files load offline with no tokenizer folder and no ComfyUI.

Only the merges are shipped (``configs/clip_bpe/merges.txt``, OpenAI's, MIT); the token-to-id table follows from them
by CLIP's own rule: the 256 byte symbols, the same with ``</w>``, one token per merge in order, then
``<|startoftext|>`` and ``<|endoftext|>`` (49408 ids in all). A folder the user names, ``$REDIFINE_TOKENIZER_DIR`` or
a ComfyUI checkout come first; the bundled vocabulary serves a text encoder of CLIP's size when none has the files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

PathLike = Union[str, os.PathLike]

BUNDLED_BPE = Path(__file__).resolve().parent / "configs" / "clip_bpe"
CLIP_VOCAB_SIZE = 49408


def bytes_to_unicode() -> list[str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table, in CLIP's id order.

    Kept here rather than imported: transformers has moved this helper between modules across versions."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def vocab_from_merges(merges: Path) -> dict[str, int]:
    """The token -> id table of CLIP's tokenizer built from its ``merges.txt``."""
    lines = merges.read_text(encoding="utf-8").splitlines()
    pairs = [ln.split() for ln in lines if ln and not ln.startswith("#version")]
    symbols = bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(p) for p in pairs]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def write_bundled(folder: Path) -> Path:
    """Write the bundled vocabulary (``vocab.json`` + ``merges.txt``) into ``folder``; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUNDLED_BPE / "merges.txt", folder / "merges.txt")
    (folder / "vocab.json").write_text(json.dumps(vocab_from_merges(BUNDLED_BPE / "merges.txt")), encoding="utf-8")
    return folder


def tokenizer_sources(name: str, cfg_dir: Path, tokenizer_dir: Optional[PathLike], vocab_size: int = 0) -> list[Path]:
    """Every folder that may hold the CLIP BPE files, in the order they are tried; the bundled vocabulary last, for
    a text encoder of CLIP's vocabulary size."""
    places: list[Path] = []
    if tokenizer_dir is not None:
        base = Path(tokenizer_dir).expanduser()
        places += [base / name, base / "tokenizer", base]
    places.append(cfg_dir / name)
    env = os.environ.get("REDIFINE_TOKENIZER_DIR")
    if env:
        places += [Path(env) / name, Path(env)]
    comfy_root = Path(os.environ.get("COMFYUI_ROOT", "~/ComfyUI")).expanduser()
    places.append(comfy_root / "comfy" / "sd1_tokenizer")
    try:  # the installed ComfyUI's own copy, located without importing ComfyUI
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        places += [Path(p) / "sd1_tokenizer" for p in spec.submodule_search_locations]
    if vocab_size == CLIP_VOCAB_SIZE:
        places.append(BUNDLED_BPE)
    seen: list[Path] = []
    for p in places:
        if p not in seen:
            seen.append(p)
    return seen


def _has_tokenizer_files(folder: Path) -> bool:
    if folder == BUNDLED_BPE:
        return (folder / "merges.txt").is_file()
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )


def load_clip_tokenizer(name: str, config: Any, cfg_dir: Path, tokenizer_dir: Optional[PathLike], path: Path) -> Any:
    """A CLIPTokenizer for the text encoder ``name`` of the checkpoint at ``path``, from the first folder with BPE
    files (``tokenizer_sources``), with ``cfg_dir``'s special tokens and the encoder's position count as max length.

    ``config`` is the text encoder's ``CLIPTextConfig`` (its position count and vocabulary size are checked).
    """
    from transformers import CLIPTokenizer

    places = tokenizer_sources(name, cfg_dir, tokenizer_dir, int(config.vocab_size))
    found = next((p for p in places if _has_tokenizer_files(p)), None)
    if found is None:
        raise FileNotFoundError(
            f"{path}: the {name} vocabulary was not found: need vocab.json and merges.txt (or tokenizer.json) in one "
            f"of: {', '.join(str(p) for p in places)}. Pass tokenizer_dir= a folder with those files, for example "
            "ComfyUI's comfy/sd1_tokenizer or the tokenizer/ folder of a diffusers Stable Diffusion model"
        )
    max_length = int(config.max_position_embeddings)
    tok_config: dict[str, Any] = {}
    for candidate in (cfg_dir / name / "tokenizer_config.json", found / "tokenizer_config.json"):
        if candidate.is_file():
            tok_config = json.loads(candidate.read_text())
            break
    tok_config.update(tokenizer_class="CLIPTokenizer", model_max_length=max_length)
    tok_config.setdefault("pad_token", "<|endoftext|>")
    with tempfile.TemporaryDirectory(prefix="redifine_tok_") as tmp:
        if found == BUNDLED_BPE:
            write_bundled(Path(tmp))
        for fname in ("vocab.json", "merges.txt", "tokenizer.json"):
            if (found / fname).is_file():
                shutil.copyfile(found / fname, Path(tmp) / fname)
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(tok_config))
        try:
            tokenizer = CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
        except Exception as exc:
            raise ValueError(f"{found}: could not build a CLIP tokenizer from its files ({exc})") from exc
    _check_tokenizer(tokenizer, int(config.vocab_size), found)
    return tokenizer


def _check_tokenizer(tokenizer: Any, vocab: int, folder: Path) -> None:
    """Refuse a tokenizer that cannot drive this text encoder (wrong vocabulary size, no special tokens)."""
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    if len(tokenizer) > vocab or max(ids) >= vocab or tokenizer.bos_token_id is None or ids[0] != tokenizer.bos_token_id:
        raise ValueError(
            f"{folder}: the tokenizer (size {len(tokenizer)}) does not match the text encoder (vocabulary {vocab}); "
            "expected the CLIP BPE vocabulary of this model"
        )
