"""The encode loop, as stages with narrow interfaces.

    plan_jobs (inputs.py)      inputs -> [Job]
    decode_stage               Job -> (S, S, 3) uint8, in worker threads (Pillow releases the GIL)
    batch_stage                -> chunks of B decoded images (failures kept in input order)
    Encoder                    uint8 batch -> (B, T, D) embeddings on the CPU
    write_embedding            embedding -> file, atomically (writers.py)

``encode_jobs`` wires them together (``encode`` plans and then calls it), skips
inputs already done, and reports each finished input through a
callback, so that a CLI, a notebook or a batch system can show progress its own way.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .catalog import DEFAULT_MODEL, get_model_spec
from .config import layer_index
from .errors import DeviceError, InputError, UsageError, VitembedWarning, printable, shown
from .inputs import Job, Plan
from .decode import DecodeOptions
from .model import VisionTransformer, pack_for_cpu
from .packs import (
    INDEX_FILE,
    PART_NAME,
    PackWriter,
    PartInfo,
    append_index,
    part_prefix,
    read_part,
    recover_parts,
    remove_dead_parts,
    scan_index,
)
from .preprocess import load_pixels, normalize, normalize_stats
from .weights import ResolvedWeights, build_model, resolve_weights
from .writers import (
    FAILURES_FILE,
    SETTINGS_FILE,
    DirLock,
    DirState,
    append_failure,
    check_format,
    older_outputs,
    read_dir_state,
    read_output,
    run_settings,
    settings_conflict,
    write_dir_state,
    write_embedding,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
POOLS = ("none", "cls", "mean", "patch")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        DeviceError: an explicit device that is not available (never a silent fallback).
        UsageError: a name that is not a device, or ``cpu:N`` (torch has one CPU device).
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"--device {name}: MPS is not available")
    elif device.type != "cpu":
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    elif device.index is not None:  # torch accepts cpu:N, but there is one CPU device: N would mean nothing
        raise UsageError(f"--device {name}: the CPU device takes no index; use --device cpu")
    return device


def parse_dtype(name: str, option: str = "--dtype") -> torch.dtype:
    """``float32``, ``bfloat16`` or ``float16`` -> torch dtype. Raises UsageError otherwise."""
    if name not in DTYPES:
        raise UsageError(f"{option} {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_dtype(name: str, device: torch.device) -> str:
    """The compute dtype's name for ``--dtype name`` on ``device``.

    ``auto``: bfloat16 on CUDA devices that support it, float32 elsewhere (on
    the CPU, bfloat16 is only fast with AVX512-BF16 or AMX, and even then it
    rounds: float32 is the exact default). Other names pass through.

    Raises:
        UsageError: not ``auto`` or a name in ``DTYPES``.
    """
    if name == "auto":
        return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    parse_dtype(name)
    return name


def _cpu_has_fast(dtype: torch.dtype) -> bool:
    """Whether this CPU has matrix instructions for ``dtype`` (float32 always)."""
    if dtype == torch.float32:
        return True
    cpu = getattr(torch, "cpu", None)
    if dtype == torch.bfloat16:
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    else:
        checks = ("_is_amx_fp16_supported",)
    return any(getattr(cpu, name, lambda: False)() for name in checks)


class Encoder:
    """A model on a device with its preprocessing: uint8 pixel batches -> embeddings.

    On the CPU in float32 the block linears run through oneDNN with packed
    weights (``model.pack_for_cpu``); on CUDA, batches are copied from pinned
    host memory without blocking, and rescaled and normalised on the device.

    Args:
        weights: resolved weights (``weights.resolve_weights``).
        layer: ``last``, ``embeddings`` or a block number (see ``config.layer_index``).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        dtype: compute precision, ``auto`` | ``float32`` | ``bfloat16`` | ``float16``
            (``resolve_dtype``); the resolved name is recorded in the metadata.
        save_dtype: dtype of the returned embeddings (float32 by default).
        pool: ``none`` | ``cls`` | ``mean`` | ``patch`` (see ``VisionTransformer.pool``).
        model: an already built model for ``weights`` (default: ``build_model(weights)``).
        model_name: catalog name recorded in the metadata.
        compile: run the model through ``torch.compile``; if compiling fails,
            warn once (``VitembedWarning``) and run eager.

    Raises:
        UsageError, DeviceError, CheckpointError.
    """

    def __init__(
        self,
        weights: ResolvedWeights,
        layer: str = "last",
        device: str = "auto",
        dtype: str = "auto",
        save_dtype: str = "float32",
        pool: str = "none",
        model: VisionTransformer | None = None,
        model_name: str = "",
        compile: bool = False,
    ):
        layer_index(layer, weights.config.depth)  # validate early
        if pool not in POOLS:
            raise UsageError(f"--pool {pool!r}: expected one of {', '.join(POOLS)}")
        self.pool = pool
        self.weights = weights
        self.model_name = model_name
        self.layer = layer
        self.device = resolve_device(device)
        self.dtype_name, self.save_dtype_name = resolve_dtype(dtype, self.device), save_dtype
        self.dtype = parse_dtype(self.dtype_name)
        self.save_dtype = parse_dtype(save_dtype, "--save-dtype")
        if self.device.type == "cpu" and not _cpu_has_fast(self.dtype):
            needs = "AVX512-BF16 or AMX" if self.dtype == torch.bfloat16 else "AMX-FP16"
            warnings.warn(
                f"--dtype {self.dtype_name} on a CPU without {self.dtype_name} matrix instructions "
                f"({needs}): it runs several times slower than float32 here",
                VitembedWarning,
                stacklevel=2,
            )
        model = model if model is not None else build_model(weights)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.packed = False
        self._compiled = None
        self._compiled_rows = 0
        if compile:
            # On the CPU, Inductor's freezing packs the weights for oneDNN, as pack_for_cpu does for eager.
            options = {"freezing": True} if self.device.type == "cpu" else None
            self._compiled = torch.compile(self.model, options=options)
        else:
            self.packed = pack_for_cpu(self.model)
        self.stats = normalize_stats(weights.preprocess).to(self.device)  # (2, 3) mean, std

    @property
    def compiled(self) -> bool:
        """Whether the model runs through ``torch.compile`` (False again after a fallback to eager)."""
        return self._compiled is not None

    @property
    def preprocess(self):
        return self.weights.preprocess

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one image's embedding: (197, 768) for ViT-B/16 at 224 without pooling,
        (768,) for ``cls`` and ``mean``, (196, 768) for ``patch``."""
        cfg = self.weights.config
        return {
            "none": (cfg.num_tokens, cfg.hidden_size),
            "patch": (cfg.num_patches, cfg.hidden_size),
        }.get(self.pool, (cfg.hidden_size,))

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 RGB -> (B, T, D) CPU tensor in ``save_dtype`` ((B, D) when pooled)."""
        batch = torch.as_tensor(pixels)
        if self.device.type == "cuda":  # pinned (page-locked) memory lets the copy run asynchronously
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        x = normalize(batch, self.stats, self.dtype)  # (B, 3, S, S)
        out = self._forward(x)  # (B, T, D)
        out = self.model.pool(out, self.pool, self.layer)  # (B, T, D) or (B, D)
        return out.to(self.save_dtype).cpu()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, T, D) tokens of ``self.layer``."""
        rows = x.shape[0]
        if self._compiled is not None:
            self._compiled_rows = self._compiled_rows or rows
            if rows < self._compiled_rows:  # pad a short last batch (rows are independent): no recompile
                x = torch.cat([x, x.new_zeros((self._compiled_rows - rows, *x.shape[1:]))])
            try:
                return self._compiled(x, layers=(self.layer,))[self.layer][:rows]
            except Exception as e:  # compilers fail in many ways: eager always works
                cause: BaseException | None = e
                while cause is not None:  # Ctrl-C while compiling arrives wrapped: it stays Ctrl-C
                    if isinstance(cause, KeyboardInterrupt):
                        raise KeyboardInterrupt from e
                    cause = cause.__cause__ or cause.__context__
                first_line = (str(e).strip().splitlines() or [""])[0][:200]
                warnings.warn(
                    f"--compile: torch.compile failed ({type(e).__name__}: {first_line}); running eager",
                    VitembedWarning,
                    stacklevel=3,
                )
                self._compiled = None
                self.packed = pack_for_cpu(self.model)
        return self.model(x, layers=(self.layer,))[self.layer][:rows]

    def metadata(self) -> dict[str, str]:
        """String metadata saying exactly how the embeddings were made (safetensors header)."""
        w, cfg, pre = self.weights, self.weights.config, self.weights.preprocess
        meta = {
            "vitembed_version": __version__,
            "model": self.model_name,
            "family": cfg.family,
            "weights": w.source,
            "weights_sha256": w.sha256,
            "random_weights": "true" if w.random else "false",
            "layer": self.layer,
            "pool": self.pool,
            "tokens": str(cfg.num_tokens),
            "hidden_size": str(cfg.hidden_size),
            "depth": str(cfg.depth),
            "num_heads": str(cfg.num_heads),
            "mlp_dim": str(cfg.mlp_dim),
            "layer_norm_eps": repr(cfg.layer_norm_eps),
            "act": cfg.act,
            "prefix_tokens": str(cfg.num_prefix_tokens),
            "grid": f"{cfg.grid_size}x{cfg.grid_size}",
            "patch_size": str(cfg.patch_size),
            "image_size": str(pre.image_size),
            "resize": pre.resize,
            "resize_size": str(pre.resize_to),
            "crop": "true" if pre.crop else "false",
            "crop_rounding": pre.crop_rounding,
            **({"crop_pct": repr(pre.crop_pct)} if pre.crop_pct is not None else {}),
            "interpolation": pre.interpolation,
            "mean": ",".join(repr(float(v)) for v in pre.mean),
            "std": ",".join(repr(float(v)) for v in pre.std),
            "dtype": self.dtype_name,
            "save_dtype": self.save_dtype_name,
            "compile": "true" if self.compiled else "false",
        }
        if w.random:
            meta["seed"] = str(w.seed)
        if w.overrides:
            meta["preprocess_overrides"] = ",".join(w.overrides)
        if w.trained_image_size:
            meta["pos_embed_resampled_from"] = f"{w.trained_image_size // cfg.patch_size}x{w.trained_image_size // cfg.patch_size}"
        return meta


