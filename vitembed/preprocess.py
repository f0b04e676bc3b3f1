"""RGB image -> model input: resize in Pillow (uint8), then rescale and normalise in torch.

Reproduces transformers' ``ViTImageProcessor`` (PIL backend) to the bit for the
google/vit checkpoints: ``Image.resize((S, S), BILINEAR)`` on the RGB image, then
``float32(float64(v) * (1/255))``, then ``(x - mean) / std`` in float32. The last
two steps are done as a per-channel lookup table on the uint8 values, so the
device receives compact uint8 batches and the result is bit-identical to the
reference on any device.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os

import numpy as np
from PIL import Image

from .preprocess_config import PreprocessConfig
from .decode import DecodeOptions, decode_image, source_name
from .errors import InputError
from .shards import TarMember

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


# ``resize`` resizes the whole image, then crops (the reference path, bit for bit), while the resized
# image holds at most this many times the crop's pixels; beyond, it resizes only the crop's box. At a
# 224 crop of a 256 shortest edge the reference path covers aspect ratios up to 12:1 (0.8 M pixels).
MAX_INTERMEDIATE_RATIO = 16


# --fast-decode: Pillow reduces by whole factors (box averaging) before resampling, down to no less
# than this many times the output size (Image.resize's reducing_gap).
FAST_REDUCING_GAP = 2.0


def resize(image: Image.Image, cfg: PreprocessConfig, reducing_gap: float | None = None) -> np.ndarray:
    """RGB PIL image -> (S, S, 3) uint8 array, S = ``cfg.image_size`` (float32 in [0, 1] with
    ``cfg.backend == "torch"``: ``resize_float``).

    ``squash``: the whole image resized to R x R (R = ``cfg.resize_to``), aspect
    ratio not kept (transformers' ViTImageProcessor). ``shortest``: the shorter
    side resized to R, the longer to ``int(R * long / short)`` (transformers'
    ``shortest_edge``). Then, with ``cfg.crop``, the centre S x S, offsets
    rounded as ``cfg.crop_rounding`` says (transformers: down; timm/torchvision: to nearest).

    Memory stays bounded for any shape. When the full resize would hold more than
    ``MAX_INTERMEDIATE_RATIO`` times S x S pixels (a 1x30000 strip resized to a
    shorter side of 256 would be 256 x 7.68 M), only what the crop keeps is
    resized (``_resize_box``), which equals the full path within rounding (the
    tests check at most 2 levels apart). Ordinary shapes take the reference path,
    bit for bit. A squash without crop needs no box: its output is R x R, and
    Pillow resamples a thin strip without a strip-sized intermediate (the tests
    check 1x30000 both ways).

    ``reducing_gap`` (``--fast-decode``: ``FAST_REDUCING_GAP``) is Pillow's: reduce by a whole
    factor first, keeping at least that many times the output size, then resample; None: exact.
    """
    target = cfg.resize_to
    width, height = image.size
    if cfg.resize == "naflex":  # its own grid: (h * P, w * P, 3)
        rows, columns = naflex_size(height, width, cfg.patch_size, cfg.max_num_patches)
        if (columns, rows) != image.size:
            image = image.resize((columns, rows), resample=_RESAMPLE[cfg.interpolation], reducing_gap=reducing_gap)
        return np.array(image, dtype=np.uint8)
    if cfg.resize == "squash":
        size = (target, target)
    elif width <= height:
        size = (target, int(target * height / width))
    else:
        size = (int(target * width / height), target)
    if cfg.backend == "torch":
        return resize_float(image, size, cfg)
    resample = _RESAMPLE[cfg.interpolation]
    if cfg.crop:
        s, (top, left) = cfg.image_size, crop_offsets(size, cfg)
        if image.size != size and size[0] * size[1] > MAX_INTERMEDIATE_RATIO * s * s:
            # The crop in source coordinates: resized pixel x covers source [x, x + 1) * width / size[0].
            box = (
                left * width / size[0],
                top * height / size[1],
                min(width, (left + s) * width / size[0]),
                min(height, (top + s) * height / size[1]),
            )
            return np.array(_resize_box(image, s, box, cfg.interpolation, size), dtype=np.uint8)
    if image.size != size:
        image = image.resize(size, resample=resample, reducing_gap=reducing_gap)
    if cfg.crop:
        image = image.crop((left, top, left + s, top + s))
    return np.array(image, dtype=np.uint8)  # a writable copy, safe to hand to torch


def shorter_side(cfg: PreprocessConfig, width: int, height: int) -> int:
    """The shorter side, in pixels, that ``resize`` gives an image of ``width`` x ``height``
    before any crop: ``cfg.resize_to`` for squash and shortest, the NaFlex grid's shorter side."""
    if cfg.resize == "naflex":
        return min(naflex_size(height, width, cfg.patch_size, cfg.max_num_patches))
    return cfg.resize_to


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """(height, width) in pixels that SigLIP 2 NaFlex resizes an image to: both multiples of
    ``patch_size`` (at least one patch each), the aspect ratio kept as closely as that allows, at
    most ``max_num_patches`` patches. As transformers' ``get_image_size_for_max_num_patches``: a
    bisection on the scale in [1e-6, 100] down to a width of 1e-5, each side ``ceil(side * scale
    / P) * P``; the largest scale found within the budget wins.
    """

    def scaled(scale: float, side: int) -> int:
        return max(patch_size, math.ceil(side * scale / patch_size) * patch_size)

    low, high = 1e-6, 100.0
    while high - low >= 1e-5:
        scale = (low + high) / 2
        if (scaled(scale, height) / patch_size) * (scaled(scale, width) / patch_size) <= max_num_patches:
            low = scale
        else:
            high = scale
    return scaled(low, height), scaled(low, width)


@dataclasses.dataclass
class PatchBatch:
    """A batch of NaFlex images as patch sequences, padded to one length (transformers' Siglip2
    ``pixel_values`` before normalisation, with its ``spatial_shapes``).

    Attributes:
        patches: (B, N, P * P * 3) uint8: each image's patches in row-major order, each patch's
            pixels row-major with channels last; rows beyond an image's h * w are zero.
        grids: (B, 2) int64: each image's grid (h, w) in patches.
    """

    patches: np.ndarray
    grids: np.ndarray

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, rows: slice) -> "PatchBatch":
        return PatchBatch(self.patches[rows], self.grids[rows])


