"""``vitembed export``: the vectors of a folder of outputs as one file search tools read directly.

OUT.npy is (N, D) float32 plus OUT.keys.jsonl ({"row", "key", "source"} per line); OUT.parquet has
columns key, source and embedding (fixed_size_list<float32>[D]). Rows come in the packed index's
order (``iter_packed``) or sorted by relative path (per-image files, as ``vitembed.load``). One
output file or part is held at a time and rows are written in batches; everything is written
under temporary names and renamed at the end, so a failed export leaves no OUT.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .errors import InputError, UsageError, printable, shown
from .settings import _differences, run_settings

__all__ = ["Exported", "export_vectors", "iter_vectors"]

EXPORT_POOLS = ("cls", "mean")
ROW_GROUP = 65536  # parquet rows per row group (and per write)...
ROW_GROUP_BYTES = 64 << 20  # ...or fewer, for vectors wider than 256
NPY_BATCH = 8192  # npy rows per write


@dataclass
class Exported:
    """What ``export_vectors`` wrote: ``rows`` vectors of ``dim`` float32 to ``out``; ``keys``: OUT.keys.jsonl (None for parquet)."""

    rows: int
    dim: int
    out: str
    keys: str | None


def iter_vectors(emb: str | os.PathLike, pool: str | None = None) -> Iterator[tuple[str, str, np.ndarray]]:
    """(key, source, vector) for every output in EMB, streamed: one file or one part held at a time.

    Args:
        emb: a folder of per-image outputs (``.safetensors`` or ``.npy``, nested folders too) or a
            packed folder (``part-*.safetensors`` + ``index.jsonl``).
        pool: how to pool token outputs (``--pool none`` or ``patch`` at encode): ``cls`` (token 0)
            or ``mean`` (of the patch tokens, prefix tokens left out, as ``encode --pool mean``).
            None for outputs that are pooled vectors already.

    Yields:
        the output's key, its source (metadata; '' for npy files), and a (D,) float32 vector
        (bfloat16 and float16 outputs converted).

    Raises:
        InputError: EMB does not exist, or an output file cannot be read (named).
        UsageError: EMB is not a folder of outputs; outputs of different settings or shapes (the first
            file that differs named); token outputs without ``pool``, or a ``pool`` they cannot take.
    """
    from .layouts import PackedLayout

    emb = Path(emb)
    if not emb.exists():
        raise InputError(str(emb), "not-found", "no such folder")
    if not emb.is_dir():
        raise UsageError(f"{shown(emb)}: export reads a folder of outputs (per-image files or --pack parts), not a file")
    _check_pool(pool)
    yield from (_packed_rows if PackedLayout.owns(emb) else _files_rows)(emb, pool)


def _check_pool(pool: str | None) -> None:
    if pool is not None and pool not in EXPORT_POOLS:
        raise UsageError(f"--pool {pool!r}: export pools token outputs with {' or '.join(EXPORT_POOLS)} "
                         "(--pool head needs the model: encode with --pool head)")


def _pooler(settings: dict[str, str], shape: tuple, pool: str | None, where: str):
    """The function turning one stored output of ``shape`` into a (D,) float32 vector (``Family.pool``
    for tokens); UsageError for token outputs without ``pool``, or a ``pool`` they cannot take."""
    stored = settings.get("pool", "")
    if len(shape) == 1:
        if pool is not None and pool != stored:
            raise UsageError(f"{where}: the outputs are pooled vectors already (encoded with --pool {stored or '?'}); "
                             f"drop --pool {pool}")
        return lambda a: np.asarray(a, dtype=np.float32)
    if pool is None:
        raise UsageError(f"{where}: the outputs hold tokens, shape {tuple(shape)} (encoded with --pool {stored or '?'}); "
                         "say how to pool them: --pool cls (the class token) or --pool mean (the mean of the patch tokens)")
    if stored != "patch" and "prefix_tokens" not in settings:
        raise UsageError(f"{where}: no metadata says how many prefix tokens precede the patches "
                         "(npy outputs without vitembed.json); cannot pool them")
    prefix = 0 if stored == "patch" else int(settings["prefix_tokens"])
    if pool == "cls" and prefix == 0:
        raise UsageError(f"{where}: the outputs hold no class token ({'patch tokens only' if stored == 'patch' else 'none in this model'}); "
                         "use --pool mean")
    if pool == "cls" and settings.get("family") == "clip" and settings.get("layer") == "last":
        raise UsageError(f"{where}: CLIP's --pool cls of --layer last is post_layernorm of the class token, which needs "
                         "the model; encode with --pool cls, or export with --pool mean")
    from .families import FAMILIES, vit

    family = next((f for f in FAMILIES if f.name == settings.get("family")), vit.FAMILY)
    model = SimpleNamespace(cfg=SimpleNamespace(num_prefix_tokens=prefix))  # all Family.pool asks for cls and mean

    def pooled(tokens: np.ndarray) -> np.ndarray:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float32))[None]  # (1, T, D), as encode pools a batch
        return family.pool(model, t, pool, settings.get("layer", "last"))[0].numpy()

    return pooled


def _sorted_outputs(folder: Path) -> Iterator[Path]:
    """Output files under ``folder`` in ``sorted()`` order of their paths (``load``'s order), one folder
    listed at a time; hidden names and symlinked folders skipped, as ``load``'s walk does."""
    from .layouts.files import SUFFIXES
    from .layouts.packed_index import PART_NAME, read_part

    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise InputError(str(folder), "unreadable", f"cannot list the folder: {e.strerror or e}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if not entry.is_symlink():
                yield from _sorted_outputs(Path(entry.path))
        elif entry.name.endswith(SUFFIXES):
            if PART_NAME.match(entry.name) and read_part(Path(entry.path)).complete:
                raise UsageError(f"{shown(folder)} holds packed outputs (--pack part files) among one-file-per-image "
                                 "outputs; export that folder by itself")
            yield Path(entry.path)


def _files_rows(root: Path, pool: str | None) -> Iterator[tuple[str, str, np.ndarray]]:
    """``iter_vectors`` of a folder of per-image outputs (the checks of ``FilesLayout.read``, file by file)."""
    from .layouts.files import _read_one
    from .outdir import read_dir_state

    state = read_dir_state(root, tolerate_bad=True)
    first = settings = pooled = None
    for file in _sorted_outputs(root):
        if file.suffix == ".npy" and state.overwrite_started is not None:
            raise UsageError(f"{shown(root)}: an --overwrite into it has not finished, and npy files do not say "
                             "which settings made them; run the same encode again to finish it")
        if first is not None and file.suffix != first[0].suffix:
            raise UsageError(f"{shown(file)}: {shown(root)} holds both .safetensors and .npy outputs (first {shown(first[0])}); "
                             "export one kind at a time")
        array, meta = _read_one(file)
        ours = run_settings(meta) if file.suffix == ".safetensors" else (state.settings or {})
        if first is None:
            first, settings = (file, array.shape, array.dtype), ours
            pooled = _pooler(ours, array.shape, pool, shown(root))
        elif ours != settings:
            raise UsageError(f"{shown(file)}: made with other settings than {shown(first[0])} "
                             f"({_differences(ours, settings)}); export outputs of one run")
        naflex = ours.get("resize") == "naflex" and ours.get("pool") in ("none", "patch")  # each image its own T
        if (array.shape[naflex:], array.dtype) != (first[1][naflex:], first[2]):
            raise UsageError(f"{shown(file)}: shape {array.shape} {array.dtype}, {shown(first[0])} {first[1]} {first[2]}")
        yield printable(file.relative_to(root).as_posix()[: -len(file.suffix)]), meta.get("source", ""), pooled(array)
    if first is None:
        raise UsageError(f"{shown(root)} holds no vitembed outputs (.safetensors or .npy files, or --pack parts)")


def _packed_rows(folder: Path, pool: str | None) -> Iterator[tuple[str, str, np.ndarray]]:
    """``iter_vectors`` of a packed folder: the rows ``iter_packed`` yields, in its order, with one
    part in memory at a time and the index held as ``live_rows``' compact arrays, not as dicts."""
    from .layouts.packed_index import INDEX_FILE, PACK_TENSOR, key_digest, live_rows, read_part
    from .tensors import load_tensor

    found = live_rows(folder)
    if not found and not (folder / INDEX_FILE).is_file():
        raise UsageError(f"{shown(folder)} holds no packed outputs (no {INDEX_FILE}, no part files)")
    settings, first, pooled, shape = None, "", None, None
    for part, rows, digests in found:
        info = read_part(folder / part)
        if not info.complete:
            raise InputError(str(folder / part), "unreadable", "missing, cut short or not a part file, though the "
                             "index names it; run the same encode again to redo its rows")
        keys, sources = info.keys or [], info.sources or []
        for row, digest in zip(rows.tolist(), digests):
            if not (row < len(keys) and key_digest(keys[row]) == digest.tobytes()):
                raise UsageError(f"{shown(folder / INDEX_FILE)}: a row is not where it says ({part!r} row {row}); "
                                 "run the same encode again to redo it")
        theirs = info.settings or {}
        if settings is None:
            settings, first = theirs, part
        elif theirs != settings:
            raise UsageError(f"{shown(folder / part)}: made with other settings than {shown(folder / first)} "
                             f"({_differences(theirs, settings)}); an --overwrite that did not finish?")
        try:
            tensor = load_tensor(str(folder / part), PACK_TENSOR)
        except Exception as e:  # a part whose header reads but whose data does not
            raise InputError(str(folder / part), "unreadable", f"cannot read a part file: {e}") from None
        for row in rows.tolist():
            array = tensor[row]
            if pooled is None:
                pooled, shape = _pooler(settings, array.shape, pool, shown(folder)), array.shape
            elif array.shape != shape:
                raise UsageError(f"{shown(folder)}: {keys[row]!r} has shape {array.shape}, the rows before it {shape}")
            yield keys[row], sources[row], pooled(array)
        del tensor
    if pooled is None:
        raise UsageError(f"{shown(folder)} holds no encoded embeddings (index.jsonl lists only failures)")


def _l2(rows: np.ndarray) -> np.ndarray:
    """(n, D) float32 ``rows`` divided in place by their L2 norms, computed in float64 4096 rows at a
    time (not a float64 copy of a whole row group); zero rows left as they are."""
    for start in range(0, len(rows), 4096):
        x = rows[start : start + 4096].astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
        rows[start : start + 4096] = np.divide(x, norms, out=x, where=norms > 0)
    return rows


class _Writer:
    """Rows go to hidden temporary files beside ``targets`` (``temps``: (file, name)), renamed to them
    by ``finish`` (OUT last), removed by ``abort``."""

    batch: int
    keys_path: Path | None = None

    def __init__(self, out: Path, dim: int, targets: list[Path]):
        from .files import _umask

        self.out, self.dim, self.rows, self.targets, self.temps = out, dim, 0, targets, []
        for target in targets:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name[:64]}.", suffix=".tmp")
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; OUT gets the usual permissions
            self.temps.append((os.fdopen(fd, "wb"), Path(tmp)))

    def _close(self) -> None:
        """Close what writes into the temporary files (the files themselves are closed after)."""

    def finish(self) -> None:
        self._close()
        for (f, tmp), target in zip(self.temps, self.targets):
            f.close()
            os.replace(tmp, target)

    def abort(self) -> None:
        try:
            self._close()
        finally:
            for f, tmp in self.temps:
                f.close()
                tmp.unlink(missing_ok=True)


class _NpyWriter(_Writer):
    """OUT.keys.jsonl and OUT.npy: the header for (0, D) first, rows appended, the header for (N, D)
    written over it at the end (numpy pads the header so that the row count can grow in place)."""

    batch = NPY_BATCH

    def __init__(self, out: Path, dim: int):
        self.keys_path = out.with_name(out.name[: -len(".npy")] + ".keys.jsonl")
        super().__init__(out, dim, [self.keys_path, out])
        self.header = self._header(0)
        self.temps[1][0].write(self.header)

    def _header(self, rows: int) -> bytes:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (rows, self.dim)})
        return buffer.getvalue()

    def write(self, vectors: np.ndarray, keys: list[str], sources: list[str]) -> None:
        lines = (json.dumps({"row": self.rows + i, "key": k, "source": s}, ensure_ascii=False) + "\n" for i, (k, s) in enumerate(zip(keys, sources)))
        self.temps[0][0].write("".join(lines).encode("utf-8", "surrogateescape"))
        self.temps[1][0].write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
        self.rows += len(keys)

    def finish(self) -> None:
        header, data = self._header(self.rows), self.temps[1][0]
        if len(header) != len(self.header):  # not with numpy's growth padding (up to 21 digits of rows)
            raise OSError(f"the npy header grew from {len(self.header)} to {len(header)} bytes")
        data.seek(0)
        data.write(header)
        super().finish()


