"""Architecture of a Vision Transformer, as one dataclass.

Follows Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words", Table 1, with
the Ti and S widths of Touvron et al. 2020 (DeiT). Variants are named as in
big_vision ("B/16": width B, patch 16). This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, UsageError

# name -> (hidden_size, depth, num_heads, mlp_dim); big_vision's vit.py decode_variant table.
WIDTHS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
    "g": (1408, 40, 16, 6144),
    "So400m": (1152, 27, 16, 4304),  # shape-optimised (Alabdulmohsin et al. 2023): SigLIP so400m
    "g-opt": (1536, 40, 16, 6144),  # SigLIP 2's giant-opt
    # DINOv3's own, as the facebook/dinov3-* configs give them: SwiGLU MLPs, mlp_dim their hidden width.
    "S+": (384, 12, 6, 1536),
    "H+": (1280, 32, 20, 5120),
    "7B": (4096, 40, 32, 8192),
}

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu")
MLPS = ("mlp", "swiglu")
POOL_HEADS = ("none", "map")

# Sanity limits, far above any published ViT (ViT-22B: width 6144, 48 blocks): a config beyond them
# is a mistake, and would otherwise exhaust memory instead of failing with a message.
LIMITS = {"hidden_size": 16384, "depth": 512, "num_heads": 512, "mlp_dim": 65536, "reg_tokens": 1024, "num_channels": 64}
MAX_PATCHES = 16384  # e.g. 2048x2048 pixels at patch 16

@dataclass(frozen=True)
class ViTConfig:
    """Shape of a ViT encoder.

    Attributes:
        hidden_size: token width D (768 for B).
        depth: number of transformer blocks (12 for B).
        num_heads: attention heads per block; ``hidden_size % num_heads == 0``.
        mlp_dim: hidden width of each block's MLP (4 * D for the standard variants).
        patch_size: side of the square patches, in pixels (16).
        image_size: side of the square input image, in pixels (224).
        num_channels: input channels (3, RGB).
        layer_norm_eps: epsilon of every LayerNorm (1e-12 in the google/vit
            checkpoints' transformers configs, 1e-6 in timm).
        qkv_bias: whether the q, k, v projections carry a bias.
        act: MLP activation, one of ``gelu`` (exact, erf), ``gelu_tanh``, ``quick_gelu``.
        dist_token: a DeiT distillation token follows the class token
            (Touvron et al. 2020, section 5); the position embedding covers both.
        patch_bias: the patch projection has a bias (CLIP's has none).
        pre_norm: a LayerNorm (``norm_pre``) follows the position embedding,
            before the blocks (CLIP's ``pre_layrnorm``).
        final_norm: ``tokens``: the final LayerNorm applies to every token and
            ``last`` is its output (ViT, DeiT); ``pooled``: it applies only to the
            pooled class token and ``last`` is the last block's output (CLIP's
            ``post_layernorm``, Radford et al. 2021).
        layer_scale: each block scales its attention and MLP outputs by learned
            per-channel factors (``ls1``, ``ls2``; DINOv2, Oquab et al. 2023).
        reg_tokens: register tokens inserted after the class token, after the
            position embedding is added (Darcet et al. 2023).
        pos_embed_antialias: antialias when resampling the position embedding
            (timm and DINOv2 with registers: True; DINOv2's reference interpolates without).
        class_token: a class token precedes the patches (SigLIP has none).
        mlp: ``mlp``: fc1 -> act -> fc2; ``swiglu``: fc1 gives 2 * mlp_dim, its first half
            through SiLU times its second half, then fc2 (Shazeer 2020; timm's ``SwiGLUPacked``,
            DINOv2 giant).
        pool_head: ``map``: a multi-head attention pooling head (``attn_pool``: one learned
            query attends over the last tokens, then a residual MLP; Zhai et al. 2022, SigLIP's
            ``head``, timm's ``AttentionPoolLatent``); ``none``: no pooling head.
        rope: 2-D rotary position embeddings on the patch tokens' queries and keys, computed
            for the input's grid, instead of a learned ``pos_embed`` (DINOv3, Siméoni et al.
            2025; transformers' ``DINOv3ViTRopePositionEmbedding``).
        rope_theta: the base period of those rotations (100 for DINOv3).
        naflex: SigLIP 2 NaFlex (Tschannen et al. 2025): the input is each image's patch sequence
            at its own grid (``preprocess.PatchBatch``), embedded by a linear layer; the learned
            position grid (``image_size / patch_size`` per side) is resized to each image's grid,
            and the padding is masked out of attention and the pooling head.
        proj_dim: width of a bias-free linear projection (``head``) of the pooled vector into a
            joint image-text space (CLIP's ``visual_projection``); 0: none.
        family: the family module whose reference this follows (``families.family_of``).
    """

    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    patch_size: int = 16
    image_size: int = 224
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    act: str = "gelu"
    dist_token: bool = False
    patch_bias: bool = True
    pre_norm: bool = False
    final_norm: str = "tokens"
    layer_scale: bool = False
    reg_tokens: int = 0
    pos_embed_antialias: bool = True
    class_token: bool = True
    mlp: str = "mlp"
    pool_head: str = "none"
    proj_dim: int = 0
    rope: bool = False
    rope_theta: float = 100.0
    naflex: bool = False
    family: str = "vit"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "depth", "num_heads", "mlp_dim", "patch_size", "image_size", "num_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{name} must be a positive integer (got {value!r})")
        if not isinstance(self.reg_tokens, int) or self.reg_tokens < 0:
            raise UsageError(f"reg_tokens must be a non-negative integer (got {self.reg_tokens!r})")
        for name, limit in LIMITS.items():
            if getattr(self, name) > limit:
                raise UsageError(f"{name} {getattr(self, name)} is more than vitembed allows ({limit})")
        if self.num_patches > MAX_PATCHES:
            raise UsageError(
                f"image size {self.image_size} with patch size {self.patch_size} gives {self.num_patches} patches; "
                f"at most {MAX_PATCHES} are allowed"
            )
        if not isinstance(self.layer_norm_eps, float) or not 0 < self.layer_norm_eps < 1:
            raise UsageError(f"layer_norm_eps must be a number in (0, 1) (got {self.layer_norm_eps!r})")
        if self.hidden_size % self.num_heads:
            raise UsageError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size < self.patch_size:
            raise UsageError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        if self.final_norm not in ("tokens", "pooled"):
            raise UsageError(f"final_norm must be 'tokens' or 'pooled' (got {self.final_norm!r})")
        if self.act not in ACTIVATIONS:
            raise UsageError(f"unknown activation {self.act!r}; expected one of {', '.join(ACTIVATIONS)}")
        if not isinstance(self.rope_theta, float) or not 1 <= self.rope_theta <= 1e9:
            raise UsageError(f"rope_theta must be a number from 1 to 1e9 (got {self.rope_theta!r})")
        if self.rope and (self.hidden_size // self.num_heads) % 4:
            raise UsageError(f"rope needs a head width divisible by 4 (got {self.hidden_size // self.num_heads})")
        if self.naflex and (self.class_token or self.dist_token or self.reg_tokens or self.rope or self.pre_norm):
            raise UsageError("naflex models have patch tokens only, with a learned position grid")
        if self.mlp not in MLPS:
            raise UsageError(f"mlp must be one of {', '.join(MLPS)} (got {self.mlp!r})")
        if self.pool_head not in POOL_HEADS:
            raise UsageError(f"pool_head must be one of {', '.join(POOL_HEADS)} (got {self.pool_head!r})")
        if isinstance(self.proj_dim, bool) or not isinstance(self.proj_dim, int) or not 0 <= self.proj_dim <= LIMITS["hidden_size"]:
            raise UsageError(f"proj_dim must be an integer from 0 to {LIMITS['hidden_size']} (got {self.proj_dim!r})")

    @property
    def grid_size(self) -> int:
        """Patches per side: image_size // patch_size (14 for 224/16; 27 for SigLIP's 384/14,
        whose stride-14 convolution leaves the last 6 pixel rows and columns out, as its reference)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """grid_size ** 2 (196 for 224/16)."""
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: the class token, DeiT's distillation token, registers."""
        return self.num_embedded_prefix_tokens + self.reg_tokens

    @property
    def num_embedded_prefix_tokens(self) -> int:
        """Prefix tokens that the position embedding covers: the class and distillation tokens
        (the registers come after it is added; ``rope`` models have none)."""
        return int(self.class_token) + int(self.dist_token)

    @property
    def num_tokens(self) -> int:
        """Sequence length: prefix tokens + patches (197 for 224/16)."""
        return self.num_prefix_tokens + self.num_patches

    def replace(self, **changes: Any) -> "ViTConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_variant(cls, variant: str, **overrides: Any) -> "ViTConfig":
        """Config for a named variant such as ``"B/16"`` or ``"L/32"`` (big_vision naming).

        Raises:
            UsageError: the name is not ``<Ti|S|B|L|H>/<patch>``.
        """
        m = re.fullmatch(r"([A-Za-z0-9+-]+)/(\d+)", variant)
        if not m or m.group(1) not in WIDTHS:
            raise UsageError(f"unknown ViT variant {variant!r}; expected e.g. 'B/16' ({', '.join(WIDTHS)} / patch)")
        hidden, depth, heads, mlp = WIDTHS[m.group(1)]
        fields = dict(hidden_size=hidden, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=int(m.group(2)))
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_transformers(cls, hf: dict[str, Any], source: str = "config.json") -> "ViTConfig":
        """Config from a transformers config.json dict; see ``families.config_from_transformers``.

        Raises:
            CheckpointError: a ``model_type`` no family reads, or settings vitembed does not implement.
        """
        from .families import config_from_transformers

        return config_from_transformers(hf, source)


def layer_index(layer: str, depth: int) -> int:
    """Position of a named layer in the encoder, as transformers' ``hidden_states`` counts.

    ``"embeddings"`` -> 0 (class token + position embedding, before any block),
    ``"N"`` -> N for 1 <= N <= depth (output of block N), ``"last"`` -> depth + 1
    (block ``depth`` followed by the final LayerNorm: ``last_hidden_state``).

    Raises:
        UsageError: any other name, or N outside 1..depth.
    """
    if layer == "embeddings":
        return 0
    if layer == "last":
        return depth + 1
    if re.fullmatch(r"[0-9]+", layer) and 1 <= int(layer) <= depth:
        return int(layer)
    raise UsageError(f"--layer {layer!r}: expected 'last', 'embeddings' or a block number 1..{depth}")


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
