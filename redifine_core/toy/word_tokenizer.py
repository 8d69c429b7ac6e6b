"""A CLIP tokenizer whose vocabulary is a fixed word list: every word is one token (for the toy model and tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _bpe(pieces: list[str], ranks: dict[str, int]) -> list[str]:
    """Byte-pair encoding of one word's pieces: merge the best-ranked adjacent pair until none is in ``ranks``."""
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(ranks.get(f"{a} {b}", len(ranks) + 1), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def write_word_tokenizer(words: Iterable[str], folder: str | Path, max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for a word-level CLIPTokenizer into ``folder``.

    Each word gets the byte-level-BPE token ``word</w>`` and the merges that build it from characters, so
    ``CLIPTokenizer.from_pretrained(folder)`` turns each known word into exactly one id. Unknown words fall back
    to characters (also in the vocabulary), so no caption is ever silently dropped.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w.strip().lower() for w in words if w.strip()})
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        if tok not in vocab:
            vocab[tok] = len(vocab)

    for c in chars:
        add(c)
        add(c + "</w>")
    merges: list[str] = []
    seen = set()
    for w in words:
        # merge left to right: ((c0 c1) c2) ... with the end-of-word marker on the last character
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            m = f"{cur} {nxt}"
            if m not in seen:
                seen.add(m)
                merges.append(m)
            cur = cur + nxt
            add(cur)
    # A merge one word needs can be pre-empted by a higher-ranked merge of another word ("p l" of "plain" splits
    # "purple"): replay BPE on every word and append the merges that finish it, until each word is one token.
    ranks = {m: i for i, m in enumerate(merges)}
    changed = True
    while changed:
        changed = False
        for w in words:
            pieces = _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)
            while len(pieces) > 1:
                m = f"{pieces[0]} {pieces[1]}"
                ranks[m] = len(merges)
                merges.append(m)
                add(pieces[0] + pieces[1])
                pieces = _bpe(pieces, ranks)
                changed = True
    for s in SPECIAL:
        add(s)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": max_length,
                "bos_token": SPECIAL[0],
                "eos_token": SPECIAL[1],
                "unk_token": SPECIAL[1],
                "pad_token": SPECIAL[1],
                "tokenizer_class": "CLIPTokenizer",
                "do_lower_case": True,
            },
            indent=2,
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": SPECIAL[0], "eos_token": SPECIAL[1], "unk_token": SPECIAL[1], "pad_token": SPECIAL[1]})
    )
    return folder
