"""The model families vitembed knows, one module each, and the questions asked of them.

    vit      ViT (Dosovitskiy et al. 2020): google/vit-* and timm's augreg checkpoints
    deit     DeiT (Touvron et al. 2020), with and without the distillation token
    dino     DINO (Caron et al. 2021): a plain ViT with its own weights and preprocessing
    dinov2   DINOv2 (Oquab et al. 2023), with and without registers (Darcet et al. 2023)
    clip     CLIP's image tower (Radford et al. 2021), and its projection into the joint space
    dinov3   DINOv3 (Siméoni et al. 2025): registers, 2-D RoPE, SwiGLU for S+, H+ and 7B
    siglip   SigLIP (Zhai et al. 2023) and SigLIP 2 (Tschannen et al. 2025), fixed-resolution and NaFlex

A new family is one new module here, built like these, and one line in ``FAMILIES``.
Does not import torch at import time.
"""

from __future__ import annotations

from typing import Any

from ..config import ViTConfig
from ..errors import CheckpointError, UsageError
from . import clip, deit, dino, dinov2, dinov3, siglip, vit
from .base import POOLS, CheckpointLayout, Family, ModelSpec

FAMILIES: tuple[Family, ...] = (vit.FAMILY, deit.FAMILY, dino.FAMILY, dinov2.FAMILY, dinov3.FAMILY, clip.FAMILY, siglip.FAMILY)

__all__ = ["FAMILIES", "POOLS", "CheckpointLayout", "Family", "ModelSpec", "family_of", "config_from_transformers",
           "checkpoint_layouts", "checkpoint_prefixes"]


def family_of(cfg: ViTConfig) -> Family:
    """The family whose reference ``cfg`` follows (by ``cfg.family``; the plain ViT for any other)."""
    for family in FAMILIES:
        if family.name == cfg.family:
            return family
    return vit.FAMILY


def checkpoint_layouts() -> dict[str, CheckpointLayout]:
    """Every checkpoint layout with the renames and unused keys of all families merged, tell-tale
    keys in the order of ``FAMILIES`` (``convert.detect_format`` takes the first that matches)."""
    merged: dict[str, CheckpointLayout] = {}
    for family in FAMILIES:
        for layout in family.layouts:
            have = merged.get(layout.name, CheckpointLayout(layout.name))
            merged[layout.name] = CheckpointLayout(
                layout.name,
                have.telltale or layout.telltale,
                have.renames + layout.renames,
                have.unused + layout.unused,
                have.fallback or layout.fallback,
            )
    return merged


def checkpoint_prefixes() -> tuple[str, ...]:
    """The wrapper prefixes of every family's checkpoint keys (``vit.``, ``deit.``, ...)."""
    return tuple(p for family in FAMILIES for p in family.prefixes)


# transformers' hidden_act names -> ours.
_HF_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu",
           "silu": "silu", "swish": "silu"}


def config_from_transformers(hf: Any, source: str = "config.json") -> ViTConfig:
    """Config from a transformers config.json dict (``ViTConfig``, ``DeiTConfig``, ``Dinov2Config``,
    ``CLIPVisionConfig`` or a whole ``CLIPConfig``): the family of its ``model_type`` maps its own
    fields (``Family.config_fields``), the fields every family shares are read here.

    Raises:
        CheckpointError: naming ``source``: a ``model_type`` no family reads, or settings
            vitembed does not implement.
    """
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type", "vit")
    family = next((f for f in FAMILIES if model_type in f.model_types), None)
    if family is None:
        known = [t for f in FAMILIES for t in f.model_types]
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported (expected one of {', '.join(known)})")
    hf, fields = family.config_fields(hf, source)
    act = hf.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in _HF_ACT:
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported")

    def _int(value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise CheckpointError(f"{source}: {name} must be an integer (got {value!r})")
        return int(value)

    def side(value: Any, name: str) -> int:
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise CheckpointError(f"{source}: non-square {name} {value} is not supported")
            value = value[0]
        return _int(value, name)

    def _number(value: Any, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"{source}: {name} must be a number (got {value!r})")
        return float(value)

    def _flag(value: Any, name: str) -> bool:
        if not isinstance(value, bool):
            raise CheckpointError(f"{source}: {name} must be true or false (got {value!r})")
        return value

    try:
        return ViTConfig(
            hidden_size=_int(hf["hidden_size"], "hidden_size"),
            depth=_int(hf["num_hidden_layers"], "num_hidden_layers"),
            num_heads=_int(hf["num_attention_heads"], "num_attention_heads"),
            mlp_dim=_int(hf["intermediate_size"], "intermediate_size"),
            patch_size=side(hf.get("patch_size", 16), "patch_size"),
            image_size=side(hf.get("image_size", 224), "image_size"),
            num_channels=_int(hf.get("num_channels", 3), "num_channels"),
            layer_norm_eps=_number(hf.get("layer_norm_eps", 1e-12), "layer_norm_eps"),
            qkv_bias=_flag(hf.get("qkv_bias", True), "qkv_bias"),
            act=_HF_ACT[act],
            reg_tokens=_int(hf.get("num_register_tokens") or 0, "num_register_tokens"),
            **fields,
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    except UsageError as e:
        raise CheckpointError(f"{source}: {e}") from None
