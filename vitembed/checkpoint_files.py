"""Reading checkpoint files: safetensors (tensor by tensor, not memory-mapped), torch pickles
(``weights_only=True``), sharded checkpoints (an ``*.index.json`` and its shards, the transformers
format), their JSON, and the sha256 that identifies them in the metadata.

    read_state_dict       a file or a shard index -> {key: tensor}, as stored
    checkpoint_sha256     the digest recorded as ``weights_sha256``
    shard_names / shard_files   what a shard index names, checked

``weights.py`` finds the files and builds the model from them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .errors import CheckpointError, shown

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes.

    Raises:
        CheckpointError: the file cannot be read.
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except OSError as e:  # no permission, a read error
        raise CheckpointError(f"{shown(path)}: cannot read: {e.strerror or e}") from None
    return h.hexdigest()


def is_shard_index(file: Path) -> bool:
    """Whether ``file`` is a sharded checkpoint's index (``model.safetensors.index.json``...)."""
    return file.name.endswith(".index.json")


def shard_names(index: Path) -> list[str]:
    """The shard file names a sharded checkpoint's index names (``weight_map`` values), each
    once, sorted; ``shard_files`` checks them on disk.

    Raises:
        CheckpointError: the index is not JSON with a ``weight_map`` of file names, or a name has
            a folder in it or is not a weights file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``).
    """
    data = read_checkpoint_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{shown(index)}: not a sharded checkpoint index (no weight_map of file names)")
    names = sorted(set(weight_map.values()))
    for name in names:
        if Path(name).name != name or Path(name).suffix not in CHECKPOINT_SUFFIXES:
            raise CheckpointError(f"{shown(index)}: shard {name!r} is not the name of a weights file beside the index")
    return names


def shard_files(index: Path) -> list[Path]:
    """The shard files that a sharded checkpoint's index names (its ``weight_map`` values, the
    transformers format), beside the index, each once, sorted.

    Raises:
        CheckpointError: the index is not JSON with a ``weight_map`` of file names, a name has a
            folder in it, or a shard is not there.
    """
    files = []
    for name in shard_names(index):
        if not (index.parent / name).is_file():
            raise CheckpointError(f"{shown(index)}: shard {name} is missing (expected {shown(index.parent / name)})")
        files.append(index.parent / name)
    return files


def checkpoint_sha256(file: Path) -> str:
    """Hex sha256 identifying a checkpoint: of the file's bytes; for a shard index, of the index's
    bytes followed by each shard's hex digest (``shard_files`` order).

    Raises:
        CheckpointError: an unreadable file, or an index ``shard_files`` refuses.
    """
    if not is_shard_index(file):
        return sha256_file(file)
    h = hashlib.sha256()
    try:
        h.update(file.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{shown(file)}: cannot read: {e.strerror or e}") from None
    for shard in shard_files(file):
        h.update(sha256_file(shard).encode())
    return h.hexdigest()


def read_checkpoint_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file, strictly (``files.read_json``).

    Raises:
        CheckpointError: naming the file: unreadable, not a regular file, or not strict JSON.
    """
    from .files import read_json

    try:
        return read_json(path)
    except OSError as e:
        raise CheckpointError(f"{shown(path)}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise CheckpointError(f"{shown(path)}: not valid JSON: {e}") from None


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _read_unmapped(file: Path, layout: dict[str, tuple[str, list[int]]]) -> dict[str, Any]:
    """The tensors of a safetensors file (already checked by safetensors' ``safe_open``), each read
    into a CPU tensor of its own (``readinto``, no mapping, one tensor's memory at a time).
    ``layout``: key -> (safetensors dtype name, shape), as ``safe_open`` reports them. The
    offsets come from the file's JSON header (the format: an 8-byte little-endian header length,
    the header, then the data)."""
    import json
    import struct

    import torch

    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        tensors = {}
        for key, (dtype, shape) in layout.items():
            begin, end = header[key]["data_offsets"]
            tensor = torch.empty(shape, dtype=getattr(torch, _SAFETENSORS_DTYPES[dtype]))
            f.seek(8 + length + begin)
            if end > begin and f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise ValueError(f"{key}: the file ends inside its data")
            tensors[key] = tensor
    return tensors


def read_state_dict(file: Path) -> dict[str, Any]:
    """Tensors of a ``.safetensors`` file, of a torch pickle read with ``weights_only=True``, or of
all the shards a sharded checkpoint's index names (``shard_files``).

    A safetensors file is read tensor by tensor into memory of each tensor's own (``_read_unmapped``),
    not memory-mapped: a mapping stays resident as long as any tensor of the file lives, so a model
    whose linears are packed into oneDNN's layout would hold the checkpoint twice.

    Wrapper dicts (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.

    Raises:
        CheckpointError: unreadable or cut file, one that needs code to unpickle, an index whose
            shards are missing (``shard_files``), a key in two shards or listed but in none.
    """
    import pickle

    import torch

    if is_shard_index(file):  # every shard read as below, one after the other, into one dict
        state_dict: dict[str, Any] = {}
        for shard in shard_files(file):
            part = read_state_dict(shard)
            if twice := next((k for k in part if k in state_dict), None):
                raise CheckpointError(f"{shown(file)}: key {twice!r} is in more than one shard")
            state_dict.update(part)
        listed = read_checkpoint_json(file)["weight_map"]  # shard_files checked its form
        if missing := next((k for k in listed if k not in state_dict), None):
            raise CheckpointError(f"{shown(file)}: key {missing!r} is listed for {listed[missing]} but in no shard")
        return state_dict
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:  # safetensors checks the header and offsets
                layout = {key: (f.get_slice(key).get_dtype(), f.get_slice(key).get_shape()) for key in f.keys()}
            return _read_unmapped(file, layout)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read checkpoint: not a valid safetensors file ({e})") from None
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what weights_only=True raises for anything but tensors and containers
        raise CheckpointError(
            f"{file}: cannot read checkpoint: not a torch file of plain tensors "
            "(vitembed reads pickles with weights_only=True and never runs code from them)"
        ) from None
    except Exception as e:  # a cut or damaged file: torch's zip reader, EOF
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{file}: cannot read checkpoint: not a complete torch file ({first})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise CheckpointError(f"{file}: not a state dict of tensors")
    return obj
