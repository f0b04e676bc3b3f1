"""How an image becomes a model input, tied to a checkpoint: ``PreprocessConfig`` (the fields of
transformers' image processors and timm's ``pretrained_cfg``). ``preprocess.py`` carries it out.
This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, UsageError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
RESIZE_MODES = ("squash", "shortest", "naflex")
BACKENDS = ("pil", "torch")
TORCH_INTERPOLATIONS = ("bilinear", "bicubic")  # what F.interpolate antialiases
# Image processors that rescale to [0, 1] before resizing, on float tensors (their ``_preprocess``).
RESCALE_FIRST_PROCESSORS = ("DINOv3ViTImageProcessor", "DINOv3ViTImageProcessorFast")
# Processors whose mean and std default to ImageNet's when their config leaves them out (the others: 0.5).
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DEFAULT_STATS = {name: _IMAGENET for name in RESCALE_FIRST_PROCESSORS}

# Bounds of the preprocessing, far beyond any published checkpoint (DINOv2 resizes to 256 and crops
# 224, SigLIP goes up to 512, ViT up to 518 at crop 1.0): a larger size is a mistake, and would
# exhaust memory on every image instead of failing once with a message.
MAX_RESIZE = 8192  # pixels: the resize target (shortest edge or squash side) and the model input
# timm's crop_pct (the input side over the resize target) is 0.875 to 1.0 in published models;
# below 1/4 most of the image would be cropped away.
MIN_CROP_PCT = 0.25


@dataclass(frozen=True)
class PreprocessConfig:
    """How an RGB image becomes the model's input, tied to a checkpoint.

    Mirrors the fields of transformers' image processors and timm's
    ``pretrained_cfg``. For the google/vit checkpoints (transformers'
    ``ViTImageProcessor``): squash-resize to 224x224 with bilinear resampling,
    no crop, rescale by 1/255, mean 0.5 and std 0.5 per channel.

    Attributes:
        image_size: side of the square model input, in pixels.
        resize: ``squash`` resizes the whole image to resize_size x resize_size,
            ignoring its aspect ratio; ``shortest`` resizes its shorter side to
            resize_size, the longer side to ``int(resize_size * long / short)``
            (transformers' ``shortest_edge``); ``naflex`` keeps the aspect ratio and
            resizes to the largest multiples of ``patch_size`` that give at most
            ``max_num_patches`` patches (SigLIP 2 NaFlex, ``preprocess.naflex_size``): each
            image gets its own grid, and ``image_size`` is only the nominal square side.
        resize_size: target of the resize in pixels (None: ``image_size``);
            image_size and the resize target are at most ``MAX_RESIZE`` (8192).
        crop: centre-crop the resized image to image_size x image_size.
        crop_pct: timm's crop fraction, when the resize target was derived from
            it (``resize_size = floor(image_size / crop_pct)``); kept so that
            another input size derives its resize target the same way. Within
            [``MIN_CROP_PCT``, 1] = [0.25, 1].
        crop_rounding: how the crop offsets are rounded: ``floor`` as
            transformers' ``center_crop``, ``round`` (half to even) as
            torchvision's ``CenterCrop``, which timm's transforms use.
        interpolation: Pillow resampling filter name (``bilinear``, ``bicubic``, ...).
        mean, std: per-channel (R, G, B) normalisation of values rescaled to [0, 1].
        patch_size, max_num_patches: the patch side and the patch budget of ``naflex``
            (transformers' ``Siglip2ImageProcessor``; unused by the other modes).
        backend: ``pil``: resize the uint8 image in Pillow, then rescale (transformers' PIL
            processors, timm); ``torch``: rescale to float32 [0, 1] first, then resize with
            ``torch.nn.functional.interpolate(antialias=True)`` (bilinear or bicubic), as
            ``DINOv3ViTImageProcessor`` does through torchvision on float tensors.
    """

    image_size: int = 224
    resize: str = "squash"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize_size: int | None = None
    crop: bool = False
    crop_rounding: str = "floor"
    crop_pct: float | None = None
    backend: str = "pil"
    patch_size: int = 16
    max_num_patches: int = 256

    @property
    def resize_to(self) -> int:
        """The resize target in pixels: ``resize_size``, or ``image_size`` when unset."""
        return self.resize_size or self.image_size

    def override(
        self,
        resize: str | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
    ) -> "PreprocessConfig":
        """This preprocessing with the user's overrides (``--resize`` etc.); None keeps a field.

        ``crop_pct`` also switches to timm's crop rounding (torchvision's).

        Raises:
            UsageError: a combination that cannot give a square input, or bad values.
        """
        changes: dict[str, Any] = {}
        if resize is not None:
            changes["resize"] = resize
        if interpolation is not None:
            changes["interpolation"] = interpolation
        if mean is not None:
            changes["mean"] = tuple(mean)
        if std is not None:
            changes["std"] = tuple(std)
        out = dataclasses.replace(self, **changes)
        if crop_pct is not None:
            out = dataclasses.replace(out.with_crop_pct(crop_pct), crop_rounding="round")
        return out

    def with_crop_pct(self, crop_pct: float) -> "PreprocessConfig":
        """timm's ``crop_pct``: resize to ``floor(image_size / crop_pct)``, then centre-crop.

        Raises:
            UsageError: crop_pct outside [``MIN_CROP_PCT``, 1] (0.25 to 1), or a resize
                target above ``MAX_RESIZE``.
        """
        if not MIN_CROP_PCT <= crop_pct <= 1:
            raise UsageError(f"--crop-pct {crop_pct}: expected a number from {MIN_CROP_PCT} to 1 (timm's models use 0.875 to 1)")
        if math.floor(self.image_size / crop_pct) > MAX_RESIZE:
            raise UsageError(
                f"--crop-pct {crop_pct}: the resize target floor({self.image_size} / {crop_pct}) is more than "
                f"vitembed allows ({MAX_RESIZE} pixels)"
            )
        return dataclasses.replace(
            self, resize_size=math.floor(self.image_size / crop_pct), crop=True, crop_pct=crop_pct
        )

    def at_image_size(self, image_size: int) -> "PreprocessConfig":
        """The same preprocessing for another input size: the resize target from ``crop_pct`` when
        known (as timm does), else scaled alike and rounded down."""
        if image_size == self.image_size:
            return self
        if self.crop_pct is not None:
            resize_size = math.floor(image_size / self.crop_pct)
            return dataclasses.replace(self, image_size=image_size, resize_size=resize_size)
        resize_size = None if self.resize_size is None else self.resize_size * image_size // self.image_size
        return dataclasses.replace(self, image_size=image_size, resize_size=resize_size)

    def __post_init__(self) -> None:
        for name in ("image_size", "resize_size"):
            value = getattr(self, name)
            if value is None and name == "resize_size":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{name.replace('_', ' ')} must be a positive integer (got {value!r})")
            if value > MAX_RESIZE:
                raise UsageError(f"{name.replace('_', ' ')} {value} is more than vitembed allows ({MAX_RESIZE} pixels)")
        if self.crop_pct is not None and not (
            isinstance(self.crop_pct, (int, float)) and not isinstance(self.crop_pct, bool) and MIN_CROP_PCT <= self.crop_pct <= 1
        ):
            raise UsageError(f"crop_pct must be a number from {MIN_CROP_PCT} to 1 (got {self.crop_pct!r})")
        if self.resize not in RESIZE_MODES:
            raise UsageError(f"unknown resize mode {self.resize!r}; expected one of {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(
                f"unknown interpolation {self.interpolation!r}; expected one of {', '.join(INTERPOLATIONS)}"
            )
        for name in ("patch_size", "max_num_patches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RESIZE:
                raise UsageError(f"{name} must be an integer from 1 to {MAX_RESIZE} (got {value!r})")
        if self.resize == "naflex" and (self.crop or self.backend != "pil"):
            raise UsageError("resize naflex keeps the whole image: no crop, and Pillow's resize")
        if self.resize == "naflex":
            pass
        elif self.resize_to < self.image_size or (not self.crop and (self.resize != "squash" or self.resize_to != self.image_size)):
            raise UsageError(
                f"resize {self.resize} to {self.resize_to} then {'crop' if self.crop else 'no crop'} "
                f"cannot give a {self.image_size}x{self.image_size} input"
            )
        if self.backend not in BACKENDS:
            raise UsageError(f"backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        if self.backend == "torch" and self.interpolation not in TORCH_INTERPOLATIONS:
            raise UsageError(
                f"interpolation {self.interpolation!r}: this checkpoint resizes float tensors with "
                f"torch, which antialiases only {' and '.join(TORCH_INTERPOLATIONS)}"
            )
        if self.crop_rounding not in ("floor", "round"):
            raise UsageError(f"crop_rounding must be 'floor' or 'round' (got {self.crop_rounding!r})")
        numbers = all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (*self.mean, *self.std)
        )
        if (
            len(self.mean) != 3
            or len(self.std) != 3
            or not numbers
            or any(not 1e-6 <= s <= 1e6 for s in self.std)
            or any(abs(m) > 1e6 for m in self.mean)
        ):
            raise UsageError(
                f"mean and std need 3 finite numbers each, |mean| <= 1e6 and 1e-6 <= std <= 1e6 "
                f"(got mean={self.mean}, std={self.std})"
            )

    def replace(self, **changes: Any) -> "PreprocessConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_transformers(cls, hf: dict[str, Any], source: str = "preprocessor_config.json") -> "PreprocessConfig":
        """From a transformers image processor config (``ViTImageProcessor`` fields).

        Raises:
            CheckpointError: naming ``source``: settings vitembed does not implement
                (non-square sizes, no rescale), or sizes beyond ``MAX_RESIZE``.
        """
        # PIL resampling codes, as transformers stores them.
        codes = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
        if not isinstance(hf, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        try:
            if "max_num_patches" in hf:  # Siglip2ImageProcessor (NaFlex): a patch budget, not a size
                patch, budget = hf.get("patch_size", 16), hf["max_num_patches"]
                resample = hf.get("resample", 2)
                if resample not in codes:
                    raise CheckpointError(f"{source}: unknown resample {resample!r}")
                if not hf.get("do_resize", True) or not hf.get("do_rescale", True) or not hf.get("do_normalize", True):
                    raise CheckpointError(f"{source}: do_resize, do_rescale and do_normalize must be true")
                side = patch * math.isqrt(budget) if isinstance(patch, int) and isinstance(budget, int) else 0
                return cls(image_size=side, resize="naflex", interpolation=codes[resample], patch_size=patch,
                           max_num_patches=budget, mean=tuple(hf.get("image_mean", (0.5,) * 3)),  # type: ignore[arg-type]
                           std=tuple(hf.get("image_std", (0.5,) * 3)))  # type: ignore[arg-type]
            size = hf.get("size", {"height": 224, "width": 224})
            if isinstance(size, int):
                size = {"height": size, "width": size}
            if not isinstance(size, dict):
                raise CheckpointError(f"{source}: size {size!r} is not supported")
            if "shortest_edge" in size and size.get("longest_edge") is None:
                resize, resize_size = "shortest", size["shortest_edge"]
            elif size.get("height") is not None and size.get("height") == size.get("width"):
                resize, resize_size = "squash", size["height"]
            else:
                raise CheckpointError(f"{source}: size {size} is not supported (square or shortest_edge only)")
            crop = bool(hf.get("do_center_crop", False))
            image_size = resize_size
            if crop:
                crop_size = hf.get("crop_size", {"height": 224, "width": 224})
                if isinstance(crop_size, int):
                    crop_size = {"height": crop_size, "width": crop_size}
                if not isinstance(crop_size, dict) or crop_size.get("height") != crop_size.get("width"):
                    raise CheckpointError(f"{source}: only square crops are supported (crop_size={crop_size})")
                image_size = crop_size["height"]
            if not hf.get("do_resize", True) or not hf.get("do_rescale", True):
                raise CheckpointError(f"{source}: do_resize and do_rescale must be true")
            if abs(float(hf.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
                raise CheckpointError(f"{source}: rescale_factor other than 1/255 is not supported")
            resample = hf.get("resample", 2)
            if resample not in codes:
                raise CheckpointError(f"{source}: unknown resample {resample!r}")
            normalize = hf.get("do_normalize", True)
            kind = hf.get("image_processor_type", "")
            default_mean, default_std = DEFAULT_STATS.get(kind, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
            mean = tuple(hf.get("image_mean", default_mean)) if normalize else (0.0, 0.0, 0.0)
            std = tuple(hf.get("image_std", default_std)) if normalize else (1.0, 1.0, 1.0)
            return cls(
                backend="torch" if kind in RESCALE_FIRST_PROCESSORS else "pil",
                image_size=image_size,
                resize=resize,
                resize_size=resize_size if resize_size != image_size or resize != "squash" else None,
                crop=crop,
                interpolation=codes[resample],
                mean=mean,  # type: ignore[arg-type]
                std=std,  # type: ignore[arg-type]
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from None
        except (UsageError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: {e}") from None
