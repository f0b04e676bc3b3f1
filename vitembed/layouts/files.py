"""The per-image layout: one file per input, ``DIR/<relative path>.<format>``.

``safetensors`` files hold one tensor, ``embedding``, and string metadata (``settings.py``);
``npy`` files hold the same array and no metadata (``DIR/vitembed.json`` says how they were
made). Every file is written atomically (``files.atomic_write``). Does not import torch.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, UsageError, printable, shown
from ..files import atomic_write, canonical_header
from ..results import Result
from ..settings import mixed_outputs, run_settings, settings_conflict
from ..tensors import load_tensor
from .base import Layout, Loaded, Sink

TENSOR_NAME = "embedding"
SUFFIXES = (".safetensors", ".npy")


def write_embedding(path: Path, embedding: Any, metadata: dict[str, str], fmt: str) -> None:
    """Write one embedding.

    Args:
        path: destination file.
        embedding: CPU torch tensor, (tokens, hidden) or (hidden,), in the save dtype.
        metadata: string -> string, stored in the safetensors header (ignored for npy).
        fmt: ``safetensors`` or ``npy`` (npy cannot hold bfloat16).
    """
    if fmt == "safetensors":
        from safetensors.torch import save

        atomic_write(path, *canonical_header(save({TENSOR_NAME: embedding.contiguous()}, metadata=metadata)))
    elif fmt == "npy":
        import io

        buffer = io.BytesIO()
        np.save(buffer, embedding.numpy(), allow_pickle=False)
        atomic_write(path, buffer.getbuffer())
    else:
        raise ValueError(f"unknown format {fmt!r}")


def read_output(path: Path, fmt: str) -> tuple[str, dict[str, str] | None, float]:
    """State of one existing output: (``missing`` | ``incomplete`` | ``complete``, its settings, mtime).

    Settings are read from a safetensors header (None for npy, which has no
    metadata). A file that cannot be parsed whole is ``incomplete``.

    Raises:
        OSError: the path cannot be examined (name too long, folder not searchable).
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing", None, 0.0
    if not stat.S_ISREG(st.st_mode):
        return "incomplete", None, st.st_mtime
    try:
        if fmt == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                if TENSOR_NAME not in f.keys():
                    return "incomplete", None, st.st_mtime
                return "complete", run_settings(dict(f.metadata() or {})), st.st_mtime
        np.load(path, mmap_mode="r", allow_pickle=False)  # fails on a short or garbled file
        return "complete", None, st.st_mtime
    except Exception:
        return "incomplete", None, st.st_mtime


def older_outputs(out_dir: Path, suffix: str, before: float) -> bool:
    """Whether DIR (recursively) holds a file ending in ``suffix`` last modified before ``before``
    (``time.time()`` seconds): an output an ``--overwrite`` started then has not rewritten."""
    for root, _, files in os.walk(out_dir):
        for name in files:
            if name.endswith(suffix):
                try:
                    if os.stat(os.path.join(root, name)).st_mtime < before:
                        return True
                except OSError:
                    continue
    return False


class FilesSink(Sink):
    """Writes each embedding as its own file (``write_embedding``) as soon as it arrives."""

    def __init__(self, fmt: str, metadata: dict[str, str]):
        self.fmt, self.metadata = fmt, metadata
        self.problems: list[str] = []  # no index in this layout: always empty

    def put(self, job, embedding, extra=None) -> list[Result]:
        try:
            metadata = {**self.metadata, **(extra or {}), "source": printable(job.source)}
            write_embedding(job.output, embedding, metadata, self.fmt)
        except Exception as e:  # disk full, name too long, ...: this output fails, the run goes on
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            error = InputError(job.source, "write-failed", f"cannot write {shown(job.output)}: {reason}")
            return [Result(job.source, "failed", error=error)]
        return [Result(job.source, "encoded", output=str(job.output))]


