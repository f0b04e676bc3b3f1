"""--engine ray on a local Ray instance with two CPU actors: the same outputs, exit codes and
failures as the local engine; an actor killed mid-job (SIGKILL of its process, as the OOM killer
does); Ray and local runs resuming each other."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

import vitembed
from vitembed.errors import UsageError
from vitembed.options import RayOptions

from .conftest import jpeg_bytes, photo, run_cli
from .helpers import _summary

ray = pytest.importorskip("ray", reason="--engine ray needs the extra: pip install 'vitembed[ray]'")

TWO_ACTORS = RayOptions(actors=2, actor_cpus=1, decode_cpus=1)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (vitembed joins a running one), 4 logical CPUs."""
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _folder(root: Path, good: int = 7) -> Path:
    (root / "sub").mkdir(parents=True)
    for i in range(good):
        (root / ("sub" if i % 3 == 0 else "") / f"img{i:02d}.jpg").write_bytes(jpeg_bytes(photo(40 + 3 * i, 36, seed=i)))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    (root / "empty.png").write_bytes(b"")
    return root


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}


def _failures(out: Path) -> list[tuple[str, str, str]]:
    return sorted((f["path"], f["kind"], f["message"]) for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines()))


def _kw(small_ckpt, **more):
    return {"weights": str(small_ckpt), "batch_size": 3, **more}


def test_ray_outputs_equal_the_local_engine_byte_for_byte(tmp_path, small_ckpt, local_ray):
    src = _folder(tmp_path / "in")
    local = vitembed.encode([str(src)], tmp_path / "local", **_kw(small_ckpt))
    remote = vitembed.encode([str(src)], tmp_path / "ray", engine="ray", ray=TWO_ACTORS, **_kw(small_ckpt))
    assert (remote.encoded, remote.failed, remote.skipped) == (local.encoded, local.failed, local.skipped) == (7, 2, 0)
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local") and len(_outputs(tmp_path / "ray")) == 7
    assert _failures(tmp_path / "ray") == _failures(tmp_path / "local")
    assert {kind for _, kind, _ in _failures(tmp_path / "ray")} == {"truncated", "empty"}
    # Packed and pooled: the same parts, row for row.
    packed = dict(pool="cls", pack=4, **_kw(small_ckpt))
    vitembed.encode([str(src)], tmp_path / "lp", **packed)
    vitembed.encode([str(src)], tmp_path / "rp", engine="ray", ray=TWO_ACTORS, **packed)
    a, b = vitembed.load(tmp_path / "lp"), vitembed.load(tmp_path / "rp")
    assert a.keys == b.keys and len(a.keys) == 7
    np.testing.assert_array_equal(a.embeddings, b.embeddings)


def test_naflex_on_ray_records_each_images_grid_as_locally(tmp_path, local_ray):
    from .helpers import _siglip2_naflex

    ckpt = _siglip2_naflex(tmp_path / "naflex")
    src = tmp_path / "in"
    src.mkdir()
    # Ray batches of three rows: some of one grid only (Ray keeps such a column as a tensor), some with
    # a failure or two grids (objects): Ray could not join the two kinds, and the job failed for good.
    for i in range(8):
        w, h = (64, 48) if i < 4 else (30, 90)
        (src / f"{i}.png").write_bytes(jpeg_bytes(photo(w, h, seed=i)))
    (src / "4b.png").write_bytes(b"not an image")
    for pool in ("mean", "none"):
        vitembed.encode([str(src)], tmp_path / f"l{pool}", weights=str(ckpt), pool=pool, batch_size=3)
        vitembed.encode([str(src)], tmp_path / f"r{pool}", weights=str(ckpt), pool=pool, batch_size=3, engine="ray", ray=TWO_ACTORS)
        assert _outputs(tmp_path / f"r{pool}") == _outputs(tmp_path / f"l{pool}")  # the grid and tokens metadata too
    from safetensors import safe_open

    grids = set()
    for path in (tmp_path / "rmean").glob("*.safetensors"):
        with safe_open(path, "np") as f:
            grids.add(f.metadata()["grid"])
    assert len(grids) == 2 and "naflex" not in grids
    assert len(_failures(tmp_path / "rnone")) == 1 and len(_outputs(tmp_path / "rnone")) == 8


