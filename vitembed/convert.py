"""Checkpoint conversion: pure functions from a source state dict to vitembed's (timm's) names.

As timm's ``checkpoint_filter_fn``: the source format is detected from tell-tale
keys (the tables are the families' own, ``families/<name>.py``), wrapper prefixes are stripped, keys are renamed by tables kept as data,
q/k/v projections are fused into one ``qkv``, and the parts vitembed does not use
(classifier heads, the pooler, the mask token) are recognised and dropped.
Anything else that does not fit is an error naming the first mismatching key:
nothing is silently left at its initial value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from .errors import CheckpointError
from .families import checkpoint_layouts, checkpoint_prefixes

# Wrappers added by DataParallel/DDP, torch.compile and Lightning modules; the families add their
# own (``vit.``, ``deit.``, ``dinov2.``, ``vision_model.``: ViTFor*, DeiTFor*, CLIPModel).
GENERIC_PREFIXES = ("module.", "_orig_mod.", "model.")
PREFIXES = GENERIC_PREFIXES + checkpoint_prefixes()

# Layout name -> its renames, unused keys and tell-tale key, merged from every family's tables.
LAYOUTS = checkpoint_layouts()
RENAMES: dict[str, list[tuple[str, str]]] = {name: list(layout.renames) for name, layout in LAYOUTS.items()}
UNUSED: dict[str, list[str]] = {name: list(layout.unused) for name, layout in LAYOUTS.items()}
# Tell-tales in the order of FAMILIES, the fallback layouts (timm's names, which others share) last.
TELLTALES: list[tuple[str, str]] = [
    (name, layout.telltale)
    for name, layout in sorted(LAYOUTS.items(), key=lambda item: item[1].fallback)
    if layout.telltale
]


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``, ``vit.``, ``model.``) from every key that has them."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def detect_format(state_dict: Mapping[str, Any], source: str = "checkpoint") -> str:
    """Name of the source format (a key of ``RENAMES``), from the first tell-tale key found.

    Raises:
        CheckpointError: no known format's tell-tale key is present.
    """
    for name, pattern in TELLTALES:
        if any(re.fullmatch(pattern, key) for key in state_dict):
            return name
    first = next(iter(state_dict), "<empty>")
    raise CheckpointError(
        f"{source}: not a ViT checkpoint in a known layout (transformers ViTModel, DeiTModel, CLIPVisionModel, "
        f"or timm); first key is {first!r}"
    )


def _parts(state_dict: dict[str, Any], pattern: str, target: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Split off the keys that fully match ``pattern`` (its group 2 names the part): (the other
    keys, {fused key (``target`` expanded from the match): {part: tensor}})."""
    out: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        m = re.fullmatch(pattern, key)
        if m:
            parts.setdefault(m.expand(target), {})[m.group(2)] = value
        else:
            out[key] = value
    return out, parts


