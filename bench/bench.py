"""Throughput, fidelity and memory of vitembed against the usual transformers way and its peers, in one run.

    python bench/bench.py                      # ../shared/images/imagenet-sample when it exists
    python bench/bench.py IMAGES_DIR --peers   # also ONNX Runtime and OpenVINO (pip install '.[bench]')

Every figure comes from the same run, on the same images and the same random ViT-B/16 weights
(a transformers ``ViTModel`` saved with ``save_pretrained``, which vitembed loads with
``--weights DIR``). Each case runs in a child process of its own (``bench/cases.py``), so
that its peak RSS is its own. Sections (``--cases``):

    model     model stage only: one batch of decoded, resized images, run --iters times.
              transformers ViTModel (SDPA) float32, vitembed float32 / bfloat16 / int8, and with
              --peers ONNX Runtime float32 / dynamic int8, OpenVINO float32 / bfloat16
              (bench/peers.py, the ONNX model exported from the same transformers model);
              cosine per token to transformers float32 on the same batch; a bare matmul of the
              model's MLP shape in float32 (and bfloat16), the ceiling any engine can reach here
    e2e       end to end, files to outputs: transformers (ViTImageProcessor PIL + ViTModel, batch 16,
              one safetensors file per image: the usual way), vitembed float32 / bfloat16 / int8,
              --layer embeddings (the stem only), decode + resize alone; with --peers the peers too
    photo     phone-size photos (the images upscaled to 4032x3024 JPEG by the bench): decode alone,
              --layer embeddings and bfloat16, each exact and with --fast-decode
    fidelity  --fast-decode against exact decoding on the phone-size photos, per family's
              preprocessing (random weights of each family's architecture, float32)
    load      peak RSS while building the model, against the model's float32 size
    rss       peak RSS while encoding N and 10N images (copies): flat in the number of images
    startup   vitembed --help and vitembed inspect FILE against python -c "import torch"

It ends with one line per goal (issue 14's), met or not. Speed and memory are measured here,
never in timed tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGES = HERE.parent.parent / "shared" / "images" / "imagenet-sample"
SECTIONS = ("model", "e2e", "photo", "fidelity", "load", "rss", "startup")
VIT_B16_GFLOPS = 35.1  # per 224x224 image: 12 blocks of qkv, attention, proj, MLP, and the patch embedding
PEER_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}  # bench/peers.py name suffix -> --dtype
EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


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


def child(spec: dict, args) -> dict:
    """Run one case (``bench/cases.py``) in a child process; its JSON result with images_per_s."""
    spec = {"threads": args.threads, "workers": args.workers, "batch": args.batch_size, "iters": args.iters, **spec}
    spec = {k: str(v) if isinstance(v, Path) else v for k, v in spec.items()}
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise CaseFailed(f"case {spec['case']} {spec.get('engine', spec.get('dtype', ''))} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["images_per_s"] = result["images"] / result["seconds"] if result["images"] else 0.0
    return result


class CaseFailed(RuntimeError):
    pass


def rss_note(result: dict) -> str:
    if "load_peak_mb" not in result or "baseline_mb" in result:  # the load section prints its own line
        return ""
    return f" while encoding ({result['load_peak_mb']:.0f} loading the model)"


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
        if x.shape != y.shape:  # a NaFlex grid that the reduced decode changed: not comparable token by token
            continue
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
    from vitembed.runtime import cpu_flags

    flags = sorted(f for f in cpu_flags() if f.startswith("amx") or f in ("avx512_bf16", "avx512_vnni", "avx_vnni"))
    return (f"{cpu} ({' '.join(flags) or 'no AVX512-BF16, VNNI or AMX'}), {len(os.sched_getaffinity(0))} usable cores, "
            f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), Python {platform.python_version()}")


FIDELITY_MODELS = (  # one per family and preprocessing: small variants where the family has them
    "vit-base-patch16-224", "vit_small_patch16_224.augreg_in21k", "deit-small-patch16-224", "dino-vits16",
    "dinov2-small", "clip-vit-base-patch16", "siglip-base-patch16-224", "siglip2-base-patch16-naflex", "dinov3-vits16",
)


def cosine_npy(a: Path, b: Path) -> dict:
    """Mean and min cosine per token between two saved (B, T, D) outputs."""
    import numpy as np

    x, y = np.load(a).astype(np.float64), np.load(b).astype(np.float64)
    cos = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min())}


def make_photos(images: Path, folder: Path, count: int) -> Path:
    """The first ``count`` images upscaled to 4032x3024 (a phone's 12 MP), JPEG quality 90."""
    from PIL import Image

    import cases

    folder.mkdir(parents=True, exist_ok=True)
    for f in cases.image_files(images)[:count]:
        target = folder / (f.stem + ".jpg")
        if not target.exists():
            with Image.open(f) as im:
                im.convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC).save(target, quality=90)
    return folder


