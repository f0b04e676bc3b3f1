"""The stages of an encode (stages.py): results in input order within a batch, failures kept in
place; each batch split over the model threads with the same bits; an error in the write stage
ends the run instead of hanging it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import photo, run_cli
from .helpers import _encoder, _folder


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
