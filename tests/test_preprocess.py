"""Preprocessing equals transformers' ViTImageProcessor (PIL backend) to the bit; thin images take
the crop box in bounded memory; crop sizes are bounded; running out of memory is an InputError."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from transformers.image_transforms import convert_to_rgb
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

import vitembed.preprocess as preprocess
from vitembed.catalog import get_model_spec
from vitembed.config import PreprocessConfig
from vitembed.decode import to_rgb
from vitembed.errors import InputError, UsageError
from vitembed.preprocess import (
    load_pixels,
    normalize,
    normalize_stats,
    normalize_table,
    resize,
)

from .conftest import jpeg_bytes, photo, run_cli

CFG = PreprocessConfig()
STATS = normalize_stats(CFG)
PROCESSOR = ViTImageProcessorPil()


def ours(path) -> torch.Tensor:
    return normalize(torch.from_numpy(np.array(load_pixels(path, CFG)))[None], STATS)


def reference(path) -> torch.Tensor:
    # ViTImageProcessor leaves do_convert_rgb unset and then fails on non-RGB modes;
    # vitembed's reference is the processor with transformers' own convert_to_rgb applied.
    with Image.open(path) as im:
        return PROCESSOR(im, do_convert_rgb=True, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("size", [(160, 120), (500, 375), (37, 211), (224, 224), (1, 1), (3000, 2), (2, 700)])
def test_jpeg_photos_match_bit_for_bit(tmp_path, size):
    path = tmp_path / "p.jpg"
    path.write_bytes(jpeg_bytes(photo(*size, seed=size[0])))
    got, want = ours(path), reference(path)
    assert got.shape == want.shape == (1, 3, 224, 224) and got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)


def _mode_image(mode: str) -> Image.Image:
    base = photo(96, 64, seed=3)
    if mode == "P+transparency":
        im = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
        im.info["transparency"] = 5
        return im
    if mode == "RGB+tRNS":
        im = base.copy()
        im.paste((10, 20, 30), (0, 0, 40, 30))
        im.info["transparency"] = (10, 20, 30)
        return im
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        alpha = Image.fromarray(np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (64, 1)), "L")
        im = base.convert("RGBA")
        im.putalpha(alpha)
        return im.convert(mode) if mode != "RGBA" else im
    return base.convert(mode)


MODES = ["1", "L", "LA", "P", "PA", "P+transparency", "RGB", "RGB+tRNS", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_converts_like_transformers(mode):
    im = _mode_image(mode)
    got = np.asarray(to_rgb(im))
    want = convert_to_rgb(im, return_numpy=True)
    assert got.shape == want.shape and got.dtype == np.uint8
    assert np.array_equal(got, want)


@pytest.mark.parametrize("mode,fmt", [("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P+transparency", "PNG"), ("RGB+tRNS", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("YCbCr", "TIFF"), ("RGBA", "WEBP")])
def test_mode_files_match_processor(tmp_path, mode, fmt):
    im = _mode_image(mode)
    path = tmp_path / f"m.{fmt.lower()}"
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    if "transparency" in im.info:
        kwargs["transparency"] = im.info["transparency"]
    im.save(path, fmt, **kwargs)
    with Image.open(path) as check:
        assert check.mode == im.mode.split("+")[0] or fmt == "WEBP"
    assert torch.equal(ours(path), reference(path))


@pytest.mark.parametrize("mode", ["La", "RGBa"])
def test_premultiplied_alpha_is_composited_too(mode):
    # transformers' convert_to_rgb fails on La and drops the alpha of RGBa (black background).
    # pixel 0: fully transparent (premultiplied colour 0); pixel 1: opaque.
    if mode == "La":
        im, opaque = Image.frombytes("La", (2, 1), bytes([0, 0, 124, 255])), [124, 124, 124]
    else:
        im, opaque = Image.frombytes("RGBa", (2, 1), bytes([0, 0, 0, 0, 200, 100, 50, 255])), [200, 100, 50]
    assert np.asarray(to_rgb(im)).tolist() == [[[255, 255, 255], opaque]]


def test_transparent_pixels_become_white_not_their_hidden_colour():
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # red, fully transparent
    assert np.asarray(to_rgb(im)).tolist() == [[[255, 255, 255]] * 4] * 4
    assert np.asarray(to_rgb(im, background=(0, 0, 0))).tolist() == [[[0, 0, 0]] * 4] * 4


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path, mode):
    array = np.full((8, 8), 4660, dtype=np.uint16)
    array[0, 0] = 65535
    if mode == "I":
        im = Image.fromarray(array.astype(np.int32))
    else:
        im = Image.frombytes(mode, (8, 8), array.astype("<u2" if mode == "I;16" else ">u2").tobytes())
    assert im.mode == mode
    rgb = np.asarray(to_rgb(im))
    assert rgb[1, 1].tolist() == [18, 18, 18]  # round(4660 * 255 / 65535)
    assert rgb[0, 0].tolist() == [255, 255, 255]
    path = tmp_path / "g16.png"
    Image.fromarray(array).save(path)
    assert np.asarray(load_pixels(path, CFG))[100, 100].tolist() == [18, 18, 18]


def test_float_images_are_refused(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.zeros((4, 4), np.float32), "F").save(path)
    with pytest.raises(InputError, match="mode F") as info:
        load_pixels(path, CFG)
    assert info.value.kind == "unsupported" and info.value.path == str(path)


def test_normalize_table_values():
    # level 0 -> (0 - 0.5) / 0.5 = -1, level 255 -> +1, level 128 -> float32(128/255*2-1)
    TABLE = normalize_table(CFG)
    assert TABLE.shape == (3, 256) and TABLE.dtype == torch.float32
    assert TABLE[:, 0].tolist() == [-1.0] * 3 and TABLE[:, 255].tolist() == [1.0] * 3
    imagenet = normalize_table(PreprocessConfig(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
    assert imagenet[0, 0].item() == pytest.approx(-0.485 / 0.229, abs=1e-6)


def test_normalize_arithmetic_equals_the_reference_table_at_every_level():
    """normalize computes (p / 255 - mean) / std in float32 instead of looking levels up in
    normalize_table (transformers' float64 rescale); the two must agree bit for bit."""
    from vitembed.catalog import CATALOG

    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1).expand(2, 16, 16, 3).contiguous()
    configs = {(spec.preprocess.mean, spec.preprocess.std) for spec in CATALOG.values()} | {((0.1, 0.2, 0.3), (0.7, 1e-3, 3.0))}
    assert len(configs) >= 4
    for mean, std in configs:
        cfg = PreprocessConfig(mean=mean, std=std)
        got = normalize(levels, normalize_stats(cfg))  # (2, 3, 16, 16)
        assert got.shape == (2, 3, 16, 16) and got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got[0].reshape(3, 256), normalize_table(cfg)), (mean, std)
    assert normalize(levels, normalize_stats(CFG), torch.bfloat16).dtype == torch.bfloat16


