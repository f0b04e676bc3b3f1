"""Where the model stage's time goes, by operator: torch.profiler over vitembed's forward.

    python bench/profile_ops.py                       # ViT-B/16 float32, batch 32, all cores
    python bench/profile_ops.py --dtype bfloat16 --batch 16

Random ViT-B/16 weights, one batch of random (B, 224, 224, 3) uint8 pixels, one warm-up call and
``--calls`` profiled calls of ``Encoder.__call__`` (normalise, the model, the copy out) with all
the torch threads. Prints the operators by self CPU time and the share of the matrix products
(linear / matmul / oneDNN kernels) against everything else, with the GFLOP/s the products reach.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

GFLOPS = 35.1  # ViT-B/16 per 224x224 image
MATMUL_OPS = ("linear", "matmul", "mm", "addmm", "bmm", "mkldnn", "onednn", "quantized", "convolution",
              "scaled_dot_product", "_flash_attention", "baddbmm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | int8")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--rows", type=int, default=14, help="operators shown")
    args = parser.parse_args()

    import vitembed

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    encoder = vitembed.Encoder("vit-base-patch16-224-in21k", weights="random", dtype=args.dtype)
    pixels = np.random.default_rng(0).integers(0, 256, (args.batch, 224, 224, 3), dtype=np.uint8)
    encoder(pixels)  # warm-up: oneDNN primitives, buffers
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.calls):
            encoder(pixels)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    products = sum(e.self_cpu_time_total for e in events if any(k in e.key.lower() for k in MATMUL_OPS))
    print(f"{args.dtype}, batch {args.batch}, {args.calls} calls, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print(f"{'operator':<44} {'self ms':>9} {'share':>7} {'calls':>6}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
        print(f"{e.key[:44]:<44} {e.self_cpu_time_total / 1e3:9.1f} {e.self_cpu_time_total / total:7.1%} {e.count:6d}")
    seconds = total / 1e6 / args.calls
    print(f"matrix products (incl. attention): {products / total:.1%} of {seconds:.2f} s per call; the model at "
          f"{args.batch * GFLOPS / seconds:.0f} GFLOP/s overall, the products at "
          f"{args.batch * GFLOPS / (seconds * products / total):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
