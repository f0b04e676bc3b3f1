"""Shared fixtures: small transformers checkpoints saved with save_pretrained, and made-up photos.

Nothing here needs the network or ../shared.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

# No test may reach the network: transformers and huggingface_hub read this at import.
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

SMALL = dict(
    hidden_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=96,
    image_size=32,
    patch_size=8,
    layer_norm_eps=1e-6,
)


def save_vit(path: Path, classification: bool = False, seed: int = 0, **config) -> Path:
    """A randomly initialised transformers ViT, saved with save_pretrained into ``path``."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(**{**SMALL, **config})
    model = (ViTForImageClassification(cfg) if classification else ViTModel(cfg)).eval()
    # Spread the parameters so that every block changes the tokens visibly.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() >= 1:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory) -> Path:
    """Directory of a small random transformers ViTModel (32x32 input, patch 8, 3 blocks)."""
    return save_vit(tmp_path_factory.mktemp("ckpt") / "small")


def photo(width: int = 160, height: int = 120, seed: int = 0) -> Image.Image:
    """A made-up RGB 'photo': smooth gradients plus texture, so resizing has real work to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 120 * np.sin(x / max(width, 1) * 6.0 + seed)
    g = 127 + 120 * np.cos(y / max(height, 1) * 5.0)
    b = (x + y) / max(width + height, 1) * 255
    noise = rng.normal(0, 20, (height, width, 3))
    arr = np.stack([r, g, b], axis=-1) + noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def run_cli(
    *args: str, input: bytes | None = None, env: dict | None = None, cwd=None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python -m vitembed ARGS`` in a subprocess, stdout and stderr captured as text."""
    full_env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vitembed", *args],
        input=input,
        capture_output=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )
