"""End-to-end throughput and memory of vitembed against the usual transformers way, in one run.

    python bench/bench.py                      # ../shared/images/imagenet-sample when it exists
    python bench/bench.py IMAGES_DIR --workers 2 --batch-size 32

Every figure comes from the same run, on the same images and the same random
ViT-B/16 weights (a transformers ``ViTModel`` saved with ``save_pretrained``,
which vitembed loads with ``--weights DIR``). Each case runs in a child process
of its own, so that its peak RSS is its own; images/s is timed from the first
file read to the last embedding written (imports and model loading excluded,
for every case alike). Cases:

    transformers    ViTImageProcessor (PIL backend) + ViTModel (SDPA), batch 16,
                    one safetensors file per image: the usual way
    fp32            vitembed encode, float32
    bf16            vitembed encode --dtype bfloat16
    embeddings      vitembed encode --layer embeddings (the model stem only)
    decode          decode + resize only, with the same worker count
    rss-small/large vitembed encode of N and 10N images (copies), for peak RSS while encoding
                    (the peak is restarted after the model is loaded; the load peak is printed too)

It also times ``vitembed --help`` and ``vitembed inspect FILE`` against
``python -c "import torch"``, and compares the outputs: bfloat16 vs float32
(mean and min cosine per token) and vitembed float32 vs transformers (max abs).

Speed and memory are measured here, never in timed tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGES = HERE.parent.parent / "shared" / "images" / "imagenet-sample"
EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def reset_peak_rss() -> float:
    """Peak RSS so far (MiB), then restart the peak from the current RSS (Linux: /proc/self/clear_refs),
    so that what follows (the encoding) is measured apart from loading the model."""
    before = peak_rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return before


def peak_rss_mb() -> float:
    """Peak resident set size of this process since it started, MiB.

    Linux's VmHWM (the high-water mark of this program's own memory). Not ru_maxrss:
    that carries over across exec, so a child of a large parent would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


# ---------------------------------------------------------------- child cases


def case_transformers(images: Path, out: Path, weights: Path, args) -> dict:
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import ViTModel

    try:  # transformers 5 without torchvision: the PIL backend is the processor that works
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:  # transformers 4
        from transformers import ViTImageProcessor as Processor

    torch.set_num_threads(args.threads)
    processor = Processor.from_pretrained(weights)
    model = ViTModel.from_pretrained(weights, attn_implementation="sdpa", add_pooling_layer=False).eval()
    files = image_files(images)
    load_peak = reset_peak_rss()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(files), 16):
            chunk = files[i : i + 16]
            pil = [Image.open(f).convert("RGB") for f in chunk]
            batch = processor(images=pil, return_tensors="pt")
            hidden = model(pixel_values=batch["pixel_values"]).last_hidden_state  # (B, 197, 768)
            for f, h in zip(chunk, hidden):
                save_file({"embedding": h.contiguous()}, str(out / (f.name + ".safetensors")))
    return {"images": len(files), "seconds": time.perf_counter() - start, "load_peak_mb": load_peak}


def case_vitembed(images: Path, out: Path, weights: Path, args, **options) -> dict:
    import torch

    import vitembed

    torch.set_num_threads(args.threads)
    encoder = vitembed.Encoder("vit-base-patch16-224-in21k", weights=str(weights), progress=False, **options)
    load_peak = reset_peak_rss()
    start = time.perf_counter()
    summary = vitembed.encode([str(images)], out, encoder=encoder, batch_size=args.batch_size, workers=args.workers)
    seconds = time.perf_counter() - start
    if summary.failed:
        raise SystemExit(f"{summary.failed} images failed")
    return {"images": summary.encoded, "seconds": seconds, "load_peak_mb": load_peak}


def case_decode(images: Path, out: Path, weights: Path, args) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from vitembed.config import PreprocessConfig
    from vitembed.decode import DecodeOptions
    from vitembed.preprocess import load_pixels

    pre = PreprocessConfig.from_transformers(json.loads((weights / "preprocessor_config.json").read_text()))
    files = image_files(images)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        n = sum(1 for _ in pool.map(lambda f: load_pixels(str(f), pre, DecodeOptions()), files))
    return {"images": n, "seconds": time.perf_counter() - start}


