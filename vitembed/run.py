"""The batch job: inputs -> decode -> preprocess -> model -> layout, resumable.

    plan_jobs (inputs.py)   inputs -> [Job]
    claim_dir (outdir.py)   the settings check and the resume scan (the layout's), as one step
    engines/                decode, batch, model, write: threads here (local) or a Ray cluster (ray)
    the layout              writes each embedding (layouts/), reports each input

``encode`` plans and then calls ``encode_plan``, which reports each finished input through a
callback, so that a CLI, a notebook or a batch system can show progress its own way.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .catalog import DEFAULT_MODEL
from .encoder import Encoder
from .errors import InputError, UsageError, shown
from .inputs import Job, Plan, plan_jobs
from .layouts import Layout, for_run
from .options import RunOptions, split_fields
from .progress import Progress, Snapshot
from .outdir import FAILURES_FILE, DirLock, DirState, append_failure, claim_dir, write_dir_state
from .results import Result, Summary
from .runtime import hold_torch_threads, release_torch_threads
from .settings import run_settings
from .engines import run_jobs
from .stages import WriteStage


def encode(
    inputs: Iterable[str],
    out_dir: str | os.PathLike,
    encoder: Encoder | str | None = None,
    *,
    options: RunOptions | None = None,
    on_result: Callable[[Result], None] | None = None,
    stdin_paths: Iterable[str] = (),
    progress: bool | Callable[[Snapshot], None] | Progress | None = None,
    log_every: float = 30.0,
    **run_fields: Any,
) -> Summary:
    """Encode image files and directories into ``out_dir``: the Python form of ``vitembed encode``.

    Args:
        inputs: image files and directories (searched recursively); one path alone is one input.
        out_dir: output directory DIR.
        encoder: an ``Encoder``; or a model name, or None, to build one from the keywords that are
            ``ModelOptions`` and ``EncodingOptions`` fields (``weights="random", layer="6"``).
        options: the run's ``RunOptions``; or give its fields as keywords (``pack=16``).
        on_result, stdin_paths: as ``encode_plan``; extra paths, placed as ``vitembed encode -``
            places them.
        progress: True to show progress on stderr as the command does (a bar on a terminal or
            in a notebook, else a plain line every ``log_every`` seconds); a callable to be handed a
            ``progress.Snapshot`` (done, total, images/s, seconds left) after each batch; or a
            ``progress.Progress`` to read yourself. None or False: nothing.

    Returns:
        The run's ``Summary``; inputs that could not be planned (missing paths,
        output collisions) count as failed, files named twice as skipped.

    Raises:
        UsageError: options out of range or given twice, DIR with outputs of other settings.
    """
    from .options import EncodingOptions, ModelOptions

    run_names = {f.name for f in dataclasses.fields(RunOptions)}
    fields = {k: v for k, v in run_fields.items() if k in run_names}
    others = {k: v for k, v in run_fields.items() if k not in run_names}
    known = run_names | {f.name for kind in (ModelOptions, EncodingOptions) for f in dataclasses.fields(kind)}
    if set(run_fields) - known:
        raise UsageError(f"encode(): unknown option(s) {', '.join(sorted(set(run_fields) - known))}; expected "
                         f"RunOptions fields ({', '.join(sorted(run_names))}) or Encoder options ({', '.join(sorted(known - run_names))})")
    if not isinstance(encoder, Encoder):
        if encoder is not None and "model" in others:
            raise UsageError("encode(): the model was given twice (as encoder= and model=)")
        if encoder is not None:
            others["model"] = encoder
        encoder = Encoder(**{"model": DEFAULT_MODEL, **others})
    elif others:
        raise UsageError(f"encode(): {', '.join(sorted(others))} cannot be given with encoder= (Encoder options go "
                         "to vitembed.Encoder; encode() takes RunOptions fields)")
    if options is not None and fields:
        raise UsageError(f"encode(): {', '.join(sorted(fields))} cannot be given with options=")
    (options,) = [options] if options is not None else split_fields(fields, RunOptions)
    plan, layout = plan_run(inputs, out_dir, options, encoder.save_dtype_name, stdin_paths)
    if progress is True:
        from .console import ProgressDisplay, stderr

        counter = Progress(len(plan))
        with ProgressDisplay(stderr(), counter, log_every):
            return encode_plan(plan, encoder, layout, options, on_result, counter)
    if callable(progress) and not isinstance(progress, Progress):
        progress = Progress(len(plan), on_change=progress)
    return encode_plan(plan, encoder, layout, options, on_result, progress or None)


def plan_run(
    inputs: Iterable[str], out_dir: str | os.PathLike, options: RunOptions, save_dtype: str, stdin_paths: Iterable[str] = ()
) -> tuple[Plan, Layout]:
    """The plan (``inputs.plan_jobs``, this shard's part of it) and the layout of a run, before
    any model is loaded.

    Raises:
        UsageError: an empty ``out_dir``, or a format that cannot hold ``save_dtype``.
    """
    layout = for_run(options.format, options.pack, save_dtype)
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)  # one path, not its characters
    for given in inputs:
        if not isinstance(given, (str, os.PathLike)):
            raise UsageError(f"inputs: expected paths of image files or folders, got a {type(given).__name__} "
                             "(Encoder.encode takes images)")
    inputs = [os.fspath(i) for i in inputs]
    plan = plan_jobs(inputs, out_dir, options.format, stdin_paths, options.relative_to)
    return (plan.shard(*options.shard) if options.shard is not None else plan), layout


def encode_plan(
    plan: Plan,
    encoder: Encoder,
    layout: Layout,
    options: RunOptions = RunOptions(),
    on_result: Callable[[Result], None] | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Run the stages over a plan on ``options.engine`` (``engines/``: decode, batch, model), the
    writes in a background thread, into ``layout``.

    A file that cannot be decoded, or whose output cannot be written, is reported as a failed
    ``Result`` (and appended to ``DIR/failures.jsonl``) and the run goes on. Outputs are written
    atomically. An input whose output already exists, is complete and was made with the same
    settings is skipped, so a re-run resumes where a killed one stopped.

    Args:
        plan: from ``inputs.plan_jobs``; its problems are reported as failed and its duplicates
            as skipped, before any image is encoded.
        encoder: the model stage.
        layout: where the embeddings go (``layouts.for_run``).
        options: batch size, workers, overwrite, fail_fast (``RunOptions``).
        on_result: called once per input from the write thread, in input order (with a packed
            layout, encoded inputs are reported when their part is written).
        progress: counts each input as it is settled: images as their batch leaves the model
            (before a ``--pack`` part is written), the others as they are reported.

    Raises:
        UsageError: DIR holds outputs made with other settings (unless ``overwrite``); NaFlex token
            outputs (each image its own shape and grid) into ``--pack`` parts or npy files.
    """
    if encoder.ragged and (layout.name != "files" or layout.fmt != "safetensors"):
        raise UsageError(
            f"--pool {encoder.pool}: a NaFlex model gives each image its own number of tokens and grid, which "
            f"{'--pack parts' if layout.name != 'files' else 'npy files'} cannot record; write one safetensors file "
            "per image, or pool (--pool head or mean), which packs normally"
        )
    summary = Summary(passed_over=len(plan.passed_over))
    start = time.perf_counter()
    metadata = {**encoder.metadata(), "format": layout.fmt, "layout": layout.name}
    settings = run_settings(metadata)
    lock = DirLock(Path(plan.out_dir))  # held (shared) until the run ends: see claim_dir
    try:
        todo, already, state = claim_dir(plan, settings, lock, options.overwrite, layout)
        run = _Run(plan, layout.open(plan, metadata), summary, options.fail_fast, on_result, progress)
    except BaseException:
        lock.close()
        raise
    hold_torch_threads()
    try:
        for result in [
            *(Result(problem.path, "failed", error=problem) for problem in plan.problems),
            *(Result(source, "skipped", reason=f"same file as {shown(first)}") for source, first in plan.duplicates),
            *already,
        ]:
            if summary.stopped:
                break
            run.report(result)
            if progress is not None:
                progress.settled()
        if not summary.stopped and todo:
            encoder.build()  # deferred by the CLI until there is work for it
            if progress is not None:
                progress.restart_clock()
            run_jobs(options.engine, todo, encoder, options, run)
        _finish_overwrite(plan, layout, state, settings, summary)
    except KeyboardInterrupt:  # Ctrl-C: the outputs written so far are complete; report what was done
        summary.interrupted = True
    finally:
        release_torch_threads()
        if run.writer is not None:  # an error or Ctrl-C: still write what the model has computed
            try:
                run.writer.close()
            except KeyboardInterrupt:
                summary.interrupted = True
        lock.close()  # after the last write
        summary.log_errors.extend(dict.fromkeys(run.sink.problems))
    summary.seconds = time.perf_counter() - start
    return summary


def _finish_overwrite(plan: Plan, layout: Layout, state: DirState, settings: dict[str, str], summary: Summary) -> None:
    """An ``--overwrite`` is over when every input went through and was written, and DIR then
    holds one set of settings (``Layout.overwrite_done``): mark it so in ``DIR/vitembed.json``.
    Not for a shard (the others may still be redoing theirs), nor after a stop or write failure."""
    if state.overwrite_started is None or summary.stopped or summary.write_failed or plan.sharded is not None:
        return
    if layout.overwrite_done(Path(plan.out_dir), state.overwrite_started):
        try:
            write_dir_state(Path(plan.out_dir), DirState(settings))
        except UsageError as e:  # the outputs are whole; the next run finishes the bookkeeping
            summary.log_errors.append(str(e))


class _Run:
    """The write side of one run: hands embeddings to the layout's sink and counts and reports
    every result (``Summary``, ``DIR/failures.jsonl``, ``on_result``), in input order."""

    def __init__(self, plan: Plan, sink, summary: Summary, fail_fast: bool, on_result: Callable | None,
                 progress: Progress | None = None):
        self.out_dir, self.sink, self.summary = Path(plan.out_dir), sink, summary
        self.fail_fast, self.on_result, self.progress = fail_fast, on_result, progress
        self.run_id = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.writer: WriteStage | None = None

    def open_writer(self) -> WriteStage:
        """The engine's writer (``self.writer``): batches handed to it count as progress."""
        self.writer = WriteStage(self.write_batch, self.finish, on_put=self.progress.computed if self.progress else None)
        return self.writer

    def report(self, result: Result) -> None:
        summary = self.summary
        setattr(summary, result.status, getattr(summary, result.status) + 1)
        if result.error is not None:
            if result.error.kind == "write-failed":
                summary.write_failed += 1
            try:
                append_failure(self.out_dir, result.source, result.error.kind, result.error.reason, self.run_id)
            except OSError as e:  # the log is a convenience: losing it must not lose the run
                summary.log_errors.append(f"cannot append to {FAILURES_FILE}: {e.strerror or e}")
        if self.on_result is not None:
            self.on_result(result)
        if self.fail_fast and result.status == "failed":
            summary.stopped = True  # the results at hand are still reported; nothing new is started

    def write_batch(self, chunk: list[tuple[Job, np.ndarray | InputError]], embeddings: torch.Tensor | None) -> None:
        if isinstance(embeddings, list):  # NaFlex: each image its own grid, which its output records
            self.summary.nonfinite += sum(int(not torch.isfinite(row).all()) for row in embeddings if row.is_floating_point())
            extras = iter([{"grid": f"{h}x{w}", "tokens": str(h * w)} for h, w in embeddings.grids])
        elif embeddings is not None and embeddings.is_floating_point():
            self.summary.nonfinite += int((~torch.isfinite(embeddings.reshape(len(embeddings), -1)).all(dim=1)).sum())
        rows = iter(embeddings) if embeddings is not None else iter(())  # (T, D) each
        for job, item in chunk:
            if self.summary.stopped:
                return
            if isinstance(item, InputError):
                self.sink.failed(job, item)
                self.report(Result(job.source, "failed", error=item))
                continue
            extra = next(extras) if isinstance(embeddings, list) else None
            for result in self.sink.put(job, next(rows), extra):
                self.report(result)

    def finish(self) -> None:  # the last, partly filled part: what was computed is kept, also after Ctrl-C
        for result in self.sink.close():
            self.report(result)
