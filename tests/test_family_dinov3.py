"""DINOv3 (families/dinov3.py) against transformers' DINOv3ViTModel: every layer and the pooled
class token, GELU and SwiGLU MLPs, at the checkpoint's size and others (RoPE for the actual grid),
the original facebookresearch/dinov3 layout, the preprocessing against the torch operations of
DINOv3ViTImageProcessor, and the catalog entries loading checkpoints with the published fields."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitembed.catalog import CATALOG, get_model_spec
from vitembed.config import PreprocessConfig
from vitembed.families import family_of
from vitembed.preprocess import load_pixels, normalize, normalize_stats
from vitembed.weights import build_model, resolve_weights

from .conftest import jpeg_bytes, photo
from .helpers import _dinov3

NAMES = ["embeddings", "1", "2", "3", "last"]

# The published preprocessor_config.json of facebook/dinov3-*-pretrain-lvd1689m.
PUBLISHED_PROCESSOR = {
    "image_processor_type": "DINOv3ViTImageProcessorFast", "do_resize": True, "size": {"height": 224, "width": 224},
    "resample": 2, "do_rescale": True, "rescale_factor": 0.00392156862745098, "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
}


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("size", [32, 48, 24])
def test_dinov3_matches_transformers_at_every_layer(tmp_path, gated, size):
    """At the checkpoint's size and at others: RoPE is computed for the grid, nothing is resampled."""
    from transformers import DINOv3ViTModel

    ckpt = _dinov3(tmp_path / "d3", gated=gated)
    reference = DINOv3ViTModel.from_pretrained(ckpt).eval()
    weights = resolve_weights(get_model_spec("dinov3-vits16"), ckpt).at_image_size(size)
    cfg = weights.config
    assert (cfg.rope, cfg.layer_scale, cfg.reg_tokens, cfg.num_prefix_tokens) == (True, True, 4, 5)
    assert cfg.mlp == ("swiglu" if gated else "mlp")
    ours = build_model(weights)
    assert ours.pos_embed is None
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = reference(pixel_values=x, output_hidden_states=True)
        out = ours(x, layers=NAMES)
        cls = family_of(cfg).pool(ours, out["last"], "cls")
        head = family_of(cfg).pool(ours, out["last"], "head")
    tokens = 5 + (size // 8) ** 2
    for i, name in enumerate(NAMES):
        want = ref.last_hidden_state if name == "last" else ref.hidden_states[i]
        assert out[name].shape == want.shape == (2, tokens, 48)
        assert (out[name] - want).abs().max() < 1e-5, name
    assert torch.equal(cls, head) and (cls - ref.pooler_output).abs().max() < 1e-5


def _original_layout(transformers_sd: dict, gated: bool) -> dict:
    """The same weights in facebookresearch/dinov3's names: storage_tokens, a fused qkv whose key
    bias is masked (bias_mask; the stored key bias is garbage the mask removes), ls1.gamma, and
    SwiGLU's w1/w2/w3 (or fc1/fc2), plus the buffers the original keeps."""
    sd: dict[str, torch.Tensor] = {
        "cls_token": transformers_sd["embeddings.cls_token"],
        "storage_tokens": transformers_sd["embeddings.register_tokens"],
        "mask_token": torch.zeros(1, 48),
        "patch_embed.proj.weight": transformers_sd["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": transformers_sd["embeddings.patch_embeddings.bias"],
        "rope_embed.periods": torch.ones(3),
        "norm.weight": transformers_sd["norm.weight"], "norm.bias": transformers_sd["norm.bias"],
    }
    for n in range(3):
        t, o = f"layer.{n}.", f"blocks.{n}."
        q, k, v = (transformers_sd[t + f"attention.{p}_proj.weight"] for p in "qkv")
        sd[o + "attn.qkv.weight"] = torch.cat([q, k, v])
        bias_q, bias_v = transformers_sd[t + "attention.q_proj.bias"], transformers_sd[t + "attention.v_proj.bias"]
        sd[o + "attn.qkv.bias"] = torch.cat([bias_q, torch.full_like(bias_q, 7.0), bias_v])
        sd[o + "attn.qkv.bias_mask"] = torch.cat([torch.ones(48), torch.zeros(48), torch.ones(48)])
        for ours, theirs in (("attn.proj", "attention.o_proj"), ("norm1", "norm1"), ("norm2", "norm2")):
            for part in ("weight", "bias"):
                sd[f"{o}{ours}.{part}"] = transformers_sd[f"{t}{theirs}.{part}"]
        sd[o + "ls1.gamma"] = transformers_sd[t + "layer_scale1.lambda1"]
        sd[o + "ls2.gamma"] = transformers_sd[t + "layer_scale2.lambda1"]
        names = (("w1", "gate_proj"), ("w2", "up_proj"), ("w3", "down_proj")) if gated else (("fc1", "up_proj"), ("fc2", "down_proj"))
        for ours, theirs in names:
            for part in ("weight", "bias"):
                sd[f"{o}mlp.{ours}.{part}"] = transformers_sd[f"{t}mlp.{theirs}.{part}"]
    return sd


@pytest.mark.parametrize("gated", [False, True])
def test_dinov3_original_pth_layout_gives_the_same_model(tmp_path, gated):
    from safetensors.torch import load_file
    from transformers import DINOv3ViTModel

    ckpt = _dinov3(tmp_path / "d3", gated=gated)
    pth = tmp_path / "dinov3_original.pth"
    torch.save(_original_layout(load_file(ckpt / "model.safetensors"), gated), pth)
    spec = get_model_spec("dinov3-vits16plus" if gated else "dinov3-vits16")
    small = resolve_weights(spec, ckpt).config
    weights = resolve_weights(spec, pth)
    import dataclasses

    weights = dataclasses.replace(weights, config=small)  # the small architecture, not the entry's
    ours = build_model(weights)
    reference = DINOv3ViTModel.from_pretrained(ckpt).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x)["last"] - reference(pixel_values=x).last_hidden_state).abs().max() < 1e-5


