"""Batch jobs: resume, refusing to mix settings, failures.jsonl, --fail-fast, --list, --shard,
determinism, and a SIGKILL part-way through a run."""

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
from safetensors import safe_open

from .conftest import jpeg_bytes, photo, run_cli
from .helpers import _summary


def _folder(root: Path, good: int = 6, bad: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        (sub / f"img{i:02d}.jpg").write_bytes(jpeg_bytes(photo(64 + i, 48, seed=i)))
    if bad:
        (root / "a" / "broken.jpg").write_text("not a jpeg")
    return root


def _outputs(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*.safetensors"))
        if not p.name.endswith(".tmp")
    }


def test_rerun_skips_finished_outputs_and_overwrite_redoes_them(tmp_path, small_ckpt):
    src, out = _folder(tmp_path / "in"), tmp_path / "out"
    args = ("encode", str(src), "--out", str(out), "--weights", str(small_ckpt))
    first = run_cli(*args)
    assert first.returncode == 1 and _summary(first.stderr).startswith("encoded 6, skipped 0, failed 1")
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = run_cli(*args)
    assert again.returncode == 1 and _summary(again.stderr).startswith("encoded 0, skipped 6, failed 1")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps
    over = run_cli(*args, "--overwrite")
    assert _summary(over.stderr).startswith("encoded 6, skipped 0, failed 1")
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["kind"] for f in failures] == ["not-an-image"] * 3
    assert all(f["path"] == str(src / "a" / "broken.jpg") and f["message"] == "cannot identify image format" for f in failures)


def test_incomplete_output_is_encoded_again(tmp_path, small_ckpt):
    src, out = _folder(tmp_path / "in", bad=False), tmp_path / "out"
    args = ("encode", str(src), "--out", str(out), "--weights", str(small_ckpt))
    assert run_cli(*args).returncode == 0
    victim = out / "a" / "img01.jpg.safetensors"
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])
    r = run_cli(*args)
    assert r.returncode == 0 and _summary(r.stderr).startswith("encoded 1, skipped 5, failed 0")
    assert victim.read_bytes() == whole


def test_other_settings_are_refused_not_mixed(tmp_path, small_ckpt):
    src, out = _folder(tmp_path / "in", good=2, bad=False), tmp_path / "out"
    assert run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt)).returncode == 0
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--layer", "2")
    assert r.returncode == 2
    assert "holds outputs made with other settings (layer: 'last' there, '2' now)" in r.stderr.decode()
    # Without the settings file, the outputs themselves are checked.
    (out / "vitembed.json").unlink()
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--layer", "2")
    assert r.returncode == 2 and "was made with other settings (layer: 'last' there, '2' now)" in r.stderr.decode()
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--layer", "2", "--overwrite")
    assert r.returncode == 0
    with safe_open(str(out / "a" / "img01.jpg.safetensors"), "numpy") as f:
        assert f.metadata()["layer"] == "2"


def test_fail_fast_stops_at_the_first_failure(tmp_path, small_ckpt):
    src = _folder(tmp_path / "in")  # a/broken.jpg sorts first
    r = run_cli("encode", str(src), "--out", str(tmp_path / "out"), "--weights", str(small_ckpt), "--fail-fast", "--batch-size", "1")
    assert r.returncode == 1
    assert "stopped at the first failure (--fail-fast)" in r.stderr.decode()
    assert _summary(r.stderr).startswith("encoded 0, skipped 0, failed 1")


def test_list_prints_the_plan_and_writes_nothing(tmp_path):
    src, out = _folder(tmp_path / "in", good=3), tmp_path / "out"
    r = run_cli("encode", str(src), "--out", str(out), "--list", "--weights", "/not/needed")
    assert r.returncode == 0, r.stderr.decode()
    lines = [line.split("\t") for line in r.stdout.decode().splitlines()]
    assert lines[0] == [str(src / "a" / "broken.jpg"), str(out / "a" / "broken.jpg.safetensors")]
    assert len(lines) == 4 and not out.exists()
    as_json = [json.loads(line) for line in run_cli("encode", str(src), "--out", str(out), "--list", "--json").stdout.decode().splitlines()]
    assert [(d["source"], d["output"]) for d in as_json] == [tuple(pair) for pair in lines]


