"""SigLIP and the fixed-resolution SigLIP 2 (families/siglip.py) against transformers'
SiglipVisionModel and SiglipModel: every layer and the attention-pooled image embedding, a head-less
checkpoint, timm's attn_pool layout, a patch size that does not divide the input (so400m/14 at 384),
the preprocessing against SiglipImageProcessorPil, the pool modes' errors, and the catalog entries
loading checkpoints with the published configs' fields."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

from vitembed.catalog import CATALOG, get_model_spec
from vitembed.config import PreprocessConfig
from vitembed.convert import convert_state_dict
from vitembed.errors import UsageError
from vitembed.families import family_of
from vitembed.preprocess import load_pixels, normalize, normalize_stats
from vitembed.weights import build_model, resolve_weights

from .conftest import jpeg_bytes, photo, run_cli
from .helpers import _siglip

NAMES = ["embeddings", "1", "2", "3", "last"]


@pytest.mark.parametrize("whole", [False, True])
def test_siglip_matches_transformers_at_every_layer_and_its_image_embedding(tmp_path, whole):
    from transformers import SiglipModel, SiglipVisionModel

    ckpt = _siglip(tmp_path / "s", whole=whole)
    reference = (SiglipModel if whole else SiglipVisionModel).from_pretrained(ckpt).eval()
    weights = resolve_weights(get_model_spec("siglip-base-patch16-224"), ckpt)
    cfg = weights.config
    assert (cfg.family, cfg.class_token, cfg.pool_head, cfg.act, cfg.num_prefix_tokens) == ("siglip", False, "map", "gelu_tanh", 0)
    ours = build_model(weights)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = (reference.vision_model if whole else reference)(pixel_values=x, output_hidden_states=True)
        out = ours(x, layers=NAMES)
        head = family_of(cfg).pool(ours, out["last"], "head")
        mean = family_of(cfg).pool(ours, out["last"], "mean")
        features = reference.get_image_features(pixel_values=x).pooler_output if whole else ref.pooler_output
    for i, name in enumerate(NAMES):
        want = ref.last_hidden_state if name == "last" else ref.hidden_states[i]
        assert out[name].shape == want.shape == (2, 16, 48)  # 4x4 patches, no class token
        assert (out[name] - want).abs().max() < 1e-5, name
    assert head.shape == (2, 48) and (head - ref.pooler_output).abs().max() < 1e-5
    assert (head - features).abs().max() < 1e-5
    assert torch.allclose(mean, ref.last_hidden_state.mean(dim=1), atol=1e-6)
    assert (head - mean).abs().max() > 1e-2  # the head is not the mean


def test_siglip_with_a_patch_that_does_not_divide_the_input(tmp_path):
    """so400m-patch14-384: 384 / 14 = 27.4; the stride-14 convolution sees 27x27 patches and leaves
    the last 6 pixels out, as the reference does (here 36 / 8: 4x4 patches, 4 pixels left out)."""
    from transformers import SiglipVisionModel

    ckpt = _siglip(tmp_path / "s", image_size=36, patch_size=8)
    reference = SiglipVisionModel.from_pretrained(ckpt).eval()
    weights = resolve_weights(get_model_spec("siglip-so400m-patch14-384"), ckpt)
    assert (weights.config.image_size, weights.config.grid_size, weights.config.num_tokens) == (36, 4, 16)
    ours = build_model(weights)
    x = torch.randn(1, 3, 36, 36)
    with torch.no_grad():
        ref = reference(pixel_values=x)
        got = ours(x)["last"]
        head = family_of(weights.config).pool(ours, got, "head")
    assert (got - ref.last_hidden_state).abs().max() < 1e-5
    assert (head - ref.pooler_output).abs().max() < 1e-5


def test_siglip_without_its_head_refuses_pool_head_and_gives_mean(tmp_path):
    import vitembed

    ckpt = _siglip(tmp_path / "s", head=False)
    with pytest.raises(UsageError, match="no attention-pooling head.*use --pool mean"):
        vitembed.Encoder("siglip-base-patch16-224", ckpt, pool="head")
    encoder = vitembed.Encoder("siglip-base-patch16-224", ckpt, pool="mean")
    assert encoder.output_shape == (48,) and encoder.model.attn_pool is None


def test_siglip_pool_errors_name_what_to_use(tmp_path):
    import vitembed

    ckpt = _siglip(tmp_path / "s")
    with pytest.raises(UsageError, match="siglip has no class token; use --pool head"):
        vitembed.Encoder("siglip-base-patch16-224", ckpt, pool="cls")
    with pytest.raises(UsageError, match="cannot pool --layer 2"):
        vitembed.Encoder("siglip-base-patch16-224", ckpt, pool="head", layer="2")
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg_bytes(photo(40, 30)))
    done = run_cli("encode", str(image), "--out", str(tmp_path / "out"), "--model", "siglip-base-patch16-224",
                   "--weights", str(ckpt), "--pool", "cls")
    assert done.returncode == 2 and "no class token" in done.stderr.decode()
    assert not (tmp_path / "out").exists()  # refused before DIR is claimed


def test_siglip_timm_layout_loads_as_the_transformers_one(tmp_path):
    """timm's vit_*_siglip_* names (attn_pool.latent, .q, .kv, ...) are vitembed's: the same weights
    written in that layout give the same model."""
    from safetensors.torch import load_file, save_file

    ckpt = _siglip(tmp_path / "s")
    converted = convert_state_dict(load_file(ckpt / "model.safetensors"))
    assert {"attn_pool.latent", "attn_pool.q.weight", "attn_pool.kv.weight", "attn_pool.mlp.fc1.weight"} <= set(converted)
    assert "cls_token" not in converted and converted["pos_embed"].shape == (1, 16, 48)
    timm_file = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in converted.items()} | {"head.weight": torch.zeros(10, 48)}, timm_file)
    spec = get_model_spec("siglip-base-patch16-224")
    folder = build_model(resolve_weights(spec, ckpt))
    single = resolve_weights(spec, timm_file)
    single = dataclasses.replace(single, config=folder.cfg)  # the small architecture, not the entry's
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(build_model(single)(x)["last"], folder(x)["last"])


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (257, 999), (384, 384), (1, 1)])
@pytest.mark.parametrize("side", [224, 384])
def test_siglip_preprocessing_matches_siglip_image_processor(tmp_path, size, side):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    processor = SiglipImageProcessorPil(size={"height": side, "width": side})
    cfg = PreprocessConfig.from_transformers(json.loads(processor.to_json_string()))
    assert cfg == get_model_spec(f"siglip-so400m-patch14-{side}").preprocess
    path = tmp_path / "p.jpg"
    path.write_bytes(jpeg_bytes(photo(*size, seed=size[0])))
    with Image.open(path) as im:
        want = processor(im, do_convert_rgb=True, return_tensors="pt")["pixel_values"]
    got = normalize(torch.from_numpy(load_pixels(path, cfg))[None], normalize_stats(cfg))
    assert got.shape == want.shape == (1, 3, side, side)
    assert torch.equal(got, want)


SIGLIP_ENTRIES = sorted(name for name, spec in CATALOG.items() if spec.family == "siglip" and not spec.config().naflex)


def test_catalog_has_the_published_siglip_checkpoints():
    assert len(SIGLIP_ENTRIES) == 24
    for name in ("siglip-base-patch16-224", "siglip-base-patch16-512", "siglip-large-patch16-384",
                 "siglip-so400m-patch14-224", "siglip-so400m-patch14-384", "siglip-so400m-patch16-256-i18n",
                 "siglip2-base-patch16-224", "siglip2-so400m-patch16-512", "siglip2-giant-opt-patch16-384"):
        assert name in SIGLIP_ENTRIES
    spec = get_model_spec("siglip-so400m-patch14-384")
    cfg = spec.config()
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.num_tokens) == (1152, 27, 16, 4304, 729)
    assert get_model_spec("siglip-base-patch16-224").config().num_tokens == 196


@pytest.mark.parametrize("name", SIGLIP_ENTRIES)
def test_each_siglip_entry_loads_a_checkpoint_shaped_like_the_published_one(tmp_path, name):
    """A whole SiglipModel with the published vision config's fields (model_type, patch and image
    size, activation, eps, the head) at a small width, and the published preprocessor_config.json:
    loads with the entry's grid, no prefix tokens, the MAP head and the entry's preprocessing."""
    from transformers import SiglipConfig, SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    spec = get_model_spec(name)
    published = spec.config()
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  image_size=published.image_size, patch_size=published.patch_size,
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64)
    SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).save_pretrained(tmp_path / name)
    side = spec.preprocess.image_size
    SiglipImageProcessorPil(size={"height": side, "width": side}).save_pretrained(tmp_path / name)
    weights = resolve_weights(spec, tmp_path / name)
    cfg = weights.config
    assert (cfg.family, cfg.grid_size, cfg.num_prefix_tokens, cfg.pool_head) == ("siglip", published.grid_size, 0, "map")
    assert weights.preprocess == spec.preprocess
    model = build_model(weights)
    assert model.pos_embed.shape == (1, published.num_patches, 32)


def test_siglip_image_embeddings_end_to_end_from_the_cli(tmp_path):
    """vitembed encode --pool head --normalize on a whole SiglipModel: unit vectors equal to the
    reference's normalised get_image_features on its own processor's pixels, metadata that says so."""
    from safetensors import safe_open
    from transformers import SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    ckpt = _siglip(tmp_path / "whole", whole=True)
    processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    processor.save_pretrained(ckpt)
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(64, 48), (30, 90)]):
        (images / f"{i}.jpg").write_bytes(jpeg_bytes(photo(*size, seed=i)))
    done = run_cli("encode", str(images), "--out", str(tmp_path / "out"), "--model", "siglip-base-patch16-224",
                   "--weights", str(ckpt), "--pool", "head", "--normalize", "--json")
    assert done.returncode == 0, done.stderr.decode()
    assert [json.loads(line)["status"] for line in done.stdout.decode().splitlines()] == ["encoded", "encoded"]
    reference = SiglipModel.from_pretrained(ckpt).eval()
    for i in range(2):
        with safe_open(tmp_path / "out" / f"{i}.jpg.safetensors", "pt") as f:
            got, meta = f.get_tensor("embedding"), f.metadata()
        with Image.open(images / f"{i}.jpg") as im:
            pixels = processor(im, do_convert_rgb=True, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            want = reference.get_image_features(pixel_values=pixels).pooler_output[0]
        assert got.shape == (48,) and abs(float(got.norm()) - 1) < 1e-6
        assert (got - want / want.norm()).abs().max() < 1e-5
        assert (meta["family"], meta["pool"], meta["normalize"], meta["prefix_tokens"], meta["tokens"]) == (
            "siglip", "head", "l2", "0", "16")
