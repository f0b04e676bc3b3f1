"""Inputs -> jobs (inputs.py): the folder walk, output names, collisions, and inputs that cannot
be read.

What the walk takes and passes over, an output folder inside an input folder, names too long for
an output (shortened, and resumable), names that print the same or are spelled like a shortened
name (collisions), the same file twice, and folders that cannot be listed or searched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from safetensors import safe_open

from vitembed.inputs import plan_jobs

from .conftest import jpeg_bytes, photo, run_cli
from .helpers import _summary


def _json_lines(stdout: bytes) -> list[dict]:
    return [json.loads(line) for line in stdout.decode().splitlines()]


# The folder walk ----------------------------------------------------------------------------


def test_walk_takes_every_extension_pillow_reads_and_counts_what_it_passes_over(tmp_path, small_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    (src / "photo.mpo").write_bytes(jpeg_bytes(photo(40, 30)))  # MPO: a JPEG container, listed as supported
    photo(32, 32).save(src / "icon.cur", "ICO")
    photo(40, 30).save(src / "pic.pcd.png")
    (src / "no_extension").write_bytes(jpeg_bytes(photo(40, 30)))
    (src / "notes.txt").write_text("hello")
    listed = run_cli("encode", str(src), "--out", str(tmp_path / "o"), "--list")
    assert listed.returncode == 0
    assert sorted(Path(line.split("\t")[0]).name for line in listed.stdout.decode().splitlines()) == [
        "icon.cur", "photo.mpo", "pic.pcd.png"]
    assert "passed over 2 files that are not images by name (--verbose names them)" in listed.stderr.decode()
    verbose = run_cli("encode", str(src), "--out", str(tmp_path / "o"), "--list", "--verbose")
    assert f"passed over: {src / 'no_extension'} (not an image by name)" in verbose.stderr.decode()
    as_json = _json_lines(run_cli("encode", str(src), "--out", str(tmp_path / "o"), "--list", "--json").stdout)
    assert sorted(Path(line["source"]).name for line in as_json if line.get("status") == "passed-over") == [
        "no_extension", "notes.txt"]
    r = run_cli("encode", str(src), "--out", str(tmp_path / "out"), "--weights", str(small_ckpt))
    assert r.returncode == 0, r.stderr.decode()
    assert _summary(r.stderr).startswith("encoded 3, skipped 0, failed 0")
    assert "passed over 2 files that are not images by name" in r.stderr.decode()


def test_walk_extensions_come_from_pillow():
    from PIL import Image

    from vitembed.inputs import image_extensions

    exts = image_extensions()
    assert {".mpo", ".cur", ".jpg", ".png", ".webp", ".tif", ".heic", ".avif", ".dds", ".icns"} <= exts
    assert not exts & {".pdf", ".h5", ".grib", ".bufr", ".wmf", ".mpg", ".txt"}
    assert exts - {".heic", ".heif", ".hif", ".avif", ".avifs"} <= set(Image.registered_extensions())


def test_an_output_folder_inside_the_input_folder_is_not_walked(tmp_path, small_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    photo(40, 30).save(src / "a.png")
    args = ("encode", str(src), "--out", str(src / "emb"), "--weights", str(small_ckpt))
    assert run_cli(*args).returncode == 0
    photo(40, 30).save(src / "emb" / "stray.png")  # even an image inside the output folder is left alone
    again = run_cli(*args, "--format", "npy", "--overwrite")
    assert _summary(again.stderr).startswith("encoded 1, skipped 0, failed 0"), again.stderr.decode()
    assert "passed over" not in again.stderr.decode()
    beside = run_cli("encode", str(src), "--out", str(src), "--weights", str(small_ckpt), "--list")
    assert [Path(line.split("\t")[0]).name for line in beside.stdout.decode().splitlines()] == ["a.png", "stray.png"]


# Output names -------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [244, 250, 255])
def test_names_too_long_for_an_output_get_a_shortened_name_and_resume(tmp_path, small_ckpt, length):
    src = tmp_path / "in"
    src.mkdir()
    name = "é" * ((length - 4) // 2) + "a" * ((length - 4) % 2) + ".jpg"
    assert len(name.encode()) == length
    (src / name).write_bytes(jpeg_bytes(photo(40, 30)))
    out = tmp_path / "out"
    args = ("encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--json")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr.decode()
    output = Path(_json_lines(r.stdout)[0]["output"])
    assert output.is_file() and len(os.fsencode(output.name)) <= 255
    assert output.name.endswith(".safetensors") and "~" in output.name
    output.name.encode("utf-8")  # a UTF-8 name is not cut inside a character
    with safe_open(str(output), framework="numpy") as f:
        assert f.metadata()["source"] == str(src / name)
    again = run_cli(*args)
    assert _summary(again.stderr).startswith("encoded 0, skipped 1, failed 0")
    listed = run_cli("encode", str(src), "--out", str(out), "--list")
    assert listed.stdout.decode().strip().endswith(str(output))


def test_output_name_is_unchanged_when_it_fits():
    from vitembed.inputs import output_name

    assert output_name("cat.jpg", ".safetensors") == "cat.jpg.safetensors"
    assert output_name("a" * 243, ".safetensors") == "a" * 243 + ".safetensors"
    long = output_name("a" * 244, ".npy")
    assert long == "a" * 244 + ".npy"  # 248 bytes still fit
    assert len(output_name("a" * 250, ".safetensors").encode()) == 255
    assert output_name("a" * 250 + "x", ".npy") != output_name("a" * 250 + "y", ".npy")


# Collisions and duplicates ------------------------------------------------------------------


@pytest.mark.parametrize("pack", [None, "10"])
def test_names_that_print_the_same_are_refused_as_collision(tmp_path, small_ckpt, pack):
    src = tmp_path / "in"
    src.mkdir()
    raw = os.fsdecode(b"k\xff.jpg")  # the raw byte 0xff: not UTF-8
    literal = "k\\xff.jpg"  # the four characters \ x f f, which is how the raw name prints
    for i, name in enumerate((raw, literal)):
        (src / name).write_bytes(jpeg_bytes(photo(40, 30, seed=i)))
    out = tmp_path / "out"
    args = ["encode", str(src), "--out", str(out), "--weights", str(small_ckpt), "--json"]
    if pack:
        args += ["--pack", pack]
    first = run_cli(*args)
    assert first.returncode == 1, first.stderr.decode()
    assert "Traceback" not in first.stderr.decode()
    lines = _json_lines(first.stdout)
    assert sorted(line["status"] for line in lines) == ["encoded", "failed"]
    failed = next(line for line in lines if line["status"] == "failed")
    assert failed["error_kind"] == "collision" and "prints the same" in failed["error"]
    again = run_cli(*args)
    assert _summary(again.stderr).startswith("encoded 0, skipped 1, failed 1"), again.stderr.decode()
    if pack:
        from vitembed.layouts.packed import iter_packed

        rows = list(iter_packed(out))
        assert len(rows) == 1 and rows[0][0] == literal


def test_job_keys_are_unique_in_a_plan(tmp_path):
    from vitembed.inputs import plan_jobs

    src = tmp_path / "in"
    src.mkdir()
    for name in (os.fsdecode(b"a\xfe.png"), "a\\xfe.png", "b.png"):
        photo(20, 20).save(src / name, "PNG")
    plan = plan_jobs([str(src)], tmp_path / "out", "safetensors")
    assert len(plan.jobs) == 2 and len({job.key for job in plan.jobs}) == 2
    assert [p.kind for p in plan.problems] == ["collision"]


def test_a_name_spelled_like_a_shortened_output_name_is_a_collision(tmp_path):
    from vitembed.inputs import output_name, plan_jobs

    long = tmp_path / ("x" * 250 + ".jpg")
    twin = tmp_path / output_name(long.name, ".safetensors")[: -len(".safetensors")]
    for path in (long, twin):
        photo(20, 20).save(path, "JPEG")
    plan = plan_jobs([str(long), str(twin)], tmp_path / "out", "safetensors")
    assert len(plan.jobs) == 1 and [p.kind for p in plan.problems] == ["collision"]


def test_same_file_twice_is_reported_as_skipped(tmp_path, small_ckpt):
    (tmp_path / "a").mkdir()
    photo(20, 20).save(tmp_path / "a" / "x.png")
    os.symlink(tmp_path / "a" / "x.png", tmp_path / "link.png")
    r = run_cli("encode", str(tmp_path / "link.png"), str(tmp_path / "a" / "x.png"), "--out", str(tmp_path / "o"),
                "--weights", str(small_ckpt), "--json")
    assert r.returncode == 0, r.stderr.decode()
    lines = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert [(line["source"], line["status"]) for line in lines] == [
        (str(tmp_path / "a" / "x.png"), "skipped"), (str(tmp_path / "link.png"), "encoded")]
    assert "same file as" in lines[0]["reason"]
    assert "encoded 1, skipped 1, failed 0" in r.stderr.decode()


def test_failed_path_does_not_shadow_a_later_valid_one(tmp_path, small_ckpt):
    photo(20, 20).save(tmp_path / "x.png")
    plan = plan_jobs([], tmp_path / "o", "safetensors", stdin_paths=["x.png/", str(tmp_path / "x.png")])
    assert [j.source for j in plan.jobs] == ["x.png/", str(tmp_path / "x.png")]
    assert plan.duplicates == []


# Folders that cannot be read ----------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root reads any folder")
def test_unreadable_folder_is_reported_not_skipped(tmp_path):
    locked = tmp_path / "in" / "locked"
    locked.mkdir(parents=True)
    photo(10, 10).save(locked / "a.png")
    photo(10, 10).save(tmp_path / "in" / "b.png")
    locked.chmod(0)
    try:
        if os.geteuid() == 0:  # simulate what a non-root user sees
            import vitembed.inputs as inputs

            real_walk = os.walk

            def walk(top, onerror=None, **kw):
                for root, dirs, files in real_walk(top, onerror=onerror, **kw):
                    if root == str(locked):
                        onerror(PermissionError(13, "Permission denied", root))
                        continue
                    yield root, dirs, files

            inputs.os.walk, saved = walk, inputs.os.walk
            try:
                plan = plan_jobs([str(tmp_path / "in")], tmp_path / "o", "safetensors")
            finally:
                inputs.os.walk = saved
        else:
            plan = plan_jobs([str(tmp_path / "in")], tmp_path / "o", "safetensors")
    finally:
        locked.chmod(0o755)
    assert [j.relpath for j in plan.jobs] == ["b.png"]
    assert [(p.path, p.kind) for p in plan.problems] == [(str(locked), "unreadable")]
    assert "cannot list folder: Permission denied" in str(plan.problems[0])


def test_a_file_in_an_unsearchable_folder_is_a_permission_error_not_missing():
    base = Path(tempfile.mkdtemp(prefix="vitembed-perm-"))
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir()
        photo(20, 20).save(locked / "x.png")
        locked.chmod(0o700 if os.geteuid() == 0 else 0o000)
        code = (
            "import os, sys\n"
            "from vitembed.inputs import plan_jobs\n"
            f"os.setuid(65534) if os.geteuid() == 0 else None\n"
            f"plan = plan_jobs([{str(locked / 'x.png')!r}], '/tmp/unused-out', 'safetensors')\n"
            "print(plan.problems[0].kind, plan.problems[0].reason)\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == "unreadable permission denied (a folder on its path cannot be searched)", r.stderr
    finally:
        (base / "locked").chmod(0o755)
        for p in sorted(base.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        base.rmdir()
