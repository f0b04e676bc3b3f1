"""The ``vitembed`` command: a thin layer over the Python API.

Parses flags into the library's option objects (``options.py``: each value checked there), calls
the library, and turns its errors into one line on stderr and an exit status (0 all good, 1 some
inputs failed, 2 usage or setup error, 130 Ctrl-C, 143 SIGTERM). What is printed is
``console.py``'s. Importing this module does not import torch.
"""

from __future__ import annotations

import os
import sys

from ..console import StdoutClosed
from . import encode, export, inspect, models, show, verify  # noqa: F401  (each registers its command)
from .common import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except (BrokenPipeError, StdoutClosed):  # `vitembed ... --json | head`: stop quietly, as SIGPIPE would (128 + 13)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(141)

