"""Peak memory of ``vitembed export`` on a packed folder of many small rows, against walking the
same folder with ``iter_packed`` (which holds the index as dicts), each in a process of its own.

    python bench/export_memory.py [--rows 1000000] [--part 10000] [--dim 4]

Small vectors, so that the index, not the data, is what grows. Prints peak RSS at N/10 and N rows, and how many bytes each row adds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys, time
from pathlib import Path
folder, case = Path(sys.argv[1]), sys.argv[2]
start = time.perf_counter()
if case == "iter_packed":
    from vitembed.layouts.packed import iter_packed
    rows = sum(1 for _ in iter_packed(folder))
else:
    from vitembed.export import export_vectors
    rows = export_vectors(folder, folder.parent / "v.npy").rows
print(rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter() - start)
"""

def build(folder: Path, rows: int, part: int, dim: int) -> None:
    """Parts written as PackWriter writes them (same header layout), with their index lines."""
    import numpy as np
    from safetensors.numpy import save_file

    from vitembed.layouts.packed_index import append_index, row_entries

    folder.mkdir(parents=True)
    for number, start in enumerate(range(0, rows, part)):
        keys = [f"photos/{i // 1000:05d}/img{i:08d}.jpg" for i in range(start, min(start + part, rows))]
        sources = [f"/data/{k}" for k in keys]
        name = f"part-{number:05d}.safetensors"
        data = np.arange(start * dim, (start + len(keys)) * dim, dtype=np.float32).reshape(len(keys), dim)
        save_file({"embeddings": data}, str(folder / name), metadata={
            "pool": "cls", "hidden_size": str(dim), "layout": "packed", "rows": str(len(keys)),
            "keys": json.dumps(keys), "sources": json.dumps(sources)})
        append_index(folder, row_entries(keys, sources, name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--part", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=4)
    args = parser.parse_args()
    peaks: dict[str, list[int]] = {"iter_packed": [], "export": []}
    sizes = (args.rows // 10, args.rows)  # the growth from N/10 to N rows is what the index costs
    for rows in sizes:
        with tempfile.TemporaryDirectory() as work:
            folder = Path(work) / "emb"
            build(folder, rows, args.part, args.dim)
            print(f"{rows} rows of {args.dim} float32 in parts of {args.part}; index "
                  f"{(folder / 'index.jsonl').stat().st_size / 2**20:.0f} MiB")
            for case in peaks:
                out = subprocess.run([sys.executable, "-c", CHILD, str(folder), case], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{case} failed: {out.stderr[-500:]}")
                done, peak, seconds = out.stdout.split()
                peaks[case].append(int(peak))
                print(f"  {case:12s} {done} rows, peak RSS {int(peak) / 2**20:7.0f} MiB, {float(seconds):.1f} s")
    for case, (small, large) in peaks.items():
        print(f"{case:12s} grows {(large - small) / (sizes[1] - sizes[0]):.0f} bytes per row "
              f"({small / 2**20:.0f} -> {large / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
