"""Known model names: architecture, reference preprocessing and Hub repository of each.

Each entry ties a checkpoint to the preprocessing its reference uses (transformers'
image processor config for the repository), so that embeddings match the
reference. Does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import PreprocessConfig, ViTConfig
from .errors import UsageError

DEFAULT_MODEL = "vit-base-patch16-224-in21k"


@dataclass(frozen=True)
class ModelSpec:
    """One catalog entry.

    Attributes:
        name: vitembed's name for it (``--model``).
        repo: Hugging Face repository the weights come from.
        variant: big_vision-style architecture name (``"B/16"``).
        image_size: input side in pixels.
        layer_norm_eps: LayerNorm epsilon of the reference implementation.
        preprocess: the reference preprocessing.
        description: one line for ``vitembed models``.
        family: ``vit`` or ``deit``.
        dist_token: the checkpoint has DeiT's distillation token (198 tokens at 224/16).
    """

    name: str
    repo: str
    variant: str
    image_size: int = 224
    layer_norm_eps: float = 1e-12
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    description: str = ""
    family: str = "vit"
    dist_token: bool = False

    def config(self) -> ViTConfig:
        """The architecture of this entry."""
        return ViTConfig.from_variant(
            self.variant, image_size=self.image_size, layer_norm_eps=self.layer_norm_eps, dist_token=self.dist_token
        )


# google/vit-*: transformers ViTImageProcessor, squash-resize 224 bilinear, mean = std = 0.5.
_GOOGLE = PreprocessConfig(image_size=224, resize="squash", interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)

# facebook/deit-*: transformers DeiTImageProcessor, squash-resize to 256 bicubic, centre crop 224,
# ImageNet mean/std (Touvron et al. 2020).
_DEIT = PreprocessConfig(
    image_size=224,
    resize="squash",
    resize_size=256,
    crop=True,
    interpolation="bicubic",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)

CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "vit-base-patch16-224-in21k",
            "google/vit-base-patch16-224-in21k",
            "B/16",
            preprocess=_GOOGLE,
            description="ViT-B/16 pre-trained on ImageNet-21k (Dosovitskiy et al. 2020)",
        ),
        ModelSpec(
            "vit-base-patch16-224",
            "google/vit-base-patch16-224",
            "B/16",
            preprocess=_GOOGLE,
            description="ViT-B/16 pre-trained on ImageNet-21k, fine-tuned on ImageNet-1k",
        ),
        *(
            ModelSpec(
                f"deit-{size}-distilled-patch16-224",
                f"facebook/deit-{size}-distilled-patch16-224",
                variant,
                preprocess=_DEIT,
                family="deit",
                dist_token=True,
                description=f"DeiT-{variant[:-3]} distilled: class + distillation token (Touvron et al. 2020)",
            )
            for size, variant in (("tiny", "Ti/16"), ("small", "S/16"), ("base", "B/16"))
        ),
        *(
            ModelSpec(
                f"deit-{size}-patch16-224",
                f"facebook/deit-{size}-patch16-224",
                variant,
                preprocess=_DEIT,
                family="deit",
                description=f"DeiT-{variant[:-3]}, ImageNet-1k (Touvron et al. 2020)",
            )
            for size, variant in (("tiny", "Ti/16"), ("small", "S/16"), ("base", "B/16"))
        ),
    ]
}


def get_model_spec(name: str) -> ModelSpec:
    """Catalog entry for ``name`` (vitembed name or its Hub repository id).

    Raises:
        UsageError: unknown name; the message lists the known ones.
    """
    if name in CATALOG:
        return CATALOG[name]
    for spec in CATALOG.values():
        if spec.repo == name:
            return spec
    raise UsageError(f"unknown model {name!r}; known models: {', '.join(CATALOG)}")
