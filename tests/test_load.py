"""vitembed.load: reading outputs back through the layout that owns them, and refusing what
it cannot read whole or what mixes two sets of settings."""

from __future__ import annotations

import numpy as np
import pytest

import vitembed
from vitembed.errors import InputError, UsageError

from .conftest import photo


@pytest.fixture(scope="module")
def encoders(small_ckpt):
    return {layer: vitembed.Encoder(weights=str(small_ckpt), layer=layer, device="cpu") for layer in ("last", "2")}


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        photo(40 + i, 30, seed=i).save(folder / f"img{i}.png")
    return folder


@pytest.mark.parametrize("run", [dict(pack=4), dict(format="npy")])
def test_an_unfinished_overwrite_is_refused_not_mixed(src, tmp_path, encoders, run):
    out = tmp_path / "out"
    assert vitembed.encode([str(src)], out, encoders["last"], **run).encoded == 3
    partial = vitembed.encode([str(src / "img0.png")], out, encoders["2"], overwrite=True, **run)  # 1 of 3 redone
    assert partial.encoded == 1
    with pytest.raises(UsageError, match="two sets of settings|has not finished"):
        vitembed.load(out)
    assert vitembed.encode([str(src)], out, encoders["2"], overwrite=True, **run).encoded == 3  # all of them...
    loaded = vitembed.load(out)  # ...makes the folder readable, all of one layer
    assert loaded.metadata["layer"] == "2" and loaded.embeddings.shape == (3, 17, 48)


def test_broken_and_foreign_files_are_input_errors(tmp_path, small_ckpt):
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    for name in ("empty.npy", "cut.safetensors", ):
        with pytest.raises(InputError, match="not a readable vitembed output"):
            vitembed.load(tmp_path / name)
    with pytest.raises(InputError, match="no 'embedding' tensor"):
        vitembed.load(small_ckpt / "model.safetensors")
    for bad in (None, 3, b"dir", ""):
        with pytest.raises(UsageError, match="expected the path of an output"):
            vitembed.load(bad)


def test_a_packed_folder_without_its_settings_file_or_with_only_failures(src, tmp_path, encoders):
    out = tmp_path / "out"
    vitembed.encode([str(src)], out, encoders["last"], pack=2)
    (out / "vitembed.json").unlink()
    assert vitembed.load(out).metadata["layer"] == "last"  # from the parts themselves
    failed = tmp_path / "failed"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    assert vitembed.encode([str(tmp_path / "bad")], failed, encoders["last"], pack=2).failed == 1
    with pytest.raises(UsageError, match="holds no encoded embeddings"):
        vitembed.load(failed)


def test_a_per_image_output_named_like_a_part_is_read_as_one(tmp_path, encoders):
    src = tmp_path / "in"
    src.mkdir()
    photo(40, 30).save(src / "pic.png")
    (src / "part-00000").write_bytes((src / "pic.png").read_bytes())  # no extension: still an image to Pillow
    out = tmp_path / "out"
    summary = vitembed.encode([str(src / "part-00000"), str(src / "pic.png")], out, encoders["last"])
    assert summary.encoded == 2 and (out / "part-00000.safetensors").is_file()
    loaded = vitembed.load(out)
    assert loaded.keys == ["part-00000", "pic.png"]
    assert np.array_equal(loaded.embeddings[0], loaded.embeddings[1])


def test_a_packed_folder_inside_a_folder_of_files_is_named_not_skipped(src, tmp_path, encoders):
    out = tmp_path / "out"
    vitembed.encode([str(src)], out, encoders["last"])
    vitembed.encode([str(src)], out / "packed", encoders["last"], pack=2)
    with pytest.raises(UsageError, match="holds packed outputs .* load that folder by itself"):
        vitembed.load(out)
    assert len(vitembed.load(out / "packed")) == 3
