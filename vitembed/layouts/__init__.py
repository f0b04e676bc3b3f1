"""The output layouts, one module each, behind one interface (``base.Layout``).

    files    one file per image, DIR/<relative path>.safetensors (or .npy)
    packed   --pack N: N embeddings per DIR/part-NNNNN.safetensors, plus DIR/index.jsonl

``for_run`` picks the layout a run writes, ``load`` reads any output back through the layout
that owns it. A new layout is one new module here, built like these, and one line in ``for_run``
and ``KINDS``. Does not import torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError, UsageError, shown
from .base import Layout, Loaded, Sink
from .files import FilesLayout
from .packed import PackedLayout, iter_packed

__all__ = ["KINDS", "FilesLayout", "Layout", "Loaded", "PackedLayout", "Sink", "for_run", "iter_packed", "load", "others"]

KINDS: tuple[type[Layout], ...] = (PackedLayout, FilesLayout)  # in the order a path is tried by ``owns``


def for_run(fmt: str, pack: int | None, save_dtype: str) -> Layout:
    """The layout a run writes: ``PackedLayout(pack)`` with ``--pack``, else ``FilesLayout(fmt)``.
    The values come checked from ``options.RunOptions``.

    Raises:
        UsageError: a format that cannot hold ``save_dtype`` (npy and bfloat16).
    """
    return PackedLayout(pack) if pack is not None else FilesLayout(fmt, save_dtype)


def _any(kind: type[Layout]) -> Layout:
    """An instance of ``kind`` for checking and reading (the values a run would choose do not matter there)."""
    return kind(1) if kind is PackedLayout else kind()


def others(layout: Layout) -> list[Layout]:
    """One of each layout but ``layout``'s own (to refuse mixing layouts in one DIR)."""
    return [_any(kind) for kind in KINDS if not isinstance(layout, kind)]


def load(path: str | os.PathLike, as_torch: bool = False) -> Loaded:
    """Read outputs back: a per-image file, a folder of them, a packed folder, or one part file.

    Returns:
        ``Loaded``: ``embeddings`` (N, *embedding shape), numpy in the saved dtype (bfloat16 as
        float32, exactly), or a CPU torch tensor with ``as_torch``; ``keys`` (sorted), ``sources``
        and ``metadata`` (the settings they were made with). Rows are checked against their
        part's keys, as ``iter_packed`` checks them.

    Raises:
        InputError: ``path`` does not exist or cannot be read.
        UsageError: nothing vitembed wrote there, or outputs that do not fit together.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise UsageError(f"load(): expected the path of an output file or folder (got {path!r})")
    path = Path(path)
    if not os.path.lexists(path):
        raise InputError(str(path), "not-found", "no such file or folder")
    for kind in KINDS:
        if kind.owns(path):
            loaded = _any(kind).read(path)
            break
    else:
        raise UsageError(f"{shown(path)} is not a vitembed output (.safetensors, .npy, or a folder of them)")
    if as_torch:
        import torch

        e = loaded.embeddings
        loaded.embeddings = [torch.from_numpy(a) for a in e] if isinstance(e, list) else torch.from_numpy(e)
    return loaded
