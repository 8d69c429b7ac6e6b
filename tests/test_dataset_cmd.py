"""`redifine dataset`: the conversion to a captioned folder (on local stand-ins) and the offline / missing-extra errors."""

from __future__ import annotations

import io
import sys
import time

import numpy as np
import pytest
from PIL import Image

from redifine_core import cli
from redifine_core.datasets_hf import (
    KNOWN,
    DatasetUnavailable,
    butterfly_caption,
    convert_records,
    load_hf_dataset,
    prepare_dataset,
)


def _img(seed: int, size=(12, 10)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _read_folder(folder):
    stems = sorted(p.stem for p in folder.glob("*.png"))
    assert stems == sorted(p.stem for p in folder.glob("*.txt"))
    return [(np.asarray(Image.open(folder / f"{s}.png")), (folder / f"{s}.txt").read_text().strip()) for s in stems]


def test_convert_records_writes_images_and_same_name_captions(tmp_path):
    ims = [_img(i) for i in range(3)]
    rows = [
        {"image": ims[0], "text": "a  drawing of\na pokemon "},
        {"image": {"bytes": _png_bytes(ims[1]), "path": None}, "text": "a blue bird"},
        {"image": np.asarray(ims[2]), "text": "a green dog"},
    ]
    events = []
    n = convert_records(rows, tmp_path / "out", progress=events.append)
    assert n == 3
    got = _read_folder(tmp_path / "out")
    assert [c for _, c in got] == ["a drawing of a pokemon", "a blue bird", "a green dog"]
    for (arr, _), im in zip(got, ims):
        assert np.array_equal(arr, np.asarray(im))  # lossless
    assert [e.step for e in events] == [1, 2, 3] and all(e.total == 3 for e in events)


def test_convert_records_limit_and_missing_columns(tmp_path):
    rows = [{"img": _img(i), "caption": f"c{i}"} for i in range(5)]
    assert convert_records(rows, tmp_path / "a", image_column="img", caption_column="caption", limit=2) == 2
    assert [c for _, c in _read_folder(tmp_path / "a")] == ["c0", "c1"]
    with pytest.raises(ValueError, match="image_column='image'.*columns: \\['caption', 'img'\\]"):
        convert_records(rows, tmp_path / "b")
    with pytest.raises(ValueError, match="caption_column='text'"):
        convert_records(rows, tmp_path / "c", image_column="img")
    with pytest.raises(ValueError, match="limit"):
        convert_records(rows, tmp_path / "d", image_column="img", caption_column="caption", limit=0)


def test_butterfly_captions_from_metadata():
    row = {"name": "Aholibah  Underwing", "scientific_name": "Catocala aholibah",
           "taxonomy": "Animalia, Arthropoda, Hexapoda, Insecta, Lepidoptera, Noctuidae, Catocalinae"}
    assert butterfly_caption(row) == "a photo of a Aholibah Underwing butterfly, family Noctuidae"
    assert butterfly_caption({"name": None, "scientific_name": "Danaus plexippus", "taxonomy": None}) == (
        "a photo of a Danaus plexippus butterfly")
    assert butterfly_caption({"name": "", "scientific_name": None}) == "a photo of a butterfly"


def test_prepare_uses_the_known_recipes(tmp_path):
    calls = []

    def fake_loader(name, split):
        calls.append((name, split))
        if name == "huggan/smithsonian_butterflies_subset":
            return [{"image": _img(i), "name": f"Monarch {i}", "scientific_name": "x", "taxonomy": "A, Nymphalidae"}
                    for i in range(3)]
        return [{"image": _img(i), "text": f"a pokemon {i}", "other": f"o{i}"} for i in range(3)]

    assert prepare_dataset("huggan/smithsonian_butterflies_subset", tmp_path / "b", loader=fake_loader) == 3
    assert [c for _, c in _read_folder(tmp_path / "b")][0] == "a photo of a Monarch 0 butterfly, family Nymphalidae"
    prepare_dataset("lambdalabs/pokemon-blip-captions", tmp_path / "p", loader=fake_loader, limit=2, split="test")
    assert [c for _, c in _read_folder(tmp_path / "p")] == ["a pokemon 0", "a pokemon 1"]
    prepare_dataset("someone/other", tmp_path / "o", caption_column="other", loader=fake_loader)
    assert [c for _, c in _read_folder(tmp_path / "o")] == ["o0", "o1", "o2"]
    assert calls == [("huggan/smithsonian_butterflies_subset", "train"), ("lambdalabs/pokemon-blip-captions", "test"),
                     ("someone/other", "train")]
    assert set(KNOWN) >= {"lambdalabs/pokemon-blip-captions", "huggan/smithsonian_butterflies_subset"}
    with pytest.raises(ValueError, match="not an empty folder"):
        prepare_dataset("someone/other", tmp_path / "o", loader=fake_loader)


def test_in_memory_hf_dataset_converts(tmp_path):
    datasets = pytest.importorskip("datasets")
    ims = [_img(i, (8, 8)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": ims, "text": ["a", "b", "c"]}).cast_column("image", datasets.Image())
    assert convert_records(ds, tmp_path / "hf") == 3
    got = _read_folder(tmp_path / "hf")
    assert [c for _, c in got] == ["a", "b", "c"]
    assert all(np.array_equal(a, np.asarray(im)) for (a, _), im in zip(got, ims))


def test_offline_fails_at_once(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(DatasetUnavailable, match="HF_HUB_OFFLINE"):
        load_hf_dataset("lambdalabs/pokemon-blip-captions")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(DatasetUnavailable, match="cannot reach huggingface.co"):  # the test guard blocks the network
        load_hf_dataset("lambdalabs/pokemon-blip-captions")
    assert time.perf_counter() - t0 < 5


def test_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DatasetUnavailable, match=r"\[datasets\]"):
        load_hf_dataset("lambdalabs/pokemon-blip-captions")


def test_cli_dataset_offline_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = cli.main(["dataset", "lambdalabs/pokemon-blip-captions", "--out", str(tmp_path / "d"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and "Traceback" not in err
    assert "redifine dataset: error:" in lines[0] and ("HF_HUB_OFFLINE" in lines[0] or "datasets" in lines[0])
