"""Regression tests for inputs that once broke vitembed (each found by trying to break it)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors import safe_open

from vitembed.catalog import get_model_spec
from vitembed.errors import CheckpointError, WeightsNotFoundError
from vitembed.inputs import plan_jobs
from vitembed.weights import resolve_weights

from .conftest import photo, run_cli

SPEC = get_model_spec("vit-base-patch16-224-in21k")


def test_non_utf8_file_name_is_encoded_and_reported_as_valid_json(tmp_path, small_ckpt):
    src = tmp_path / "src"
    src.mkdir()
    photo(20, 20).save(src / "good.png")
    odd = os.path.join(os.fsencode(src), b"bad\xff.png")
    photo(20, 20, seed=1).save(os.fsdecode(odd), "PNG")
    r = run_cli("encode", str(src), "--out", str(tmp_path / "o"), "--weights", str(small_ckpt), "--json")
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    lines = [json.loads(line) for line in r.stdout.decode("utf-8").splitlines()]
    assert sorted(line["source"] for line in lines) == sorted([str(src / "good.png"), f"{src}/bad\\xff.png"])
    out = os.path.join(os.fsencode(tmp_path / "o"), b"bad\xff.png.safetensors")
    with safe_open(os.fsdecode(out), "numpy") as f:
        assert f.metadata()["source"] == f"{src}/bad\\xff.png"


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


@pytest.mark.parametrize(
    "config,message",
    [
        ([1, 2], "expected a JSON object, got list"),
        ({"hidden_size": "abc"}, "hidden_size must be an integer (got 'abc')"),
        ({"num_attention_heads": 0}, "num_heads must be a positive integer (got 0)"),
        ({"image_size": None}, "image_size must be an integer (got None)"),
        ({"hidden_act": ["gelu"]}, "hidden_act ['gelu'] is not supported"),
        ({"layer_norm_eps": "x"}, "layer_norm_eps must be a number (got 'x')"),
    ],
)
def test_bad_config_json_is_a_checkpoint_error_naming_the_file(tmp_path, small_ckpt, config, message):
    ckpt = tmp_path / "c"
    shutil.copytree(small_ckpt, ckpt)
    base = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config if isinstance(config, list) else {**base, **config}))
    with pytest.raises(CheckpointError) as info:
        resolve_weights(SPEC, ckpt)
    assert str(info.value).startswith(str(ckpt / "config.json")) and message in str(info.value)


@pytest.mark.parametrize(
    "pre,message",
    [
        ([1], "expected a JSON object"),
        ({"image_mean": "x"}, "mean and std need 3 finite numbers each"),
        ({"resample": None}, "unknown resample None"),
        ({"size": {"height": 0, "width": 0}}, "image size must be a positive integer"),
        ({"size": {"height": 60, "width": 60}}, "--image-size 60: must be a positive multiple of the patch size 8"),
    ],
)
def test_bad_preprocessor_config_is_refused_at_load(tmp_path, small_ckpt, pre, message):
    ckpt = tmp_path / "c"
    shutil.copytree(small_ckpt, ckpt)
    (ckpt / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(CheckpointError) as info:
        resolve_weights(SPEC, ckpt)
    assert str(ckpt / "preprocessor_config.json") in str(info.value) and message in str(info.value)


def test_weights_that_are_not_checkpoints(tmp_path, small_ckpt):
    with pytest.raises(WeightsNotFoundError, match="is not a checkpoint file"):
        resolve_weights(SPEC, small_ckpt / "config.json")
    with pytest.raises(WeightsNotFoundError, match="--weights: empty path"):
        resolve_weights(SPEC, "")


def test_inspect_survives_odd_arrays_and_goes_on(tmp_path):
    np.save(tmp_path / "str.npy", np.array(["a", "b"]))
    np.save(tmp_path / "zero.npy", np.zeros((0, 5), np.float32))
    np.save(tmp_path / "huge.npy", np.array([1e308, -1e308]))
    np.save(tmp_path / "ok.npy", np.ones((2, 3), np.float32))
    (tmp_path / "dir.safetensors").mkdir()
    files = [tmp_path / n for n in ("str.npy", "zero.npy", "huge.npy", "dir.safetensors", "ok.npy")]
    r = run_cli("inspect", *map(str, files), "--json")
    assert r.returncode == 1
    infos = {os.path.basename(i["path"]): i for i in map(json.loads, r.stdout.decode().splitlines())}
    assert sorted(infos) == ["huge.npy", "ok.npy", "str.npy", "zero.npy"]
    assert infos["str.npy"]["tensors"][0]["stats"]["min"] is None
    assert infos["zero.npy"]["tensors"][0]["stats"]["token0_l2"] is None
    assert infos["huge.npy"]["tensors"][0]["stats"]["std"] is None  # overflows float64: null, not Infinity
    assert infos["ok.npy"]["tensors"][0]["stats"]["token0_l2"] == pytest.approx(3**0.5)
    assert f"{tmp_path / 'dir.safetensors'}: not a regular file" in r.stderr.decode()


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


def test_json_lines_follow_input_order_within_a_batch(tmp_path, small_ckpt):
    src = tmp_path / "s"
    src.mkdir()
    for name in ("a.png", "c.png", "e.png"):
        photo(20, 20).save(src / name)
    (src / "b.png").write_bytes(b"")
    (src / "d.png").write_text("text")
    r = run_cli("encode", str(src), "--out", str(tmp_path / "o"), "--weights", str(small_ckpt), "--json", "--batch-size", "8")
    assert r.returncode == 1
    order = [os.path.basename(json.loads(line)["source"]) for line in r.stdout.decode().splitlines()]
    assert order == ["a.png", "b.png", "c.png", "d.png", "e.png"]


def test_huge_seed_is_a_usage_error(tmp_path):
    photo(20, 20).save(tmp_path / "p.png")
    r = run_cli("encode", str(tmp_path / "p.png"), "--out", str(tmp_path / "o"), "--weights", "random", "--seed", "99999999999999999999")
    assert r.returncode == 2 and "--seed" in r.stderr.decode()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--mean", "nan,0,0"], "mean and std need 3 finite numbers"),
        (["--std", "1e-45,1,1"], "mean and std need 3 finite numbers"),
        (["--mean", "1e40,0,0"], "mean and std need 3 finite numbers"),
        (["--image-size", "10000"], "at most 16384 are allowed"),
    ],
)
def test_preprocessing_and_size_values_that_would_give_nan_or_exhaust_memory(tmp_path, small_ckpt, args, message):
    photo(20, 20).save(tmp_path / "p.png")
    r = run_cli("encode", str(tmp_path / "p.png"), "--out", str(tmp_path / "o"), "--weights", str(small_ckpt), *args)
    assert r.returncode == 2 and message in r.stderr.decode(), r.stderr.decode()


def test_huge_register_count_is_a_checkpoint_error(tmp_path, small_ckpt):
    ckpt = tmp_path / "c"
    shutil.copytree(small_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "dinov2_with_registers", "mlp_ratio": 2,
                                                  "num_register_tokens": 1_000_000_000}))
    with pytest.raises(CheckpointError, match="reg_tokens 1000000000 is more than vitembed allows"):
        resolve_weights(SPEC, ckpt)
