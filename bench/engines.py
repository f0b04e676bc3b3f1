"""The local engine against --engine ray on this machine, for the same job, in one run.

    python bench/engines.py                    # ../shared/images/imagenet-sample when it exists
    python bench/engines.py IMAGES_DIR --model vit-base-patch16-224 --pool cls --rounds 2

Every case encodes the same images with the same random weights into a fresh DIR, in this one
process: the local engine (threads), then Ray with its default layout (one CPU actor holding the
node's CPUs less one decode task), then Ray with the actor holding all but half a CPU. The Ray
instance is started before the first Ray case (not timed: a cluster is started once, not per job);
each Ray case's time includes starting its actors and loading the model in them, which every job
pays. Rounds alternate the cases, so a noisy neighbour hits them alike; the figure is the median.
Also checks that every engine wrote the same bytes. Needs the extra: pip install 'vitembed[ray]'.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import vitembed
from vitembed.options import RayOptions


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = sorted(set(re.findall(r"\b(avx512_bf16|avx512_vnni|amx\w*|avx2)\b", text)))
    return ", ".join(found) or "unknown"


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}


def main() -> None:
    default = Path(__file__).resolve().parents[2] / "shared" / "images" / "imagenet-sample"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="?", default=str(default))
    parser.add_argument("--model", default="vit-base-patch16-224")
    parser.add_argument("--pool", default="cls")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import ray

    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    cases = {
        "local": {},
        "ray default": {"engine": "ray", "ray": RayOptions()},
        "ray, actor 1.5 CPU (2 threads), decode 0.5": {"engine": "ray", "ray": RayOptions(actor_cpus=cpus - 0.5, decode_cpus=0.5)},
    }
    common = dict(model=args.model, weights="random", pool=args.pool)
    encoder = vitembed.Encoder(**common)
    times: dict[str, list[float]] = {name: [] for name in cases}
    outputs: dict[str, dict[str, bytes]] = {}
    count = 0
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = list(cases) if round_ % 2 == 0 else list(reversed(cases))
            for name in order:
                out = Path(tmp) / f"{round_}-{len(times[name])}-{name.split()[0]}"
                start = time.perf_counter()
                summary = vitembed.encode([args.images], out, encoder, batch_size=args.batch_size, **cases[name])
                times[name].append(time.perf_counter() - start)
                count = summary.encoded
                outputs.setdefault(name, _outputs(out))
                shutil.rmtree(out)
    ray.shutdown()
    print(f"machine: {platform.processor() or platform.machine()}, {cpus} cores, flags {cpu_flags()}")
    print(f"job: {count} images from {args.images}, {args.model} random weights, pool {args.pool}, batch {args.batch_size}, "
          f"{args.rounds} rounds")
    local = statistics.median(times["local"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:45s} {count / median:7.2f} images/s  (median of {len(values)}: {median:.1f} s)  "
              f"local/this {local / median:.2f}")
    same = all(outputs[name] == outputs["local"] for name in outputs)
    print(f"outputs byte-identical across engines: {same}")


if __name__ == "__main__":
    main()
