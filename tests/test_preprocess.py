"""Preprocessing equals transformers' ViTImageProcessor (PIL backend) to the bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_transforms import convert_to_rgb
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from vitembed.config import PreprocessConfig
from vitembed.decode import to_rgb
from vitembed.errors import InputError
from vitembed.preprocess import load_pixels, normalize, normalize_stats, normalize_table

from .conftest import jpeg_bytes, photo

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
