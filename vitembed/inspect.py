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
    if not os.path.isfile(name):
        raise InputError(name, "unreadable", "not a regular file")
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
