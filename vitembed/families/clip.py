"""CLIP's image tower (Radford et al. 2021): openai/clip-vit-*, through transformers'
``CLIPVisionModel`` (or the vision half of a whole ``CLIPModel``).

Architecture: no bias in the patch projection, a LayerNorm after the position embedding
(``pre_layrnorm`` -> ``norm_pre``), QuickGELU, and the final LayerNorm (``post_layernorm``)
applied to the pooled class token only. So ``last`` is the last block's output as its
``last_hidden_state`` has it (not normalised), and ``cls`` of ``last`` is the normalised class
token, its ``pooler_output``. ``head`` is that vector through the bias-free ``visual_projection``
(``head``): the image embedding in the space CLIP's text embeddings share
(``CLIPModel.get_image_features``); it needs a checkpoint that has the projection (a whole
``CLIPModel`` or a ``CLIPVisionModelWithProjection``). Tokens: the class token, then the patches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..preprocess_config import PreprocessConfig
from ..errors import CheckpointError, UsageError
from .base import CheckpointLayout, Family, ModelSpec

# CLIPImageProcessor: shortest edge 224 bicubic, centre crop 224, CLIP mean/std.
PREPROCESS = PreprocessConfig(
    image_size=224,
    resize="shortest",
    resize_size=224,
    crop=True,
    interpolation="bicubic",
    mean=(0.48145466, 0.4578275, 0.40821073),
    std=(0.26862954, 0.26130258, 0.27577711),
)
ARCH = (("patch_bias", False), ("pre_norm", True), ("final_norm", "pooled"), ("act", "quick_gelu"), ("family", "clip"))

TRANSFORMERS_CLIP = CheckpointLayout(
    "transformers-clip",
    telltale=r"encoder\.layers\.\d+\.self_attn\.q_proj\.weight",
    renames=(
        (r"embeddings\.class_embedding", r"cls_token"),
        (r"embeddings\.position_embedding\.weight", r"pos_embed"),
        (r"embeddings\.patch_embedding\.weight", r"patch_embed.proj.weight"),
        (r"pre_layrnorm\.(weight|bias)", r"norm_pre.\1"),
        (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"blocks.\1.norm1.\2"),
        (r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"blocks.\1.attn.q.\2"),
        (r"encoder\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"blocks.\1.attn.k.\2"),
        (r"encoder\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"blocks.\1.attn.v.\2"),
        (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"blocks.\1.norm2.\2"),
        (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
        (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        (r"post_layernorm\.(weight|bias)", r"norm.\1"),
        (r"visual_projection\.weight", r"head.weight"),
    ),
    unused=(r"embeddings\.position_ids", r"text_model\..*", r"text_projection\..*", r"logit_scale"),
)


class CLIP(Family):
    def config_fields(self, hf: Mapping[str, Any], source: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
        architectures = hf.get("architectures") or []
        if hf.get("model_type") == "clip":  # a whole CLIPModel: its image tower and visual_projection
            if not isinstance(hf.get("vision_config"), dict):
                raise CheckpointError(f"{source}: a CLIPModel config without a vision_config is not supported")
            projection, hf = hf.get("projection_dim", 512), hf["vision_config"]
        else:  # CLIPVisionModel has no projection; CLIPVisionModelWithProjection has
            with_projection = isinstance(architectures, list) and "CLIPVisionModelWithProjection" in architectures
            projection = hf.get("projection_dim", 512) if with_projection else 0
        if isinstance(projection, bool) or not isinstance(projection, int) or projection < 0:
            raise CheckpointError(f"{source}: projection_dim must be a non-negative integer (got {projection!r})")
        return hf, {"family": "clip", "patch_bias": False, "pre_norm": True, "final_norm": "pooled",
                    "proj_dim": projection}

    def check_pool(self, cfg: Any, how: str, layer: str = "last") -> None:
        if how == "head" and not cfg.proj_dim:
            raise UsageError(
                "--pool head: CLIP's image embedding needs visual_projection, which this checkpoint does not have "
                "(a CLIPVisionModel); give the whole CLIPModel checkpoint (or a CLIPVisionModelWithProjection), "
                "or use --pool cls for the unprojected pooled output"
            )
        super().check_pool(cfg, how, layer)

    def pooled_dim(self, cfg: Any, how: str) -> int:
        return cfg.proj_dim if how == "head" else cfg.hidden_size

    def pool(self, model: Any, tokens: Any, how: str, layer: str = "last", mask: Any = None) -> Any:
        """As ``Family.pool``, but ``cls`` of ``last`` is ``post_layernorm`` of the class token
        (the reference's ``pooler_output``)."""
        if how == "cls" and layer == "last":
            return model.norm(tokens[:, 0])
        return super().pool(model, tokens, how, layer, mask)

    def head_of(self, model: Any, tokens: Any, mask: Any = None) -> Any:
        """``visual_projection(post_layernorm(class token))``: (B, T, D) -> (B, proj_dim)."""
        return model.head(model.norm(tokens[:, 0]))


FAMILY = CLIP(
    name="clip",
    model_types=("clip_vision_model", "clip"),
    preprocess=PREPROCESS,
    prefixes=("vision_model.",),
    layouts=(TRANSFORMERS_CLIP,),
    head="visual_projection of the pooled class token, get_image_features",
    reference_pooled=(("cls", "pooler_output"), ("head", "image_features")),
    models=tuple(
        ModelSpec(
            f"clip-vit-{size}",
            f"openai/clip-vit-{size}",
            variant,
            layer_norm_eps=1e-5,
            preprocess=PREPROCESS,
            family="clip",
            arch=ARCH + (("proj_dim", projection),),
            description=f"CLIP ViT-{variant} image tower (Radford et al. 2021); head = projected, {projection}-d",
        )
        for size, variant, projection in (("base-patch32", "B/32", 512), ("base-patch16", "B/16", 512),
                                          ("large-patch14", "L/14", 768))
    ),
)
