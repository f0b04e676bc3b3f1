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
        family: ``vit``, ``deit``, ``dino``, ``dinov2`` or ``clip``.
        arch: ``ViTConfig`` fields that differ from the plain ViT (DeiT's
            ``dist_token``; CLIP's ``pre_norm``, ``final_norm``, ``patch_bias``, ``act``).
        source: ``transformers`` (the repository has a transformers config.json) or
            ``timm`` (only its weights are read; the architecture is this entry's).
    """

    name: str
    repo: str
    variant: str
    image_size: int = 224
    layer_norm_eps: float = 1e-12
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    description: str = ""
    family: str = "vit"
    arch: tuple[tuple[str, object], ...] = ()
    source: str = "transformers"

    def config(self) -> ViTConfig:
        """The architecture of this entry."""
        return ViTConfig.from_variant(
            self.variant, image_size=self.image_size, layer_norm_eps=self.layer_norm_eps, **dict(self.arch)
        )


# google/vit-*: transformers ViTImageProcessor, squash-resize 224 bilinear, mean = std = 0.5.
_GOOGLE = PreprocessConfig(image_size=224, resize="squash", interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)

# timm's pretrained_cfg for the augreg ViTs: bicubic, crop_pct 0.9 (resize the shorter side to
# floor(224 / 0.9) = 248, torchvision centre crop 224), mean = std = 0.5.
_TIMM_AUGREG = PreprocessConfig(
    image_size=224,
    resize="shortest",
    resize_size=248,
    crop=True,
    crop_rounding="round",
    crop_pct=0.9,
    interpolation="bicubic",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
)

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

# DINO v1 (Caron et al. 2021): resize the shorter side to 256 bicubic, centre crop 224, ImageNet
# mean/std, as its evaluation code does; timm LayerNorm eps 1e-6.
_DINO = PreprocessConfig(
    image_size=224,
    resize="shortest",
    resize_size=256,
    crop=True,
    interpolation="bicubic",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)

# facebook/dinov2-*: BitImageProcessor, shorter side 256 bicubic, centre crop 224, ImageNet mean/std.
# The checkpoints' position embedding is for 518x518 (37x37 patches); it is resampled to the 16x16 grid.
_DINOV2 = _DINO  # the same evaluation preprocessing as DINO v1
_DINOV2_ARCH = (("layer_scale", True), ("pos_embed_antialias", False), ("family", "dinov2"))

# openai/clip-vit-*: CLIPImageProcessor, shortest edge 224 bicubic, centre crop 224, CLIP mean/std.
_CLIP = PreprocessConfig(
    image_size=224,
    resize="shortest",
    resize_size=224,
    crop=True,
    interpolation="bicubic",
    mean=(0.48145466, 0.4578275, 0.40821073),
    std=(0.26862954, 0.26130258, 0.27577711),
)
_CLIP_ARCH = (
    ("patch_bias", False), ("pre_norm", True), ("final_norm", "pooled"), ("act", "quick_gelu"), ("family", "clip"),
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
        ModelSpec(
            "vit-large-patch16-224",
            "google/vit-large-patch16-224",
            "L/16",
            preprocess=_GOOGLE,
            description="ViT-L/16 pre-trained on ImageNet-21k, fine-tuned on ImageNet-1k",
        ),
        ModelSpec(
            "vit-base-patch32-224-in21k",
            "google/vit-base-patch32-224-in21k",
            "B/32",
            preprocess=_GOOGLE,
            description="ViT-B/32 pre-trained on ImageNet-21k (50 tokens)",
        ),
        *(
            ModelSpec(
                f"vit_{size}_patch{patch}_224.augreg_in21k",
                f"timm/vit_{size}_patch{patch}_224.augreg_in21k",
                variant,
                layer_norm_eps=1e-6,
                preprocess=_TIMM_AUGREG,
                source="timm",
                description=f"timm ViT-{variant} augreg, ImageNet-21k (big_vision weights converted by timm)",
            )
            for size, patch, variant in (("tiny", 16, "Ti/16"), ("small", 16, "S/16"), ("base", 16, "B/16"),
                                         ("base", 32, "B/32"), ("large", 16, "L/16"))
        ),
        *(
            ModelSpec(
                f"deit-{size}-distilled-patch16-224",
                f"facebook/deit-{size}-distilled-patch16-224",
                variant,
                preprocess=_DEIT,
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
                preprocess=_DEIT,
                family="deit",
                arch=(("family", "deit"),),
                description=f"DeiT-{variant[:-3]}, ImageNet-1k (Touvron et al. 2020)",
            )
            for size, variant in (("tiny", "Ti/16"), ("small", "S/16"), ("base", "B/16"))
        ),
        *(
            ModelSpec(
                f"dino-vit{size}",
                f"facebook/dino-vit{size}",
                variant,
                layer_norm_eps=1e-6,
                preprocess=_DINO,
                family="dino",
                description=f"DINO ViT-{variant}, self-supervised on ImageNet-1k (Caron et al. 2021)",
            )
            for size, variant in (("s16", "S/16"), ("b16", "B/16"))
        ),
        *(
            ModelSpec(
                f"dinov2{'-with-registers' if regs else ''}-{size}",
                f"facebook/dinov2{'-with-registers' if regs else ''}-{size}",
                variant,
                layer_norm_eps=1e-6,
                preprocess=_DINOV2,
                family="dinov2",
                arch=_DINOV2_ARCH + ((("reg_tokens", 4), ("pos_embed_antialias", True)) if regs else ()),
                description=f"DINOv2 ViT-{variant}{' with 4 registers' if regs else ''} (Oquab et al. 2023)",
            )
            for regs in (False, True)
            for size, variant in (("small", "S/14"), ("base", "B/14"), ("large", "L/14"))
        ),
        *(
            ModelSpec(
                f"clip-vit-{size}",
                f"openai/clip-vit-{size}",
                variant,
                layer_norm_eps=1e-5,
                preprocess=_CLIP,
                family="clip",
                arch=_CLIP_ARCH,
                description=f"CLIP ViT-{variant} image tower (Radford et al. 2021); last = pre-post-LayerNorm",
            )
            for size, variant in (("base-patch32", "B/32"), ("base-patch16", "B/16"), ("large-patch14", "L/14"))
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


# Preprocessing of a checkpoint directory without preprocessor_config.json, by its config's family.
FAMILY_PREPROCESS: dict[str, PreprocessConfig] = {"deit": _DEIT, "clip": _CLIP, "dinov2": _DINOV2}
