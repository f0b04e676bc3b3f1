"""``vitembed inspect``: what output files hold."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import out, say
from ..errors import InputError
from .common import AsJson, app


@app.command()
def inspect(
    files: Annotated[list[Path], typer.Argument(help=".safetensors or .npy files written by encode.", show_default=False)],
    as_json: AsJson = False,
) -> None:
    """Show tensor names, shapes, dtypes, metadata and statistics of output files."""
    import json

    from ..console import print_inspect
    from ..errors import shown
    from ..inspect import inspect_file

    failed = 0
    for file in files:
        try:
            info = inspect_file(file)
        except InputError as e:
            failed += 1
            say(f"error: {e}")
            continue
        except Exception as e:  # one odd file must not hide the others
            failed += 1
            say(f"error: {shown(file)}: cannot inspect: {type(e).__name__}: {e}")
            continue
        if as_json:
            out(json.dumps(info, ensure_ascii=False) + "\n")
        else:
            print_inspect(info)
    if failed:
        raise typer.Exit(1)

