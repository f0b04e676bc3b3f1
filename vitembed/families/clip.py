"""CLIP's image tower (Radford et al. 2021): openai/clip-vit-*, through transformers'
``CLIPVisionModel`` (or the vision half of a whole ``CLIPModel``).

Architecture: no bias in the patch projection, a LayerNorm after the position embedding
(``pre_layrnorm`` -> ``norm_pre``), QuickGELU, and the final LayerNorm (``post_layernorm``)
applied to the pooled class token only. So ``last`` is the last block's output as its
``last_hidden_state`` has it (not normalised), and ``cls`` of ``last`` is the normalised class
token, its ``pooler_output``. Tokens: the class token, then the patches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import PreprocessConfig
from ..errors import CheckpointError
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
    ),
    unused=(r"embeddings\.position_ids", r"text_model\..*", r"visual_projection\..*", r"text_projection\..*",
            r"logit_scale"),
)


class CLIP(Family):
    def config_fields(self, hf: Mapping[str, Any], source: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
        if hf.get("model_type") == "clip":  # a whole CLIPModel: its image tower
            if not isinstance(hf.get("vision_config"), dict):
                raise CheckpointError(f"{source}: a CLIPModel config without a vision_config is not supported")
            hf = hf["vision_config"]
        return hf, {"family": "clip", "patch_bias": False, "pre_norm": True, "final_norm": "pooled"}

    def pool(self, model: Any, tokens: Any, how: str, layer: str = "last") -> Any:
        """As ``Family.pool``, but ``cls`` of ``last`` is ``post_layernorm`` of the class token
        (the reference's ``pooler_output``)."""
        if how == "cls" and layer == "last":
            return model.norm(tokens[:, 0])
        return super().pool(model, tokens, how, layer)


FAMILY = CLIP(
    name="clip",
    model_types=("clip_vision_model", "clip"),
    preprocess=PREPROCESS,
    prefixes=("vision_model.",),
    layouts=(TRANSFORMERS_CLIP,),
    models=tuple(
        ModelSpec(
            f"clip-vit-{size}",
            f"openai/clip-vit-{size}",
            variant,
            layer_norm_eps=1e-5,
            preprocess=PREPROCESS,
            family="clip",
            arch=ARCH,
            description=f"CLIP ViT-{variant} image tower (Radford et al. 2021); last = pre-post-LayerNorm",
        )
        for size, variant in (("base-patch32", "B/32"), ("base-patch16", "B/16"), ("large-patch14", "L/14"))
    ),
)
