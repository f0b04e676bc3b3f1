"""The settings schema (settings.py): what resume compares, what it only records, and how a
mismatch is reported."""

from __future__ import annotations

from safetensors import safe_open

from .conftest import jpeg_bytes, photo, run_cli
from .helpers import _folder, _summary


def test_settings_conflict_names_every_difference(tmp_path):
    from vitembed.settings import settings_conflict

    ours = {f"k{i}": "a" for i in range(9)}
    message = str(settings_conflict("DIR was", ours, {f"k{i}": "b" for i in range(9)}))
    assert "k5: 'b' there, 'a' now; and 3 more: k6, k7, k8" in message


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
