"""Digest of everything `vitembed encode` writes, for checking that a change alters no output byte.

    python bench/compare_outputs.py IMAGES... > before.txt     # on the old code
    python bench/compare_outputs.py IMAGES... > after.txt      # on the new code
    diff before.txt after.txt                                  # empty: byte-identical

Runs `vitembed encode --weights random --seed 0` for each family (ViT, DeiT distilled, DINOv2 with
registers, CLIP) x {one file per image, --pack 16} x {--layer last, --layer embeddings, --pool cls}
and prints one line per case: the number of output files and the sha256 over every file under the
output folder (path and bytes, sorted by path; the lock file excluded, and the time and run fields of
failures.jsonl lines), then the sha256 of the
--json records (timings dropped) and the exit code. Small variants keep it to minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = [
    "vit_tiny_patch16_224.augreg_in21k",
    "deit-tiny-distilled-patch16-224",
    "dinov2-with-registers-small",
    "clip-vit-base-patch32",
]
LAYOUTS = {"files": [], "pack16": ["--pack", "16"]}
OUTPUTS = {"last": ["--layer", "last"], "embeddings": ["--layer", "embeddings"], "pool-cls": ["--pool", "cls"]}
VOLATILE = {"seconds", "elapsed", "time", "images_per_s"}


def tree_digest(root: Path) -> tuple[int, str]:
    """(number of files, sha256 over their relative paths and bytes) under root."""
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".vitembed.lock")
    for p in files:
        h.update(str(p.relative_to(root)).encode("utf-8", "surrogateescape") + b"\0")
        data = p.read_bytes()
        if p.name == "failures.jsonl":  # each line carries the time and the run's start: drop those
            lines = [json.loads(line) for line in data.decode().splitlines()]
            data = "\n".join(json.dumps({k: v for k, v in r.items() if k not in ("time", "run")}) for r in lines).encode()
        h.update(data)
    return len(files), h.hexdigest()[:16]


def records_digest(stdout: str, out: Path) -> str:
    rows = []
    for line in stdout.replace(str(out), "OUT").splitlines():
        rec = json.loads(line)
        rows.append(json.dumps({k: v for k, v in rec.items() if k not in VOLATILE}, sort_keys=True))
    return hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()[:16]


def main(inputs: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            for layout, layout_args in LAYOUTS.items():
                for output, output_args in OUTPUTS.items():
                    out = Path(tmp) / f"{model}-{layout}-{output}"
                    cmd = [sys.executable, "-m", "vitembed", "encode", *inputs, "--out", str(out),
                           "--model", model, "--weights", "random", "--seed", "0", "--json", "-q",
                           *layout_args, *output_args]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    n, digest = tree_digest(out)
                    print(f"{model:36s} {layout:7s} {output:10s} files={n:4d} tree={digest} "
                          f"records={records_digest(proc.stdout, out)} rc={proc.returncode}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
