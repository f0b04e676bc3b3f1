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
(``attn_pool.*``, already vitembed's names). SigLIP 2's NaFlex checkpoints (``Siglip2VisionModel``)
are another architecture, not read here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import PreprocessConfig
from ..errors import CheckpointError
from .base import CheckpointLayout, Family, ModelSpec


def preprocess(image_size: int) -> PreprocessConfig:
    """``SiglipImageProcessor``: squash-resize to the input size, bicubic, mean = std = 0.5."""
    return PreprocessConfig(image_size=image_size, resize="squash", interpolation="bicubic",
                            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


PREPROCESS = preprocess(224)
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
        if hf.get("model_type") == "siglip":  # a whole SiglipModel: its image tower
            if not isinstance(hf.get("vision_config"), dict):
                raise CheckpointError(f"{source}: a SiglipModel config without a vision_config is not supported")
            hf = hf["vision_config"]
        head = hf.get("vision_use_head", True)
        if not isinstance(head, bool):
            raise CheckpointError(f"{source}: vision_use_head must be true or false (got {head!r})")
        return hf, {"family": "siglip", "class_token": False, "pool_head": "map" if head else "none"}

    def check_pool(self, cfg: Any, how: str, layer: str = "last") -> None:
        if how == "head" and cfg.pool_head == "none":
            from ..errors import UsageError

            raise UsageError("--pool head: this SigLIP checkpoint has no attention-pooling head "
                             "(vision_use_head is false); use --pool mean")
        super().check_pool(cfg, how, layer)

    def head_of(self, model: Any, tokens: Any) -> Any:
        """The MAP head over the normalised last tokens (B, 196, D) -> (B, D): ``pooler_output``."""
        return model.attn_pool(tokens)


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
    entries.append(ModelSpec("siglip-so400m-patch16-256-i18n", "google/siglip-so400m-patch16-256-i18n", "So400m/16",
                             image_size=256, layer_norm_eps=1e-6, preprocess=preprocess(256), family="siglip",
                             arch=ARCH, description="SigLIP ViT-So400m/16 at 256, multilingual; head = MAP"))
    return tuple(entries)


FAMILY = SigLIP(
    name="siglip",
    model_types=("siglip_vision_model", "siglip"),
    preprocess=PREPROCESS,
    prefixes=("vision_model.",),
    layouts=(TRANSFORMERS_SIGLIP,),
    head="the attention-pooling head's output, pooler_output",
    reference_pooled=(("head", "pooler_output"),),
    models=_models(),
)