def test_two_shards_cover_the_folder_exactly_once(tmp_path, small_ckpt):
    src = _folder(tmp_path / "in", good=12, bad=False)
    plans = []
    for k in (0, 1):
        r = run_cli("encode", str(src), "--out", str(tmp_path / "out"), "--list", "--shard", f"{k}/2")
        plans.append({line.split("\t")[0] for line in r.stdout.decode().splitlines()})
    assert plans[0] and plans[1] and not plans[0] & plans[1]
    assert plans[0] | plans[1] == {str(p) for p in src.rglob("*.jpg")}
    for k in (0, 1):
        assert run_cli("encode", str(src), "--out", str(tmp_path / "out"), "--weights", str(small_ckpt), "--shard", f"{k}/2").returncode == 0
    whole = run_cli("encode", str(src), "--out", str(tmp_path / "whole"), "--weights", str(small_ckpt))
    assert whole.returncode == 0
    assert _outputs(tmp_path / "out") == _outputs(tmp_path / "whole")
    bad = run_cli("encode", str(src), "--out", str(tmp_path / "o"), "--shard", "2/2")
    assert bad.returncode == 2 and "0 <= K < N" in bad.stderr.decode()


def test_outputs_are_byte_identical_whatever_the_batch_size_or_order(tmp_path, small_ckpt):
    src = _folder(tmp_path / "in", good=7, bad=False)
    files = sorted(str(p.relative_to(tmp_path)) for p in src.rglob("*.jpg"))
    runs = []
    for name, batch, order in (("b1", "1", files), ("b5", "5", files[::-1]), ("b32", "32", files)):
        r = run_cli("encode", "-", "--out", name, "--weights", str(small_ckpt), "--batch-size", batch,
                    input="\n".join(order).encode(), cwd=tmp_path)
        assert r.returncode == 0, r.stderr.decode()
        runs.append(_outputs(tmp_path / name))
    assert len(runs[0]) == 7 and runs[0] == runs[1] == runs[2]


def test_sigkill_part_way_then_resume_equals_an_uninterrupted_run(tmp_path):
    src = _folder(tmp_path / "in", good=16)
    (src / "b" / "empty.jpg").write_bytes(b"")
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "vitembed", "encode", str(src), "--weights", "random", "--batch-size", "2"]

    reference = subprocess.run([*base, "--out", str(tmp_path / "ref")], env=env, capture_output=True, timeout=600)
    assert reference.returncode == 1, reference.stderr.decode()
    expected = _outputs(tmp_path / "ref")
    assert len(expected) == 16

    out = tmp_path / "out"
    proc = subprocess.Popen([*base, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.rglob("*.safetensors"))) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    present = _outputs(out)
    assert 4 <= len(present) < 16, "the run was not killed part-way"
    for rel, data in present.items():
        with safe_open(str(out / rel), "numpy") as f:  # every file present is whole
            assert f.get_tensor("embedding").shape == (197, 768)
        assert data == expected[rel]
    stamps = {rel: (out / rel).stat().st_mtime_ns for rel in present}

    resumed = subprocess.run([*base, "--out", str(out)], env=env, capture_output=True, timeout=600)
    assert resumed.returncode == 1
    assert _summary(resumed.stderr).startswith(f"encoded {16 - len(present)}, skipped {len(present)}, failed 2")
    assert {rel: (out / rel).stat().st_mtime_ns for rel in present} == stamps  # nothing encoded twice
    assert _outputs(out) == expected


def test_same_weights_through_another_path_resume_the_same_dir(tmp_path, small_ckpt):
    src, out = _folder(tmp_path / "in", good=2, bad=False), tmp_path / "out"
    assert run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt)).returncode == 0
    link = tmp_path / "same-weights"
    os.symlink(small_ckpt, link)
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(link))
    assert r.returncode == 0 and _summary(r.stderr).startswith("encoded 0, skipped 2")


def test_outputs_get_the_usual_permissions(tmp_path, small_ckpt):
    src, out = _folder(tmp_path / "in", good=1, bad=False), tmp_path / "out"
    r = subprocess.run(
        ["bash", "-c", f"umask 022 && {sys.executable} -m vitembed encode {src} --out {out} --weights {small_ckpt}"],
        capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stderr.decode()
    for path in [*out.rglob("*.safetensors"), out / "vitembed.json"]:
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path


def test_another_format_in_the_same_dir_is_refused(tmp_path, small_ckpt):
    src, out = _folder(tmp_path / "in", good=1, bad=False), tmp_path / "out"
    assert run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt)).returncode == 0
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--format", "npy")
    assert r.returncode == 2 and "format: 'safetensors' there, 'npy' now" in r.stderr.decode()


def test_ctrl_c_exits_130_with_the_counts_and_whole_outputs(tmp_path):
    src, out = _folder(tmp_path / "in", good=10, bad=False), tmp_path / "out"
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitembed", "encode", str(src), "--out", str(out), "--weights", "random", "--batch-size", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # also when pytest runs in the background
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.rglob("*.safetensors")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr.decode()
    assert "interrupted: the outputs already written are complete; run again to resume" in stderr.decode()
    done = _outputs(out)
    assert 1 <= len(done) < 10
    assert _summary(stderr).startswith(f"encoded {len(done)}, skipped 0, failed 0")
    for rel in done:
        with safe_open(str(out / rel), "numpy") as f:
            assert f.get_tensor("embedding").shape == (197, 768)


