"""Helpers shared by several test modules (plain functions and constants; fixtures are in conftest.py).

Made-up input folders, small checkpoints of the DeiT, CLIP and DINOv2 families, checkpoints with
an edited config.json, an Encoder on the small checkpoint, and readers of what a run printed
(the summary line) and wrote (a packed DIR's index and rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import DeiTConfig, DeiTModel

from .conftest import SMALL, jpeg_bytes, photo


def _folder(root: Path, good: int = 7, bad: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        (root / f"img{i:02d}.jpg").write_bytes(jpeg_bytes(photo(60 + i, 40 + i, seed=i)))
    if bad:
        (root / "broken.jpg").write_text("not a jpeg")
    return root


def _summary(stderr: bytes) -> str:
    return [line for line in stderr.decode().splitlines() if line.startswith("encoded ")][-1]


def _index(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


def _iter(out):
    from vitembed.layouts.packed import iter_packed

    return list(iter_packed(out))


def _encoder(small_ckpt, **options):
    from vitembed.catalog import get_model_spec
    from vitembed.encoder import Encoder
    from vitembed.weights import resolve_weights

    weights = resolve_weights(get_model_spec("vit-base-patch16-224-in21k"), str(small_ckpt), progress=False)
    return Encoder(weights=weights, device="cpu", **options)


def _checkpoint_with_config(tmp_path: Path, small_ckpt: Path, **config) -> Path:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes((small_ckpt / "model.safetensors").read_bytes())
    hf = json.loads((small_ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**hf, **config}))
    return ckpt


DEEP = "[" * 100_000 + "]" * 100_000


def _deit(path):
    torch.manual_seed(0)
    model = DeiTModel(DeiTConfig(**SMALL)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return path


def _clip(path, whole: bool = False, projection: bool = False):
    """A small random CLIP checkpoint: CLIPVisionModel, CLIPVisionModelWithProjection, or a whole CLIPModel."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    vision = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, image_size=32, patch_size=8)
    if whole:
        model = CLIPModel(CLIPConfig(vision_config=vision, projection_dim=40,
                                     text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                      intermediate_size=64)))
    elif projection:
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=40, **vision))
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**vision))
    _spread_and_save(model, path)
    return path


def _dinov2(path, registers: int = 0, swiglu: bool = False):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    kw = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=4 if swiglu else 2, image_size=56,
              patch_size=8, use_swiglu_ffn=swiglu)
    model = (
        Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
        if registers
        else Dinov2Model(Dinov2Config(**kw))
    )
    _spread_and_save(model, path)
    return path


def _siglip(path, whole: bool = False, head: bool = True, image_size: int = 32, patch_size: int = 8):
    """A small random SigLIP checkpoint (SiglipVisionModel, or a whole SiglipModel), saved with save_pretrained."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    vision = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                  image_size=image_size, patch_size=patch_size, vision_use_head=head)
    if whole:
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
        model = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**vision))
    _spread_and_save(model, path)
    return path


def _dinov3(path, gated: bool = False, registers: int = 4, image_size: int = 32):
    """A small random DINOv3ViTModel (GELU or gated SiLU MLP), saved with save_pretrained."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                             image_size=image_size, patch_size=8, num_register_tokens=registers,
                             use_gated_mlp=gated, hidden_act="silu" if gated else "gelu")
    model = DINOv3ViTModel(config)
    _spread_and_save(model, path)
    return path


def _siglip2_naflex(path, whole: bool = False, num_patches: int = 16, patch_size: int = 4):
    """A small random SigLIP 2 NaFlex checkpoint (Siglip2VisionModel or Siglip2Model) with its
    Siglip2ImageProcessor config, saved with save_pretrained."""
    from transformers import Siglip2Config, Siglip2Model, Siglip2VisionConfig, Siglip2VisionModel
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    torch.manual_seed(0)
    vision = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                  num_patches=num_patches, patch_size=patch_size)
    if whole:
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
        model = Siglip2Model(Siglip2Config(vision_config=vision, text_config=text))
    else:
        model = Siglip2VisionModel(Siglip2VisionConfig(**vision))
    _spread_and_save(model, path)
    Siglip2ImageProcessorPil(patch_size=patch_size, max_num_patches=num_patches).save_pretrained(path)
    return path


def _spread_and_save(model, path) -> None:
    """Spread a freshly initialised transformers model's parameters (so every block changes the
    tokens visibly; from the global RNG, seeded by the caller) and save_pretrained it to ``path``."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(path)