@dataclass
class Result:
    """What happened to one input.

    ``status`` is ``encoded`` (``output`` written), ``failed`` (``error`` says
    why) or ``skipped`` (``reason`` says why, e.g. the same file given twice).
    With ``--pack``, ``output`` is the part file, ``row`` the input's row in it
    and ``key`` its key in ``DIR/index.jsonl``.
    """

    source: str
    status: str
    output: str | None = None
    error: InputError | None = None
    reason: str | None = None
    row: int | None = None
    key: str | None = None


@dataclass
class Summary:
    """Counts and timing of an ``encode`` run (seconds of wall time).

    ``skipped`` counts inputs already done and files named twice; ``stopped``
    is True when ``fail_fast`` ended the run at a failure, ``interrupted`` when
    Ctrl-C (KeyboardInterrupt) did. ``log_errors`` says why lines could not be
    appended to ``DIR/failures.jsonl`` or ``DIR/index.jsonl``; ``write_failed`` counts
    outputs that could not be written, ``nonfinite`` embeddings holding Inf or NaN
    (float16 overflow), ``passed_over`` files a folder walk did not take as images by their
    names. Per-input results go to ``on_result``
    as they happen and are not kept, so memory does not grow with the number of inputs.
    """

    encoded: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    stopped: bool = False
    interrupted: bool = False
    log_errors: list[str] = field(default_factory=list)
    write_failed: int = 0
    nonfinite: int = 0
    passed_over: int = 0

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def model_layout(encoder: "Encoder") -> tuple[int, int]:
    """(model threads, torch threads each) for a run: on the CPU, two model threads with half
    the torch threads each, each running half of every batch (``model_stage``); elsewhere,
    or with ``--compile``, one thread with all of them.

    Two single-threaded matmuls beat one two-threaded matmul on the same 2 cores
    (about 150-160 against 130-145 GFLOP/s for ViT-B/16's shapes: no barriers
    between the cores), and a decode thread that takes a core then slows one
    batch instead of stalling both halves of every matmul. Results are the same
    bits either way (each row's arithmetic does not depend on the threading).
    """
    total = torch.get_num_threads()
    if encoder.device.type != "cpu" or encoder.compiled or total < 2:
        return 1, total
    return 2, total // 2