def collate_patches(images: list[np.ndarray], patch_size: int, length: int) -> PatchBatch:
    """(h * P, w * P, 3) uint8 images of their own sizes -> a ``PatchBatch`` of ``length`` rows
    each (the budget ``max_num_patches``)."""
    P = patch_size
    patches = np.zeros((len(images), length, P * P * 3), dtype=np.uint8)
    grids = np.zeros((len(images), 2), dtype=np.int64)
    for i, image in enumerate(images):
        h, w = image.shape[0] // P, image.shape[1] // P
        patches[i, : h * w] = image.reshape(h, P, w, P, 3).transpose(0, 2, 1, 3, 4).reshape(h * w, P * P * 3)
        grids[i] = h, w
    return PatchBatch(patches, grids)


def normalize_patches(batch: PatchBatch, stats, dtype=None):
    """A ``PatchBatch``'s uint8 patches (B, N, P * P * 3) -> normalised float (B, N, P * P * 3), as
    ``normalize`` computes each value; the padding rows are zero, as Siglip2ImageProcessor pads
    after normalising. Returns (patches on ``stats``' device, grids (B, 2) int64 there)."""
    import torch

    device = stats.device
    patches = torch.as_tensor(batch.patches).to(device)
    B, N, K = patches.shape
    x = patches.reshape(B, N, K // 3, 3).to(torch.float32).div_(255).sub_(stats[0]).div_(stats[1])
    grids = torch.as_tensor(batch.grids).to(device)
    real = torch.arange(N, device=device)[None, :] < grids.prod(dim=1, keepdim=True)  # (B, N)
    x = (x.reshape(B, N, K) * real[..., None]).contiguous()
    return (x.to(dtype) if dtype is not None else x), grids


def crop_offsets(size: tuple[int, int], cfg: PreprocessConfig) -> tuple[int, int]:
    """(top, left) of the centre ``cfg.image_size`` crop of an image of ``size`` (width, height):
    rounded down as transformers' ``center_crop``, or half to even as torchvision's ``CenterCrop``
    (``int(round((h - s) / 2.0))``, which timm's transforms use) with ``crop_rounding="round"``."""
    s = cfg.image_size
    if cfg.crop_rounding == "round":
        return int(round((size[1] - s) / 2.0)), int(round((size[0] - s) / 2.0))
    return (size[1] - s) // 2, (size[0] - s) // 2


def resize_float(image: Image.Image, size: tuple[int, int], cfg: PreprocessConfig) -> np.ndarray:
    """RGB PIL image -> (S, S, 3) float32 array in [0, 1], rescaled before it is resized, as
    ``DINOv3ViTImageProcessor`` (transformers' torchvision backend): ``uint8 * (1 / 255)`` in float32,
    then ``F.interpolate(size=(h, w), antialias=True, align_corners=False)``, then the centre crop.

    Raises:
        MemoryError: the float image does not fit in memory (four bytes per value).
    """
    import torch
    import torch.nn.functional as F

    try:
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None] * (1 / 255)  # (1, 3, H, W)
        if (x.shape[3], x.shape[2]) != size:
            x = F.interpolate(x, size=(size[1], size[0]), mode=cfg.interpolation, antialias=True, align_corners=False)
    except RuntimeError as e:
        if "alloc" in str(e):
            raise MemoryError(str(e)) from None
        raise
    if cfg.crop:
        s, (top, left) = cfg.image_size, crop_offsets(size, cfg)
        x = x[:, :, top : top + s, left : left + s]
    return x[0].permute(1, 2, 0).contiguous().numpy()  # (S, S, 3) float32


