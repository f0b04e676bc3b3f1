"""CLIP's image tower (families/clip.py) against transformers' CLIPVisionModel: every layer and the
pooled output, the vision half of a whole CLIPModel, random weights and the catalog."""

from __future__ import annotations

import numpy as np
import pytest
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


@pytest.mark.parametrize("kind", ["whole", "projection"])
def test_clip_pool_head_is_get_image_features(tmp_path, kind):
    """--pool head: visual_projection of the pooled output, what CLIPModel.get_image_features and
    CLIPVisionModelWithProjection's image_embeds return: the vectors that compare with CLIP's text."""
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    ckpt = _clip(tmp_path / kind, whole=kind == "whole", projection=kind == "projection")
    weights = resolve_weights(get_model_spec("clip-vit-base-patch16"), ckpt)
    assert weights.config.proj_dim == 40
    ours = build_model(weights)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if kind == "whole":
            want = CLIPModel.from_pretrained(ckpt).eval().get_image_features(pixel_values=x).pooler_output
        else:
            want = CLIPVisionModelWithProjection.from_pretrained(ckpt).eval()(pixel_values=x).image_embeds
        got = family_of(weights.config).pool(ours, ours(x)["last"], "head")
    assert got.shape == want.shape == (2, 40)
    assert (got - want).abs().max() < 1e-5


def test_clip_pool_head_without_the_projection_says_what_is_missing(tmp_path):
    import vitembed
    from vitembed.errors import UsageError

    ckpt = _clip(tmp_path / "tower")
    with pytest.raises(UsageError, match="needs visual_projection.*whole CLIPModel checkpoint"):
        vitembed.Encoder("clip-vit-base-patch16", ckpt, pool="head")
    assert vitembed.Encoder("clip-vit-base-patch16", ckpt, pool="cls").output_shape == (48,)


def test_normalize_gives_unit_vectors_that_are_the_reference_divided_by_its_norm(tmp_path):
    import vitembed
    from transformers import CLIPModel

    from .conftest import photo

    ckpt = _clip(tmp_path / "whole", whole=True)
    images = [np.asarray(photo(40, 30, seed=s)) for s in range(3)]
    encoder = vitembed.Encoder("clip-vit-base-patch16", ckpt, pool="head", normalize=True)
    assert encoder.output_shape == (40,) and encoder.metadata()["normalize"] == "l2"
    got = encoder.encode(images)
    plain = vitembed.Encoder("clip-vit-base-patch16", ckpt, pool="head")
    assert "normalize" not in plain.metadata()
    pixels = torch.stack([plain.preprocess(im) for im in images])
    with torch.no_grad():
        want = CLIPModel.from_pretrained(ckpt).eval().get_image_features(pixel_values=pixels).pooler_output
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert (got - want / want.norm(dim=-1, keepdim=True)).abs().max() < 1e-5
    assert (plain.encode(images) - want).abs().max() < 1e-4
    with pytest.raises(vitembed.UsageError, match="--normalize.*--pool cls, mean or head"):
        vitembed.Encoder("clip-vit-base-patch16", ckpt, pool="none", normalize=True)


def test_clip_catalog_projection_widths():
    assert get_model_spec("clip-vit-base-patch32").config().proj_dim == 512
    assert get_model_spec("clip-vit-large-patch14").config().proj_dim == 768
    model = build_model(resolve_weights(get_model_spec("clip-vit-base-patch32"), "random"))
    with torch.no_grad():
        assert family_of(model.cfg).pool(model, model(torch.zeros(1, 3, 224, 224))["last"], "head").shape == (1, 512)
