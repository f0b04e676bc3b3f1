"""Packed outputs (``--pack N``): N embeddings per file and an index, for jobs of millions of images.

Layout of DIR:

    part-00000.safetensors   tensor ``embeddings`` (rows, *embedding shape); rows <= N.
                             Metadata: the run's settings (as a per-image file has them),
                             ``rows``, and ``keys`` / ``sources``: JSON lists, one entry per row.
    part-2of4-00000...       the same, written by ``--shard 2/4`` (concurrent shards never share a name)
    index.jsonl              one JSON object per line: {"key", "source", "part", "row", "status"},
                             status ``encoded`` (``part`` and ``row`` say where) or ``failed``
                             (with ``error_kind`` and ``error``); the last line for a key wins.

``key`` is the input's output path relative to DIR without the suffix (``sub/cat.jpg``),
the name a per-image output would have. A part is written whole under a temporary
name and renamed into place, and its index lines are appended after it, in one
``write`` (O_APPEND), so concurrent shards can share one index. A part written by
a job killed before its lines were appended is indexed from its own metadata by
the next run (``recover_parts``). ``PackedLayout`` is this layout behind the ``layouts.Layout``
interface. Does not import torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError, UsageError, printable, shown
from ..files import atomic_write, canonical_header
from ..results import Result
from ..settings import mixed_outputs, settings_conflict
from .base import Layout, Loaded, Sink
from .packed_index import (
    INDEX_FILE,
    PACK_TENSOR,
    PART_NAME,
    PartInfo,
    append_index,
    next_part_number,
    part_holds,
    part_prefix,
    read_part,
    recover_parts,
    remove_dead_parts,
    row_entries,
    scan_index,
)


class PackWriter:
    """Collects embeddings and writes them N at a time as one part file, then indexes them.

    Args:
        out_dir: DIR.
        rows: N, embeddings per part.
        prefix: part name prefix (``part_prefix``).
        metadata: string metadata of every part (the run's settings).
    """

    def __init__(self, out_dir: Path, rows: int, prefix: str, metadata: dict[str, str]):
        self.out_dir, self.rows, self.prefix, self.metadata = Path(out_dir), rows, prefix, metadata
        self.number = next_part_number(self.out_dir, prefix)
        self.pending: list[tuple[str, str, object]] = []  # (key, source, embedding tensor)

    def add(self, key: str, source: str, embedding) -> bool:
        """Queue one embedding (a CPU tensor); True when a part is full and ``flush`` should be called."""
        self.pending.append((key, source, embedding))
        return len(self.pending) >= self.rows

    def flush(self) -> tuple[list[tuple[str, str]], str | None, OSError | None, OSError | None]:
        """Write the queued embeddings as the next part and append their index lines.

        The part gets the next free name: a name another process took meanwhile (two
        runs into one DIR) is never overwritten (``atomic_write(exclusive=True)``).

        Returns:
            ((key, source) of each row, the part's file name, None, index error) when
            written; the index error (an OSError, else None) says the index lines could
            not be appended (the part names its rows: the next run indexes it).
            (the same rows, None, the OSError, None) when the part could not be written
            (the rows are then not on disk; the caller reports them as failed).
        """
        import torch
        from safetensors.torch import save

        rows, self.pending = self.pending, []
        if not rows:
            return [], None, None, None
        keys = [k for k, _, _ in rows]
        sources = [s for _, s, _ in rows]
        meta = {**self.metadata, "rows": str(len(rows)), "keys": json.dumps(keys), "sources": json.dumps(sources)}
        try:
            chunks = canonical_header(save({PACK_TENSOR: torch.stack([e for _, _, e in rows])}, metadata=meta))
            while True:
                name = f"{self.prefix}{self.number:05d}.safetensors"
                self.number += 1
                try:
                    atomic_write(self.out_dir / name, *chunks, exclusive=True)
                    break
                except FileExistsError:
                    continue  # another run into this DIR took the name: take the next one
        except OSError as e:
            return list(zip(keys, sources)), None, e, None
        try:
            append_index(self.out_dir, row_entries(keys, sources, name))
        except OSError as e:
            return list(zip(keys, sources)), name, None, e
        return list(zip(keys, sources)), name, None, None


def iter_packed(out_dir: str | os.PathLike) -> Iterator[tuple[str, str, object]]:
    """(key, source, embedding) for every encoded input of a packed DIR, part by part.

    Embeddings are numpy arrays in the saved dtype (bfloat16 parts as float32:
    numpy has no bfloat16; the values are exact). Parts the index never named
    are read from their own ``keys`` (as the next ``encode`` would index them).
    Every row is checked against its part's ``keys`` before anything is yielded.

    Raises:
        UsageError: DIR holds no packed outputs, or the index names rows that are
            not in their parts (re-run the same ``encode`` to redo them).
    """
    from ..tensors import load_tensor

    out_dir = Path(out_dir)
    index = recover_parts(out_dir, *scan_index(out_dir, warn=True), write=False)
    encoded = [e for e in index.values() if e.get("status") == "encoded"]
    if not encoded and not (out_dir / INDEX_FILE).is_file():
        raise UsageError(f"{shown(out_dir)} holds no packed outputs (no {INDEX_FILE}, no part files)")
    by_part: dict[str, list[dict]] = {}
    bad: list[dict] = []
    infos: dict[str, PartInfo] = {}
    for entry in encoded:
        part, row = entry.get("part"), entry.get("row")
        if not isinstance(part, str) or not PART_NAME.match(part) or not isinstance(row, int) or isinstance(row, bool):
            bad.append(entry)
            continue
        if part not in infos:
            infos[part] = read_part(out_dir / part)
        if not part_holds(infos[part], row, entry["key"]):
            bad.append(entry)
            continue
        by_part.setdefault(part, []).append(entry)
    if bad:
        first = bad[0]
        raise UsageError(
            f"{shown(out_dir / INDEX_FILE)}: {len(bad)} rows are not where it says (first: {first.get('key')!r} "
            f"in {first.get('part')!r} row {first.get('row')!r}); run the same encode again to redo them"
        )
    for part in sorted(by_part):
        tensor = load_tensor(str(out_dir / part), PACK_TENSOR)
        for entry in sorted(by_part[part], key=lambda e: e["row"]):
            yield entry["key"], entry.get("source", ""), tensor[entry["row"]]


class PackSink(Sink):
    """Collects embeddings N at a time into part files (``PackWriter``) and indexes them.

    Keys are ``Job.key``: JSON text, also for file names that are not UTF-8, and unique in a plan.
    ``problems`` collects why index lines could not be appended.
    """

    def __init__(self, out_dir: Path, rows: int, shard: tuple[int, int] | None, metadata: dict[str, str]):
        self.out_dir = out_dir
        self.writer = PackWriter(out_dir, rows, part_prefix(shard), metadata)
        self.jobs: dict = {}
        self.problems: list[str] = []

    def put(self, job, embedding, extra=None) -> list[Result]:  # (the part's rows share one grid: pooled only)
        key = job.key
        self.jobs[key] = job
        return self.close() if self.writer.add(key, printable(job.source), embedding) else []

    def failed(self, job, error: InputError) -> None:
        entry = {"key": job.key, "source": printable(job.source), "part": None, "row": None,
                 "status": "failed", "error_kind": error.kind, "error": error.reason}
        try:
            append_index(self.out_dir, [entry])
        except OSError as e:  # failures.jsonl has it too; a missing line only means "not done", which is true
            self.problems.append(f"cannot append to {INDEX_FILE}: {e.strerror or e}")

    def close(self) -> list[Result]:
        rows, part, error, index_error = self.writer.flush()
        if index_error is not None:
            self.problems.append(
                f"cannot append to {INDEX_FILE}: {index_error.strerror or index_error}; the part files are whole "
                "and the next run of the same command indexes them"
            )
        results = []
        for row, (key, _) in enumerate(rows):
            job = self.jobs.pop(key)
            if error is None:
                results.append(Result(job.source, "encoded", output=str(self.out_dir / part), row=row, key=key))
            else:
                reason = f"cannot write a part file in {shown(self.out_dir)}: {error.strerror or error}"
                results.append(Result(job.source, "failed", error=InputError(job.source, "write-failed", reason)))
        return results


class PackedLayout(Layout):
    """``--pack N``: N embeddings per part file, plus ``DIR/index.jsonl`` (see the module docstring)."""

    name = "packed"
    fmt = "safetensors"

    def __init__(self, rows: int):
        self.rows = rows

    def check_settings(self, plan, settings) -> None:
        out_dir = Path(plan.out_dir)
        for part in sorted(scan_index(out_dir)[1])[:1]:
            info = read_part(out_dir / part)
            if info.complete and info.settings != settings:
                raise settings_conflict(f"{shown(out_dir / part)} was", settings, info.settings or {})

    def scan(self, plan, settings, state):
        """An input is done when the index's last line for its key says ``encoded`` and that part
        is complete and was made with ``settings`` (parts written before an unfinished
        ``--overwrite`` with these settings are redone). Complete parts the index does not name
        are indexed from their own metadata first.

        Raises:
            UsageError: parts made with other settings.
        """
        out_dir = Path(plan.out_dir)
        redoing = state.overwrite_started
        index = recover_parts(out_dir, *scan_index(out_dir, warn=True))
        parts: dict[str, tuple[PartInfo, float]] = {}
        todo, done = [], []
        for job in plan.jobs:
            entry = index.get(job.key)
            name = entry.get("part") if entry is not None and entry.get("status") == "encoded" else None
            if not isinstance(name, str) or not PART_NAME.match(name):  # only a part in DIR itself, never elsewhere
                todo.append(job)
                continue
            if name not in parts:
                try:
                    parts[name] = (read_part(out_dir / name), (out_dir / name).stat().st_mtime)
                except OSError:
                    parts[name] = (PartInfo(False), 0.0)
            info, mtime = parts[name]
            row = entry.get("row")
            if not part_holds(info, row, job.key):
                todo.append(job)  # the part is gone, torn, or does not hold this input where the index says
            elif info.settings != settings or (redoing is not None and mtime < redoing):
                if redoing is None:
                    raise settings_conflict(f"{shown(out_dir / name)} was", settings, info.settings or {})
                todo.append(job)
            else:
                done.append(Result(job.source, "skipped", output=str(out_dir / name), reason="already done",
                                   row=row, key=job.key))
        return todo, done

    def open(self, plan, metadata) -> Sink:
        return PackSink(Path(plan.out_dir), self.rows, plan.sharded, metadata)

    def overwrite_done(self, out_dir, started) -> bool:
        remove_dead_parts(out_dir)
        return True

    @staticmethod
    def owns(path: Path) -> bool:
        if path.is_dir():
            if (path / INDEX_FILE).exists():
                return True
            return any(PART_NAME.match(n) and read_part(path / n).complete for n in sorted(os.listdir(path)))
        return path.name == INDEX_FILE or (bool(PART_NAME.match(path.name)) and read_part(path).complete)

    def read(self, path: Path) -> Loaded:
        """Every encoded input of a packed DIR (``iter_packed``), sorted by key; a part file alone
        gives its own rows."""
        import numpy as np

        from ..tensors import load_tensor

        if path.is_dir() or path.name == INDEX_FILE:
            folder = path if path.is_dir() else path.parent
            settings: dict[str, str] | None = None
            for part in _live_parts(folder):  # one set of settings, or an --overwrite left unfinished
                theirs = read_part(folder / part).settings or {}
                if settings is None:
                    settings = theirs
                elif theirs != settings:
                    raise mixed_outputs(shown(folder), settings, theirs)
            rows = sorted(iter_packed(folder), key=lambda r: r[0])
            if not rows:
                raise UsageError(f"{shown(folder)} holds no encoded embeddings (index.jsonl lists only failures)")
            return Loaded(np.stack([r[2] for r in rows]), [r[0] for r in rows], [r[1] for r in rows], settings or {})
        info = read_part(path)
        if not info.complete:
            raise InputError(str(path), "unreadable", "not a complete part file")
        return Loaded(load_tensor(str(path), PACK_TENSOR), list(info.keys or []), list(info.sources or []), info.settings or {})


def _live_parts(out_dir: Path) -> list[str]:
    """The parts holding the latest embedding of some key (unindexed parts included), sorted."""
    index = recover_parts(out_dir, *scan_index(out_dir), write=False)
    return sorted({e["part"] for e in index.values() if e.get("status") == "encoded" and isinstance(e.get("part"), str)
                   and PART_NAME.match(e["part"])})
