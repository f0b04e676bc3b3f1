"""What the command prints (console.py; errors.shown): control characters, bidi controls and bytes
that are not UTF-8 in names are escaped, so no input can forge a line or a terminal sequence."""

from __future__ import annotations

import os

from .conftest import photo, run_cli
from .helpers import _summary


def test_shown_escapes_controls_and_keeps_text():
    from vitembed.errors import shown

    assert shown("a\tb\r\n\x1b\x7f\x9bé") == "a\\tb\\r\\n\\x1b\\x7f\\x9bé"
    assert shown(os.fsdecode(b"k\xff")) == "k\\xff"


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


def test_start_panel_and_bidi_controls_are_escaped(tmp_path, small_ckpt):
    from vitembed.errors import shown

    assert shown("bidi\u202egpj.exe.jpg\u2028x") == "bidi\\u202egpj.exe.jpg\\u2028x"
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    out = tmp_path / "o\x1b]0;title\x07\nfake line"
    r = run_cli("encode", str(img), "--out", str(out), "--weights", str(small_ckpt))
    assert r.returncode == 0 and "\x1b" not in r.stderr.decode() and "\x07" not in r.stderr.decode()
