"""DINOv2 (Oquab et al. 2023): facebook/dinov2-*, and with 4 registers (Darcet et al. 2023).

Architecture: the ViT with LayerScale in every block (``ls1``, ``ls2``). Tokens: the class token,
then for the register models 4 register tokens (inserted after the position embedding is added,
which covers the class token and patches only), then the patches. ``cls`` takes the class token;
``mean`` and ``patch`` leave out the class token and the registers.

The checkpoints' configs say 518x518 (37x37 patches); the reference evaluates at 224 (shorter
side 256 bicubic, centre crop 224, as DINO), so the position embedding is resampled to 16x16:
bicubic without antialiasing as transformers' ``Dinov2Model``, with it as
``Dinov2WithRegistersModel``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import LIMITS
from ..errors import CheckpointError
from .base import CheckpointLayout, Family, ModelSpec
from .dino import PREPROCESS

ARCH = (("layer_scale", True), ("pos_embed_antialias", False), ("family", "dinov2"))

TRANSFORMERS = CheckpointLayout(
    "transformers",
    renames=(
        (r"embeddings\.register_tokens", r"reg_token"),
        (r"encoder\.layer\.(\d+)\.norm1\.(weight|bias)", r"blocks.\1.norm1.\2"),
        (r"encoder\.layer\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm2.\2"),
        (r"encoder\.layer\.(\d+)\.mlp\.fc1\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
        (r"encoder\.layer\.(\d+)\.mlp\.fc2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        (r"encoder\.layer\.(\d+)\.layer_scale1\.lambda1", r"blocks.\1.ls1.gamma"),
        (r"encoder\.layer\.(\d+)\.layer_scale2\.lambda1", r"blocks.\1.ls2.gamma"),
    ),
)


class DINOv2(Family):
    def config_fields(self, hf: Mapping[str, Any], source: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
        if hf.get("use_swiglu_ffn"):
            raise CheckpointError(f"{source}: DINOv2 with a SwiGLU MLP (ViT-g) is not supported yet")
        width, ratio = hf.get("hidden_size", 768), hf.get("mlp_ratio", 4)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (width, ratio))
        if not numbers or not (0 < width <= LIMITS["hidden_size"] and 0 < ratio <= 64):
            raise CheckpointError(
                f"{source}: hidden_size {width!r} and mlp_ratio {ratio!r} must be numbers, "
                f"at most {LIMITS['hidden_size']} and 64"
            )
        fields = {"family": "dinov2", "layer_scale": True,
                  "pos_embed_antialias": hf.get("model_type") == "dinov2_with_registers"}
        return {**hf, "intermediate_size": int(width * ratio)}, fields


FAMILY = DINOv2(
    name="dinov2",
    model_types=("dinov2", "dinov2_with_registers"),
    preprocess=PREPROCESS,
    preprocess_at_config_size=False,
    prefixes=("dinov2.",),
    layouts=(TRANSFORMERS,),
    models=tuple(
        ModelSpec(
            f"dinov2{'-with-registers' if regs else ''}-{size}",
            f"facebook/dinov2{'-with-registers' if regs else ''}-{size}",
            variant,
            layer_norm_eps=1e-6,
            preprocess=PREPROCESS,
            family="dinov2",
            arch=ARCH + ((("reg_tokens", 4), ("pos_embed_antialias", True)) if regs else ()),
            description=f"DINOv2 ViT-{variant}{' with 4 registers' if regs else ''} (Oquab et al. 2023)",
        )
        for regs in (False, True)
        for size, variant in (("small", "S/14"), ("base", "B/14"), ("large", "L/14"))
    ),
)
