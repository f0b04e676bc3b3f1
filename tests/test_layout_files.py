"""The per-image layout (layouts/files.py): one file per input, ``DIR/<name>.<format>``.

A name that is not UTF-8 gets an output of the same bytes and metadata that names it escaped;
an npy DIR whose --overwrite covered some inputs only never passes the others off as done.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors import safe_open

from .conftest import photo, run_cli
from .helpers import _summary


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