def model_stage(
    chunks: Iterable[list[tuple[Job, np.ndarray | InputError]]], encoder: "Encoder", workers: int
) -> Iterator[tuple[list[tuple[Job, np.ndarray | InputError]], torch.Tensor | None]]:
    """(chunk, embeddings (B, T, D), or None when the chunk holds no image), in input order.

    With ``workers`` > 1 each batch is cut into that many near-equal slices, run at
    once in as many threads (torch releases the GIL inside its ops), and joined:
    every core is busy to the last batch. Rows are independent, so the result is
    the same as one call on the whole batch.
    """
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vitembed-model") if workers > 1 else None
    try:
        for chunk in chunks:
            images = [item for _, item in chunk if not isinstance(item, InputError)]
            if not images:
                yield chunk, None
                continue
            pixels = np.stack(images)  # (B, S, S, 3) uint8
            if pool is None or len(pixels) < 2:
                yield chunk, encoder(pixels)
                continue
            slices = np.array_split(pixels, min(workers, len(pixels)))
            yield chunk, torch.cat(list(pool.map(encoder, slices)))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def decode_stage(
    jobs: Iterable[Job], load: Callable[[str], np.ndarray], workers: int, lookahead: int
) -> Iterator[tuple[Job, np.ndarray | InputError]]:
    """Decode + resize in ``workers`` threads, in input order, at most ``lookahead`` images in flight."""
    def run(job: Job) -> np.ndarray | InputError:
        try:
            return load(job.source)
        except InputError as e:
            return e
        except Exception as e:  # a decoder bug must not end the job: report this file, go on
            return InputError(job.source, "unreadable", f"{type(e).__name__}: {e}")

    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="vitembed-decode")
    try:
        pending: deque = deque()
        for job in jobs:
            pending.append((job, pool.submit(run, job)))
            if len(pending) >= lookahead:
                done_job, future = pending.popleft()
                yield done_job, future.result()
        while pending:
            done_job, future = pending.popleft()
            yield done_job, future.result()
    finally:  # on an error or Ctrl-C downstream, drop the queued decodes instead of finishing them
        pool.shutdown(wait=True, cancel_futures=True)


