"""Known model names: the catalog entries of every family (``families/``), by name.

Each entry ties a checkpoint to the preprocessing its reference uses (transformers'
image processor config for the repository), so that embeddings match the
reference. Does not import torch.
"""

from __future__ import annotations

from .errors import UsageError
from .families import FAMILIES, ModelSpec

DEFAULT_MODEL = "vit-base-patch16-224-in21k"

CATALOG: dict[str, ModelSpec] = {spec.name: spec for family in FAMILIES for spec in family.models}

__all__ = ["CATALOG", "DEFAULT_MODEL", "ModelSpec", "get_model_spec"]


def get_model_spec(name: str) -> ModelSpec:
    """Catalog entry for ``name`` (vitembed name or its Hub repository id).

    Raises:
        UsageError: unknown name; the message names the closest known names (``difflib``).
    """
    if name in CATALOG:
        return CATALOG[name]
    for spec in CATALOG.values():
        if spec.repo == name:
            return spec
    import difflib

    def plain(text: str) -> str:  # timm's vit_small_patch16_224.augreg_in21k against vit-small-patch16-224
        return text.lower().replace("_", "-").replace(".", "-")

    names = {plain(n): n for n in [*(spec.repo for spec in CATALOG.values()), *CATALOG]}
    wanted = plain(str(name))
    starting = [n for key, n in names.items() if key.startswith(wanted)]  # the name with a suffix: a timm tag
    close = list(dict.fromkeys([*starting, *(names[c] for c in difflib.get_close_matches(wanted, names, n=3, cutoff=0.6))]))[:3]
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise UsageError(f"unknown model {name!r}; {hint}`vitembed models` lists the {len(CATALOG)} known names "
                     "(a name or its Hub repository id)")