class Report:
    """Results by name, printed as they come, and the goal lines at the end."""

    def __init__(self):
        self.results: dict[str, dict] = {}
        self.goals: list[tuple[str, bool | None, str]] = []

    def run(self, name: str, spec: dict, args, note: str = "") -> dict | None:
        try:
            r = self.results[name] = child(spec, args)
        except CaseFailed as e:
            print(f"  {name:<26} FAILED: {str(e).strip().splitlines()[-1][:200]}", flush=True)
            return None
        rate = f"{r['images']:>5} images in {r['seconds']:7.2f} s = {r['images_per_s']:7.2f} images/s" if r["images"] else ""
        print(f"  {name:<26} {rate}, peak RSS {r['peak_rss_mb']:6.0f} MiB{rss_note(r)}{note}", flush=True)
        return r

    def rate(self, name: str) -> float | None:
        return self.results[name]["images_per_s"] if name in self.results else None

    def ratio(self, label: str, a: str, b: str, goal: float | None = None) -> float | None:
        ra, rb = self.rate(a), self.rate(b)
        if not ra or not rb:
            return None
        value = ra / rb
        print(f"  {label:<52} {value:6.2f}x" + (f"  (goal >= {goal}x: {'met' if value >= goal else 'NOT met'})" if goal else ""))
        if goal is not None:
            self.goal(f"{label} >= {goal}x", value >= goal, f"{value:.2f}x")
        return value

    def goal(self, label: str, met: bool | None, figure: str) -> None:
        self.goals.append((label, met, figure))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="?", type=Path, help=f"image folder [default: {DEFAULT_IMAGES}]")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="decode workers")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (model stage, vitembed, peers)")
    parser.add_argument("--iters", type=int, default=3, help="timed model-stage calls per case")
    parser.add_argument("--cases", default=",".join(SECTIONS), help=f"sections to run, comma-separated: {','.join(SECTIONS)}")
    parser.add_argument("--peers", action="store_true", help="also ONNX Runtime and OpenVINO (pip install '.[bench]')")
    parser.add_argument("--photos", type=int, default=16, help="phone-size photos made for the photo section")
    parser.add_argument("--fidelity-photos", type=int, default=8, help="of those, used per family for fidelity")
    parser.add_argument("--rss-copies", type=int, default=10, help="the large RSS run encodes this many copies")
    parser.add_argument("--keep", type=Path, help="keep the work folder here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    if args.child:
        import cases

        return cases.run_child(json.loads(args.child))
    import cases

    sections = set(args.cases.split(",")) - {""}
    if not sections:
        raise SystemExit(f"--cases: no section named; one or more of {','.join(SECTIONS)}")
    if unknown := sections - set(SECTIONS):
        raise SystemExit(f"--cases: unknown section(s) {', '.join(sorted(unknown))}; one or more of {','.join(SECTIONS)}")
    # ../shared beside the repository, or beside the current folder (a clone elsewhere, run from the repo)
    candidates = [DEFAULT_IMAGES, Path.cwd().parent / "shared" / "images" / "imagenet-sample"]
    images = args.images or next((c for c in candidates if c.is_dir()), DEFAULT_IMAGES)
    if not images.is_dir():
        raise SystemExit(f"no image folder {images}: give a folder of photos, python bench/bench.py PHOTOS_DIR")
    n = len(cases.image_files(images))
    work = Path(args.keep or tempfile.mkdtemp(prefix="vitembed-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"images: {n} from {images}; decode workers {args.workers}, torch threads {args.threads}, batch "
          f"{args.batch_size} (transformers e2e: 16), model stage {args.iters} calls; work folder {work}")
    weights = work / "weights"
    if not (weights / "config.json").exists():
        make_weights(weights)
    peer_names = []
    if args.peers:
        import peers  # bench/peers.py: the onnxruntime and openvino imports inside are lazy

        for name, why in peers.available().items():
            if why is None:
                peer_names.append(name)
            else:
                print(f"  peer {name}: skipped ({why})")
    report = Report()
    base = {"images": images, "weights": weights, "work": work}

    def out(name: str) -> Path:
        shutil.rmtree(work / name, ignore_errors=True)
        return work / name

    if "model" in sections:
        print(f"\nmodel stage (batch {args.batch_size}, decoded and resized beforehand):")
        report.run("ms transformers fp32", {**base, "case": "ms-transformers", "out": out("ms-transformers")}, args)
        for dtype in ("float32", "bfloat16", "int8"):
            report.run(f"ms vitembed {dtype}", {**base, "case": "ms-vitembed", "dtype": dtype, "out": out(f"ms-{dtype}")}, args)
        for name in peer_names:
            report.run(f"ms {name}", {**base, "case": "ms-peer", "engine": name, "out": out(f"ms-{name}")}, args)
        for dtype in ("float32", "bfloat16") if fast_bf16() else ("float32",):
            r = report.run(f"bare matmul {dtype}", {**base, "case": "matmul-peak", "dtype": dtype, "out": out("mm")}, args)
            if r:  # the ceiling: every FLOP of the model at the rate of its largest matmul
                r["images_per_s"] = r["gflops"] / VIT_B16_GFLOPS
                print(f"    {r['gflops']:.0f} GFLOP/s on (B*197, 768) @ (768, 3072) = at most {r['images_per_s']:.2f} "
                      f"images/s at {VIT_B16_GFLOPS} GFLOP per image")
    if "e2e" in sections:
        print("\nend to end (files to outputs):")
        report.run("e2e transformers fp32", {**base, "case": "e2e-transformers", "out": out("e2e-transformers")}, args)
        for dtype in ("float32", "bfloat16", "int8"):
            report.run(f"e2e vitembed {dtype}", {**base, "case": "e2e-vitembed", "dtype": dtype, "out": out(f"e2e-{dtype}")}, args)
        report.run("e2e vitembed embeddings", {**base, "case": "e2e-vitembed", "layer": "embeddings", "out": out("e2e-emb")}, args)
        report.run("decode + resize", {**base, "case": "decode", "out": out("decode")}, args)
        for name in peer_names:
            report.run(f"e2e {name}", {**base, "case": "e2e-peer", "engine": name, "out": out(f"e2e-{name}")}, args)
    phone = None
    if sections & {"photo", "fidelity"}:
        phone = make_photos(images, work / "phone", args.photos)
    if "photo" in sections:
        print(f"\nphone-size photos ({args.photos} at 4032x3024, JPEG):")
        for fast in (False, True):
            tag = "fast" if fast else "exact"
            spec = {**base, "images": phone, "fast_decode": fast}
            report.run(f"photo decode {tag}", {**spec, "case": "decode", "out": out(f"ph-dec-{tag}")}, args)
            report.run(f"photo embeddings {tag}", {**spec, "case": "e2e-vitembed", "layer": "embeddings", "out": out(f"ph-emb-{tag}")}, args)
            report.run(f"photo bfloat16 {tag}", {**spec, "case": "e2e-vitembed", "dtype": "bfloat16", "out": out(f"ph-bf16-{tag}")}, args)
    fidelity = {}
    if "fidelity" in sections:
        print(f"\n--fast-decode fidelity ({args.fidelity_photos} phone-size photos, random weights, float32, all tokens):")
        few = work / "phone-few"
        few.mkdir(exist_ok=True)
        for f in sorted(phone.glob("*.jpg"))[: args.fidelity_photos]:
            if not (few / f.name).exists():
                os.link(f, few / f.name)
        for model in FIDELITY_MODELS:
            folders = {}
            for fast in (False, True):
                spec = {**base, "images": few, "model": model, "weights": "random", "fast_decode": fast,
                        "dtype": "float32", "out": out(f"fid-{model}-{fast}")}
                try:
                    child({**spec, "case": "e2e-vitembed"}, args)
                    folders[fast] = spec["out"]
                except CaseFailed as e:
                    print(f"  {model:<36} FAILED: {str(e).strip().splitlines()[-1][:200]}")
            if len(folders) == 2:
                c = fidelity[model] = compare_outputs(folders[True], folders[False])
                print(f"  {model:<36} cosine per token mean {c['mean_cos']:.5f}, min {c['min_cos']:.5f}")
    if "load" in sections:
        print("\nloading the model:")
        for dtype in ("float32", "bfloat16", "int8"):
            r = report.run(f"load {dtype}", {**base, "case": "load-memory", "dtype": dtype, "out": out("load")}, args)
            if r:
                grow = r["load_peak_mb"] - r["baseline_mb"]
                print(f"    baseline {r['baseline_mb']:.0f} MiB, peak {r['load_peak_mb']:.0f} MiB: +{grow:.0f} MiB = "
                      f"{grow / r['model_mb']:.2f}x the float32 model ({r['model_mb']:.0f} MiB), {r['seconds']:.2f} s")
                if dtype == "float32":
                    report.goal("loading peak <= 1.3x the float32 model + baseline", grow <= 1.3 * r["model_mb"],
                                f"{grow / r['model_mb']:.2f}x")
    if "rss" in sections:
        print("\npeak RSS while encoding (--layer embeddings):")
        many = work / "many"
        if not many.exists():
            for k in range(args.rss_copies):
                shutil.copytree(images, many / f"copy{k:02d}")
        for name, folder in (("rss-small", images), ("rss-large", many)):
            report.run(name, {**base, "images": folder, "case": "e2e-vitembed", "layer": "embeddings", "out": out(name)}, args)

    print("\nratios and goals (same run):")
    rep = report
    rep.ratio("e2e vitembed fp32 / transformers", "e2e vitembed float32", "e2e transformers fp32", 2.0)
    bf16_cpu = fast_bf16() is not None
    rep.ratio("e2e vitembed bf16 / transformers (fp32)", "e2e vitembed bfloat16", "e2e transformers fp32", 3.0 if bf16_cpu else None)
    rep.ratio("bf16 end to end / bf16 model stage", "e2e vitembed bfloat16", "ms vitembed bfloat16", 0.9)
    rep.ratio("fp32 end to end / fp32 model stage", "e2e vitembed float32", "ms vitembed float32")
    rep.ratio("ms vitembed fp32 / transformers fp32", "ms vitembed float32", "ms transformers fp32")
    rep.ratio("ms transformers fp32 / fp32 matmul ceiling", "ms transformers fp32", "bare matmul float32")
    rep.ratio("ms vitembed fp32 / fp32 matmul ceiling", "ms vitembed float32", "bare matmul float32")
    rep.ratio("ms vitembed bf16 / bf16 matmul ceiling", "ms vitembed bfloat16", "bare matmul bfloat16")
    rep.ratio("ms vitembed int8 / ort-int8", "ms vitembed int8", "ms ort-int8", 1.1)
    rep.ratio("ms vitembed int8 / vitembed fp32", "ms vitembed int8", "ms vitembed float32")
    rep.ratio("ms vitembed int8 / vitembed bf16", "ms vitembed int8", "ms vitembed bfloat16")
    for name in peer_names:  # each peer against vitembed at the same precision
        dtype = PEER_DTYPES[name.split("-")[1]]
        if name != "ort-int8":  # that one is a goal line above
            rep.ratio(f"ms vitembed {dtype} / {name}", f"ms vitembed {dtype}", f"ms {name}")
        rep.ratio(f"e2e vitembed {dtype} / {name}", f"e2e vitembed {dtype}", f"e2e {name}")
    rep.ratio("e2e --layer embeddings / decode+resize", "e2e vitembed embeddings", "decode + resize")
    rep.ratio("photo decode fast / exact", "photo decode fast", "photo decode exact")
    rep.ratio("photo embeddings fast / exact", "photo embeddings fast", "photo embeddings exact", 2.5)
    rep.ratio("photo bf16 fast / exact", "photo bfloat16 fast", "photo bfloat16 exact", 1.2)
    ref = work / "ms-transformers" / "tokens.npy"
    if ref.exists():
        print("\n  model stage cosine per token to transformers float32 (same batch):")
        for name, folder in [("vitembed float32", "ms-float32"), ("vitembed bfloat16", "ms-bfloat16"),
                             ("vitembed int8", "ms-int8")] + [(p, f"ms-{p}") for p in peer_names]:
            if (work / folder / "tokens.npy").exists():
                c = cosine_npy(work / folder / "tokens.npy", ref)
                print(f"    {name:<20} mean {c['mean_cos']:.6f}, min {c['min_cos']:.6f}")
                if name == "vitembed int8":
                    rep.goal("int8 mean cosine >= 0.999 to float32", c["mean_cos"] >= 0.999, f"{c['mean_cos']:.5f}")
    if fidelity:
        worst = min(c["mean_cos"] for c in fidelity.values())
        rep.goal("--fast-decode mean cosine >= 0.999 to exact (worst family)", worst >= 0.999, f"{worst:.5f}")
    if "rss-small" in rep.results and "rss-large" in rep.results:
        value = rep.results["rss-large"]["peak_rss_mb"] / rep.results["rss-small"]["peak_rss_mb"]
        print(f"  peak RSS {rep.results['rss-large']['images']} / {rep.results['rss-small']['images']} images"
              f"{'':<22} {value:6.2f}x")
        rep.goal("peak RSS 10N / N images <= 1.15x", value <= 1.15, f"{value:.2f}x")
    if "e2e vitembed float32" in rep.results and "e2e transformers fp32" in rep.results:
        c = compare_outputs(work / "e2e-float32", work / "e2e-transformers")
        print(f"  vitembed fp32 vs transformers end to end: {c['close']} of {c['files']} files within 1e-4 (max abs "
              f"{c['close_max_abs']:.1e}); the others (max abs {c['max_abs']:.2f}) have ICC profiles, which "
              "vitembed converts to sRGB and the transformers way ignores")

    if "startup" in sections:
        script = Path(sys.executable).parent / "vitembed"  # the console script, as a user runs it
        exe = [str(script)] if script.exists() else [sys.executable, "-m", "vitembed"]
        sample = next((f for c in ("e2e-float32", "e2e-emb", "rss-small") for f in sorted((work / c).rglob("*.safetensors"))), None)
        torch_s = command_seconds([sys.executable, "-c", "import torch"])
        print(f"\nstartup (median of 5): python -c 'import torch' {torch_s:.3f} s")
        timed = [("vitembed --help", exe + ["--help"])]
        if sample is not None:
            timed.append(("vitembed inspect FILE", exe + ["inspect", str(sample)]))
        for name, cmd in timed:
            sec = command_seconds(cmd)
            print(f"  {name:<22} {sec:.3f} s = {sec / torch_s:.2f}x")
            rep.goal(f"{name} < 0.25x import torch", sec < 0.25 * torch_s, f"{sec / torch_s:.2f}x")

    print("\ngoals:")
    for label, met, figure in rep.goals:
        print(f"  {'met    ' if met else 'NOT met'}  {label}: {figure}")
    print(f"{sum(1 for g in rep.goals if g[1])} of {len(rep.goals)} goals met")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def fast_bf16() -> str | None:
    from vitembed.runtime import fast_bf16_instructions

    return fast_bf16_instructions()


if __name__ == "__main__":
    main()
