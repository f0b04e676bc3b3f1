"""The settings schema: the metadata every output carries, and what resume compares.

An output's metadata (a safetensors header; for npy, ``DIR/vitembed.json`` alone) says exactly
how it was made: the model and weights, the architecture, the preprocessing, the layer and
pooling, dtypes, how files were decoded, the format and layout. The outputs of one DIR share
one set of settings (``run_settings``: the metadata without the keys that may differ between
outputs); a run with other settings is refused (``settings_conflict``) unless it overwrites.
Does not import torch.
"""

from __future__ import annotations

from typing import Any

from . import __version__
from .errors import UsageError

# Metadata keys that may differ between outputs of one DIR: the input, the version, where the
# weights were read from (they are identified by their sha256, or by random_weights and seed), and
# --compile (the same function; results agree within float32 rounding, as across devices).
KEYS_NOT_COMPARED = ("source", "vitembed_version", "weights", "compile")


def encoder_metadata(encoder: Any) -> dict[str, str]:
    """What an ``Encoder`` does to an image, as string metadata (all but ``format``, ``layout``
    and ``source``, which the layout adds)."""
    w, cfg, pre, enc = encoder.weights, encoder.weights.config, encoder.weights.preprocess, encoder.encoding
    meta = {
        "vitembed_version": __version__,
        "model": encoder.model_name,
        "family": cfg.family,
        "weights": w.source,
        "weights_sha256": w.sha256,
        "random_weights": "true" if w.random else "false",
        "layer": enc.layer,
        "pool": enc.pool,
        "tokens": str(cfg.num_tokens),
        "hidden_size": str(cfg.hidden_size),
        "depth": str(cfg.depth),
        "num_heads": str(cfg.num_heads),
        "mlp_dim": str(cfg.mlp_dim),
        "layer_norm_eps": repr(cfg.layer_norm_eps),
        "act": cfg.act,
        "prefix_tokens": str(cfg.num_prefix_tokens),
        "grid": f"{cfg.grid_size}x{cfg.grid_size}",
        "patch_size": str(cfg.patch_size),
        "image_size": str(pre.image_size),
        "resize": pre.resize,
        "resize_size": str(pre.resize_to),
        "crop": "true" if pre.crop else "false",
        "crop_rounding": pre.crop_rounding,
        **({"crop_pct": repr(pre.crop_pct)} if pre.crop_pct is not None else {}),
        "interpolation": pre.interpolation,
        "mean": ",".join(repr(float(v)) for v in pre.mean),
        "std": ",".join(repr(float(v)) for v in pre.std),
        "dtype": encoder.dtype_name,
        "save_dtype": enc.save_dtype,
        "compile": "true" if encoder.compiled else "false",
        "background": ",".join(map(str, enc.background)),
        "allow_truncated": "true" if enc.allow_truncated else "false",
    }
    if cfg.naflex:  # each output records its own grid and token count
        meta.update(grid="naflex", tokens=f"<={pre.max_num_patches}", max_num_patches=str(pre.max_num_patches))
    if cfg.mlp != "mlp":  # gated (SwiGLU): act above is not used
        meta["mlp"] = cfg.mlp
    if cfg.rope:
        meta["pos_embed"] = "rope"
    if pre.backend != "pil":  # rescaled to float before the resize (DINOv3)
        meta["resize_backend"] = pre.backend
    if enc.normalize:
        meta["normalize"] = "l2"
    if enc.fast_decode:  # reduced JPEG decoding: a setting (compared on resume), absent when exact
        meta["fast_decode"] = "true"
    if w.random:
        meta["seed"] = str(w.seed)
    if w.overrides:
        meta["preprocess_overrides"] = ",".join(w.overrides)
    if w.trained_image_size and not cfg.rope:
        side = w.trained_image_size // cfg.patch_size
        meta["pos_embed_resampled_from"] = f"{side}x{side}"
    return meta


# NaFlex outputs: each image has its own grid and token count (the encoder's say "naflex").
PER_IMAGE_KEYS = ("grid", "tokens")


def run_settings(metadata: dict[str, str]) -> dict[str, str]:
    """The part of an output's metadata that must be equal across the outputs of one DIR."""
    per_image = PER_IMAGE_KEYS if metadata.get("resize") == "naflex" else ()
    return {k: v for k, v in metadata.items() if k not in KEYS_NOT_COMPARED and k not in per_image}


# keys written only when a setting is on (older outputs lack them): what their absence means, shown
ABSENT_MEANS = {"fast_decode": "false"}


def _differences(ours: dict[str, str], theirs: dict[str, str]) -> str:
    keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    shown_keys, rest = keys[:6], keys[6:]

    def shown(meta: dict[str, str], key: str) -> str:
        return repr(meta[key]) if key in meta else repr(ABSENT_MEANS.get(key, "<none>"))

    text = "; ".join(f"{k}: {shown(theirs, k)} there, {shown(ours, k)} now" for k in shown_keys)
    return text + (f"; and {len(rest)} more: {', '.join(rest)}" if rest else "")


def mixed_outputs(path: Any, ours: dict[str, str], theirs: dict[str, str]) -> UsageError:
    """The UsageError of a reader that finds outputs of two sets of settings under ``path``."""
    return UsageError(
        f"{path} holds outputs made with two sets of settings ({_differences(ours, theirs)}): an --overwrite "
        "that did not finish? Run the same encode again to finish it, or read the files one by one"
    )


def settings_conflict(where: str, ours: dict[str, str], theirs: dict[str, str]) -> UsageError:
    """The UsageError for outputs made with other settings, naming every key that differs."""
    return UsageError(
        f"{where} made with other settings ({_differences(ours, theirs)}); "
        "use --overwrite to re-encode, or another --out"
    )
