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
the next run (``recover_parts``). Does not import torch.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .files import open_regular, parse_json
from .writers import _canonical_header, atomic_write, run_settings

PACK_TENSOR = "embeddings"
INDEX_FILE = "index.jsonl"
PART_NAME = re.compile(r"^part-(?:(\d+)of(\d+)-)?(\d{5,})\.safetensors$")


def part_prefix(shard: tuple[int, int] | None) -> str:
    """``part-`` or, for shard K of N, ``part-KofN-``."""
    return "part-" if shard is None else f"part-{shard[0]}of{shard[1]}-"


def next_part_number(out_dir: Path, prefix: str) -> int:
    """One more than the highest part number with ``prefix`` in DIR or named by its index
    (0 when there is none): a name is never used twice, even after its file was lost."""
    numbers = [-1]
    try:
        names = set(os.listdir(out_dir)) | scan_index(out_dir)[1]
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(prefix) and name.endswith(".safetensors"):
            digits = name[len(prefix) : -len(".safetensors")]
            if digits.isdigit():
                numbers.append(int(digits))
    return max(numbers) + 1


def append_index(out_dir: Path, entries: Iterable[dict]) -> None:
    """Append entries to ``DIR/index.jsonl`` in one ``write`` on an O_APPEND file.

    Raises:
        OSError: the index cannot be written (``files.NotRegularFileError`` for a FIFO or folder there).
    """
    text = "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in entries)
    if not text:
        return
    fd = open_regular(Path(out_dir) / INDEX_FILE, os.O_RDWR | os.O_CREAT | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a line torn by a crash: do not glue ours onto it
            text = "\n" + text
        data = text.encode()
        if os.write(fd, data) != len(data):  # a short write: the disk is full or a size limit was hit
            raise OSError(28, "short write (no space left?)")
    finally:
        os.close(fd)


def _index_entries(out_dir: Path, bad: list[int] | None = None) -> Iterator[dict]:
    """Each line of ``DIR/index.jsonl`` that parses as a JSON object (``files.parse_json``, strict).

    The numbers of lines that do not (a line torn by a crash, NaN, ``1e400``, deep
    nesting, a non-object) are appended to ``bad``: the inputs they recorded count as not done.

    Raises:
        UsageError: the index exists but cannot be read (a folder, a FIFO, no permission).
    """
    from .errors import UsageError, shown
    path = Path(out_dir) / INDEX_FILE
    try:
        f = os.fdopen(open_regular(path), encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return
    except OSError as e:
        raise UsageError(f"cannot read {shown(path)}: {e.strerror or e}") from None
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = parse_json(line)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                yield entry
            elif bad is not None:
                bad.append(number)


def scan_index(out_dir: Path, warn: bool = False) -> tuple[dict[str, dict], set[str]]:
    """One pass over ``DIR/index.jsonl``: (the last entry of each key, every part any line names).

    ``warn``: issue a ``VitembedWarning`` naming the lines that are not JSON objects.
    """
    latest: dict[str, dict] = {}
    named: set[str] = set()
    bad: list[int] = []
    for entry in _index_entries(out_dir, bad):
        if isinstance(entry.get("key"), str):
            latest[entry["key"]] = entry
        if isinstance(entry.get("part"), str):
            named.add(entry["part"])
    if bad and warn:
        import warnings

        from .errors import VitembedWarning, shown

        lines = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        warnings.warn(
            f"{shown(Path(out_dir) / INDEX_FILE)}: {len(bad)} line(s) are not valid index entries (line {lines}); "
            "the inputs they recorded are treated as not done",
            VitembedWarning,
            stacklevel=2,
        )
    return latest, named


def _row_entries(keys: list[str], sources: list[str], part: str) -> list[dict]:
    """The index lines of a part's rows."""
    return [
        {"key": k, "source": s, "part": part, "row": row, "status": "encoded"}
        for row, (k, s) in enumerate(zip(keys, sources))
    ]


@dataclass
class PartInfo:
    """A part file's state: ``complete`` (parses whole, holds ``embeddings``), its settings and row keys."""

    complete: bool
    settings: dict[str, str] | None = None
    keys: list[str] | None = None
    sources: list[str] | None = None


def read_part(path: Path) -> PartInfo:
    """Read a part's header (not its data). A missing or unparsable part, or anything but a
    regular file under a part's name (a FIFO would block the reader for ever), is not complete."""
    from safetensors import safe_open

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return PartInfo(False)
        with safe_open(str(path), framework="numpy") as f:
            if PACK_TENSOR not in f.keys():
                return PartInfo(False)
            meta = dict(f.metadata() or {})
        keys, sources = parse_json(meta.pop("keys")), parse_json(meta.pop("sources"))
        if not (isinstance(keys, list) and isinstance(sources, list) and len(keys) == len(sources)):
            return PartInfo(False)
        meta.pop("rows", None)
        return PartInfo(True, run_settings(meta), keys, sources)
    except Exception:
        return PartInfo(False)


def recover_parts(out_dir: Path, index: dict[str, dict], named: set[str], write: bool = True) -> dict[str, dict]:
    """Index the complete parts in DIR that no line of the index ever named (``named``, from
    ``scan_index``): a job killed between writing a part and appending its lines, or an index
    that could not be written. Returns ``index`` with their rows added. ``write``: append
    their lines to the index too."""
    try:
        names = sorted(n for n in os.listdir(out_dir) if PART_NAME.match(n) and n not in named)
    except FileNotFoundError:
        return index
    for name in names:
        info = read_part(Path(out_dir) / name)
        if not info.complete or info.keys is None or info.sources is None:
            continue
        entries = _row_entries(info.keys, info.sources, name)
        if write:
            try:
                append_index(out_dir, entries)
            except OSError:
                pass  # still counted as done for this run; the next run tries again
        for e in entries:
            index[e["key"]] = e
    return index


def live_parts(index: dict[str, dict]) -> set[str]:
    """Parts that hold the latest embedding of at least one key."""
    return {e["part"] for e in index.values() if e.get("status") == "encoded" and e.get("part")}


def remove_dead_parts(out_dir: Path) -> list[str]:
    """After a finished ``--overwrite``: delete the parts the index names whose every row
    has a newer entry elsewhere. Parts the index never named (another shard's part
    not yet indexed) are left alone. Returns the names removed."""
    latest, named = scan_index(out_dir)
    removed = []
    for name in sorted(named - live_parts(latest)):
        if PART_NAME.match(name):
            try:
                os.unlink(Path(out_dir) / name)
                removed.append(name)
            except OSError:
                pass
    return removed


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
            chunks = _canonical_header(save({PACK_TENSOR: torch.stack([e for _, _, e in rows])}, metadata=meta))
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
            append_index(self.out_dir, _row_entries(keys, sources, name))
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
    from .errors import UsageError, shown
    from .inspect import load_tensor

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
        keys = infos[part].keys or []
        if not infos[part].complete or not 0 <= row < len(keys) or keys[row] != entry["key"]:
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