# Radius of each Pillow filter, in output pixels (Pillow's Resample.c; NEAREST samples one pixel).
_SUPPORT = {"nearest": 0.5, "box": 0.5, "bilinear": 1.0, "hamming": 1.0, "bicubic": 2.0, "lanczos": 3.0}


def _resize_box(
    image: Image.Image,
    side: int,
    box: tuple[float, float, float, float],
    interpolation: str,
    full: tuple[int, int],
) -> Image.Image:
    """The ``box`` of ``image`` (float source coordinates) resampled to ``side`` x ``side``: what
    resizing the whole image to ``full`` and cropping gives, within rounding.

    Only the source pixels under the filter's reach are used: they are cut out first (with a
    margin), so work and memory scale with the crop, not the image, and the box is handed to
    Pillow's ``Image.resize(size, box=...)`` relative to the cut-out (Pillow takes box coordinates
    as 32-bit floats, too coarse far from the origin). The filter scale and pixel centres are the
    full resize's. Pillow resamples in two passes (columns, then rows), its intermediate rounded
    to uint8; this does one pass per axis in the order Pillow would take for the full resize, so
    the two differ only where a pixel centre rounds differently: a level at most with the smooth
    filters (bilinear, bicubic, lanczos, hamming); with ``nearest`` and ``box`` a centre that falls
    on a source pixel's edge may take the neighbouring pixel.
    """
    resample = _RESAMPLE[interpolation]
    spans = []
    for lo, hi, extent in ((box[0], box[2], image.width), (box[1], box[3], image.height)):
        reach = _SUPPORT[interpolation] * max((hi - lo) / side, 1.0)  # filter radius in source pixels
        spans.append((max(0, math.floor(lo - reach) - 1), min(extent, math.ceil(hi + reach) + 1)))
    (c0, c1), (r0, r1) = spans
    part = image.crop((c0, r0, c1, r1))
    columns = (box[0] - c0, box[2] - c0)
    rows = (box[1] - r0, box[3] - r0)
    if _rows_first(image.size, full):
        tall = part.resize((c1 - c0, side), resample, box=(0, rows[0], c1 - c0, rows[1]), reducing_gap=None)
        return tall.resize((side, side), resample, box=(columns[0], 0, columns[1], side), reducing_gap=None)
    wide = part.resize((side, r1 - r0), resample, box=(columns[0], 0, columns[1], r1 - r0), reducing_gap=None)
    return wide.resize((side, side), resample, box=(0, rows[0], side, rows[1]), reducing_gap=None)