CASES = {
    "transformers": case_transformers,
    "fp32": lambda i, o, w, a: case_vitembed(i, o, w, a, dtype="float32"),
    "bf16": lambda i, o, w, a: case_vitembed(i, o, w, a, dtype="bfloat16"),
    "embeddings": lambda i, o, w, a: case_vitembed(i, o, w, a, layer="embeddings"),
    "rss": lambda i, o, w, a: case_vitembed(i, o, w, a, layer=a.rss_layer),
    "decode": case_decode,
}


def run_child(args) -> None:
    result = CASES[args.child](Path(args.images), Path(args.out), Path(args.weights), args)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


# ---------------------------------------------------------------- parent


def make_weights(path: Path) -> None:
    """A random ViT-B/16 (transformers ViTModel + its image processor), saved with save_pretrained."""
    import torch
    from transformers import ViTConfig, ViTModel

    try:
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor

    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    ViTModel(ViTConfig(), add_pooling_layer=False).save_pretrained(path)
    Processor(size={"height": 224, "width": 224}).save_pretrained(path)


def child(case: str, images: Path, out: Path, weights: Path, args) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", case, "--images", str(images), "--out", str(out),
           "--weights", str(weights), "--workers", str(args.workers), "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--rss-layer", args.rss_layer]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["images_per_s"] = result["images"] / result["seconds"]
    return result


def rss_note(result: dict) -> str:
    return f" while encoding ({result['load_peak_mb']:.0f} loading the model)" if "load_peak_mb" in result else ""


