"""What a run reports: one ``Result`` per input, and a ``Summary`` at the end.

Layouts make the results of their outputs (written, already done, failed to write); the run
counts them. Does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InputError


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