def _processors():
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil

    imagenet = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return {
        "deit": DeiTImageProcessorPil(**imagenet),  # squash to 256, bicubic, crop 224
        "clip": CLIPImageProcessorPil(),  # shortest edge 224, bicubic, crop 224, CLIP mean/std
        "dinov2": BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, **imagenet),
    }


@pytest.mark.parametrize("family", ["deit", "clip", "dinov2"])
@pytest.mark.parametrize("size", [(500, 375), (375, 500), (257, 999), (224, 224), (1, 1)])
def test_crop_preprocessing_matches_each_family_processor(tmp_path, family, size):
    import json

    processor = _processors()[family]
    cfg = PreprocessConfig.from_transformers(json.loads(processor.to_json_string()))
    assert cfg.crop and cfg.image_size == 224 and cfg.interpolation == "bicubic"
    path = tmp_path / "p.jpg"
    path.write_bytes(jpeg_bytes(photo(*size, seed=size[1])))
    with Image.open(path) as im:
        want = processor(im, do_convert_rgb=True, return_tensors="pt")["pixel_values"]
    got = normalize(torch.from_numpy(load_pixels(path, cfg))[None], normalize_stats(cfg))
    assert got.shape == want.shape == (1, 3, 224, 224)
    assert torch.equal(got, want)


def test_crop_pct_and_timm_crop_rounding():
    cfg = PreprocessConfig(resize="shortest", crop=True, interpolation="bicubic").override(crop_pct=0.9)
    assert (cfg.resize_to, cfg.crop, cfg.crop_rounding) == (248, True, "round")  # floor(224 / 0.9) = 248
    columns = np.tile(np.arange(251, dtype=np.uint8), (248, 1))
    image = Image.fromarray(np.stack([columns] * 3, -1), "RGB")  # 251 x 248: no resize, 27 columns to drop
    from vitembed.preprocess import resize

    assert resize(image, cfg)[0, 0, 0] == 14  # torchvision: round(13.5) = 14
    assert resize(image, cfg.replace(crop_rounding="floor"))[0, 0, 0] == 13  # transformers: 27 // 2 = 13


def test_override_errors():
    from vitembed.errors import UsageError

    with pytest.raises(UsageError, match="cannot give a 224x224 input"):
        PreprocessConfig().override(resize="shortest")
    with pytest.raises(UsageError, match="--crop-pct 1.5"):
        PreprocessConfig().override(crop_pct=1.5)


# Thin images on shortest-edge models: the crop box, in bounded memory ---------------------------


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


# Bounded crop sizes -----------------------------------------------------------------------------


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


# Out of memory ----------------------------------------------------------------------------------


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
