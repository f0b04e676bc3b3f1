"""Everything the ``vitembed`` command prints, in one place (presentation only: the library
reports through callbacks and return values and never prints).

stdout carries only machine output (``out``: ``--json`` lines, ``--list`` lines, ``inspect``
and ``models`` listings); stderr the start panel, the progress bar, one line per failed or
repeated input, warnings and the summary (``stderr``: no colour or bar when stderr is not a
terminal, under ``--quiet`` or with ``NO_COLOR``). Does not import torch.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from .errors import printable, shown


class StdoutClosed(Exception):
    """stdout was closed by its reader (``| head``). Not an OSError, so that click does not turn it
    into exit 1: ``cli.main`` exits 141, as a process killed by SIGPIPE does."""


def out(text: str, flush: bool = False) -> None:
    """Machine output on stdout."""
    try:
        sys.stdout.write(text)
        if flush:
            sys.stdout.flush()
    except BrokenPipeError:
        raise StdoutClosed() from None


class _Stderr:
    """sys.stderr, but a reader that went away (``2>&1 | head -1``) silences it instead of ending
    the job: a lost log must not lose the work (before, click turned the EPIPE into exit 1 before
    anything was encoded)."""

    closed = False

    def write(self, text: str) -> int:
        if not _Stderr.closed:
            try:
                sys.stderr.write(text)
            except (BrokenPipeError, ValueError):  # ValueError: written after close
                _Stderr.closed = True
        return len(text)

    def flush(self) -> None:
        if not _Stderr.closed:
            try:
                sys.stderr.flush()
            except (BrokenPipeError, ValueError):
                _Stderr.closed = True

    def isatty(self) -> bool:
        return not _Stderr.closed and sys.stderr.isatty()

    def fileno(self) -> int:
        return sys.stderr.fileno()

    @property
    def encoding(self) -> str:
        return getattr(sys.stderr, "encoding", "utf-8")


def stderr(quiet: bool = False) -> Console:
    """A console on stderr (``quiet``: it prints nothing); a closed stderr is silenced (``_Stderr``)."""
    return Console(file=_Stderr(), stderr=True, quiet=quiet, highlight=False, soft_wrap=True)  # type: ignore[arg-type]


def say(message: str) -> None:
    """One plain line on stderr, also under --quiet (errors, warnings, the summary)."""
    stderr().print(message, markup=False)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (vitembed's own, torch's) as one ``warning:`` line on stderr, not a source excerpt."""
    say(f"warning: {message}")


def start_panel(console: Console, encoder, workers: int, out: Path, pack: int | None = None, cluster=None,
                dtype_asked: str = "auto") -> None:
    """Device, torch version, dtype, threads, model and weights, in one panel; with ``cluster``
    (``engines.ray.Cluster``) the Ray cluster's nodes, GPUs and actors in place of the local threads;
    a hint when ``--dtype auto`` kept float32 on a CPU with bfloat16 instructions."""
    import torch

    from .runtime import fast_bf16_instructions

    w = encoder.weights
    from rich.panel import Panel
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    rows = [
        ("model", f"{encoder.model_name} ({w.config.depth} blocks, {w.config.hidden_size} wide)"),
        ("weights", shown(w.source) + (f" (seed {w.seed}; embeddings carry no meaning)" if w.random else "")),
        ("sha256", w.sha256 or "-"),
        ("layer", f"{encoder.layer}, pool {encoder.pool} -> {'x'.join(map(str, encoder.output_shape))} per image"),
        ("device", f"{encoder.device}  torch {torch.__version__}"),
        ("dtype", f"compute {encoder.dtype_name}, save {encoder.save_dtype_name}"),
        ("model run", "torch.compile" if encoder.compiled else "eager" + (
            "" if not encoder.packed else ", oneDNN int8 linears" if encoder.dtype_name == "int8" else ", oneDNN packed linears")),
        ("threads", "model {} x {} torch threads, decode {}".format(*encoder.thread_layout(), workers))
        if cluster is None else ("ray", cluster.describe()),
        ("output", shown(out) + (f" (parts of {pack} + index.jsonl)" if pack else " (one file per image)")),
    ]
    if encoder.encoding.fast_decode:
        rows.insert(-1, ("decode", "--fast-decode: JPEGs at reduced DCT scale, resize by whole factors first"))
    bf16 = fast_bf16_instructions() if dtype_asked == "auto" and encoder.device.type == "cpu" else None
    if bf16 and encoder.dtype_name == "float32" and cluster is None:
        speedup = "3.6x" if bf16 == "AMX-BF16" else "1.5-1.7x"  # bench/bench.py figures: README, Speed
        rows.append(("hint", f"this CPU has {bf16}: --dtype bfloat16 ran {speedup} as fast as float32 on such CPUs "
                             "(cosine 0.9999 to float32; README, Speed and memory)"))
    for key, value in rows:
        table.add_row(Text(key, style="bold"), Text(value))
    console.print(Panel(table, title="vitembed", expand=False))


