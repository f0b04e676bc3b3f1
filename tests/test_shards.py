"""WebDataset tar shards as inputs: one input per image member, read in place; damaged members,
truncated and compressed shards; --pack over shards; resume; brace patterns."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

import vitembed
from vitembed.inputs import plan_jobs
from vitembed.shards import expand_braces, member_relpath

from .conftest import jpeg_bytes, photo, run_cli
from .helpers import _summary


def _shard(path: Path, samples: dict[str, bytes]) -> Path:
    """A WebDataset shard: for each sample key, ``<key>.jpg`` (the bytes given) and ``<key>.json``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, data in samples.items():
            for name, body in ((f"{key}.jpg", data), (f"{key}.json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return path


def _images(count: int, start: int = 0) -> dict[str, bytes]:
    return {f"{i:06d}": jpeg_bytes(photo(60 + i, 40 + i, seed=i)) for i in range(start, start + count)}


def _kw(small_ckpt, **more):
    return dict(weights=str(small_ckpt), workers=2, batch_size=3, **more)


def test_members_encode_equal_to_the_same_images_as_files(tmp_path, small_ckpt):
    samples = _images(5)
    shard = _shard(tmp_path / "shards" / "00000.tar", samples)
    files = tmp_path / "files"
    files.mkdir()
    for key, data in samples.items():
        (files / f"{key}.jpg").write_bytes(data)
    from_tar = vitembed.encode([str(shard)], tmp_path / "a", **_kw(small_ckpt))
    from_files = vitembed.encode([str(files)], tmp_path / "b", **_kw(small_ckpt))
    assert (from_tar.encoded, from_tar.failed, from_files.encoded) == (5, 0, 5)
    a, b = vitembed.load(tmp_path / "a"), vitembed.load(tmp_path / "b")
    assert a.keys == [f"00000.tar/{k}.jpg" for k in samples]  # the .json members are not inputs
    assert b.keys == [f"{k}.jpg" for k in samples]
    np.testing.assert_array_equal(a.embeddings, b.embeddings)  # the same bytes, so the same numbers
    assert a.sources == [f"{shard}/{k}.jpg" for k in samples]
    assert (tmp_path / "a" / "00000.tar" / "000000.jpg.safetensors").is_file()
    assert not any(p.suffix == ".jpg" for p in tmp_path.rglob("*") if "files" not in p.parts)  # nothing extracted


def test_a_damaged_member_fails_alone_and_a_rerun_resumes(tmp_path, small_ckpt):
    samples = _images(4)
    samples["000002"] = b"\xff\xd8\xff not a jpeg at all"
    shard = _shard(tmp_path / "s.tar", samples)
    out = tmp_path / "out"
    first = vitembed.encode([str(shard)], out, **_kw(small_ckpt))
    assert (first.encoded, first.failed) == (3, 1)
    failure = json.loads((out / "failures.jsonl").read_text().splitlines()[0])
    assert failure["path"] == f"{shard}/000002.jpg" and failure["kind"] == "not-an-image"
    again = vitembed.encode([str(shard)], out, **_kw(small_ckpt))
    assert (again.encoded, again.skipped, again.failed) == (0, 3, 1)


def test_a_truncated_shard_fails_the_member_it_cuts_and_nothing_else(tmp_path, small_ckpt):
    samples = _images(4)
    whole = _shard(tmp_path / "whole.tar", samples).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        third = tar.getmember("000002.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: third.offset_data + third.size // 2])  # the end falls inside 000002.jpg
    summary = vitembed.encode([str(cut)], tmp_path / "out", **_kw(small_ckpt))
    assert (summary.encoded, summary.failed) == (2, 1)  # 000003 lies beyond the end: not an input
    failure = json.loads((tmp_path / "out" / "failures.jsonl").read_text())
    assert failure["path"] == f"{cut}/000002.jpg" and failure["kind"] == "truncated"
    assert "truncated tar" in failure["message"]
    # A cut inside a header: the members before it are encoded, the shard is reported once.
    header_cut = tmp_path / "header_cut.tar"
    header_cut.write_bytes(whole[: third.offset_data - 512 + 100])
    plan = plan_jobs([str(header_cut)], tmp_path / "o2", "safetensors")
    assert [j.key for j in plan.jobs] == ["header_cut.tar/000000.jpg", "header_cut.tar/000001.jpg"]
    assert [(p.path, p.kind) for p in plan.problems] == [(str(header_cut), "truncated")]
    # A damaged header in the middle: the same, kind unreadable.
    damaged = tmp_path / "damaged.tar"
    header = third.offset_data - 512
    damaged.write_bytes(whole[:header] + b"\x07" * 512 + whole[header + 512:])
    plan = plan_jobs([str(damaged)], tmp_path / "o3", "safetensors")
    assert [j.key for j in plan.jobs] == ["damaged.tar/000000.jpg", "damaged.tar/000001.jpg"]
    assert [(p.path, p.kind) for p in plan.problems] == [(str(damaged), "unreadable")]
    assert "damaged tar header after 000001.json (byte " in plan.problems[0].reason


def _header_field(data: bytes, header: int, start: int, value: bytes) -> bytes:
    """``data`` with bytes ``start..`` of the tar header at offset ``header`` replaced, checksum fixed."""
    block = bytearray(data[header:header + 512])
    block[start:start + len(value)] = value
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return data[:header] + bytes(block) + data[header + 512:]


def test_every_way_a_shard_ends_early_or_breaks_is_reported(tmp_path):
    whole = _shard(tmp_path / "whole.tar", _images(3)).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
    json0, jpg1 = members["000000.json"], members["000001.jpg"]
    cases = {
        "in_json.tar": whole[: json0.offset_data + 3],  # the end cuts a .json member's data
        "no_marker.tar": whole[: jpg1.offset],  # cut exactly at a header boundary
        "huge_size.tar": _header_field(whole, jpg1.offset, 124, b"\x80" + b"\0" * 3 + b"\x7f" + b"\xff" * 7),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    plan = plan_jobs([str(tmp_path / n) for n in cases], tmp_path / "out", "safetensors")
    assert [j.key for j in plan.jobs] == ["in_json.tar/000000.jpg", "no_marker.tar/000000.jpg", "huge_size.tar/000000.jpg",
                                          "huge_size.tar/000001.jpg"]
    from vitembed.errors import InputError

    with pytest.raises(InputError, match=r"its header claims \d+ bytes, but the shard ends \d+ bytes short"):
        plan.jobs[-1].member.read()  # fails alone, before reading (or allocating) what it claims
    kinds = {Path(p.path).name: (p.kind, p.reason) for p in plan.problems}
    assert kinds["in_json.tar"][0] == "truncated" and "ends inside the data of 000000.json" in kinds["in_json.tar"][1]
    assert kinds["no_marker.tar"][0] == "truncated" and "no end-of-archive marker" in kinds["no_marker.tar"][1]
    assert kinds["huge_size.tar"][0] == "unreadable" and "damaged tar header after 000001.jpg (" in kinds["huge_size.tar"][1]


def test_a_shard_rewritten_after_planning_fails_its_members_instead_of_giving_other_images(tmp_path, small_ckpt):
    samples = _images(3)
    shard = _shard(tmp_path / "s.tar", samples)
    plan = plan_jobs([str(shard)], tmp_path / "out", "safetensors")
    _shard(shard, dict(reversed(list(samples.items()))))  # the same samples, in another order
    from vitembed.preprocess import load_pixels
    from vitembed.preprocess_config import PreprocessConfig
    from vitembed.errors import InputError

    with pytest.raises(InputError, match="the shard changed since the run listed it"):
        load_pixels(plan.jobs[0].image, PreprocessConfig())


def test_fifos_and_link_members_are_reported_not_waited_for(tmp_path):
    import os

    (tmp_path / "pipe.tar").unlink(missing_ok=True)
    os.mkfifo(tmp_path / "pipe.tar")
    with tarfile.open(tmp_path / "links.tar", "w") as tar:
        for name, kind in (("a.jpg", tarfile.SYMTYPE), ("b.jpg", tarfile.LNKTYPE), ("notes.txt", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "elsewhere.jpg"
            tar.addfile(info)
    plan = plan_jobs([str(tmp_path)], tmp_path / "out", "safetensors")  # a folder walk takes both
    assert plan.jobs == []
    assert sorted((Path(p.path).name, p.kind) for p in plan.problems) == [
        ("a.jpg", "unsupported"), ("b.jpg", "unsupported"), ("pipe.tar", "unreadable")]


def test_pack_over_shards_and_brace_patterns(tmp_path, small_ckpt):
    for s in range(3):
        _shard(tmp_path / "shards" / f"{s:05d}.tar", _images(3, start=3 * s))
    pattern = str(tmp_path / "shards" / "{00000..00002}.tar")
    result = run_cli("encode", pattern, "--out", str(tmp_path / "out"), "--weights", str(small_ckpt), "--pack", "4")
    assert result.returncode == 0, result.stderr.decode()
    assert _summary(result.stderr).startswith("encoded 9, skipped 0, failed 0")
    packed = vitembed.load(tmp_path / "out")
    assert packed.keys == sorted(f"{s:05d}.tar/{i:06d}.jpg" for s in range(3) for i in range(3 * s, 3 * s + 3))
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*.safetensors")) == [
        "part-00000.safetensors", "part-00001.safetensors", "part-00002.safetensors"]
    files = vitembed.encode([str(tmp_path / "shards")], tmp_path / "files", **_kw(small_ckpt))  # a folder of shards
    assert files.encoded == 9
    np.testing.assert_array_equal(vitembed.load(tmp_path / "files").embeddings, packed.embeddings)
    again = run_cli("encode", pattern, "--out", str(tmp_path / "out"), "--weights", str(small_ckpt), "--pack", "4")
    assert _summary(again.stderr).startswith("encoded 0, skipped 9, failed 0")


def test_compressed_and_foreign_tars_are_refused_by_name(tmp_path):
    raw = _shard(tmp_path / "s.tar", _images(1)).read_bytes()
    (tmp_path / "z.tar").write_bytes(gzip.compress(raw))
    (tmp_path / "junk.tar").write_bytes(b"this is no tar" * 100)
    plan = plan_jobs([str(tmp_path / "z.tar"), str(tmp_path / "junk.tar")], tmp_path / "out", "safetensors")
    assert plan.jobs == []
    (zipped, junk) = plan.problems
    assert (zipped.path, zipped.kind) == (str(tmp_path / "z.tar"), "unsupported") and "gzip" in zipped.reason
    assert (junk.path, junk.kind) == (str(tmp_path / "junk.tar"), "not-an-image") and "not a tar" in junk.reason


def test_member_names_that_climb_out_are_refused(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("../../escape.jpg", "/abs.jpg", "./ok/x.jpg"):
            body = jpeg_bytes(photo(20, 20))
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    plan = plan_jobs([str(path)], tmp_path / "out", "safetensors")
    assert [j.relpath for j in plan.jobs] == ["evil.tar/ok/x.jpg"]
    assert {p.kind for p in plan.problems} == {"bad-name"}
    assert sorted(p.path for p in plan.problems) == [f"{path}/../../escape.jpg", f"{path}//abs.jpg"]
    assert all(str(j.output).startswith(str(tmp_path / "out")) for j in plan.jobs)


def test_two_members_of_one_name_the_first_encoded_the_second_reported_once(tmp_path):
    path = tmp_path / "dups.tar"
    with tarfile.open(path, "w") as tar:
        for seed in (1, 2):
            body = jpeg_bytes(photo(20, 20, seed=seed))
            info = tarfile.TarInfo("a.jpg")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    plan = plan_jobs([str(path), str(tmp_path)], tmp_path / "out", "safetensors")  # also found by the walk
    assert [j.key for j in plan.jobs] == ["dups.tar/a.jpg"] and plan.jobs[0].member.offset == 512
    assert [(p.kind, "the first is encoded" in p.reason) for p in plan.problems] == [("collision", True)]
    assert len(plan.duplicates) == 2  # the first and the second member, named again through the walk


@pytest.mark.parametrize("pattern, expected", [
    ("s/{00000..00002}.tar", ["s/00000.tar", "s/00001.tar", "s/00002.tar"]),
    ("{a,b}/{8..10}.tar", ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]),
    ("{3..1}", ["3", "2", "1"]),
    ("plain.tar", ["plain.tar"]),
    ("{x}/{0..1}.tar", ["{x}/0.tar", "{x}/1.tar"]),
    ("{1..010..4}", ["001", "005", "009"]),  # bash pads to the wider bound, and steps
    ("{a..c}{-1..1}", ["a-1", "a0", "a1", "b-1", "b0", "b1", "c-1", "c0", "c1"]),
    ("{" + "9" * 5000 + "..1}", ["{" + "9" * 5000 + "..1}"]),  # not a range we expand: kept as written
])
def test_brace_patterns_expand_as_webdataset_writes_them(pattern, expected):
    assert expand_braces(pattern) == expected


def test_a_brace_pattern_of_too_many_names_is_refused():
    from vitembed.errors import UsageError

    with pytest.raises(UsageError, match=r"names more than 100000 files; list the shards on stdin"):
        expand_braces("s/{0..99999999}.tar")
    with pytest.raises(UsageError, match=r"names more than 100000 files"):
        expand_braces("{0..1000}/{0..1000}.tar")
    assert len(expand_braces("{00000..99999}.tar")) == 100_000
    assert expand_braces("s/" + "{x}" * 1500 + "{0..1}") == ["s/" + "{x}" * 1500 + n for n in "01"]  # no recursion limit


def test_member_relpath():
    assert member_relpath("./a//b.jpg") == "a/b.jpg"
    assert member_relpath("a/../../b.jpg") is None and member_relpath("/b.jpg") is None and member_relpath(".") is None
