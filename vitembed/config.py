"""Architecture of a Vision Transformer, as one dataclass.

Follows Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words", Table 1, with
the Ti and S widths of Touvron et al. 2020 (DeiT). Variants are named as in
big_vision ("B/16": width B, patch 16). This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

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


# The preprocessing half of a checkpoint's configuration lives in preprocess_config.py; its names
# stay importable from here.
from .preprocess_config import (  # noqa: E402, F401
    BACKENDS,
    DEFAULT_STATS,
    INTERPOLATIONS,
    MAX_RESIZE,
    MIN_CROP_PCT,
    RESCALE_FIRST_PROCESSORS,
    RESIZE_MODES,
    TORCH_INTERPOLATIONS,
    PreprocessConfig,
)
