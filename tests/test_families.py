"""Other members of the ViT family, each against its transformers reference."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors import safe_open
from transformers import DeiTConfig, DeiTModel

from vitembed.catalog import get_model_spec
from vitembed.families import family_of
from vitembed.weights import build_model, resolve_weights

from .conftest import SMALL, photo, run_cli


def _deit(path):
    torch.manual_seed(0)
    model = DeiTModel(DeiTConfig(**SMALL)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return path


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


def _clip(path, whole: bool = False):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    vision = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, image_size=32, patch_size=8)
    if whole:
        model = CLIPModel(CLIPConfig(vision_config=vision, text_config=dict(hidden_size=32, num_hidden_layers=1,
                                                                           num_attention_heads=2, intermediate_size=64)))
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**vision))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(path)
    return path


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


def test_dino_timm_state_dict_file_with_the_dino_model_name(tmp_path):
    """An original DINO / timm state dict (timm names, eps 1e-6) given as one file, architecture from --model."""
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTModel

    from vitembed.model import VisionTransformer

    spec = get_model_spec("dino-vits16")
    cfg = spec.config()
    assert cfg.layer_norm_eps == 1e-6 and cfg.hidden_size == 384 and spec.preprocess.resize == "shortest"
    timm_model = VisionTransformer(cfg).init_weights(seed=3)
    state = {f"module.{k}": v for k, v in timm_model.state_dict().items()}  # as saved by DDP training
    state["module.head.weight"] = torch.zeros(1000, 384)
    save_file(state, tmp_path / "dino_deitsmall16_pretrain.safetensors")
    weights = resolve_weights(spec, tmp_path / "dino_deitsmall16_pretrain.safetensors")
    ours = build_model(weights)

    # The same weights in transformers' ViTModel, through vitembed's own names.
    reference = ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                                   layer_norm_eps=1e-6), add_pooling_layer=False).eval()
    sd = timm_model.state_dict()
    mapped = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
              "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
              "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
              "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    for i in range(12):
        q, k, v = sd[f"blocks.{i}.attn.qkv.weight"].chunk(3)
        qb, kb, vb = sd[f"blocks.{i}.attn.qkv.bias"].chunk(3)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            mapped[f"layers.{i}.attention.{name}.weight"], mapped[f"layers.{i}.attention.{name}.bias"] = w, b
        for ours_name, theirs in (("attn.proj", "attention.o_proj"), ("norm1", "layernorm_before"),
                                  ("norm2", "layernorm_after"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for p in ("weight", "bias"):
                mapped[f"layers.{i}.{theirs}.{p}"] = sd[f"blocks.{i}.{ours_name}.{p}"]
    reference.load_state_dict(mapped, strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x)["last"] - reference(pixel_values=x).last_hidden_state).abs().max() < 1e-4


def _dinov2(path, registers: int = 0):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    kw = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=56, patch_size=8)
    model = (
        Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
        if registers
        else Dinov2Model(Dinov2Config(**kw))
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(path)
    return path


import pytest  # noqa: E402


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


def _timm_roundtrip(ours, x):
    """The same model saved in timm's layout (vitembed's names are timm's), read back as a timm checkpoint."""
    from vitembed.convert import convert_state_dict, detect_format, load_converted
    from vitembed.model import VisionTransformer

    timm_sd = {f"module.{k}": v.clone() for k, v in ours.state_dict().items()}
    timm_sd["module.head.weight"] = torch.zeros(10, ours.cfg.hidden_size)
    assert detect_format({k[7:]: v for k, v in timm_sd.items()}) == "timm"
    again = VisionTransformer(ours.cfg)
    load_converted(again, convert_state_dict(timm_sd))
    with torch.no_grad():
        return again.eval()(x)["last"]


def test_timm_layouts_give_the_same_outputs_for_every_family(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    cases = {
        "deit": (_deit(tmp_path / "deit"), "vit-base-patch16-224"),
        "clip": (_clip(tmp_path / "clip"), "clip-vit-base-patch16"),
        "dinov2": (_dinov2(tmp_path / "d2"), "dinov2-small"),
        "dinov2-reg": (_dinov2(tmp_path / "d2r", 4), "dinov2-small"),
    }
    for family, (ckpt, name) in cases.items():
        ours = build_model(resolve_weights(get_model_spec(name), ckpt).at_image_size(32))
        with torch.no_grad():
            want = ours(x)["last"]
        assert torch.equal(_timm_roundtrip(ours, x), want), family


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


@pytest.mark.parametrize("family", ["vit", "deit", "clip", "dinov2", "dinov2-reg"])
def test_pool_shapes_for_every_family(tmp_path, family, small_ckpt):
    import numpy as np

    from vitembed.encoder import Encoder

    ckpt = {
        "vit": lambda: small_ckpt,
        "deit": lambda: _deit(tmp_path / "m"),
        "clip": lambda: _clip(tmp_path / "m"),
        "dinov2": lambda: _dinov2(tmp_path / "m"),
        "dinov2-reg": lambda: _dinov2(tmp_path / "m", 4),
    }[family]()
    weights = resolve_weights(get_model_spec("vit-base-patch16-224"), ckpt).at_image_size(32)
    prefix = {"vit": 1, "deit": 2, "clip": 1, "dinov2": 1, "dinov2-reg": 5}[family]
    assert weights.config.num_prefix_tokens == prefix
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    shapes = {pool: tuple(Encoder(weights=weights, pool=pool, device="cpu")(pixels).shape) for pool in ("none", "cls", "mean", "patch")}
    assert shapes == {"none": (2, prefix + 16, 48), "cls": (2, 48), "mean": (2, 48), "patch": (2, 16, 48)}
    assert Encoder(weights=weights, pool="patch", device="cpu").output_shape == (16, 48)