def _reference_pixels(path, side: int = 224) -> torch.Tensor:
    """DINOv3ViTImageProcessor's _preprocess, by its source (it needs torchvision, which cannot be
    installed beside this torch): the uint8 CHW tensor * rescale_factor, torchvision's resize of a
    float tensor (F.interpolate bilinear, antialias, align_corners False), then normalize."""
    with Image.open(path) as im:
        image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    x = image * 0.00392156862745098
    x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(-1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(-1, 1, 1)
    return x.sub(mean).div_(std)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (257, 999), (224, 224), (1, 1), (3000, 200)])
def test_dinov3_preprocessing_matches_its_processors_torch_operations(tmp_path, size):
    cfg = PreprocessConfig.from_transformers(PUBLISHED_PROCESSOR)
    assert cfg == get_model_spec("dinov3-vitb16").preprocess and cfg.backend == "torch"
    path = tmp_path / "p.jpg"
    path.write_bytes(jpeg_bytes(photo(*size, seed=size[1])))
    pixels = load_pixels(path, cfg)
    assert pixels.dtype == np.float32 and pixels.shape == (224, 224, 3)
    got = normalize(torch.from_numpy(pixels)[None], normalize_stats(cfg))
    want = _reference_pixels(path)
    assert got.shape == want.shape == (1, 3, 224, 224)
    assert torch.equal(got, want)
    pil = cfg.replace(backend="pil")  # resizing the uint8 image first is another input
    assert not torch.equal(normalize(torch.from_numpy(load_pixels(path, pil))[None], normalize_stats(pil)), want) or size == (224, 224)


def test_dinov3_end_to_end_through_the_encoder_matches_transformers(tmp_path):
    """Encoder.preprocess + the model = the reference processor's pixels through DINOv3ViTModel."""
    import vitembed
    from transformers import DINOv3ViTModel

    ckpt = _dinov3(tmp_path / "d3", image_size=224)
    (ckpt / "preprocessor_config.json").write_text(json.dumps(PUBLISHED_PROCESSOR))
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg_bytes(photo(320, 240)))
    encoder = vitembed.Encoder("dinov3-vits16", ckpt, pool="cls", device="cpu")
    assert torch.equal(encoder.preprocess(image), _reference_pixels(image)[0])
    reference = DINOv3ViTModel.from_pretrained(ckpt).eval()
    with torch.no_grad():
        want = reference(pixel_values=_reference_pixels(image)).pooler_output
    got = encoder.encode([image])
    assert got.shape == (1, 48) and (got - want).abs().max() < 1e-4


def test_catalog_has_the_published_dinov3_vits():
    expected = {  # name: (width, depth, heads, mlp, swiglu, parameters in millions)
        "dinov3-vits16": (384, 12, 6, 1536, False, 21.6), "dinov3-vits16plus": (384, 12, 6, 1536, True, 28.7),
        "dinov3-vitb16": (768, 12, 12, 3072, False, 85.7), "dinov3-vitl16": (1024, 24, 16, 4096, False, 303.2),
        "dinov3-vith16plus": (1280, 32, 20, 5120, True, 840.6), "dinov3-vit7b16": (4096, 40, 32, 8192, True, 6716.0),
    }
    from vitembed.model import num_parameters

    assert sorted(n for n, s in CATALOG.items() if s.family == "dinov3") == sorted(expected)
    for name, (width, depth, heads, mlp, swiglu, millions) in expected.items():
        cfg = get_model_spec(name).config()
        assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.mlp == "swiglu") == (width, depth, heads, mlp, swiglu)
        assert cfg.num_tokens == 201 and cfg.num_prefix_tokens == 5
        assert round(num_parameters(cfg) / 1e6, 1) == millions


