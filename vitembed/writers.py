"""The last stage: one embedding -> one file, written atomically.

Every file is written under a temporary name in its destination folder and
renamed into place (``os.replace``), so a reader, or a job killed at any moment,
only ever sees complete files. ``safetensors`` holds one tensor ``embedding``
and string metadata; ``npy`` holds the same array and no metadata.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

FORMATS = ("safetensors", "npy")
TENSOR_NAME = "embedding"


def check_format(fmt: str, save_dtype: str) -> None:
    """Raise UsageError for a format that does not exist or cannot hold ``save_dtype``."""
    from .errors import UsageError

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "npy" and save_dtype == "bfloat16":
        raise UsageError("--format npy cannot hold bfloat16; use --save-dtype float16/float32 or --format safetensors")


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """Raise UsageError unless ``out_dir`` is, or can be created as, a writable folder.

    Creates nothing: the nearest existing ancestor is checked instead.
    """
    from .errors import UsageError, printable

    path = Path(out_dir).absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {printable(out_dir)}: exists and is not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {printable(out_dir)}: {printable(existing)} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {printable(out_dir)}: {printable(existing)} is not writable")


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Creates missing parent folders. On any error the temporary file is removed
    and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_embedding(path: Path, embedding, metadata: dict[str, str], fmt: str) -> None:
    """Write one embedding.

    Args:
        path: destination file.
        embedding: CPU torch tensor, (tokens, hidden) or (hidden,), in the save dtype.
        metadata: string -> string, stored in the safetensors header (ignored for npy).
        fmt: ``safetensors`` or ``npy`` (npy cannot hold bfloat16).
    """
    if fmt == "safetensors":
        from safetensors.torch import save

        atomic_write(path, save({TENSOR_NAME: embedding.contiguous()}, metadata=metadata))
    elif fmt == "npy":
        import io

        import numpy as np

        buffer = io.BytesIO()
        np.save(buffer, embedding.numpy(), allow_pickle=False)
        atomic_write(path, buffer.getbuffer())
    else:
        raise ValueError(f"unknown format {fmt!r}")
