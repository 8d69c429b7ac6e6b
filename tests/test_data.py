"""CaptionedImages: kohya folders, ComfyUI IMAGE tensors, conversions to 8-bit RGB, and the errors users hit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from redifine_core.data import IMAGE_EXTENSIONS, CaptionedImages


def _write(folder, name, img, caption=None):
    img.save(folder / name)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")


def test_folder_reads_images_with_same_name_captions(tmp_path):
    _write(tmp_path, "b.png", Image.new("RGB", (8, 6), (10, 20, 30)), "  a blue square\n")
    _write(tmp_path, "a.jpg", Image.new("RGB", (8, 8), (200, 0, 0)), "a red circle")
    _write(tmp_path, "c.webp", Image.new("RGB", (4, 4), (0, 255, 0)), "green")
    _write(tmp_path, "d.BMP", Image.new("RGB", (4, 4), (0, 0, 255)), "blue")
    (tmp_path / "notes.md").write_text("not an image")
    ds = CaptionedImages.from_folder(tmp_path)
    assert len(ds) == 4
    assert ds.names == ("a", "b", "c", "d")
    assert ds.captions == ("a red circle", "a blue square", "green", "blue")
    assert ds.images[1].size == (8, 6)
    assert ds.images[1].getpixel((0, 0)) == (10, 20, 30)
    assert all(im.mode == "RGB" for im in ds.images)


def test_folder_converts_rgba_gray_palette_and_16bit_to_rgb8(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white background
    rgba.putpixel((1, 1), (0, 0, 255, 255))  # opaque blue stays blue
    _write(tmp_path, "rgba.png", rgba, "x")
    _write(tmp_path, "gray.png", Image.new("L", (4, 4), 77), "x")
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    _write(tmp_path, "pal.png", pal, "x")
    arr16 = np.full((4, 4), 65535, dtype=np.uint16)
    arr16[0, 0] = 0
    _write(tmp_path, "deep.png", Image.fromarray(arr16), "x")
    ds = CaptionedImages.from_folder(tmp_path)
    got = dict(zip(ds.names, ds.images))
    assert all(im.mode == "RGB" for im in ds.images)
    assert got["rgba"].getpixel((0, 0)) == (255, 255, 255)
    assert got["rgba"].getpixel((1, 1)) == (0, 0, 255)
    assert got["gray"].getpixel((2, 2)) == (77, 77, 77)
    assert got["pal"].getpixel((0, 0)) == (12, 34, 56)
    assert got["deep"].getpixel((1, 1)) == (255, 255, 255)
    assert got["deep"].getpixel((0, 0)) == (0, 0, 0)


def test_missing_caption_names_the_image_unless_default_given(tmp_path):
    _write(tmp_path, "with.png", Image.new("RGB", (4, 4)), "has one")
    _write(tmp_path, "without.png", Image.new("RGB", (4, 4)))
    with pytest.raises(ValueError, match=r"without\.png.*without\.txt"):
        CaptionedImages.from_folder(tmp_path)
    ds = CaptionedImages.from_folder(tmp_path, default_caption="a photo")
    assert ds.names == ("with", "without")
    assert ds.captions == ("has one", "a photo")


def test_empty_folder_names_folder_and_extensions(tmp_path):
    (tmp_path / "caption.txt").write_text("orphan")
    with pytest.raises(ValueError) as err:
        CaptionedImages.from_folder(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg
    assert all(ext in msg for ext in IMAGE_EXTENSIONS)


def test_missing_folder_and_unreadable_image_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        CaptionedImages.from_folder(tmp_path / "nope")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "broken.txt").write_text("x")
    with pytest.raises(ValueError, match=r"broken\.png"):
        CaptionedImages.from_folder(tmp_path)


def test_from_comfy_image_tensor_round_trips_through_to_tensor():
    g = torch.Generator().manual_seed(0)
    batch = torch.rand(3, 5, 7, 3, generator=g)
    ds = CaptionedImages.from_images(batch, ["a", "b", "c"])
    assert ds.names == ("000000", "000001", "000002")
    assert ds.images[0].size == (7, 5)  # PIL size is (w, h)
    back = ds.to_tensor()
    assert back.shape == (3, 5, 7, 3) and back.dtype == torch.float32
    assert (back - batch).abs().max() <= 0.5 / 255 + 1e-6


def test_from_images_mixed_inputs_and_broadcast_caption():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # transparent -> white
    chw = torch.zeros(3, 4, 4)  # a leading 3 is read as channels (CHW)
    chw[1] = 1.0  # green
    gray = np.full((4, 4), 0.5, dtype=np.float32)
    ds = CaptionedImages.from_images([Image.new("RGB", (4, 4), (1, 2, 3)), rgba, chw, gray], "one caption")
    assert ds.captions == ("one caption",) * 4
    assert ds.images[0].getpixel((0, 0)) == (1, 2, 3)
    assert ds.images[1].getpixel((0, 0)) == (255, 255, 255)
    assert ds.images[2].getpixel((0, 0)) == (0, 255, 0)
    assert ds.images[3].getpixel((0, 0)) == (128, 128, 128)


def test_caption_count_mismatch_names_both_counts():
    with pytest.raises(ValueError, match=r"2 captions for 3 images"):
        CaptionedImages.from_images(torch.rand(3, 4, 4, 3), ["a", "b"])


@pytest.mark.parametrize(
    "images, fragment",
    [
        (torch.rand(0, 4, 4, 3), "empty"),
        ([], "empty"),
        (torch.rand(4, 4, 3), r"\[N, H, W, C\]"),
        ([torch.full((4, 4, 3), 2.0)], r"\[0, 1\]"),
        ([np.zeros((5, 5, 5))], "shape"),
        (["not an image"], "PIL image"),
    ],
)
def test_from_images_rejects_bad_inputs(images, fragment):
    with pytest.raises(ValueError, match=fragment):
        CaptionedImages.from_images(images, "x")


def test_to_tensor_needs_one_size():
    ds = CaptionedImages.from_images([Image.new("RGB", (4, 4)), Image.new("RGB", (8, 4))], "x")
    with pytest.raises(ValueError, match="one size"):
        ds.to_tensor()


@pytest.mark.parametrize("encoding,text", [("latin-1", "café au lait"), ("utf-16", "a photo"), (None, b"\xff\xfe\x00\x9f")])
def test_caption_that_is_not_utf8_names_the_file_in_one_line(tmp_path, encoding, text):
    _write(tmp_path, "a.png", Image.new("RGB", (8, 8)), "fine")
    _write(tmp_path, "b.png", Image.new("RGB", (8, 8)))
    data = text if encoding is None else text.encode(encoding)
    (tmp_path / "b.txt").write_bytes(data)
    with pytest.raises(ValueError) as exc:
        CaptionedImages.from_folder(tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and str(tmp_path / "b.txt") in msg and "not UTF-8 text" in msg


def test_utf8_with_bom_is_read_and_limit_reads_only_the_first_images(tmp_path):
    for i in range(3):
        _write(tmp_path, f"{i}.png", Image.new("RGB", (8, 8)))
        (tmp_path / f"{i}.txt").write_bytes("\ufeffcafé {}".format(i).encode("utf-8"))
    (tmp_path / "2.png").write_bytes(b"not a png")  # past the limit: never decoded
    ds = CaptionedImages.from_folder(tmp_path, limit=2)
    assert ds.captions == ("café 0", "café 1") and ds.names == ("0", "1")
    with pytest.raises(ValueError, match="cannot read image"):
        CaptionedImages.from_folder(tmp_path)


def test_from_folder_stops_between_images_when_cancelled(tmp_path):
    from redifine_core.progress import Cancelled

    for i in range(3):
        _write(tmp_path, f"{i}.png", Image.new("RGB", (8, 8)), "c")

    class AfterOne:
        calls = 0

        def is_set(self):
            self.calls += 1
            return self.calls > 1

    flag = AfterOne()
    with pytest.raises(Cancelled):
        CaptionedImages.from_folder(tmp_path, cancel=flag)
    assert flag.calls == 2
