"""Parity of every family with its transformers reference, on real photos: the README's table.

For each family a transformers model is built with the published checkpoint's config (widths, patch
and input sizes, activation, eps, tokens; 4 blocks instead of 12-40, to run in minutes on a CPU),
random weights, saved with ``save_pretrained`` beside its reference image processor's config, and
``vitembed.verify.verify`` compares vitembed with it on the photos: the inputs bit for bit, max-abs
at ``embeddings``, block 2 and ``last``, and each pooled vector the family declares.

    python bench/parity.py [PHOTO_DIR] [N_PHOTOS]   (default ../shared/images/imagenet-sample, 8)

Prints a markdown table on stdout.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
DEPTH = 4


def _spread(model):
    """Random weights with some spread, so every block changes the tokens visibly."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def vit(path):
    from transformers import ViTConfig, ViTModel
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    _spread(ViTModel(ViTConfig(num_hidden_layers=DEPTH), add_pooling_layer=False)).save_pretrained(path)
    ViTImageProcessorPil().save_pretrained(path)
    return "vit-base-patch16-224"


def deit(path):
    from transformers import DeiTConfig, DeiTModel
    from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil

    cfg = DeiTConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1536, num_hidden_layers=DEPTH)
    _spread(DeiTModel(cfg, add_pooling_layer=False)).save_pretrained(path)
    DeiTImageProcessorPil(**IMAGENET).save_pretrained(path)
    return "deit-small-distilled-patch16-224"


def dinov2(path, registers=0, swiglu=False):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    kw = dict(hidden_size=384, num_attention_heads=6, num_hidden_layers=DEPTH, patch_size=14, image_size=518,
              layer_norm_eps=1e-6, use_swiglu_ffn=swiglu)
    model = (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)) if registers
             else Dinov2Model(Dinov2Config(**kw)))
    _spread(model).save_pretrained(path)
    BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                         **IMAGENET).save_pretrained(path)
    return "dinov2-with-registers-small" if registers else "dinov2-giant" if swiglu else "dinov2-small"


def dinov3(path, gated=False):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    cfg = DINOv3ViTConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1536, num_hidden_layers=DEPTH,
                          patch_size=16, image_size=224, num_register_tokens=4, use_gated_mlp=gated,
                          hidden_act="silu" if gated else "gelu")
    _spread(DINOv3ViTModel(cfg)).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "DINOv3ViTImageProcessorFast", "size": {"height": 224, "width": 224}, "resample": 2,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, **IMAGENET}))
    return "dinov3-vits16plus" if gated else "dinov3-vits16"


def clip(path):
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vision = dict(num_hidden_layers=DEPTH, patch_size=32)
    text = dict(num_hidden_layers=1)
    _spread(CLIPModel(CLIPConfig(vision_config=vision, text_config=text))).save_pretrained(path)
    CLIPImageProcessorPil().save_pretrained(path)
    return "clip-vit-base-patch32"


def siglip(path, so400m=False):
    from transformers import SiglipConfig, SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    side = 384 if so400m else 224
    vision = dict(num_hidden_layers=DEPTH, image_size=side, patch_size=14 if so400m else 16,
                  **(dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16) if so400m else {}))
    _spread(SiglipModel(SiglipConfig(vision_config=vision, text_config=dict(num_hidden_layers=1)))).save_pretrained(path)
    SiglipImageProcessorPil(size={"height": side, "width": side}).save_pretrained(path)
    return "siglip-so400m-patch14-384" if so400m else "siglip-base-patch16-224"


def naflex(path):
    from transformers import Siglip2Config, Siglip2Model
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    vision = dict(num_hidden_layers=DEPTH, num_patches=256, patch_size=16)
    _spread(Siglip2Model(Siglip2Config(vision_config=vision, text_config=dict(num_hidden_layers=1)))).save_pretrained(path)
    Siglip2ImageProcessorPil(patch_size=16, max_num_patches=256).save_pretrained(path)
    return "siglip2-base-patch16-naflex"


CASES = {
    "ViT-B/16": vit, "DeiT-S distilled": deit, "DINOv2-S": dinov2,
    "DINOv2-S registers": lambda p: dinov2(p, registers=4), "DINOv2 SwiGLU (giant's MLP)": lambda p: dinov2(p, swiglu=True),
    "DINOv3-S": dinov3, "DINOv3-S+ (SwiGLU)": lambda p: dinov3(p, gated=True), "CLIP B/32 (whole)": clip,
    "SigLIP B/16 224 (whole)": siglip, "SigLIP So400m/14 384": lambda p: siglip(p, so400m=True),
    "SigLIP 2 NaFlex B/16": naflex,
}


def main() -> None:
    from transformers.utils import logging

    from vitembed.verify import verify

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[1] / "../shared/images/imagenet-sample")
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    photos = sorted(folder.glob("*.JPEG"))[:count]
    print("| family (--model) | reference | pixels | embeddings | block 2 | last | pooled |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for label, build in CASES.items():
            path = Path(tmp) / label.replace(" ", "_").replace("/", "_")
            model = build(path)
            report = verify(model, path, images=photos, layers=["embeddings", "2", "last"])
            rows = {(r.item, r.name): r for r in report.rows}
            pixels = rows[("pixels", "pixel_values")]
            cells = [f"{rows[('layer', n)].max_abs:.1e}" for n in ("embeddings", "2", "last")]
            pooled = ", ".join(f"{r.name} ({r.reference}) {r.max_abs:.1e}" for r in report.rows if r.item == "pooled")
            worst = max([worst] + [r.max_abs for r in report.rows if r.max_abs is not None])
            ok = "equal" if pixels.equal else f"DIFFER {pixels.max_abs:.1e}"
            print(f"| {label} (`{model}`) | {report.reference} | {ok} | {' | '.join(cells)} | {pooled} |"
                  + ("" if report.ok else " **FAILED**"), flush=True)
    print(f"\n{len(CASES)} families, {len(photos)} photos from {folder.name}; largest max-abs {worst:.1e}")


if __name__ == "__main__":
    main()
