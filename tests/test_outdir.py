"""The output folder DIR as a whole (outdir.py): its settings file, its lock, its failure log.

DIR paths that cannot be one; DIR/vitembed.json malformed, lost, a FIFO or a dangling symlink;
the lock file replaced by a symlink; two runs with other settings racing into one DIR;
--overwrite refused while another run holds DIR, stopped part-way, failing to write, or joining
a sibling shard that already took DIR over; DIR/failures.jsonl that is a FIFO.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from .conftest import jpeg_bytes, photo, run_cli
from .helpers import DEEP, _encoder, _folder, _index, _summary


def _layer(path: Path) -> str:
    with safe_open(str(path), framework="numpy") as f:
        return f.metadata()["layer"]


# DIR itself ---------------------------------------------------------------------------------


def test_empty_out_is_refused(tmp_path):
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    work = tmp_path / "work"
    work.mkdir()
    for extra in ((), ("--list",)):
        r = run_cli("encode", str(img), "--out", "", "--weights", "random", *extra, cwd=work)
        assert r.returncode == 2 and "--out: empty path" in r.stderr.decode(), r.stderr.decode()
    assert list(work.iterdir()) == []


def test_empty_out_dir_is_refused_by_the_library(tmp_path):
    from vitembed.errors import UsageError
    from vitembed.inputs import plan_jobs
    from vitembed.outdir import check_out_dir

    with pytest.raises(UsageError, match="empty path"):
        plan_jobs([str(tmp_path)], "", "safetensors")
    with pytest.raises(UsageError, match="empty path"):
        check_out_dir("")


@pytest.mark.parametrize("kind", ["file", "readonly"])
def test_bad_out_dir_is_a_setup_error(tmp_path, small_ckpt, kind):
    photo(20, 20).save(tmp_path / "p.png")
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("I am a file")
        message = "exists and is not a folder"
    else:
        out = tmp_path / "file-parent" / "out"
        (tmp_path / "file-parent").write_text("")
        message = "is not a folder"
    r = run_cli("encode", str(tmp_path / "p.png"), "--out", str(out), "--weights", str(small_ckpt))
    assert r.returncode == 2 and message in r.stderr.decode()


def test_out_paths_that_cannot_be_examined_are_setup_errors(tmp_path):
    from vitembed.errors import UsageError
    from vitembed.outdir import check_out_dir

    with pytest.raises(UsageError, match="File name too long"):
        check_out_dir(tmp_path / ("d" * 300) / "x")


# The settings file, DIR/vitembed.json -------------------------------------------------------


@pytest.mark.parametrize("text", ['{"settings": {"layer": "last"}, "overwrite_started": Infinity}', DEEP, '{"settings": 1e400}'])
def test_malformed_settings_file_is_a_setup_error_and_overwrite_replaces_it(tmp_path, small_ckpt, text):
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    out = tmp_path / "out"
    out.mkdir()
    (out / "vitembed.json").write_text(text)
    args = ("encode", str(img), "--out", str(out), "--weights", str(small_ckpt))
    r = run_cli(*args)
    err = r.stderr.decode()
    assert r.returncode == 2 and "vitembed.json" in err and "Traceback" not in err, err
    assert run_cli(*args, "--overwrite").returncode == 0
    assert run_cli(*args).returncode == 0


def test_an_integer_too_large_in_the_settings_file_is_a_setup_error(tmp_path, small_ckpt):
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    out = tmp_path / "out"
    out.mkdir()
    (out / "vitembed.json").write_text('{"settings": {}, "overwrite_started": 1' + "0" * 400 + "}")
    args = ("encode", str(img), "--out", str(out), "--weights", str(small_ckpt))
    r = run_cli(*args)
    assert r.returncode == 2 and "vitembed.json" in r.stderr.decode() and "Traceback" not in r.stderr.decode()
    assert run_cli(*args, "--overwrite").returncode == 0


def test_fifo_in_place_of_the_settings_file_is_refused_not_hanging(tmp_path, small_ckpt):
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "vitembed.json")
    r = run_cli("encode", str(img), "--out", str(out), "--weights", str(small_ckpt), timeout=120)
    assert r.returncode == 2 and "vitembed.json: not a regular file" in r.stderr.decode(), r.stderr.decode()


def test_a_dangling_symlink_as_settings_file_is_named_as_such(tmp_path, small_ckpt):
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    out = tmp_path / "out"
    out.mkdir()
    (out / "vitembed.json").symlink_to(tmp_path / "nowhere")
    r = run_cli("encode", str(img), "--out", str(out), "--weights", str(small_ckpt))
    assert r.returncode == 2 and "exists but cannot be read (a dangling symlink?)" in r.stderr.decode()


@pytest.mark.parametrize("first, second", [(("--pack", "3"), ()), ((), ("--pack", "3"))])
def test_layouts_do_not_mix_even_when_the_settings_file_is_lost(tmp_path, small_ckpt, first, second):
    src, out = _folder(tmp_path / "in", good=2), tmp_path / "out"
    assert run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), *first).returncode == 0
    (out / "vitembed.json").unlink()
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), *second)
    assert r.returncode == 2 and "layout" in r.stderr.decode() and "made with other settings" in r.stderr.decode()


# The lock and runs racing into one DIR ------------------------------------------------------


def test_a_symlink_in_place_of_the_lock_file_creates_nothing_elsewhere(tmp_path, small_ckpt):
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "created-outside"
    (out / ".vitembed.lock").symlink_to(target)
    r = run_cli("encode", str(img), "--out", str(out), "--weights", str(small_ckpt))
    assert r.returncode == 2 and ".vitembed.lock" in r.stderr.decode()
    assert not target.exists()


def _cli_process(*args: str) -> subprocess.Popen:
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "vitembed", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def test_two_runs_with_different_settings_started_together_never_mix(tmp_path, small_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        (src / f"img{i}.jpg").write_bytes(jpeg_bytes(photo(48, 40, seed=i)))
    for attempt in range(4):
        out = tmp_path / f"out{attempt}"
        common = ("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--batch-size", "1")
        procs = [_cli_process(*common, "--layer", layer) for layer in ("last", "1")]
        results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results
        refused = next(err for code, err in results if code == 2)
        assert "other settings" in refused and "layer" in refused, refused
        settings = json.loads((out / "vitembed.json").read_text())["settings"]
        layers = {_layer(p) for p in out.glob("*.safetensors")}
        assert layers == {settings["layer"]} and len(list(out.glob("*.safetensors"))) == 4


def test_settings_claim_is_atomic_when_both_runs_read_before_either_writes(tmp_path, small_ckpt, monkeypatch):
    """Two runs in one process, both past their settings check before either writes vitembed.json."""
    import threading

    import vitembed
    from vitembed.layouts.files import FilesLayout
    from vitembed.errors import UsageError

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"img{i}.jpg").write_bytes(jpeg_bytes(photo(48, 40, seed=i)))
    out = tmp_path / "out"
    barrier = threading.Barrier(2, timeout=60)
    scan = FilesLayout.scan

    def scan_then_wait(*args):
        result = scan(*args)
        barrier.wait()  # both have read DIR (no settings yet) and scanned it
        return result

    monkeypatch.setattr(FilesLayout, "scan", scan_then_wait)
    encoders = {layer: vitembed.Encoder(weights=str(small_ckpt), layer=layer) for layer in ("last", "1")}
    outcome: dict[str, object] = {}

    def run(layer: str) -> None:
        try:
            outcome[layer] = vitembed.encode([str(src)], out, encoder=encoders[layer], workers=1)
        except UsageError as e:
            outcome[layer] = e

    threads = [threading.Thread(target=run, args=(layer,)) for layer in encoders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    refused = [layer for layer, o in outcome.items() if isinstance(o, UsageError)]
    assert len(refused) == 1 and "just claimed by another run" in str(outcome[refused[0]])
    winner = next(layer for layer in encoders if layer not in refused)
    assert outcome[winner].encoded == 3
    assert {_layer(p) for p in out.glob("*.safetensors")} == {winner}
    assert json.loads((out / "vitembed.json").read_text())["settings"]["layer"] == winner


# --overwrite --------------------------------------------------------------------------------


def test_overwrite_with_other_settings_is_refused_while_another_run_holds_dir(tmp_path, small_ckpt):
    from vitembed.outdir import DirLock

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg_bytes(photo(48, 40)))
    out = tmp_path / "out"
    args = ("encode", str(src), "--out", str(out), "--weights", str(small_ckpt))
    assert run_cli(*args).returncode == 0
    running = DirLock(out)  # what a run with these settings holds while it works
    try:
        refused = run_cli(*args, "--layer", "1", "--overwrite")
        assert refused.returncode == 2 and "another vitembed run is writing into" in refused.stderr.decode()
        assert _layer(out / "a.jpg.safetensors") == "last"
        same = run_cli(*args, "--overwrite")  # the same settings: works beside it
        assert same.returncode == 0, same.stderr.decode()
    finally:
        running.close()
    replaced = run_cli(*args, "--layer", "1", "--overwrite")
    assert replaced.returncode == 0 and _layer(out / "a.jpg.safetensors") == "1"


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


def test_an_overwrite_beside_a_sibling_that_already_took_over_joins_it(tmp_path, small_ckpt, monkeypatch):
    """--overwrite --shard K/N with new settings: the shards that lose the race to take DIR over
    find the settings already replaced by their sibling and go on, instead of being refused."""
    import vitembed
    from vitembed import outdir
    from vitembed.outdir import DirLock, DirState, read_dir_state
    from vitembed.settings import run_settings

    src = tmp_path / "in"
    src.mkdir()
    photo(40, 30).save(src / "a.png")
    out = tmp_path / "out"
    assert run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt)).returncode == 0
    old = read_dir_state(out)
    encoder = vitembed.Encoder(weights=str(small_ckpt), layer="1")
    sibling = DirLock(out)  # a shard of the new settings, running, which already replaced them
    try:
        calls = []

        def stale_then_real(path, tolerate_bad=False):
            calls.append(path)
            return old if len(calls) == 1 else read_dir_state(path, tolerate_bad)

        monkeypatch.setattr(outdir, "read_dir_state", stale_then_real)
        new_settings = run_settings({**encoder.metadata(), "background": "255,255,255",
                                              "allow_truncated": "false", "format": "safetensors", "layout": "files"})
        outdir.write_dir_state(out, DirState(new_settings, overwrite_started=1.0))
        summary = vitembed.encode([str(src)], out, encoder=encoder, overwrite=True, shard=(0, 1))
        assert summary.encoded == 1 and len(calls) >= 2
    finally:
        sibling.close()
    assert _layer(out / "a.png.safetensors") == "1"


# The failure log, DIR/failures.jsonl --------------------------------------------------------


def test_fifo_in_place_of_the_failures_log_is_a_warning_not_a_hang(tmp_path, small_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    photo(40, 30).save(src / "good.png")
    (src / "bad.png").write_text("not a png")
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "failures.jsonl")
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 1 and "cannot append to failures.jsonl: not a regular file" in err, err
    assert _summary(r.stderr).startswith("encoded 1, skipped 0, failed 1")
    assert (out / "good.png.safetensors").is_file()
