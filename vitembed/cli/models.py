"""``vitembed models``: the catalog."""

from __future__ import annotations

from typing import Annotated

from ..catalog import CATALOG
from ..console import out
from .common import _opt, command


@command("The known model names, and which have weights on disk.")
def models(as_json: Annotated[bool, _opt("One JSON object per model on stdout.", "--json")] = False) -> None:
    """List the known model names (a name or its Hub repository id goes to --model): family, tokens,
    hidden size, Hub repository, and which have weights on disk ("local" under ./weights/NAME/,
    "cache" in the Hugging Face cache, "-" none; then --weights random, or a download)."""
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
