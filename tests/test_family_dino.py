"""DINO (families/dino.py): an original DINO / timm state dict given as one file, against the same
weights in transformers' ViTModel."""

from __future__ import annotations

import torch

from vitembed.catalog import get_model_spec
from vitembed.weights import build_model, resolve_weights


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
