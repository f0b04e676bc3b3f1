"""``--dtype int8`` on the CPU: the block linears with int8 weights (one scale per output
channel) and dynamically quantised activations, through oneDNN's int8 kernels.

    Int8Linear          one linear: quantized::linear_dynamic, or onednn::qlinear_pointwise
                        with fc1's GELU as a post-op
    smooth_into_linear  a LayerNorm's per-channel scale moved into the linear it feeds
    quantize_for_cpu    a model's block linears swapped for Int8Linear, in place
    int8_works          whether this torch runs them (checked once)

``runtime.resolve_dtype`` decides when int8 runs; this module is how.
"""

from __future__ import annotations

import functools
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import agrees_on_a_small_linear

# torch keeps the quantized engine in one process-wide switch, read when a weight is packed:
# it is set only around packing, under this lock.
_ENGINE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _int8_engine() -> str | None:
    """The quantized engine ``Int8Linear`` packs for: oneDNN where torch has it (it runs
    VNNI and AMX-INT8 kernels), else FBGEMM (x86), else None."""
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("onednn", "x86", "fbgemm") if e in engines), None)


class Int8Linear(nn.Module):
    """Inference-only ``nn.Linear`` with int8 weights and dynamically quantised activations.

    (..., in) float32 -> (..., out) float32. The weight is quantised once, symmetric per output
    channel (int8, scale = max |w| / 127 of its row); each call quantises its input to uint8 with
    one scale and zero point from the input's own min and max (dynamic quantisation), multiplies
    in int8 with int32 accumulation, and rescales to float32 with the bias added: torch's
    ``quantized::linear_dynamic`` on weights packed for oneDNN (``_int8_engine``), as
    ``torch.ao.quantization.quantize_dynamic`` runs it. With ``fused_gelu`` ("none" for the erf
    GELU, "tanh" for its tanh approximation) the GELU is applied inside the oneDNN kernel
    (``onednn::qlinear_pointwise`` with a GELU post-op, the input quantised the same way by
    ``torch.quantize_per_tensor_dynamic``), which saves a float32 pass over fc1's wide output.
    Rows holding Inf or NaN give NaN rows, as in float32, and leave the others' scale alone.
    Rounding makes results differ from ``F.linear`` by about 1% of a value's scale; ViT-B/16's
    last hidden state keeps a mean cosine above 0.999 to float32 (``bench/bench.py`` measures it).
    Built by ``quantize_for_cpu``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fused_gelu: str | None = None):
        super().__init__()
        self.out_features = weight.shape[0]  # weight: (out, in), as nn.Linear's
        self.fused_gelu = fused_gelu
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).double()  # (out,)
        zero = torch.zeros(len(scale), dtype=torch.int64)
        self.bias = None if bias is None else bias.detach().float()
        if fused_gelu is not None:
            qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self.packed = torch.ops.onednn.qlinear_prepack(qweight, None)
            self.w_scale, self.w_zero = scale.float(), zero
            return
        with _ENGINE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notice that quantized tensor types are deprecated
            previous = torch.backends.quantized.engine
            torch.backends.quantized.engine = _int8_engine()
            try:
                qweight = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
                self.packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
            finally:
                torch.backends.quantized.engine = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, in)
        if bool(torch.isfinite(x.sum())):  # one cheap pass: Inf or NaN anywhere makes the sum so
            y = self._int8(x)
        else:  # no scale fits an input holding Inf or NaN (oneDNN raises, or quantises everything to garbage)
            finite = torch.isfinite(x).all(dim=1)  # (N,)
            # as in float32: the rows holding Inf or NaN give NaN, the others are computed (their scale their own)
            y = x.new_full((x.shape[0], self.out_features), float("nan"))
            if bool(finite.any()):
                y[finite] = self._int8(x[finite])
        return y.reshape(*shape[:-1], self.out_features)

    def _int8(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in) finite float32 -> (N, out) float32."""
        if self.fused_gelu is None:
            return torch.ops.quantized.linear_dynamic(x, self.packed, False)  # reduce_range off
        q = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)  # the scale from x's min and max
        return torch.ops.onednn.qlinear_pointwise(q.int_repr(), q.q_scale(), q.q_zero_point(), self.packed,
                                                  self.w_scale, self.w_zero, self.bias, 1.0, 0, torch.float32,
                                                  "gelu", [], self.fused_gelu)


