"""vitembed export (vitembed/export.py): one .npy (+ keys.jsonl) or .parquet file of the pooled vectors
of a folder of outputs, equal to ``vitembed.load``; token outputs pooled on the way; streamed part by
part; all or nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import vitembed
from vitembed import export as export_mod
from vitembed.errors import InputError, UsageError
from vitembed.export import export_vectors, iter_vectors

from .conftest import photo, run_cli


@pytest.fixture(scope="module")
def emb(tmp_path_factory, small_ckpt):
    """Five distinct photos (one in a subfolder), encoded once each way the tests read."""
    root = tmp_path_factory.mktemp("export")
    src = root / "in"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        photo(40 + 7 * i, 30 + 5 * i, seed=i).save(src / ("sub" if i == 2 else ".") / f"img{i}.png")
    runs = {"tokens": ("none", {}), "mean": ("mean", {}), "cls": ("cls", {}), "packed": ("cls", dict(pack=2)),
            "npy": ("cls", dict(format="npy")), "bf16": ("cls", dict(pack=3))}
    for name, (pool, run) in runs.items():
        encoder = vitembed.Encoder(weights=str(small_ckpt), pool=pool, device="cpu",
                                   save_dtype="bfloat16" if name == "bf16" else "float32")
        assert vitembed.encode([str(src)], root / name, encoder, **run).encoded == 5
    return root


def _npy(out: Path):
    lines = [json.loads(line) for line in out.with_name(out.stem + ".keys.jsonl").read_text().splitlines()]
    assert [line["row"] for line in lines] == list(range(len(lines)))
    return np.load(out), [line["key"] for line in lines], [line["source"] for line in lines]


def _in_order(loaded, keys):
    at = {k: i for i, k in enumerate(loaded.keys)}
    return loaded.embeddings[[at[k] for k in keys]], [loaded.sources[at[k]] for k in keys]


@pytest.mark.parametrize("name", ["cls", "packed", "npy", "bf16"])
def test_npy_and_keys_equal_load(emb, tmp_path, name):
    from vitembed.layouts import iter_packed

    done = export_vectors(emb / name, tmp_path / "v.npy")
    array, keys, sources = _npy(tmp_path / "v.npy")
    loaded = vitembed.load(emb / name)
    assert (done.rows, done.dim, done.keys) == (5, 48, str(tmp_path / "v.keys.jsonl"))
    assert array.dtype == np.float32 and array.shape == (5, 48)
    assert loaded.metadata["save_dtype"] == ("bfloat16" if name == "bf16" else "float32")
    order = [k for k, _, _ in iter_packed(emb / name)] if name in ("packed", "bf16") else loaded.keys  # index order / sorted paths
    assert keys == order and "sub/img2.png" in keys
    expected, expected_sources = _in_order(loaded, keys)
    assert np.array_equal(array, expected) and sources == expected_sources
    assert all(s.endswith(k) for s, k in zip(sources, keys)) if name != "npy" else sources == [""] * 5


def test_parquet_is_a_fixed_size_list_of_float32(emb, tmp_path):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    export_vectors(emb / "packed", tmp_path / "v.parquet")
    assert pq.read_schema(tmp_path / "v.parquet").field("embedding").type == pa.list_(pa.float32(), 48)
    df = pd.read_parquet(tmp_path / "v.parquet")
    assert list(df.columns) == ["key", "source", "embedding"] and not (tmp_path / "v.keys.jsonl").exists()
    expected, sources = _in_order(vitembed.load(emb / "packed"), list(df.key))
    assert np.array_equal(np.stack(df.embedding), expected) and list(df.source) == sources


def test_token_outputs_are_pooled_as_encode_pools_them(emb, tmp_path):
    tokens = vitembed.load(emb / "tokens")  # (5, 17, 48): class token + 16 patches
    export_vectors(emb / "tokens", tmp_path / "mean.npy", pool="mean")
    export_vectors(emb / "tokens", tmp_path / "cls.npy", pool="cls")
    mean, keys, _ = _npy(tmp_path / "mean.npy")
    assert keys == tokens.keys
    assert np.allclose(mean, tokens.embeddings[:, 1:].mean(axis=1), atol=1e-6, rtol=0)
    assert np.allclose(mean, _in_order(vitembed.load(emb / "mean"), keys)[0], atol=1e-6, rtol=0)  # encode --pool mean
    assert np.array_equal(_npy(tmp_path / "cls.npy")[0], tokens.embeddings[:, 0])
    with pytest.raises(UsageError, match="pooled vectors already"):
        export_vectors(emb / "cls", tmp_path / "x.npy", pool="mean")


def test_poolings_token_outputs_cannot_give_are_refused():
    from vitembed.export import _pooler

    tokens = {"pool": "none", "prefix_tokens": "1", "family": "clip", "layer": "last"}
    for settings, pool, words in [(tokens, "cls", "post_layernorm"), ({**tokens, "family": "siglip", "prefix_tokens": "0"}, "cls", "no class token"),
                                  ({"pool": "patch"}, "cls", "patch tokens only"), ({"pool": "none"}, "mean", "prefix tokens")]:
        with pytest.raises(UsageError, match=words):
            _pooler(settings, (5, 8), pool, "x")
    assert np.array_equal(_pooler({**tokens, "layer": "2"}, (5, 8), "cls", "x")(np.eye(5, 8)), np.eye(5, 8)[0])
    with pytest.raises(UsageError, match="head needs the model"):
        next(iter_vectors(".", "head"))


def test_cli_json_and_the_errors_it_exits_2_with(emb, tmp_path):
    r = run_cli("export", str(emb / "cls"), str(tmp_path / "v.npy"), "--json")
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout) == {"rows": 5, "dim": 48, "out": str(tmp_path / "v.npy"), "keys": str(tmp_path / "v.keys.jsonl")}
    assert f"exported 5 vectors of 48 to {tmp_path / 'v.npy'}" in r.stderr.decode()
    r = run_cli("export", str(emb / "tokens"), str(tmp_path / "t.npy"))
    err = r.stderr.decode()
    assert r.returncode == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "hold tokens" in err and "--pool cls" in err and "--pool mean" in err and not (tmp_path / "t.npy").exists()
    r = run_cli("export", str(emb / "cls"), str(tmp_path / "v.csv"))
    assert r.returncode == 2 and "'.csv'" in r.stderr.decode() and not (tmp_path / "v.csv").exists()


def test_normalize_gives_unit_rows_and_leaves_zero_rows(emb, tmp_path):
    export_vectors(emb / "packed", tmp_path / "n.npy", normalize=True)
    array = _npy(tmp_path / "n.npy")[0]
    assert np.allclose(np.linalg.norm(array.astype(np.float64), axis=1), 1, atol=1e-6)
    folder = tmp_path / "raw"  # npy files without vitembed.json: pooled vectors need no settings
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros(8, np.float16))
    np.save(folder / "b.npy", np.arange(8, dtype=np.float16))
    export_vectors(folder, tmp_path / "z.npy", normalize=True)
    z = np.load(tmp_path / "z.npy")
    assert z.dtype == np.float32 and not z[0].any() and abs(np.linalg.norm(z[1]) - 1) < 1e-6


def test_faiss_finds_each_image_as_its_own_nearest_neighbour(emb, tmp_path):
    faiss = pytest.importorskip("faiss")
    export_vectors(emb / "packed", tmp_path / "v.npy", normalize=True)
    vectors, keys, _ = _npy(tmp_path / "v.npy")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    for row in range(len(keys)):
        scores, ids = index.search(vectors[row : row + 1], 2)
        assert ids[0, 0] == row and scores[0, 0] > scores[0, 1], keys[row]


def _synthetic_packed(folder: Path, parts: int, rows: int, dim: int) -> None:
    """A packed folder written by vitembed's own PackWriter (index.jsonl included)."""
    import torch

    from vitembed.layouts.packed import PackWriter

    writer = PackWriter(folder, rows, "part-", {"pool": "cls", "hidden_size": str(dim), "layout": "packed"})
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(parts * rows):
        if writer.add(f"img{i:05d}.png", f"in/img{i:05d}.png", torch.full((dim,), float(i))):
            assert writer.flush()[2] is None