def test_a_killed_actor_loses_nothing_and_a_rerun_encodes_only_what_is_missing(tmp_path, small_ckpt, local_ray):
    src = _folder(tmp_path / "in", good=24)
    killed: list[str] = []
    lock = threading.Lock()

    def kill_one_actor(result) -> None:
        with lock:
            if killed or result.status != "encoded":
                return
            for pid in _actor_processes():  # Ray Data's actors are unnamed: kill the process
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return

    out = tmp_path / "out"
    first = vitembed.encode([str(src)], out, engine="ray", ray=TWO_ACTORS, on_result=kill_one_actor, **_kw(small_ckpt, batch_size=2))
    assert killed, "no model actor was found to kill"
    assert first.encoded + first.failed <= 26
    done = len(_outputs(out))
    assert vitembed.load(out).embeddings.shape == (done, 17, 48)  # every output whole (a torn one would not load)
    again = vitembed.encode([str(src)], out, **_kw(small_ckpt))  # the local engine finishes what is missing
    assert (again.encoded, again.skipped) == (24 - done, done)
    reference = vitembed.encode([str(src)], tmp_path / "reference", **_kw(small_ckpt, batch_size=2))
    assert reference.encoded == 24
    assert _outputs(out) == _outputs(tmp_path / "reference")


