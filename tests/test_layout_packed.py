"""The packed layout (``--pack N``; layouts/packed.py, layouts/packed_index.py).

Parts of N rows plus DIR/index.jsonl, equal row for row to one file per image; resume after a
kill (before or after the index was appended), shards sharing one index, failures indexed and
retried, --overwrite, signals part-way, bfloat16 rows, the Python API's rows, --list keys, and
index lines or part files that are damaged, foreign, not regular files or not UTF-8.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from .conftest import jpeg_bytes, photo, run_cli
from .helpers import DEEP, _encoder, _folder, _index, _iter, _summary


def _per_file(out: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(out).as_posix()[: -len(".safetensors")]: load_file(p)["embedding"] for p in sorted(out.rglob("img*.safetensors"))}


def _packed(out: Path) -> dict[str, np.ndarray]:
    from vitembed.layouts.packed import iter_packed

    return {key: emb for key, _, emb in iter_packed(out)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_ckpt):
    """One file per image, the outputs packs must reproduce row for row."""
    root = tmp_path_factory.mktemp("ref")
    src = _folder(root / "in")
    r = run_cli("encode", str(src), "--out", str(root / "out"), "--weights", str(small_ckpt))
    assert r.returncode == 0, r.stderr.decode()
    return src, _per_file(root / "out")


# Writing, resuming and sharding packed jobs ----------------------------------------------------


def test_pack_writes_parts_of_n_rows_and_an_index_equal_to_per_image_files(tmp_path, small_ckpt, reference):
    src, expected = reference
    out = tmp_path / "out"
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--pack", "3", "--batch-size", "2", "--json")
    assert r.returncode == 0, r.stderr.decode()
    parts = sorted(p.name for p in out.glob("part-*"))
    assert parts == ["part-00000.safetensors", "part-00001.safetensors", "part-00002.safetensors"]
    with safe_open(str(out / "part-00000.safetensors"), "numpy") as f:
        assert f.get_tensor("embeddings").shape == (3, 17, 48)
        meta = f.metadata()
    assert meta["layout"] == "packed" and meta["rows"] == "3"
    assert json.loads(meta["keys"]) == ["img00.jpg", "img01.jpg", "img02.jpg"]
    assert json.loads(meta["sources"]) == [str(src / f"img0{i}.jpg") for i in range(3)]
    assert load_file(out / "part-00002.safetensors")["embeddings"].shape == (1, 17, 48)
    index = _index(out)
    assert [(e["key"], e["part"], e["row"], e["status"]) for e in index][:4] == [
        ("img00.jpg", "part-00000.safetensors", 0, "encoded"),
        ("img01.jpg", "part-00000.safetensors", 1, "encoded"),
        ("img02.jpg", "part-00000.safetensors", 2, "encoded"),
        ("img03.jpg", "part-00001.safetensors", 0, "encoded"),
    ]
    lines = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert lines[4] == {"source": str(src / "img04.jpg"), "status": "encoded",
                        "output": str(out / "part-00001.safetensors"), "key": "img04.jpg", "row": 1}
    packed = _packed(out)
    assert packed.keys() == expected.keys() and len(packed) == 7
    for key in expected:  # the same bytes as one file per image
        assert np.array_equal(packed[key], expected[key])


def test_pack_resume_after_a_kill_before_or_after_the_index_was_appended(tmp_path, small_ckpt, reference):
    src, expected = reference
    out = tmp_path / "out"
    args = ("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--pack", "3")
    assert run_cli(*args).returncode == 0
    # Part 1's index lines lost (killed between writing it and appending them): the part indexes itself.
    index = (out / "index.jsonl").read_text().splitlines()
    (out / "index.jsonl").write_text("\n".join(index[:3] + index[6:]) + "\n" + '{"key": "img03.jp')  # and a torn line
    # Part 2 lost although indexed: its rows are encoded again, into a part of a new name.
    (out / "part-00002.safetensors").unlink()
    stamp = (out / "part-00001.safetensors").stat().st_mtime_ns
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr.decode()
    assert _summary(again.stderr).startswith("encoded 1, skipped 6, failed 0")
    assert (out / "part-00001.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-0000{i}.safetensors" for i in (0, 1, 3)]
    packed = _packed(out)
    assert packed.keys() == expected.keys()
    assert all(np.array_equal(packed[k], expected[k]) for k in expected)
    third = run_cli(*args)
    assert _summary(third.stderr).startswith("encoded 0, skipped 7, failed 0")


def test_pack_sigkill_part_way_then_resume(tmp_path):
    src = _folder(tmp_path / "in", good=12)
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "vitembed", "encode", str(src), "--weights", "random", "--batch-size", "2", "--pack", "2"]
    out = tmp_path / "out"
    proc = subprocess.Popen([*base, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("part-*.safetensors"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("part-*.safetensors")))
    assert 2 <= done < 6, "the run was not killed part-way"
    resumed = subprocess.run([*base, "--out", str(out)], env=env, capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert _summary(resumed.stderr).startswith(f"encoded {12 - 2 * done}, skipped {2 * done}")
    reference = subprocess.run([*base, "--out", str(tmp_path / "ref")], env=env, capture_output=True, timeout=600)
    assert reference.returncode == 0
    a, b = _packed(out), _packed(tmp_path / "ref")
    assert len(a) == 12 and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_pack_with_shards_shares_one_index_and_covers_every_input(tmp_path, small_ckpt, reference):
    src, expected = reference
    out = tmp_path / "out"
    for k in (0, 1):
        r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--pack", "2", "--shard", f"{k}/2")
        assert r.returncode == 0, r.stderr.decode()
    names = sorted(p.name for p in out.glob("part-*"))
    assert names and all(n.startswith(("part-0of2-", "part-1of2-")) for n in names)
    assert any(n.startswith("part-0of2-") for n in names) and any(n.startswith("part-1of2-") for n in names)
    packed = _packed(out)
    assert packed.keys() == expected.keys()
    assert all(np.array_equal(packed[k], expected[k]) for k in expected)
    again = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--pack", "2")
    assert _summary(again.stderr).startswith("encoded 0, skipped 7")


def test_pack_failures_are_indexed_and_retried(tmp_path, small_ckpt):
    src = _folder(tmp_path / "in", good=3, bad=True)
    out = tmp_path / "out"
    args = ("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--pack", "10")
    first = run_cli(*args)
    assert first.returncode == 1 and _summary(first.stderr).startswith("encoded 3, skipped 0, failed 1")
    failed = [e for e in _index(out) if e["status"] == "failed"]
    assert failed == [{"key": "broken.jpg", "source": str(src / "broken.jpg"), "part": None, "row": None,
                       "status": "failed", "error_kind": "not-an-image", "error": "cannot identify image format"}]
    (src / "broken.jpg").write_bytes(jpeg_bytes(photo(50, 50, seed=9)))
    second = run_cli(*args)
    assert second.returncode == 0 and _summary(second.stderr).startswith("encoded 1, skipped 3, failed 0")
    assert "broken.jpg" in _packed(out)


def test_pack_overwrite_replaces_parts_and_other_layouts_are_refused(tmp_path, small_ckpt, reference):
    src, _ = reference
    out = tmp_path / "out"
    base = ("encode", str(src), "--out", str(out), "--weights", str(small_ckpt))
    assert run_cli(*base, "--pack", "4").returncode == 0
    mixed = run_cli(*base)  # one file per image into a packed DIR
    assert mixed.returncode == 2 and "layout: 'packed' there, 'files' now" in mixed.stderr.decode()
    other = run_cli(*base, "--pack", "4", "--layer", "1")
    assert other.returncode == 2 and "layer" in other.stderr.decode()
    over = run_cli(*base, "--pack", "4", "--layer", "1", "--overwrite")
    assert over.returncode == 0 and _summary(over.stderr).startswith("encoded 7")
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00002.safetensors", "part-00003.safetensors"]
    with safe_open(str(out / "part-00002.safetensors"), "numpy") as f:
        assert f.metadata()["layer"] == "1"
    npy = run_cli(*base, "--pack", "4", "--format", "npy")
    assert npy.returncode == 2 and "--pack writes safetensors" in npy.stderr.decode()


def test_python_api_packs_and_reports_rows(tmp_path, small_ckpt):
    import vitembed

    src = _folder(tmp_path / "in", good=3)
    seen = []
    summary = vitembed.encode([str(src)], tmp_path / "out", encoder=_encoder(small_ckpt), pack=2, on_result=seen.append)
    assert (summary.encoded, summary.failed) == (3, 0)
    assert [(Path(r.output).name, r.row) for r in seen] == [
        ("part-00000.safetensors", 0), ("part-00000.safetensors", 1), ("part-00001.safetensors", 0)]


@pytest.mark.parametrize("sig, code, words", [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted")])
def test_signal_part_way_through_a_packed_job_keeps_every_computed_row(tmp_path, sig, code, words):
    src, out = _folder(tmp_path / "in", good=10), tmp_path / "out"
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitembed", "encode", str(src), "--out", str(out), "--weights", "random",
         "--batch-size", "1", "--pack", "4"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # also when pytest runs in the background
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("part-*.safetensors")):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr.decode()
    assert f"{words}: the outputs already written are complete; run again to resume" in stderr.decode()
    packed = _packed(out)
    assert 4 <= len(packed) < 10  # the full part, and the rows computed since, written as a last part
    assert _summary(stderr).startswith(f"encoded {len(packed)}, skipped 0, failed 0")
    assert all(e.shape == (197, 768) for e in packed.values())
    again = subprocess.run(
        [sys.executable, "-m", "vitembed", "encode", str(src), "--out", str(out), "--weights", "random", "--pack", "4"],
        env=env, capture_output=True, timeout=600,
    )
    assert again.returncode == 0 and _summary(again.stderr).startswith(f"encoded {10 - len(packed)}, skipped {len(packed)}")


def test_bfloat16_packs_read_back_as_float32_and_inspect_describes_the_first_row(tmp_path, small_ckpt):
    import torch as _torch
    from safetensors.torch import load_file as load_torch

    from vitembed.inspect import inspect_file

    src, out = _folder(tmp_path / "in", good=3), tmp_path / "out"
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--pack", "2", "--save-dtype", "bfloat16")
    assert r.returncode == 0, r.stderr.decode()
    stored = load_torch(out / "part-00000.safetensors")["embeddings"]
    assert stored.dtype == _torch.bfloat16 and stored.shape == (2, 17, 48)
    packed = _packed(out)
    assert packed["img01.jpg"].dtype == np.float32
    assert np.array_equal(packed["img01.jpg"], stored[1].float().numpy())
    info = inspect_file(out / "part-00000.safetensors")
    stats = info["tensors"][0]["stats"]
    assert stats["token0_l2"] == pytest.approx(float(stored[0, 0].float().norm()), rel=1e-6)  # row 0's class token


@pytest.mark.skipif(sys.platform != "linux", reason="file names that are not UTF-8 need a byte-name file system")
def test_pack_with_a_file_name_that_is_not_utf8(tmp_path, small_ckpt):
    src = _folder(tmp_path / "in", good=1)
    photo(20, 20).save(os.fsencode(src) + b"/caf\xe9.png")
    out = tmp_path / "out"
    args = ("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--pack", "4")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr.decode()
    assert _summary(first.stderr).startswith("encoded 2, skipped 0, failed 0")
    assert "caf\\xe9.png" in {e["key"] for e in _index(out)}
    again = run_cli(*args)
    assert again.returncode == 0 and _summary(again.stderr).startswith("encoded 0, skipped 2")


def test_two_writers_into_one_dir_never_share_a_part_name(tmp_path):
    from vitembed.layouts.packed import PackWriter

    a, b = PackWriter(tmp_path, 2, "part-", {"x": "1"}), PackWriter(tmp_path, 2, "part-", {"x": "1"})
    for writer, tag in ((a, "a"), (b, "b")):  # both start at part-00000, as two runs started together do
        writer.add(f"{tag}1", f"{tag}1.jpg", torch.full((3,), 1.0))
        writer.add(f"{tag}2", f"{tag}2.jpg", torch.full((3,), 2.0))
    (_, name_a, err_a, _), (_, name_b, err_b, _) = a.flush(), b.flush()
    assert (name_a, name_b, err_a, err_b) == ("part-00000.safetensors", "part-00001.safetensors", None, None)
    assert sorted(key for key, _, _ in _iter(tmp_path)) == ["a1", "a2", "b1", "b2"]


def test_list_with_pack_prints_index_keys(tmp_path):
    src = _folder(tmp_path / "in", good=2)
    r = run_cli("encode", str(src), "--out", str(tmp_path / "out"), "--list", "--pack", "5")
    assert r.stdout.decode().splitlines() == [f"{src / 'img00.jpg'}\timg00.jpg", f"{src / 'img01.jpg'}\timg01.jpg"]


# The index and the parts, damaged or not what they seem --------------------------------------


def test_unreadable_index_is_a_setup_error(tmp_path, small_ckpt):
    src = _folder(tmp_path / "in", good=1)
    (tmp_path / "out" / "index.jsonl").mkdir(parents=True)
    r = run_cli("encode", str(src), "--out", str(tmp_path / "out"), "--weights", str(small_ckpt), "--pack", "2")
    assert r.returncode == 2 and f"cannot read {tmp_path / 'out' / 'index.jsonl'}" in r.stderr.decode()


def test_index_that_cannot_be_appended_warns_exits_1_and_the_next_run_indexes_the_parts(tmp_path, small_ckpt, monkeypatch):
    import vitembed
    from vitembed.layouts import packed as packs

    src, out = _folder(tmp_path / "in", good=3), tmp_path / "out"
    real = packs.append_index

    def failing(out_dir, entries):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(packs, "append_index", failing)
    summary = vitembed.encode([str(src)], out, encoder=_encoder(small_ckpt), pack=2)
    assert summary.encoded == 3 and summary.log_errors and "cannot append to index.jsonl" in summary.log_errors[0]
    monkeypatch.setattr(packs, "append_index", real)
    assert len(_iter(out)) == 3  # the reader takes the unindexed parts from their own keys
    again = vitembed.encode([str(src)], out, encoder=_encoder(small_ckpt), pack=2)
    assert (again.encoded, again.skipped, again.log_errors) == (0, 3, [])
    assert len(_index(out)) == 3


def test_iter_packed_refuses_what_is_not_a_whole_packed_dir(tmp_path, small_ckpt):
    from vitembed.errors import UsageError

    with pytest.raises(UsageError, match="holds no packed outputs"):
        _iter(tmp_path / "nothing")
    src, out = _folder(tmp_path / "in", good=2), tmp_path / "out"
    assert run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--pack", "2").returncode == 0
    with open(out / "index.jsonl", "a") as f:
        f.write(json.dumps({"key": "img00.jpg", "source": "x", "part": "part-00000.safetensors", "row": 5, "status": "encoded"}) + "\n")
        f.write(json.dumps({"key": "zz", "source": "y", "part": ["a"], "row": 0, "status": "encoded"}) + "\n")
    with pytest.raises(UsageError, match="2 rows are not where it says"):
        _iter(out)
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--pack", "2")
    assert r.returncode == 0 and _summary(r.stderr).startswith("encoded 1, skipped 1"), r.stderr.decode()


def test_index_that_is_a_fifo_is_refused_not_waited_on(tmp_path, small_ckpt):
    src, out = _folder(tmp_path / "in", good=1), tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "index.jsonl")
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--pack", "2")
    assert r.returncode == 2 and "not a regular file" in r.stderr.decode()


def test_bad_index_lines_are_reported_and_their_inputs_redone(tmp_path, small_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"img{i}.jpg").write_bytes(jpeg_bytes(photo(40, 30, seed=i)))
    out = tmp_path / "out"
    args = ("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--pack", "1")
    assert run_cli(*args).returncode == 0
    index = out / "index.jsonl"
    lines = index.read_text().splitlines()
    assert len(lines) == 3
    lines[1] = lines[1].replace('"row": 0', '"row": 1e400')
    lines[2] = DEEP
    index.write_text("\n".join(lines) + "\n")
    r = run_cli(*args)
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "2 line(s) are not valid index entries (line 2, 3)" in err
    # the lines name parts whose keys say which inputs they hold: those are indexed again, not lost
    assert _summary(r.stderr).startswith("encoded 0, skipped 3") or _summary(r.stderr).startswith("encoded 2, skipped 1")


def test_a_fifo_named_like_a_part_file_does_not_hang(tmp_path, small_ckpt):
    from vitembed.layouts.packed import iter_packed

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        photo(40, 30, seed=i).save(src / f"{i}.png")
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "part-00001.safetensors")
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--pack", "2", timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert sorted(key for key, _, _ in iter_packed(out)) == ["0.png", "1.png", "2.png"]


def test_an_index_row_of_true_is_not_a_row(tmp_path, small_ckpt):
    from vitembed.errors import UsageError
    from vitembed.layouts.packed import iter_packed

    src = tmp_path / "in"
    src.mkdir()
    photo(40, 30).save(src / "a.png")
    out = tmp_path / "out"
    args = ("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--pack", "2")
    assert run_cli(*args).returncode == 0
    index = out / "index.jsonl"
    index.write_text(index.read_text().replace('"row": 0', '"row": true'))
    with pytest.raises(UsageError, match="rows are not where it says"):
        list(iter_packed(out))
    assert _summary(run_cli(*args).stderr).startswith("encoded 1, skipped 0")


def test_an_index_line_naming_a_part_outside_dir_is_not_done(tmp_path, small_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    photo(40, 30).save(src / "a.png")
    other, out = tmp_path / "other", tmp_path / "out"
    args = ("--weights", str(small_ckpt), "--pack", "2")
    assert run_cli("encode", str(src), "--out", str(other), *args).returncode == 0
    (out).mkdir()
    settings = json.loads((other / "vitembed.json").read_text())
    (out / "vitembed.json").write_text(json.dumps(settings))
    (out / "index.jsonl").write_text(json.dumps({"key": "a.png", "source": "x", "part": "../other/part-00000.safetensors",
                                                 "row": 0, "status": "encoded"}) + "\n")
    r = run_cli("encode", str(src), "--out", str(out), *args)
    assert _summary(r.stderr).startswith("encoded 1, skipped 0"), r.stderr.decode()