def batch_stage(
    decoded: Iterable[tuple[Job, np.ndarray | InputError]], batch_size: int
) -> Iterator[list[tuple[Job, np.ndarray | InputError]]]:
    """Cut the decoded stream into chunks holding ``batch_size`` decoded images each
    (the last may hold fewer), failures kept in place so results stay in input order."""
    chunk: list[tuple[Job, np.ndarray | InputError]] = []
    images = 0
    for job, item in decoded:
        chunk.append((job, item))
        if not isinstance(item, InputError):
            images += 1
            if images == batch_size:
                yield chunk
                chunk, images = [], 0
    if chunk:
        yield chunk


class _FileSink:
    """The per-image layout: one file per input (``writers.write_embedding``)."""

    def __init__(self, fmt: str, metadata: dict[str, str]):
        self.fmt, self.metadata = fmt, metadata
        self.index_errors: list[str] = []  # no index in this layout: always empty

    def put(self, job: Job, embedding: torch.Tensor) -> list[Result]:
        try:
            write_embedding(job.output, embedding, {**self.metadata, "source": printable(job.source)}, self.fmt)
        except Exception as e:  # disk full, name too long, ...: this output fails, the run goes on
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            error = InputError(job.source, "write-failed", f"cannot write {shown(job.output)}: {reason}")
            return [Result(job.source, "failed", error=error)]
        return [Result(job.source, "encoded", output=str(job.output))]

    def failed(self, job: Job, error: InputError) -> None:
        pass

    def close(self) -> list[Result]:
        return []


class _PackSink:
    """The packed layout (``--pack N``): N embeddings per part file, plus ``index.jsonl`` (packs.py).

    Keys are ``Job.key``: JSON text, also for file names that are not UTF-8, and unique in a plan.
    ``index_errors`` collects why index lines could not be appended.
    """

    def __init__(self, out_dir: Path, rows: int, shard: tuple[int, int] | None, metadata: dict[str, str]):
        self.out_dir = out_dir
        self.writer = PackWriter(out_dir, rows, part_prefix(shard), metadata)
        self.jobs: dict[str, Job] = {}
        self.index_errors: list[str] = []

    def put(self, job: Job, embedding: torch.Tensor) -> list[Result]:
        key = job.key
        self.jobs[key] = job
        return self.close() if self.writer.add(key, printable(job.source), embedding) else []

    def failed(self, job: Job, error: InputError) -> None:
        entry = {"key": job.key, "source": printable(job.source), "part": None, "row": None,
                 "status": "failed", "error_kind": error.kind, "error": error.reason}
        try:
            append_index(self.out_dir, [entry])
        except OSError as e:  # failures.jsonl has it too; a missing line only means "not done", which is true
            self.index_errors.append(f"cannot append to {INDEX_FILE}: {e.strerror or e}")

    def close(self) -> list[Result]:
        rows, part, error, index_error = self.writer.flush()
        if index_error is not None:
            self.index_errors.append(
                f"cannot append to {INDEX_FILE}: {index_error.strerror or index_error}; the part files are whole "
                "and the next run of the same command indexes them"
            )
        results = []
        for row, (key, _) in enumerate(rows):
            job = self.jobs.pop(key)
            if error is None:
                results.append(Result(job.source, "encoded", output=str(self.out_dir / part), row=row, key=key))
            else:
                reason = f"cannot write a part file in {shown(self.out_dir)}: {error.strerror or error}"
                results.append(Result(job.source, "failed", error=InputError(job.source, "write-failed", reason)))
        return results


