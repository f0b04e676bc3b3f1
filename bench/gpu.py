"""vitembed on a GPU: model stage bfloat16 / float16 (eager, --compile, a CUDA graph) beside
transformers ``ViTModel``, then end to end with every core decoding. Run through bench/gpu.sh.

    python bench/gpu.py                        # CUDA, ViT-B/16, batch 256
    python bench/gpu.py --quick --device cpu   # a smoke run of every case, small sizes

Model stage: one batch of random (B, 224, 224, 3) uint8 pixels already on the device, the model's
forward timed over --iters calls after warm-up (synchronised), images/s. vitembed's cases run its
own model (``Encoder.model``, what ``vitembed encode`` runs per batch, normalisation included);
transformers' run ``ViTModel`` (SDPA) in the same dtype on the same normalised batch. "graph" is
one CUDA graph captured around the eager forward (``torch.cuda.graphs``), replayed per call.
Cosine per token of every case to transformers float32 on the same batch.

End to end: JPEG files the script makes itself (--images at 640x480, and --photos at 4032x3024,
exact and with --fast-decode), ``vitembed.encode`` with ``--pool cls`` (so that writing 605 KB of
tokens per image does not bound the run), every core decoding; decode + resize alone on every
core for the bound. The same random ViT-B/16 weights throughout (transformers ``save_pretrained``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
VIT = "vit-base-patch16-224-in21k"
GFLOPS = 35.1  # ViT-B/16 per 224x224 image


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call, iters: int, device: torch.device, warmup: int = 3) -> float:
    """Seconds for ``iters`` calls, after ``warmup`` calls (compilation, autotuning, allocator)."""
    for _ in range(warmup):
        out = call()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        out = call()
    sync(device)
    del out
    return time.perf_counter() - start


def graphed(call, device: torch.device):
    """``call`` captured once into a CUDA graph; the returned function replays it (same output
    tensor every time). On the CPU, ``call`` itself."""
    if device.type != "cuda":
        return call
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()

    def replay():
        graph.replay()
        return out

    return replay


def cosine(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    c = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return float(c.mean()), float(c.min())


def make_jpegs(folder: Path, count: int, size: tuple[int, int], workers: int) -> Path:
    """``count`` smooth synthetic photos (gradients and discs, as JPEG quality 90) of ``size``."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> None:
        path = folder / f"img{i:05d}.jpg"
        if path.exists():
            return
        w, h = size
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([(x / w) * 255, (y / h) * 255, ((x + y) / (w + h)) * 255], -1)
        im = Image.fromarray((base * rng.uniform(0.3, 1.0, 3)).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(12):
            cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(h // 20, h // 4)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        im.save(path, quality=90)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(count)))
    return folder


def model_stage(args, weights: Path, device: torch.device) -> None:
    import vitembed
    from transformers import ViTModel

    print(f"\nmodel stage (batch {args.batch}, {args.iters} calls, pixels on the device):")
    pixels = torch.randint(0, 256, (args.batch, 224, 224, 3), dtype=torch.uint8, device=device)
    ref = None
    dtypes = ["float32"] + (["bfloat16", "float16"] if device.type == "cuda" else ["bfloat16"])
    for dtype in dtypes:
        torch_dtype = getattr(torch, dtype)
        hf = ViTModel.from_pretrained(weights, attn_implementation="sdpa", add_pooling_layer=False,
                                      dtype=torch_dtype).to(device).eval()
        encoder = vitembed.Encoder(VIT, weights=weights, device=str(device), dtype=dtype)
        from vitembed.preprocess import normalize

        def x_of(dt=encoder.dtype):
            return normalize(pixels, encoder.stats, dt)  # (B, 3, 224, 224)

        x = x_of()
        with torch.inference_mode():
            hf_call = lambda: hf(pixel_values=x).last_hidden_state  # noqa: E731
            ve_call = lambda: encoder.model(x_of(), layers=(encoder.layer,))[encoder.layer]  # noqa: E731
            if ref is None:
                ref = hf_call().float()
            cases = [("transformers eager", hf_call), ("vitembed eager", ve_call)]
            if dtype == "bfloat16" and not args.no_compile:  # compiling costs a minute a model: one dtype
                compiled = torch.compile(encoder.model)
                cases.append(("vitembed --compile", lambda: compiled(x_of(), layers=(encoder.layer,))[encoder.layer]))
                hf_compiled = torch.compile(hf)
                cases.append(("transformers compile", lambda: hf_compiled(pixel_values=x).last_hidden_state))
            if dtype != "float32" and device.type == "cuda":
                cases.append(("vitembed CUDA graph", graphed(ve_call, device)))
            for name, call in cases:
                try:
                    seconds = timed(call, args.iters, device)
                    mean, low = cosine(call().float(), ref)
                except Exception as e:  # one case failing (a compiler, a capture) leaves the others
                    print(f"  {dtype:<9} {name:<22} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    continue
                rate = args.batch * args.iters / seconds
                print(f"  {dtype:<9} {name:<22} {rate:9.1f} images/s = {rate * GFLOPS / 1e3:6.1f} TFLOP/s; "
                      f"cosine to transformers float32 mean {mean:.6f}, min {low:.6f}", flush=True)
        hf = encoder = compiled = hf_compiled = cases = None  # free the device memory before the next dtype
        if device.type == "cuda":
            torch.cuda.empty_cache()


def end_to_end(args, weights: Path, device: torch.device, work: Path) -> None:
    import vitembed
    from vitembed.config import PreprocessConfig
    from vitembed.decode import DecodeOptions
    from vitembed.preprocess import load_pixels

    cores = len(os.sched_getaffinity(0))
    print(f"\nend to end (--pool cls, {cores} decode workers, batch {args.batch}):")
    start = time.perf_counter()
    small = make_jpegs(work / "jpeg-640", args.images, (640, 480), cores)
    phone = make_jpegs(work / "jpeg-4032", args.photos, (4032, 3024), cores)
    print(f"  made {args.images} JPEGs at 640x480 and {args.photos} at 4032x3024 in {time.perf_counter() - start:.1f} s")
    import json

    pre = PreprocessConfig.from_transformers(json.loads((weights / "preprocessor_config.json").read_text()))
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    for folder, fast in ((small, False), (phone, False), (phone, True)):
        files = sorted(folder.glob("*.jpg"))
        options = DecodeOptions(fast=fast)
        start = time.perf_counter()
        with ThreadPoolExecutor(cores) as pool:
            for _ in pool.map(lambda f: load_pixels(str(f), pre, options), files):
                pass
        decode_rate = len(files) / (time.perf_counter() - start)
        encoder = vitembed.Encoder(VIT, weights=weights, device=str(device), dtype=dtype, pool="cls", fast_decode=fast)
        out = work / f"out-{folder.name}-{fast}"
        shutil.rmtree(out, ignore_errors=True)  # a kept work folder: encode again, not resume
        start = time.perf_counter()
        summary = vitembed.encode([str(folder)], out, encoder=encoder, batch_size=args.batch, workers=cores)
        rate = summary.encoded / (time.perf_counter() - start)
        tag = f"{folder.name}{' --fast-decode' if fast else ''}"
        print(f"  {tag:<26} {dtype} encode {rate:8.1f} images/s; decode + resize alone {decode_rate:8.1f} images/s "
              f"(encode / decode {rate / decode_rate:.2f}x); {summary.failed} failed", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--images", type=int, default=8000, help="640x480 JPEGs made for end to end")
    parser.add_argument("--photos", type=int, default=256, help="4032x3024 JPEGs made for end to end")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every case")
    parser.add_argument("--work", type=Path, help="work folder [default: a temporary one]")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.iters, args.images, args.photos = 4, 1, 8, 4
    from vitembed.errors import VitembedError
    from vitembed.runtime import resolve_device

    try:
        device = resolve_device(args.device)
    except VitembedError as e:
        raise SystemExit(f"gpu.py: {e}") from None
    sys.path.insert(0, str(HERE))
    work = args.work or Path(tempfile.mkdtemp(prefix="vitembed-gpu-"))
    try:
        run(args, device, work)
    finally:
        if args.work is None:  # a temporary work folder goes (329 MB of weights and JPEGs)
            shutil.rmtree(work, ignore_errors=True)


def run(args, device: torch.device, work: Path) -> None:
    from bench import make_weights

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {gpu}; torch {torch.__version__}, {len(os.sched_getaffinity(0))} cores; work {work}")
    weights = work / "weights"
    if not (weights / "config.json").exists():
        make_weights(weights)
    model_stage(args, weights, device)
    end_to_end(args, weights, device, work)


if __name__ == "__main__":
    main()
