"""Decoding: EXIF orientation, and a clear InputError for each kind of bad file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vitembed.config import PreprocessConfig
from vitembed.decode import decode_image, open_image
from vitembed.errors import InputError
from vitembed.preprocess import load_pixels

from .conftest import jpeg_bytes, photo

# Orientation tag -> the transpose that displays the stored pixels upright (EXIF 2.32, tag 0x0112).
DISPLAY = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
INVERSE = {Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270}


def save_oriented(upright: Image.Image, orientation: int, path) -> None:
    """Store ``upright`` so that a viewer applying ``orientation`` shows it upright."""
    method = DISPLAY[orientation]
    stored = upright if method is None else upright.transpose(INVERSE.get(method, method))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif.tobytes())


def oriented_folder(folder, upright: Image.Image, ext: str = "png") -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for o in DISPLAY:
        path = folder / f"o{o}.{ext}"
        save_oriented(upright, o, path)
        paths.append(path)
    return paths


def test_orientations_1_to_8_decode_to_the_same_pixels(tmp_path):
    upright = photo(60, 40, seed=7)  # not square: 5..8 swap width and height in the file
    paths = oriented_folder(tmp_path, upright)
    with Image.open(paths[5]) as stored:
        assert stored.size == (40, 60)
    for path in paths:
        got = decode_image(path)
        assert got.size == (60, 40), path
        assert np.array_equal(np.asarray(got), np.asarray(upright)), path
    cfg = PreprocessConfig()
    first = load_pixels(paths[0], cfg)
    for path in paths[1:]:
        assert np.array_equal(load_pixels(path, cfg), first), path


def test_invalid_orientation_value_is_ignored(tmp_path):
    upright = photo(30, 20)
    for value in (0, 9):
        path = tmp_path / f"bad{value}.png"
        exif = Image.Exif()
        exif[0x0112] = value
        upright.save(path, exif=exif.tobytes())
        assert np.array_equal(np.asarray(decode_image(path)), np.asarray(upright))


def _kind(path) -> InputError:
    with pytest.raises(InputError) as info:
        decode_image(path)
    assert info.value.path == str(path)
    return info.value


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert _kind(path).kind == "empty"


def test_text_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    err = _kind(path)
    assert err.kind == "not-an-image" and "cannot identify" in err.reason


def test_truncated_jpeg(tmp_path):
    data = jpeg_bytes(photo(200, 150))
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    err = _kind(path)
    assert err.kind == "truncated", err


def test_missing_file_and_directory(tmp_path):
    assert _kind(tmp_path / "nope.jpg").kind == "not-found"
    assert _kind(tmp_path).kind == "unreadable"


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(path)
    with pytest.raises(InputError) as info:
        open_image(path, max_pixels=300 * 299)
    assert info.value.kind == "too-large" and "300x300" in info.value.reason
    assert open_image(path, max_pixels=300 * 300).size == (300, 300)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=10, loop=0)
    assert np.asarray(decode_image(path))[4, 4].tolist() == [255, 0, 0]


def test_heif_decodes_with_pillow_heif_and_is_named_without_it(tmp_path, monkeypatch):
    import vitembed.decode as decode

    path = tmp_path / "photo.heic"
    y, x = np.mgrid[0:48, 0:64]
    upright = Image.fromarray(np.stack([x * 4, y * 5, 255 - x * 2], -1).astype(np.uint8), "RGB")  # smooth
    upright.save(path, "HEIF", quality=95)
    got = decode_image(path)
    assert got.mode == "RGB" and got.size == (64, 48)
    assert np.abs(np.asarray(got, np.int16) - np.asarray(upright, np.int16)).mean() < 3

    fake = tmp_path / "not-really.jpg"  # a HEIF header Pillow cannot identify, named .jpg
    fake.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    monkeypatch.setattr(decode, "HEIF_SUPPORT", False)
    err = _kind(fake)
    assert err.kind == "unsupported" and "HEIF/HEIC" in err.reason and "pip install pillow-heif" in err.reason
