"""The last stage: one embedding -> one file, written atomically.

Every file is written under a temporary name in its destination folder and
renamed into place (``os.replace``), so a reader, or a job killed at any moment,
only ever sees complete files. ``safetensors`` holds one tensor ``embedding``
and string metadata; ``npy`` holds the same array and no metadata.
"""

from __future__ import annotations

import functools
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("safetensors", "npy")
TENSOR_NAME = "embedding"


def check_format(fmt: str, save_dtype: str) -> None:
    """Raise UsageError for a format that does not exist or cannot hold ``save_dtype``."""
    from .errors import UsageError

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "npy" and save_dtype == "bfloat16":
        raise UsageError("--format npy cannot hold bfloat16; use --save-dtype float16/float32 or --format safetensors")


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process umask (read once: reading it means setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """Raise UsageError unless ``out_dir`` is, or can be created as, a writable folder.

    An empty path is refused (``Path("")`` would mean the current folder).

    Creates nothing: the nearest existing ancestor is checked instead.
    """
    from .errors import UsageError, shown

    from .inputs import out_path

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


def atomic_write(path: Path, *chunks: bytes | memoryview, exclusive: bool = False) -> None:
    """Write ``chunks``, one after another, to ``path`` through a temporary file in the same folder and a rename.

    ``exclusive``: never replace an existing ``path`` (a hard link instead of a
    rename, which fails when the name is taken): raises FileExistsError then.

    Creates missing parent folders. On any error the temporary file is removed
    and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A short name: any output name that fits the file system fits here too.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".vitembed-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        if exclusive:
            try:
                os.link(tmp, path)  # atomic, and fails if another process has taken the name
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: check, then rename (a narrow race)
                if os.path.lexists(path):
                    raise FileExistsError(17, "File exists", str(path)) from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _canonical_header(data: bytes) -> tuple[bytes, memoryview]:
    """The same safetensors file with its JSON header keys sorted: (new header, tensor data).

    safetensors writes the metadata in hash-map order, which changes from one
    process to the next; sorting makes equal embeddings and metadata give
    byte-identical files. Layout (safetensors format): u64 little-endian header
    length, JSON header padded with spaces to a multiple of 8 bytes, tensor data
    (offsets in the header are relative to the data, so they are unchanged).
    The data is returned as a view, not copied; write the two one after the other.
    """
    import json

    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, memoryview(data)[8 + length :]


def write_embedding(path: Path, embedding, metadata: dict[str, str], fmt: str) -> None:
    """Write one embedding.

    Args:
        path: destination file.
        embedding: CPU torch tensor, (tokens, hidden) or (hidden,), in the save dtype.
        metadata: string -> string, stored in the safetensors header (ignored for npy).
        fmt: ``safetensors`` or ``npy`` (npy cannot hold bfloat16).
    """
    if fmt == "safetensors":
        from safetensors.torch import save

        atomic_write(path, *_canonical_header(save({TENSOR_NAME: embedding.contiguous()}, metadata=metadata)))
    elif fmt == "npy":
        import io

        import numpy as np

        buffer = io.BytesIO()
        np.save(buffer, embedding.numpy(), allow_pickle=False)
        atomic_write(path, buffer.getbuffer())
    else:
        raise ValueError(f"unknown format {fmt!r}")


SETTINGS_FILE = "vitembed.json"
FAILURES_FILE = "failures.jsonl"
# Metadata keys that may differ between outputs of one DIR: the input, the version, where the
# weights were read from (they are identified by their sha256, or by random_weights and seed), and
# --compile (the same function; results agree within float32 rounding, as across devices).
KEYS_NOT_COMPARED = ("source", "vitembed_version", "weights", "compile")


def run_settings(metadata: dict[str, str]) -> dict[str, str]:
    """The part of an output's metadata that must be equal across the outputs of one DIR."""
    return {k: v for k, v in metadata.items() if k not in KEYS_NOT_COMPARED}


def _differences(ours: dict[str, str], theirs: dict[str, str]) -> str:
    keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    shown_keys, rest = keys[:6], keys[6:]
    text = "; ".join(f"{k}: {theirs.get(k, '<none>')!r} there, {ours.get(k, '<none>')!r} now" for k in shown_keys)
    return text + (f"; and {len(rest)} more: {', '.join(rest)}" if rest else "")


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
    from .errors import UsageError, shown
    from .files import read_json

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
    import json

    from .errors import UsageError, shown

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


LOCK_FILE = ".vitembed.lock"


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

        from .errors import UsageError, shown
        from .files import open_regular

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

        from .errors import UsageError, shown

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


def settings_conflict(where: str, ours: dict[str, str], theirs: dict[str, str]):
    """The UsageError for outputs made with other settings."""
    from .errors import UsageError

    return UsageError(
        f"{where} made with other settings ({_differences(ours, theirs)}); "
        "use --overwrite to re-encode, or another --out"
    )


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
        import numpy as np

        np.load(path, mmap_mode="r", allow_pickle=False)  # fails on a short or garbled file
        return "complete", None, st.st_mtime
    except Exception:
        return "incomplete", None, st.st_mtime


def append_failure(out_dir: Path, source: str, kind: str, message: str, run: str = "") -> None:
    """Append one JSON line ``{"path", "kind", "message", "time", "run"}`` to ``DIR/failures.jsonl``.

    ``run`` is the start time of the run (ISO 8601), so that a re-run's failures can be told apart.

    One ``write`` on a file opened with O_APPEND, so concurrent shards do not interleave lines.

    Raises:
        OSError: the log cannot be written (``files.NotRegularFileError`` for a FIFO or folder there).
    """
    import json
    import time

    from .errors import printable

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
    from .files import open_regular

    fd = open_regular(Path(out_dir) / FAILURES_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
