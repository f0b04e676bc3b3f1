"""The first stage: command-line inputs -> a deterministic list of jobs (source file -> output file).

An INPUT is an image file (output ``DIR/<its name>.<format>``), a directory
(searched recursively for image extensions, case-insensitive; output
``DIR/<path relative to the directory>.<format>``), or ``-`` for paths read
from stdin (output ``DIR/<the path as given>.<format>``). A path from stdin that
is absolute or climbs out of the current directory is placed under
``DIR/_root/<its absolute path>``, so that no output is ever written outside
DIR. Does not import torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .decode import is_image_name
from .errors import InputError

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


def walk_images(directory: str) -> Iterator[str]:
    """Image files under ``directory``, recursively, in sorted order; symlinked directories not followed."""
    for root, dirs, files in os.walk(directory):
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


def plan_jobs(
    inputs: Iterable[str], out_dir: str | os.PathLike, fmt: str, stdin_paths: Iterable[str] = ()
) -> tuple[list[Job], list[InputError]]:
    """Expand inputs into jobs.

    Args:
        inputs: files and directories from the command line (``-`` already replaced
            by ``stdin_paths``).
        out_dir: the output directory DIR.
        fmt: output format, used as the file suffix (``safetensors`` or ``npy``).
        stdin_paths: paths read from stdin.

    Returns:
        (jobs, problems): jobs in a deterministic order, each source once; problems
        are inputs that cannot become jobs (missing path, two sources mapped
        to the same output), reported as ``InputError`` so the run can go on.
    """
    out = Path(out_dir)
    candidates: list[tuple[str, str]] = []
    problems: list[InputError] = []
    for arg in inputs:
        if os.path.isdir(arg):
            for path in walk_images(arg):
                candidates.append((path, PurePosixPath(*Path(os.path.relpath(path, arg)).parts).as_posix()))
        elif os.path.lexists(arg):
            candidates.append((arg, Path(arg).name))
        else:
            problems.append(InputError(arg, "not-found", "no such file or directory"))
    for path in stdin_paths:
        if os.path.isdir(path):
            for inner in walk_images(path):
                candidates.append((inner, _safe_relpath(inner)))
        else:
            candidates.append((path, _safe_relpath(path)))

    jobs: list[Job] = []
    by_output: dict[str, str] = {}
    seen_sources: set[str] = set()
    for source, rel in candidates:
        key = os.path.realpath(source)
        if key in seen_sources:
            continue
        seen_sources.add(key)
        if rel in by_output:
            problems.append(
                InputError(source, "collision", f"would write the same output as {by_output[rel]} ({rel}.{fmt})")
            )
            continue
        by_output[rel] = source
        jobs.append(Job(source, rel, out / f"{rel}.{fmt}"))
    return jobs, problems
