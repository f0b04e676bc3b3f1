"""Which tokens come out: --pool, and other input sizes through position-embedding resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vitembed.convert import resample_pos_embed

from .conftest import photo, run_cli


def _bicubic_reference(pos_embed: torch.Tensor, side: int, new: int) -> np.ndarray:
    """Each channel of the patch grid resized by Pillow's bicubic filter (float 'F' images)."""
    grid = pos_embed[0, 1:].numpy()
    channels = [
        np.asarray(Image.fromarray(grid[:, c].reshape(side, side), "F").resize((new, new), Image.Resampling.BICUBIC))
        for c in range(grid.shape[1])
    ]
    return np.stack(channels, -1).reshape(new * new, -1)


def test_resample_is_identity_for_the_same_grid():
    pe = torch.randn(1, 1 + 14 * 14, 16)
    assert resample_pos_embed(pe, (14, 14)) is pe


@pytest.mark.parametrize("new", [24, 10])
def test_resample_matches_a_direct_bicubic_reference_and_keeps_the_class_token(new):
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 14 * 14, 8)
    out = resample_pos_embed(pe, (new, new))
    assert out.shape == (1, 1 + new * new, 8)
    assert torch.equal(out[:, :1], pe[:, :1])
    assert np.abs(out[0, 1:].numpy() - _bicubic_reference(pe, 14, new)).max() < 1e-5


def _load(path):
    with safe_open(str(path), "numpy") as f:
        return f.get_tensor("embedding"), f.metadata()


def test_pool_shapes_and_values(tmp_path, small_ckpt):
    photo(40, 30).save(tmp_path / "p.png")
    outs = {}
    for pool in ("none", "cls", "mean", "patch"):
        r = run_cli("encode", str(tmp_path / "p.png"), "--out", str(tmp_path / pool), "--weights", str(small_ckpt), "--pool", pool)
        assert r.returncode == 0, r.stderr.decode()
        outs[pool], meta = _load(tmp_path / pool / "p.png.safetensors")
        assert meta["pool"] == pool and meta["prefix_tokens"] == "1" and meta["grid"] == "4x4"
    tokens = outs["none"]
    assert tokens.shape == (17, 48) and outs["cls"].shape == (48,) and outs["mean"].shape == (48,)
    assert outs["patch"].shape == (16, 48)
    assert np.array_equal(outs["cls"], tokens[0]) and np.array_equal(outs["patch"], tokens[1:])
    assert np.allclose(outs["mean"], tokens[1:].mean(0), atol=1e-6)


def test_other_image_size_resamples_the_checkpoint_position_embedding(tmp_path, small_ckpt):
    from vitembed.catalog import get_model_spec
    from vitembed.convert import convert_state_dict
    from vitembed.model import VisionTransformer
    from vitembed.weights import build_model, read_state_dict, resolve_weights

    weights = resolve_weights(get_model_spec("vit-base-patch16-224"), small_ckpt).at_image_size(48)
    assert weights.config.num_tokens == 1 + 6 * 6 and weights.preprocess.image_size == 48
    model = build_model(weights)
    sd = convert_state_dict(read_state_dict(small_ckpt / "model.safetensors"))
    assert np.abs(model.pos_embed[0, 1:].detach().numpy() - _bicubic_reference(sd["pos_embed"], 4, 6)).max() < 1e-5
    assert torch.equal(model.pos_embed[:, :1], sd["pos_embed"][:, :1])
    assert isinstance(model, VisionTransformer)

    photo(40, 30).save(tmp_path / "p.png")
    r = run_cli("encode", str(tmp_path / "p.png"), "--out", str(tmp_path / "o"), "--weights", str(small_ckpt), "--image-size", "48")
    assert r.returncode == 0, r.stderr.decode()
    array, meta = _load(tmp_path / "o" / "p.png.safetensors")
    assert array.shape == (37, 48)
    assert meta["image_size"] == "48" and meta["grid"] == "6x6" and meta["pos_embed_resampled_from"] == "4x4"
    bad = run_cli("encode", str(tmp_path / "p.png"), "--out", str(tmp_path / "o2"), "--weights", str(small_ckpt), "--image-size", "50")
    assert bad.returncode == 2 and "multiple of the patch size 8" in bad.stderr.decode()


def test_preprocessing_overrides_are_used_and_recorded(tmp_path, small_ckpt):
    photo(60, 40).save(tmp_path / "p.png")
    r = run_cli("encode", str(tmp_path / "p.png"), "--out", str(tmp_path / "o"), "--weights", str(small_ckpt),
                "--crop-pct", "0.8", "--interpolation", "bicubic", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225")
    assert r.returncode == 0, r.stderr.decode()
    _, meta = _load(tmp_path / "o" / "p.png.safetensors")
    assert meta["preprocess_overrides"] == "crop_pct,interpolation,mean,std"
    assert (meta["resize_size"], meta["crop"], meta["crop_rounding"], meta["interpolation"]) == ("40", "true", "round", "bicubic")
    assert meta["mean"] == "0.485,0.456,0.406" and meta["std"] == "0.229,0.224,0.225"
    bad = run_cli("encode", str(tmp_path / "p.png"), "--out", str(tmp_path / "o2"), "--weights", str(small_ckpt), "--mean", "0.5,0.5")
    assert bad.returncode == 2 and "--mean '0.5,0.5': expected three numbers" in bad.stderr.decode()


def test_timm_crop_pct_follows_the_image_size():
    from vitembed.catalog import get_model_spec

    pre = get_model_spec("vit_tiny_patch16_224.augreg_in21k").preprocess
    assert pre.resize_to == 248 and pre.at_image_size(384).resize_to == 426  # floor(384 / 0.9), as timm


def test_back_at_the_checkpoint_size_nothing_is_resampled(small_ckpt):
    from vitembed.catalog import get_model_spec
    from vitembed.weights import resolve_weights

    w = resolve_weights(get_model_spec("vit-base-patch16-224"), small_ckpt)
    assert w.at_image_size(48).trained_image_size == 32
    assert w.at_image_size(48).at_image_size(32).trained_image_size is None


def test_a_checkpoint_with_its_own_architecture_is_named_as_such(tmp_path, small_ckpt):
    photo(20, 20).save(tmp_path / "p.png")
    r = run_cli("encode", str(tmp_path / "p.png"), "--out", str(tmp_path / "o"), "--weights", str(small_ckpt))
    assert r.returncode == 0
    _, meta = _load(tmp_path / "o" / "p.png.safetensors")
    assert meta["model"] == "checkpoint:vit" and meta["family"] == "vit"
