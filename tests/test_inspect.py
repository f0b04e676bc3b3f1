"""``vitembed inspect`` (inspect.py): odd arrays are described without stopping at them, and names
are escaped in its human output."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from .conftest import photo, run_cli


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
    assert f"{tmp_path / 'dir.safetensors'}: no vitembed outputs here" in r.stderr.decode()  # a folder: inspect_dir


def test_inspect_escapes_names_in_its_human_output(tmp_path, small_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    name = "a\x1b[2Jb.png"
    photo(40, 30).save(src / name)
    out = tmp_path / "out"
    assert run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt)).returncode == 0
    r = run_cli("inspect", str(out / f"{name}.safetensors"))
    assert r.returncode == 0 and "\x1b" not in r.stdout.decode() and "a\\x1b[2Jb.png" in r.stdout.decode()
