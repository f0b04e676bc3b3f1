"""The model against transformers' ViTModel, layer by layer, in float32."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTModel

from vitembed.catalog import get_model_spec
from vitembed.weights import build_model, resolve_weights

from .conftest import save_vit

TOL = 1e-4


def _layers(depth: int) -> list[str]:
    return ["embeddings", *map(str, range(1, depth + 1)), "last"]


def _compare(ckpt_dir, batch: int, image_size: int) -> dict[str, float]:
    torch.manual_seed(1)
    reference = ViTModel.from_pretrained(ckpt_dir, attn_implementation="sdpa").eval()
    ours = build_model(resolve_weights(get_model_spec("vit-base-patch16-224-in21k"), ckpt_dir))
    x = torch.randn(batch, 3, image_size, image_size)
    depth = ours.cfg.depth
    with torch.no_grad():
        ref = reference(pixel_values=x, output_hidden_states=True)
        out = ours(x, layers=_layers(depth))
    diffs = {}
    for i, name in enumerate(_layers(depth)):
        expected = ref.last_hidden_state if name == "last" else ref.hidden_states[i]
        assert out[name].shape == expected.shape
        diffs[name] = (out[name] - expected).abs().max().item()
    # The layers really differ from each other (a test that cannot fail is a defect).
    assert (out["1"] - out["embeddings"]).abs().max() > 0.1
    assert (out["last"] - out[str(depth)]).abs().max() > 0.1
    return diffs


def test_every_layer_matches_transformers_small(small_ckpt):
    diffs = _compare(small_ckpt, batch=3, image_size=32)
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.slow
def test_every_layer_matches_transformers_vit_b16(tmp_path):
    ckpt = save_vit(
        tmp_path / "b16",
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=224,
        patch_size=16,
        layer_norm_eps=1e-12,
    )
    diffs = _compare(ckpt, batch=2, image_size=224)
    assert max(diffs.values()) < TOL, diffs


def test_model_runs_only_as_deep_as_asked(small_ckpt):
    ours = build_model(resolve_weights(get_model_spec("vit-base-patch16-224"), small_ckpt))
    calls = []
    for i, block in enumerate(ours.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        ours(torch.zeros(1, 3, 32, 32), layers=["embeddings"])
        assert calls == []
        ours(torch.zeros(1, 3, 32, 32), layers=["2"])
        assert calls == [0, 1]


def test_wrong_input_size_is_refused(small_ckpt):
    from vitembed.errors import UsageError

    ours = build_model(resolve_weights(get_model_spec("vit-base-patch16-224"), small_ckpt))
    with pytest.raises(UsageError, match="takes 32x32"):
        ours(torch.zeros(1, 3, 48, 48))
