"""The Ray engine (``--engine ray``, extra ``vitembed[ray]``): Ray Data across a cluster.

    driver     plans, claims DIR and resumes (``run.encode_plan``, as locally), then streams
    decode     Ray Data tasks (``decode_cpus`` CPUs each): file or shard member -> (S, S, 3) uint8
    model      ``ModelActor``s (``ActorPoolStrategy``): one per GPU, or CPU actors; (B, ...) embeddings
    write      back on the driver, in input order, through the run's layout writer

The dataset is ``ray.data.from_items`` over the jobs, decoded by ``map_batches`` tasks and encoded
by ``map_batches`` on an actor pool, with Ray Data's streaming executor and its backpressure; its
output is read in input order (``preserve_order``) and written by the same layout sink as the
local engine's, so layouts, atomic writes, resume, ``failures.jsonl`` and ``--pack`` follow the
same rules and a job started on Ray resumes locally and the other way round. An actor that dies
has its batches retried by Ray Data on a restarted actor; nothing is written but by the driver,
so no output is ever half-written, and a re-run encodes what is missing.

The actors build their model from the driver's resolved weights (``weights.ResolvedWeights``):
its file must be readable at the same path on every node (a shared filesystem or the same cache
path), as the outputs must be; ``--weights random`` builds the same weights everywhere from its seed.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EngineError, InputError, UsageError
from ..options import RayOptions

DECODE_MEMORY = 256 * 2**20  # bytes each decode task reserves (a 12k x 12k photo decodes to 432 MiB, then is resized)
CPU_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}  # bfloat16 travels as float32, exactly


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError("--engine ray needs Ray Data: pip install 'vitembed[ray]'") from None
    return ray


@dataclass(frozen=True)
class Cluster:
    """The Ray cluster a run uses, and how the run lays out its actors on it.

    Attributes:
        address: what was connected to (``local`` for a Ray instance started here).
        nodes, cpus, gpus: alive nodes and their logical CPUs and GPUs, in total.
        actors: model actors; ``actor_gpus`` / ``actor_cpus`` each reserves; ``decode_cpus`` per decode task.
        threads: torch threads in each CPU actor.
    """

    address: str
    nodes: int
    cpus: float
    gpus: float
    actors: int
    actor_gpus: float
    actor_cpus: float
    decode_cpus: float
    threads: int

    def describe(self) -> str:
        """One line for the start panel: ``local: 1 node, 2 CPUs, 0 GPUs; 1 CPU actor (1 CPU, 1 thread)``."""
        kind = "GPU" if self.actor_gpus else "CPU"
        each = f"1 GPU + {self.actor_cpus:g} CPU" if self.actor_gpus else f"{self.actor_cpus:g} CPU, {self.threads} thread"
        return (f"{self.address}: {self.nodes} node{'s' * (self.nodes != 1)}, {self.cpus:g} CPUs, {self.gpus:g} GPUs; "
                f"{self.actors} {kind} actor{'s' * (self.actors != 1)} ({each}{'s' * (self.threads != 1 and not self.actor_gpus)} each), "
                f"decode tasks of {self.decode_cpus:g} CPU")


def connect(options: RayOptions | None = None) -> Cluster:
    """Join the cluster ``options.address`` (else ``RAY_ADDRESS``) names, or start a local Ray instance
    when none is named; reuse the connection when this process already has one. Then lay out the
    actors (``RayOptions``): one per GPU, else one CPU actor per node with the node's CPUs but the
    decode share.

    Raises:
        UsageError: Ray is not installed, the cluster cannot be reached, or the actors and one
            decode task ask for more CPUs or GPUs than the cluster has (the job could never start).
    """
    ray = _ray()
    options = options or RayOptions()
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        try:
            _init_quietly(ray, address)
        except (ConnectionError, RuntimeError, ValueError) as e:
            hint = ("" if os.environ.get("RAY_AUTH_MODE") or not address else
                    "; if the cluster was started by Ray 2.5x's `ray start`, it uses token authentication: set "
                    "RAY_AUTH_MODE=token in the environment")
            raise UsageError(f"--engine ray: cannot reach the Ray cluster at {address or 'this machine'}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}{hint}") from None
    ray.data.DataContext.get_current().enable_progress_bars = False  # vitembed shows its own progress
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if gpus >= 1:
        actors = options.actors or int(gpus)
        actor_gpus, actor_cpus = 1.0, options.actor_cpus or 1.0
    else:
        actors = options.actors or max(1, nodes)
        per_node = cpus / max(1, nodes)
        actor_gpus = 0.0
        actor_cpus = options.actor_cpus or max(1.0, (per_node * min(nodes, actors) / actors) - options.decode_cpus)
    need_cpus, need_gpus = actors * actor_cpus + options.decode_cpus, actors * actor_gpus
    if need_cpus > cpus + 1e-9 or need_gpus > gpus + 1e-9:
        raise UsageError(
            f"--engine ray: {actors} actor(s) of {actor_cpus:g} CPU{f' + {actor_gpus:g} GPU' if actor_gpus else ''} and a "
            f"decode task of {options.decode_cpus:g} CPU need {need_cpus:g} CPUs and {need_gpus:g} GPUs; the cluster has "
            f"{cpus:g} and {gpus:g} (fewer --actors, or a smaller --actor-cpus / --decode-cpus)")
    gcs = ray.get_runtime_context().gcs_address
    return Cluster(address or f"local ({gcs})", nodes, cpus, gpus, actors, actor_gpus, actor_cpus, options.decode_cpus,
                   max(1, math.ceil(actor_cpus)))


def _init_quietly(ray, address: str | None) -> None:
    """``ray.init`` without what Ray prints on stderr that is not an error of the run, and with the
    caller's SIGINT and SIGTERM handlers kept (the CLI's: Ctrl-C and SIGTERM end a run with whole
    outputs and a summary). Ray's C++ core writes its log level, and at error level notes that are no
    error (actor arguments in the object store, ray#53727), to fd 2: its level is set to ``fatal``
    unless ``RAY_BACKEND_LOG_LEVEL`` is set, and fd 2 is closed to it while it starts. A Ray instance
    started here is shut down at exit with Ctrl-C ignored (a second Ctrl-C inside Ray's own shutdown
    crashed the process)."""
    import signal

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    level_was = os.environ.get("RAY_BACKEND_LOG_LEVEL")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        if level_was is None:
            os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)
    atexit.register(_shutdown, ray)


def _shutdown(ray) -> None:
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    ray.shutdown()


def _job_row(index: int, job) -> dict[str, Any]:
    """What a decode task needs of a job, its paths absolute: the workers' current folder is not the driver's."""
    member = job.member
    return {"index": index, "source": os.path.abspath(job.source), "shard": os.path.abspath(member.shard) if member else "",
            "member": member.name if member else "", "offset": member.offset if member else -1,
            "size": member.size if member else -1, "stamp": list(member.stamp) if member else [-1, -1]}


def _pack_rows(arrays: list[np.ndarray], size: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Arrays of one rank but many shapes, of at most ``size`` values each -> (B, size) of ``dtype``,
    each row flattened and zero-padded, and their shapes (B, rank). Ray Data stores a column of
    like-shaped arrays as a tensor and of unlike ones as objects, and cannot join blocks of the two
    kinds: a padded column is a tensor in every block."""
    data = np.zeros((len(arrays), size), dtype)
    for row, a in zip(data, arrays):
        row[: a.size] = a.reshape(-1)
    return data, np.array([a.shape for a in arrays], np.int64).reshape(len(arrays), -1)


def _unpack_row(data: np.ndarray, shape) -> np.ndarray:
    shape = [int(n) for n in shape]
    return np.array(data[: int(np.prod(shape))]).reshape(shape)


def decode_batch(batch: dict[str, np.ndarray], pre, decode) -> dict[str, np.ndarray]:
    """A Ray Data decode task: job rows -> ``pixels`` ((B, S, S, 3) uint8; a failed row's pixels are
    zeros; for NaFlex each image's (H_i, W_i, 3) bytes, with ``shape``, ``_pack_rows``) with
    ``error_kind`` / ``error_reason`` ('' for a decoded image)."""
    from ..preprocess import load_pixels
    from ..shards import TarMember

    pixels, kinds, reasons = [], [], []
    for source, shard, member, offset, size, stamp in zip(batch["source"], batch["shard"], batch["member"],
                                                          batch["offset"], batch["size"], batch["stamp"]):
        image = (TarMember(str(shard), str(member), int(offset), int(size), (int(stamp[0]), int(stamp[1])))
                 if offset >= 0 else str(source))
        try:
            pixels.append(load_pixels(image, pre, decode))
            kinds.append("")
            reasons.append("")
        except InputError as e:  # the driver names the input as it was given, not by its absolute path
            pixels.append(None)
            kinds.append(e.kind)
            reasons.append(e.reason)
        except Exception as e:  # a decoder bug must not end the job: report this file, go on
            pixels.append(None)
            kinds.append("unreadable")
            reasons.append(f"{type(e).__name__}: {e}")
    if pre.resize == "naflex":  # each image its own size: bytes and shapes, the same column types in every block
        size = pre.max_num_patches * pre.patch_size ** 2 * 3  # the most pixels a NaFlex size search gives
        out, shapes = _pack_rows([p if p is not None else np.zeros((0, 0, 3), np.uint8) for p in pixels], size, np.uint8)
    else:  # fixed-size preprocessing: one (B, S, S, 3) array
        shape = next((p.shape for p in pixels if p is not None), (1, 1, 3))
        out = np.stack([p if p is not None else np.zeros(shape, np.uint8) for p in pixels])
        shapes = np.zeros((len(pixels), 3), np.int64)
    return {"index": batch["index"], "pixels": out, "shape": shapes, "error_kind": np.array(kinds, dtype=object),
            "error_reason": np.array(reasons, dtype=object)}


class ModelActor:
    """A Ray Data actor holding one ``Encoder``: decoded rows -> ``embedding`` rows.

    Built from the driver's ``ModelOptions`` (weights already resolved) and ``EncodingOptions``;
    the device is ``auto`` there (its GPU, else the CPU with ``threads`` torch threads). Returns
    ``embedding``: (B, ...) in the save dtype (bfloat16 as float32, exactly), zeros for failed rows,
    or for NaFlex tokens an object array of (T_i, D) arrays and ``grid`` (B, 2).
    """

    def __init__(self, options, encoding, threads: int):
        import warnings

        import torch

        from ..encoder import Encoder

        torch.set_num_threads(threads)
        warnings.simplefilter("ignore")  # the driver has shown them (random weights) once already
        self.encoder = Encoder(options=options, encoding=encoding)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        encoder = self.encoder
        ok = [i for i, kind in enumerate(batch["error_kind"]) if not kind]
        rows = len(batch["index"])
        dtype = CPU_DTYPES[encoder.save_dtype_name]
        grids = np.zeros((rows, 2), np.int64)
        found = [np.zeros((0, encoder.output_shape[-1]), dtype)] * rows if encoder.ragged else None
        embedding = None if encoder.ragged else np.zeros((rows, *encoder.output_shape), dtype)
        if ok:
            if encoder.naflex:
                images = [_unpack_row(batch["pixels"][i], batch["shape"][i]) for i in ok]
            else:
                images = [batch["pixels"][i] for i in ok]
            out = encoder(encoder.collate(images))
            for at, row in zip(ok, out):
                if found is not None:
                    found[at] = row.float().numpy().astype(dtype, copy=False)
                else:
                    embedding[at] = row.float().numpy().astype(dtype, copy=False)
            if isinstance(out, list):
                grids[ok] = np.array(out.grids, np.int64)
        shapes = np.zeros((rows, 2), np.int64)
        if found is not None:  # NaFlex tokens: (T_i, D) each, padded to the most tokens
            embedding, shapes = _pack_rows(found, int(np.prod(encoder.output_shape)), dtype)
        return {"index": batch["index"], "embedding": embedding, "shape": shapes, "grid": grids,
                "error_kind": batch["error_kind"], "error_reason": batch["error_reason"]}


def run_jobs(todo, encoder, options, run) -> None:
    """Encode ``todo`` on the cluster (``connect``) and write each batch on the driver, in input order
    (see ``engines``). Batches of ``options.batch_size`` go to each actor.

    Raises:
        UsageError: see ``connect``.
        EngineError: the Ray job failed part-way (actors that cannot build the model, a lost cluster).
    """
    ray = _ray()
    cluster = connect(options.ray)
    context = ray.data.DataContext.get_current()
    kept_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # outputs, --pack parts and reports in input order
    try:
        _stream(ray, cluster, todo, encoder, options, run)
    except ray.exceptions.RayError as e:  # an actor that cannot start, a cluster lost: not a traceback
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        causes = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)]  # not Ray's advice
        why = (causes or lines or [type(e).__name__])[-1][:300]
        raise EngineError(f"--engine ray: the job failed: {why}; the outputs "
                          "written so far are whole, and running the same command again resumes") from None
    finally:
        context.execution_options.preserve_order = kept_order