def _fuse_qkv(state_dict: dict[str, Any], source: str) -> dict[str, Any]:
    """Concatenate ``blocks.N.attn.{q,k,v}.*`` into ``blocks.N.attn.qkv.*`` (rows q, then k, then v).

    A key projection without a bias beside q and v biases (DINOv3's ``key_bias=False``) gets a
    zero bias: the same function, in the fused layout.
    """
    import torch

    out, parts = _parts(state_dict, r"(blocks\.\d+\.attn)\.([qkv])\.(weight|bias)", r"\1.qkv.\3")
    for key, qkv in parts.items():
        if key.endswith(".bias") and "k" not in qkv and "q" in qkv:
            qkv["k"] = torch.zeros_like(qkv["q"])
        missing = [p for p in "qkv" if p not in qkv]
        if missing:
            raise CheckpointError(f"{source}: {key} lacks its {missing[0]} projection")
        out[key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


def _fuse_gated_mlp(state_dict: dict[str, Any], source: str) -> dict[str, Any]:
    """``blocks.N.mlp.fc1.{gate,up}.*`` -> ``blocks.N.mlp.fc1.*``: the up projection alone (a plain
    MLP that names its first layer ``up_proj``, as DINOv3's), or gate rows then up rows (a SwiGLU
    MLP, as timm's ``SwiGLUPacked`` keeps them)."""
    import torch

    out, parts = _parts(state_dict, r"(blocks\.\d+\.mlp\.fc1)\.(gate|up)\.(weight|bias)", r"\1.\3")
    for key, fc1 in parts.items():
        if "up" not in fc1:
            raise CheckpointError(f"{source}: {key} has a gate projection without its up projection")
        out[key] = torch.cat([fc1["gate"], fc1["up"]], dim=0) if "gate" in fc1 else fc1["up"]
    return out


def _apply_bias_masks(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Multiply each ``X.bias`` by its ``X.bias_mask`` and drop the masks (the original DINOv3's
    ``LinearKMaskedBias``, whose key bias is masked to zero)."""
    out = {k: v for k, v in state_dict.items() if not k.endswith(".bias_mask")}
    for key, mask in state_dict.items():
        if key.endswith(".bias_mask") and key[: -len("_mask")] in out:
            bias = out[key[: -len("_mask")]]
            out[key[: -len("_mask")]] = bias * mask.to(bias.dtype)
    return out


def _split_in_proj(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Split ``attn_pool.in_proj.*`` (nn.MultiheadAttention's fused q, k, v rows, as SigLIP's
    transformers head keeps them) into timm's ``attn_pool.q.*`` (the first third) and
    ``attn_pool.kv.*`` (the rest)."""
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"attn_pool\.in_proj\.(weight|bias)", key)
        if m:
            width = value.shape[0] // 3
            out[f"attn_pool.q.{m.group(1)}"], out[f"attn_pool.kv.{m.group(1)}"] = value[:width], value[width:]
        else:
            out[key] = value
    return out


def convert_state_dict(state_dict: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """Any supported checkpoint layout -> vitembed/timm parameter names.

    Args:
        state_dict: name -> tensor, as read from the file.
        source: file name used in error messages.

    Returns:
        A new dict with timm names (``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``, ...);
        unused parts (heads, pooler, mask token) are dropped.

    Raises:
        CheckpointError: unknown layout, or a key the layout's table does not know.
    """
    sd = strip_prefixes(state_dict)
    fmt = detect_format(sd, source)
    unused = [re.compile(p) for p in UNUSED[fmt]]
    table = [(re.compile(p), r) for p, r in RENAMES[fmt]]
    out: dict[str, Any] = {}
    for key, value in sd.items():
        if any(p.fullmatch(key) for p in unused):
            continue
        if table:
            for pattern, replacement in table:
                if pattern.fullmatch(key):
                    key = pattern.sub(replacement, key)
                    break
            else:
                raise CheckpointError(f"{source}: unexpected key {key!r} in a {fmt} checkpoint")
        out[key] = value
    if "reg_token" in out and out["reg_token"].dim() == 3 and out["reg_token"].shape[1] == 0:
        del out["reg_token"]  # DINOv3 without registers still saves an empty (1, 0, D) parameter
    # CLIP keeps the class token as (D,), CLIP and SigLIP the position embedding as a (T, D) table.
    if "cls_token" in out and out["cls_token"].dim() == 1:
        out["cls_token"] = out["cls_token"].reshape(1, 1, -1)
    if "pos_embed" in out and out["pos_embed"].dim() == 2:
        out["pos_embed"] = out["pos_embed"].unsqueeze(0)
    return _split_in_proj(_fuse_gated_mlp(_fuse_qkv(_apply_bias_masks(out), source), source))


def check_converted(model: Any, state_dict: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Check an already converted state dict against ``model``'s parameters, without loading it.

    Every parameter of the model must be present with its exact shape and a floating-point
    dtype, and no extra key may remain. Only shapes are read, so ``model`` may live on the
    ``meta`` device (built without memory).

    Raises:
        CheckpointError: naming the first missing key, unexpected key, shape mismatch or
            integer / bool tensor.
    """
    expected = model.state_dict()
    for key, param in expected.items():
        if key not in state_dict:
            raise CheckpointError(f"{source}: missing key {key!r} (the checkpoint does not fit this architecture)")
        got = tuple(state_dict[key].shape)
        if got != tuple(param.shape):
            raise CheckpointError(
                f"{source}: key {key!r} has shape {list(got)}, the architecture expects {list(param.shape)}"
            )
        value = state_dict[key]
        if param.is_floating_point() and not (value.is_floating_point() and not value.is_complex()):
            raise CheckpointError(f"{source}: key {key!r} holds {str(value.dtype).removeprefix('torch.')} values, "
                                  "a floating-point tensor is expected")
    for key in state_dict:
        if key not in expected:
            raise CheckpointError(f"{source}: unexpected key {key!r} (the checkpoint does not fit this architecture)")


def load_converted(model: Any, state_dict: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Load an already converted state dict into ``model``, strictly (``check_converted`` first);
    tensors are cast to the model's dtype.

    Raises:
        CheckpointError: naming the first missing key, unexpected key or shape mismatch.
    """
    check_converted(model, state_dict, source)
    model.load_state_dict(dict(state_dict), strict=True)


def resample_pos_embed(
    pos_embed: Any,
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> Any:
    """Resample a learned position embedding to another patch grid, as timm's ``resample_abs_pos_embed``.

    The prefix tokens' (class, distillation, register) embeddings are kept; the
    square grid of patch embeddings is interpolated in float32 with
    ``F.interpolate(mode=interpolation, antialias=antialias, align_corners=False)``
    (antialiasing only matters when shrinking).

    Args:
        pos_embed: (1, num_prefix_tokens + h * w, D) tensor with h == w.
        new_grid: (H, W) patches of the new input size.

    Returns:
        (1, num_prefix_tokens + H * W, D) tensor in the input's dtype; the input
        itself when the grid is unchanged.

    Raises:
        CheckpointError: the patch part is not a square grid.
    """
    import torch
    import torch.nn.functional as F

    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side = math.isqrt(grid.shape[1])
    if side * side != grid.shape[1]:
        raise CheckpointError(f"pos_embed has {grid.shape[1]} patch positions, not a square grid")
    if (side, side) == tuple(new_grid):
        return pos_embed
    dim = grid.shape[-1]
    image = grid.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, h, w)
    image = F.interpolate(image, size=tuple(new_grid), mode=interpolation, antialias=antialias, align_corners=False)
    grid = image.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)  # (1, H * W, D)
    return torch.cat([prefix, grid], dim=1)


def embed_class_positions(state_dict: dict[str, Any], num_prefix_tokens: int) -> dict[str, Any]:
    """Give a ``no_embed_class`` position embedding zero rows for its prefix tokens.

    timm's ``no_embed_class`` models (e.g. its DINOv2-with-registers) keep position
    embeddings for the patches only, the class token's folded into ``cls_token``;
    adding zeros for the prefix tokens is then exactly the same model in
    vitembed's layout, where ``pos_embed`` covers class (and distillation) token
    and patches. A position embedding whose patch count is not a square after
    removing the prefix rows, but is one without, is taken to be of that kind.
    """
    import torch

    pos = state_dict.get("pos_embed")
    if pos is None or pos.dim() != 3:
        return state_dict
    n = pos.shape[1]
    with_prefix = n - num_prefix_tokens
    if with_prefix > 0 and math.isqrt(with_prefix) ** 2 == with_prefix:
        return state_dict
    if math.isqrt(n) ** 2 != n:
        return state_dict
    zeros = torch.zeros(1, num_prefix_tokens, pos.shape[2], dtype=pos.dtype)
    return {**state_dict, "pos_embed": torch.cat([zeros, pos], dim=1)}
