"""Issue 5: packed outputs (--pack) with resume and shards, --dtype auto, --compile's fallback,
oneDNN-packed linears, and the background write stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from .conftest import jpeg_bytes, photo, run_cli


def _folder(root: Path, good: int = 7, bad: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        (root / f"img{i:02d}.jpg").write_bytes(jpeg_bytes(photo(60 + i, 40 + i, seed=i)))
    if bad:
        (root / "broken.jpg").write_text("not a jpeg")
    return root


def _summary(stderr: bytes) -> str:
    return [line for line in stderr.decode().splitlines() if line.startswith("encoded ")][-1]


def _index(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


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


def test_unreadable_index_is_a_setup_error(tmp_path, small_ckpt):
    src = _folder(tmp_path / "in", good=1)
    (tmp_path / "out" / "index.jsonl").mkdir(parents=True)
    r = run_cli("encode", str(src), "--out", str(tmp_path / "out"), "--weights", str(small_ckpt), "--pack", "2")
    assert r.returncode == 2 and f"cannot read {tmp_path / 'out' / 'index.jsonl'}" in r.stderr.decode()


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_warns_without_cpu_support(tmp_path, small_ckpt):
    from vitembed.runtime import _cpu_has_fast

    src = _folder(tmp_path / "in", good=2)
    auto = run_cli("encode", str(src), "--out", str(tmp_path / "auto"), "--weights", str(small_ckpt))
    assert auto.returncode == 0
    with safe_open(str(tmp_path / "auto" / "img00.jpg.safetensors"), "numpy") as f:
        assert f.metadata()["dtype"] == "float32"
    bf16 = run_cli("encode", str(src), "--out", str(tmp_path / "bf16"), "--weights", str(small_ckpt), "--dtype", "bfloat16")
    assert bf16.returncode == 0
    warned = "warning: --dtype bfloat16 on a CPU without bfloat16 matrix instructions" in bf16.stderr.decode()
    assert warned == (not _cpu_has_fast(torch.bfloat16))
    a = load_file(tmp_path / "auto" / "img00.jpg.safetensors")["embedding"]
    b = load_file(tmp_path / "bf16" / "img00.jpg.safetensors")["embedding"]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.99 and not np.array_equal(a, b)


def _encoder(small_ckpt, **options):
    from vitembed.catalog import get_model_spec
    from vitembed.encoder import Encoder
    from vitembed.weights import resolve_weights

    weights = resolve_weights(get_model_spec("vit-base-patch16-224-in21k"), str(small_ckpt), progress=False)
    return Encoder(weights=weights, device="cpu", **options)


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, small_ckpt):
    calls = []

    def broken_compile(model, **kwargs):
        def run(x, layers):
            calls.append(x.shape[0])
            raise RuntimeError("no compiler here\nmore lines")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    eager = _encoder(small_ckpt)(pixels)
    encoder = _encoder(small_ckpt, compile=True)
    assert encoder.compiled
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = encoder(pixels)
        second = encoder(pixels)
    messages = [str(w.message) for w in caught]
    assert messages == ["--compile: torch.compile failed (RuntimeError: no compiler here); running eager"]
    assert calls == [3] and not encoder.compiled and encoder.packed
    assert torch.equal(first, eager) and torch.equal(second, eager)


def test_compiled_model_gets_a_padded_last_batch_and_returns_its_rows(monkeypatch, small_ckpt):
    shapes = []

    def fake_compile(model, **kwargs):
        def run(x, layers):
            shapes.append(x.shape[0])
            return model(x, layers=layers)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    pixels = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    encoder = _encoder(small_ckpt, compile=True)
    full, short = encoder(pixels), encoder(pixels[:2])
    assert shapes == [5, 5]  # the short batch ran at the first batch's size: no recompilation
    assert short.shape == (2, 17, 48) and torch.equal(short, full[:2])


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu"])
def test_packed_linears_match_the_plain_model_and_do_not_depend_on_the_batch(act):
    import copy

    from vitembed.config import ViTConfig
    from vitembed.model import VisionTransformer
    from vitembed.runtime import PackedLinear, pack_for_cpu

    cfg = ViTConfig(hidden_size=64, depth=2, num_heads=4, mlp_dim=128, patch_size=8, image_size=32, act=act)
    plain = VisionTransformer(cfg).init_weights(seed=3).eval()
    packed = copy.deepcopy(plain)
    if not pack_for_cpu(packed):
        pytest.skip("oneDNN packed linears are not available on this CPU")
    assert isinstance(packed.blocks[0].mlp.fc1, PackedLinear)
    assert isinstance(packed.blocks[0].mlp.act, torch.nn.Identity) == (act != "quick_gelu")
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = plain(x)["last"], packed(x)["last"]
        assert (a - b).abs().max().item() < 1e-4
        assert torch.equal(packed(x[:2])["last"], b[:2])
    assert not pack_for_cpu(VisionTransformer(cfg).to(torch.bfloat16))  # float32 only


def test_an_error_in_the_write_stage_ends_the_run_instead_of_hanging(tmp_path, small_ckpt):
    import vitembed

    src = _folder(tmp_path / "in", good=5)
    encoder = _encoder(small_ckpt)
    seen = []

    def on_result(result):
        seen.append(result.source)
        if len(seen) == 2:
            raise BrokenPipeError("stdout closed")

    with pytest.raises(BrokenPipeError):
        vitembed.encode([str(src)], tmp_path / "out", encoder=encoder, batch_size=1, on_result=on_result)
    assert len(seen) == 2


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


def test_encode_refuses_encoder_options_next_to_an_encoder(tmp_path, small_ckpt):
    import vitembed
    from vitembed.errors import UsageError

    with pytest.raises(UsageError, match=r"unknown option\(s\) bogus, layer"):
        vitembed.encode([str(tmp_path)], tmp_path / "out", encoder=_encoder(small_ckpt), layer="2", bogus=1)


def test_compile_is_recorded_but_does_not_block_resume(tmp_path, small_ckpt, monkeypatch):
    src = _folder(tmp_path / "in", good=2)
    out = tmp_path / "out"
    assert run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt)).returncode == 0
    with safe_open(str(out / "img00.jpg.safetensors"), "numpy") as f:
        assert f.metadata()["compile"] == "false"
    (src / "img09.jpg").write_bytes(jpeg_bytes(photo(30, 30, seed=5)))
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--compile")
    assert r.returncode == 0, r.stderr.decode()
    assert _summary(r.stderr).startswith("encoded 1, skipped 2")
    with safe_open(str(out / "img09.jpg.safetensors"), "numpy") as f:
        assert f.metadata()["compile"] == "true"
    assert "warning:" not in r.stderr.decode().replace("warning: --weights random", "")


# Regression tests for what a breaking pass found in --pack and the write stage.


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


def _iter(out):
    from vitembed.layouts.packed import iter_packed

    return list(iter_packed(out))


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


def test_resuming_a_stopped_overwrite_redoes_only_what_is_left(tmp_path, small_ckpt):
    src, out = _folder(tmp_path / "in", good=6), tmp_path / "out"
    (src / "img03b.jpg").write_text("not a jpeg")  # sorts in the middle: --fail-fast stops there
    base = ("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--pack", "2", "--batch-size", "1")
    assert run_cli(*base).returncode == 1
    stopped = run_cli(*base, "--layer", "1", "--overwrite", "--fail-fast")
    assert stopped.returncode == 1 and _summary(stopped.stderr).startswith("encoded 4, skipped 0, failed 1")
    lines = len(_index(out))
    resumed = run_cli(*base, "--layer", "1")
    assert resumed.returncode == 1, resumed.stderr.decode()
    assert _summary(resumed.stderr).startswith("encoded 2, skipped 4, failed 1")
    assert len(_index(out)) == lines + 3  # two rows and one failure: nothing re-indexed, nothing redone
    with safe_open(str(out / sorted(p.name for p in out.glob("part-*"))[0]), "numpy") as f:
        assert f.metadata()["layer"] == "1"  # the old parts were removed at the end


def test_overwrite_whose_writes_fail_keeps_the_dir_marked_unfinished(tmp_path, small_ckpt, monkeypatch):
    import vitembed
    from vitembed.layouts import files
    from vitembed.outdir import read_dir_state

    src, out = _folder(tmp_path / "in", good=2), tmp_path / "out"
    vitembed.encode([str(src)], out, encoder=_encoder(small_ckpt))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "write_embedding", full)
    summary = vitembed.encode([str(src)], out, encoder=_encoder(small_ckpt, layer="1"), overwrite=True)
    assert (summary.encoded, summary.failed, summary.write_failed) == (0, 2, 2)
    assert read_dir_state(out).overwrite_started is not None  # a plain re-run may still finish it


@pytest.mark.parametrize("first, second", [(("--pack", "3"), ()), ((), ("--pack", "3"))])
def test_layouts_do_not_mix_even_when_the_settings_file_is_lost(tmp_path, small_ckpt, first, second):
    src, out = _folder(tmp_path / "in", good=2), tmp_path / "out"
    assert run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), *first).returncode == 0
    (out / "vitembed.json").unlink()
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), *second)
    assert r.returncode == 2 and "layout" in r.stderr.decode() and "made with other settings" in r.stderr.decode()


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


def test_closed_stdout_exits_141_and_keeps_the_rows(tmp_path, small_ckpt):
    src, out = _folder(tmp_path / "in", good=6), tmp_path / "out"
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitembed", "encode", str(src), "--out", str(out), "--weights", str(small_ckpt),
         "--pack", "4", "--batch-size", "1", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    proc.wait(timeout=300)
    assert proc.returncode == 141, proc.stderr.read().decode()
    assert 4 <= len(_iter(out)) <= 6


def test_float16_overflow_is_reported(tmp_path):
    from safetensors.torch import load_file as load_torch, save_file

    from .conftest import save_vit

    ckpt = save_vit(tmp_path / "ckpt")
    weights = load_torch(ckpt / "model.safetensors")
    weights["layernorm.weight"] = weights["layernorm.weight"] * 1e6  # outputs far beyond float16's 65504
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    src = _folder(tmp_path / "in", good=2)
    r = run_cli("encode", str(src), "--out", str(tmp_path / "out"), "--weights", str(ckpt), "--save-dtype", "float16")
    assert r.returncode == 0
    assert "warning: 2 embeddings hold Inf or NaN values (--save-dtype float16 overflow?" in r.stderr.decode()


def test_list_with_pack_prints_index_keys(tmp_path):
    src = _folder(tmp_path / "in", good=2)
    r = run_cli("encode", str(src), "--out", str(tmp_path / "out"), "--list", "--pack", "5")
    assert r.stdout.decode().splitlines() == [f"{src / 'img00.jpg'}\timg00.jpg", f"{src / 'img01.jpg'}\timg01.jpg"]


def test_ctrl_c_while_compiling_stays_ctrl_c(monkeypatch, small_ckpt):
    def compile_interrupted(model, **kwargs):
        def run(x, layers):
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as e:
                raise RuntimeError("backend compiler failed") from e
        return run

    monkeypatch.setattr(torch, "compile", compile_interrupted)
    encoder = _encoder(small_ckpt, compile=True)
    with pytest.raises(KeyboardInterrupt):
        encoder(np.zeros((1, 32, 32, 3), dtype=np.uint8))


def test_model_stage_splits_batches_across_threads_with_the_same_bits(small_ckpt, monkeypatch):
    from vitembed.inputs import Job
    from vitembed.stages import model_stage

    encoder = _encoder(small_ckpt)
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
    chunk = [(Job(f"{i}.jpg", f"{i}.jpg", Path(f"{i}")), img) for i, img in enumerate(images)]
    whole = encoder(np.stack(images))
    calls = []
    real = type(encoder).__call__
    monkeypatch.setattr(type(encoder), "__call__", lambda self, px: calls.append(len(px)) or real(self, px))
    (got_chunk, got), = list(model_stage([chunk], encoder, workers=2))
    assert got_chunk is chunk and sorted(calls) == [2, 3] and torch.equal(got, whole)
    threads = torch.get_num_threads()
    assert encoder.thread_layout() == ((2, threads // 2) if threads >= 2 else (1, threads))