class FilesLayout(Layout):
    """One file per image (``--format safetensors`` or ``npy``).

    Raises:
        UsageError: npy with a bfloat16 ``save_dtype`` (numpy has no bfloat16).
    """

    name = "files"

    def __init__(self, fmt: str = "safetensors", save_dtype: str = "float32"):
        if fmt == "npy" and save_dtype == "bfloat16":
            raise UsageError("--format npy cannot hold bfloat16; use --save-dtype float16/float32 or --format safetensors")
        self.fmt = fmt

    def check_settings(self, plan, settings) -> None:
        for job in plan.jobs:
            try:
                status, theirs, _ = read_output(job.output, "safetensors")
            except OSError:
                continue
            if status == "complete" and theirs is not None and theirs != settings:
                raise settings_conflict(f"{shown(job.output)} was", settings, theirs)

    def scan(self, plan, settings, state):
        """An existing output is done when it reads back whole and was made with ``settings``
        (its safetensors metadata; for npy, which has none, what ``DIR/vitembed.json`` says).
        While ``vitembed.json`` records an unfinished ``--overwrite`` with these settings,
        outputs left from before it are encoded again instead of being refused. An output path
        that cannot even be examined (name too long, folder not searchable) is a failed result.

        Raises:
            UsageError: outputs made with other settings, or npy outputs that no readable
                ``vitembed.json`` describes.
        """
        from ..outdir import SETTINGS_FILE

        redoing = state.overwrite_started
        todo, done = [], []
        for job in plan.jobs:
            try:
                status, theirs, mtime = read_output(job.output, self.fmt)
            except OSError as e:
                error = InputError(job.source, "write-failed", f"cannot use {shown(job.output)}: {e.strerror or e}")
                done.append(Result(job.source, "failed", error=error))
                continue
            if status != "complete":
                todo.append(job)
            elif self.fmt == "npy" and state.settings is None:
                raise UsageError(
                    f"{shown(plan.out_dir)} holds npy outputs but no readable {SETTINGS_FILE} says how they were "
                    "made; use --overwrite to re-encode them, or another --out"
                )
            elif (theirs is not None and theirs != settings) or (self.fmt == "npy" and redoing and mtime < redoing):
                if redoing is None:
                    raise settings_conflict(f"{shown(job.output)} was", settings, theirs or {})
                todo.append(job)  # left over from before an unfinished --overwrite
            else:
                done.append(Result(job.source, "skipped", output=str(job.output), reason="already done"))
        return todo, done

    def open(self, plan, metadata) -> Sink:
        return FilesSink(self.fmt, metadata)

    def overwrite_done(self, out_dir, started) -> bool:
        # npy files carry no settings: while DIR holds npy files this run did not rewrite (an
        # --overwrite of some of the inputs), it is not done, so a later run redoes them.
        return self.fmt != "npy" or not older_outputs(out_dir, ".npy", started)

    @staticmethod
    def owns(path: Path) -> bool:
        return path.suffix in SUFFIXES or path.is_dir()

    def read(self, path: Path) -> Loaded:
        """One output file, or every output file under a folder (sorted by relative path).

        Raises:
            UsageError: a folder without outputs, or outputs of different shapes or settings.
            InputError: a file that cannot be read.
        """
        from ..outdir import read_dir_state

        root = path if path.is_dir() else path.parent
        files = sorted(_outputs_under(path)) if path.is_dir() else [path]
        if not files:
            raise UsageError(f"{shown(path)} holds no vitembed outputs (.safetensors or .npy files)")
        kinds = {f.suffix for f in files}
        if len(kinds) > 1:
            raise UsageError(f"{shown(path)} holds both .safetensors and .npy outputs; load one kind at a time")
        state = read_dir_state(root, tolerate_bad=True)
        if ".npy" in kinds and state.overwrite_started is not None:  # npy files do not say which run made them
            raise UsageError(f"{shown(root)}: an --overwrite into it has not finished, and npy files do not say "
                             "which settings made them; run the same encode again to finish it")
        dir_settings = state.settings
        arrays, keys, sources, settings = [], [], [], None
        for file in files:
            array, meta = _read_one(file)
            ours = run_settings(meta) if file.suffix == ".safetensors" else (dir_settings or {})
            if settings is None:
                settings = ours
            elif ours != settings:
                raise mixed_outputs(shown(path), settings, ours)
            naflex = ours.get("resize") == "naflex" and ours.get("pool") in ("none", "patch")
            if arrays and not naflex and (array.shape, array.dtype) != (arrays[0].shape, arrays[0].dtype):
                raise UsageError(f"{shown(file)}: shape {array.shape} {array.dtype}, the others {arrays[0].shape} {arrays[0].dtype}")
            arrays.append(array)
            keys.append(printable(file.relative_to(root).as_posix()[: -len(file.suffix)]))
            sources.append(meta.get("source", ""))
        if (settings or {}).get("resize") == "naflex" and settings.get("pool") in ("none", "patch"):
            return Loaded(arrays, keys, sources, settings)  # NaFlex tokens: a list, each image its own (T_i, D)
        return Loaded(np.stack(arrays), keys, sources, settings or {})


def _read_one(file: Path) -> tuple[np.ndarray, dict[str, str]]:
    """(the embedding, the metadata) of one per-image output.

    Raises:
        InputError: the file cannot be read whole, is not a regular file (a FIFO named
            ``x.safetensors`` would block the reader for ever), or holds no ``embedding`` tensor.
    """
    try:
        if not stat.S_ISREG(os.stat(file).st_mode):
            raise InputError(str(file), "unreadable", "not a regular file")
        if file.suffix == ".npy":
            return np.load(file, allow_pickle=False), {"source": ""}
        from safetensors import safe_open

        with safe_open(str(file), framework="numpy") as f:
            if TENSOR_NAME not in f.keys():
                raise InputError(str(file), "unreadable", f"not a vitembed output: no {TENSOR_NAME!r} tensor")
            meta = dict(f.metadata() or {})
        return load_tensor(str(file), TENSOR_NAME), meta
    except InputError:
        raise
    except Exception as e:  # safetensors, numpy and the OS fail in many ways: this file, named
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(str(file), "unreadable", f"not a readable vitembed output: {reason}") from None


def _outputs_under(folder: Path):
    """Output files under ``folder`` (recursively), not hidden.

    Raises:
        UsageError: a packed layout's part file among them (a folder of another layout inside).
    """
    from .packed_index import PART_NAME, read_part

    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.endswith(SUFFIXES) or name.startswith("."):
                continue
            if PART_NAME.match(name) and read_part(Path(root) / name).complete:
                raise UsageError(f"{shown(root)} holds packed outputs (--pack part files) among one-file-per-image "
                                 f"outputs under {shown(folder)}; load that folder by itself")
            yield Path(root) / name
