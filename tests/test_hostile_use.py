"""Hostile and concurrent use: names that print alike, two runs racing into one DIR, absurd
configs, malformed JSON, FIFOs where vitembed keeps its files, odd names, bad options.

Each test makes the input that showed the problem (issue 9) and checks the behaviour that fixes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from .conftest import SMALL, jpeg_bytes, photo, run_cli


def _summary(stderr: bytes) -> str:
    return [line for line in stderr.decode().splitlines() if line.startswith("encoded ")][-1]


def _json_lines(stdout: bytes) -> list[dict]:
    return [json.loads(line) for line in stdout.decode().splitlines()]


def _layer(path: Path) -> str:
    with safe_open(str(path), framework="numpy") as f:
        return f.metadata()["layer"]


# 1. Names that print the same ------------------------------------------------------------------


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


# 2. Two runs into one DIR ----------------------------------------------------------------------


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


# 4. Absurd configs -----------------------------------------------------------------------------


def _checkpoint_with_config(tmp_path: Path, small_ckpt: Path, **config) -> Path:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes((small_ckpt / "model.safetensors").read_bytes())
    hf = json.loads((small_ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**hf, **config}))
    return ckpt


@pytest.mark.parametrize(
    "config",
    [
        dict(hidden_size=4096, num_hidden_layers=100, num_attention_heads=16, intermediate_size=16384),
        dict(hidden_size=16384, num_hidden_layers=512, num_attention_heads=128, intermediate_size=65536),
    ],
)
def test_model_too_large_for_memory_is_a_setup_error(tmp_path, small_ckpt, config):
    ckpt = _checkpoint_with_config(tmp_path, small_ckpt, **config)
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    r = run_cli("encode", str(img), "--out", str(tmp_path / "out"), "--weights", str(ckpt))
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "config.json: the model has" in err and "GiB" in err and "memory is available" in err and "Traceback" not in err


def test_checkpoint_shapes_are_checked_before_the_model_is_allocated(tmp_path, small_ckpt, monkeypatch):
    from vitembed.catalog import get_model_spec
    from vitembed.errors import CheckpointError
    from vitembed.model import VisionTransformer
    from vitembed.weights import build_model, resolve_weights

    ckpt = _checkpoint_with_config(tmp_path, small_ckpt, hidden_size=96, intermediate_size=192)
    weights = resolve_weights(get_model_spec("vit-base-patch16-224"), ckpt)

    import torch

    built_on: list[str] = []
    init = VisionTransformer.__init__

    def recording_init(self, cfg):
        built_on.append(torch.get_default_device().type)
        init(self, cfg)

    def no_allocation(*args, **kwargs):
        raise AssertionError("the model was allocated before its shapes were checked")

    monkeypatch.setattr(VisionTransformer, "__init__", recording_init)
    monkeypatch.setattr(VisionTransformer, "to_empty", no_allocation)
    monkeypatch.setattr(VisionTransformer, "init_weights", no_allocation)
    with pytest.raises(CheckpointError, match="has shape"):
        build_model(weights)
    assert built_on and set(built_on) == {"meta"}


def test_memory_check_counts_parameters_exactly():
    import torch

    from vitembed.config import ViTConfig
    from vitembed.model import VisionTransformer, num_parameters

    cfg = ViTConfig.from_transformers({**SMALL, "num_hidden_layers": 2})
    assert num_parameters(cfg) == sum(p.numel() for p in VisionTransformer(cfg).parameters())
    assert num_parameters(ViTConfig()) == 85_798_656  # ViT-B/16 at 224 without a head
    assert torch.get_default_device().type == "cpu"  # counting on meta leaves the default alone


# 6. Malformed JSON -----------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    "text",
    [
        '{"hidden_size": Infinity}',
        '{"hidden_size": 1e400}',
        '{"hidden_size": NaN}',
        '{"hidden_size": 48, "deep": ' + DEEP + "}",
        '{"hidden_size": 1' + "0" * 5000 + "}",
    ],
    ids=["infinity", "overflow", "nan", "deep", "long-int"],
)
def test_malformed_config_json_is_a_setup_error_naming_the_file(tmp_path, small_ckpt, text):
    ckpt = _checkpoint_with_config(tmp_path, small_ckpt)
    hf = json.loads((ckpt / "config.json").read_text())
    body = json.dumps({k: v for k, v in hf.items() if k != "hidden_size"})
    (ckpt / "config.json").write_text(body[:-1] + ", " + text[1:])
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    r = run_cli("encode", str(img), "--out", str(tmp_path / "out"), "--weights", str(ckpt))
    err = r.stderr.decode()
    assert r.returncode == 2 and "config.json" in err and "Traceback" not in err, err


@pytest.mark.parametrize("text", ['{"size": {"height": Infinity, "width": 32}}', '{"size": ' + DEEP + "}"])
def test_malformed_preprocessor_config_is_a_setup_error(tmp_path, small_ckpt, text):
    ckpt = _checkpoint_with_config(tmp_path, small_ckpt)
    (ckpt / "preprocessor_config.json").write_text(text)
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    r = run_cli("encode", str(img), "--out", str(tmp_path / "out"), "--weights", str(ckpt))
    err = r.stderr.decode()
    assert r.returncode == 2 and "preprocessor_config.json" in err and "Traceback" not in err, err


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


# 7. FIFOs where vitembed keeps its files -------------------------------------------------------


def test_fifo_in_place_of_the_settings_file_is_refused_not_hanging(tmp_path, small_ckpt):
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "vitembed.json")
    r = run_cli("encode", str(img), "--out", str(out), "--weights", str(small_ckpt), timeout=120)
    assert r.returncode == 2 and "vitembed.json: not a regular file" in r.stderr.decode(), r.stderr.decode()


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


def test_open_regular_refuses_fifos_for_reading_and_writing(tmp_path):
    from vitembed.files import NotRegularFileError, open_regular

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for flags in (os.O_RDONLY, os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_CREAT):
        with pytest.raises(NotRegularFileError):
            open_regular(fifo, flags)
    with pytest.raises(NotRegularFileError):
        open_regular(tmp_path, os.O_RDONLY)


# 9. The folder walk ----------------------------------------------------------------------------


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


# 11. Names on stderr ---------------------------------------------------------------------------


def test_control_characters_in_names_are_escaped_on_stderr(tmp_path, small_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    evil = "x\nencoded 99, skipped 0, failed 0 in 1.0 s\x1b[31m.jpg"
    (src / evil).write_text("not a jpeg")
    photo(40, 30).save(src / "good.png")
    r = run_cli("encode", str(src), "--out", str(tmp_path / "out"), "--weights", str(small_ckpt))
    err = r.stderr.decode()
    assert r.returncode == 1
    assert "\x1b" not in err
    assert [line for line in err.splitlines() if line.startswith("encoded ")] == [_summary(r.stderr)]
    assert _summary(r.stderr).startswith("encoded 1, skipped 0, failed 1")
    assert "x\\nencoded 99, skipped 0, failed 0 in 1.0 s\\x1b[31m.jpg: cannot identify image format" in err
    listed = run_cli("encode", str(src / evil), "--out", str(tmp_path / "o"), "--list")
    assert listed.stdout.decode().count("\x1b") == 0 and "\\x1b" in listed.stdout.decode()


def test_shown_escapes_controls_and_keeps_text():
    from vitembed.errors import shown

    assert shown("a\tb\r\n\x1b\x7f\x9bé") == "a\\tb\\r\\n\\x1b\\x7f\\x9bé"
    assert shown(os.fsdecode(b"k\xff")) == "k\\xff"


# 12. Names too long for an output --------------------------------------------------------------


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


# 13a. Unsearchable folders ---------------------------------------------------------------------


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


# 14, 15. Options -------------------------------------------------------------------------------


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


@pytest.mark.parametrize("device", ["cpu:1", "cpu:0"])
def test_cpu_device_index_is_refused(tmp_path, device):
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    r = run_cli("encode", str(img), "--out", str(tmp_path / "out"), "--weights", "random", "--device", device)
    assert r.returncode == 2 and f"--device {device}: the CPU device takes no index" in r.stderr.decode()
    assert not (tmp_path / "out").exists()


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


def test_null_without_stdin_input_is_a_usage_error(tmp_path):
    r = run_cli("encode", str(tmp_path), "-0", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "add - to the inputs" in r.stderr.decode()


def test_settings_conflict_names_every_difference(tmp_path):
    from vitembed.settings import settings_conflict

    ours = {f"k{i}": "a" for i in range(9)}
    message = str(settings_conflict("DIR was", ours, {f"k{i}": "b" for i in range(9)}))
    assert "k5: 'b' there, 'a' now; and 3 more: k6, k7, k8" in message


# Found by the second breaking pass -------------------------------------------------------------


def test_a_name_spelled_like_a_shortened_output_name_is_a_collision(tmp_path):
    from vitembed.inputs import output_name, plan_jobs

    long = tmp_path / ("x" * 250 + ".jpg")
    twin = tmp_path / output_name(long.name, ".safetensors")[: -len(".safetensors")]
    for path in (long, twin):
        photo(20, 20).save(path, "JPEG")
    plan = plan_jobs([str(long), str(twin)], tmp_path / "out", "safetensors")
    assert len(plan.jobs) == 1 and [p.kind for p in plan.problems] == ["collision"]


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


@pytest.mark.parametrize("config", [{"hidden_size": "9", "mlp_ratio": 300000000}, {"hidden_size": [0], "mlp_ratio": 1e12}])
def test_dinov2_mlp_ratio_is_checked_before_it_is_used(config):
    from vitembed.config import ViTConfig
    from vitembed.errors import CheckpointError

    hf = {"model_type": "dinov2", "num_hidden_layers": 2, "num_attention_heads": 3, **config}
    with pytest.raises(CheckpointError, match="mlp_ratio"):
        ViTConfig.from_transformers(hf, "x/config.json")


@pytest.mark.parametrize("field,value", [("qkv_bias", "false"), ("layer_norm_eps", "1e-12")])
def test_config_fields_of_the_wrong_type_are_refused(field, value):
    from vitembed.config import ViTConfig
    from vitembed.errors import CheckpointError

    with pytest.raises(CheckpointError, match=field):
        ViTConfig.from_transformers({**SMALL, field: value}, "x/config.json")


def test_an_image_side_beyond_the_maximum_is_too_large_before_decoding(tmp_path):
    from PIL import Image

    from vitembed.decode import MAX_SIDE, decode_image
    from vitembed.errors import InputError

    path = tmp_path / "strip.png"
    Image.new("L", (1, MAX_SIDE + 1), 9).save(path)
    with pytest.raises(InputError) as info:
        decode_image(path)
    assert info.value.kind == "too-large" and f"longer than {MAX_SIDE}" in info.value.reason


def test_out_paths_that_cannot_be_examined_are_setup_errors(tmp_path):
    from vitembed.errors import UsageError
    from vitembed.outdir import check_out_dir

    with pytest.raises(UsageError, match="File name too long"):
        check_out_dir(tmp_path / ("d" * 300) / "x")


def test_start_panel_and_bidi_controls_are_escaped(tmp_path, small_ckpt):
    from vitembed.errors import shown

    assert shown("bidi\u202egpj.exe.jpg\u2028x") == "bidi\\u202egpj.exe.jpg\\u2028x"
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    out = tmp_path / "o\x1b]0;title\x07\nfake line"
    r = run_cli("encode", str(img), "--out", str(out), "--weights", str(small_ckpt))
    assert r.returncode == 0 and "\x1b" not in r.stderr.decode() and "\x07" not in r.stderr.decode()


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


def test_a_dangling_symlink_as_settings_file_is_named_as_such(tmp_path, small_ckpt):
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    out = tmp_path / "out"
    out.mkdir()
    (out / "vitembed.json").symlink_to(tmp_path / "nowhere")
    r = run_cli("encode", str(img), "--out", str(out), "--weights", str(small_ckpt))
    assert r.returncode == 2 and "exists but cannot be read (a dangling symlink?)" in r.stderr.decode()


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


def test_eps_without_ghostscript_is_unsupported(tmp_path):
    import shutil

    from vitembed.decode import decode_image
    from vitembed.errors import InputError

    if shutil.which("gs"):
        pytest.skip("Ghostscript is installed: EPS decodes")
    path = tmp_path / "t.eps"
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(InputError) as info:
        decode_image(path)
    assert info.value.kind == "unsupported" and "Ghostscript" in info.value.reason


def test_a_missing_crop_size_field_is_named():
    from vitembed.config import PreprocessConfig
    from vitembed.errors import CheckpointError

    with pytest.raises(CheckpointError, match="x/preprocessor_config.json: missing field 'height'"):
        PreprocessConfig.from_transformers({"do_center_crop": True, "crop_size": {}}, "x/preprocessor_config.json")


def test_16_bit_scaling_is_exact_at_every_level_and_uses_integers():
    from PIL import Image

    from vitembed.decode import to_rgb

    levels = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    grey = np.asarray(to_rgb(Image.fromarray(levels)))[..., 0]
    assert np.array_equal(grey, np.rint(levels.astype(np.float64) * 255 / 65535).astype(np.uint8))


def test_inspect_escapes_names_in_its_human_output(tmp_path, small_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    name = "a\x1b[2Jb.png"
    photo(40, 30).save(src / name)
    out = tmp_path / "out"
    assert run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt)).returncode == 0
    r = run_cli("inspect", str(out / f"{name}.safetensors"))
    assert r.returncode == 0 and "\x1b" not in r.stdout.decode() and "a\\x1b[2Jb.png" in r.stdout.decode()


# Found by the third breaking pass --------------------------------------------------------------


def test_npy_overwrite_of_some_inputs_never_lets_the_others_pass_as_done(tmp_path, small_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b", "c"):
        photo(40, 30, seed=ord(name)).save(src / f"{name}.png")
    out = tmp_path / "out"
    base = ("encode", "--out", str(out), "--weights", str(small_ckpt), "--format", "npy")
    assert run_cli(*base[:1], str(src), *base[1:]).returncode == 0
    assert run_cli(*base[:1], str(src / "a.png"), *base[1:], "--layer", "1", "--overwrite").returncode == 0
    again = run_cli(*base[:1], str(src), *base[1:], "--layer", "1", "--json")
    assert _summary(again.stderr).startswith("encoded 2, skipped 1"), again.stderr.decode()
    fresh = tmp_path / "fresh"
    assert run_cli("encode", str(src), "--out", str(fresh), "--weights", str(small_ckpt), "--format", "npy", "--layer", "1").returncode == 0
    for name in ("a", "b", "c"):
        assert np.array_equal(np.load(out / f"{name}.png.npy"), np.load(fresh / f"{name}.png.npy"))
    assert json.loads((out / "vitembed.json").read_text())["overwrite_started"] is None


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