def _stream(ray, cluster: Cluster, todo, encoder, options, run) -> None:
    """The Ray Data pipeline of ``run_jobs``: from_items -> decode tasks -> model actors -> the writer."""
    import torch

    from ..encoder import RaggedRows

    weights = encoder.weights
    if weights.file is not None:  # the actors' current folder is not the driver's
        weights = dataclasses.replace(weights, file=Path(os.path.abspath(weights.file)))
    model_options = dataclasses.replace(encoder.options, weights=weights, image_size=None, resize=None,
                                        interpolation=None, crop_pct=None, mean=None, std=None)
    ray_options = options.ray or RayOptions()
    data = ray.data.from_items([_job_row(i, job) for i, job in enumerate(todo)], override_num_blocks=max(1, min(
        len(todo) // options.batch_size + 1, 4 * max(1, int(cluster.cpus)) * 4)))
    decoded = data.map_batches(decode_batch, fn_kwargs={"pre": encoder.preprocess_config, "decode": encoder.encoding.decode},
                               batch_size=options.batch_size, num_cpus=ray_options.decode_cpus, batch_format="numpy",
                               memory=DECODE_MEMORY)  # a reservation the actors lack: decode stays in tasks, not fused
    encoded = decoded.map_batches(
        ModelActor, fn_constructor_kwargs={"options": model_options, "encoding": encoder.encoding, "threads": cluster.threads},
        batch_size=options.batch_size, compute=ray.data.ActorPoolStrategy(size=cluster.actors),
        num_cpus=cluster.actor_cpus, num_gpus=cluster.actor_gpus or None, batch_format="numpy")
    save_dtype = encoder.save_dtype
    run.open_writer()
    for batch in encoded.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        chunk = []
        for index, kind, reason in zip(batch["index"], batch["error_kind"], batch["error_reason"]):
            job = todo[int(index)]
            if kind:
                chunk.append((job, InputError(job.source, str(kind), str(reason))))
            else:
                chunk.append((job, None))
        ok = [i for i, (_, item) in enumerate(chunk) if not isinstance(item, InputError)]
        if not ok:
            embeddings = None
        elif encoder.naflex:  # each image its own grid, which its output records (pooled ones too)
            rows = [_unpack_row(batch["embedding"][i], batch["shape"][i]) if encoder.ragged
                    else np.array(batch["embedding"][i]) for i in ok]
            embeddings = RaggedRows([torch.from_numpy(row).to(save_dtype) for row in rows],
                                    [tuple(int(v) for v in batch["grid"][i]) for i in ok])
        else:
            embeddings = torch.from_numpy(np.ascontiguousarray(batch["embedding"][ok])).to(save_dtype)
        run.writer.put(chunk, embeddings)
        if run.writer.error is not None or run.summary.stopped:
            break
    run.writer.close()
    run.writer = None
