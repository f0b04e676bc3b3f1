"""DINOv3 (Siméoni et al. 2025): facebook/dinov3-vit*16-pretrain-lvd1689m, through transformers'
``DINOv3ViTModel``, or the original facebookresearch/dinov3 ``.pth`` weights.

Architecture: patch 16, the class token, 4 register tokens, then the patches (201 tokens at 224);
no learned position embedding: 2-D rotary embeddings (``rope``) rotate the patch tokens' queries
and keys in every block, computed for the input's grid, so any multiple of 16 works without
resampling anything. LayerScale in every block, no key bias (a zero bias in the fused ``qkv``),
GELU MLP for S, B and L, SwiGLU for S+, H+ and 7B; the final LayerNorm on every token. ``last`` is
``last_hidden_state``; ``cls`` (and ``head``) its class token, ``pooler_output``; ``mean`` and
``patch`` leave out the class token and the registers.

Preprocessing as ``DINOv3ViTImageProcessor``: rescale to [0, 1], then resize to 224x224 bilinear
with antialiasing on float tensors, then ImageNet mean/std (``PreprocessConfig.backend = "torch"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..preprocess_config import PreprocessConfig
from ..errors import CheckpointError
from .base import CheckpointLayout, Family, ModelSpec

PREPROCESS = PreprocessConfig(image_size=224, resize="squash", interpolation="bilinear", backend="torch",
                              mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
ARCH = (("layer_scale", True), ("rope", True), ("reg_tokens", 4), ("family", "dinov3"))
SWIGLU = (("mlp", "swiglu"),)

# transformers DINOv3ViTModel, as save_pretrained writes it.
TRANSFORMERS_DINOV3 = CheckpointLayout(
    "transformers-dinov3",
    telltale=r"layer\.\d+\.attention\.q_proj\.weight",
    renames=(
        (r"embeddings\.cls_token", r"cls_token"),
        (r"embeddings\.register_tokens", r"reg_token"),
        (r"embeddings\.patch_embeddings\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"layer\.(\d+)\.norm(1|2)\.(weight|bias)", r"blocks.\1.norm\2.\3"),
        (r"layer\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
        (r"layer\.(\d+)\.attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (r"layer\.(\d+)\.layer_scale(1|2)\.lambda1", r"blocks.\1.ls\2.gamma"),
        (r"layer\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)", r"blocks.\1.mlp.fc1.\2.\3"),
        (r"layer\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        (r"norm\.(weight|bias)", r"norm.\1"),
    ),
    unused=(r"embeddings\.mask_token", r"rope_embeddings\..*"),
)

# The original facebookresearch/dinov3 weights (timm-like names; SwiGLU's w1, w2, w3).
ORIGINAL = CheckpointLayout(
    "dinov3",
    telltale=r"storage_tokens",
    renames=(
        (r"cls_token", r"cls_token"),
        (r"storage_tokens", r"reg_token"),
        (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"blocks\.(\d+)\.norm(1|2)\.(weight|bias)", r"blocks.\1.norm\2.\3"),
        (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias|bias_mask)", r"blocks.\1.attn.qkv.\2"),
        (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (r"blocks\.(\d+)\.ls(1|2)\.gamma", r"blocks.\1.ls\2.gamma"),
        (r"blocks\.(\d+)\.mlp\.fc(1|2)\.(weight|bias)", r"blocks.\1.mlp.fc\2.\3"),
        (r"blocks\.(\d+)\.mlp\.w1\.(weight|bias)", r"blocks.\1.mlp.fc1.gate.\2"),
        (r"blocks\.(\d+)\.mlp\.w2\.(weight|bias)", r"blocks.\1.mlp.fc1.up.\2"),
        (r"blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        (r"norm\.(weight|bias)", r"norm.\1"),
    ),
    unused=(r"mask_token", r"rope_embed\..*"),
)


class DINOv3(Family):
    def config_fields(self, hf: Mapping[str, Any], source: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
        flags = {name: hf.get(name, default) for name, default in
                 (("query_bias", True), ("key_bias", False), ("value_bias", True), ("proj_bias", True),
                  ("mlp_bias", True), ("use_gated_mlp", False))}
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise CheckpointError(f"{source}: {name} must be true or false (got {value!r})")
        if flags["query_bias"] != flags["value_bias"] or not flags["proj_bias"] or not flags["mlp_bias"]:
            raise CheckpointError(f"{source}: DINOv3 with query_bias != value_bias, or without proj_bias or "
                                  "mlp_bias, is not supported")
        gated = flags["use_gated_mlp"]
        if gated and hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: a gated MLP with hidden_act {hf.get('hidden_act')!r} is not supported")
        theta = hf.get("rope_theta", 100.0)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)):
            raise CheckpointError(f"{source}: rope_theta must be a number (got {theta!r})")
        fields = {"family": "dinov3", "layer_scale": True, "rope": True, "rope_theta": float(theta),
                  "mlp": "swiglu" if gated else "mlp"}
        return {**hf, "qkv_bias": flags["query_bias"]}, fields

    def head_of(self, model: Any, tokens: Any, mask: Any = None) -> Any:
        """``pooler_output``: the class token of the normalised last tokens, (B, T, D) -> (B, D)."""
        return tokens[:, 0]


def _models() -> tuple[ModelSpec, ...]:
    # (name, variant, ViTConfig overrides); facebook/dinov3-<name>-pretrain-lvd1689m.
    table = (
        ("vits16", "S/16", ()),
        ("vits16plus", "S+/16", SWIGLU),
        ("vitb16", "B/16", ()),
        ("vitl16", "L/16", ()),
        ("vith16plus", "H+/16", SWIGLU),
        ("vit7b16", "7B/16", (("qkv_bias", False),) + SWIGLU),
    )
    return tuple(
        ModelSpec(f"dinov3-{name}", f"facebook/dinov3-{name}-pretrain-lvd1689m", variant, layer_norm_eps=1e-5,
                  preprocess=PREPROCESS, family="dinov3", arch=ARCH + extra,
                  description=f"DINOv3 ViT-{variant} (Siméoni et al. 2025), 4 registers, RoPE"
                              f"{', SwiGLU' if extra else ''}")
        for name, variant, extra in table
    )


FAMILY = DINOv3(
    name="dinov3",
    model_types=("dinov3_vit",),
    preprocess=PREPROCESS,
    layouts=(TRANSFORMERS_DINOV3, ORIGINAL),
    head="the normalised class token, pooler_output (the same as --pool cls)",
    reference_pooled=(("cls", "pooler_output"), ("head", "pooler_output")),
    models=_models(),
)