def _actor_processes() -> list[int]:
    """Processes of model actors (Ray titles them ``ray::MapWorker(MapBatches(ModelActor))``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"ModelActor" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return sorted(pids)


def test_ray_and_local_runs_resume_each_other(tmp_path, small_ckpt, local_ray):
    src = _folder(tmp_path / "in")
    first_half = sorted(str(p) for p in src.rglob("img*.jpg"))[:4]
    out = tmp_path / "out"
    vitembed.encode(first_half, out, relative_to=str(src), **_kw(small_ckpt))
    on_ray = vitembed.encode([str(src)], out, relative_to=str(src), engine="ray", ray=TWO_ACTORS, **_kw(small_ckpt))
    assert (on_ray.encoded, on_ray.skipped, on_ray.failed) == (3, 4, 2)
    packed = tmp_path / "packed"
    vitembed.encode(first_half, packed, relative_to=str(src), engine="ray", ray=TWO_ACTORS, **_kw(small_ckpt, pack=3))
    local = vitembed.encode([str(src)], packed, relative_to=str(src), **_kw(small_ckpt, pack=3))
    assert (local.encoded, local.skipped, local.failed) == (3, 4, 2)
    whole = vitembed.encode([str(src)], tmp_path / "whole", **_kw(small_ckpt))
    assert whole.encoded == 7 and _outputs(out) == _outputs(tmp_path / "whole")


def test_the_cli_shows_the_cluster_and_exits_as_the_local_engine_does(tmp_path, small_ckpt):
    src = _folder(tmp_path / "in", good=3)
    result = run_cli("encode", str(src), "--out", str(tmp_path / "out"), "--weights", str(small_ckpt), "--engine", "ray",
                     "--actors", "1", "--decode-cpus", "0.5", "--actor-cpus", "1")
    assert result.returncode == 1, result.stderr.decode()  # two inputs failed, as locally
    err = result.stderr.decode()
    assert _summary(result.stderr).startswith("encoded 3, skipped 0, failed 2")
    panel = " ".join(err.replace("│", " ").split())  # the panel's lines, unwrapped
    assert "ray local (" in panel and "): 1 node, 2 CPUs, 0 GPUs; 1 CPU actor (1 CPU, 1 thread each), decode tasks of 0.5 CPU" in panel
    local = run_cli("encode", str(src), "--out", str(tmp_path / "o2"), "--weights", str(small_ckpt), "--actors", "2")
    assert local.returncode == 2 and b"--actors: for --engine ray only" in local.stderr


def test_a_layout_the_cluster_cannot_hold_is_refused_before_anything_starts(local_ray):
    from vitembed.engines.ray import connect

    with pytest.raises(UsageError, match=r"5 actor\(s\) of 1 CPU and a decode task of 1 CPU need 6 CPUs and 0 GPUs; "
                                          r"the cluster has 4 and 0"):
        connect(RayOptions(actors=5, actor_cpus=1))
    cluster = connect(RayOptions())  # the default layout: one CPU actor with the node's CPUs less one decode task
    assert (cluster.nodes, cluster.actors, cluster.actor_cpus, cluster.decode_cpus, cluster.threads) == (1, 1, 3.0, 1.0, 3)


def test_actors_that_cannot_build_the_model_end_the_run_with_an_engine_error(tmp_path, small_ckpt, local_ray):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(small_ckpt, ckpt)
    encoder = vitembed.Encoder(weights=str(ckpt))
    shutil.rmtree(ckpt)  # the actors find no weights file where the driver found one
    src = _folder(tmp_path / "in", good=2)
    with pytest.raises(vitembed.EngineError, match="--engine ray: the job failed: .*running the same command again resumes"):
        vitembed.encode([str(src)], tmp_path / "out", encoder, engine="ray", ray=TWO_ACTORS, batch_size=2)
    assert not list((tmp_path / "out").rglob("*.safetensors"))


def test_sigterm_during_a_ray_run_ends_it_as_locally(tmp_path, small_ckpt):
    """Ray's ray.init installs its own SIGTERM handler (which aborted the process, exit 134, no
    summary); vitembed keeps its own: exit 143, the summary line, whole outputs."""
    import subprocess
    import sys
    import time

    src = _folder(tmp_path / "in", good=150)
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vitembed", "encode", str(src), "--out", str(tmp_path / "out"),
                             "--weights", str(small_ckpt), "--engine", "ray", "--batch-size", "1", "--actors", "1",
                             "--decode-cpus", "0.5", "--actor-cpus", "1"], stderr=subprocess.PIPE, env=env)
    seen = b""
    while b"\xe2\x95\xb0" not in seen:  # the start panel's last line: Ray is up, the run is starting
        line = proc.stderr.readline()
        assert line, seen.decode()
        seen += line
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, (seen + rest).decode()
    assert b"terminated (SIGTERM): the outputs already written are complete" in rest
    assert _summary(rest).startswith("encoded ")
    written = len(_outputs(tmp_path / "out"))
    again = vitembed.encode([str(src)], tmp_path / "out", weights=str(small_ckpt))  # finishes what is missing
    assert (again.encoded, again.skipped, again.failed) == (150 - written, written, 2)


def test_paths_reach_the_workers_absolute(tmp_path, monkeypatch):
    from vitembed.engines.ray import _job_row
    from vitembed.inputs import Job
    from vitembed.shards import TarMember

    monkeypatch.chdir(tmp_path)
    row = _job_row(3, Job("in/a.jpg", "a.jpg", Path("out/a.jpg.safetensors")))
    assert (row["index"], row["source"], row["offset"]) == (3, str(tmp_path / "in" / "a.jpg"), -1)
    member = TarMember("s/0.tar", "x.jpg", 512, 10, (2048, 7))
    row = _job_row(0, Job(str(member), "0.tar/x.jpg", Path("out/0.tar/x.jpg.safetensors"), member))
    assert (row["shard"], row["member"], row["offset"], row["size"], row["stamp"]) == (
        str(tmp_path / "s" / "0.tar"), "x.jpg", 512, 10, [2048, 7])


def test_ray_options_are_checked():
    with pytest.raises(UsageError, match="--actors"):
        RayOptions(actors=0)
    with pytest.raises(UsageError, match="--decode-cpus must be a positive number"):
        RayOptions(decode_cpus=0)
    with pytest.raises(UsageError, match="--engine"):
        vitembed.RunOptions(engine="spark")
