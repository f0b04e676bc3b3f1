"""How far a run is: images done of the total, images/s over a moving window, and the time left.

The run counts an image as done when it leaves the model (its batch is handed to the writer),
not when its file or part is written, so a ``--pack 1000`` run moves per batch; inputs settled
without the model (already done, failed at planning, named twice) count when they are reported,
and do not enter the rate. Does not print: ``console.py`` shows a ``Progress`` as a bar or as
plain lines. Does not import torch.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_SECONDS = 20.0  # the rate is measured over this much of the most recent time


@dataclass(frozen=True)
class Snapshot:
    """One reading of a ``Progress``.

    Attributes:
        done: inputs settled so far (through the model, or reported without it).
        total: inputs of the run (None when unknown).
        rate: images/s through the model over the last ``WINDOW_SECONDS`` (over the whole run
            while it is shorter), measured from batch to batch, and lowered while no batch has
            come for longer than the usual gap; None before the first batch left the model.
        eta: seconds left at ``rate``, counted from the last batch (None without a rate or a
            total; 0 when nothing is left).
        elapsed: seconds since the ``Progress`` was made (the run's start).
    """

    done: int
    total: int | None
    rate: float | None
    eta: float | None
    elapsed: float


class Progress:
    """A thread-safe counter of a run's progress, read as ``Snapshot``s.

    ``settled(n)`` counts inputs that need no model (they do not move the rate); ``computed(n)``
    counts images whose batch left the model. ``on_change`` (if given) is called with a
    ``Snapshot`` after each count, from the counting thread.

    Args:
        total: the number of inputs (None: unknown).
        window: seconds of history the rate is measured over.
        clock: a monotonic clock in seconds (``time.monotonic``; tests pass their own).
    """

    def __init__(self, total: int | None = None, window: float = WINDOW_SECONDS,
                 on_change: Callable[[Snapshot], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.total, self.window, self.on_change, self.clock = total, window, on_change, clock
        self.done = self.computed_count = 0
        self.created = self.started = clock()  # the run's start; the rate's
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])  # (time, images through the model)
        self._from_start = True  # the first sample is the start, not a batch
        self._lock = threading.Lock()

    def settled(self, count: int = 1) -> None:
        """``count`` inputs settled without the model (already done, failed before it, repeated)."""
        with self._lock:
            self.done += count
        self._changed()

    def computed(self, count: int) -> None:
        """``count`` images left the model (decode failures in the batch included)."""
        with self._lock:
            self.done += count
            self.computed_count += count
            now = self.clock()
            self._samples.append((now, self.computed_count))
            if self._from_start and len(self._samples) == 3:  # the start to the first batch holds filling the
                self._samples.popleft()  # pipeline (decoding the first batch): from two batches on, time them alone
                self._from_start = False
            while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
                self._samples.popleft()  # keep one sample at or before the window's start
        self._changed()

    def restart_clock(self) -> None:
        """Start the rate's clock now (when the model is ready and images start flowing), so that
        loading time does not count as slowness."""
        with self._lock:
            self.started = self.clock()
            self._samples = deque([(self.started, self.computed_count)])
            self._from_start = True

    def snapshot(self) -> Snapshot:
        """The progress now."""
        with self._lock:
            now = self.clock()
            (t0, n0), (t1, n1), gaps = self._samples[0], self._samples[-1], len(self._samples) - 1
            done, total, elapsed = self.done, self.total, now - self.created
        # Images over the window from batch to batch: timed to now instead, the rate would be low by
        # half a batch's time on average. A stall (no batch for longer than the mean gap between
        # batches) stretches the span to now, so the rate falls as the stall goes on.
        rate = gap = None
        if n1 > n0 and t1 > t0:
            gap = (t1 - t0) / gaps
            rate = (n1 - n0) / max(t1 - t0, now - t0 - gap)
        left = None if total is None else max(total - done, 0)
        if left == 0:
            eta = 0.0
        elif rate and gap and left is not None:  # the next batch is under way since t1: up to a gap of it is done
            eta = max(left / rate - min(now - t1, gap), 0.0)
        else:
            eta = None
        return Snapshot(done, total, rate, eta, elapsed)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.snapshot())


def progress_line(snap: Snapshot) -> str:
    """One plain progress line, as a batch log shows it:
    ``progress: 1200/5000 (24%) 38.2 images/s, 1:39 left, 0:31 elapsed``."""
    count = f"{snap.done}/{snap.total}" if snap.total is not None else f"{snap.done}"
    share = f" ({100 * snap.done / snap.total:.0f}%)" if snap.total else ""
    rate = f"{snap.rate:.1f} images/s" if snap.rate is not None else "- images/s"
    eta = f"{clock_text(snap.eta)} left" if snap.eta is not None else "time left unknown"
    return f"progress: {count}{share} {rate}, {eta}, {clock_text(snap.elapsed)} elapsed"


def clock_text(seconds: float) -> str:
    """Seconds as ``M:SS`` or ``H:MM:SS``."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
