"""How a model runs here: device, dtype, CPU kernels and threads.

    resolve_device / resolve_dtype   ``--device`` and ``--dtype`` names -> what torch runs on
    pack_for_cpu (PackedLinear)      float32 linears through oneDNN with weights packed once
    quantize_for_cpu (Int8Linear)    ``--dtype int8``: int8 block linears through oneDNN
    model_layout                     model threads x torch threads each, for a batch run

``model.py`` is the architecture only; this module is everything about running it fast.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DeviceError, UsageError, VitembedWarning
from .options import SAVE_DTYPES

TORCH_DTYPES = {name: getattr(torch, name) for name in SAVE_DTYPES}  # float32, bfloat16, float16


def compute_dtype(name: str) -> torch.dtype:
    """The torch dtype the model's tensors have for ``--dtype name`` (a resolved name, not
    ``auto``): int8 models keep float32 activations and parameters outside their int8 linears."""
    return torch.float32 if name == "int8" else TORCH_DTYPES[name]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        DeviceError: an explicit device that is not available (never a silent fallback).
        UsageError: a name that is not a device, or ``cpu:N`` (torch has one CPU device).
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"--device {name}: MPS is not available")
    elif device.type != "cpu":
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    elif device.index is not None:  # torch accepts cpu:N, but there is one CPU device: N would mean nothing
        raise UsageError(f"--device {name}: the CPU device takes no index; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> str:
    """The compute dtype's name for ``--dtype name`` (checked by ``options.ModelOptions``) on ``device``.

    ``auto``: bfloat16 on CUDA devices that support it, float32 elsewhere (on
    the CPU, bfloat16 is only fast with AVX512-BF16 or AMX, and even then it
    rounds: float32 is the exact default). Other names pass through. On a CPU
    without matrix instructions for the dtype, warns (``VitembedWarning``) that it is slow.

    Raises:
        UsageError: ``int8`` on a device other than the CPU, or with a torch without a
            quantized engine.
    """
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if name == "int8":
        if device.type != "cpu":
            raise UsageError(f"--dtype int8 runs on the CPU (oneDNN's int8 linears); on {device.type} use "
                             "--dtype bfloat16 or float16")
        if not int8_works():
            raise UsageError(f"--dtype int8: this torch ({torch.__version__}) has no oneDNN or FBGEMM "
                             "quantized engine; use --dtype float32 or bfloat16")
        if fast_int8_instructions() is None:
            warnings.warn("--dtype int8 on a CPU without int8 dot-product instructions (AVX512-VNNI, "
                          "AVX-VNNI or AMX-INT8): it may run no faster than float32 here",
                          VitembedWarning, stacklevel=3)
        return name
    if device.type == "cpu" and not _cpu_has_fast(TORCH_DTYPES[name]):
        needs = "AVX512-BF16 or AMX" if name == "bfloat16" else "AMX-FP16"
        warnings.warn(
            f"--dtype {name} on a CPU without {name} matrix instructions "
            f"({needs}): it runs several times slower than float32 here",
            VitembedWarning,
            stacklevel=3,
        )
    return name


def _cpu_has_fast(dtype: torch.dtype) -> bool:
    """Whether this CPU has matrix instructions for ``dtype`` (float32 always)."""
    if dtype == torch.float32:
        return True
    cpu = getattr(torch, "cpu", None)
    if dtype == torch.bfloat16:
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    else:
        checks = ("_is_amx_fp16_supported",)
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is no such file: not Linux)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def fast_bf16_instructions(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The bfloat16 matrix instructions this CPU has, by its ``/proc/cpuinfo`` flags: ``AMX-BF16``,
    ``AVX512-BF16``, or None (none, or no such file: not Linux). On such CPUs oneDNN runs
    bfloat16 linears faster than float32: ViT-B/16 end to end 1.5-1.7x with AVX512-BF16, 3.6x
    with AMX (README, Speed and memory)."""
    flags = cpu_flags(cpuinfo)
    return "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None