class _ParquetWriter(_Writer):
    """OUT.parquet through ``pyarrow.parquet.ParquetWriter``, one row group per ``write``: ROW_GROUP
    rows, fewer for wide vectors (at most ROW_GROUP_BYTES of them: pyarrow holds ~2x a row group)."""

    batch = ROW_GROUP

    def __init__(self, out: Path, dim: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(out, dim, [out])
        self.batch = min(type(self).batch, max(1024, ROW_GROUP_BYTES // (4 * dim)))
        self.schema = pa.schema([("key", pa.string()), ("source", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])
        self.temps[0][0].close()  # pyarrow writes the file by its name (a Python file object costs copies)
        self.writer = pq.ParquetWriter(str(self.temps[0][1]), self.schema, use_dictionary=False)  # unique keys, floats

    def write(self, vectors: np.ndarray, keys: list[str], sources: list[str]) -> None:
        import pyarrow as pa

        column = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1)), self.dim)
        table = pa.Table.from_arrays([pa.array(keys, pa.string()), pa.array(sources, pa.string()), column], schema=self.schema)
        self.writer.write_table(table, row_group_size=self.batch)
        self.rows += len(keys)

    def _close(self) -> None:
        self.writer.close()


WRITERS = {".npy": _NpyWriter, ".parquet": _ParquetWriter}


def export_vectors(emb: str | os.PathLike, out: str | os.PathLike, pool: str | None = None, normalize: bool = False) -> Exported:
    """Write the vectors of EMB (``iter_vectors``) to one file, all or nothing.

    Args:
        emb: a folder of outputs (per-image files or a packed folder).
        out: ``*.npy``: an (N, D) float32 array, plus ``*.keys.jsonl`` beside it ({"row", "key",
            "source"} per line); ``*.parquet``: columns key, source (string), embedding
            (fixed_size_list<float32>[D]).
        pool: ``cls`` or ``mean`` for token outputs (see ``iter_vectors``).
        normalize: divide each vector by its L2 norm (computed in float64; zero vectors stay zero).

    Returns:
        ``Exported`` (rows, dim, out, keys).

    Raises:
        UsageError: another suffix, OUT inside EMB, what ``iter_vectors`` refuses, OUT not writable.
        InputError: EMB missing, or an output in it that cannot be read (named). No OUT is written then.
    """
    _check_pool(pool)
    out = Path(out)
    if out.suffix not in WRITERS:
        raise UsageError(f"{shown(out)}: cannot export to {out.suffix or 'a name without a suffix'!r}; "
                         "OUT must end in .npy (plus OUT.keys.jsonl) or .parquet")
    real_out = Path(os.path.realpath(out))
    if Path(emb).is_dir() and real_out.is_relative_to(os.path.realpath(emb)):
        raise UsageError(f"{shown(out)} is inside {shown(emb)}; write the export elsewhere")
    if (real_out.parent / "vitembed.json").exists() or (real_out.parent / "index.jsonl").exists():
        raise UsageError(f"{shown(out)} is inside an output folder of vitembed encode ({shown(out.parent)}); "
                         "write the export elsewhere")
    for target in (out, out.with_name(out.stem + ".keys.jsonl")):
        if target.is_dir():
            raise UsageError(f"{shown(target)} is a folder; OUT names the file to write")
    writer = None
    try:
        for key, source, vector in iter_vectors(emb, pool):
            if writer is None:
                out.parent.mkdir(parents=True, exist_ok=True)
                writer = WRITERS[out.suffix](out, vector.shape[0])
                buffer, keys, sources = np.empty((writer.batch, vector.shape[0]), np.float32), [], []
            buffer[len(keys)] = vector
            keys.append(key), sources.append(source)
            if len(keys) == writer.batch:
                writer.write(_l2(buffer) if normalize else buffer, keys, sources)
                keys, sources = [], []
        if keys:
            writer.write(_l2(buffer[: len(keys)]) if normalize else buffer[: len(keys)], keys, sources)
        writer.finish()
    except BaseException as e:
        if writer is not None:
            writer.abort()
        if isinstance(e, OSError):
            raise UsageError(f"cannot export to {shown(out)}: {e}") from None
        raise
    return Exported(writer.rows, writer.dim, str(out), str(writer.keys_path) if writer.keys_path else None)
