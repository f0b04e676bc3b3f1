"""The ViT encoder in plain PyTorch, read top to bottom.

Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words", section 3.1 and Eq. 1-4:
patches -> linear projection -> prepend class token -> add position embedding ->
pre-norm transformer blocks -> final LayerNorm. Parameter names follow timm's
``vision_transformer.py`` (patch_embed.proj, cls_token, pos_embed, blocks.N.norm1,
blocks.N.attn.qkv, blocks.N.attn.proj, blocks.N.norm2, blocks.N.mlp.fc1/fc2, norm),
so timm state dicts load unchanged. No I/O happens here; how the model is run (device, dtype,
CPU kernels, threads) is ``runtime.py``'s, what its tokens mean ``families/``'.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ViTConfig, layer_index
from .errors import UsageError


def _activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":  # CLIP: x * sigmoid(1.702 x)
        return _QuickGELU()
    if name == "silu":
        return nn.SiLU()
    raise UsageError(f"unknown activation {name!r}")


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, H/P * W/P, D) by a stride-P convolution; with
    ``cfg.naflex``, patch sequences (B, N, P * P * C) -> (B, N, D) by a linear layer (SigLIP 2)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        P, C, D = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        self.proj = nn.Linear(P * P * C, D) if cfg.naflex else nn.Conv2d(C, D, P, stride=P, bias=cfg.patch_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.proj, nn.Linear):
            return self.proj(x)  # (B, N, D)
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


def _linear_weights(size: int, grid: int) -> torch.Tensor:
    """(size, grid) float32: bilinear resampling weights with antialiasing from ``grid`` to ``size``
    samples (a triangle filter widened by the scale when shrinking; centres at half pixels, as
    ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)`` defines them)."""
    scale = grid / size
    centre = (torch.arange(size, dtype=torch.float32) + 0.5) * scale - 0.5  # (size,)
    source = torch.arange(grid, dtype=torch.float32)
    weights = (1 - (source[None, :] - centre[:, None]).abs() / max(scale, 1.0)).clamp(min=0)
    return weights / weights.sum(dim=1, keepdim=True)


def grid_pos_embed(pos_embed: torch.Tensor, grids: torch.Tensor, length: int) -> torch.Tensor:
    """SigLIP 2 NaFlex: the learned square grid of position embeddings (1, G * G, D) resized to each
    image's grid (h, w) and padded with zeros to ``length`` rows: (B, length, D) in ``pos_embed``'s dtype.

    Bilinear with antialiasing, one axis at a time in float32, as ``Siglip2VisionEmbeddings``
    computes it (its explicit weights; ``F.interpolate`` differs for one-column grids).
    """
    G, D = math.isqrt(pos_embed.shape[1]), pos_embed.shape[2]
    square = pos_embed[0].float().reshape(G * G, D)
    out = pos_embed.new_zeros((len(grids), length, D))
    resized: dict[tuple[int, int], torch.Tensor] = {}
    for i, (h, w) in enumerate(grids.tolist()):
        if (h, w) not in resized:
            rows, columns = _linear_weights(h, G), _linear_weights(w, G)  # (h, G), (w, G)
            weights = (rows[:, None, :, None] * columns[None, :, None, :]).reshape(h * w, G * G)
            resized[h, w] = (weights.to(square.device) @ square).to(pos_embed.dtype)  # (h * w, D)
        out[i, : h * w] = resized[h, w]
    return out


def token_mask(grids: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) bool: True for each image's h * w real patches, False for the padding after them."""
    return torch.arange(length, device=grids.device)[None, :] < grids.prod(dim=1, keepdim=True)


