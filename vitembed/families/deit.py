"""DeiT (Touvron et al. 2020): facebook/deit-*, with and without the distillation token.

Tokens: the class token, for the distilled models the distillation token (section 5; the
position embedding covers both), then the patches. transformers' ``DeiTModel`` is the
distilled one. ``cls`` takes the class token; ``mean`` and ``patch`` leave out both prefix tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..preprocess_config import PreprocessConfig
from .base import CheckpointLayout, Family, ModelSpec

# facebook/deit-*: transformers DeiTImageProcessor, squash-resize to 256 bicubic, centre crop 224,
# ImageNet mean/std.
PREPROCESS = PreprocessConfig(
    image_size=224,
    resize="squash",
    resize_size=256,
    crop=True,
    interpolation="bicubic",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)

TRANSFORMERS = CheckpointLayout(
    "transformers",
    renames=((r"embeddings\.distillation_token", r"dist_token"),),
    unused=(r"distillation_classifier\..*", r"cls_classifier\..*"),
)


class DeiT(Family):
    def config_fields(self, hf: Mapping[str, Any], source: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
        return hf, {"family": "deit", "dist_token": True}  # DeiTModel is the distilled DeiT


FAMILY = DeiT(
    name="deit",
    model_types=("deit",),
    preprocess=PREPROCESS,
    prefixes=("deit.",),
    layouts=(TRANSFORMERS,),
    models=(
        *(
            ModelSpec(
                f"deit-{size}-distilled-patch16-224",
                f"facebook/deit-{size}-distilled-patch16-224",
                variant,
                preprocess=PREPROCESS,
                family="deit",
                arch=(("dist_token", True), ("family", "deit")),
                description=f"DeiT-{variant[:-3]} distilled: class + distillation token (Touvron et al. 2020)",
            )
            for size, variant in (("tiny", "Ti/16"), ("small", "S/16"), ("base", "B/16"))
        ),
        *(
            ModelSpec(
                f"deit-{size}-patch16-224",
                f"facebook/deit-{size}-patch16-224",
                variant,
                preprocess=PREPROCESS,
                family="deit",
                arch=(("family", "deit"),),
                description=f"DeiT-{variant[:-3]}, ImageNet-1k (Touvron et al. 2020)",
            )
            for size, variant in (("tiny", "Ti/16"), ("small", "S/16"), ("base", "B/16"))
        ),
    ),
)
