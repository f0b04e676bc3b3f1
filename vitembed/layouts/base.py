"""What an output layout is: the unit that each of ``layouts/<name>.py`` fills in.

A layout owns how embeddings lie in DIR, all of it: writing them (``Layout.open`` gives a
``Sink``), finding what a killed run already finished (``scan``, for resume), refusing outputs
of its kind made with other settings (``check_settings``), finishing an ``--overwrite``
(``overwrite_done``), and reading outputs back (``read``). The run (``run.py``) holds one
layout object and never asks which one it is. Does not import torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from ..errors import InputError
    from ..inputs import Job, Plan
    from ..outdir import DirState
    from ..results import Result


@dataclass
class Loaded:
    """Embeddings read back from outputs (``vitembed.load``).

    Attributes:
        embeddings: (N, *embedding shape) numpy array in the saved dtype (bfloat16 read as
            float32, exactly: numpy has no bfloat16), or a torch tensor with ``as_torch``; for
            NaFlex token outputs a list of N (T_i, D) arrays (each image its own grid).
        keys: N output names relative to DIR without the suffix (``sub/cat.jpg``), sorted.
        sources: N input paths, as the metadata records them ('' where npy files carry none).
        metadata: the settings the outputs were made with (``settings.run_settings`` of their
            metadata, or of ``DIR/vitembed.json`` for npy).
    """

    embeddings: Any
    keys: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


class Sink(ABC):
    """Where a run's embeddings go, in input order. ``problems`` collects why bookkeeping lines
    (an index) could not be written: the outputs are whole, the next run repairs the rest."""

    problems: list[str]

    @abstractmethod
    def put(self, job: "Job", embedding: Any, extra: dict[str, str] | None = None) -> list["Result"]:
        """Take one (T, D) or (D,) CPU tensor; return the results of what was written by now.
        ``extra``: metadata of this output alone (a NaFlex image's ``grid`` and ``tokens``)."""

    def failed(self, job: "Job", error: "InputError") -> None:
        """Record that ``job`` failed (a layout with an index notes it there)."""

    def close(self) -> list["Result"]:
        """Write what is still held; return its results."""
        return []


class Layout(ABC):
    """One way of laying out embeddings in DIR.

    Attributes:
        name: the metadata's ``layout`` value (``files``, ``packed``).
        fmt: the file format (``safetensors``, ``npy``).
    """

    name: str
    fmt: str

    @abstractmethod
    def check_settings(self, plan: "Plan", settings: dict[str, str]) -> None:
        """Raise ``settings.settings_conflict`` when DIR holds outputs of this layout for ``plan``
        made with other settings (a run of another layout asks, so that layouts never mix)."""

    @abstractmethod
    def scan(self, plan: "Plan", settings: dict[str, str], state: "DirState") -> tuple[list["Job"], list["Result"]]:
        """The resume step, before anything is written: (jobs still to encode, results of inputs
        already done or whose outputs cannot be used)."""

    @abstractmethod
    def open(self, plan: "Plan", metadata: dict[str, str]) -> Sink:
        """A sink writing outputs with ``metadata`` for the jobs of ``plan``."""

    def overwrite_done(self, out_dir: Path, started: float) -> bool:
        """After every input of an ``--overwrite`` started at ``started`` (``time.time()``) was
        written: clean up, and say whether DIR now holds only outputs of the new settings."""
        return True

    @staticmethod
    @abstractmethod
    def owns(path: Path) -> bool:
        """Whether ``path`` (a file, or a folder) is an output of this layout."""

    @abstractmethod
    def read(self, path: Path) -> Loaded:
        """The embeddings of ``path``: one output file, or a folder of this layout's outputs.

        Raises:
            UsageError: nothing of this layout there, or outputs that do not fit together.
            InputError: a file that cannot be read.
        """
