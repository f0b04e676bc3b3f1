"""Tables of paths (--from-table, --column) in parquet, CSV and JSON lines, and --relative-to: one
file gets one key however it was named, so a folder walk, stdin and a table resume each other."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pytest

import vitembed
from vitembed.errors import UsageError
from vitembed.inputs import plan_jobs
from vitembed.tables import read_table_paths

from .conftest import jpeg_bytes, photo, run_cli
from .helpers import _summary

pq = pytest.importorskip("pyarrow.parquet", reason="parquet tables need pyarrow (pip install 'vitembed[parquet]')")


def _write_table(path: Path, column: str, values: list, other: str = "caption") -> Path:
    fmt = path.suffix
    if fmt == ".csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([other, column])
            writer.writerows([["a, \"quoted\" caption", v] for v in values])
    elif fmt == ".jsonl":
        path.write_text("".join(json.dumps({other: "x", column: v}) + "\n" for v in values))
    else:
        import pyarrow as pa

        pq.write_table(pa.table({other: ["x"] * len(values), column: values}), path, row_group_size=1000)
    return path


def _images(root: Path, count: int = 4) -> list[Path]:
    (root / "sub").mkdir(parents=True)
    paths = [root / ("sub" if i % 2 else "") / f"im{i}.jpg" for i in range(count)]
    for i, p in enumerate(paths):
        p.write_bytes(jpeg_bytes(photo(50 + i, 40, seed=i)))
    return paths


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_table_in_each_format_gives_its_column_in_row_order(tmp_path, suffix):
    values = ["b.jpg", "dir/a.jpg", "", "/abs/c.jpg", "ü ñ.jpg"]
    table = _write_table(tmp_path / f"t{suffix}", "file", values)
    assert list(read_table_paths(str(table), "file")) == ["b.jpg", "dir/a.jpg", "/abs/c.jpg", "ü ñ.jpg"]
    with pytest.raises(UsageError, match=r"no column 'path' \(columns: caption, file\); name one with --column"):
        read_table_paths(str(table))


def test_bad_tables_are_usage_errors_naming_the_file(tmp_path):
    with pytest.raises(UsageError, match=r"unknown table format '\.txt'"):
        read_table_paths(str(tmp_path / "t.txt"))
    with pytest.raises(UsageError, match="No such file"):
        read_table_paths(str(tmp_path / "missing.csv"))
    (tmp_path / "bad.jsonl").write_text('{"path": "a.jpg"}\n{oops\n')
    with pytest.raises(UsageError, match=r"bad\.jsonl'?: line 2: not valid JSON"):
        list(read_table_paths(str(tmp_path / "bad.jsonl")))
    (tmp_path / "num.jsonl").write_text('{"path": 3}\n')
    with pytest.raises(UsageError, match="row 1: expected a path \\(text\\), got int 3"):
        list(read_table_paths(str(tmp_path / "num.jsonl")))
    (tmp_path / "wide.csv").write_text("path\n" + "x" * 200_000 + "\n")
    with pytest.raises(UsageError, match=r"wide\.csv'?: row 1: not readable as CSV \(field larger than field limit"):
        list(read_table_paths(str(tmp_path / "wide.csv")))
    (tmp_path / "lone.jsonl").write_text('{"path": "\\ud800.jpg"}\n')
    with pytest.raises(UsageError, match="row 1: .* is not a valid path \\(a lone UTF-16 surrogate\\)"):
        list(read_table_paths(str(tmp_path / "lone.jsonl")))
    (tmp_path / "deep.jsonl").write_text('{"path": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(UsageError, match="line 1: JSON nested too deeply"):
        list(read_table_paths(str(tmp_path / "deep.jsonl")))
    (tmp_path / "bigint.jsonl").write_text('{"path": "a.jpg", "n": ' + "1" * 5000 + "}\n")  # over Python's 4300 digits
    with pytest.raises(UsageError, match="line 1: not readable as JSON .*4300 digits"):
        list(read_table_paths(str(tmp_path / "bigint.jsonl")))
    (tmp_path / "bom.csv").write_text("\ufeffpath,label\na.jpg,1\n", encoding="utf-8")  # as Excel writes it
    (tmp_path / "bom.jsonl").write_text('\ufeff{"path": "a.jpg"}\n', encoding="utf-8")
    assert list(read_table_paths(str(tmp_path / "bom.csv"))) == list(read_table_paths(str(tmp_path / "bom.jsonl"))) == ["a.jpg"]
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(UsageError, match="not a readable parquet file"):
        read_table_paths(str(tmp_path / "fake.parquet"))
    result = run_cli("encode", "--from-table", str(tmp_path / "num.jsonl"), "--column", "nope", "--out", str(tmp_path / "o"),
                     "--weights", "random")
    assert result.returncode == 2 and b"no column 'nope'" in result.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_table_of_100000_rows_is_read_in_batches(tmp_path, suffix):
    rows = 100_000
    table = _write_table(tmp_path / f"t{suffix}", "path", [f"images/{i:07d}/photo_{i}.jpg" for i in range(rows)])
    tracemalloc.start()
    count = sum(1 for _ in read_table_paths(str(table)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == rows
    assert peak < 12 * 2**20, f"reading {rows} rows peaked at {peak / 2**20:.1f} MiB: the table was held at once"


def test_planning_100000_rows_costs_a_bounded_amount_per_row(tmp_path):
    rows = 100_000
    table = _write_table(tmp_path / "t.csv", "path", [f"images/{i:07d}/photo_{i}.jpg" for i in range(rows)])
    tracemalloc.start()
    plan = plan_jobs([], tmp_path / "out", "safetensors", read_table_paths(str(table)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(plan.jobs) == rows and plan.jobs[-1].key == f"images/{rows - 1:07d}/photo_{rows - 1}.jpg"
    assert peak / rows < 2048, f"{peak / rows:.0f} bytes per planned row"


def test_relative_to_gives_one_key_whichever_way_a_file_is_named(tmp_path, small_ckpt, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = _images(tmp_path / "data" / "images")
    keys = sorted(p.relative_to(tmp_path / "data").as_posix() for p in paths)
    walk = plan_jobs(["data/images"], "out", "safetensors", relative_to="data")
    stdin = plan_jobs(["-"], "out", "safetensors", [str(p.relative_to(tmp_path)) for p in paths], relative_to="data")
    absolute = plan_jobs([], "out", "safetensors", [str(p) for p in paths], relative_to=str(tmp_path / "data"))
    assert sorted(j.key for j in walk.jobs) == sorted(j.key for j in stdin.jobs) == sorted(j.key for j in absolute.jobs) == keys
    outside = plan_jobs([str(tmp_path / "data" / "images" / "im0.jpg")], "out", "safetensors", relative_to="data/images/sub")
    assert outside.jobs[0].key == "_root" + str(tmp_path / "data" / "images" / "im0.jpg")  # as stdin places such paths
    (tmp_path / "data" / "link").symlink_to(tmp_path / "data" / "images")  # another spelling of the same files
    linked = plan_jobs(["data/link"], "out", "safetensors", relative_to="data")
    assert sorted(j.key for j in linked.jobs) == keys
    (tmp_path / "base").symlink_to(tmp_path / "data")
    assert sorted(j.key for j in plan_jobs(["data/images"], "out", "safetensors", relative_to="base").jobs) == keys
    nul = plan_jobs([], "out", "safetensors", ["a\0b.jpg"])
    assert nul.jobs == [] and [(p.kind, p.path) for p in nul.problems] == [("bad-name", "a\\0b.jpg")]
    for named in (["a\0b.jpg"], ["a\0b.tar"]):  # these reached realpath and stat, which raise ValueError
        nul = plan_jobs(named, "out", "safetensors", named, relative_to="data")
        assert nul.jobs == [] and [p.kind for p in nul.problems] == ["bad-name", "bad-name"]
    with pytest.raises(UsageError, match="--relative-to nowhere: no such folder"):
        plan_jobs([], "out", "safetensors", relative_to="nowhere")
    # Through the CLI: a folder walk, then find | encode -, then a table: each resumes the one before.
    base = ("--out", "emb", "--weights", str(small_ckpt), "--relative-to", "data")
    first = run_cli("encode", "data/images", *base, cwd=tmp_path)
    assert _summary(first.stderr).startswith("encoded 4, skipped 0, failed 0"), first.stderr.decode()
    listed = "".join(f"{p.relative_to(tmp_path)}\0" for p in paths).encode()
    second = run_cli("encode", "-0", "-", *base, input=listed, cwd=tmp_path)
    assert _summary(second.stderr).startswith("encoded 0, skipped 4, failed 0"), second.stderr.decode()
    _write_table(tmp_path / "t.parquet", "path", [str(p) for p in paths])
    third = run_cli("encode", "--from-table", "t.parquet", *base, cwd=tmp_path)
    assert _summary(third.stderr).startswith("encoded 0, skipped 4, failed 0"), third.stderr.decode()
    assert sorted(vitembed.load(tmp_path / "emb").keys) == keys
    assert sorted(os.path.relpath(p, tmp_path / "emb") for p in (tmp_path / "emb").rglob("*.safetensors")) == [
        k + ".safetensors" for k in keys]


def test_table_rows_resolve_as_stdin_paths_do(tmp_path, small_ckpt):
    paths = _images(tmp_path / "images", 2)
    _write_table(tmp_path / "t.jsonl", "path", [str(p.relative_to(tmp_path)) for p in paths])
    result = run_cli("encode", "--from-table", "t.jsonl", "--out", "emb", "--weights", str(small_ckpt), cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert sorted(vitembed.load(tmp_path / "emb").keys) == ["images/im0.jpg", "images/sub/im1.jpg"]
    nothing = run_cli("encode", "--out", "emb", "--weights", str(small_ckpt), cwd=tmp_path)
    assert nothing.returncode == 2 and b"no inputs" in nothing.stderr
