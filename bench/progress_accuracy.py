"""Are the plain progress lines true? Runs ``vitembed encode`` with stderr not a terminal and
``--log-every``, timestamps each ``progress:`` line as it arrives, and compares:

- its count with the outputs on disk at that moment (an image counts when its batch leaves the
  model; its file is written just after, so the disk may lag by one batch);
- its "left" with the time the run really still took, to the last output written (the process
  exit after it, freeing the model, is not part of what an ETA predicts).

    python bench/progress_accuracy.py IMAGES_DIR [--copies 3] [--model vit-base-patch16-224] [--log-every 5]

Prints one row per progress line and the worst relative errors. Quote the CPU flags with the figures.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LINE = re.compile(r"progress: (\d+)/(\d+) .*?([\d.]+|-) images/s, (?:(\d+):(\d+) left|time left unknown)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path)
    parser.add_argument("--copies", type=int, default=3, help="the folder copied this many times (more inputs)")
    parser.add_argument("--model", default="vit-base-patch16-224")
    parser.add_argument("--log-every", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vitembed-progress-"))
    try:
        for k in range(args.copies):
            shutil.copytree(args.images, work / "in" / f"copy{k}")
        out = work / "out"
        start = time.time()
        proc = subprocess.Popen(
            [sys.executable, "-m", "vitembed", "encode", str(work / "in"), "--out", str(out), "--weights", "random",
             "--model", args.model, "--batch-size", str(args.batch_size), "--log-every", str(args.log_every)],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        rows = []
        for line in proc.stderr:
            now = time.time() - start
            match = LINE.search(line)
            if match:
                on_disk = sum(1 for _ in out.rglob("*.safetensors"))
                left = int(match[4]) * 60 + int(match[5]) if match[4] else None
                rows.append((now, int(match[1]), int(match[2]), on_disk, left))
            elif line.startswith(("encoded", "error", "warning")):
                print(line.rstrip(), file=sys.stderr)
        proc.wait()
        exited = time.time() - start
        end = max(p.stat().st_mtime for p in out.rglob("*.safetensors")) - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"run: last output at {end:.1f} s, exited at {exited:.1f} s, exit {proc.returncode}, {len(rows)} progress lines")
    print("   t/s   done  on disk  left(said)  left(true)  count err  eta err")
    worst_count = worst_eta = 0.0
    batch = args.batch_size
    for now, done, total, on_disk, left in rows:
        true_left = end - now
        count_err = max(done - on_disk - batch, on_disk - done, 0) / max(on_disk, 1)  # the writer may lag one batch
        eta_err = abs(left - true_left) / true_left if left is not None and true_left > 0 else float("nan")
        worst_count = max(worst_count, count_err)
        if eta_err == eta_err:
            worst_eta = max(worst_eta, eta_err)
        print(f"{now:6.1f} {done:6d} {on_disk:8d} {left if left is not None else '-':>11} {true_left:11.1f}"
              f" {100 * count_err:9.1f}% {100 * eta_err:7.1f}%")
    print(f"worst count error {100 * worst_count:.1f}%, worst time-left error {100 * worst_eta:.1f}%")


if __name__ == "__main__":
    main()
