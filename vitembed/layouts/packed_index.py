"""The bookkeeping of the packed layout: part names, ``DIR/index.jsonl``, part headers.

``packed.py`` writes and reads parts; this module knows their names, appends and reads index
lines (one ``write`` on an O_APPEND file, so concurrent shards share one index), reads a part's
header without its data, and indexes parts a killed run never indexed. Does not import torch.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from pathlib import Path

from ..errors import UsageError, shown
from ..files import open_regular, parse_json
from ..settings import run_settings

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
        _warn_bad_lines(out_dir, bad)
    return latest, named


def _warn_bad_lines(out_dir: Path, bad: list[int]) -> None:
    """A ``VitembedWarning`` naming the index lines that are not JSON objects."""
    from ..errors import warn

    lines = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
    warn(f"{shown(Path(out_dir) / INDEX_FILE)}: {len(bad)} line(s) are not valid index entries (line {lines}); "
         "the inputs they recorded are treated as not done")


def row_entries(keys: list[str], sources: list[str], part: str) -> list[dict]:
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
        entries = row_entries(info.keys, info.sources, name)
        if write:
            try:
                append_index(out_dir, entries)
            except OSError:
                pass  # still counted as done for this run; the next run tries again
        for e in entries:
            index[e["key"]] = e
    return index


def part_holds(info: PartInfo, row, key: str) -> bool:
    """Whether a part holds ``key`` at ``row``."""
    keys = info.keys or []
    return info.complete and isinstance(row, int) and not isinstance(row, bool) and 0 <= row < len(keys) and keys[row] == key


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


def key_digest(key: str) -> bytes:
    """16 bytes (blake2b) standing for a key in ``live_rows``: two different keys of 10^9 share a
    digest with a chance near 10^-20."""
    import hashlib

    return hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=16).digest()


def live_rows(out_dir: Path) -> list[tuple[str, Any, Any]]:
    """The rows ``iter_packed`` yields, found without holding the index: for each part holding the
    latest embedding of some key, in part-name order, (part name, its rows sorted (n,) int64, the
    ``key_digest`` of each row's key (n, 2) uint64) to check against the part's own ``keys``.

    The index is read line by line into compact arrays (a key's digest, its part and row, whether
    it is encoded: about 40 bytes a line, against a kilobyte as dicts), and complete parts no line
    names come after it, as ``recover_parts`` adds them. The last line of a key wins.

    Raises:
        UsageError: the index cannot be read, or its latest entry of some key names no valid part
            and row (re-run the same ``encode`` to redo them).
    """
    from array import array

    import numpy as np

    digests, parts, rows, state = bytearray(), array("i"), array("q"), array("b")  # state: 0 not encoded, 1 ok, 2 bad
    names: list[str] = []
    ids: dict[str, int] = {}
    named: set[str] = set()

    def add(key: str, part, row, status) -> None:
        digests.extend(key_digest(key))
        valid = (isinstance(part, str) and PART_NAME.match(part) is not None and isinstance(row, int)
                 and not isinstance(row, bool) and 0 <= row < 2**62)
        parts.append(ids.setdefault(part, len(ids)) if valid else -1)
        if valid and len(ids) > len(names):
            names.append(part)
        rows.append(row if valid else -1)
        state.append(0 if status != "encoded" else 1 if valid else 2)

    bad_lines: list[int] = []
    for entry in _index_entries(out_dir, bad_lines):
        if isinstance(entry.get("part"), str):
            named.add(entry["part"])
        if isinstance(entry.get("key"), str):
            add(entry["key"], entry.get("part"), entry.get("row"), entry.get("status"))
    if bad_lines:
        _warn_bad_lines(out_dir, bad_lines)
    try:
        unnamed = sorted(n for n in os.listdir(out_dir) if PART_NAME.match(n) and n not in named)
    except FileNotFoundError:
        unnamed = []
    for name in unnamed:
        info = read_part(Path(out_dir) / name)
        if info.complete and info.keys is not None:
            for row, key in enumerate(info.keys):
                add(key, name, row, "encoded")
    if not rows:
        return []
    d = np.frombuffer(bytes(digests), dtype=np.uint64).reshape(-1, 2)
    order = np.lexsort((np.arange(len(d)), d[:, 1], d[:, 0]))  # by digest, then line: a key's last line last
    sorted_d = d[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = (sorted_d[1:] != sorted_d[:-1]).any(axis=1)
    latest = order[last]
    del order, sorted_d, last
    states = np.frombuffer(state, dtype=np.int8)[latest]
    if (states == 2).any():
        raise UsageError(f"{shown(Path(out_dir) / INDEX_FILE)}: {int((states == 2).sum())} rows are not where it says "
                         "(a part or row that is not valid); run the same encode again to redo them")
    good = latest[states == 1]
    part_of, row_of = np.frombuffer(parts, dtype=np.int32)[good], np.frombuffer(rows, dtype=np.int64)[good]
    by = np.lexsort((row_of, part_of))
    good, part_of, row_of = good[by], part_of[by], row_of[by]
    starts = np.flatnonzero(np.r_[True, part_of[1:] != part_of[:-1]]) if len(good) else np.array([], dtype=np.int64)
    ends = np.r_[starts[1:], len(good)]
    found = [(names[part_of[s]], row_of[s:e], d[good[s:e]]) for s, e in zip(starts, ends)]
    return sorted(found, key=lambda item: item[0])
