"""The first stage: command-line inputs -> a deterministic list of jobs (source file -> output file).

An INPUT is an image file (output ``DIR/<its name>.<format>``), a directory
(searched recursively for image extensions, case-insensitive; output
``DIR/<path relative to the directory>.<format>``), or ``-`` for paths read
from stdin (output ``DIR/<the path as given>.<format>``); symlinked folders are followed,
each real folder once. A path from stdin that
is absolute or climbs out of the current directory is placed under
``DIR/_root/<its absolute path>``, so that no output is ever written outside
DIR. An output name longer than a file system allows is shortened with a hash
(``output_name``). Does not import torch.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import InputError, UsageError, printable, shown
from .shards import TarMember, expand_braces, is_shard_name, list_members, member_relpath
from .walk import image_extensions, is_image_name, walk_images  # noqa: F401  (part of this module's API)

ROOT_DIR = "_root"


@dataclass(frozen=True)
class Job:
    """One image to encode.

    Attributes:
        source: the image file, as given or found by the walk.
        relpath: POSIX path of the output relative to DIR, without the format
            suffix (``sub/cat.jpg``).
        output: ``DIR/relpath.<format>``.
        member: for a WebDataset shard's member, where it lies in the tar (``shards.TarMember``);
            ``source`` is then ``<shard>/<member name>``.
    """

    source: str
    relpath: str
    output: Path
    member: TarMember | None = None

    @property
    def image(self) -> str | TarMember:
        """What the decode stage opens: the file ``source``, or the shard member."""
        return self.member if self.member is not None else self.source

    @property
    def key(self) -> str:
        """``relpath`` as valid UTF-8 text (``errors.printable``): the input's name in ``--pack``
        indexes, JSON and metadata. ``plan_jobs`` never plans two jobs with one key."""
        return printable(self.relpath)


NAME_MAX = 255  # bytes in one file name: ext4, XFS, btrfs, APFS, NTFS (in UTF-16 units)


def output_name(name: str, suffix: str) -> str:
    """The file name of an output: ``name + suffix`` (``cat.jpg`` + ``.safetensors``), or, when
    that exceeds ``NAME_MAX`` bytes, the name cut short at a character boundary, followed by
    ``~`` and 12 hex digits of the sha1 of the whole name, then the suffix. The same name always
    gives the same output name, so a re-run finds its outputs; the source path is in the metadata."""
    whole = os.fsencode(name + suffix)
    if len(whole) <= NAME_MAX:
        return name + suffix
    tail = "~" + hashlib.sha1(os.fsencode(name)).hexdigest()[:12] + suffix
    head = os.fsencode(name)[: NAME_MAX - len(os.fsencode(tail))]
    for cut in range(4):  # do not split a UTF-8 sequence (names that are UTF-8 stay UTF-8)
        try:
            head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        head = head[: len(head) - cut]
        break
    return os.fsdecode(head) + tail


def read_path_list(stream, null_separated: bool = False) -> list[str]:
    """Paths from a text or binary stream, one per line (or NUL-separated); blank entries dropped."""
    data = stream.read()
    if isinstance(data, bytes):
        data = os.fsdecode(data)
    separator = "\0" if null_separated else "\n"
    entries = data.split(separator)
    if not null_separated:
        entries = [e[:-1] if e.endswith("\r") else e for e in entries]
    return [e for e in entries if e]


def _safe_relpath(path: str, base: str | None = None) -> str:
    """Relative output location for a path read from stdin or a table, or for any input under
    ``--relative-to base``: the real path (symlinks resolved) relative to ``base`` (a real path; None:
    the path as given, relative to the current directory) if it stays inside, else ``_root/<absolute path>``."""
    # String operations, not pathlib: a table of 10^7 rows goes through here once per row.
    normal = os.path.normpath(path) if base is None else os.path.relpath(os.path.realpath(path), base)
    if os.path.isabs(normal) or normal == ".." or normal.startswith(".." + os.sep):
        return _posix(ROOT_DIR + os.path.abspath(path))
    return _posix(normal)


def _posix(path: str) -> str:
    return path if os.sep == "/" else PurePosixPath(*Path(path).parts).as_posix()


def _expanded(inputs: Iterable[str]) -> Iterator[str]:
    """The inputs, with a brace pattern that names no file (``shards/{00000..00099}.tar``, quoted
    so that no shell expanded it) replaced by its expansion (``shards.expand_braces``)."""
    for arg in inputs:
        if "{" in arg and not os.path.lexists(arg):
            yield from expand_braces(arg)
        else:
            yield arg


@dataclass
class Plan:
    """The inputs of a run, expanded.

    Attributes:
        jobs: images to encode, in a deterministic order.
        problems: inputs that cannot become jobs (missing path, unreadable
            folder, two sources mapped to one output), as ``InputError``.
        duplicates: (source, first source) for inputs naming a file already planned.
        passed_over: files a folder walk did not take because their names are not
            image names (``is_image_name``), reported as a count.
        sharded: (K, N) when this is shard K of N (``shard``), else None.
    """

    out_dir: Path
    jobs: list[Job] = field(default_factory=list)
    problems: list[InputError] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    passed_over: list[str] = field(default_factory=list)
    sharded: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.jobs) + len(self.problems) + len(self.duplicates)

    def shard(self, index: int, count: int) -> "Plan":
        """The part of this plan that shard ``index`` of ``count`` (0-based) processes.

        Jobs are assigned by a stable hash of their output path relative to DIR
        (problems and duplicates by their source path), so ``count`` runs with
        the same inputs, one per index, cover every input exactly once.

        ``index`` and ``count`` come checked from ``options.RunOptions``.
        """
        mine = lambda key: shard_of(key, count) == index  # noqa: E731
        return Plan(
            self.out_dir,
            [j for j in self.jobs if mine(j.relpath)],
            [p for p in self.problems if mine(p.path)],
            [d for d in self.duplicates if mine(d[0])],
            [p for p in self.passed_over if mine(p)],
            (index, count),
        )


def shard_of(key: str, count: int) -> int:
    """Stable shard number of ``key`` in [0, count): sha1 of its bytes, modulo count."""
    digest = hashlib.sha1(os.fsencode(key)).digest()
    return int.from_bytes(digest[:8], "big") % count


def out_path(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as a Path, refusing an empty one (``Path("")`` would silently be the current folder).

    Raises:
        UsageError: ``out_dir`` is empty.
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        raise UsageError(f"--out must be a path (got {out_dir!r})")
    if not os.fspath(out_dir):
        raise UsageError("--out: empty path; name the output folder (use --out . for the current folder)")
    return Path(out_dir)


def plan_jobs(
    inputs: Iterable[str],
    out_dir: str | os.PathLike,
    fmt: str,
    stdin_paths: Iterable[str] = (),
    relative_to: str | os.PathLike | None = None,
) -> Plan:
    """Expand inputs into jobs.

    Each input's key (its output path under DIR, without the suffix) is, without ``relative_to``:
    a file's name for a file named as an input, the path below the folder for a folder walk, and
    the path as given for a path from stdin or a table (``_root/<absolute path>`` when it is absolute
    or climbs out of the current directory). With ``relative_to`` every input's key is its path
    relative to that folder (``_root/...`` outside it), so one file gets one key however it was
    named: a folder walk, ``find | vitembed encode -`` and a table then resume each other. A
    WebDataset shard (``.tar``, ``shards.py``) gives one input per image member, keyed
    ``<the shard's key>/<member name>``; a brace pattern naming no file is expanded first.

    Args:
        inputs: files, directories and shards from the command line (``-`` already replaced by
            ``stdin_paths``).
        out_dir: the output directory DIR.
        fmt: output format, used as the file suffix (``safetensors`` or ``npy``).
        stdin_paths: paths read from stdin or a table (any iterable; read once, in order).
        relative_to: the folder keys are relative to (``--relative-to``).

    Returns:
        A ``Plan``; each source file is planned once (the same file named twice,
        also through a symlink, is listed in ``duplicates``).

    Raises:
        UsageError: ``out_dir`` is empty (``Path("")`` would be the current folder), or
            ``relative_to`` is not a folder.
    """
    out = out_path(out_dir)
    if relative_to is not None and not os.path.isdir(relative_to):
        what = "not a folder" if os.path.exists(relative_to) else "no such folder"
        raise UsageError(f"--relative-to {shown(os.fspath(relative_to))}: {what}")
    base = None if relative_to is None else os.path.realpath(os.fspath(relative_to))
    plan = Plan(out)
    _admit(_candidates(inputs, stdin_paths, base, plan), plan, f".{fmt}")
    return plan


Candidate = tuple[str, str, "TarMember | None"]  # (source, key before printable(), the shard member)


def _nul(path: str) -> InputError | None:
    """The problem of a path holding a NUL byte (from a table, stdin or a tar header), which no file
    name can; None for any other path."""
    if "\0" not in path:
        return None
    return InputError(path.replace("\0", "\\0"), "bad-name", "the path holds a NUL byte, which no file name can")


def _candidates(inputs: Iterable[str], stdin_paths: Iterable[str], base: str | None, plan: Plan) -> list[Candidate]:
    """Every input expanded (folders walked, shards listed, brace patterns expanded) with its key
    (``plan_jobs``); what cannot be an input goes to ``plan.problems`` / ``plan.passed_over``."""
    candidates: list[Candidate] = []

    def add_file(path: str, rel: str) -> None:
        if not is_shard_name(path):
            candidates.append((path, rel, None))
            return
        for member in list_members(path, plan.problems):
            inner = member_relpath(member.name)
            if inner is None:
                plan.problems.append(InputError(str(member), "bad-name", "member name is absolute or climbs out "
                                                "(..): its output would lie outside the shard's folder"))
            else:
                candidates.append((str(member), f"{rel}/{inner}", member))

    def walk(folder: str, rel_of) -> None:
        for path in walk_images(folder, plan.problems, plan.passed_over, exclude=plan.out_dir):
            add_file(path, rel_of(path))

    for arg in _expanded(inputs):
        if (problem := _nul(arg)) is not None:
            plan.problems.append(problem)
            continue
        try:
            is_dir = stat.S_ISDIR(os.stat(arg).st_mode)
        except FileNotFoundError:
            if os.path.islink(arg):  # a dangling symlink: its own input, reported when it is read
                candidates.append((arg, Path(arg).name if base is None else _safe_relpath(arg, base), None))
            else:
                plan.problems.append(InputError(arg, "not-found", "no such file or directory"))
            continue
        except PermissionError:
            plan.problems.append(InputError(arg, "unreadable", "permission denied (a folder on its path cannot be searched)"))
            continue
        except OSError as e:  # a name too long, a symlink loop, a file used as a folder
            plan.problems.append(InputError(arg, "unreadable", e.strerror or str(e)))
            continue
        if is_dir and base is None:
            walk(arg, lambda path, top=arg: _posix(os.path.relpath(path, top)))
        elif is_dir:
            walk(arg, lambda path: _safe_relpath(path, base))
        else:
            add_file(arg, Path(arg).name if base is None else _safe_relpath(arg, base))
    for path in stdin_paths:
        if (problem := _nul(path)) is not None:
            plan.problems.append(problem)
        elif os.path.isdir(path):
            walk(path, lambda inner: _safe_relpath(inner, base))
        else:
            add_file(path, _safe_relpath(path, base))
    return candidates


def _admit(candidates: list[Candidate], plan: Plan, suffix: str) -> None:
    """Candidates -> ``plan.jobs``, each source once (a repeat of the same file, also through a
    symlink, or of the same shard member goes to ``plan.duplicates``), no two with one key or one
    output (``collision`` problems). Names that differ only in bytes that are not UTF-8 (k\\xff.jpg,
    raw byte 0xff) and their printed form (the text k\\xff.jpg) would share a key in an index and a
    "source" in metadata, so keys are compared printed."""
    by_key: dict[str, tuple[str, str]] = {}
    by_output: dict[str, str] = {}
    out_text = os.fspath(plan.out_dir)
    first_of: dict[str, str] = {}
    shard_identity = functools.lru_cache(maxsize=64)(os.path.realpath)
    for source, rel, member in candidates:
        if member is not None and (problem := _nul(source)) is not None:  # a NUL byte in a tar header's name
            plan.problems.append(problem)
            continue
        # Only existing regular files (and members of one) are the same by identity; anything else is its own input.
        if member is not None:
            named = f"{shard_identity(member.shard)}\0{member.name}"
            identity = f"{named}\0{member.offset}"
            if identity not in first_of and named in first_of:  # the same name again, at another offset
                plan.problems.append(InputError(source, "collision", "the shard holds another member of this name before "
                                                "this one; the first is encoded (tar extraction would keep the last)"))
                first_of[identity] = source  # the same shard named again: a duplicate, not a second report
                continue
            first_of.setdefault(named, source)
        else:
            identity = os.path.realpath(source) if os.path.isfile(source) else source
        if identity in first_of:
            plan.duplicates.append((source, first_of[identity]))
            continue
        first_of[identity] = source
        key = printable(rel)
        if key in by_key:
            first, first_rel = by_key[key]
            why = (
                f"would write the same output as {shown(first)} ({shown(key)}{suffix})"
                if first_rel == rel
                else f"its name prints the same as that of {shown(first)} ({shown(key)}; one of the two holds "
                "bytes that are not UTF-8), so their outputs, keys and metadata could not be told apart; rename one"
            )
            plan.problems.append(InputError(source, "collision", why))
            continue
        parent, _, name = rel.rpartition("/")
        file_name = output_name(name, suffix)
        where = os.path.join(out_text, parent, file_name) if parent else os.path.join(out_text, file_name)
        if where in by_output:  # a name spelled like another's shortened output name (output_name)
            plan.problems.append(InputError(
                source, "collision", f"would write the same output as {shown(by_output[where])} ({shown(file_name)})"))
            continue
        by_key[key] = (source, rel)
        by_output[where] = source
        plan.jobs.append(Job(source, rel, Path(where), member))
