"""Read back what ``encode`` wrote: tensor names, shapes, dtypes, metadata and statistics.

Reads one ``.safetensors`` (through the safetensors library, numpy side) or ``.npy`` file of
either layout (``layouts/``), whatever it holds; ``vitembed.load`` reads embeddings back. Does not import torch, so it starts fast.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .errors import InputError, printable
from .tensors import bf16_tensor


def tensor_stats(array: np.ndarray, packed: bool = False) -> dict[str, Any]:
    """min, max, mean, std over finite values (float64 accumulation), NaN and Inf counts,
    and the L2 norm of token 0 (the first row; the whole vector for a 1-D array) of the
    embedding: with ``packed`` (a part file's (rows, ...) tensor), of its first row's.

    Values that cannot be computed (empty or non-numeric arrays, overflow) are None.
    """
    empty = dict.fromkeys(("min", "max", "mean", "std", "nan", "inf", "token0_l2"))
    if array.dtype.kind not in "biuf" or array.size == 0:
        return empty
    with np.errstate(all="ignore"):
        values = array.astype(np.float64, copy=False)
        finite = values[np.isfinite(values)]
        first = values[0] if packed else values
        first = first[0] if first.ndim >= 2 else first
        stats = {
            "min": finite.min() if finite.size else None,
            "max": finite.max() if finite.size else None,
            "mean": finite.mean() if finite.size else None,
            "std": finite.std() if finite.size else None,
            "nan": int(np.isnan(values).sum()),
            "inf": int(np.isinf(values).sum()),
            "token0_l2": np.sqrt(np.sum(first**2)) if first.size else None,
        }
    return {k: (float(v) if np.isfinite(v) else None) if isinstance(v, np.floating) else v for k, v in stats.items()}


def inspect_file(path: str | os.PathLike) -> dict[str, Any]:
    """Describe one output file.

    Returns:
        ``{"path", "format", "metadata": {str: str}, "tensors": [{"name", "shape",
        "dtype", "stats": {...}}]}``.

    Raises:
        InputError: missing file, or not a readable safetensors/npy file.
    """
    name = os.fspath(path)
    if not os.path.lexists(name):
        raise InputError(name, "not-found", "no such file")
    if os.path.isdir(name):
        raise InputError(name, "unreadable", "a folder: inspect_dir summarises it")
    if not os.path.isfile(name):
        raise InputError(name, "unreadable", "not a regular file")
    if os.path.basename(name) in ("vitembed.json", "index.jsonl", "failures.jsonl"):
        raise InputError(name, "unreadable", "a bookkeeping file of an output folder, not an output: "
                         "`vitembed inspect` the folder (with --key KEY for a row of a --pack folder)")
    try:
        if name.endswith(".npy"):
            array = np.load(name, allow_pickle=False, mmap_mode="r")
            tensors = [{"name": "embedding", "shape": list(array.shape), "dtype": str(array.dtype), "array": array}]
            fmt, metadata = "npy", {}
        else:
            from safetensors import safe_open

            tensors = []
            with safe_open(name, framework="numpy") as f:
                metadata = dict(f.metadata() or {})
                for key in f.keys():
                    sl = f.get_slice(key)
                    dtype = sl.get_dtype()
                    array = bf16_tensor(name, key) if dtype == "BF16" else f.get_tensor(key)
                    name_of = "bfloat16" if dtype == "BF16" else str(array.dtype)
                    tensors.append({"name": key, "shape": list(sl.get_shape()), "dtype": name_of, "array": array})
            fmt = "safetensors"
    except Exception as e:
        raise InputError(name, "unreadable", f"not a readable safetensors or npy file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    for t in tensors:
        t["stats"] = tensor_stats(np.asarray(t.pop("array")), packed=metadata.get("layout") == "packed" and "rows" in metadata)
    return {"path": printable(name), "format": fmt, "metadata": metadata, "tensors": tensors}


# The order metadata is shown in (the order encode writes it; other keys follow, sorted), and the
# keys whose values are numbers or flags: --json gives them as JSON numbers and booleans (the files
# keep strings, as safetensors metadata must).
METADATA_ORDER = (
    "source", "key", "part", "row", "format", "layout", "rows", "vitembed_version", "model", "family", "weights", "weights_sha256",
    "random_weights", "layer", "pool", "normalize", "tokens", "hidden_size", "depth", "num_heads", "mlp_dim", "mlp",
    "layer_norm_eps", "act", "prefix_tokens", "grid", "patch_size", "pos_embed", "image_size", "resize", "resize_size",
    "resize_backend", "max_num_patches", "crop", "crop_rounding", "crop_pct", "interpolation", "mean", "std", "dtype",
    "save_dtype", "compile", "background", "allow_truncated", "fast_decode",
)
NUMBER_KEYS = {"rows", "row", "tokens", "hidden_size", "depth", "num_heads", "mlp_dim", "layer_norm_eps", "prefix_tokens",
               "patch_size", "image_size", "resize_size", "max_num_patches", "crop_pct"}
FLAG_KEYS = {"random_weights", "crop", "compile", "allow_truncated", "normalize", "fast_decode"}


def typed_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """``metadata`` in ``METADATA_ORDER`` (then the other keys, sorted), with the values of
    ``NUMBER_KEYS`` as int or float and of ``FLAG_KEYS`` as bool where they parse (else left as text)."""
    rank = {k: i for i, k in enumerate(METADATA_ORDER)}
    ordered: dict[str, Any] = {}
    for key in sorted(metadata, key=lambda k: (rank.get(k, len(rank)), k)):
        value: Any = metadata[key]
        if key in NUMBER_KEYS and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                try:
                    value = float(value)
                except ValueError:
                    pass
        elif key in FLAG_KEYS and value in ("true", "false"):
            value = value == "true"
        ordered[key] = value
    return ordered


def inspect_dir(path: str | os.PathLike) -> dict[str, Any]:
    """Summarise an output folder: its layout, how many outputs it holds, the settings
    ``DIR/vitembed.json`` records, and one output's shape and dtype (per image).

    Returns:
        ``{"path", "kind": "folder", "layout": "files" | "packed" | None, "outputs", "parts"
        (packed only), "format", "shape", "dtype", "settings": {...} | None}``.

    Raises:
        InputError: not a folder, or a folder without outputs nor ``vitembed.json``.
    """
    from pathlib import Path

    from .layouts.files import _outputs_under
    from .layouts.packed_index import INDEX_FILE, PART_NAME, read_part, recover_parts, scan_index
    from .outdir import SETTINGS_FILE, read_dir_state

    folder, name = Path(path), os.fspath(path)
    settings = read_dir_state(folder, tolerate_bad=True).settings
    info: dict[str, Any] = {"path": printable(name), "kind": "folder", "layout": None, "outputs": 0, "format": None,
                            "shape": None, "dtype": None, "settings": settings}
    first = None
    if (folder / INDEX_FILE).exists() or any(PART_NAME.match(n) for n in os.listdir(folder)):
        latest = recover_parts(folder, *scan_index(folder), write=False)  # parts never indexed count too
        encoded = [e for e in latest.values() if e.get("status") == "encoded"]
        parts = sorted({e["part"] for e in encoded if isinstance(e.get("part"), str) and PART_NAME.match(e["part"])})
        present = [p for p in parts if read_part(folder / p).complete]
        info.update(layout="packed", outputs=len(encoded), failed=len(latest) - len(encoded), parts=len(present),
                    missing_parts=len(parts) - len(present), format="safetensors")
        first = folder / present[0] if present else None
    else:
        for count, file in enumerate(_outputs_under(folder), 1):
            first, info["outputs"] = first or file, count
        if first is not None:
            info.update(layout="files", format="npy" if first.suffix == ".npy" else "safetensors")
    if first is None and settings is None:
        raise InputError(name, "unreadable", f"no vitembed outputs here (no {SETTINGS_FILE}, part files or output files)")
    if first is not None and first.exists():
        tensor = inspect_file(first)["tensors"][0]
        info.update(shape=tensor["shape"][1:] if info["layout"] == "packed" else tensor["shape"], dtype=tensor["dtype"])
    return info


def inspect_row(folder: str | os.PathLike, key: str) -> dict[str, Any]:
    """One row of a packed folder, by its key in ``index.jsonl``: as ``inspect_file`` describes a
    file (the row's tensor and statistics; the part's metadata with this row's ``key`` and
    ``source`` in place of the part's lists).

    Raises:
        InputError: not a packed folder, an unknown key, or a part that cannot be read.
    """
    from pathlib import Path

    from .layouts.packed_index import PACK_TENSOR, PART_NAME, part_holds, read_part, recover_parts, scan_index

    name = os.fspath(folder)
    if not Path(folder).is_dir():
        raise InputError(name, "not-found", "--key reads a row of a --pack folder; this is not a folder")
    latest = recover_parts(Path(folder), *scan_index(Path(folder)), write=False)  # parts never indexed too
    if not latest:
        raise InputError(name, "not-found", "no packed outputs here (--key reads a row of a --pack folder)")
    entry = latest.get(key)
    if entry is None:
        raise InputError(name, "not-found", f"no row with key {key!r} in its index.jsonl")
    if entry.get("status") != "encoded":
        raise InputError(name, "not-found", f"{key!r} was not encoded: {entry.get('status', 'no status')} "
                         f"({entry.get('error_kind', '')}: {entry.get('error', '')})")
    part_name, row = entry.get("part"), entry.get("row")
    if not (isinstance(part_name, str) and PART_NAME.match(part_name)
            and part_holds(read_part(Path(folder) / part_name), row, key)):
        raise InputError(name, "unreadable", f"index.jsonl says {key!r} is row {row!r} of {part_name!r}, which does "
                         "not hold it; run the same encode again to redo it")
    part = Path(folder) / part_name
    info = inspect_file(part)
    try:
        from safetensors import safe_open

        from .tensors import bf16_tensor

        with safe_open(str(part), framework="numpy") as f:
            dtype = f.get_slice(PACK_TENSOR).get_dtype()
            array = bf16_tensor(str(part), PACK_TENSOR)[row] if dtype == "BF16" else f.get_slice(PACK_TENSOR)[row]
    except Exception as e:
        raise InputError(os.fspath(part), "unreadable", f"row {row}: {e}") from None
    metadata = {k: v for k, v in info["metadata"].items() if k not in ("keys", "sources", "rows")}
    metadata.update(key=key, source=str(entry.get("source", "")), part=entry["part"], row=str(row))
    tensor = {"name": PACK_TENSOR, "shape": list(array.shape), "dtype": info["tensors"][0]["dtype"],
              "stats": tensor_stats(np.asarray(array))}
    return {"path": printable(os.fspath(part)), "format": "safetensors", "metadata": metadata, "tensors": [tensor]}
