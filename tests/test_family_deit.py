"""DeiT (families/deit.py), with the distillation token, against transformers' DeiTModel: every
layer, pooling that leaves out both prefix tokens, the metadata, and the catalog entries."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors import safe_open
from transformers import DeiTModel

from vitembed.catalog import get_model_spec
from vitembed.weights import build_model, resolve_weights

from .conftest import photo, run_cli
from .helpers import _deit


def test_deit_distilled_matches_transformers_at_every_layer(tmp_path):
    ckpt = _deit(tmp_path / "deit")
    reference = DeiTModel.from_pretrained(ckpt).eval()
    weights = resolve_weights(get_model_spec("vit-base-patch16-224"), ckpt)
    assert weights.config.dist_token and weights.config.num_prefix_tokens == 2 and weights.config.num_tokens == 18
    ours = build_model(weights)
    x = torch.randn(2, 3, 32, 32)
    names = ["embeddings", "1", "2", "3", "last"]
    with torch.no_grad():
        ref = reference(pixel_values=x, output_hidden_states=True)
        out = ours(x, layers=names)
    for i, name in enumerate(names):
        want = ref.last_hidden_state if name == "last" else ref.hidden_states[i]
        assert out[name].shape == want.shape == (2, 18, 48)
        assert (out[name] - want).abs().max() < 1e-4, name
    assert not torch.equal(out["embeddings"][:, 0], out["embeddings"][:, 1])  # class != distillation token


def test_deit_pooling_and_metadata(tmp_path):
    ckpt = _deit(tmp_path / "deit")
    photo(50, 40).save(tmp_path / "p.png")
    outs = {}
    for pool in ("none", "cls", "mean", "patch"):
        r = run_cli("encode", str(tmp_path / "p.png"), "--out", str(tmp_path / pool), "--weights", str(ckpt), "--pool", pool)
        assert r.returncode == 0, r.stderr.decode()
        with safe_open(str(tmp_path / pool / "p.png.safetensors"), "numpy") as f:
            outs[pool], meta = f.get_tensor("embedding"), f.metadata()
        assert meta["prefix_tokens"] == "2" and meta["tokens"] == "18"
    assert outs["none"].shape == (18, 48) and outs["patch"].shape == (16, 48) and outs["cls"].shape == (48,)
    assert np.array_equal(outs["cls"], outs["none"][0]) and np.array_equal(outs["patch"], outs["none"][2:])
    assert np.allclose(outs["mean"], outs["none"][2:].mean(0), atol=1e-6)  # patches only: no class/dist token


def test_deit_catalog_entries_and_random_weights(tmp_path):
    spec = get_model_spec("deit-small-distilled-patch16-224")
    cfg = spec.config()
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.num_tokens) == (384, 12, 6, 198)
    assert spec.preprocess.crop and spec.preprocess.resize_to == 256 and spec.preprocess.interpolation == "bicubic"
    model = build_model(resolve_weights(spec, "random"))
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224))["last"].shape == (1, 198, 384)
    rows = [json.loads(line) for line in run_cli("models", "--json").stdout.decode().splitlines()]
    deit = next(r for r in rows if r["name"] == "deit-base-distilled-patch16-224")
    assert deit["tokens"] == 198 and deit["prefix_tokens"] == 2 and deit["crop"] and deit["resize_size"] == 256