def command_seconds(cmd: list[str], repeats: int = 5) -> float:
    """Median wall time of a command, seconds (after one warm-up run)."""
    subprocess.run(cmd, capture_output=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare_outputs(a: Path, b: Path) -> dict:
    """Cosine per token (mean, min) and max abs difference between same-named outputs of two folders."""
    import torch
    from safetensors.torch import load_file

    cosines, diffs = [], []
    for fa in sorted(a.rglob("*.safetensors")):
        fb = b / fa.relative_to(a)
        x = load_file(fa)["embedding"].float()
        y = load_file(fb)["embedding"].float()
        cosines.append(torch.nn.functional.cosine_similarity(x, y, dim=-1).flatten())
        diffs.append((x - y).abs().max().item())
    cos = torch.cat(cosines)
    close = [d for d in diffs if d < 1e-4]
    return {"files": len(cosines), "mean_cos": cos.mean().item(), "min_cos": cos.min().item(), "max_abs": max(diffs),
            "close": len(close), "close_max_abs": max(close, default=0.0)}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {len(os.sched_getaffinity(0))} usable cores, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}), Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="?", type=Path, help=f"image folder [default: {DEFAULT_IMAGES}]")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="decode workers")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--batch-size", type=int, default=32, help="vitembed batch size")
    parser.add_argument("--cases", default="transformers,fp32,bf16,embeddings,decode,rss,startup",
                        help="comma-separated cases to run")
    parser.add_argument("--rss-copies", type=int, default=10, help="the large RSS run encodes this many copies")
    parser.add_argument("--rss-layer", default="embeddings", help="--layer of the RSS runs")
    parser.add_argument("--keep", type=Path, help="keep the work folder here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--images", dest="images_opt", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.images = args.images_opt
        return run_child(args)

    # ../shared beside the repository, or beside the current folder (a clone elsewhere, run from the repo)
    candidates = [DEFAULT_IMAGES, Path.cwd().parent / "shared" / "images" / "imagenet-sample"]
    images = args.images or next((c for c in candidates if c.is_dir()), DEFAULT_IMAGES)
    if not images.is_dir():
        raise SystemExit(f"no image folder {images}: give one on the command line")
    n = len(image_files(images))
    cases = args.cases.split(",")
    work = Path(args.keep or tempfile.mkdtemp(prefix="vitembed-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"images: {n} from {images}; workers {args.workers}, torch threads {args.threads}, "
          f"vitembed batch {args.batch_size}, transformers batch 16; work folder {work}")
    weights = work / "weights"
    if not (weights / "config.json").exists():
        make_weights(weights)
    results: dict[str, dict] = {}
    for case in ("transformers", "fp32", "bf16", "embeddings", "decode"):
        if case in cases:
            shutil.rmtree(work / case, ignore_errors=True)
            results[case] = r = child(case, images, work / case, weights, args)
            print(f"  {case:<13} {r['images']:>5} images in {r['seconds']:7.2f} s = {r['images_per_s']:7.2f} images/s,"
                  f" peak RSS {r['peak_rss_mb']:6.0f} MiB{rss_note(r)}", flush=True)
    if "rss" in cases:
        many = work / "many"
        if not many.exists():
            for k in range(args.rss_copies):
                shutil.copytree(images, many / f"copy{k:02d}")
        for case, folder in (("rss-small", images), ("rss-large", many)):
            shutil.rmtree(work / case, ignore_errors=True)
            results[case] = r = child("rss", folder, work / case, weights, args)
            print(f"  {case:<13} {r['images']:>5} images in {r['seconds']:7.2f} s = {r['images_per_s']:7.2f} images/s,"
                  f" peak RSS {r['peak_rss_mb']:6.0f} MiB{rss_note(r)} (--layer {args.rss_layer})", flush=True)

    print("\nratios (same run):")
    goals = []

    def ratio(name: str, a: str, b: str, goal: float) -> None:
        if a in results and b in results:
            value = results[a]["images_per_s"] / results[b]["images_per_s"]
            goals.append(value >= goal)
            print(f"  {name:<44} {value:6.2f}x  (goal >= {goal}x: {'met' if value >= goal else 'NOT met'})")

    ratio("vitembed fp32 / transformers", "fp32", "transformers", 1.1)
    ratio("vitembed bf16 / transformers (fp32)", "bf16", "transformers", 3.0)
    ratio("vitembed --layer embeddings / decode+resize", "embeddings", "decode", 0.8)
    if "rss-small" in results:
        value = results["rss-large"]["peak_rss_mb"] / results["rss-small"]["peak_rss_mb"]
        goals.append(value <= 1.15)
        print(f"  {'peak RSS ' + str(results['rss-large']['images']) + ' / ' + str(results['rss-small']['images']) + ' images':<44}"
              f" {value:6.2f}x  (goal <= 1.15x: {'met' if value <= 1.15 else 'NOT met'})")
    if "bf16" in results and "fp32" in results:
        c = compare_outputs(work / "bf16", work / "fp32")
        goals.append(c["mean_cos"] >= 0.999)
        print(f"  bf16 vs fp32 cosine per token over {c['files']} files: mean {c['mean_cos']:.5f}, min {c['min_cos']:.5f}"
              f"  (goal mean >= 0.999: {'met' if c['mean_cos'] >= 0.999 else 'NOT met'})")
    if "transformers" in results and "fp32" in results:
        c = compare_outputs(work / "fp32", work / "transformers")
        print(f"  vitembed fp32 vs transformers: {c['close']} of {c['files']} files within 1e-4 (max abs "
              f"{c['close_max_abs']:.1e}); the others (max abs {c['max_abs']:.2f}) have ICC profiles, which "
              "vitembed converts to sRGB and the transformers way ignores")

    if "startup" in cases:
        script = Path(sys.executable).parent / "vitembed"  # the console script, as a user runs it
        exe = [str(script)] if script.exists() else [sys.executable, "-m", "vitembed"]
        sample = next((f for c in ("fp32", "embeddings", "rss-small") for f in sorted((work / c).rglob("*.safetensors"))), None)
        torch_s = command_seconds([sys.executable, "-c", "import torch"])
        print(f"\nstartup (median of 5): python -c 'import torch' {torch_s:.3f} s")
        timed = [("vitembed --help", exe + ["--help"])]
        if sample is not None:
            timed.append(("vitembed inspect FILE", exe + ["inspect", str(sample)]))
        for name, cmd in timed:
            s = command_seconds(cmd)
            goals.append(s < 0.25 * torch_s)
            print(f"  {name:<22} {s:.3f} s = {s / torch_s:.2f}x  (goal < 0.25x: {'met' if s < 0.25 * torch_s else 'NOT met'})")
    print(f"\n{sum(goals)} of {len(goals)} goals met")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
