"""vitembed: image files -> Vision Transformer embeddings.

``import vitembed`` does not import torch; the names below that need it are
loaded on first use.

    >>> import vitembed
    >>> encoder = vitembed.Encoder("dinov2-small", weights="random", pool="cls")
    >>> vectors = encoder.encode(["cat.jpg", "dog.png"])          # (2, 384) float32 torch tensor
    >>> summary = vitembed.encode(["images/"], "emb/", encoder, pack=16)
    >>> loaded = vitembed.load("emb/")                            # .embeddings, .keys, .sources, .metadata
"""

__version__ = "0.1.0"

_LAZY = {
    "Encoder": "encoder",
    "load_encoder": "encoder",
    "encode": "run",
    "encode_plan": "run",
    "load": "layouts",
    "iter_packed": "layouts",
    "ModelOptions": "options",
    "EncodingOptions": "options",
    "RunOptions": "options",
    "VisionTransformer": "model",
    "ViTConfig": "config",
    "PreprocessConfig": "config",
    "plan_jobs": "inputs",
    "inspect_file": "inspect",
    "InputError": "errors",
    "UsageError": "errors",
    "VitembedError": "errors",
    "VitembedWarning": "errors",
    "CheckpointError": "errors",
    "WeightsNotFoundError": "errors",
    "DeviceError": "errors",
    "EngineError": "errors",
    "RayOptions": "options",
    "read_table_paths": "tables",
    "export_vectors": "export",
    "show_outputs": "show",
    "pca_maps": "show",
    "Progress": "progress",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    try:  # a submodule (vitembed.errors.VitembedError without importing vitembed.errors first)
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'vitembed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
