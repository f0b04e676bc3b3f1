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

Does not import torch.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
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
