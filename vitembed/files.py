"""Reading the small files vitembed keeps beside images and checkpoints, safely.

Two rules for every such file (``config.json``, ``preprocessor_config.json``,
``DIR/vitembed.json``, ``DIR/index.jsonl``, ``DIR/failures.jsonl``, the lock file):

- Only regular files are opened: a FIFO, device or folder in their place is
  refused instead of blocking the run for ever (``open_regular`` opens with
  ``O_NONBLOCK`` and checks ``S_ISREG`` on the open descriptor, so there is no
  window between the check and the open).
- JSON is parsed strictly (``parse_json``): ``NaN``, ``Infinity`` and numbers
  that overflow a float (``1e400``) are refused, and so is nesting deep enough
  to exhaust the parser's recursion; each becomes a ``ValueError`` with a short
  reason, which callers turn into an error that names the file.

Every file vitembed writes is written under a temporary name in its destination folder and
renamed into place (``atomic_write``), so a reader, or a job killed at any moment, only ever
sees complete files.

Does not import torch.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any


class NotRegularFileError(OSError):
    """A path that should be a regular file is a FIFO, socket, device or folder."""


def open_regular(path: str | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """``os.open`` that never blocks on, nor uses, anything but a regular file.

    Args:
        path: the file.
        flags: ``os.open`` flags (``O_NONBLOCK`` is added for the open, then cleared).
        mode: permissions of a file that ``O_CREAT`` creates (the umask applies).

    Returns:
        An open file descriptor of a regular file (the caller closes it).

    Raises:
        NotRegularFileError: the path exists and is not a regular file.
        OSError: it cannot be opened (missing, no permission, ...).
    """
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO opened for writing with no reader
            raise NotRegularFileError(errno.EINVAL, "not a regular file", os.fspath(path)) from None
        if e.errno == errno.EISDIR:
            raise NotRegularFileError(errno.EISDIR, "not a regular file (a folder)", os.fspath(path)) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file", os.fspath(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_text(path: str | os.PathLike, limit: int | None = None) -> str:
    """The whole text of a regular file (UTF-8; undecodable bytes surrogate-escaped).

    Raises:
        NotRegularFileError, OSError: as ``open_regular``.
        ValueError: the file is larger than ``limit`` bytes.
    """
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        if limit is not None and os.fstat(f.fileno()).st_size > limit:
            raise ValueError(f"larger than {limit} bytes")
        return f.read().decode("utf-8", "surrogateescape")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 19:  # beyond 64 bits: no file vitembed reads holds such a number
        raise ValueError(f"number {text[:40]}... is out of range")
    return int(text)


def parse_json(text: str) -> Any:
    """Strict ``json.loads``: no NaN/Infinity, no overflowing numbers (floats beyond float64,
    integers beyond 19 digits), no recursion blow-up.

    Raises:
        ValueError: with a short reason (``json.JSONDecodeError`` is one).
    """
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json(path: str | os.PathLike, limit: int = 64 << 20) -> Any:
    """A regular file's JSON value (``parse_json``), at most ``limit`` bytes (64 MiB).

    Raises:
        NotRegularFileError, OSError: the file cannot be opened.
        ValueError: it is not strict JSON, or too large.
    """
    return parse_json(read_text(Path(path), limit))


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process umask (read once: reading it means setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, *chunks: bytes | memoryview, exclusive: bool = False) -> None:
    """Write ``chunks``, one after another, to ``path`` through a temporary file in the same folder and a rename.

    ``exclusive``: never replace an existing ``path`` (a hard link instead of a
    rename, which fails when the name is taken): raises FileExistsError then.

    Creates missing parent folders. On any error the temporary file is removed
    and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A short name: any output name that fits the file system fits here too.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".vitembed-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        if exclusive:
            try:
                os.link(tmp, path)  # atomic, and fails if another process has taken the name
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: check, then rename (a narrow race)
                if os.path.lexists(path):
                    raise FileExistsError(17, "File exists", str(path)) from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def canonical_header(data: bytes) -> tuple[bytes, memoryview]:
    """The same safetensors file with its JSON header keys sorted: (new header, tensor data).

    safetensors writes the metadata in hash-map order, which changes from one
    process to the next; sorting makes equal embeddings and metadata give
    byte-identical files. Layout (safetensors format): u64 little-endian header
    length, JSON header padded with spaces to a multiple of 8 bytes, tensor data
    (offsets in the header are relative to the data, so they are unchanged).
    The data is returned as a view, not copied; write the two one after the other.
    """
    import json

    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, memoryview(data)[8 + length :]
