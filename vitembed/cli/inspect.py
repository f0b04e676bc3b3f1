"""``vitembed inspect``: what output files hold."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..console import out, say
from ..errors import InputError, VitembedError
from .common import _opt, command


INSPECT_EPILOG = """Examples:
  vitembed inspect emb/cat.jpg.safetensors
  vitembed inspect emb/            # the folder: layout, count, settings
  vitembed inspect emb/ --key sub/cat.jpg --json

Exit status: 0 all shown; 1 some could not be read (each named on stderr)."""


@command("What output files, folders and packed rows hold.", INSPECT_EPILOG)
def inspect(
    paths: Annotated[list[Path], typer.Argument(help="Output files (.safetensors, .npy) or output folders written by encode.", metavar="PATH",
                                                show_default=False)],
    key: Annotated[Optional[list[str]], _opt("A row of a --pack folder, by its key in index.jsonl (repeatable).", "--key",
                                             metavar="KEY")] = None,
    as_json: Annotated[bool, _opt("One JSON object per file, row or folder on stdout (metadata numbers as numbers).",
                                  "--json")] = False,
) -> None:
    """Show what outputs hold: for a file, its tensors (shape, dtype, statistics) and metadata; for a
    folder, its layout, number of outputs, shape and settings; with --key, rows of a --pack folder."""
    import json

    from ..console import print_inspect, print_inspect_dir
    from ..errors import shown
    from ..inspect import inspect_dir, inspect_file, inspect_row, typed_metadata

    failed = 0
    jobs = [(path, k) for path in paths for k in key] if key else [(path, None) for path in paths]
    for path, row_key in jobs:
        try:
            if row_key is not None:
                info = inspect_row(path, row_key)
            elif path.is_dir():
                info = inspect_dir(path)
            else:
                info = inspect_file(path)
        except InputError as e:
            failed += 1
            say(f"error: {e}")
            continue
        except Exception as e:  # one odd file must not hide the others
            failed += 1
            why = str(e) if isinstance(e, VitembedError) else f"{type(e).__name__}: {e}"
            say(f"error: {shown(path)}: cannot inspect: {why}")
            continue
        field = "settings" if info.get("kind") == "folder" else "metadata"
        if info[field] is not None:  # in a fixed order; --json: numbers and flags typed
            typed = typed_metadata(info[field])
            info[field] = typed if as_json else {k: info[field][k] for k in typed}
        if as_json:
            out(json.dumps(info, ensure_ascii=False) + "\n")
        elif field == "settings":
            print_inspect_dir(info)
        else:
            print_inspect(info)
    if failed:
        raise typer.Exit(1)
