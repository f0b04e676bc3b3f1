"""WebDataset shards as inputs: each image member of a ``.tar`` is one input, read in place.

A WebDataset shard (what img2dataset writes and clip-retrieval reads) is a plain POSIX tar whose
members are grouped into samples by name (``000123.jpg``, ``000123.json``, ``000123.txt``).
vitembed lists a shard's headers once, when it plans the run (``tarfile`` seeks from header to
header, so listing reads a few bytes per member), and each decode reads one member's bytes by
offset: nothing is extracted to disk, and members decode in any order and on any worker.

Members whose names are not image names (``inputs.is_image_name``: the sample's ``.json``,
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
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from .errors import InputError, shown

SHARD_SUFFIXES = (".tar",)
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZ": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def is_shard_name(path: str | os.PathLike) -> bool:
    """True if the file name ends in ``.tar`` (case-insensitive): read as a WebDataset shard."""
    return os.fspath(path).lower().endswith(SHARD_SUFFIXES)


@dataclass(frozen=True)
class TarMember:
    """One image member of a WebDataset shard, read in place by offset.

    Attributes:
        shard: the tar file, as given.
        name: the member's name inside the tar (``000123.jpg``).
        offset: byte offset of the member's data in the tar file.
        size: the member's size in bytes, as its header gives it.
    """

    shard: str
    name: str
    offset: int
    size: int

    def __str__(self) -> str:
        """``<shard>/<member>``: how errors, metadata and ``failures.jsonl`` name the member."""
        return f"{self.shard}/{self.name}"

    def read(self) -> bytes:
        """The member's bytes.

        Raises:
            InputError: kinds ``not-found`` / ``unreadable`` (the shard), ``empty`` (a 0-byte member),
                ``truncated`` (the shard ends inside this member).
        """
        name = str(self)
        if self.size == 0:
            raise InputError(name, "empty", "empty member (0 bytes)")
        try:
            with open(self.shard, "rb") as f:
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
    """The image members of ``shard``, in the tar's order (``inputs.is_image_name`` on each name).

    A shard that cannot be read, is compressed, or is not a tar is appended to ``problems`` (one
    ``InputError`` naming the shard) and gives no members; a header that is cut (kind ``truncated``)
    or damaged (``unreadable``) part-way is appended likewise, after the members before it. A member whose data the end of the file cuts
    is still listed: it fails, kind ``truncated``, when it is read (``TarMember.read``).
    """
    from .inputs import is_image_name

    try:
        f = open(shard, "rb")
    except OSError as e:
        problems.append(InputError(shard, "unreadable", e.strerror or str(e)))
        return
    with f:
        head = f.read(6)
        for magic, kind in _COMPRESSED.items():
            if head.startswith(magic):
                problems.append(InputError(shard, "unsupported", f"{kind}-compressed tar: vitembed reads shards in place, "
                                           "by offset, which needs an uncompressed .tar (as webdataset and img2dataset "
                                           "write by default); decompress it first"))
                return
        size = os.fstat(f.fileno()).st_size
        f.seek(0)
        try:
            archive = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            problems.append(InputError(shard, "not-an-image", f"not a tar file ({e})"))
            return
        last: tarfile.TarInfo | None = None
        while True:
            try:
                info = archive.next()
            except (tarfile.ReadError, EOFError):  # the end cut a member's data: that member fails when read
                info = None
            if info is None:
                break
            last = info
            if info.isreg() and is_image_name(info.name):
                yield TarMember(shard, info.name, info.offset_data, info.size)
        # tarfile ends quietly at a header it cannot read; the end-of-archive marker is zeros.
        end = 0 if last is None else last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if end < size:
            f.seek(end)
            if any(f.read(2 * tarfile.BLOCKSIZE)):
                after = f"after {shown(last.name)}" if last is not None else "at the start"
                cut = size - end < tarfile.BLOCKSIZE
                problems.append(InputError(
                    shard, "truncated" if cut else "unreadable",
                    f"{'the shard ends inside' if cut else 'a damaged'} tar header {after} (byte {end}); the members "
                    "before it are read, any from there on cannot be found"))


def member_relpath(name: str) -> str | None:
    """The member's name as a relative POSIX path (``./a/b.jpg`` -> ``a/b.jpg``); None for a name that
    is absolute or climbs out (``../x.jpg``), which would place an output outside the shard's folder."""
    parts = [p for p in PurePosixPath(name).parts if p not in (".", "")]
    if not parts or name.startswith("/") or ".." in parts:
        return None
    return "/".join(parts)


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Brace patterns as webdataset and bash write them: ``s/{00000..00002}.tar`` -> ``s/00000.tar``,
    ``s/00001.tar``, ``s/00002.tar`` (zero-padded to the width of the bounds), ``{a,b}`` -> ``a``, ``b``;
    several braces give their product, in order. A pattern without a valid brace is returned as is.
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numeric:
        low, high = numeric.groups()
        width = len(low) if low.startswith("0") and len(low) > 1 else 0
        step = 1 if int(high) >= int(low) else -1
        choices = [str(n).zfill(width) for n in range(int(low), int(high) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:  # "{}" or "{x}": not a pattern, taken literally
        head, tail = pattern[: match.end()], pattern[match.end():]
        return [head + rest for rest in expand_braces(tail)]
    prefix, suffix = pattern[: match.start()], pattern[match.end():]
    return [prefix + choice + rest for choice, rest in itertools.product(choices, expand_braces(suffix))]