def fast_int8_instructions(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The int8 dot-product instructions this CPU has, by its ``/proc/cpuinfo`` flags:
    ``AMX-INT8``, ``AVX512-VNNI``, ``AVX-VNNI``, or None (none, or not Linux)."""
    flags = cpu_flags(cpuinfo)
    for flag, name in (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI")):
        if flag in flags:
            return name
    return None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def model_layout(device: torch.device, compiled: bool) -> tuple[int, int]:
    """(model threads, torch threads each) for a run: on the CPU, two model threads with half
    the torch threads each, each running half of every batch (``stages.model_stage``); elsewhere,
    or with ``--compile``, one thread with all of them.

    Two single-threaded matmuls beat one two-threaded matmul on the same 2 cores
    (no barriers between the cores; ``bench/`` has the figures), and a decode thread
    that takes a core then slows one batch instead of stalling both halves of every
    matmul. Results are the same bits either way (each row's arithmetic does not
    depend on the threading).
    """
    total = base_torch_threads()
    if device.type != "cpu" or compiled or total < 2:
        return 1, total
    return 2, total // 2


# Runs (Encoder.encode, vitembed.encode) set torch's process-wide thread count for their model
# threads. Runs in several Python threads at once must all see the count from before the first of
# them, not one another's setting (int8 results depend on how a batch is split): held here.
_THREADS_LOCK = threading.Lock()
_THREADS = {"runs": 0, "before": 1}


def hold_torch_threads() -> None:
    """A run starts: remember torch's thread count if no other run is active
    (``release_torch_threads`` restores it when the last one ends)."""
    with _THREADS_LOCK:
        if _THREADS["runs"] == 0:
            _THREADS["before"] = torch.get_num_threads()
        _THREADS["runs"] += 1


def release_torch_threads() -> None:
    """A run ends: the last one to end restores torch's thread count."""
    with _THREADS_LOCK:
        _THREADS["runs"] -= 1
        if _THREADS["runs"] == 0:
            torch.set_num_threads(_THREADS["before"])


def base_torch_threads() -> int:
    """torch's thread count as the user left it: from before the runs now active, if any."""
    with _THREADS_LOCK:
        return _THREADS["before"] if _THREADS["runs"] else torch.get_num_threads()


class PackedLinear(nn.Module):
    """Inference-only ``nn.Linear`` on the CPU through oneDNN, its weight reordered once.

    (..., in) float32 -> (..., out) float32, the same function as ``F.linear``
    (optionally followed by GELU, ``fused_gelu`` = ``"none"`` for exact erf or
    ``"tanh"``), computed by oneDNN's inner-product kernel on a weight laid out
    for it ahead of time, as PyTorch Inductor does when it freezes a model for
    CPU inference. Bias add and GELU happen inside the kernel. Results may
    differ from ``F.linear`` in the last bits of float32 (about 1e-6 relative);
    each row depends only on its own input, so outputs do not depend on the
    batch size. Built by ``pack_for_cpu``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fused_gelu: str | None = None):
        super().__init__()
        self.out_features = weight.shape[0]  # weight: (out, in), as nn.Linear's
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1024)
        self.bias = None if bias is None else bias.detach()
        self.attr, self.algorithm = ("gelu", fused_gelu) if fused_gelu is not None else ("none", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.weight, self.bias, self.attr, [], self.algorithm)
        return y.reshape(*shape[:-1], self.out_features)


def _packing_works() -> bool:
    """Whether oneDNN's packed linear runs here and agrees with ``F.linear`` (checked on a small case)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        linear = nn.Linear(64, 96)
        x = torch.randn(7, 64, generator=g)
        with torch.no_grad():
            ref = F.gelu(linear(x))
            packed = PackedLinear(linear.weight, linear.bias, fused_gelu="none")(x)
        return torch.allclose(packed, ref, rtol=1e-5, atol=1e-5)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def will_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``pack_for_cpu`` packs a model of this device and dtype."""
    return device.type == "cpu" and dtype == torch.float32 and _packing_works()


def pack_for_cpu(model: nn.Module) -> bool:
    """Swap the linears of a float32 CPU model for ``PackedLinear`` (inference only), in place.

    In every block: qkv, proj, fc1 (with its GELU fused when the activation
    is GELU) and fc2; the patch embedding stays a convolution (``bench/`` and
    the README have the figures). Leaves the model as it is, returning False,
    when oneDNN cannot do it here, or the model is not float32 on the CPU; the
    model's state dict is not usable afterwards.
    """
    first = next(model.parameters())
    if not will_pack(first.device, first.dtype):
        return False
    def packed(linear: nn.Linear, fused_gelu: str | None = None) -> PackedLinear:
        return PackedLinear(linear.weight, linear.bias, fused_gelu)

    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv = packed(block.attn.qkv)
            block.attn.proj = packed(block.attn.proj)
            act = block.mlp.act
            if isinstance(act, nn.GELU):
                block.mlp.fc1 = packed(block.mlp.fc1, fused_gelu=act.approximate)
                block.mlp.act = nn.Identity()
            else:
                block.mlp.fc1 = packed(block.mlp.fc1)
            block.mlp.fc2 = packed(block.mlp.fc2)
    return True


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
    try:
        g = torch.Generator().manual_seed(0)
        linear = nn.Linear(64, 96)
        x = torch.randn(7, 64, generator=g)
        with torch.no_grad():
            ref = F.gelu(Int8Linear(linear.weight, linear.bias)(x))
            y = Int8Linear(linear.weight, linear.bias, fused_gelu="none")(x)
        return bool((y - ref).abs().max() < 0.01 * ref.abs().max())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=1)
def int8_works() -> bool:
    """Whether ``Int8Linear`` runs here and stays within int8 rounding of ``F.linear`` (checked once
    on a small case)."""
    if _int8_engine() is None:
        return False
    try:
        g = torch.Generator().manual_seed(0)
        linear = nn.Linear(64, 96)
        x = torch.randn(7, 64, generator=g)
        with torch.no_grad():
            ref, y = linear(x), Int8Linear(linear.weight, linear.bias)(x)
        return bool((y - ref).abs().max() < 0.05 * ref.abs().max())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


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