class ProgressDisplay:
    """Shows a ``progress.Progress`` on stderr while a run goes: on a terminal a bar with done/total,
    images/s and time left (over a moving window); elsewhere (a batch log) one ``progress:`` line
    every ``log_every`` seconds (0: none). Nothing under ``--quiet``. A context manager."""

    def __init__(self, console: Console, progress: Any, log_every: float = 30.0, enabled: bool = True):
        self.console, self.progress, self.log_every = console, progress, log_every
        enabled = enabled and not console.quiet
        self.bar = enabled and console.is_terminal
        self.lines = enabled and not console.is_terminal and log_every > 0
        self._rich = self._thread = None
        self._stop = threading.Event()

    def __enter__(self) -> "ProgressDisplay":
        if self.bar:
            self._rich = _progress_bar(self.console, self.progress)
            self._rich.__enter__()
            self._task = self._rich.add_task("encode", total=self.progress.total)
        if self.bar or self.lines:
            self._thread = threading.Thread(target=self._follow, name="vitembed-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._rich is not None:
            self._rich.update(self._task, completed=self.progress.snapshot().done)
            self._rich.__exit__(*exc)

    def _follow(self) -> None:
        from .progress import progress_line

        while not self._stop.wait(0.2 if self.bar else self.log_every):
            if self.bar:
                self._rich.update(self._task, completed=self.progress.snapshot().done)
            else:
                say(progress_line(self.progress.snapshot()))


def _progress_bar(console: Console, progress: Any):
    """A rich bar whose columns read ``progress`` (so rate and time left are its moving-window ones)."""
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn

    from .progress import clock_text

    class Counts(ProgressColumn):
        def render(self, task) -> Text:
            snap = progress.snapshot()
            rate = f"{snap.rate:.1f} images/s" if snap.rate is not None else "- images/s"
            left = clock_text(snap.eta) if snap.eta is not None else "-:--"
            return Text(f"{snap.done}/{snap.total if snap.total is not None else '?'}  {rate}  {left} left")

    return Progress(TextColumn("encoding"), BarColumn(), Counts(), console=console, transient=False)


def result_json(result: Any) -> dict:
    """One ``--json`` line of ``vitembed encode`` for a ``results.Result``."""
    line = {"source": printable(result.source), "status": result.status, "output": None}
    if result.output is not None:
        line["output"] = printable(result.output)
    if result.row is not None:
        line.update(key=result.key, row=result.row)
    if result.error is not None:
        line.update(error_kind=result.error.kind, error=result.error.reason)
    if result.reason is not None:
        line["reason"] = result.reason
    return line


class EncodeReport:
    """The per-input output of ``vitembed encode``: a ``failed:`` or ``skipped:`` line on stderr,
    and a JSON line on stdout with ``--json``."""

    def __init__(self, console: Console, as_json: bool):
        self.console, self.as_json = console, as_json

    def __call__(self, result: Any) -> None:
        if result.error is not None:
            say(f"failed: {result.error}")
        elif result.reason is not None and result.output is None:  # a repeat, not "already done"
            self.console.print(f"skipped: {shown(result.source)}: {result.reason}", markup=False)
        if self.as_json:
            out(json.dumps(result_json(result), ensure_ascii=False) + "\n", flush=True)


def passed_over_line(count: int) -> str:
    return f"passed over {count} files that are not images by name" if count != 1 else "passed over 1 file that is not an image by name"


def print_plan(plan: Any, as_json: bool, pack: int | None = None, verbose: bool = False) -> None:
    """``--list``: one line per planned input on stdout: source TAB output, or with ``--pack``
    source TAB its key in index.jsonl (control characters escaped as on stderr, ``errors.shown``) (JSON: ``{"source", "output"}`` or ``{"source", "key"}``).
    Files a folder walk passed over are counted on stderr, named there with ``verbose``, and are
    lines ``{"source", "status": "passed-over", "reason"}`` on stdout with ``--json``."""
    for job in plan.jobs:  # the tab-separated lines escape control characters (a name cannot break a line)
        name, where = ("key", job.key) if pack else ("output", printable(job.output))
        out(json.dumps({"source": printable(job.source), name: where}) + "\n" if as_json else f"{shown(job.source)}\t{shown(where)}\n")
    for path in plan.passed_over:
        if as_json:
            out(json.dumps({"source": printable(path), "status": "passed-over", "reason": "not an image by name"}) + "\n")
        elif verbose:
            say(f"passed over: {shown(path)} (not an image by name)")
    for problem in plan.problems:
        say(f"failed: {problem}")
    if plan.passed_over and not as_json:
        say(passed_over_line(len(plan.passed_over)) + ("" if verbose else " (--verbose names them)"))


def print_summary(console: Console, summary: Any, encoder: Any, out_dir: Path, terminated: bool) -> None:
    """The end of ``vitembed encode`` on stderr: warnings, where failures are listed, and the
    counts line (the last line, also under --quiet: the counts a batch log needs)."""
    for problem in dict.fromkeys(summary.log_errors):
        say(f"warning: {problem}")
    if summary.nonfinite:
        say(
            f"warning: {summary.nonfinite} embeddings hold Inf or NaN values"
            + (f" (--dtype {encoder.dtype_name} overflow? try --dtype float32)" if encoder.dtype_name == "float16" else "")
            + (" (--save-dtype float16 overflow? try float32 or bfloat16)" if encoder.save_dtype_name == "float16" else "")
        )
    if summary.passed_over:
        console.print(passed_over_line(summary.passed_over) + " (vitembed encode --list --verbose names them)", markup=False)
    if summary.failed and not summary.log_errors:
        console.print(f"failures are listed in {shown(out_dir / 'failures.jsonl')}", markup=False)
    if summary.stopped:
        console.print("stopped at the first failure (--fail-fast)", markup=False)
    if summary.interrupted:
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        say(f"{how}: the outputs already written are complete; run again to resume")
    rate = f" ({summary.images_per_second:.1f} images/s)" if summary.encoded else ""
    nothing = " (nothing left to do)" if not (summary.encoded or summary.failed or summary.interrupted) else ""
    say(f"encoded {summary.encoded}, skipped {summary.skipped}, failed {summary.failed} in {summary.seconds:.1f} s"
        f"{rate} -> {shown(out_dir)}{nothing}")


def print_inspect(info: dict) -> None:
    """``vitembed inspect`` of one file, for humans, on stdout."""
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"{shown(info['path'])} ({info['format']})", markup=False)
    for t in info["tensors"]:
        console.print(f"  tensor {t['name']}: shape {tuple(t['shape'])} {t['dtype']}", markup=False)
        console.print("    " + "  ".join(
            f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {'-' if v is None else v}" for k, v in t["stats"].items()
        ), markup=False)
    if info["metadata"]:
        console.print("  metadata:", markup=False)
        width = max(map(len, info["metadata"]))
        for key, value in info["metadata"].items():
            if len(value) > 200:  # a pack's keys/sources lists: --json has them whole
                value = f"{value[:160]}... ({len(value)} characters; --json shows all)"
            console.print(f"    {shown(key):<{width}}  {shown(value)}", markup=False)


