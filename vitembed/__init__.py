"""vitembed: image files -> Vision Transformer embeddings.

``import vitembed`` does not import torch; the names below that need it are
loaded on first use.

    >>> import vitembed
    >>> encoder = vitembed.load_encoder("vit-base-patch16-224-in21k", weights="random")
    >>> summary = vitembed.encode(["images/"], "emb/", encoder=encoder)
"""

__version__ = "0.1.0"

_LAZY = {
    "Encoder": "pipeline",
    "load_encoder": "pipeline",
    "encode_jobs": "pipeline",
    "encode": "pipeline",
    "VisionTransformer": "model",
    "ViTConfig": "config",
    "PreprocessConfig": "config",
    "plan_jobs": "inputs",
    "inspect_file": "inspect",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'vitembed' has no attribute {name!r}")
