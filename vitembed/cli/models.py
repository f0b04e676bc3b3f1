"""``vitembed models``: the catalog."""

from __future__ import annotations

from typing import Annotated

from ..catalog import CATALOG
from ..console import out
from .common import _opt, app


@app.command()
def models(as_json: Annotated[bool, _opt("One JSON object per model on stdout.", "--json")] = False) -> None:
    """List the known model names (a name or its Hub repository id goes to --model), and which have
    weights on disk: "local" under ./weights/<name>/, "cache" in the Hugging Face cache."""
    import json

    from ..console import model_lines, model_row
    from ..hub import weights_on_disk

    on_disk = {name: weights_on_disk(spec) for name, spec in CATALOG.items()}
    if as_json:
        for name, spec in CATALOG.items():
            out(json.dumps({**model_row(spec), "weights_on_disk": on_disk[name]}) + "\n")
    else:
        for line in model_lines(list(CATALOG.values()), on_disk):
            out(line + "\n")
