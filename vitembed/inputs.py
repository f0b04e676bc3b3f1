"""The first stage: command-line inputs -> a deterministic list of jobs (source file -> output file).

An INPUT is an image file (output ``DIR/<its name>.<format>``), a directory
(searched recursively for image extensions, case-insensitive; output
``DIR/<path relative to the directory>.<format>``), or ``-`` for paths read
from stdin (output ``DIR/<the path as given>.<format>``); symlinked folders are followed,
each real folder once. A path from stdin that
is absolute or climbs out of the current directory is placed under
``DIR/_root/<its absolute path>``, so that no output is ever written outside
DIR. Does not import torch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .decode import is_image_name
from .errors import InputError, UsageError

ROOT_DIR = "_root"


@dataclass(frozen=True)
class Job:
    """One image to encode.

    Attributes:
        source: the image file, as given or found by the walk.
        relpath: POSIX path of the output relative to DIR, without the format
            suffix (``sub/cat.jpg``).
        output: ``DIR/relpath.<format>``.
    """

    source: str
    relpath: str
    output: Path


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


def walk_images(directory: str, errors: list[InputError] | None = None) -> Iterator[str]:
    """Image files under ``directory``, recursively, in sorted order.

    Symlinked folders are followed, each real folder listed once, so symlink
    loops cannot hang the walk. A folder that cannot be listed is appended to
    ``errors`` as an ``unreadable`` InputError instead of being skipped silently.
    """

    def on_error(e: OSError) -> None:
        if errors is not None:
            errors.append(InputError(e.filename or directory, "unreadable", f"cannot list folder: {e.strerror or e}"))

    seen: set[tuple[int, int]] = set()
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
            if is_image_name(name):
                yield os.path.join(root, name)


def _safe_relpath(path: str) -> str:
    """Relative output location for a path read from stdin: as given if it stays inside the
    current directory, else ``_root/<absolute path>``."""
    normal = os.path.normpath(path)
    if os.path.isabs(normal) or normal == ".." or normal.startswith(".." + os.sep):
        absolute = os.path.abspath(path)
        return str(PurePosixPath(ROOT_DIR, *Path(absolute).parts[1:]))
    return PurePosixPath(*Path(normal).parts).as_posix()


@dataclass
class Plan:
    """The inputs of a run, expanded.

    Attributes:
        jobs: images to encode, in a deterministic order.
        problems: inputs that cannot become jobs (missing path, unreadable
            folder, two sources mapped to one output), as ``InputError``.
        duplicates: (source, first source) for inputs naming a file already planned.
        sharded: (K, N) when this is shard K of N (``shard``), else None.
    """

    out_dir: Path
    jobs: list[Job] = field(default_factory=list)
    problems: list[InputError] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    sharded: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.jobs) + len(self.problems) + len(self.duplicates)

    def shard(self, index: int, count: int) -> "Plan":
        """The part of this plan that shard ``index`` of ``count`` (0-based) processes.

        Jobs are assigned by a stable hash of their output path relative to DIR
        (problems and duplicates by their source path), so ``count`` runs with
        the same inputs, one per index, cover every input exactly once.

        Raises:
            UsageError: unless 0 <= index < count.
        """
        if not 0 <= index < count:
            raise UsageError(f"--shard {index}/{count}: expected K/N with 0 <= K < N")
        mine = lambda key: shard_of(key, count) == index  # noqa: E731
        return Plan(
            self.out_dir,
            [j for j in self.jobs if mine(j.relpath)],
            [p for p in self.problems if mine(p.path)],
            [d for d in self.duplicates if mine(d[0])],
            (index, count),
        )


def shard_of(key: str, count: int) -> int:
    """Stable shard number of ``key`` in [0, count): sha1 of its bytes, modulo count."""
    digest = hashlib.sha1(os.fsencode(key)).digest()
    return int.from_bytes(digest[:8], "big") % count


def plan_jobs(inputs: Iterable[str], out_dir: str | os.PathLike, fmt: str, stdin_paths: Iterable[str] = ()) -> Plan:
    """Expand inputs into jobs.

    Args:
        inputs: files and directories from the command line (``-`` already replaced
            by ``stdin_paths``).
        out_dir: the output directory DIR.
        fmt: output format, used as the file suffix (``safetensors`` or ``npy``).
        stdin_paths: paths read from stdin.

    Returns:
        A ``Plan``; each source file is planned once (the same file named twice,
        also through a symlink, is listed in ``duplicates``).
    """
    out = Path(out_dir)
    plan = Plan(out)
    candidates: list[tuple[str, str]] = []
    for arg in inputs:
        if os.path.isdir(arg):
            for path in walk_images(arg, plan.problems):
                candidates.append((path, PurePosixPath(*Path(os.path.relpath(path, arg)).parts).as_posix()))
        elif os.path.lexists(arg):
            candidates.append((arg, Path(arg).name))
        else:
            plan.problems.append(InputError(arg, "not-found", "no such file or directory"))
    for path in stdin_paths:
        if os.path.isdir(path):
            for inner in walk_images(path, plan.problems):
                candidates.append((inner, _safe_relpath(inner)))
        else:
            candidates.append((path, _safe_relpath(path)))

    by_output: dict[str, str] = {}
    first_of: dict[str, str] = {}
    for source, rel in candidates:
        # Only existing regular files are the same file by identity; anything else is its own input.
        key = os.path.realpath(source) if os.path.isfile(source) else source
        if key in first_of:
            plan.duplicates.append((source, first_of[key]))
            continue
        first_of[key] = source
        if rel in by_output:
            plan.problems.append(
                InputError(source, "collision", f"would write the same output as {by_output[rel]} ({rel}.{fmt})")
            )
            continue
        by_output[rel] = source
        plan.jobs.append(Job(source, rel, out / f"{rel}.{fmt}"))
    return plan