@functools.lru_cache(maxsize=1)
def _int8_gelu_fuses() -> bool:
    """Whether ``Int8Linear(fused_gelu=...)`` runs here and matches GELU after the plain int8
    linear (checked once, on a small case)."""
    return agrees_on_a_small_linear(lambda lin: Int8Linear(lin.weight, lin.bias, fused_gelu="none"),
                                    lambda lin: lambda x: F.gelu(Int8Linear(lin.weight, lin.bias)(x)), 0.01)


@functools.lru_cache(maxsize=1)
def int8_works() -> bool:
    """Whether ``Int8Linear`` runs here and stays within int8 rounding of ``F.linear`` (checked once
    on a small case)."""
    return _int8_engine() is not None and agrees_on_a_small_linear(
        lambda lin: Int8Linear(lin.weight, lin.bias), lambda lin: lin, 0.05)


def smooth_into_linear(norm: nn.LayerNorm, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Move per-channel scale from a LayerNorm's output into the linear it feeds, in place on
    ``norm``; returns the linear's new (out, in) weight. The product is unchanged in exact
    arithmetic: LN(x) / s through ``weight * s``.

    SmoothQuant (Xiao et al. 2023, Eq. 4), data-free: the channel's activation range is taken as
    ``|gamma| + |beta|`` of the LayerNorm (a normalised input is about unit-scale; the affine makes
    the outlier channels, as Outlier Suppression's gamma migration observes, Wei et al. 2022), so
    s_c = range_c ** alpha / max|W[:, c]| ** (1 - alpha). A few channels scaled up by the LayerNorm
    otherwise set the one activation scale of the whole input and leave the rest a few int8 steps.
    """
    w = weight.detach().float()
    act = norm.weight.detach().abs() + (norm.bias.detach().abs() if norm.bias is not None else 0)
    s = (act.clamp_min(1e-5) ** alpha / w.abs().amax(dim=0).clamp_min(1e-8) ** (1 - alpha)).clamp_min(1e-5)  # (in,)
    norm.weight.div_(s)
    if norm.bias is not None:
        norm.bias.div_(s)
    return w * s


def quantize_for_cpu(model: nn.Module) -> bool:
    """Swap the block linears of a float32 CPU model for ``Int8Linear`` (``--dtype int8``), in place.

    In every block: qkv, proj, fc1 and fc2, which hold about 98% of ViT-B/16's multiply-adds; the
    patch embedding, LayerNorms, attention itself, heads and pooling stay float32. qkv and fc1 take
    their LayerNorm's per-channel scale first (``smooth_into_linear``); a GELU after fc1 runs inside
    its kernel where oneDNN can (``Int8Linear``'s ``fused_gelu``). Returns False, leaving the
    model as it is, when int8 does not run here (``int8_works``). The model's state dict is not
    usable afterwards.
    """
    if not int8_works():
        return False
    with torch.no_grad():
        for block in model.blocks:
            act = block.mlp.act
            fuse = isinstance(act, nn.GELU) and _int8_gelu_fuses()
            for norm, owner, name in ((block.norm1, block.attn, "qkv"), (None, block.attn, "proj"),
                                      (block.norm2, block.mlp, "fc1"), (None, block.mlp, "fc2")):
                linear = getattr(owner, name)
                weight = linear.weight if norm is None else smooth_into_linear(norm, linear.weight)
                gelu = act.approximate if fuse and name == "fc1" else None
                setattr(owner, name, Int8Linear(weight, linear.bias, fused_gelu=gelu))
            if fuse:
                block.mlp.act = nn.Identity()
    return True