class _WriteStage:
    """The write stage in a background thread: writes and reports each batch, in input
    order, while the model computes the next. At most ``depth`` batches wait in its
    queue, so memory stays flat however many images there are."""

    def __init__(self, handle: Callable[[list, torch.Tensor | None], None], close: Callable[[], None], depth: int = 2):
        self.handle, self.finish = handle, close
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.closing = False
        self.thread = threading.Thread(target=self._run, name="vitembed-write", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:  # after an error, drain without writing so put() never blocks for good
                try:
                    self.handle(*item)
                except BaseException as e:
                    self.error = e
        try:
            self.finish()
        except BaseException as e:
            self.error = self.error or e

    def put(self, chunk: list, embeddings: torch.Tensor | None) -> None:
        self.queue.put((chunk, embeddings))

    def close(self) -> None:
        """Wait for the queued batches and the last part; re-raise the stage's first error.
        Safe to call again (after a Ctrl-C that arrived while waiting)."""
        if not self.closing:
            self.closing = True
            self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def encode_jobs(
    plan: Plan,
    encoder: Encoder,
    fmt: str = "safetensors",
    batch_size: int = 32,
    workers: int | None = None,
    decode: DecodeOptions = DecodeOptions(),
    on_result: Callable[[Result], None] | None = None,
    overwrite: bool = False,
    fail_fast: bool = False,
    pack: int | None = None,
) -> Summary:
    """Run the stages over a plan: decode (worker threads), batch, model (``model_layout``), write (a background thread).

    A file that cannot be decoded, or whose output cannot be written, is reported
    as a failed ``Result`` (and appended to ``DIR/failures.jsonl``) and the run
    goes on. Outputs are written atomically. An input whose output already
    exists, is complete and was made with the same settings is skipped, so a
    re-run resumes where a killed one stopped.

    Args:
        plan: from ``inputs.plan_jobs``; its problems are reported as failed and
            its duplicates as skipped, before any image is encoded.
        encoder: the model stage.
        fmt: ``safetensors`` or ``npy`` (``pack`` needs safetensors).
        batch_size: images per model call.
        workers: decode threads (default: usable cores).
        decode: pixel limit, transparency background, truncated files (``decode.DecodeOptions``).
        on_result: called once per input from the write thread, in input order
            (with ``pack``, encoded inputs are reported when their part is written).
        overwrite: re-encode inputs whose outputs exist, and replace outputs made
            with other settings instead of refusing.
        fail_fast: stop at the first failed input (``Summary.stopped`` is then True).
        pack: write N embeddings per part file plus ``DIR/index.jsonl`` (packs.py)
            instead of one file per input.

    Raises:
        UsageError: DIR holds outputs made with other settings (unless ``overwrite``),
            or the options do not fit together.
    """
    check_format(fmt, encoder.save_dtype_name)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    if pack is not None and (pack < 1 or fmt != "safetensors"):
        raise UsageError("--pack N needs N >= 1 and --format safetensors" if fmt == "safetensors" or pack < 1
                         else "--pack writes safetensors part files; it cannot be used with --format npy")
    workers = workers or usable_cores()
    summary = Summary(passed_over=len(plan.passed_over))
    start = time.perf_counter()
    base_meta = {
        **encoder.metadata(),
        "background": ",".join(map(str, decode.background)),
        "allow_truncated": "true" if decode.allow_truncated else "false",
        "format": fmt,
        "layout": "packed" if pack else "files",
    }
    settings = run_settings(base_meta)
    pre = encoder.preprocess
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out_dir = Path(plan.out_dir)
    lock = DirLock(out_dir)  # held (shared) until the run ends: see claim_dir
    try:
        todo, already, state = claim_dir(plan, fmt, settings, lock, overwrite, scan_packs if pack else scan_outputs)
        sink = _PackSink(out_dir, pack, plan.sharded, base_meta) if pack else _FileSink(fmt, base_meta)
    except BaseException:
        lock.close()
        raise

    def report(result: Result) -> None:
        setattr(summary, result.status, getattr(summary, result.status) + 1)
        if result.error is not None:
            if result.error.kind == "write-failed":
                summary.write_failed += 1
            try:
                append_failure(out_dir, result.source, result.error.kind, result.error.reason, run_id)
            except OSError as e:  # the log is a convenience: losing it must not lose the run
                summary.log_errors.append(f"cannot append to {FAILURES_FILE}: {e.strerror or e}")
        if on_result is not None:
            on_result(result)
        if fail_fast and result.status == "failed":
            summary.stopped = True  # the results at hand are still reported; nothing new is started

    def write_batch(chunk: list[tuple[Job, np.ndarray | InputError]], embeddings: torch.Tensor | None) -> None:
        if embeddings is not None and embeddings.is_floating_point():
            summary.nonfinite += int((~torch.isfinite(embeddings.reshape(len(embeddings), -1)).all(dim=1)).sum())
        rows = iter(embeddings) if embeddings is not None else iter(())  # (T, D) each
        for job, item in chunk:
            if summary.stopped:
                return
            if isinstance(item, InputError):
                sink.failed(job, item)
                report(Result(job.source, "failed", error=item))
                continue
            for result in sink.put(job, next(rows)):
                report(result)

    def finish() -> None:  # the last, partly filled part: what was computed is kept, also after Ctrl-C
        for result in sink.close():
            report(result)

    def load(path: str) -> np.ndarray:
        return load_pixels(path, pre, decode)

    writer: _WriteStage | None = None
    threads_before = torch.get_num_threads()
    try:
        for result in [
            *(Result(problem.path, "failed", error=problem) for problem in plan.problems),
            *(Result(source, "skipped", reason=f"same file as {shown(first)}") for source, first in plan.duplicates),
            *already,
        ]:
            if summary.stopped:
                break
            report(result)
        if not summary.stopped:
            writer = _WriteStage(write_batch, finish)
            model_threads, torch_threads = model_layout(encoder)
            torch.set_num_threads(torch_threads)  # per model thread; restored below
            decoded = decode_stage(todo, load, workers, lookahead=2 * batch_size)
            for chunk, embeddings in model_stage(batch_stage(decoded, batch_size), encoder, model_threads):
                writer.put(chunk, embeddings)  # (B, T, D)
                if writer.error is not None or summary.stopped:
                    break
            writer.close()
            writer = None
        # An --overwrite is over when every input went through and was written: DIR then holds one set of
        # settings. Not for a shard (the others may still be redoing theirs), nor after a stop or write failure.
        finished = not summary.stopped and summary.write_failed == 0 and plan.sharded is None
        # npy files carry no settings: while DIR holds npy files this run did not rewrite (an --overwrite of
        # some of the inputs), the marker stays, so that a later run redoes them instead of trusting them.
        if finished and fmt == "npy" and state.overwrite_started is not None:
            finished = not older_outputs(out_dir, ".npy", state.overwrite_started)
        if state.overwrite_started is not None and finished:
            if isinstance(sink, _PackSink):
                remove_dead_parts(out_dir)
            try:
                write_dir_state(out_dir, DirState(settings))
            except UsageError as e:  # the outputs are whole; the next run finishes the bookkeeping
                summary.log_errors.append(str(e))
    except KeyboardInterrupt:  # Ctrl-C: the outputs written so far are complete; report what was done
        summary.interrupted = True
    finally:
        torch.set_num_threads(threads_before)
        if writer is not None:  # an error or Ctrl-C: still write what the model has computed
            try:
                writer.close()
            except KeyboardInterrupt:
                summary.interrupted = True
        lock.close()  # after the last write
        summary.log_errors.extend(dict.fromkeys(sink.index_errors))
    summary.seconds = time.perf_counter() - start
    return summary


def claim_dir(
    plan: Plan, fmt: str, settings: dict[str, str], lock: DirLock, overwrite: bool, scan: Callable
) -> tuple[list[Job], list[Result], DirState]:
    """Claim DIR for a run with ``settings``: the settings check and the write of
    ``DIR/vitembed.json`` as one step that concurrent runs cannot interleave.

    Under ``lock`` (held shared; see ``writers.DirLock``): a DIR without settings is
    claimed by creating ``vitembed.json`` exclusively, so of two runs with different
    settings started at the same moment one creates it and the other is refused by
    the comparison that follows; ``overwrite`` with other settings takes the lock
    exclusively first, and is refused while another run is in DIR.

    Returns:
        (jobs to encode, results of inputs already done, the state written).

    Raises:
        UsageError: DIR holds outputs made with other settings, or another run
            holds DIR while ``overwrite`` would replace its settings.
    """
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
    todo, done = scan(plan, fmt, settings, state)  # raises before anything is written
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


def scan_packs(
    plan: Plan, fmt: str, settings: dict[str, str], state: DirState
) -> tuple[list[Job], list[Result]]:
    """The resume stage for ``--pack``: ``scan_outputs`` for part files and ``DIR/index.jsonl``.

    An input is done when the index's last line for its key says ``encoded`` and
    that part is complete and was made with ``settings`` (parts written before
    an unfinished ``--overwrite`` with these settings are redone). Complete parts
    the index does not name are indexed from their own metadata first.

    Raises:
        UsageError: DIR holds outputs made with other settings.
    """
    out_dir = Path(plan.out_dir)
    if state.settings is not None and state.settings != settings:
        raise settings_conflict(f"{shown(out_dir)} holds outputs", settings, state.settings)
    redoing = state.overwrite_started
    index = recover_parts(out_dir, *scan_index(out_dir, warn=True))
    parts: dict[str, tuple[PartInfo, float]] = {}
    todo: list[Job] = []
    done: list[Result] = []
    for job in plan.jobs:
        key = job.key
        try:  # a per-image output of this input: the other layout, refused like other settings
            status, theirs, _ = read_output(job.output, "safetensors")
        except OSError:
            status, theirs = "missing", None
        if status == "complete" and theirs is not None and theirs != settings and redoing is None:
            raise settings_conflict(f"{shown(job.output)} was", settings, theirs)
        entry = index.get(key)
        if entry is None or entry.get("status") != "encoded" or not isinstance(entry.get("part"), str):
            todo.append(job)
            continue
        name = entry["part"]
        if not PART_NAME.match(name):  # only a part file in DIR itself, never a path elsewhere
            todo.append(job)
            continue
        if name not in parts:
            path = out_dir / name
            try:
                parts[name] = (read_part(path), path.stat().st_mtime)
            except OSError:
                parts[name] = (PartInfo(False), 0.0)
        info, mtime = parts[name]
        row = entry.get("row")
        if not info.complete or not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < len(info.keys or ()) or info.keys[row] != key:
            todo.append(job)  # the part is gone, torn, or does not hold this input where the index says
        elif info.settings != settings or (redoing is not None and mtime < redoing):
            if redoing is None:
                raise settings_conflict(f"{shown(out_dir / name)} was", settings, info.settings or {})
            todo.append(job)
        else:
            done.append(Result(job.source, "skipped", output=str(out_dir / name), reason="already done", row=row, key=key))
    return todo, done


def scan_outputs(
    plan: Plan, fmt: str, settings: dict[str, str], state: DirState
) -> tuple[list[Job], list[Result]]:
    """The resume stage: which jobs still need encoding, before anything is written.

    An existing output is done when it reads back whole and was made with
    ``settings`` (its safetensors metadata; for npy, which has none, what
    ``DIR/vitembed.json`` says). When ``vitembed.json`` records an unfinished
    ``--overwrite`` run with these settings, outputs left from before it are
    encoded again instead of being refused. An output path that cannot even be
    examined (name too long, folder not searchable) becomes a failed result.

    Returns:
        (jobs to encode, results for inputs already done or failed).

    Raises:
        UsageError: DIR holds outputs made with other settings, or npy outputs that no
            readable ``vitembed.json`` describes.
    """
    if state.settings is not None and state.settings != settings:
        raise settings_conflict(f"{shown(plan.out_dir)} holds outputs", settings, state.settings)
    redoing = state.overwrite_started
    if redoing is None:  # part files of --pack: the other layout, refused like other settings
        for part in sorted(scan_index(Path(plan.out_dir))[1])[:1]:
            info = read_part(Path(plan.out_dir) / part)
            if info.complete and info.settings != settings:
                raise settings_conflict(f"{shown(Path(plan.out_dir) / part)} was", settings, info.settings or {})
    todo: list[Job] = []
    done: list[Result] = []
    for job in plan.jobs:
        try:
            status, theirs, mtime = read_output(job.output, fmt)
        except OSError as e:
            error = InputError(job.source, "write-failed", f"cannot use {shown(job.output)}: {e.strerror or e}")
            done.append(Result(job.source, "failed", error=error))
            continue
        if status != "complete":
            todo.append(job)
        elif fmt == "npy" and state.settings is None:
            raise UsageError(
                f"{shown(plan.out_dir)} holds npy outputs but no readable {SETTINGS_FILE} says how they were "
                "made; use --overwrite to re-encode them, or another --out"
            )
        elif (theirs is not None and theirs != settings) or (fmt == "npy" and redoing and mtime < redoing):
            if redoing is None:
                raise settings_conflict(f"{shown(job.output)} was", settings, theirs or {})
            todo.append(job)  # left over from before an unfinished --overwrite
        else:
            done.append(Result(job.source, "skipped", output=str(job.output), reason="already done"))
    return todo, done


def load_encoder(
    model: str = DEFAULT_MODEL,
    weights: str | None = None,
    seed: int = 0,
    layer: str = "last",
    device: str = "auto",
    dtype: str = "auto",
    save_dtype: str = "float32",
    pool: str = "none",
    image_size: int | None = None,
    preprocess: dict | None = None,
    progress: bool = True,
    compile: bool = False,
) -> Encoder:
    """Resolve weights for a catalog model and build its ``Encoder``.

    ``image_size`` other than the checkpoint's resamples its position embedding;
    ``preprocess`` holds overrides (``resize``, ``interpolation``, ``crop_pct``,
    ``mean``, ``std``; see ``PreprocessConfig.override``), recorded in the
    metadata. The other arguments are ``Encoder``'s and ``weights.resolve_weights``'.

    Raises:
        UsageError, WeightsNotFoundError, CheckpointError, DeviceError.
    """
    spec = get_model_spec(model)
    resolved = resolve_weights(spec, weights, seed=seed, progress=progress).at_image_size(image_size)
    resolved = resolved.with_overrides(**(preprocess or {}))
    layer_index(layer, resolved.config.depth)
    resolve_device(device)
    # A checkpoint with an architecture of its own is not the catalog model: say where it came from.
    ours, theirs = resolved.config, spec.config()
    same = (ours.family, ours.hidden_size, ours.depth, ours.patch_size) == (
        theirs.family, theirs.hidden_size, theirs.depth, theirs.patch_size
    )
    name = spec.name if same else f"checkpoint:{ours.family}"  # not its path: resume must not depend on it
    return Encoder(
        resolved, layer=layer, device=device, dtype=dtype, save_dtype=save_dtype, pool=pool, model_name=name, compile=compile
    )


def encode(
    inputs: Iterable[str],
    out_dir: str | os.PathLike,
    *,
    encoder: Encoder | None = None,
    fmt: str = "safetensors",
    batch_size: int = 32,
    workers: int | None = None,
    decode: DecodeOptions = DecodeOptions(),
    stdin_paths: Iterable[str] = (),
    on_result: Callable[[Result], None] | None = None,
    overwrite: bool = False,
    fail_fast: bool = False,
    shard: tuple[int, int] | None = None,
    pack: int | None = None,
    **encoder_options,
) -> Summary:
    """Encode image files and directories into ``out_dir``: the Python form of ``vitembed encode``.

    Args:
        inputs: image files and directories (searched recursively).
        out_dir: output directory; one ``<relative path>.<fmt>`` per image.
        encoder: a prepared ``Encoder``; if None one is built by ``load_encoder(**encoder_options)``.
        fmt, batch_size, workers, decode, on_result, overwrite, fail_fast, pack: as ``encode_jobs``.
        shard: (K, N) to process only shard K of N (see ``inputs.Plan.shard``).
        stdin_paths: extra paths, placed as ``vitembed encode -`` places them.

    Returns:
        The run's ``Summary``; inputs that could not be planned (missing paths,
        output collisions) count as failed, files named twice as skipped.
    """
    from .inputs import plan_jobs

    if encoder is None:
        encoder = load_encoder(**encoder_options)
    elif encoder_options:  # they would be ignored: say so instead
        raise UsageError(f"encode(): {', '.join(sorted(encoder_options))} cannot be given with encoder= (pass them to load_encoder)")
    plan = plan_jobs(list(inputs), out_dir, fmt, stdin_paths)
    if shard is not None:
        plan = plan.shard(*shard)
    return encode_jobs(
        plan,
        encoder,
        fmt=fmt,
        batch_size=batch_size,
        workers=workers,
        decode=decode,
        on_result=on_result,
        overwrite=overwrite,
        fail_fast=fail_fast,
        pack=pack,
    )
