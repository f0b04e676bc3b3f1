"""DINOv2 (families/dinov2.py), with and without registers, against transformers: every layer at
the checkpoint's size and at an interpolated one, a folder without preprocessor_config.json, and
timm's position embedding without the class position."""

from __future__ import annotations

import pytest
import torch

from vitembed.catalog import get_model_spec
from vitembed.families import family_of
from vitembed.weights import build_model, resolve_weights

from .helpers import _dinov2


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("size", [56, 32])
def test_dinov2_matches_transformers_at_every_layer(tmp_path, registers, size):
    """At the checkpoint's size, and at a smaller one through the interpolated position embedding
    (as the 518 -> 224 of the real checkpoints)."""
    from transformers import AutoModel

    ckpt = _dinov2(tmp_path / "d2", registers)
    reference = AutoModel.from_pretrained(ckpt).eval()
    weights = resolve_weights(get_model_spec("dinov2-small"), ckpt).at_image_size(size)
    cfg = weights.config
    assert cfg.layer_scale and cfg.reg_tokens == registers and cfg.num_prefix_tokens == 1 + registers
    ours = build_model(weights)
    x = torch.randn(2, 3, size, size)
    names = ["embeddings", "1", "2", "3", "last"]
    with torch.no_grad():
        ref = reference(pixel_values=x, output_hidden_states=True)
        out = ours(x, layers=names)
    tokens = 1 + registers + (size // 8) ** 2
    for i, name in enumerate(names):
        want = ref.last_hidden_state if name == "last" else ref.hidden_states[i]
        assert out[name].shape == want.shape == (2, tokens, 48)
        assert (out[name] - want).abs().max() < 1e-4, (name, (out[name] - want).abs().max())


def test_dinov2_directory_without_preprocessor_config_runs_at_224(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=48, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=2,
                             image_size=518, patch_size=14)).save_pretrained(tmp_path / "d2")
    weights = resolve_weights(get_model_spec("vit-base-patch16-224-in21k"), tmp_path / "d2")
    assert weights.preprocess.image_size == 224 and weights.preprocess.resize == "shortest"
    assert weights.config.image_size == 224 and weights.trained_image_size == 518
    assert weights.config.num_tokens == 1 + 16 * 16


def test_timm_no_embed_class_position_embedding(tmp_path):
    """timm's DINOv2-with-registers keeps patch positions only, the class position folded into cls_token."""
    from vitembed.convert import convert_state_dict, load_converted
    from vitembed.model import VisionTransformer

    ours = build_model(resolve_weights(get_model_spec("dinov2-small"), _dinov2(tmp_path / "d2r", 4)).at_image_size(56))
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
    sd["pos_embed"] = sd["pos_embed"][:, 1:]  # (1, 49, D): patches only
    from vitembed.convert import embed_class_positions

    assert sd["pos_embed"].shape[1] == 49
    again = VisionTransformer(ours.cfg)
    load_converted(again, embed_class_positions(convert_state_dict(sd), ours.cfg.num_embedded_prefix_tokens))
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert (again.eval()(x)["last"] - ours(x)["last"]).abs().max() < 1e-5


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_giant_swiglu_matches_transformers_at_every_layer(tmp_path, registers):
    """ViT-g's SwiGLU MLP (use_swiglu_ffn): weights_in holds the gate rows, then the up rows; its
    width is two thirds of mlp_ratio * D rounded up to 8 (here 4 * 48 -> 128)."""
    from transformers import AutoModel

    ckpt = _dinov2(tmp_path / "g", registers, swiglu=True)
    reference = AutoModel.from_pretrained(ckpt).eval()
    weights = resolve_weights(get_model_spec("dinov2-giant"), ckpt).at_image_size(56)
    assert (weights.config.mlp, weights.config.mlp_dim) == ("swiglu", 128)
    ours = build_model(weights)
    x = torch.randn(2, 3, 56, 56)
    names = ["embeddings", "1", "2", "3", "last"]
    with torch.no_grad():
        ref = reference(pixel_values=x, output_hidden_states=True)
        out = ours(x, layers=names)
        head = family_of(weights.config).pool(ours, out["last"], "head")
    for i, name in enumerate(names):
        want = ref.last_hidden_state if name == "last" else ref.hidden_states[i]
        assert (out[name] - want).abs().max() < 1e-5, name
    assert (head - ref.pooler_output).abs().max() < 1e-5


def test_dinov2_giant_timm_layout_loads(tmp_path):
    """timm's vit_giant_patch14_dinov2 keeps SwiGLUPacked's fc1 (gate, then up) and fc2: vitembed's names."""
    import dataclasses

    from safetensors.torch import save_file

    ckpt = _dinov2(tmp_path / "g", swiglu=True)
    weights = resolve_weights(get_model_spec("dinov2-giant"), ckpt).at_image_size(56)
    ours = build_model(weights)
    timm_file = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, timm_file)
    single = dataclasses.replace(resolve_weights(get_model_spec("dinov2-giant"), timm_file), config=weights.config,
                                 trained_image_size=None)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(build_model(single)(x)["last"], ours(x)["last"])


def test_dinov2_giant_catalog_entries():
    from vitembed.model import num_parameters

    for name, prefix in (("dinov2-giant", 1), ("dinov2-with-registers-giant", 5)):
        cfg = get_model_spec(name).config()
        assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.mlp) == (1536, 40, 24, 4096, "swiglu")
        assert cfg.num_prefix_tokens == prefix and cfg.num_tokens == prefix + 256
    assert round(num_parameters(get_model_spec("dinov2-giant").config()) / 1e6) == 1135


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_giant_entry_loads_a_checkpoint_shaped_like_the_published_one(tmp_path, registers):
    """The published facebook/dinov2(-with-registers)-giant config fields (use_swiglu_ffn, patch 14,
    image_size 518, eps 1e-6, mlp_ratio 4) at a small width."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    kw = dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=4, image_size=518, patch_size=14,
              use_swiglu_ffn=True, layer_norm_eps=1e-6)
    model = (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **kw)) if registers
             else Dinov2Model(Dinov2Config(**kw)))
    model.save_pretrained(tmp_path / "g")
    name = "dinov2-with-registers-giant" if registers else "dinov2-giant"
    weights = resolve_weights(get_model_spec(name), tmp_path / "g")
    assert (weights.config.mlp, weights.config.image_size, weights.trained_image_size) == ("swiglu", 224, 518)
    with torch.no_grad():
        assert build_model(weights)(torch.zeros(1, 3, 224, 224))["last"].shape == (1, 1 + registers + 256, 48)
