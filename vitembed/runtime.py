"""How a model runs here: device, dtype, CPU kernels and threads.

    resolve_device / resolve_dtype   ``--device`` and ``--dtype`` names -> what torch runs on
    pack_for_cpu (PackedLinear)      float32 linears through oneDNN with weights packed once
    int8.quantize_for_cpu            ``--dtype int8``: int8 block linears through oneDNN (int8.py)
    model_layout                     model threads x torch threads each, for a batch run

``model.py`` is the architecture only; this module is everything about running it fast.
"""

from __future__ import annotations

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
        from .int8 import int8_works

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


def agrees_on_a_small_linear(candidate, reference, tolerance: float) -> bool:
    """Whether a kernel runs here and matches: ``candidate(linear)`` and ``reference(linear)``, each
    a function of a (7, 64) float32 input, on one seeded ``nn.Linear(64, 96)``, within ``tolerance``
    times the reference's largest value. A kernel that raises (missing op, CPU without it) does not."""
    try:
        g = torch.Generator().manual_seed(0)
        linear = nn.Linear(64, 96)
        x = torch.randn(7, 64, generator=g)
        with torch.no_grad():
            ref, y = reference(linear)(x), candidate(linear)(x)
        return bool((y - ref).abs().max() <= tolerance * ref.abs().max())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _packing_works() -> bool:
    """Whether oneDNN's packed linear runs here and agrees with ``F.linear`` (checked on a small case)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return agrees_on_a_small_linear(lambda lin: PackedLinear(lin.weight, lin.bias, fused_gelu="none"),
                                    lambda lin: lambda x: F.gelu(lin(x)), 1e-5)


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
