"""--fast-decode: JPEGs decoded at a reduced DCT scale that keeps at least twice the resize
target, Pillow's reducing_gap in the resize, recorded in the metadata and compared on resume;
exact decoding stays the default."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file

from vitembed.decode import DecodeOptions, decode_image
from vitembed.preprocess import load_pixels, shorter_side
from vitembed.preprocess_config import PreprocessConfig

from .conftest import photo, run_cli

FAST = DecodeOptions(fast=True)


def _jpeg(path, width, height, exif_orientation=None):
    image = photo(width, height, seed=3)
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    image.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("size, target, decoded", [
    ((1800, 1200), 224, (900, 600)),  # 1200 // 448 = 2: half scale
    ((4032, 3024), 224, (1008, 756)),  # 3024 // 448 = 6: quarter scale (the largest power of two <= 6)
    ((4032, 3024), 384, (2016, 1512)),  # 3024 // 768 = 3: half scale
    ((800, 600), 224, (800, 600)),  # 600 // 448 = 1: full scale
    ((4000, 300), 224, (4000, 300)),  # the shorter side decides: full scale
])
def test_jpeg_is_decoded_at_the_smallest_scale_keeping_twice_the_target(tmp_path, size, target, decoded):
    path = _jpeg(tmp_path / "a.jpg", *size)
    fast = decode_image(path, FAST, min_side=lambda w, h: target)
    assert fast.size == decoded and fast.mode == "RGB"
    assert min(fast.size) >= 2 * target or fast.size == size
    assert decode_image(path, DecodeOptions(), min_side=lambda w, h: target).size == size  # exact: in full


def test_rotated_jpeg_is_reduced_then_turned_upright(tmp_path):
    path = _jpeg(tmp_path / "r.jpg", 1800, 1200, exif_orientation=6)  # stored landscape, shown portrait
    assert decode_image(path, FAST, min_side=lambda w, h: 224).size == (600, 900)
    assert decode_image(path).size == (1200, 1800)


def test_other_formats_decode_in_full_and_resize_close_to_exact(tmp_path):
    cfg = PreprocessConfig(image_size=32, resize="squash", interpolation="bilinear")
    png = tmp_path / "a.png"
    photo(1000, 700, seed=5).save(png)
    assert decode_image(png, FAST, min_side=lambda w, h: 32).size == (1000, 700)
    exact, fast = load_pixels(png, cfg), load_pixels(png, cfg, FAST)
    assert exact.shape == fast.shape == (32, 32, 3) and exact.dtype == fast.dtype == np.uint8
    diff = np.abs(exact.astype(int) - fast.astype(int))
    assert 0 < diff.max() <= 16 and diff.mean() < 2  # the reducing gap moves pixels a little


def test_fast_jpeg_pixels_are_close_to_exact(tmp_path):
    cfg = PreprocessConfig(image_size=224, resize="shortest", resize_size=256, crop=True, interpolation="bicubic")
    path = _jpeg(tmp_path / "a.jpg", 2400, 1800)
    exact, fast = load_pixels(path, cfg), load_pixels(path, cfg, FAST)
    assert exact.shape == fast.shape == (224, 224, 3)
    diff = np.abs(exact.astype(int) - fast.astype(int))
    assert 0 < diff.mean() < 2 and diff.max() <= 40


def test_shorter_side_follows_the_resize():
    assert shorter_side(PreprocessConfig(image_size=224, resize="squash"), 4000, 3000) == 224
    assert shorter_side(PreprocessConfig(image_size=224, resize="shortest", resize_size=256, crop=True), 300, 4000) == 256
    naflex = PreprocessConfig(image_size=256, resize="naflex", patch_size=16, max_num_patches=256)
    assert shorter_side(naflex, 4000, 3000) == 224  # a 14 x 18 grid of 16-pixel patches (252 <= 256)
    assert shorter_side(naflex, 3000, 4000) == 224


def test_cli_records_fast_decode_and_refuses_to_mix_it_on_resume(tmp_path, small_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    _jpeg(src / "big.jpg", 640, 480)
    out = tmp_path / "out"
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--fast-decode")
    assert r.returncode == 0, r.stderr.decode()
    with safe_open(str(out / "big.jpg.safetensors"), "numpy") as f:
        assert f.metadata()["fast_decode"] == "true"
    exact = run_cli("encode", str(src), "--out", str(tmp_path / "exact"), "--weights", str(small_ckpt))
    assert exact.returncode == 0
    with safe_open(str(tmp_path / "exact" / "big.jpg.safetensors"), "numpy") as f:
        assert "fast_decode" not in f.metadata()
    panel = "--fast-decode: JPEGs at reduced DCT scale"  # the start panel says so (new-user pass)
    assert panel in r.stderr.decode() and panel not in exact.stderr.decode()
    a = load_file(out / "big.jpg.safetensors")["embedding"]
    b = load_file(tmp_path / "exact" / "big.jpg.safetensors")["embedding"]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.mean() > 0.99 and not np.array_equal(a, b)
    again = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt))
    assert again.returncode == 2 and "fast_decode: 'true' there, 'false' now" in again.stderr.decode()
    inspect = run_cli("inspect", "--json", str(out / "big.jpg.safetensors"))
    assert b'"fast_decode": true' in inspect.stdout


def test_api_images_in_memory_take_the_reducing_gap(small_ckpt):
    from .helpers import _encoder

    image = photo(900, 700, seed=2)
    exact, fast = _encoder(small_ckpt).pixels(image), _encoder(small_ckpt, fast_decode=True).pixels(image)
    assert exact.shape == fast.shape and not np.array_equal(exact, fast)
    assert np.abs(exact.astype(int) - fast.astype(int)).mean() < 2
