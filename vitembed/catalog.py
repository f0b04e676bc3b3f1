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
        UsageError: unknown name; the message lists the known ones.
    """
    if name in CATALOG:
        return CATALOG[name]
    for spec in CATALOG.values():
        if spec.repo == name:
            return spec
    raise UsageError(f"unknown model {name!r}; known models: {', '.join(CATALOG)}")