@pytest.mark.parametrize("name", sorted(n for n, s in CATALOG.items() if s.family == "dinov3"))
def test_each_dinov3_entry_loads_a_checkpoint_shaped_like_the_published_one(tmp_path, name):
    """A DINOv3ViTModel with the published config's fields (patch 16, 4 registers, key_bias false,
    use_gated_mlp and hidden_act as published, rope_theta 100, eps 1e-5) at a small width, and the
    published preprocessor_config.json."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    spec = get_model_spec(name)
    gated = spec.config().mlp == "swiglu"
    config = DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             patch_size=16, image_size=224, num_register_tokens=4, key_bias=False,
                             query_bias=spec.config().qkv_bias, value_bias=spec.config().qkv_bias,
                             use_gated_mlp=gated, hidden_act="silu" if gated else "gelu", rope_theta=100.0,
                             layer_norm_eps=1e-5)
    DINOv3ViTModel(config).save_pretrained(tmp_path / name)
    (tmp_path / name / "preprocessor_config.json").write_text(json.dumps(PUBLISHED_PROCESSOR))
    weights = resolve_weights(spec, tmp_path / name)
    cfg = weights.config
    assert (cfg.family, cfg.rope, cfg.num_tokens, cfg.mlp, cfg.qkv_bias) == ("dinov3", True, 201, spec.config().mlp, spec.config().qkv_bias)
    assert weights.preprocess == spec.preprocess
    with torch.no_grad():
        assert build_model(weights)(torch.zeros(1, 3, 224, 224))["last"].shape == (1, 201, 32)


def test_dinov3_from_the_cli_packed_and_per_image_with_its_metadata(tmp_path):
    from safetensors import safe_open

    from .conftest import run_cli

    ckpt = _dinov3(tmp_path / "d3", image_size=224)
    (ckpt / "preprocessor_config.json").write_text(json.dumps(PUBLISHED_PROCESSOR))
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(300, 200), (120, 160), (500, 90)]):
        (images / f"{i}.jpg").write_bytes(jpeg_bytes(photo(*size, seed=i)))
    common = ["--model", "dinov3-vits16", "--weights", str(ckpt), "-q"]
    files = run_cli("encode", str(images), "--out", str(tmp_path / "files"), *common)
    packed = run_cli("encode", str(images), "--out", str(tmp_path / "packed"), "--pack", "2", *common)
    assert files.returncode == packed.returncode == 0, files.stderr.decode() + packed.stderr.decode()
    with safe_open(tmp_path / "files" / "0.jpg.safetensors", "pt") as f:
        one, meta = f.get_tensor("embedding"), f.metadata()
    assert one.shape == (201 - 196 + 28 * 28, 48)  # patch 8 in the small checkpoint: 28x28 patches
    assert (meta["family"], meta["prefix_tokens"], meta["resize_backend"], meta["interpolation"]) == (
        "dinov3", "5", "torch", "bilinear")
    import vitembed

    loaded = vitembed.load(tmp_path / "packed")
    assert loaded.embeddings.shape == (3, 789, 48)
    assert torch.equal(torch.from_numpy(loaded.embeddings[loaded.keys.index("0.jpg")]), one)


def test_dinov3_processor_config_without_mean_and_std_uses_imagenet_as_its_processor():
    """Found by verify: DINOv3ViTImageProcessor defaults to ImageNet statistics, not 0.5."""
    config = {k: v for k, v in PUBLISHED_PROCESSOR.items() if k not in ("image_mean", "image_std")}
    cfg = PreprocessConfig.from_transformers(config)
    assert (cfg.mean, cfg.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert PreprocessConfig.from_transformers({"image_processor_type": "ViTImageProcessor"}).mean == (0.5, 0.5, 0.5)


def test_dinov3_without_registers_loads(tmp_path):
    """Found by a new user: transformers saves an empty (1, 0, D) register_tokens parameter."""
    from transformers import DINOv3ViTModel

    ckpt = _dinov3(tmp_path / "d3", registers=0)
    weights = resolve_weights(get_model_spec("dinov3-vits16"), ckpt)
    assert weights.config.reg_tokens == 0 and weights.config.num_prefix_tokens == 1
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = DINOv3ViTModel.from_pretrained(ckpt).eval()(pixel_values=x).last_hidden_state
        assert (build_model(weights)(x)["last"] - want).abs().max() < 1e-5
