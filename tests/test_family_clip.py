"""CLIP's image tower (families/clip.py) against transformers' CLIPVisionModel: every layer and the
pooled output, the vision half of a whole CLIPModel, random weights and the catalog."""

from __future__ import annotations

import torch

from vitembed.catalog import get_model_spec
from vitembed.families import family_of
from vitembed.weights import build_model, resolve_weights

from .helpers import _clip


def test_clip_vision_tower_matches_transformers_at_every_layer_and_pooled(tmp_path):
    from transformers import CLIPVisionModel

    ckpt = _clip(tmp_path / "clip")
    reference = CLIPVisionModel.from_pretrained(ckpt).eval()
    weights = resolve_weights(get_model_spec("clip-vit-base-patch16"), ckpt)
    cfg = weights.config
    assert cfg.pre_norm and cfg.final_norm == "pooled" and cfg.act == "quick_gelu" and not cfg.patch_bias
    ours = build_model(weights)
    x = torch.randn(2, 3, 32, 32)
    names = ["embeddings", "1", "2", "3", "last"]
    with torch.no_grad():
        ref = reference(pixel_values=x, output_hidden_states=True)
        out = ours(x, layers=names)
        pooled = family_of(cfg).pool(ours, out["last"], "cls", "last")
    for i, name in enumerate(names):
        want = ref.last_hidden_state if name == "last" else ref.hidden_states[i]
        assert (out[name] - want).abs().max() < 1e-4, name
    assert torch.equal(out["last"], out["3"])  # CLIP's last hidden state is not post-LayerNormed...
    assert (pooled - ref.pooler_output).abs().max() < 1e-4  # ...its pooled output is


def test_clip_image_tower_of_a_whole_clip_model_loads(tmp_path):
    from transformers import CLIPModel

    ckpt = _clip(tmp_path / "whole", whole=True)
    reference = CLIPModel.from_pretrained(ckpt).eval()
    ours = build_model(resolve_weights(get_model_spec("clip-vit-base-patch16"), ckpt))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = reference.vision_model(pixel_values=x).pooler_output
        got = family_of(ours.cfg).pool(ours, ours(x)["last"], "cls", "last")
    assert (got - want).abs().max() < 1e-4


def test_clip_random_weights_and_catalog():
    spec = get_model_spec("clip-vit-large-patch14")
    model = build_model(resolve_weights(spec, "random"))
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224))["last"].shape == (1, 257, 1024)
    assert spec.preprocess.resize == "shortest" and spec.preprocess.crop