def test_export_reads_one_part_at_a_time(tmp_path, monkeypatch):
    import vitembed.tensors

    _synthetic_packed(tmp_path / "emb", parts=6, rows=50, dim=16)
    real, held = vitembed.tensors.load_tensor, {"loaded": 0, "written": 0, "peak": 0}

    def load_tensor(path, name):
        array = real(path, name)
        held["peak"] = max(held["peak"], held["loaded"] - held["written"])  # rows read but not written yet
        held["loaded"] += len(array)
        return array

    write = export_mod._NpyWriter.write

    def counted(self, vectors, keys, sources):
        held["written"] += len(keys)
        return write(self, vectors, keys, sources)

    monkeypatch.setattr(vitembed.tensors, "load_tensor", load_tensor)
    monkeypatch.setattr(export_mod._NpyWriter, "write", counted)
    monkeypatch.setattr(export_mod._NpyWriter, "batch", 20)
    done = export_vectors(tmp_path / "emb", tmp_path / "v.npy")
    assert done.rows == held["loaded"] == held["written"] == 300
    assert held["peak"] <= 50  # never more than one part read ahead of what was written
    assert np.array_equal(np.load(tmp_path / "v.npy")[:, 0], np.arange(300, dtype=np.float32))


def test_packed_rows_are_those_iter_packed_gives_without_holding_the_index(tmp_path, monkeypatch):
    """Re-encoded keys (the last line wins), a part a killed run never indexed, a key whose latest
    line is a failure and a torn line: export reads the same rows as ``iter_packed`` and does not
    build the index as dicts (``scan_index``: about 1.2 KB a row; ``live_rows``: about 40 bytes)."""
    import torch

    from vitembed.layouts import packed_index
    from vitembed.layouts.packed import PackWriter, iter_packed

    folder = tmp_path / "emb"
    _synthetic_packed(folder, parts=3, rows=4, dim=8)  # img00000 .. img00011
    meta = {"pool": "cls", "hidden_size": "8", "layout": "packed"}
    writer = PackWriter(folder, 3, "part-", meta)  # img00001 again, img00004 again, a new img00100
    for key, value in (("img00001.png", 101.0), ("img00004.png", 104.0), ("img00100.png", 100.0)):
        writer.add(key, f"in/{key}", torch.full((8,), value))
    assert writer.flush()[2] is None
    index = folder / "index.jsonl"
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines[:-3]) + "\n" + '{"key": "img00005.png", "status": "failed"}\n{"key": "img0\n')
    with pytest.warns(Warning):
        expected = [(k, s, np.asarray(a)) for k, s, a in iter_packed(folder)]
    assert [k for k, _, _ in expected] == ["img00000.png", "img00002.png", "img00003.png", *(
        f"img{i:05d}.png" for i in (6, 7, 8, 9, 10, 11)), "img00001.png", "img00004.png", "img00100.png"]

    def no_dicts(*args, **kwargs):
        raise AssertionError("export held the index as dicts")

    monkeypatch.setattr(packed_index, "scan_index", no_dicts)
    with pytest.warns(Warning, match="not valid index entries"):
        got = list(iter_vectors(folder))
    assert [(k, s) for k, s, _ in got] == [(k, s) for k, s, _ in expected]
    assert all(np.array_equal(v, a) for (_, _, v), (_, _, a) in zip(got, expected))
    index.write_text(index.read_text() + '{"key": "img00000.png", "part": "part-00000.safetensors", "row": 3, '
                                         '"status": "encoded"}\n')  # row 3 holds img00003: not where it says
    with pytest.raises(UsageError, match="not where it says"), pytest.warns(Warning):
        list(iter_vectors(folder))


