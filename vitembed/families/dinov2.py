"""DINOv2 (Oquab et al. 2023): facebook/dinov2-*, and with 4 registers (Darcet et al. 2023).

Architecture: the ViT with LayerScale in every block (``ls1``, ``ls2``); ViT-g has a SwiGLU MLP
(``weights_in`` holds the gate and the up projection, as timm's packed ``fc1``). Tokens: the class token,
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
# ViT-g/14 as DINOv2 trains it: width 1536, 24 heads, SwiGLU of 4096 (big_vision's "g" is 1408 wide).
GIANT = (("hidden_size", 1536), ("num_heads", 24), ("mlp_dim", 4096), ("mlp", "swiglu"))

TRANSFORMERS = CheckpointLayout(
    "transformers",
    renames=(
        (r"embeddings\.register_tokens", r"reg_token"),
        (r"encoder\.layer\.(\d+)\.norm1\.(weight|bias)", r"blocks.\1.norm1.\2"),
        (r"encoder\.layer\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm2.\2"),
        (r"encoder\.layer\.(\d+)\.mlp\.fc1\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
        (r"encoder\.layer\.(\d+)\.mlp\.fc2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        (r"encoder\.layer\.(\d+)\.mlp\.weights_in\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),  # SwiGLU: gate, then up
        (r"encoder\.layer\.(\d+)\.mlp\.weights_out\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        (r"encoder\.layer\.(\d+)\.layer_scale1\.lambda1", r"blocks.\1.ls1.gamma"),
        (r"encoder\.layer\.(\d+)\.layer_scale2\.lambda1", r"blocks.\1.ls2.gamma"),
    ),
)


class DINOv2(Family):
    def config_fields(self, hf: Mapping[str, Any], source: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
        swiglu = hf.get("use_swiglu_ffn", False)
        if not isinstance(swiglu, bool):
            raise CheckpointError(f"{source}: use_swiglu_ffn must be true or false (got {swiglu!r})")
        width, ratio = hf.get("hidden_size", 768), hf.get("mlp_ratio", 4)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (width, ratio))
        if not numbers or not (0 < width <= LIMITS["hidden_size"] and 0 < ratio <= 64):
            raise CheckpointError(
                f"{source}: hidden_size {width!r} and mlp_ratio {ratio!r} must be numbers, "
                f"at most {LIMITS['hidden_size']} and 64"
            )
        fields = {"family": "dinov2", "layer_scale": True,
                  "pos_embed_antialias": hf.get("model_type") == "dinov2_with_registers"}
        hidden = int(width * ratio)
        if swiglu:  # Dinov2SwiGLUFFN: two thirds of the MLP width, rounded up to a multiple of 8
            hidden, fields["mlp"] = swiglu_hidden(hidden), "swiglu"
        return {**hf, "intermediate_size": hidden}, fields

    def head_of(self, model: Any, tokens: Any, mask: Any = None) -> Any:
        """``pooler_output``: the class token of the normalised last tokens, (B, T, D) -> (B, D)."""
        return tokens[:, 0]


def swiglu_hidden(mlp_width: int) -> int:
    """DINOv2's SwiGLU hidden width for an MLP of ``mlp_width``: (int(2/3 * width) + 7) // 8 * 8
    (ViT-g: 6144 -> 4096)."""
    return (int(mlp_width * 2 / 3) + 7) // 8 * 8


FAMILY = DINOv2(
    name="dinov2",
    model_types=("dinov2", "dinov2_with_registers"),
    preprocess=PREPROCESS,
    preprocess_at_config_size=False,
    prefixes=("dinov2.",),
    layouts=(TRANSFORMERS,),
    head="the normalised class token, pooler_output (the same as --pool cls)",
    reference_pooled=(("cls", "pooler_output"), ("head", "pooler_output")),
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
    )
    + tuple(
        ModelSpec(
            f"dinov2{'-with-registers' if regs else ''}-giant",
            f"facebook/dinov2{'-with-registers' if regs else ''}-giant",
            "g/14",
            layer_norm_eps=1e-6,
            preprocess=PREPROCESS,
            family="dinov2",
            arch=ARCH + GIANT + ((("reg_tokens", 4), ("pos_embed_antialias", True)) if regs else ()),
            description=f"DINOv2 ViT-g/14{' with 4 registers' if regs else ''}, SwiGLU MLP (Oquab et al. 2023)",
        )
        for regs in (False, True)
    ),
)
