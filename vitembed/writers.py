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

    Creates nothing: the nearest existing ancestor is checked instead.
    """
    from .errors import UsageError, printable

    path = Path(out_dir).absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {printable(out_dir)}: exists and is not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {printable(out_dir)}: {printable(existing)} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {printable(out_dir)}: {printable(existing)} is not writable")


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
    return "; ".join(f"{k}: {theirs.get(k, '<none>')!r} there, {ours.get(k, '<none>')!r} now" for k in keys[:6])


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


def read_dir_state(out_dir: Path) -> DirState:
    """Read ``DIR/vitembed.json`` (missing or unreadable JSON gives an empty state).

    Raises:
        UsageError: the path exists but cannot be read as a file (a folder, no permission).
    """
    import json

    from .errors import UsageError, printable

    path = Path(out_dir) / SETTINGS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return DirState()
    except OSError as e:
        raise UsageError(f"cannot read {printable(path)}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
        settings = data["settings"]
        started = data.get("overwrite_started")
        if not isinstance(settings, dict) or not all(isinstance(v, str) for v in settings.values()):
            return DirState()
        return DirState(settings, float(started) if started is not None else None)
    except (ValueError, KeyError, TypeError):
        return DirState()


def write_dir_state(out_dir: Path, state: DirState) -> None:
    """Write ``DIR/vitembed.json`` atomically.

    Raises:
        UsageError: it cannot be written.
    """
    import json

    from .errors import UsageError, printable

    body = {"settings": state.settings, "overwrite_started": state.overwrite_started}
    try:
        atomic_write(Path(out_dir) / SETTINGS_FILE, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())
    except OSError as e:
        raise UsageError(f"cannot write {printable(Path(out_dir) / SETTINGS_FILE)}: {e.strerror or e}") from None


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
    fd = os.open(Path(out_dir) / FAILURES_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