def _no_output(folder: Path) -> bool:
    return not any(folder.iterdir())


def test_a_corrupt_part_or_file_leaves_no_output(emb, tmp_path, monkeypatch):
    packed = tmp_path / "packed"
    shutil.copytree(emb / "packed", packed)
    part = packed / "part-00001.safetensors"
    part.write_bytes(part.read_bytes()[:-8])
    (tmp_path / "out").mkdir()
    r = run_cli("export", str(packed), str(tmp_path / "out" / "v.npy"))
    assert r.returncode == 2 and "part-00001.safetensors" in r.stderr.decode(), r.stderr.decode()
    assert _no_output(tmp_path / "out")
    files = tmp_path / "files"  # a file part-way: rows before it were written already
    shutil.copytree(emb / "cls", files)
    (files / "sub" / "img2.png.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    monkeypatch.setattr(export_mod._ParquetWriter, "batch", 2)
    with pytest.raises(InputError, match=r"img2\.png\.safetensors"):
        export_vectors(files, tmp_path / "out" / "v.parquet")
    assert _no_output(tmp_path / "out")


def test_outputs_of_other_settings_are_named(emb, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(emb / "cls", mixed)
    shutil.copy(emb / "mean" / "img1.png.safetensors", mixed / "zz.png.safetensors")  # same shape, other --pool
    with pytest.raises(UsageError, match=r"zz\.png\.safetensors: made with other settings.*pool"):
        export_vectors(mixed, tmp_path / "v.npy")
    assert not (tmp_path / "v.npy").exists() and not (tmp_path / "v.keys.jsonl").exists()


def test_out_never_lands_in_an_output_folder_and_a_damaged_part_is_named(emb, tmp_path):
    """Breaking pass: OUT through a symlink into EMB, or into another output folder, replaced outputs
    there; OUT a folder left OUT.keys.jsonl behind; a missing part was blamed on 'other settings';
    a FIFO among the outputs hung the export."""
    import os

    (tmp_path / "link").symlink_to(emb / "cls")
    for out, words in ((tmp_path / "link" / "x.npy", "is inside"), (emb / "npy" / "img0.png.npy", "output folder of vitembed encode"),
                       (emb / "packed" / "v.parquet", "output folder of vitembed encode")):
        before = sorted(p.name for p in out.parent.iterdir())
        r = run_cli("export", str(emb / "cls"), str(out))
        assert r.returncode == 2 and words in r.stderr.decode(), r.stderr.decode()
        assert sorted(p.name for p in out.parent.iterdir()) == before
    (tmp_path / "o.npy").mkdir()
    r = run_cli("export", str(emb / "cls"), str(tmp_path / "o.npy"))
    assert r.returncode == 2 and "is a folder" in r.stderr.decode() and not (tmp_path / "o.keys.jsonl").exists()
    packed = tmp_path / "packed"
    shutil.copytree(emb / "packed", packed)
    (packed / "part-00001.safetensors").unlink()
    r = run_cli("export", str(packed), str(tmp_path / "p.npy"))
    err = r.stderr.decode()
    assert r.returncode == 2 and "part-00001.safetensors: missing, cut short or not a part file" in err, err
    assert "other settings" not in err and not (tmp_path / "p.npy").exists()
    fifo = tmp_path / "fifo"
    shutil.copytree(emb / "cls", fifo)
    os.mkfifo(fifo / "zz.safetensors")
    r = run_cli("export", str(fifo), str(tmp_path / "f.npy"), timeout=60)
    assert r.returncode == 2 and "zz.safetensors: not a regular file" in r.stderr.decode(), r.stderr.decode()
