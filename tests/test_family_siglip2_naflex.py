"""SigLIP 2 NaFlex (families/siglip.py, ``naflex``) against transformers' Siglip2VisionModel and
Siglip2ImageProcessorPil: the size search, the patches bit for bit, every layer of a batch of images
with different grids (padding masked), the attention-pooled embedding, and the outputs' per-image
grids, resume, --pack and npy."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import vitembed
from vitembed.catalog import CATALOG, get_model_spec
from vitembed.preprocess import naflex_size
from vitembed.weights import resolve_weights

from .conftest import jpeg_bytes, photo, run_cli
from .helpers import _siglip2_naflex

NAMES = ["embeddings", "1", "2", "3", "last"]
SIZES = [(40, 30), (10, 60), (16, 16), (333, 17)]  # (width, height): 3x4, 8x2, 4x4, ... patches of 4


def test_naflex_size_is_transformers_size_search():
    from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

    rng = random.Random(0)
    cases = [(rng.randint(1, 5000), rng.randint(1, 5000), rng.choice([14, 16]), rng.choice([64, 256, 576, 1024]))
             for _ in range(500)] + [(1, 1, 16, 256), (1, 30000, 16, 256), (224, 224, 16, 256)]
    for h, w, p, m in cases:
        assert naflex_size(h, w, p, m) == get_image_size_for_max_num_patches(h, w, p, m), (h, w, p, m)


def _images(tmp_path):
    paths = []
    for i, size in enumerate(SIZES):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(jpeg_bytes(photo(*size, seed=i)))
        paths.append(path)
    return paths


def _reference(ckpt, paths):
    from transformers import Siglip2VisionModel
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    processor = Siglip2ImageProcessorPil.from_pretrained(ckpt)
    images = [Image.open(p) for p in paths]
    inputs = processor(images, do_convert_rgb=True, return_tensors="pt")
    with torch.no_grad():
        out = Siglip2VisionModel.from_pretrained(ckpt).eval()(**inputs, output_hidden_states=True)
    return inputs, out


def test_naflex_patches_match_siglip2_image_processor_bit_for_bit(tmp_path):
    ckpt = _siglip2_naflex(tmp_path / "n")
    paths = _images(tmp_path)
    inputs, _ = _reference(ckpt, paths)
    encoder = vitembed.Encoder("siglip2-base-patch16-naflex", ckpt)
    from vitembed.preprocess import normalize_patches

    batch = encoder.collate([encoder.pixels(p) for p in paths])
    assert batch.grids.tolist() == inputs["spatial_shapes"].tolist()
    patches, _ = normalize_patches(batch, encoder.stats, torch.float32)
    assert patches.shape == inputs["pixel_values"].shape == (len(paths), 16, 48)
    assert torch.equal(patches, inputs["pixel_values"])  # the padding too: zero after normalising
    for i, path in enumerate(paths):
        n = int(inputs["pixel_attention_mask"][i].sum())
        assert torch.equal(encoder.preprocess(path), inputs["pixel_values"][i, :n])


@pytest.mark.parametrize("layer", NAMES)
def test_naflex_matches_transformers_at_every_layer_for_images_of_different_grids(tmp_path, layer):
    ckpt = _siglip2_naflex(tmp_path / "n")
    paths = _images(tmp_path)
    inputs, ref = _reference(ckpt, paths)
    want = ref.last_hidden_state if layer == "last" else ref.hidden_states[NAMES.index(layer)]
    got = vitembed.Encoder("siglip2-base-patch16-naflex", ckpt, layer=layer).encode(paths, batch_size=3)
    assert isinstance(got, list) and len(got) == len(paths)
    for i, tokens in enumerate(got):
        n = int(inputs["pixel_attention_mask"][i].sum())
        assert tokens.shape == (n, 48)
        assert (tokens - want[i, :n]).abs().max() < 1e-5, (layer, i)


def test_naflex_head_and_mean_leave_the_padding_out(tmp_path):
    ckpt = _siglip2_naflex(tmp_path / "n")
    paths = _images(tmp_path)
    inputs, ref = _reference(ckpt, paths)
    head = vitembed.Encoder("siglip2-base-patch16-naflex", ckpt, pool="head").encode(paths, batch_size=2)
    assert head.shape == (4, 48) and (head - ref.pooler_output).abs().max() < 1e-5
    mean = vitembed.Encoder("siglip2-base-patch16-naflex", ckpt, pool="mean").encode(paths)
    mask = inputs["pixel_attention_mask"].bool()
    for i in range(len(paths)):
        assert (mean[i] - ref.last_hidden_state[i, mask[i]].mean(dim=0)).abs().max() < 1e-5
    with pytest.raises(vitembed.UsageError, match="no class token"):
        vitembed.Encoder("siglip2-base-patch16-naflex", ckpt, pool="cls")


def test_naflex_outputs_record_their_grid_resume_and_refuse_what_cannot_hold_them(tmp_path):
    from safetensors import safe_open

    ckpt = _siglip2_naflex(tmp_path / "n", whole=True)
    images = tmp_path / "images"
    images.mkdir()
    paths = _images(images)
    common = ["--model", "siglip2-base-patch16-naflex", "--weights", str(ckpt), "-q"]
    first = run_cli("encode", str(images), "--out", str(tmp_path / "out"), "--json", *common)
    assert first.returncode == 0, first.stderr.decode()
    _, ref = _reference(ckpt, paths)
    grids = {"0": "3x4", "1": "8x2", "2": "4x4"}
    for i, grid in grids.items():
        with safe_open(tmp_path / "out" / f"{i}.jpg.safetensors", "pt") as f:
            meta, tokens = f.metadata(), f.get_tensor("embedding")
        h, w = map(int, grid.split("x"))
        assert (meta["grid"], meta["tokens"], meta["max_num_patches"], meta["resize"]) == (grid, str(h * w), "16", "naflex")
        assert tokens.shape == (h * w, 48)
        assert (tokens - ref.last_hidden_state[int(i), : h * w]).abs().max() < 1e-5
    again = run_cli("encode", str(images), "--out", str(tmp_path / "out"), "--json", *common)
    assert again.returncode == 0
    assert {json.loads(line)["status"] for line in again.stdout.decode().splitlines()} == {"skipped"}
    loaded = vitembed.load(tmp_path / "out")
    assert isinstance(loaded.embeddings, list) and [e.shape[0] for e in loaded.embeddings] == [12, 16, 16, 16]
    packed = run_cli("encode", str(images), "--out", str(tmp_path / "packed"), "--pack", "2", *common)
    assert packed.returncode == 2 and "cannot record" in packed.stderr.decode()
    npy = run_cli("encode", str(images), "--out", str(tmp_path / "npy"), "--format", "npy", *common)
    assert npy.returncode == 2 and "npy files cannot record" in npy.stderr.decode()
    pooled = run_cli("encode", str(images), "--out", str(tmp_path / "pooled"), "--pack", "3", "--pool", "head",
                     "--normalize", *common)
    assert pooled.returncode == 0, pooled.stderr.decode()
    vectors = vitembed.load(tmp_path / "pooled").embeddings
    assert vectors.shape == (4, 48) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)


NAFLEX_ENTRIES = sorted(name for name, spec in CATALOG.items() if spec.config().naflex)


@pytest.mark.parametrize("name", NAFLEX_ENTRIES)
def test_each_naflex_entry_loads_a_checkpoint_shaped_like_the_published_one(tmp_path, name):
    """A whole Siglip2Model with the published vision config's fields (num_patches 256, patch 16,
    gelu_pytorch_tanh, eps 1e-6, the head) at a small width, and the published Siglip2ImageProcessor
    config (max_num_patches 256, patch 16, bilinear, mean = std = 0.5)."""
    from transformers import Siglip2Config, Siglip2Model
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    assert NAFLEX_ENTRIES == ["siglip2-base-patch16-naflex", "siglip2-so400m-patch16-naflex"]
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_patches=256,
                  patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64)
    Siglip2Model(Siglip2Config(vision_config=vision, text_config=text)).save_pretrained(tmp_path / name)
    Siglip2ImageProcessorPil(patch_size=16, max_num_patches=256).save_pretrained(tmp_path / name)
    spec = get_model_spec(name)
    weights = resolve_weights(spec, tmp_path / name)
    assert (weights.config.naflex, weights.config.grid_size, weights.config.pool_head) == (True, 16, "map")
    assert weights.preprocess == spec.preprocess
    encoder = vitembed.Encoder(name, tmp_path / name, pool="head")
    assert encoder.encode([np.asarray(photo(300, 100))]).shape == (1, 32)


@pytest.mark.parametrize("budget", [9, 64])
def test_naflex_with_another_patch_budget_matches_transformers(tmp_path, budget):
    """Found by a new user: a max_num_patches other than the position grid's (here 16) resampled the
    grid to sqrt(budget) first; the learned grid must be resized to each image's grid only."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    ckpt = _siglip2_naflex(tmp_path / "n")
    Siglip2ImageProcessorPil(patch_size=4, max_num_patches=budget).save_pretrained(ckpt)
    paths = _images(tmp_path)
    inputs, ref = _reference(ckpt, paths)
    encoder = vitembed.Encoder("siglip2-base-patch16-naflex", ckpt)
    assert "pos_embed_resampled_from" not in encoder.metadata()
    for i, tokens in enumerate(encoder.encode(paths)):
        n = int(inputs["pixel_attention_mask"][i].sum())
        assert (tokens - ref.last_hidden_state[i, :n]).abs().max() < 1e-5
    with pytest.raises(vitembed.UsageError, match="sizes each image itself"):
        vitembed.Encoder("siglip2-base-patch16-naflex", ckpt, image_size=64)


def test_position_grid_resize_is_the_references_to_the_last_bit():
    """Found with a 9-patch budget: F.interpolate's antialiased bilinear differs from the reference
    for one-column grids (3x1 by 1.3); the reference's explicit weights are what NaFlex uses."""
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    from vitembed.model import grid_pos_embed

    torch.manual_seed(0)
    for side in (4, 16):
        pos = torch.randn(1, side * side, 8)
        for h, w in [(3, 1), (1, 3), (1, 1), (8, 2), (5, 7), (16, 16), (33, 7), (2, 40)]:
            want = Siglip2VisionEmbeddings.resize_positional_embeddings(pos[0].reshape(side, side, 8),
                                                                         torch.tensor([[h, w]]), h * w + 3)
            got = grid_pos_embed(pos, torch.tensor([[h, w]]), h * w + 3)
            # Bit-equal on AVX2 and AVX512 CPUs; with AMX the (1, 256) @ (256, D) product of a 16x16
            # grid resized to 1x1 sums in another order and differs in the last bit (3e-8 here).
            torch.testing.assert_close(got[:, : h * w], want[:, : h * w], rtol=0, atol=1e-7, msg=str((side, h, w)))
