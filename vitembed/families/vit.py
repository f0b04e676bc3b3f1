"""ViT (Dosovitskiy et al. 2020): google/vit-* through transformers' ViTModel, and timm's augreg
checkpoints (big_vision weights converted by timm).

Tokens: the class token, then the grid of patches in row-major order. ``last`` is the last
block's output after the final LayerNorm (``last_hidden_state``); ``cls`` takes its token 0.
"""

from __future__ import annotations

from ..preprocess_config import PreprocessConfig
from .base import CheckpointLayout, Family, ModelSpec

# google/vit-*: transformers ViTImageProcessor, squash-resize 224 bilinear, mean = std = 0.5.
GOOGLE = PreprocessConfig(image_size=224, resize="squash", interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)

# timm's pretrained_cfg for the augreg ViTs: bicubic, crop_pct 0.9 (resize the shorter side to
# floor(224 / 0.9) = 248, torchvision centre crop 224), mean = std = 0.5.
TIMM_AUGREG = PreprocessConfig(
    image_size=224,
    resize="shortest",
    resize_size=248,
    crop=True,
    crop_rounding="round",
    crop_pct=0.9,
    interpolation="bicubic",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
)

# transformers ViTModel as saved on the Hub (google/vit-*) and by save_pretrained; the DeiT and
# DINOv2 modules add their own keys to this layout.
TRANSFORMERS = CheckpointLayout(
    "transformers",
    telltale=r"encoder\.layer\.\d+\.attention\.attention\.query\.weight",
    renames=(
        (r"embeddings\.cls_token", r"cls_token"),
        (r"embeddings\.position_embeddings", r"pos_embed"),
        (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
        (r"encoder\.layer\.(\d+)\.attention\.attention\.query\.(weight|bias)", r"blocks.\1.attn.q.\2"),
        (r"encoder\.layer\.(\d+)\.attention\.attention\.key\.(weight|bias)", r"blocks.\1.attn.k.\2"),
        (r"encoder\.layer\.(\d+)\.attention\.attention\.value\.(weight|bias)", r"blocks.\1.attn.v.\2"),
        (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
        (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
        (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        (r"layernorm\.(weight|bias)", r"norm.\1"),
    ),
    unused=(r"pooler\..*", r"classifier\..*", r"embeddings\.mask_token"),
)

# transformers >= 5 in-memory module names (ViTModel.state_dict()).
TRANSFORMERS_V5 = CheckpointLayout(
    "transformers-v5",
    telltale=r"layers\.\d+\.attention\.q_proj\.weight",
    renames=(
        (r"embeddings\.cls_token", r"cls_token"),
        (r"embeddings\.position_embeddings", r"pos_embed"),
        (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"layers\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
        (r"layers\.(\d+)\.attention\.q_proj\.(weight|bias)", r"blocks.\1.attn.q.\2"),
        (r"layers\.(\d+)\.attention\.k_proj\.(weight|bias)", r"blocks.\1.attn.k.\2"),
        (r"layers\.(\d+)\.attention\.v_proj\.(weight|bias)", r"blocks.\1.attn.v.\2"),
        (r"layers\.(\d+)\.attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (r"layers\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
        (r"layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
        (r"layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        (r"layernorm\.(weight|bias)", r"norm.\1"),
    ),
    unused=(r"pooler\..*", r"classifier\..*", r"embeddings\.mask_token"),
)

# timm VisionTransformer: already vitembed's names (no renames: every key is kept as it is).
TIMM = CheckpointLayout(
    "timm",
    telltale=r"blocks\.\d+\.attn\.qkv\.weight",
    unused=(r"head\..*", r"head_dist\..*", r"head_drop\..*", r"mask_token"),
    fallback=True,
)

FAMILY = Family(
    name="vit",
    model_types=("vit",),
    prefixes=("vit.",),
    layouts=(TRANSFORMERS, TRANSFORMERS_V5, TIMM),
    models=(
        ModelSpec("vit-base-patch16-224-in21k", "google/vit-base-patch16-224-in21k", "B/16", preprocess=GOOGLE,
                  description="ViT-B/16 pre-trained on ImageNet-21k (Dosovitskiy et al. 2020)"),
        ModelSpec("vit-base-patch16-224", "google/vit-base-patch16-224", "B/16", preprocess=GOOGLE,
                  description="ViT-B/16 pre-trained on ImageNet-21k, fine-tuned on ImageNet-1k"),
        ModelSpec("vit-large-patch16-224", "google/vit-large-patch16-224", "L/16", preprocess=GOOGLE,
                  description="ViT-L/16 pre-trained on ImageNet-21k, fine-tuned on ImageNet-1k"),
        ModelSpec("vit-base-patch32-224-in21k", "google/vit-base-patch32-224-in21k", "B/32", preprocess=GOOGLE,
                  description="ViT-B/32 pre-trained on ImageNet-21k (50 tokens)"),
        *(
            ModelSpec(
                f"vit_{size}_patch{patch}_224.augreg_in21k",
                f"timm/vit_{size}_patch{patch}_224.augreg_in21k",
                variant,
                layer_norm_eps=1e-6,
                preprocess=TIMM_AUGREG,
                source="timm",
                description=f"timm ViT-{variant} augreg, ImageNet-21k (big_vision weights converted by timm)",
            )
            for size, patch, variant in (("tiny", 16, "Ti/16"), ("small", 16, "S/16"), ("base", 16, "B/16"),
                                         ("base", 32, "B/32"), ("large", 16, "L/16"))
        ),
    ),
)
