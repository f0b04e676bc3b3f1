"""The output folder DIR as a whole: its settings file, its lock, its failure log.

    DIR/vitembed.json       the settings of the outputs in DIR (``settings.py``), and whether an
                            ``--overwrite`` is under way (``DirState``)
    DIR/.vitembed.lock      held by every run for its whole life (``DirLock``)
    DIR/failures.jsonl      one line per input that failed (``append_failure``)

``claim_dir`` is where a run takes DIR: it checks the settings and writes them as one step.
What DIR holds besides is its layout's (``layouts/``). Does not import torch.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError, printable, shown
from .files import atomic_write, open_regular, read_json
from .inputs import out_path
from .settings import settings_conflict

if TYPE_CHECKING:
    from .inputs import Plan
    from .layouts import Layout

SETTINGS_FILE = "vitembed.json"
FAILURES_FILE = "failures.jsonl"
LOCK_FILE = ".vitembed.lock"


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """Raise UsageError unless ``out_dir`` is, or can be created as, a writable folder.

    An empty path is refused (``Path("")`` would mean the current folder).

    Creates nothing: the nearest existing ancestor is checked instead.
    """
    path = out_path(out_dir).absolute()
    try:
        if path.exists() and not path.is_dir():
            raise UsageError(f"--out {shown(out_dir)}: exists and is not a folder")
        existing = path
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise UsageError(f"--out {shown(out_dir)}: {shown(existing)} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"--out {shown(out_dir)}: {shown(existing)} is not writable")
    except OSError as e:  # a name too long, a folder on the way that cannot be searched
        raise UsageError(f"--out {shown(out_dir)}: {e.strerror or e}") from None


@dataclass
class DirState:
    """What ``DIR/vitembed.json`` says about the outputs in DIR.

    Attributes:
        settings: the settings of the outputs (None: no file, or unreadable).
        overwrite_started: wall-clock time (``time.time()``) at which an
            ``--overwrite`` run with these settings started and has not yet
            finished: outputs older than this may still have the old settings.
    """

    settings: dict[str, str] | None = None
    overwrite_started: float | None = None


def read_dir_state(out_dir: Path, tolerate_bad: bool = False) -> DirState:
    """Read ``DIR/vitembed.json`` (a missing file gives an empty state).

    Args:
        tolerate_bad: give an empty state for a file that is not strict JSON or
            does not hold settings (``--overwrite`` replaces it anyway).

    Raises:
        UsageError: the path exists but cannot be read as a regular file (a folder,
            a FIFO, no permission), or (unless ``tolerate_bad``) does not hold settings
            as vitembed writes them (malformed JSON, NaN/Infinity, deep nesting).
    """
    path = Path(out_dir) / SETTINGS_FILE
    try:
        data = read_json(path)
    except FileNotFoundError:
        return DirState()
    except OSError as e:
        raise UsageError(f"cannot read {shown(path)}: {e.strerror or e}") from None
    except ValueError as e:
        data, problem = None, f"not valid JSON ({e})"
    else:
        problem = "does not hold settings as vitembed writes them"
    settings = data.get("settings") if isinstance(data, dict) else None
    started = data.get("overwrite_started") if isinstance(data, dict) else None
    if (
        isinstance(settings, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in settings.items())
        and (started is None or (isinstance(started, (int, float)) and not isinstance(started, bool) and abs(started) < 1e15))
    ):
        return DirState(settings, float(started) if started is not None else None)
    if tolerate_bad:
        return DirState()
    raise UsageError(
        f"{shown(path)}: {problem}; it says how the outputs in {shown(out_dir)} were made. "
        "Restore it, or use --overwrite to re-encode everything, or another --out"
    )


def write_dir_state(out_dir: Path, state: DirState, exclusive: bool = False) -> bool:
    """Write ``DIR/vitembed.json`` atomically.

    Args:
        exclusive: only if no such file exists (another run may have claimed DIR
            in the meantime).

    Returns:
        True when written; False only with ``exclusive`` when the file already exists.

    Raises:
        UsageError: it cannot be written.
    """
    body = {"settings": state.settings, "overwrite_started": state.overwrite_started}
    try:
        atomic_write(Path(out_dir) / SETTINGS_FILE, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode(), exclusive=exclusive)
    except FileExistsError:
        if exclusive:
            return False
        raise UsageError(f"cannot write {shown(Path(out_dir) / SETTINGS_FILE)}: it exists") from None
    except OSError as e:
        raise UsageError(f"cannot write {shown(Path(out_dir) / SETTINGS_FILE)}: {e.strerror or e}") from None
    return True


class DirLock:
    """An advisory lock on an output folder, held for a whole run (``fcntl.flock`` on
    ``DIR/.vitembed.lock``; the OS releases it when the process ends, however it ends).

    Every run holds it shared, from before it reads ``DIR/vitembed.json`` to its
    end, so runs with the same settings work side by side (shards, a resumed job
    beside a running one). A run that replaces DIR's settings (``--overwrite``
    with other settings) needs it exclusive for the moment it writes
    ``vitembed.json`` (``take_over``), and is refused while any other run is in
    DIR; runs starting meanwhile wait that moment out, then read the new settings.
    On a file system without ``flock`` the lock is a no-op (``locked`` is False).

    Raises:
        UsageError: DIR or its lock file cannot be created or opened.
    """

    def __init__(self, out_dir: Path):
        import fcntl

        self.out_dir = Path(out_dir)
        path = self.out_dir / LOCK_FILE
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a symlink planted under the lock's name must not create a file elsewhere.
            self.fd: int | None = open_regular(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0))
        except OSError as e:
            raise UsageError(f"cannot open {shown(path)}: {e.strerror or e}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH)
            self.locked = True
        except OSError:  # e.g. a FUSE file system without flock: go on unlocked, as before locks existed
            self.locked = False

    def take_over(self) -> None:
        """Hold the lock exclusively, to replace DIR's settings; ``share`` afterwards.

        Raises:
            UsageError: another run holds DIR (this run's shared hold is then gone too).
        """
        import fcntl

        if not self.locked or self.fd is None:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"another vitembed run is writing into {shown(self.out_dir)}; replacing its settings now would mix "
                "outputs made two ways. Wait for it to finish, or use another --out"
            ) from None

    def share(self) -> None:
        """Back to a shared hold after ``take_over``."""
        import fcntl

        if self.locked and self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_SH)

    def close(self) -> None:
        """Release the lock (closing the file releases it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def append_failure(out_dir: Path, source: str, kind: str, message: str, run: str = "") -> None:
    """Append one JSON line ``{"path", "kind", "message", "time", "run"}`` to ``DIR/failures.jsonl``.

    ``run`` is the start time of the run (ISO 8601), so that a re-run's failures can be told apart.

    One ``write`` on a file opened with O_APPEND, so concurrent shards do not interleave lines.

    Raises:
        OSError: the log cannot be written (``files.NotRegularFileError`` for a FIFO or folder there).
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    line = json.dumps(
        {
            "path": printable(source),
            "kind": kind,
            "message": message,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run": run,
        },
        ensure_ascii=False,
    )
    fd = open_regular(Path(out_dir) / FAILURES_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def claim_dir(
    plan: "Plan", settings: dict[str, str], lock: DirLock, overwrite: bool, layout: "Layout"
) -> tuple[list, list, DirState]:
    """Claim DIR for a run with ``settings``: the settings check and the write of
    ``DIR/vitembed.json`` as one step that concurrent runs cannot interleave.

    Under ``lock`` (held shared; see ``DirLock``): a DIR without settings is
    claimed by creating ``vitembed.json`` exclusively, so of two runs with different
    settings started at the same moment one creates it and the other is refused by
    the comparison that follows; ``overwrite`` with other settings takes the lock
    exclusively first, and is refused while another run is in DIR.

    Without ``overwrite``, DIR's settings must be ``settings``, no other layout's outputs for
    the plan may have others (``Layout.check_settings``), and ``layout.scan`` says which
    inputs are done.

    Returns:
        (jobs to encode, results of inputs already done, the state written).

    Raises:
        UsageError: DIR holds outputs made with other settings, or another run
            holds DIR while ``overwrite`` would replace its settings.
    """
    from .layouts import others

    out_dir = Path(plan.out_dir)
    state = read_dir_state(out_dir, tolerate_bad=overwrite)
    if overwrite:
        if state.settings != settings:
            try:
                lock.take_over()
            except UsageError:  # held by others: fine if they are runs of ours that replaced the settings first
                lock.share()  # the failed exclusive attempt gave up the shared hold too
                if read_dir_state(out_dir, tolerate_bad=True).settings != settings:
                    raise
        new = DirState(settings, overwrite_started=time.time())
        write_dir_state(out_dir, new)
        lock.share()
        return list(plan.jobs), [], new
    if state.settings is not None and state.settings != settings:
        raise settings_conflict(f"{shown(out_dir)} holds outputs", settings, state.settings)
    if state.overwrite_started is None:  # another layout's outputs: refused like other settings
        for other in others(layout):
            other.check_settings(plan, settings)
    todo, done = layout.scan(plan, settings, state)  # raises before anything is written
    new = DirState(settings, state.overwrite_started if state.settings == settings else None)
    if state.settings is None:
        if not write_dir_state(out_dir, new, exclusive=True):  # another run claimed DIR since we read it
            theirs = read_dir_state(out_dir)
            if theirs.settings is None:  # the name is taken by something that is not a settings file
                raise UsageError(f"{shown(out_dir / SETTINGS_FILE)} exists but cannot be read (a dangling symlink?); "
                                 "remove it, or use another --out")
            if theirs.settings != settings:
                raise settings_conflict(f"{shown(out_dir)} was just claimed by another run", settings, theirs.settings or {})
            new = theirs
    elif new != state:
        write_dir_state(out_dir, new)
    return todo, done, new
