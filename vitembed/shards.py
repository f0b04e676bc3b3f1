"""WebDataset shards as inputs: each image member of a ``.tar`` is one input, read in place.

A WebDataset shard (what img2dataset writes and clip-retrieval reads) is a plain POSIX tar whose
members are grouped into samples by name (``000123.jpg``, ``000123.json``, ``000123.txt``).
vitembed lists a shard's headers once, when it plans the run (``tarfile`` seeks from header to
header, so listing reads a few bytes per member), and each decode reads one member's bytes by
offset: nothing is extracted to disk, and members decode in any order and on any worker.

Members whose names are not image names (``walk.is_image_name``: the sample's ``.json``,
``.txt``, ``.cls``) are not inputs. A member's key is ``<the shard's key>/<member name>``
(``00000.tar/000123.jpg``), so outputs, resume, ``--shard`` and ``--pack`` work as for files.

A damaged member fails alone when it is decoded, as a damaged file does. A truncated shard fails
the member its end cuts (at decode time, kind ``truncated``) and nothing else; a header that is
cut or damaged is reported once for the shard, and the members before it are still inputs.
Compressed tars (``.tar.gz``) cannot be read by offset and are refused with a message.

Does not import torch.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from .errors import InputError, UsageError, shown

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.xz", ".tar.bz2")  # compressed: refused, named
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZ": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def is_shard_name(path: str | os.PathLike) -> bool:
    """True if the file name ends in ``.tar`` (case-insensitive): read as a WebDataset shard (the
    compressed suffixes too, so that they are refused with a message rather than passed over)."""
    return os.fspath(path).lower().endswith(SHARD_SUFFIXES)


@dataclass(frozen=True)
class TarMember:
    """One image member of a WebDataset shard, read in place by offset.

    Attributes:
        shard: the tar file, as given.
        name: the member's name inside the tar (``000123.jpg``).
        offset: byte offset of the member's data in the tar file.
        size: the member's size in bytes, as its header gives it.
        stamp: the shard's (size in bytes, mtime in ns) when it was listed: a shard rewritten since
            would hold other bytes at ``offset``, so its members fail instead of giving wrong images.
    """

    shard: str
    name: str
    offset: int
    size: int
    stamp: tuple[int, int] = (-1, -1)

    def __str__(self) -> str:
        """``<shard>/<member>``: how errors, metadata and ``failures.jsonl`` name the member."""
        return f"{self.shard}/{self.name}"

    def read(self) -> bytes:
        """The member's bytes.

        Raises:
            InputError: kinds ``not-found`` / ``unreadable`` (the shard gone, unreadable, or changed
                since it was listed), ``empty`` (a 0-byte member), ``truncated`` (the shard ends
                inside this member).
        """
        name = str(self)
        if self.size == 0:
            raise InputError(name, "empty", "empty member (0 bytes)")
        try:
            with open(self.shard, "rb") as f:
                st = os.fstat(f.fileno())
                if self.stamp != (-1, -1) and (st.st_size, st.st_mtime_ns) != self.stamp:
                    raise InputError(name, "unreadable", "the shard changed since the run listed it (its size or "
                                     "modification time differs); run again to list it anew")
                if self.offset + self.size > st.st_size:
                    raise InputError(name, "truncated", f"its header claims {self.size} bytes, but the shard ends "
                                     f"{self.offset + self.size - st.st_size} bytes short of that (truncated tar)")
                f.seek(self.offset)
                data = f.read(self.size)
        except FileNotFoundError:
            raise InputError(name, "not-found", f"the shard {shown(self.shard)} is gone") from None
        except OSError as e:
            raise InputError(name, "unreadable", f"cannot read the shard: {e.strerror or e}") from None
        if len(data) < self.size:
            raise InputError(name, "truncated", f"the shard ends {self.size - len(data)} of this member's "
                             f"{self.size} bytes early (truncated tar)")
        return data


def list_members(shard: str, problems: list[InputError]) -> Iterator[TarMember]:
    """The image members of ``shard``, in the tar's order (``walk.is_image_name`` on each name).

    A shard that is not a regular file, cannot be read, is compressed, or is not a tar is appended
    to ``problems`` (one ``InputError`` naming the shard) and gives no members. The members before a
    damage are listed, and the damage is appended once for the shard: a header cut by the end of the
    file, a non-image member's data cut by it, or no end-of-archive marker at all (kind
    ``truncated``), a header that does not parse (``unreadable``). An image member whose data the
    end cuts is still listed: it fails, kind ``truncated``, when it is read (``TarMember.read``).
    Link members with image names (symlinks, hard links) are reported as ``unsupported``.
    """
    from .walk import is_image_name  # (walk.py takes shards by name from this module)

    try:
        f = open(shard, "rb", buffering=0) if stat.S_ISREG(os.stat(shard).st_mode) else None
    except OSError as e:
        problems.append(InputError(shard, "unreadable", e.strerror or str(e)))
        return
    if f is None:  # a FIFO or device named *.tar: opening it could block for good
        problems.append(InputError(shard, "unreadable", "not a regular file"))
        return
    with f:
        head = f.read(6)
        for magic, kind in _COMPRESSED.items():
            if head.startswith(magic):
                problems.append(InputError(shard, "unsupported", f"{kind}-compressed tar: vitembed reads shards in place, "
                                           "by offset, which needs an uncompressed .tar (as webdataset and img2dataset "
                                           "write by default); decompress it first"))
                return
        st = os.fstat(f.fileno())
        size, stamp = st.st_size, (st.st_size, st.st_mtime_ns)
        f.seek(0)
        try:
            archive = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, ValueError, OverflowError) as e:
            problems.append(InputError(shard, "not-an-image", f"not a tar file ({e})"))
            return
        last: tarfile.TarInfo | None = None
        damage: str | None = None
        while True:
            try:
                info = archive.next()
            except (tarfile.ReadError, EOFError):  # the end cut the last member's data
                info = None
            except (tarfile.TarError, ValueError, OverflowError) as e:  # a size or sparse map that does not parse
                damage = str(e) or type(e).__name__
                info = None
            if info is None:
                break
            last = info
            image_name = is_image_name(info.name)
            if info.isreg() and image_name and info.size >= 0:
                yield TarMember(shard, info.name, info.offset_data, info.size, stamp)
            elif (info.issym() or info.islnk()) and image_name:
                problems.append(InputError(f"{shard}/{info.name}", "unsupported",
                                           "a link member: vitembed reads members with their own data only"))
        problem = _damage(f, size, last, damage, is_image_name)
        if problem is not None:
            problems.append(InputError(shard, *problem))


def _damage(f, size: int, last: tarfile.TarInfo | None, error: str | None, is_image_name) -> tuple[str, str] | None:
    """(kind, reason) when the tar does not end as a whole one does, else None. tarfile stops quietly
    at a header it cannot read and at a cut; a whole tar ends with zero blocks after the last member."""
    after = f"after {shown(last.name)}" if last is not None else "at the start"
    end = 0 if last is None else last.offset_data + -(-max(last.size, 0) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    tail = " the members before it are read; any from there on cannot be found"
    if error is not None:
        return "unreadable", f"a damaged tar header {after} ({error});{tail}"
    if last is not None and last.offset_data + last.size > size:
        if last.isreg() and is_image_name(last.name):
            return None  # the image member itself fails, kind truncated, when it is read
        return "truncated", f"the shard ends inside the data of {shown(last.name)} (truncated tar);{tail}"
    if end >= size:
        return "truncated", f"the shard ends {after} with no end-of-archive marker (truncated tar?);{tail}"
    f.seek(end)
    if any(f.read(2 * tarfile.BLOCKSIZE)):
        cut = size - end < tarfile.BLOCKSIZE
        return ("truncated" if cut else "unreadable",
                f"{'the shard ends inside' if cut else 'a damaged'} tar header {after} (byte {end});{tail}")
    return None


def member_relpath(name: str) -> str | None:
    """The member's name as a relative POSIX path (``./a/b.jpg`` -> ``a/b.jpg``); None for a name that
    is absolute or climbs out (``../x.jpg``), which would place an output outside the shard's folder."""
    parts = [p for p in PurePosixPath(name).parts if p not in (".", "")]
    if not parts or name.startswith("/") or ".." in parts:
        return None
    return "/".join(parts)


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d{1,18})\.\.(-?\d{1,18})(?:\.\.(-?\d{1,18}))?|([a-zA-Z])\.\.([a-zA-Z])")
MAX_EXPANSION = 100_000  # names one brace pattern may expand to


