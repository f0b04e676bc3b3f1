"""Opening vitembed's own small files safely (vitembed/files.py): only regular files are opened, so
a FIFO or a folder in their place is refused instead of blocking."""

from __future__ import annotations

import os

import pytest


def test_open_regular_refuses_fifos_for_reading_and_writing(tmp_path):
    from vitembed.files import NotRegularFileError, open_regular

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for flags in (os.O_RDONLY, os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_CREAT):
        with pytest.raises(NotRegularFileError):
            open_regular(fifo, flags)
    with pytest.raises(NotRegularFileError):
        open_regular(tmp_path, os.O_RDONLY)
