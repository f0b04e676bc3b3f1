"""RGB image -> model input: resize in Pillow (uint8), then rescale and normalise in torch.

Reproduces transformers' ``ViTImageProcessor`` (PIL backend) to the bit for the
google/vit checkpoints: ``Image.resize((S, S), BILINEAR)`` on the RGB image, then
``float32(float64(v) * (1/255))``, then ``(x - mean) / std`` in float32. The last
two steps are done as a per-channel lookup table on the uint8 values, so the
device receives compact uint8 batches and the result is bit-identical to the
reference on any device.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .config import PreprocessConfig
from .decode import DecodeOptions, decode_image

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def resize(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB PIL image -> (S, S, 3) uint8 array, S = ``cfg.image_size``.

    ``squash``: the whole image resized to R x R (R = ``cfg.resize_to``), aspect
    ratio not kept (transformers' ViTImageProcessor). ``shortest``: the shorter
    side resized to R, the longer to ``int(R * long / short)`` (transformers'
    ``shortest_edge``). Then, with ``cfg.crop``, the centre S x S, offsets
    rounded as ``cfg.crop_rounding`` says (transformers: down; timm/torchvision: to nearest).
    """
    target = cfg.resize_to
    width, height = image.size
    if cfg.resize == "squash":
        size = (target, target)
    elif width <= height:
        size = (target, int(target * height / width))
    else:
        size = (int(target * width / height), target)
    if image.size != size:
        image = image.resize(size, resample=_RESAMPLE[cfg.interpolation], reducing_gap=None)
    if cfg.crop:
        s = cfg.image_size
        if cfg.crop_rounding == "round":  # torchvision CenterCrop: int(round((h - s) / 2.0))
            top, left = int(round((size[1] - s) / 2.0)), int(round((size[0] - s) / 2.0))
        else:  # transformers center_crop
            top, left = (size[1] - s) // 2, (size[0] - s) // 2
        image = image.crop((left, top, left + s, top + s))
    return np.array(image, dtype=np.uint8)  # a writable copy, safe to hand to torch


def load_pixels(path: str | os.PathLike, cfg: PreprocessConfig, options: DecodeOptions = DecodeOptions()) -> np.ndarray:
    """The decode + resize stage for one file: path -> (S, S, 3) uint8 RGB.

    Raises:
        InputError: the file cannot be decoded (see ``decode.open_image``).
    """
    return resize(decode_image(path, options), cfg)


def normalize_table(cfg: PreprocessConfig):
    """(3, 256) float32 tensor: the normalised value of each uint8 level, per channel.

    Computed exactly as transformers does it: rescale in float64, cast to
    float32, subtract the float32 mean and divide by the float32 std. The
    reference that ``normalize`` reproduces bit for bit (the tests check every level).
    """
    import torch

    levels = (torch.arange(256, dtype=torch.float64) * (1 / 255)).to(torch.float32)  # (256,)
    mean, std = normalize_stats(cfg)[:, :, None]  # (3, 1) each
    return (levels[None, :] - mean) / std  # (3, 256)


def normalize_stats(cfg: PreprocessConfig):
    """(2, 3) float32 tensor: the mean and std of ``cfg``, per channel, for ``normalize``."""
    import torch

    return torch.tensor([cfg.mean, cfg.std], dtype=torch.float32)


def normalize(pixels, stats, dtype=None):
    """uint8 batch (B, S, S, 3) -> normalised float batch (B, 3, S, S).

    ``(p / 255 - mean) / std`` in float32. For the 256 uint8 levels, float32
    ``p / 255`` equals transformers' float64 rescale cast to float32, so the
    result equals ``normalize_table`` exactly, at a few passes over memory
    (no gather).

    Args:
        pixels: uint8 torch tensor, channels last, on any device.
        stats: ``normalize_stats(cfg)`` on the same device.
        dtype: output dtype (default float32); the arithmetic itself is float32.
    """
    import torch

    mean, std = stats[:, None, :, None, None]  # (1, 3, 1, 1) each
    x = pixels.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)  # (B, 3, S, S)
    x = x.div_(255).sub_(mean).div_(std)
    return x.to(dtype) if dtype is not None else x
