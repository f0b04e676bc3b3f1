"""Folder walks: which file names are images, and the recursive, sorted, loop-safe walk that
``inputs.plan_jobs`` expands a folder with. Does not import torch."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

from .errors import InputError
from .shards import is_shard_name


# Formats Pillow registers but cannot decode to pixels: header-only (MPEG) or write-only (PDF, PALM).
# Stub formats (BUFR, GRIB, HDF5, WMF), which need a handler Pillow does not have, are found by class.
_UNDECODABLE_FORMATS = frozenset({"MPEG", "PDF", "PALM"})
# Walked even when no plugin for them is installed, so that they fail with a message saying what is missing.
_ALWAYS_WALKED = frozenset({".heic", ".heif", ".hif", ".avif", ".avifs"})


@functools.lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot) that a folder walk takes as images.

    Every extension Pillow registers (``PIL.Image.registered_extensions()``, which
    includes pillow-heif's when it is installed) whose format Pillow can decode,
    plus the HEIF and AVIF extensions, so that those fail with a clear message
    when their plugin is missing instead of being passed over.
    """
    from PIL import Image, ImageFile

    from . import decode  # noqa: F401  (registers pillow-heif's extensions when it is installed)

    def decodable(fmt: str) -> bool:
        factory = Image.OPEN.get(fmt, (None,))[0]
        stub = isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
        return fmt not in _UNDECODABLE_FORMATS and not stub

    extensions = {ext.lower() for ext, fmt in Image.registered_extensions().items() if decodable(fmt)}
    return frozenset(extensions | _ALWAYS_WALKED)


def is_image_name(path: str | os.PathLike) -> bool:
    """True if the file name ends in one of ``image_extensions()`` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in image_extensions()


def walk_images(
    directory: str,
    errors: list[InputError] | None = None,
    passed_over: list[str] | None = None,
    exclude: str | os.PathLike | None = None,
) -> Iterator[str]:
    """Image files and WebDataset shards (``.tar``) under ``directory``, recursively, in sorted
    order (``is_image_name``, ``shards.is_shard_name``).

    Symlinked folders are followed, each real folder listed once, so symlink
    loops cannot hang the walk. A folder that cannot be listed is appended to
    ``errors`` as an ``unreadable`` InputError instead of being skipped silently;
    files whose names are not image names (no extension, ``.txt``, ``.DS_Store``)
    are appended to ``passed_over``. The folder ``exclude`` (the output folder, when it lies
    inside the walked one) is not entered, so a run never walks its own outputs.
    """

    def on_error(e: OSError) -> None:
        if errors is not None:
            errors.append(InputError(e.filename or directory, "unreadable", f"cannot list folder: {e.strerror or e}"))

    seen: set[tuple[int, int]] = set()
    if exclude is not None:
        try:
            inner, top = os.stat(exclude), os.stat(directory)
        except OSError:  # no output folder yet: nothing to leave out
            pass
        else:
            if (inner.st_dev, inner.st_ino) != (top.st_dev, top.st_ino):  # --out . beside the images: walk it
                seen.add((inner.st_dev, inner.st_ino))  # as if already walked
    for root, dirs, files in os.walk(directory, onerror=on_error, followlinks=True):
        try:
            st = os.stat(root)
        except OSError as e:
            on_error(e)
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop, or a second way to the same folder
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in sorted(files):
            if is_image_name(name) or is_shard_name(name):
                yield os.path.join(root, name)
            elif passed_over is not None:
                passed_over.append(os.path.join(root, name))
