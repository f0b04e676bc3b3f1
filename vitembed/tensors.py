"""Reading one tensor of a safetensors file as numpy, bfloat16 included (numpy has none).

Used by the layouts' readers and by ``inspect``; kept apart so that ``vitembed inspect`` starts
without importing the layouts. Does not import torch.
"""

from __future__ import annotations

import json
import struct

import numpy as np


def bf16_tensor(path: str, name: str) -> np.ndarray:
    """A bfloat16 tensor of a safetensors file as float32 (numpy has no bfloat16).

    Layout per the safetensors format: u64 little-endian header length, JSON
    header with ``data_offsets`` relative to the end of the header, then the data.
    """
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(length))[name]
        begin, end = info["data_offsets"]
        f.seek(8 + length + begin)
        raw = np.frombuffer(f.read(end - begin), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def load_tensor(path: str, name: str) -> np.ndarray:
    """One tensor of a safetensors file as a numpy array; bfloat16 becomes float32 (exactly)."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        if f.get_slice(name).get_dtype() != "BF16":
            return f.get_tensor(name)
    return bf16_tensor(path, name)
