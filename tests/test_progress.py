"""Progress that is true: images count as they leave the model (not when a --pack part is
written), the rate and time left come from a moving window, and a batch log gets plain lines."""

import re
import sys
import time

import pytest

import vitembed
from vitembed.encoder import Encoder
from vitembed.progress import Progress, progress_line

from .conftest import photo, run_cli


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_rate_and_eta_come_from_the_window_not_the_whole_run():
    clock = Clock()
    progress = Progress(total=1000, window=10.0, clock=clock)
    assert progress.snapshot().rate is None and progress.snapshot().eta is None  # nothing through the model yet
    for _ in range(10):  # 10 images/s for 10 s
        clock.now += 1.0
        progress.computed(10)
    snap = progress.snapshot()
    assert (snap.done, snap.rate, snap.eta) == (100, pytest.approx(10.0), pytest.approx(90.0))
    for _ in range(20):  # then 40 images/s for 10 s: after one window the old speed is forgotten
        clock.now += 0.5
        progress.computed(20)
    snap = progress.snapshot()
    assert snap.done == 500 and snap.rate == pytest.approx(40.0) and snap.eta == pytest.approx(12.5)
    clock.now += 0.3  # between two batches: the rate stays, and the time left counts down
    snap = progress.snapshot()
    assert snap.rate == pytest.approx(40.0) and snap.eta == pytest.approx(12.5 - 0.3)
    clock.now += 4.7  # a stall (5 s, ten times the 0.5 s gap) lowers the rate: the span runs to now, less one gap
    assert progress.snapshot().rate == pytest.approx(400 / (15.0 - 0.5))
    assert progress.snapshot().eta == pytest.approx(500 / (400 / 14.5) - 0.5)


def test_rate_between_batches_is_not_low_by_half_a_batch():
    """Found by bench/progress_accuracy.py: batches of 16 every 4.7 s, read every 5 s, the rate
    timed to each reading was 10-25 % low and the time left that much too long."""
    clock = Clock()
    progress = Progress(total=300, window=20.0, clock=clock)
    for _ in range(10):
        clock.now += 4.7
        progress.computed(16)
    for wait in (0.5, 2.0, 4.0):  # read at any moment before the next batch
        clock.now += wait
        snap = progress.snapshot()
        assert snap.rate == pytest.approx(16 / 4.7)
        assert snap.eta == pytest.approx(140 / (16 / 4.7) - wait)
        clock.now -= wait


def test_inputs_settled_without_the_model_count_but_do_not_make_the_rate():
    clock = Clock()
    progress = Progress(total=200, clock=clock)
    progress.settled(150)  # already done: in an instant, would be "737210.5 images/s"
    progress.restart_clock()
    clock.now += 2.0
    progress.computed(10)
    snap = progress.snapshot()
    assert (snap.done, snap.rate, snap.eta) == (160, pytest.approx(5.0), pytest.approx(8.0))
    assert progress_line(snap) == "progress: 160/200 (80%) 5.0 images/s, 0:08 left, 0:02 elapsed"


def test_with_pack_progress_moves_per_batch_before_the_part_is_written(tmp_path, small_ckpt):
    for i in range(6):
        photo(seed=i).save(tmp_path / f"im{i}.png")
    seen = []  # (done when called, encoded results so far)
    results = []
    summary = vitembed.encode([str(tmp_path / f"im{i}.png") for i in range(6)], tmp_path / "out", weights=str(small_ckpt),
                              pack=100, batch_size=2, workers=1, progress=lambda snap: seen.append((snap.done, len(results))),
                              on_result=results.append)
    assert summary.encoded == 6
    assert [done for done, _ in seen] == [2, 4, 6]
    assert all(written == 0 for _, written in seen)  # the one part was written after the last batch


