"""The Hugging Face Hub seen from this machine, without downloading: which weights its cache
already holds, and whether the Hub can be reached at all (so that a machine without network
fails in seconds). ``weights.resolve_weights`` does the finding and downloading."""

from __future__ import annotations

import os
from pathlib import Path

from .families import ModelSpec

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # a transformers repository's weights, first found wins
# large checkpoints come in shards: an index (its "weight_map": key -> shard file name) beside them
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def weights_on_disk(spec: ModelSpec, cwd: str | os.PathLike | None = None) -> str | None:
    """Where weights for ``spec`` lie on this machine, without any network request: ``"local"``
    (``weights/<name>/`` under ``cwd``), ``"cache"`` (its files in the Hugging Face cache), or None."""
    if (Path(cwd or os.getcwd()) / "weights" / spec.name).exists():
        return "local"
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(spec.repo, name), str)
        except Exception:  # an odd cache folder is not weights
            return False

    if spec.source == "timm":
        return "cache" if cached("model.safetensors") else None
    return "cache" if cached("config.json") and any(cached(name) for name in WEIGHT_FILES + SHARD_INDEXES) else None


def hub_unreachable(endpoint: str, timeout: float = 2.0, environ: dict[str, str] | None = None) -> str | None:
    """Why the Hub at ``endpoint`` (``HF_ENDPOINT``, https://huggingface.co) cannot be reached, or
    None: one TCP connection attempt of at most ``timeout`` seconds to it, or to the proxy that
    ``HTTPS_PROXY``/``HTTP_PROXY`` name, so that a machine without network fails in seconds
    instead of through huggingface_hub's retries."""
    import socket
    from urllib.parse import urlsplit

    environ = os.environ if environ is None else environ
    url = urlsplit(endpoint)
    names = ("HTTPS_PROXY", "https_proxy") if url.scheme == "https" else ("HTTP_PROXY", "http_proxy")
    proxy = next((environ[k] for k in (*names, "ALL_PROXY", "all_proxy") if environ.get(k)), None)
    target = urlsplit(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else url
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    if not host:
        return None
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        what = f"the proxy {host}:{port}" if proxy else f"{host}:{port}"
        return f"{what} cannot be reached ({e.strerror or type(e).__name__})"
    return None
