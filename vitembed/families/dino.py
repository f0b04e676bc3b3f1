"""DINO (Caron et al. 2021): facebook/dino-vit*, self-supervised on ImageNet-1k.

The architecture is the plain ViT (its checkpoints are transformers ``ViTModel``s, model_type
``vit``, read by the vit family), so the configs and metadata say ``family: vit``; what is DINO's
own is its weights, the timm LayerNorm epsilon 1e-6 and the preprocessing of its evaluation
code: shorter side to 256 bicubic, centre crop 224, ImageNet mean/std.
"""

from __future__ import annotations

from ..preprocess_config import PreprocessConfig
from .base import Family, ModelSpec

PREPROCESS = PreprocessConfig(
    image_size=224,
    resize="shortest",
    resize_size=256,
    crop=True,
    interpolation="bicubic",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)

FAMILY = Family(
    name="dino",
    models=tuple(
        ModelSpec(
            f"dino-vit{size}",
            f"facebook/dino-vit{size}",
            variant,
            layer_norm_eps=1e-6,
            preprocess=PREPROCESS,
            family="dino",
            description=f"DINO ViT-{variant}, self-supervised on ImageNet-1k (Caron et al. 2021)",
        )
        for size, variant in (("s16", "S/16"), ("b16", "B/16"))
    ),
)
