"""Decoding: EXIF orientation, the pixel limit, 16- and 32-bit integer images, and a clear InputError
for each kind of bad file."""

from __future__ import annotations

import json
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from vitembed.config import PreprocessConfig
from vitembed.decode import DEFAULT_MAX_PIXELS, DecodeOptions, decode_image, open_image
from vitembed.errors import InputError
from vitembed.preprocess import load_pixels

from .conftest import jpeg_bytes, photo, run_cli

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


# The pixel limit --------------------------------------------------------------------------------


PILLOW_DEFAULT_MAX = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS as Pillow ships it


def _claimed_png(path, width: int, height: int):
    """A small PNG whose IHDR claims width x height (CRC fixed): Pillow reads the header, and
    decoding it would fail (its pixel data is for 8x8)."""
    Image.new("L", (8, 8), 9).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


class _Decoding(Exception):
    """Raised in place of decoding pixels: the header was accepted."""


@pytest.fixture
def pillow_default_limit(monkeypatch):
    """Pillow's shipped MAX_IMAGE_PIXELS for the test, whatever earlier tests raised it to; restored after."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_DEFAULT_MAX)


def test_default_limit_is_twice_pillows():
    assert DEFAULT_MAX_PIXELS == 178_956_970 == 2 * PILLOW_DEFAULT_MAX


def test_image_just_above_pillows_limit_decodes_by_default(tmp_path, pillow_default_limit):
    path = tmp_path / "big.png"
    big = Image.new("L", (9500, 9500))  # 90,250,000 pixels, 88 kB on disk
    big.paste(200, (10, 20, 30, 40))
    big.save(path)
    del big
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow's; the CLI filters it
        image = open_image(path)
    assert image.size == (9500, 9500) and image.getpixel((15, 25)) == 200 and image.getpixel((50, 50)) == 0


def test_header_over_the_default_limit_is_refused_before_decoding(tmp_path, monkeypatch, pillow_default_limit):
    path = _claimed_png(tmp_path / "bomb.png", 13500, 13500)  # 182,250,000 pixels claimed
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: (_ for _ in ()).throw(_Decoding()))
    for call in (lambda: open_image(path), lambda: decode_image(path)):
        with pytest.raises(InputError) as info:
            call()
        assert info.value.kind == "too-large"
        # Pillow's own check on the header fires first here (at twice its MAX_IMAGE_PIXELS); the
        # message is vitembed's either way.
        assert info.value.reason == "182250000 pixels exceeds the limit of 178956970 (decompression bomb?)"


def test_a_limit_above_pillows_refusal_works_from_python(tmp_path, monkeypatch, pillow_default_limit):
    path = _claimed_png(tmp_path / "huge.png", 13500, 13500)  # 182 M: Pillow alone refuses above 178,956,970
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: (_ for _ in ()).throw(_Decoding()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(_Decoding):  # the header passed both checks: decoding began
            decode_image(path, DecodeOptions(max_pixels=200_000_000))
        with pytest.raises(InputError) as info:  # and a lower limit still refuses
            decode_image(path, DecodeOptions(max_pixels=182_249_999))
    assert info.value.kind == "too-large"


def test_an_image_side_beyond_the_maximum_is_too_large_before_decoding(tmp_path):
    from PIL import Image

    from vitembed.decode import MAX_SIDE, decode_image
    from vitembed.errors import InputError

    path = tmp_path / "strip.png"
    Image.new("L", (1, MAX_SIDE + 1), 9).save(path)
    with pytest.raises(InputError) as info:
        decode_image(path)
    assert info.value.kind == "too-large" and f"longer than {MAX_SIDE}" in info.value.reason


# 16- and 32-bit integer images ------------------------------------------------------------------


def test_16_bit_scaling_is_exact_at_every_level_and_uses_integers():
    from PIL import Image

    from vitembed.decode import to_rgb

    levels = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    grey = np.asarray(to_rgb(Image.fromarray(levels)))[..., 0]
    assert np.array_equal(grey, np.rint(levels.astype(np.float64) * 255 / 65535).astype(np.uint8))


def _mode_i_tiff(path, values: np.ndarray):
    im = Image.fromarray(values.astype(np.int32))
    assert im.mode == "I"
    im.save(path)
    with Image.open(path) as check:
        assert check.mode == "I"
    return path


@pytest.mark.parametrize("value,low,high", [(252000, 0, 252000), (-5, -5, 1000)])
def test_32_bit_integers_beyond_16_bits_are_refused_not_clipped(tmp_path, value, low, high):
    values = np.full((6, 8), 1000, np.int32)
    values[2, 3] = value
    values[0, 0] = 0 if value > 0 else 1000
    path = _mode_i_tiff(tmp_path / "wide.tif", values)
    with pytest.raises(InputError) as info:
        decode_image(path)
    err = info.value
    assert err.kind == "unsupported" and err.path == str(path)
    assert f"from {low} to {high}" in err.reason and "0..65535" in err.reason and "no agreed display range" in err.reason


def test_32_bit_integers_within_16_bits_still_scale(tmp_path):
    values = np.full((6, 8), 4660, np.int32)
    values[0, 0], values[0, 1] = 65535, 0
    rgb = np.asarray(decode_image(_mode_i_tiff(tmp_path / "ok.tif", values)))
    assert rgb[3, 3].tolist() == [18, 18, 18]  # round(4660 * 255 / 65535)
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 1].tolist() == [0, 0, 0]


# Files that are not what they claim -------------------------------------------------------------


def _garbage_png(path):
    # As a real broken file: the signature, a chunk length of 801 M and a type of non-ASCII bytes.
    rng = np.random.default_rng(13)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x2f\xc5\x7d\x50" + b"\xf4\xa8\x81\xe1" + rng.bytes(64))
    return path


@pytest.mark.parametrize("allow_truncated", [False, True])
def test_png_signature_with_garbage_chunks_is_not_an_image(tmp_path, allow_truncated):
    path = _garbage_png(tmp_path / "broken.png")
    with pytest.raises(InputError) as info:
        decode_image(path, DecodeOptions(allow_truncated=allow_truncated))
    assert info.value.kind == "not-an-image", info.value
    assert "codec" not in info.value.reason and "0xf4" not in info.value.reason
    if allow_truncated:
        assert info.value.reason == "corrupt PNG data (a chunk name is not text): not a valid PNG file"


def test_cli_reports_garbage_png_as_not_an_image(tmp_path, small_ckpt):
    path = _garbage_png(tmp_path / "broken.png")
    r = run_cli("encode", str(path), "--out", str(tmp_path / "o"), "--weights", str(small_ckpt), "--allow-truncated", "--json")
    assert r.returncode == 1, r.stderr.decode()
    [line] = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert line["status"] == "failed" and line["error_kind"] == "not-an-image"
    assert "corrupt PNG data" in line["error"]


def test_eps_without_ghostscript_is_unsupported(tmp_path):
    import shutil

    from vitembed.decode import decode_image
    from vitembed.errors import InputError

    if shutil.which("gs"):
        pytest.skip("Ghostscript is installed: EPS decodes")
    path = tmp_path / "t.eps"
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(InputError) as info:
        decode_image(path)
    assert info.value.kind == "unsupported" and "Ghostscript" in info.value.reason