def test_a_resumed_run_counts_the_done_inputs_without_a_rate(tmp_path, small_ckpt):
    for i in range(3):
        photo(seed=i).save(tmp_path / f"im{i}.png")
    vitembed.encode([str(tmp_path / "im0.png"), str(tmp_path / "im1.png")], tmp_path / "out", weights=str(small_ckpt))
    seen = []
    vitembed.encode([str(tmp_path)], tmp_path / "out", weights=str(small_ckpt), progress=seen.append)
    assert [s.done for s in seen] == [1, 2, 3] and seen[-1].total == 3
    assert seen[0].rate is None and seen[-1].rate is not None and seen[-1].rate < 1000  # one image's rate, not 2 in 0 s


def test_plain_progress_lines_have_true_counts_and_eta(tmp_path, small_ckpt, monkeypatch):
    """A batch log (stderr not a terminal): a line every log_every seconds whose count matches the
    images through the model then and whose time left matches the time the run still took, within 20%
    (a model slowed to 0.25 s per batch of 2, 8 images/s, so the figures are known)."""
    n = 48
    for i in range(n):
        photo(32, 32, seed=i).save(tmp_path / f"im{i:02d}.png")
    encoder = Encoder(weights=str(small_ckpt))
    real_call = Encoder.__call__

    def slow(self, pixels):
        time.sleep(0.25)
        return real_call(self, pixels)

    monkeypatch.setattr(Encoder, "__call__", slow)
    lines = []

    class Stderr:  # what the console writes, with the time it was written
        def write(self, text):
            lines.extend((time.monotonic(), line) for line in text.splitlines() if line)

        def flush(self):
            pass

        def isatty(self):
            return False

    monkeypatch.setattr(sys, "stderr", Stderr())
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    start = time.monotonic()
    vitembed.encode([str(tmp_path)], tmp_path / "out", encoder, batch_size=2, workers=1, progress=True, log_every=1.5)
    end = time.monotonic()
    pattern = re.compile(r"progress: (\d+)/48 \(\d+%\) ([\d.]+) images/s, (\d+):(\d+) left, \d+:\d+ elapsed")
    found = [(t, pattern.fullmatch(text)) for t, text in lines if text.startswith("progress:")]
    assert len(found) >= 3 and all(m for _, m in found), lines
    for t, m in found[1:]:  # the first line also holds the start-up
        done, eta = int(m[1]), int(m[3]) * 60 + int(m[4])
        assert done == pytest.approx(8 * (t - start), rel=0.2)
        assert eta == pytest.approx(end - t, rel=0.2, abs=1.0)  # whole seconds on the line


def test_the_cli_prints_progress_lines_in_a_log_and_none_with_log_every_0(tmp_path, small_ckpt):
    for i in range(4):
        photo(seed=i).save(tmp_path / f"im{i}.png")
    done = run_cli("encode", str(tmp_path), "--out", str(tmp_path / "a"), "--weights", str(small_ckpt), "--log-every", "0")
    assert done.returncode == 0 and "progress:" not in done.stderr.decode()
    again = run_cli("encode", str(tmp_path), "--out", str(tmp_path / "a"), "--weights", str(small_ckpt))
    assert again.returncode == 0
    last = again.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("encoded 0, skipped 4, failed 0 in ") and last.endswith("(nothing left to do)")
    assert "images/s" not in last
    bad = run_cli("encode", str(tmp_path), "--out", str(tmp_path / "b"), "--weights", str(small_ckpt), "--log-every", "-1")
    assert bad.returncode == 2 and "--log-every" in bad.stderr.decode()


def test_a_run_with_nothing_left_to_do_does_not_build_the_model(tmp_path, small_ckpt):
    photo().save(tmp_path / "im0.png")
    vitembed.encode([str(tmp_path)], tmp_path / "out", weights=str(small_ckpt))
    encoder = Encoder(weights=str(small_ckpt), defer_model=True)
    assert encoder.packed  # what the start panel says: float32 on the CPU packs, once built
    summary = vitembed.encode([str(tmp_path)], tmp_path / "out", encoder)
    assert (summary.encoded, summary.skipped) == (0, 1) and encoder._model is None
    photo(seed=1).save(tmp_path / "im1.png")
    assert vitembed.encode([str(tmp_path)], tmp_path / "out", encoder).encoded == 1 and encoder._model is not None
