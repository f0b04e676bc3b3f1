"""How a model runs (runtime.py, through the Encoder): --device names, --dtype auto and bfloat16,
--compile (a padded last batch, the fallback to eager, Ctrl-C while compiling), and the
oneDNN-packed linears."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from .conftest import photo, run_cli
from .helpers import _encoder, _folder


@pytest.mark.parametrize("device", ["cpu:1", "cpu:0"])
def test_cpu_device_index_is_refused(tmp_path, device):
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    r = run_cli("encode", str(img), "--out", str(tmp_path / "out"), "--weights", "random", "--device", device)
    assert r.returncode == 2 and f"--device {device}: the CPU device takes no index" in r.stderr.decode()
    assert not (tmp_path / "out").exists()


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_warns_without_cpu_support(tmp_path, small_ckpt):
    from vitembed.runtime import _cpu_has_fast

    src = _folder(tmp_path / "in", good=2)
    auto = run_cli("encode", str(src), "--out", str(tmp_path / "auto"), "--weights", str(small_ckpt))
    assert auto.returncode == 0
    with safe_open(str(tmp_path / "auto" / "img00.jpg.safetensors"), "numpy") as f:
        assert f.metadata()["dtype"] == "float32"
    bf16 = run_cli("encode", str(src), "--out", str(tmp_path / "bf16"), "--weights", str(small_ckpt), "--dtype", "bfloat16")
    assert bf16.returncode == 0
    warned = "warning: --dtype bfloat16 on a CPU without bfloat16 matrix instructions" in bf16.stderr.decode()
    assert warned == (not _cpu_has_fast(torch.bfloat16))
    a = load_file(tmp_path / "auto" / "img00.jpg.safetensors")["embedding"]
    b = load_file(tmp_path / "bf16" / "img00.jpg.safetensors")["embedding"]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.99 and not np.array_equal(a, b)


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, small_ckpt):
    calls = []

    def broken_compile(model, **kwargs):
        def run(x, layers):
            calls.append(x.shape[0])
            raise RuntimeError("no compiler here\nmore lines")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    eager = _encoder(small_ckpt)(pixels)
    encoder = _encoder(small_ckpt, compile=True)
    assert encoder.compiled
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = encoder(pixels)
        second = encoder(pixels)
    messages = [str(w.message) for w in caught]
    assert messages == ["--compile: torch.compile failed (RuntimeError: no compiler here); running eager"]
    assert calls == [3] and not encoder.compiled and encoder.packed
    assert torch.equal(first, eager) and torch.equal(second, eager)


def test_compiled_model_gets_a_padded_last_batch_and_returns_its_rows(monkeypatch, small_ckpt):
    shapes = []

    def fake_compile(model, **kwargs):
        def run(x, layers):
            shapes.append(x.shape[0])
            return model(x, layers=layers)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    pixels = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    encoder = _encoder(small_ckpt, compile=True)
    full, short = encoder(pixels), encoder(pixels[:2])
    assert shapes == [5, 5]  # the short batch ran at the first batch's size: no recompilation
    assert short.shape == (2, 17, 48) and torch.equal(short, full[:2])


def test_ctrl_c_while_compiling_stays_ctrl_c(monkeypatch, small_ckpt):
    def compile_interrupted(model, **kwargs):
        def run(x, layers):
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as e:
                raise RuntimeError("backend compiler failed") from e
        return run

    monkeypatch.setattr(torch, "compile", compile_interrupted)
    encoder = _encoder(small_ckpt, compile=True)
    with pytest.raises(KeyboardInterrupt):
        encoder(np.zeros((1, 32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu"])
def test_packed_linears_match_the_plain_model_and_do_not_depend_on_the_batch(act):
    import copy

    from vitembed.config import ViTConfig
    from vitembed.model import VisionTransformer
    from vitembed.runtime import PackedLinear, pack_for_cpu

    cfg = ViTConfig(hidden_size=64, depth=2, num_heads=4, mlp_dim=128, patch_size=8, image_size=32, act=act)
    plain = VisionTransformer(cfg).init_weights(seed=3).eval()
    packed = copy.deepcopy(plain)
    if not pack_for_cpu(packed):
        pytest.skip("oneDNN packed linears are not available on this CPU")
    assert isinstance(packed.blocks[0].mlp.fc1, PackedLinear)
    assert isinstance(packed.blocks[0].mlp.act, torch.nn.Identity) == (act != "quick_gelu")
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = plain(x)["last"], packed(x)["last"]
        assert (a - b).abs().max().item() < 1e-4
        assert torch.equal(packed(x[:2])["last"], b[:2])
    assert not pack_for_cpu(VisionTransformer(cfg).to(torch.bfloat16))  # float32 only


def test_int8_block_linears_close_to_float32_and_recorded(tmp_path, small_ckpt):
    """--dtype int8: the four linears of every block become Int8Linear (weights int8 per output
    channel), the rest stays float32; outputs are float32, close to the float32 run, and say
    dtype int8 in their metadata."""
    from vitembed.int8 import Int8Linear, int8_works

    if not int8_works():
        pytest.skip("this torch has no quantized engine")
    src = _folder(tmp_path / "in", good=2)
    ref = run_cli("encode", str(src), "--out", str(tmp_path / "fp32"), "--weights", str(small_ckpt))
    q = run_cli("encode", str(src), "--out", str(tmp_path / "int8"), "--weights", str(small_ckpt), "--dtype", "int8")
    assert ref.returncode == 0 and q.returncode == 0, q.stderr.decode()
    with safe_open(str(tmp_path / "int8" / "img00.jpg.safetensors"), "numpy") as f:
        assert f.metadata()["dtype"] == "int8" and f.metadata()["save_dtype"] == "float32"
    a = load_file(tmp_path / "fp32" / "img00.jpg.safetensors")["embedding"]
    b = load_file(tmp_path / "int8" / "img00.jpg.safetensors")["embedding"]
    assert b.dtype == np.float32 and b.shape == a.shape
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.mean() > 0.999 and not np.array_equal(a, b)

    encoder = _encoder(small_ckpt, dtype="int8")
    block = encoder.model.blocks[0]
    assert all(isinstance(m, Int8Linear) for m in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2))
    assert encoder.model.patch_embed.proj.weight.dtype == torch.float32 and encoder.packed
    # resuming with another --dtype is a settings conflict, not a mix
    again = run_cli("encode", str(src), "--out", str(tmp_path / "int8"), "--weights", str(small_ckpt))
    assert again.returncode == 2 and "dtype: 'int8' there, 'float32' now" in again.stderr.decode()


def test_int8_linear_matches_integer_arithmetic():
    """Int8Linear computes what its recipe says: per-channel symmetric int8 weights, the input
    quantised to uint8 with one scale and zero point from its min and max, int32 products."""
    from vitembed.int8 import Int8Linear, int8_works

    if not int8_works():
        pytest.skip("this torch has no quantized engine")
    g = torch.Generator().manual_seed(1)
    weight, bias, x = torch.randn(24, 40, generator=g), torch.randn(24, generator=g), torch.randn(2, 5, 40, generator=g)
    w_scale = weight.abs().amax(1) / 127
    w_int = torch.round(weight / w_scale[:, None]).clamp(-127, 127)
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    x_scale = (hi - lo) / 255
    zero = round(-lo / x_scale)
    x_int = torch.clamp(torch.round(x / x_scale) + zero, 0, 255)
    expected = ((x_int - zero) @ w_int.T) * (x_scale * w_scale) + bias  # (2, 5, 24)
    y = Int8Linear(weight, bias)(x)
    assert y.shape == (2, 5, 24) and y.dtype == torch.float32
    assert torch.allclose(y, expected, atol=2e-2 * x_scale * w_scale.max().item() * 40 + 1e-4)
    assert (y - x @ weight.T - bias).abs().max() > 0  # it did quantise


def test_int8_is_refused_off_the_cpu_and_warns_without_vnni(monkeypatch):
    from vitembed import runtime
    from vitembed.int8 import int8_works
    from vitembed.errors import UsageError

    with pytest.raises(UsageError, match="--dtype int8 runs on the CPU"):
        runtime.resolve_dtype("int8", torch.device("meta"))
    monkeypatch.setattr(runtime, "fast_int8_instructions", lambda: None)
    if int8_works():
        with pytest.warns(Warning, match="without int8 dot-product instructions"):
            assert runtime.resolve_dtype("int8", torch.device("cpu")) == "int8"


def test_int8_instructions_from_cpu_flags(tmp_path):
    from vitembed.runtime import fast_int8_instructions

    for flags, expected in (("fpu avx2 avx512_vnni amx_int8", "AMX-INT8"), ("avx2 avx512_vnni", "AVX512-VNNI"),
                            ("avx2 avx_vnni", "AVX-VNNI"), ("avx2 fma", None)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert fast_int8_instructions(str(info)) == expected
    assert fast_int8_instructions(str(tmp_path / "none")) is None


def test_int8_keeps_layernorm_outlier_channels():
    """A few LayerNorm channels scaled up (as trained ViTs have them) set the one activation scale
    of qkv's and fc1's input: before smooth_into_linear the helper's breaking pass measured a
    per-token cosine to float32 of mean 0.987, min 0.54 on such a model; with it, the scale moves
    into the weights and the tokens stay close. The move itself is exact in float32."""
    import copy

    from vitembed.config import ViTConfig
    from vitembed.model import VisionTransformer
    from vitembed.int8 import int8_works, quantize_for_cpu, smooth_into_linear

    if not int8_works():
        pytest.skip("this torch has no quantized engine")
    cfg = ViTConfig(hidden_size=64, depth=3, num_heads=4, mlp_dim=256, patch_size=8, image_size=32)
    plain = VisionTransformer(cfg).init_weights(seed=5).eval()
    with torch.no_grad():
        for block in plain.blocks:
            for norm in (block.norm1, block.norm2):
                norm.weight[:3] *= 60
                norm.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(7))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))

    norm, linear = copy.deepcopy(plain.blocks[0].norm1), plain.blocks[0].attn.qkv
    with torch.no_grad():
        before = linear(norm(y))
        weight = smooth_into_linear(norm, linear.weight)  # divides norm's gamma and beta in place
        after = torch.nn.functional.linear(norm(y), weight, linear.bias)
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)

    quantized = copy.deepcopy(plain)
    assert quantize_for_cpu(quantized)
    with torch.inference_mode():
        a, b = plain(x)["last"], quantized(x)["last"]
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    assert cos.mean() > 0.998 and cos.min() > 0.98, (cos.mean().item(), cos.min().item())


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu"])
def test_int8_fc1_runs_its_gelu_inside_the_kernel(act):
    """fc1's GELU (erf or tanh) is a post-op of the int8 kernel: the same values as GELU after
    the plain int8 linear, within float32 rounding of the int8 result; QuickGELU stays separate."""
    import copy

    from vitembed.config import ViTConfig
    from vitembed.model import VisionTransformer
    from vitembed.int8 import Int8Linear, int8_works, quantize_for_cpu

    if not int8_works():
        pytest.skip("this torch has no quantized engine")
    g = torch.Generator().manual_seed(2)
    weight, bias, x = torch.randn(96, 64, generator=g), torch.randn(96, generator=g), torch.randn(3, 9, 64, generator=g)
    approximate = "tanh" if act == "gelu_tanh" else "none"
    with torch.no_grad():
        plain = torch.nn.functional.gelu(Int8Linear(weight, bias)(x), approximate=approximate)
        fused = Int8Linear(weight, bias, fused_gelu=approximate)(x)
    assert fused.shape == (3, 9, 96) and (fused - plain).abs().max() < 1e-3 * plain.abs().max()

    cfg = ViTConfig(hidden_size=64, depth=2, num_heads=4, mlp_dim=128, patch_size=8, image_size=32, act=act)
    model = VisionTransformer(cfg).init_weights(seed=3).eval()
    quantized = copy.deepcopy(model)
    assert quantize_for_cpu(quantized)
    mlp = quantized.blocks[0].mlp
    assert (mlp.fc1.fused_gelu is not None) == (act != "quick_gelu")
    assert isinstance(mlp.act, torch.nn.Identity) == (act != "quick_gelu")
    images = torch.randn(2, 3, 32, 32, generator=g)
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(model(images)["last"], quantized(images)["last"], dim=-1)
    assert cos.min() > 0.999


def test_runs_in_two_python_threads_see_the_users_thread_count(small_ckpt):
    """The breaking pass's case: encode() sets torch's process-wide thread count for its model
    threads; a second encode() started meanwhile read that 1, split its batches differently and,
    in int8 (one activation scale per call), gave other numbers (max abs 0.70). Both see the
    count from before the first run now, and the last to end restores it."""
    import threading

    from vitembed.int8 import int8_works
    from vitembed.runtime import base_torch_threads, hold_torch_threads, release_torch_threads

    before = torch.get_num_threads()
    hold_torch_threads()
    torch.set_num_threads(1)  # what a run's model thread sets
    hold_torch_threads()  # a second run starts meanwhile
    assert base_torch_threads() == before
    release_torch_threads()
    assert torch.get_num_threads() == 1  # the first run is still going
    release_torch_threads()
    assert torch.get_num_threads() == before == base_torch_threads()

    encoder = _encoder(small_ckpt, dtype="int8" if int8_works() else "float32")
    images = [np.random.default_rng(k).integers(0, 256, (40, 40, 3), dtype=np.uint8) for k in range(6)]
    solo = encoder.encode(images, batch_size=6)
    results, barrier = [None, None], threading.Barrier(2)

    def run(k):
        barrier.wait()
        results[k] = encoder.encode(images, batch_size=6)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, solo) for r in results)
    assert torch.get_num_threads() == before


def test_int8_with_nan_weights_writes_nan_embeddings_as_float32_does(tmp_path, small_ckpt):
    """The breaking pass's checkpoint: one NaN in the position embedding. float32 wrote NaN
    embeddings with a warning (exit 0); int8 stopped with oneDNN's 'min should be less than or
    equal to max' traceback (exit 1). Now int8 does what float32 does; and an Inf or NaN row in
    an int8 linear's input gives a NaN row without spoiling the others."""
    import shutil

    from safetensors.torch import load_file as load_torch, save_file

    from vitembed.int8 import Int8Linear, int8_works

    if not int8_works():
        pytest.skip("this torch has no quantized engine")
    g = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    x = torch.randn(5, 40, generator=g)
    for fused in (None, "none"):
        linear = Int8Linear(weight, bias, fused_gelu=fused)
        clean = linear(x[[0, 3, 4]])
        bad = x.clone()
        bad[1, 7], bad[2, 0] = float("nan"), float("inf")
        y = linear(bad)
        assert torch.isnan(y[1:3]).all() and torch.equal(y[[0, 3, 4]], clean)

    ckpt = tmp_path / "nan"
    ckpt.mkdir()
    shutil.copy(small_ckpt / "config.json", ckpt)
    sd = load_torch(small_ckpt / "model.safetensors")
    sd["embeddings.position_embeddings"][0, 3, 5] = float("nan")
    save_file(sd, ckpt / "model.safetensors")
    src = _folder(tmp_path / "in", good=2)
    for dtype in ("float32", "int8"):
        r = run_cli("encode", str(src), "--out", str(tmp_path / dtype), "--weights", str(ckpt), "--dtype", dtype)
        assert r.returncode == 0 and "hold Inf or NaN" in r.stderr.decode(), r.stderr.decode()[-500:]
        assert np.isnan(load_file(tmp_path / dtype / "img00.jpg.safetensors")["embedding"]).any()
