"""``vitembed models``: the catalog."""

from __future__ import annotations

from typing import Annotated

import typer

from ..catalog import CATALOG
from ..console import out
from .common import _opt, app


@app.command()
def models(as_json: Annotated[bool, _opt("One JSON object per model on stdout.", "--json")] = False) -> None:
    """List the known model names."""
    import json

    from ..console import model_line, model_row

    for spec in CATALOG.values():
        if as_json:
            out(json.dumps(model_row(spec)) + "\n")
        else:
            typer.echo(model_line(spec))