def _rows_first(source: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether Pillow resizes ``source`` to ``size`` rows first. Pillow 13 does so when the image
    loses more than twice as many rows as columns (python-pillow/Pillow#9549; the rule as observed on
    Pillow 13.0, checked against hundreds of random sizes); earlier versions always resample the
    columns first (``_pillow_can_go_rows_first`` tells which this Pillow is)."""
    (w, h), (width, height) = source, size
    return height < h and h - height > 2 * (w - width) and _pillow_can_go_rows_first()


@functools.lru_cache(maxsize=1)
def _pillow_can_go_rows_first() -> bool:
    """True if this Pillow resamples rows first where ``_rows_first`` says: checked once on a
    32x8 ramp resized to 12x6, whose two orders give different pixels."""
    ramp = Image.fromarray((np.arange(32 * 8 * 3).reshape(32, 8, 3) * 37 % 256).astype(np.uint8))  # RGB
    bicubic = Image.Resampling.BICUBIC
    reference = ramp.resize((12, 6), bicubic, reducing_gap=None)
    rows_first = ramp.resize((8, 6), bicubic, reducing_gap=None).resize((12, 6), bicubic, reducing_gap=None)
    return reference.tobytes() == rows_first.tobytes()


def load_pixels(path: str | os.PathLike | TarMember, cfg: PreprocessConfig, options: DecodeOptions = DecodeOptions()) -> np.ndarray:
    """The decode + resize stage for one file (or WebDataset member): path -> (S, S, 3) uint8 RGB.

    Raises:
        InputError: the file cannot be decoded (see ``decode.open_image``), or kind
            ``out-of-memory`` when decoding or resizing it runs out of memory (the
            message gives the image's size when its header could be read).
    """
    name = source_name(path)
    image = None
    try:
        image = decode_image(path, options, min_side=functools.partial(shorter_side, cfg))
        return resize(image, cfg, reducing_gap=FAST_REDUCING_GAP if options.fast else None)
    except MemoryError:
        size = image.size if image is not None else _header_size(path)
        image = None  # not kept alive by the traceback while the caller handles the error
        what = f"this {size[0]}x{size[1]} image" if size else "this image"
        raise InputError(name, "out-of-memory", f"not enough memory to decode and resize {what}") from None


def _header_size(path: str | os.PathLike | TarMember) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding it; None if it cannot be read."""
    try:
        with Image.open(io.BytesIO(path.read()) if isinstance(path, TarMember) else path) as im:
            return im.size
    except Exception:
        return None


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
    (no gather). A float batch (``resize_float``'s, already in [0, 1]) is only
    normalised, ``(p - mean) / std``, as torchvision's ``normalize``.

    Args:
        pixels: uint8 (or float32 in [0, 1]) torch tensor, channels last, on any device.
        stats: ``normalize_stats(cfg)`` on the same device.
        dtype: output dtype (default float32); the arithmetic itself is float32.
    """
    import torch

    mean, std = stats[:, None, :, None, None]  # (1, 3, 1, 1) each
    if pixels.is_floating_point():  # already rescaled; out of place: the caller's batch stays as it is
        x = (pixels.permute(0, 3, 1, 2).to(torch.float32) - mean).div_(std)
        return x.contiguous().to(dtype) if dtype is not None else x.contiguous()
    x = pixels.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)  # (B, 3, S, S)
    x = x.div_(255).sub_(mean).div_(std)
    return x.to(dtype) if dtype is not None else x