def test_output_names_too_long_are_shortened_and_long_legal_names_kept(tmp_path, small_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    photo(20, 20).save(src / "a.png")
    photo(20, 20, seed=1).save(src / ("x" * 247 + ".png"))  # its output name would be 263 bytes
    photo(20, 20, seed=2).save(src / ("y" * 235 + ".png"))  # its output name is 251 bytes: legal
    for expected in ("encoded", "skipped"):  # and the same on a re-run
        r = run_cli("encode", str(src), "--out", str(tmp_path / "o"), "--weights", str(small_ckpt), "--json")
        assert r.returncode == 0, r.stderr.decode()
        status = {json.loads(line)["source"].split("/")[-1][:1]: json.loads(line) for line in r.stdout.decode().splitlines()}
        assert {s["status"] for s in status.values()} == {expected}
        assert Path(status["x"]["output"]).name == "x" * 230 + "~" + Path(status["x"]["output"]).name[231:]
    assert (tmp_path / "o" / ("y" * 235 + ".png.safetensors")).is_file()
    assert len([p for p in (tmp_path / "o").glob("x*~*.safetensors")]) == 1


def test_unwritable_failure_log_does_not_stop_the_job(tmp_path, small_ckpt):
    src, out = _folder(tmp_path / "in", good=3), tmp_path / "out"
    (out / "failures.jsonl").mkdir(parents=True)
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt))
    assert r.returncode == 1
    assert "warning: cannot append to failures.jsonl" in r.stderr.decode()
    assert _summary(r.stderr).startswith("encoded 3, skipped 0, failed 1")


def test_settings_file_that_is_a_folder_is_a_setup_error(tmp_path, small_ckpt):
    src, out = _folder(tmp_path / "in", good=1, bad=False), tmp_path / "out"
    (out / "vitembed.json").mkdir(parents=True)
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt))
    assert r.returncode == 2 and f"cannot read {out / 'vitembed.json'}" in r.stderr.decode()


def test_interrupted_overwrite_is_finished_by_a_plain_rerun_npy(tmp_path, small_ckpt):
    src, out = _folder(tmp_path / "in", good=4), tmp_path / "out"
    args = ("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--format", "npy")
    assert run_cli(*args).returncode == 1  # layer last everywhere
    # An --overwrite to layer 1 that stops at once (a/broken.jpg comes first): old npy files remain.
    stopped = run_cli(*args, "--layer", "1", "--overwrite", "--fail-fast")
    assert _summary(stopped.stderr).startswith("encoded 0")
    resumed = run_cli(*args, "--layer", "1")
    assert _summary(resumed.stderr).startswith("encoded 4, skipped 0, failed 1"), resumed.stderr.decode()
    fresh = run_cli("encode", str(src), "--out", str(tmp_path / "fresh"), "--weights", str(small_ckpt), "--format", "npy", "--layer", "1")
    assert fresh.returncode == 1
    for p in (tmp_path / "fresh").rglob("*.npy"):
        assert np.array_equal(np.load(p), np.load(out / p.relative_to(tmp_path / "fresh")))
    assert json.loads((out / "vitembed.json").read_text())["overwrite_started"] is None
    again = run_cli(*args, "--layer", "1")
    assert _summary(again.stderr).startswith("encoded 0, skipped 4")


@pytest.mark.parametrize("damage", ["delete", "garble"])
def test_lost_settings_file_never_lets_settings_mix(tmp_path, small_ckpt, damage):
    src = _folder(tmp_path / "in", good=4, bad=False)
    messages = {"npy": "holds npy outputs but no readable vitembed.json", "safetensors": "was made with other settings"}
    for fmt, message in messages.items():
        out = tmp_path / f"out-{fmt}"
        args = ("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--format", fmt)
        assert run_cli(*args).returncode == 0
        if damage == "delete":
            (out / "vitembed.json").unlink()
        else:  # a garbled settings file is itself a setup error that names it
            (out / "vitembed.json").write_text('{"trunc')
            message = "vitembed.json: not valid JSON"
        victim = next(iter(sorted(out.rglob(f"*.{fmt}"))))
        victim.unlink()  # one output missing: it must not be written with the new settings
        r = run_cli(*args, "--layer", "1")
        assert r.returncode == 2 and message in r.stderr.decode(), r.stderr.decode()
        assert not victim.exists()


def test_list_with_a_missing_input_exits_1(tmp_path):
    src = _folder(tmp_path / "in", good=1, bad=False)
    r = run_cli("encode", str(tmp_path / "nope.png"), str(src), "--out", str(tmp_path / "o"), "--list")
    assert r.returncode == 1 and "nope.png: no such file or directory" in r.stderr.decode()
    assert len(r.stdout.decode().splitlines()) == 1
