"""The cases of ``bench/bench.py``, each run in a child process of its own (so that its peak RSS is
its own): ``python bench/bench.py --child '{"case": ..., ...}'`` prints one JSON line.

Model stage (``ms-*``): one fixed batch of the first ``batch`` images, already decoded and resized,
run ``iters`` times after one warm-up; images/s over the timed calls, and the last output saved
as ``OUT/tokens.npy`` (B, T, D) float32 for the cosines. vitembed runs as its local engine does
(``stages.model_stage`` with ``Encoder.thread_layout``), transformers ``ViTModel`` (SDPA) with all
the torch threads, the peers as ``bench/peers.py`` sets them up.

End to end (``e2e-*``): every image from the first file read to the last output written, imports
and model loading excluded, for every case alike.
"""

from __future__ import annotations

import json
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
VIT = "vit-base-patch16-224-in21k"  # the catalog architecture of the bench's weights


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB: Linux's VmHWM (not ru_maxrss, which
    carries over across exec, so a child of a large parent would report the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Resident set size of this process now, MiB (Linux's VmRSS; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def reset_peak_rss() -> float:
    """Peak RSS so far (MiB), then restart the peak from the current RSS (/proc/self/clear_refs)."""
    before = peak_rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return before


def _processor(weights: Path):
    try:  # transformers 5 without torchvision: the PIL backend is the processor that works
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:  # transformers 4
        from transformers import ViTImageProcessor as Processor
    return Processor.from_pretrained(weights)


def _timed(call, iters: int):
    """(seconds for ``iters`` calls after one warm-up call, the last call's result)."""
    out = call()  # warm-up: oneDNN primitives, first touch of buffers
    start = time.perf_counter()
    for _ in range(iters):
        out = call()
    return time.perf_counter() - start, out


def _encoder(spec: dict, **extra):
    import vitembed

    fields = {k: spec[k] for k in ("dtype", "layer", "fast_decode", "pool") if k in spec}
    return vitembed.Encoder(spec.get("model", VIT), weights=spec["weights"], progress=False, **fields, **extra)


# ---------------------------------------------------------------- model stage


def _batch_images(spec: dict) -> list:
    """The model-stage batch as RGB PIL images, the same for every engine: decoded by Pillow and
    without their ICC profiles (vitembed would convert them to sRGB, the transformers way does not)."""
    from PIL import Image

    images = []
    for f in image_files(spec["images"])[: spec["batch"]]:
        with Image.open(f) as im:
            rgb = im.convert("RGB")
        rgb.info.pop("icc_profile", None)
        images.append(rgb)
    return images


def ms_vitembed(spec: dict) -> dict:
    import numpy as np
    import torch

    from vitembed.stages import model_stage

    encoder = _encoder(spec)
    pixels = [encoder.pixels(im) for im in _batch_images(spec)]  # (S, S, 3) uint8 each, as the decode stage gives
    model_threads, torch_threads = encoder.thread_layout()
    torch.set_num_threads(torch_threads)
    chunk = [(None, p) for p in pixels]
    seconds, out = _timed(lambda: next(model_stage([chunk], encoder, model_threads, encoder.collate))[1], spec["iters"])
    np.save(Path(spec["out"]) / "tokens.npy", out.float().numpy())
    return {"images": len(pixels) * spec["iters"], "seconds": seconds, "threads": f"{model_threads}x{torch_threads}"}


def ms_transformers(spec: dict) -> dict:
    import numpy as np
    import torch
    from transformers import ViTModel

    weights = Path(spec["weights"])
    model = ViTModel.from_pretrained(weights, attn_implementation="sdpa", add_pooling_layer=False).eval()
    x = _processor(weights)(images=_batch_images(spec), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        seconds, out = _timed(lambda: model(pixel_values=x).last_hidden_state, spec["iters"])
    np.save(Path(spec["out"]) / "tokens.npy", out.numpy())
    return {"images": len(x) * spec["iters"], "seconds": seconds, "threads": str(torch.get_num_threads())}


def ms_peer(spec: dict) -> dict:
    import numpy as np

    import peers

    weights = Path(spec["weights"])
    engine = peers.make_engine(spec["engine"], weights, Path(spec["work"]), threads=spec["threads"])
    x = _processor(weights)(images=_batch_images(spec), return_tensors="np")["pixel_values"].astype(np.float32)
    seconds, out = _timed(lambda: engine(x), spec["iters"])
    np.save(Path(spec["out"]) / "tokens.npy", np.asarray(out, dtype=np.float32))
    return {"images": len(x) * spec["iters"], "seconds": seconds, "threads": str(spec["threads"])}


# ---------------------------------------------------------------- end to end


def e2e_transformers(spec: dict) -> dict:
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import ViTModel

    weights, out = Path(spec["weights"]), Path(spec["out"])
    processor = _processor(weights)
    model = ViTModel.from_pretrained(weights, attn_implementation="sdpa", add_pooling_layer=False).eval()
    files = image_files(spec["images"])
    load_peak = reset_peak_rss()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(files), 16):
            chunk = files[i : i + 16]
            batch = processor(images=[Image.open(f).convert("RGB") for f in chunk], return_tensors="pt")
            hidden = model(pixel_values=batch["pixel_values"]).last_hidden_state  # (B, 197, 768)
            for f, h in zip(chunk, hidden):
                save_file({"embedding": h.contiguous()}, str(out / (f.name + ".safetensors")))
    return {"images": len(files), "seconds": time.perf_counter() - start, "load_peak_mb": load_peak}


def e2e_vitembed(spec: dict) -> dict:
    import vitembed

    encoder = _encoder(spec)
    load_peak = reset_peak_rss()
    start = time.perf_counter()
    summary = vitembed.encode([spec["images"]], spec["out"], encoder=encoder, batch_size=spec["batch"],
                              workers=spec.get("workers"))
    seconds = time.perf_counter() - start
    if summary.failed:
        raise SystemExit(f"{summary.failed} images failed")
    return {"images": summary.encoded, "seconds": seconds, "load_peak_mb": load_peak}


def e2e_peer(spec: dict) -> dict:
    import peers

    engine = peers.make_engine(spec["engine"], Path(spec["weights"]), Path(spec["work"]), threads=spec["threads"])
    return peers.end_to_end(engine, image_files(spec["images"]), Path(spec["out"]), Path(spec["weights"]),
                            batch_size=spec["batch"])


def decode(spec: dict) -> dict:
    """Decode + resize alone (``preprocess.load_pixels``), with the run's worker count."""
    from vitembed.config import PreprocessConfig
    from vitembed.decode import DecodeOptions
    from vitembed.preprocess import load_pixels

    pre = PreprocessConfig.from_transformers(json.loads((Path(spec["weights"]) / "preprocessor_config.json").read_text()))
    options = DecodeOptions(fast=spec.get("fast_decode", False))
    files = image_files(spec["images"])
    start = time.perf_counter()
    with ThreadPoolExecutor(spec["workers"]) as pool:
        n = sum(1 for _ in pool.map(lambda f: load_pixels(str(f), pre, options), files))
    return {"images": n, "seconds": time.perf_counter() - start}


def load_memory(spec: dict) -> dict:
    """Peak RSS of building the encoder (load, convert, pack), against the RSS after the imports."""
    import torch  # noqa: F401  (the interpreter's baseline includes torch and vitembed)

    import vitembed  # noqa: F401
    from vitembed.model import num_parameters
    from vitembed.weights import resolve_weights  # noqa: F401

    reset_peak_rss()
    baseline = rss_mb()
    start = time.perf_counter()
    encoder = _encoder(spec)
    seconds = time.perf_counter() - start
    return {"images": 0, "seconds": seconds, "baseline_mb": baseline, "load_peak_mb": peak_rss_mb(),
            "model_mb": num_parameters(encoder.weights.config) * 4 / 2**20}


def matmul_peak(spec: dict) -> dict:
    """The rate a bare matmul of ViT-B/16's MLP shape reaches here, as images/s at the model's
    FLOPs per image: (B*197, 768) @ (768, 3072) in ``spec["dtype"]``, the ceiling of any engine."""
    import torch

    dtype = getattr(torch, spec.get("dtype", "float32"))
    rows = spec["batch"] * 197
    a, b = torch.randn(rows, 768).to(dtype), torch.randn(768, 3072).to(dtype)
    calls = 20
    seconds, _ = _timed(lambda: torch.mm(a, b), calls)
    flops = 2 * rows * 768 * 3072 * calls
    return {"images": 0, "seconds": seconds, "gflops": flops / seconds / 1e9}


CASES = {"ms-vitembed": ms_vitembed, "ms-transformers": ms_transformers, "ms-peer": ms_peer,
         "e2e-transformers": e2e_transformers, "e2e-vitembed": e2e_vitembed, "e2e-peer": e2e_peer,
         "decode": decode, "load-memory": load_memory,
         "matmul-peak": matmul_peak}


def run_child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    result = CASES[spec["case"]](spec)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


if __name__ == "__main__":  # pragma: no cover - bench.py runs children through itself
    raise SystemExit("run bench/bench.py")
