"""SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training") and the fixed-resolution
SigLIP 2 (Tschannen et al. 2025): google/siglip-* and google/siglip2-*-patchNN-RES, through
transformers' ``SiglipVisionModel`` (or the image tower of a whole ``SiglipModel``).

Architecture: the ViT without a class token (B/16 at 224: 196 tokens, all patches), a learned
position embedding of the patches, tanh-GELU, the final LayerNorm (``post_layernorm``) on every
token, then a multi-head attention-pooling head (MAP, ``attn_pool``) whose output is the SigLIP
image embedding (``pooler_output``). So ``last`` is ``last_hidden_state``, ``--pool head`` the
image embedding, ``--pool mean`` the mean of the patch tokens; ``--pool cls`` is refused.

Weights: transformers' layout (its encoder keys are CLIP's, ``encoder.layers.N.self_attn.*``; the
head's ``attention.in_proj_*`` is split into ``q`` and ``kv``) and timm's ``vit_*_siglip_*``
(``attn_pool.*``, already vitembed's names).

SigLIP 2 NaFlex (``Siglip2VisionModel``, google/siglip2-*-patch16-naflex): the image keeps its
aspect ratio, resized to at most ``max_num_patches`` patches (256 by default), its patches embedded
by a linear layer; the learned 16x16 position grid is resized bilinearly with antialiasing to each
image's grid, and the padding of a batch is masked in attention and in the MAP head. Each image has
its own token count: per-image outputs record their ``grid``; ``--pack`` takes pooled vectors only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..preprocess_config import PreprocessConfig
from ..errors import CheckpointError
from .base import CheckpointLayout, Family, ModelSpec


def preprocess(image_size: int) -> PreprocessConfig:
    """``SiglipImageProcessor``: squash-resize to the input size, bicubic, mean = std = 0.5."""
    return PreprocessConfig(image_size=image_size, resize="squash", interpolation="bicubic",
                            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


PREPROCESS = preprocess(224)
# Siglip2ImageProcessor: the aspect ratio kept, at most 256 patches of 16, bilinear, mean = std = 0.5.
NAFLEX = PreprocessConfig(image_size=256, resize="naflex", interpolation="bilinear", patch_size=16, max_num_patches=256,
                          mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
ARCH = (("class_token", False), ("pool_head", "map"), ("act", "gelu_tanh"), ("family", "siglip"))

# Added to the CLIP-style transformers layout (families/clip.py): the patch bias and the MAP head.
TRANSFORMERS_SIGLIP = CheckpointLayout(
    "transformers-clip",
    renames=(
        (r"embeddings\.patch_embedding\.bias", r"patch_embed.proj.bias"),
        (r"head\.probe", r"attn_pool.latent"),
        (r"head\.attention\.in_proj_(weight|bias)", r"attn_pool.in_proj.\1"),
        (r"head\.attention\.out_proj\.(weight|bias)", r"attn_pool.proj.\1"),
        (r"head\.layernorm\.(weight|bias)", r"attn_pool.norm.\1"),
        (r"head\.mlp\.(fc1|fc2)\.(weight|bias)", r"attn_pool.mlp.\1.\2"),
    ),
    unused=(r"logit_bias",),
)


class SigLIP(Family):
    def config_fields(self, hf: Mapping[str, Any], source: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
        naflex = hf.get("model_type") in ("siglip2", "siglip2_vision_model")
        if hf.get("model_type") in ("siglip", "siglip2"):  # a whole SiglipModel / Siglip2Model: its image tower
            if not isinstance(hf.get("vision_config"), dict):
                raise CheckpointError(f"{source}: a {hf.get('model_type')} config without a vision_config is not supported")
            hf = hf["vision_config"]
        head = hf.get("vision_use_head", True)
        if not isinstance(head, bool):
            raise CheckpointError(f"{source}: vision_use_head must be true or false (got {head!r})")
        fields = {"family": "siglip", "class_token": False, "pool_head": "map" if head else "none", "naflex": naflex}
        if naflex:  # a learned square grid of num_patches positions, resized to each image's grid
            patches, patch = hf.get("num_patches", 256), hf.get("patch_size", 16)
            side = math.isqrt(patches) if isinstance(patches, int) and patches > 0 else 0
            if side * side != patches or not isinstance(patch, int):
                raise CheckpointError(f"{source}: num_patches {patches!r} is not a square number of patches")
            hf = {**hf, "image_size": side * patch}
        return hf, fields

    def check_pool(self, cfg: Any, how: str, layer: str = "last") -> None:
        if how == "head" and cfg.pool_head == "none":
            from ..errors import UsageError

            raise UsageError("--pool head: this SigLIP checkpoint has no attention-pooling head "
                             "(vision_use_head is false); use --pool mean")
        super().check_pool(cfg, how, layer)

    def head_of(self, model: Any, tokens: Any, mask: Any = None) -> Any:
        """The MAP head over the normalised last tokens (B, 196, D) -> (B, D): ``pooler_output``
        (NaFlex: the padding left out by ``mask``)."""
        return model.attn_pool(tokens, mask)


def _models() -> tuple[ModelSpec, ...]:
    entries = []
    # (generation, size, variant, patch, input sizes); the repositories are google/<name>.
    table = (
        ("siglip", "base", "B", 16, (224, 256, 384, 512)),
        ("siglip", "large", "L", 16, (256, 384)),
        ("siglip", "so400m", "So400m", 14, (224, 384)),
        ("siglip2", "base", "B", 16, (224, 256, 384, 512)),
        ("siglip2", "base", "B", 32, (256,)),
        ("siglip2", "large", "L", 16, (256, 384, 512)),
        ("siglip2", "so400m", "So400m", 14, (224, 384)),
        ("siglip2", "so400m", "So400m", 16, (256, 384, 512)),
        ("siglip2", "giant-opt", "g-opt", 16, (256, 384)),
    )
    for generation, size, width, patch, sizes in table:
        for side in sizes:
            name = f"{generation}-{size}-patch{patch}-{side}"
            paper = "SigLIP (Zhai et al. 2023)" if generation == "siglip" else "SigLIP 2 (Tschannen et al. 2025)"
            entries.append(ModelSpec(name, f"google/{name}", f"{width}/{patch}", image_size=side, layer_norm_eps=1e-6,
                                     preprocess=preprocess(side), family="siglip", arch=ARCH,
                                     description=f"{paper} ViT-{width}/{patch} at {side}, no class token; head = MAP"))
    for size, width in (("base", "B"), ("so400m", "So400m")):  # NaFlex: 256 patches by default, any aspect ratio
        name = f"siglip2-{size}-patch16-naflex"
        entries.append(ModelSpec(name, f"google/{name}", f"{width}/16", image_size=256, layer_norm_eps=1e-6,
                                 preprocess=NAFLEX, family="siglip", arch=ARCH + (("naflex", True),),
                                 description=f"SigLIP 2 ViT-{width}/16 NaFlex (Tschannen et al. 2025): aspect ratio "
                                             "kept, at most 256 patches; head = MAP"))
    entries.append(ModelSpec("siglip-so400m-patch16-256-i18n", "google/siglip-so400m-patch16-256-i18n", "So400m/16",
                             image_size=256, layer_norm_eps=1e-6, preprocess=preprocess(256), family="siglip",
                             arch=ARCH, description="SigLIP ViT-So400m/16 at 256, multilingual; head = MAP"))
    return tuple(entries)


FAMILY = SigLIP(
    name="siglip",
    model_types=("siglip_vision_model", "siglip", "siglip2_vision_model", "siglip2"),
    preprocess=PREPROCESS,
    prefixes=("vision_model.",),
    layouts=(TRANSFORMERS_SIGLIP,),
    head="the attention-pooling head's output, pooler_output",
    reference_pooled=(("head", "pooler_output"),),
    models=_models(),
)