def print_inspect_dir(info: dict) -> None:
    """``vitembed inspect DIR``, for humans, on stdout: layout, count, shape, dtype, settings."""
    console = Console(highlight=False, soft_wrap=True)
    layout = {"packed": f"packed ({info.get('parts', 0)} parts + index.jsonl)", "files": "one file per image"}.get(
        info["layout"], "no outputs yet")
    extra = "".join(f", {info[k]} {words}" for k, words in (("failed", "failed inputs"), ("missing_parts",
                    "part files missing or cut short (run the same encode again to redo their rows)")) if info.get(k))
    console.print(f"{shown(info['path'])} (folder): {layout}, {info['outputs']} outputs{extra}", markup=False)
    if info["shape"] is not None:
        console.print(f"  each: shape {tuple(info['shape'])} {info['dtype']} ({info['format']})", markup=False)
    settings = info["settings"] or {}
    if settings:
        console.print("  settings (vitembed.json):", markup=False)
        width = max(map(len, settings))
        for key, value in settings.items():
            console.print(f"    {shown(key):<{width}}  {shown(str(value))}", markup=False)
    else:
        console.print("  settings: no readable vitembed.json", markup=False)


def model_row(spec: Any) -> dict:
    """One catalog entry as ``vitembed models --json`` prints it."""
    from .families import FAMILIES

    cfg, pre = spec.config(), spec.preprocess
    family = next(f for f in FAMILIES if f.name == spec.family)
    return {
        "name": spec.name, "family": spec.family, "repo": spec.repo, "variant": spec.variant,
        "tokens": cfg.num_tokens, "hidden_size": cfg.hidden_size, "image_size": pre.image_size,
        "prefix_tokens": cfg.num_prefix_tokens, "resize": pre.resize, "resize_size": pre.resize_to,
        "crop": pre.crop, "interpolation": pre.interpolation, "resize_backend": pre.backend,
        "mean": list(pre.mean), "std": list(pre.std),
        "head": family.head or None, "head_size": family.pooled_dim(cfg, "head") if family.head else None,
        "description": spec.description,
    }


