"""What ``vitembed encode`` shows on stderr: a start panel and a progress bar (rich).

Presentation only; the library reports through callbacks and never prints.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .errors import shown


def start_panel(console: Console, encoder, workers: int, out: Path, pack: int | None = None) -> None:
    """Device, torch version, dtype, threads, model and weights, in one panel."""
    import torch

    from .pipeline import model_layout

    w = encoder.weights
    table = Table.grid(padding=(0, 2))
    rows = [
        ("model", f"{encoder.model_name} ({w.config.depth} blocks, {w.config.hidden_size} wide)"),
        ("weights", shown(w.source) + (f" (seed {w.seed}; embeddings carry no meaning)" if w.random else "")),
        ("sha256", w.sha256 or "-"),
        ("layer", f"{encoder.layer}, pool {encoder.pool} -> {'x'.join(map(str, encoder.output_shape))} per image"),
        ("device", f"{encoder.device}  torch {torch.__version__}"),
        ("dtype", f"compute {encoder.dtype_name}, save {encoder.save_dtype_name}"),
        ("model run", "torch.compile" if encoder.compiled else "eager" + (", oneDNN packed linears" if encoder.packed else "")),
        ("threads", "model {} x {} torch threads, decode {}".format(*model_layout(encoder), workers)),
        ("output", shown(out) + (f" (parts of {pack} + index.jsonl)" if pack else " (one file per image)")),
    ]
    for key, value in rows:
        table.add_row(Text(key, style="bold"), Text(value))
    console.print(Panel(table, title="vitembed", expand=False))


class _Speed(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} images/s" if speed else "- images/s")


class EncodeProgress:
    """A progress bar with images/s and ETA; does nothing when disabled or stderr is not a terminal."""

    def __init__(self, console: Console, total: int | None = None, enabled: bool = True):
        self.total = total
        self.enabled = enabled and console.is_terminal and not console.quiet
        self._progress = (
            Progress(
                TextColumn("encoding"),
                BarColumn(),
                MofNCompleteColumn(),
                _Speed(),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            if self.enabled
            else None
        )
        self._task = None

    def __enter__(self) -> "EncodeProgress":
        if self._progress is not None:
            self._progress.__enter__()
            self._task = self._progress.add_task("encode", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)
