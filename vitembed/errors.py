"""Errors raised by the vitembed library.

The library raises these; the CLI turns them into one message on stderr and an
exit status (llm / sqlite-utils style). Every error names the file it concerns
when there is one.
"""

from __future__ import annotations


def printable(path) -> str:
    """A path as valid UTF-8 text: bytes that are not UTF-8 (surrogate-escaped by the OS layer)
    become ``\\xNN`` escapes, so metadata, JSON and messages never fail on odd file names."""
    import os

    return os.fsencode(path).decode("utf-8", "backslashreplace")


# C0 controls, DEL and C1 controls: a name holding them could forge lines or send escape
# sequences to a terminal.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROLS.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
# Line and paragraph separators and the bidirectional controls (a right-to-left override makes
# "a\u202egpj.exe" display as "aexe.jpg").
_CONTROLS.update({c: f"\\u{c:04x}" for c in (0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))})


def shown(path) -> str:
    """A path as it appears in messages for people (stderr, error text): ``printable``, with
    control characters escaped (newline as ``\\n``, ESC as ``\\x1b``), so a file name can
    neither forge a line of output nor reach the terminal as an escape sequence."""
    return printable(path).translate(_CONTROLS)


class VitembedError(Exception):
    """Base class of every error vitembed raises on purpose.

    ``exit_code`` is the status the CLI exits with when this error ends a run:
    2 for usage and setup errors (bad options, no weights, bad checkpoint).
    """

    exit_code = 2


class UsageError(VitembedError):
    """An option or argument that cannot work (unknown model, bad layer, ...)."""


class WeightsNotFoundError(VitembedError):
    """No weights could be found or fetched for the requested model."""


class CheckpointError(VitembedError):
    """A checkpoint that does not fit the architecture: wrong keys or shapes.

    The message names the first mismatching key.
    """


class DeviceError(VitembedError):
    """An explicitly requested device (``cuda``, ``cuda:N``, ``mps``) is not available."""


class EngineError(VitembedError):
    """The engine itself failed part-way (a Ray cluster lost, model actors that cannot start).
    The outputs already written are whole; running the same command again resumes."""


class VitembedWarning(UserWarning):
    """Something the user asked for works, but not as well as they may expect
    (bfloat16 on a CPU without bfloat16 instructions, ``--compile`` falling back to eager).
    Issued with ``warnings.warn``; the CLI prints it as one ``warning:`` line on stderr."""


def warn(message: str) -> None:
    """``warnings.warn(message, VitembedWarning)`` attributed to the caller's own code: the first
    frame outside the vitembed package (``vitembed.encode(...)`` in a notebook cell), however deep
    inside vitembed it is issued."""
    import os
    import sys
    import warnings

    package = os.path.dirname(os.path.abspath(__file__))
    level, frame = 2, sys._getframe(1)  # stacklevel 2: the frame that called warn()
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)).startswith(package):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, VitembedWarning, stacklevel=level)


class InputError(VitembedError):
    """One input file could not be turned into pixels.

    Raised per file; the pipeline records it and goes on with the other inputs.
    ``kind`` is a short machine-readable reason (``empty``, ``not-an-image``,
    ``truncated``, ``unreadable``, ``too-large``, ``unsupported``, ``not-found``, ``out-of-memory``, ``collision``, ``write-failed``).
    """

    def __init__(self, path: str, kind: str, reason: str):
        super().__init__(f"{shown(path)}: {reason}")
        self.path = path
        self.kind = kind
        self.reason = reason