def model_lines(specs: list[Any], on_disk: dict[str, str | None]) -> list[str]:
    """The catalog as ``vitembed models`` prints it, in aligned columns: name, family, variant,
    tokens x width, prefix tokens, the ``--pool head`` width (``-`` for none), where weights are
    on disk (``hub.weights_on_disk``: ``local``, ``cache`` or ``-``), preprocessing, repository."""
    table = [("name", "family", "variant", "tokens", "prefix", "head", "weights", "preprocessing", "mean / std", "repository")]
    for spec in specs:
        row, pre = model_row(spec), spec.preprocess
        resize = (f"{pre.resize} {pre.resize_to}{f' crop {pre.image_size}' if pre.crop else ''} {pre.interpolation}"
                  f"{' (float)' if pre.backend == 'torch' else ''}")
        norm = f"{','.join(f'{v:g}' for v in pre.mean)} / {','.join(f'{v:g}' for v in pre.std)}"
        table.append((spec.name, spec.family, spec.variant, f"{row['tokens']}x{row['hidden_size']}", str(row["prefix_tokens"]),
                      str(row["head_size"] or "-"), on_disk.get(spec.name) or "-", resize, norm, spec.repo))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]


def print_verify(report: Any, as_json: bool) -> None:
    """``vitembed verify``: the comparison on stdout (a table, or with ``as_json`` one JSON object
    per compared item and a final ``{"summary": ...}``); what was skipped and the verdict on stderr."""
    if as_json:
        for line in report.json_lines():
            out(line + "\n")
    else:
        from rich.table import Table

        def number(value: Any, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        table = Table(title=f"vitembed {report.model} vs {report.reference}", title_justify="left")
        for name, justify in (("item", "left"), ("name", "left"), ("reference", "left"), ("max-abs", "right"),
                              ("mean cos", "right"), ("min cos", "right"), ("ok", "left")):
            table.add_column(name, justify=justify)
        for row in report.rows:
            verdict = ("ok" if row.ok else "FAIL") + (" (equal)" if row.item == "pixels" and row.equal else "")
            table.add_row(row.item, row.name, row.reference, number(row.max_abs, ".3g"), number(row.cosine_mean, ".7f"),
                          number(row.cosine_min, ".7f"), verdict + (f": {row.note}" if row.note else ""))
        console = Console(highlight=False)
        console.width = max(console.width, 120)  # not a terminal: 80 columns would cut the names
        console.print(table)
    for skip in report.skipped:
        say(f"skipped: {skip.item} {skip.name}: {skip.reason}")
    images = f"{report.images} image{'s' if report.images != 1 else ''}"
    if report.ok:
        say(f"verify: ok: {len(report.rows)} items within {report.tolerance:g} on {images}"
            + (", inputs bit-identical" if any(r.item == "pixels" for r in report.rows) else ""))
        return
    failed = []
    for row in report.failed:
        what = ("inputs differ" if row.item == "pixels" else f"{row.item} {row.name}") + (
            f" (max-abs {row.max_abs:.3g})" if row.max_abs is not None else f" ({row.note})")
        failed.append(what)
    say(f"verify: FAILED on {images} (tolerance {report.tolerance:g}): {'; '.join(failed)}")