def _choices(body: str) -> list[str] | None:
    """The names one brace body stands for, as bash expands it: ``00..02`` (zero-padded to the wider
    bound when either bound is), ``1..9..2`` (a step), ``a..c``, ``x,y``; None when it is no pattern."""
    match = _RANGE.fullmatch(body)
    if match and match.group(4):
        low, high = ord(match.group(4)), ord(match.group(5))
        step = 1 if high >= low else -1
        return [chr(c) for c in range(low, high + step, step)]
    if match:
        low, high, by = match.group(1), match.group(2), match.group(3)
        padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0") for b in (low, high))
        width = max(len(low), len(high)) if padded else 0
        step = abs(int(by or 1)) or 1
        step = step if int(high) >= int(low) else -step
        return [f"{n:0{width}d}" for n in range(int(low), int(high) + (1 if step > 0 else -1), step)]
    return body.split(",") if "," in body else None


def _count(body: str) -> int:
    match = _RANGE.fullmatch(body)
    if match and match.group(4):
        return abs(ord(match.group(5)) - ord(match.group(4))) + 1
    if match:
        return abs(int(match.group(2)) - int(match.group(1))) // (abs(int(match.group(3) or 1)) or 1) + 1
    return body.count(",") + 1 if "," in body else 1


def expand_braces(pattern: str) -> list[str]:
    """Brace patterns as webdataset and bash write them: ``s/{00000..00002}.tar`` -> ``s/00000.tar``,
    ``s/00001.tar``, ``s/00002.tar``; ``{a,b}``, ``{1..9..2}``, ``{a..c}`` (``_choices``); several braces
    give their product, in order. A brace that is no pattern (``{x}``, ``{}``) is kept as written;
    braces inside braces are not expanded.

    Raises:
        UsageError: the pattern expands to more than ``MAX_EXPANSION`` names.
    """
    count = 1
    for body in _BRACE.findall(pattern):
        count *= _count(body)
        if count > MAX_EXPANSION:
            raise UsageError(f"{shown(pattern)}: the brace pattern names more than {MAX_EXPANSION} files; "
                             "list the shards on stdin (-) or in a --from-table instead")
    return _expand(pattern)


def _expand(pattern: str) -> list[str]:
    """The names of ``pattern``: its literal parts and brace choices (``_choices``), in product order."""
    parts: list[list[str]] = []
    at = 0
    for match in _BRACE.finditer(pattern):
        choices = _choices(match.group(1))
        if choices is None:  # "{}" or "{x}": not a pattern, taken literally
            continue
        parts.append([pattern[at:match.start()]])
        parts.append(choices)
        at = match.end()
    parts.append([pattern[at:]])
    return ["".join(names) for names in itertools.product(*parts)]
