"""Hostile images: shapes, values and headers that used to exhaust memory, clip silently or give
unclear errors. Every image here is made by the test."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import vitembed.preprocess as preprocess
from vitembed.catalog import get_model_spec
from vitembed.config import MAX_RESIZE, PreprocessConfig
from vitembed.decode import DEFAULT_MAX_PIXELS, DecodeOptions, decode_image, open_image
from vitembed.errors import CheckpointError, InputError, UsageError
from vitembed.preprocess import load_pixels, resize

from .conftest import photo, run_cli

PILLOW_DEFAULT_MAX = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS as Pillow ships it


# --- 3. thin images on shortest-edge models ------------------------------------------------------


def _both_paths(image: Image.Image, cfg: PreprocessConfig, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    """(full resize then crop, crop box only) for the same image and preprocessing."""
    calls = []
    box_only = preprocess._resize_box

    def counted(*args, **kwargs):
        calls.append(args[1])
        return box_only(*args, **kwargs)

    monkeypatch.setattr(preprocess, "_resize_box", counted)
    monkeypatch.setattr(preprocess, "MAX_INTERMEDIATE_RATIO", float("inf"))
    full = resize(image, cfg)
    assert calls == []
    monkeypatch.setattr(preprocess, "MAX_INTERMEDIATE_RATIO", 0)
    box = resize(image, cfg)
    assert calls == [cfg.image_size]
    return full, box


@pytest.mark.parametrize("model", ["dino-vits16", "vit_base_patch16_224.augreg_in21k", "clip-vit-base-patch16"])
@pytest.mark.parametrize("rounding", ["floor", "round"])
@pytest.mark.parametrize("size", [(3, 900), (900, 3), (300, 5000), (375, 500)])
def test_crop_box_path_equals_full_resize_within_rounding(monkeypatch, model, rounding, size):
    cfg = get_model_spec(model).preprocess.replace(crop_rounding=rounding)
    full, box = _both_paths(photo(*size, seed=size[0]), cfg, monkeypatch)
    assert full.shape == box.shape == (224, 224, 3) and full.dtype == box.dtype == np.uint8
    diff = np.abs(full.astype(np.int16) - box.astype(np.int16))
    assert diff.max() <= 2, diff.max()
    assert diff.mean() < 0.05, diff.mean()


def test_thin_images_take_the_box_path_and_ordinary_ones_the_reference_path(monkeypatch):
    cfg = get_model_spec("dino-vits16").preprocess
    calls = []
    box_only = preprocess._resize_box
    monkeypatch.setattr(preprocess, "_resize_box", lambda *a, **k: calls.append(a[0].size) or box_only(*a, **k))
    resize(photo(500, 375), cfg)  # 341x256 resized: the exact path
    resize(photo(12, 500), cfg)  # 256x10666 resized, 54 times the 224x224 crop: the box
    assert calls == [(12, 500)]


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from PIL import Image
    from vitembed.catalog import get_model_spec
    from vitembed.preprocess import load_pixels

    if sys.platform.startswith("linux"):  # a regression fails fast with MemoryError instead of taking GBs
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    folder = sys.argv[1]
    tall, wide = f"{folder}/tall.png", f"{folder}/wide.png"
    Image.new("L", (1, 30000), 77).save(tall)
    Image.new("L", (30000, 1), 77).save(wide)
    def peak():
        # Linux: VmHWM, this process image's own peak (ru_maxrss would include the memory of the
        # pytest process it was forked from, carried across exec). Elsewhere ru_maxrss (bytes on macOS).
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    report = {"start": peak()}
    for model in ("dino-vits16", "vit-base-patch16-224", "deit-base-patch16-224"):
        for name, path in (("tall", tall), ("wide", wide)):
            pixels = load_pixels(path, get_model_spec(model).preprocess)
            report[f"{model} {name}"] = [peak(), pixels.shape, sorted(set(pixels.reshape(-1).tolist()))]
    print(json.dumps(report))
    """
)


def test_1x30000_strips_stay_bounded_in_memory(tmp_path):
    # dino-vits16 (shorter side to 256, crop 224) used to resize a 1x30000 strip to 256 x 7.68 M
    # pixels first: 8 GB and half a minute. Squash models are checked alike.
    done = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for key, (peak, shape, values) in ((k, v) for k, v in report.items() if k != "start"):
        assert shape == [224, 224, 3], key
        assert values == [77], (key, values)  # a flat grey strip stays flat grey
        assert peak < 600 * 2**20, (key, peak)


# --- 5. 32-bit integer images ---------------------------------------------------------------------


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


# --- 8. the pixel limit ------------------------------------------------------------------------------


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


# --- 10. bounded preprocessing sizes ---------------------------------------------------------------


def test_huge_shortest_edge_in_preprocessor_config_is_a_checkpoint_error():
    source = "/ckpt/preprocessor_config.json"
    for hf in (
        {"size": {"shortest_edge": 100000}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}},
        {"size": {"shortest_edge": 100000}},
        {"size": {"height": 100000, "width": 100000}},
    ):
        with pytest.raises(CheckpointError) as info:
            PreprocessConfig.from_transformers(hf, source)
        assert source in str(info.value) and "100000" in str(info.value) and str(MAX_RESIZE) in str(info.value)
    published = {"size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}}
    assert PreprocessConfig.from_transformers(published, source).resize_to == 256


def test_tiny_crop_pct_is_a_usage_error():
    cfg = PreprocessConfig(resize="shortest", crop=True, interpolation="bicubic")
    for call in (lambda: cfg.with_crop_pct(0.0001), lambda: cfg.override(crop_pct=0.0001), lambda: cfg.override(crop_pct=float("nan"))):
        with pytest.raises(UsageError, match="--crop-pct"):
            call()
    assert cfg.with_crop_pct(0.25).resize_to == 896 and cfg.with_crop_pct(1.0).resize_to == 224
    with pytest.raises(UsageError, match="more than vitembed allows"):
        cfg.with_crop_pct(0.875).at_image_size(8000)  # floor(8000 / 0.875) = 9142


def test_cli_tiny_crop_pct_exits_2(tmp_path):
    photo(40, 30).save(tmp_path / "a.png")
    r = run_cli("encode", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--weights", "random",
                "--model", "vit-base-patch16-224", "--crop-pct", "0.0001")
    assert r.returncode == 2, r.stderr.decode()
    assert "--crop-pct 0.0001" in r.stderr.decode()
    assert not (tmp_path / "o" / "a.png.safetensors").exists()


# --- 13b. a PNG signature followed by garbage ----------------------------------------------------------


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


# --- 13c. out of memory --------------------------------------------------------------------------------


def _no_memory(*args, **kwargs):
    raise MemoryError


def test_memory_error_while_resizing_is_an_input_error(tmp_path, monkeypatch):
    path = tmp_path / "p.png"
    photo(300, 200).save(path)
    monkeypatch.setattr(Image.Image, "resize", _no_memory)
    with pytest.raises(InputError) as info:
        load_pixels(path, get_model_spec("dino-vits16").preprocess)
    assert info.value.kind == "out-of-memory" and info.value.path == str(path)
    assert info.value.reason == "not enough memory to decode and resize this 300x200 image"


def test_memory_error_while_decoding_is_an_input_error(tmp_path, monkeypatch):
    path = tmp_path / "p.png"
    photo(300, 200).save(path)
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", _no_memory)
    with pytest.raises(InputError) as info:
        load_pixels(path, PreprocessConfig())
    assert info.value.kind == "out-of-memory"
    assert info.value.reason == "not enough memory to decode and resize this 300x200 image"  # size from the header