def rope_2d(grid_h: int, grid_w: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary position embedding of a patch grid, as DINOv3 (transformers'
    ``DINOv3ViTRopePositionEmbedding``, eval mode): patch centres in [-1, 1] per axis, head_dim / 4
    frequencies ``theta ** -(4 i / head_dim)`` for y, then the same for x, each angle used twice.

    Returns:
        (cos, sin), each (grid_h * grid_w, head_dim) float32, patches in row-major order.
    """
    inv_freq = 1 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32, device=device)  # (head_dim/4,)
    ys = torch.arange(0.5, grid_h, dtype=torch.float32, device=device) / grid_h
    xs = torch.arange(0.5, grid_w, dtype=torch.float32, device=device) / grid_w
    coords = 2.0 * torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1) - 1.0  # (N, 2)
    angles = (2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]).flatten(1, 2).tile(2)  # (N, head_dim)
    return torch.cos(angles), torch.sin(angles)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of the last ``len(cos)`` tokens of x (B, heads, T, d); prefix tokens unchanged."""
    prefix, patches = x[:, :, : x.shape[2] - cos.shape[0]], x[:, :, x.shape[2] - cos.shape[0]:]
    half = patches.shape[-1] // 2
    rotated = torch.cat((-patches[..., half:], patches[..., :half]), dim=-1)
    return torch.cat((prefix, patches * cos + rotated * sin), dim=2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, through SDPA; with ``rope``
    (cos, sin of ``rope_2d``) the patch tokens' queries and keys are rotated first."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, D/heads)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        keys = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T): padding is never attended to
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)  # (B, heads, T, D/heads)
        x = x.transpose(1, 2).reshape(B, T, D)
        return self.proj(x)


class Mlp(nn.Module):
    """fc1 -> activation -> fc2; with ``cfg.mlp == "swiglu"`` fc1 gives both halves of a gated
    unit, SiLU(first) * second (timm's ``SwiGLUPacked``, DINOv2-g's ``weights_in``)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.mlp_dim * (2 if self.gated else 1))
        self.act = nn.SiLU() if self.gated else _activation(cfg.act)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)  # (B, T, mlp_dim), or (B, T, 2 * mlp_dim) gated
        if self.gated:
            gate, x = x.chunk(2, dim=-1)
            return self.fc2(self.act(gate) * x)
        return self.fc2(self.act(x))


class AttentionPool(nn.Module):
    """Multi-head attention pooling (MAP; Zhai et al. 2022, "Scaling Vision Transformers"):
    one learned query (``latent``) attends over the tokens (B, T, D), then a residual MLP on its
    LayerNorm; returns (B, D). timm's ``AttentionPoolLatent`` names; SigLIP's ``head`` (transformers'
    ``SiglipMultiheadAttentionPoolingHead``, whose ``in_proj`` is split into ``q`` and ``kv``)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.kv = nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, self.num_heads, D // self.num_heads).transpose(1, 2)
        k, v = self.kv(x).reshape(B, T, 2, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        keys = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)  # (B, heads, 1, D/heads)
        x = self.proj(x.transpose(1, 2).reshape(B, 1, D))  # (B, 1, D)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]  # (B, D)


class LayerScale(nn.Module):
    """Per-channel learned scale ``gamma`` (CaiT, Touvron et al. 2021; used by DINOv2)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) (Eq. 2-3),
    each branch scaled by a LayerScale when ``cfg.layer_scale``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)
        self.ls2 = LayerScale(cfg) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope, mask))
        return x + self.ls2(self.mlp(self.norm2(x)))


def num_parameters(cfg: ViTConfig) -> int:
    """Number of parameters of ``VisionTransformer(cfg)``, counted on the ``meta`` device
    (no memory is allocated, so absurd configs can be sized before they are refused)."""
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    return sum(p.numel() for p in model.parameters())


class VisionTransformer(nn.Module):
    """ViT encoder: pixel values (B, 3, S, S) -> named token encodings (B, T, D).

    T = prefix tokens + (S / P)^2 (197 for ViT-B/16 at 224; 198 with DeiT's
    distillation token), D = ``cfg.hidden_size``. Follows timm's
    ``VisionTransformer`` / ``VisionTransformerDistilled`` and matches
    transformers' ``ViTModel`` and ``DeiTModel`` outputs.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size)) if cfg.dist_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, cfg.hidden_size)) if cfg.reg_tokens else None
        tokens = cfg.num_embedded_prefix_tokens + cfg.num_patches
        self.pos_embed = None if cfg.rope else nn.Parameter(torch.zeros(1, tokens, cfg.hidden_size))
        self.norm_pre = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn_pool = AttentionPool(cfg) if cfg.pool_head == "map" else None
        self.head = nn.Linear(cfg.hidden_size, cfg.proj_dim, bias=False) if cfg.proj_dim else None

    def init_weights(self, seed: int = 0, std: float = 0.02) -> "VisionTransformer":
        """Standard ViT initialisation, reproducible from ``seed``.

        As transformers' ``ViTPreTrainedModel._init_weights``: truncated normal
        (std 0.02) for linear and conv weights, class token and position
        embedding; zero biases; LayerNorm weight 1, bias 0. Uses its own
        ``torch.Generator``, so the global RNG is untouched. The encoder is drawn
        first and the pooling head and projection after it, so a model with a head
        has the same encoder weights as one without.
        """
        g = torch.Generator().manual_seed(seed)
        heads = [m for m in (self.attn_pool, self.head) if m is not None]
        in_heads = {id(m) for h in heads for m in h.modules()}

        def init(module: nn.Module) -> None:
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std, generator=g)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

        with torch.no_grad():
            for module in self.modules():
                if id(module) not in in_heads:
                    init(module)
            for token in (self.cls_token, self.dist_token, self.reg_token):
                if token is not None:
                    nn.init.trunc_normal_(token, std=std, generator=g)
            if self.pos_embed is not None:
                nn.init.trunc_normal_(self.pos_embed, std=std, generator=g)
            for head in heads:
                for module in head.modules():
                    init(module)
            if self.attn_pool is not None:
                nn.init.trunc_normal_(self.attn_pool.latent, std=std, generator=g)
        return self

    def embed(self, pixel_values: torch.Tensor, grids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, S, S) -> token encodings (B, T, D): patches, class (and distillation) token, position
        embedding (Eq. 1). NaFlex: patch sequences (B, N, P * P * 3) of ``grids`` (B, 2) -> (B, N, D)."""
        if self.cfg.naflex:
            if grids is None:
                raise UsageError("a NaFlex model takes patch sequences with their grids")
            x = self.patch_embed(pixel_values)  # (B, N, D)
            return x + grid_pos_embed(self.pos_embed, grids, x.shape[1])
        B, _, H, W = pixel_values.shape
        S = self.cfg.image_size
        if (H, W) != (S, S):
            raise UsageError(f"input is {H}x{W} pixels; this model takes {S}x{S}")
        x = self.patch_embed(pixel_values)  # (B, N, D)
        prefix = [t for t in (self.cls_token, self.dist_token) if t is not None]
        x = torch.cat([p.expand(B, -1, -1) for p in prefix] + [x], dim=1)  # (B, prefix + N, D)
        if self.pos_embed is not None:  # (rope models rotate queries and keys in every block instead)
            x = x + self.pos_embed
        if self.reg_token is not None:  # registers follow the class token, without a position embedding
            c = int(self.cfg.class_token)
            x = torch.cat([x[:, :c], self.reg_token.expand(B, -1, -1), x[:, c:]], dim=1)
        return x if self.norm_pre is None else self.norm_pre(x)

    def forward(
        self, pixel_values: torch.Tensor, layers: Iterable[str] = ("last",), grids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the encoder as far as the deepest requested layer.

        Args:
            pixel_values: (B, 3, S, S) float tensor, already normalised, on the
                model's device and in its dtype.
            grids: NaFlex only: (B, 2) int64 patch grid (h, w) of each row of
                ``pixel_values``, then (B, N, P * P * 3) patch sequences padded to N;
                the padding is masked out of every attention (its outputs are not meaningful).
            layers: names from ``"embeddings"``, ``"1"``..``str(depth)``, ``"last"``
                (see ``config.layer_index``).

        Returns:
            ``{name: (B, T, D) tensor}`` for each requested name. ``"embeddings"``
            equals transformers' ``hidden_states[0]``, ``"N"`` is
            ``hidden_states[N]``, ``"last"`` is ``last_hidden_state`` (for CLIP
            the last block's output, as its reference has it).
        """
        wanted = {name: layer_index(name, self.cfg.depth) for name in layers}
        deepest = max(wanted.values()) if wanted else 0  # (no max(default=): torch.compile traces this)
        keep = set(wanted.values())
        states: dict[int, torch.Tensor] = {}
        x = self.embed(pixel_values, grids)  # (B, T, D)
        mask = None if grids is None else token_mask(grids, x.shape[1])  # (B, T)
        rope = None
        if self.cfg.rope:  # (N, D/heads) each, for this input's grid
            grid_h, grid_w = pixel_values.shape[2] // self.cfg.patch_size, pixel_values.shape[3] // self.cfg.patch_size
            cos, sin = rope_2d(grid_h, grid_w, self.cfg.hidden_size // self.cfg.num_heads, self.cfg.rope_theta, x.device)
            rope = cos.to(x.dtype), sin.to(x.dtype)
        if 0 in keep:
            states[0] = x
        for i, block in enumerate(self.blocks[: min(deepest, self.cfg.depth)], start=1):
            x = block(x, rope, mask)  # (B, T, D)
            if i in keep:
                states[i] = x
        if deepest == self.cfg.depth + 1:  # CLIP: its last hidden state is not normalised
            states[deepest] = self.norm(x) if self.cfg.final_norm == "tokens" else x  # (B, T, D)
        return {name: states[index] for name, index in wanted.items()}
