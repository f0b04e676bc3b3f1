"""vitembed inspect of folders and of packed rows, and --json metadata in a fixed order with
numbers as numbers."""

import json

import pytest

from vitembed.inspect import METADATA_ORDER

from .conftest import photo, run_cli


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, small_ckpt):
    root = tmp_path_factory.mktemp("inspect-dir")
    for i in range(3):
        photo(seed=i).save(root / f"im{i}.png")
    for name, extra in (("files", []), ("packed", ["--pack", "2", "--pool", "cls"])):
        r = run_cli("encode", str(root / "im0.png"), str(root / "im1.png"), str(root / "im2.png"), "--out", str(root / name),
                    "--weights", str(small_ckpt), "-q", *extra)
        assert r.returncode == 0, r.stderr.decode()
    return root


def test_inspect_a_folder_summarises_layout_count_shape_and_settings(outputs):
    files = json.loads(run_cli("inspect", str(outputs / "files"), "--json").stdout)
    assert (files["kind"], files["layout"], files["outputs"], files["format"], files["dtype"]) == (
        "folder", "files", 3, "safetensors", "float32")
    assert files["shape"] == [files["settings"]["tokens"], files["settings"]["hidden_size"]]
    assert isinstance(files["settings"]["depth"], int) and files["settings"]["random_weights"] is False
    packed = json.loads(run_cli("inspect", str(outputs / "packed"), "--json").stdout)
    assert (packed["layout"], packed["outputs"], packed["parts"]) == ("packed", 3, 2)
    assert packed["shape"] == [packed["settings"]["hidden_size"]] and packed["settings"]["pool"] == "cls"
    text = run_cli("inspect", str(outputs / "packed"))
    assert text.returncode == 0
    assert text.stdout.decode().splitlines()[0].endswith("(folder): packed (2 parts + index.jsonl), 3 outputs")


def test_inspect_reads_a_packed_row_by_key(outputs):
    r = run_cli("inspect", str(outputs / "packed"), "--key", "im2.png", "--json")
    assert r.returncode == 0, r.stderr.decode()
    info = json.loads(r.stdout)
    meta = info["metadata"]
    assert (meta["key"], meta["part"], meta["row"]) == ("im2.png", "part-00001.safetensors", 0)
    assert meta["source"].endswith("im2.png") and "keys" not in meta and "sources" not in meta
    assert info["tensors"][0]["shape"] == [meta["hidden_size"]]
    missing = run_cli("inspect", str(outputs / "packed"), "--key", "nope.png")
    assert missing.returncode == 1 and "no row with key 'nope.png'" in missing.stderr.decode()


def test_json_metadata_has_one_order_and_typed_numbers(outputs):
    lines = run_cli("inspect", *(str(outputs / "files" / f"im{i}.png.safetensors") for i in range(3)), "--json").stdout.splitlines()
    orders = {tuple(json.loads(line)["metadata"]) for line in lines}
    assert len(orders) == 1
    order = next(iter(orders))
    rank = [METADATA_ORDER.index(k) for k in order if k in METADATA_ORDER]
    assert rank == sorted(rank) and order[0] == "source"
    meta = json.loads(lines[0])["metadata"]
    assert type(meta["tokens"]) is int and type(meta["layer_norm_eps"]) is float and meta["crop"] in (True, False)
    assert meta["mean"].count(",") == 2 and meta["layer"] == "last"  # text stays text


def test_bookkeeping_files_are_named_as_such(outputs):
    r = run_cli("inspect", str(outputs / "files" / "vitembed.json"))
    assert r.returncode == 1 and "a bookkeeping file of an output folder" in r.stderr.decode()


def test_packed_folders_with_failures_lost_parts_or_odd_index_lines_get_messages(outputs, small_ckpt, tmp_path):
    """Breaking pass: a failed input's --key gave a TypeError, an all-failed pack an IndexError, a
    hand-edited row printed another key's row under this key, and a lost part still counted."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    photo(seed=5).save(src / "ok.png")
    (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    r = run_cli("encode", str(src), "--out", str(tmp_path / "pf"), "--pack", "4", "--weights", str(small_ckpt), "-q")
    assert r.returncode == 1
    r = run_cli("inspect", str(tmp_path / "pf"), "--key", "bad.png")
    assert r.returncode == 1 and "'bad.png' was not encoded: failed" in r.stderr.decode(), r.stderr.decode()
    info = json.loads(run_cli("inspect", str(tmp_path / "pf"), "--json").stdout)
    assert (info["outputs"], info["failed"], info["parts"]) == (1, 1, 1)
    (src / "ok.png").unlink()
    r = run_cli("encode", str(src), "--out", str(tmp_path / "pfo"), "--pack", "4", "--weights", str(small_ckpt), "-q")
    r = run_cli("inspect", str(tmp_path / "pfo"))
    assert r.returncode == 0 and "0 outputs, 1 failed inputs" in r.stdout.decode(), r.stderr.decode()
    packed = tmp_path / "packed"
    shutil.copytree(outputs / "packed", packed)
    index = packed / "index.jsonl"
    lines = index.read_text().splitlines()
    for row in ('"abc"', "null", "true", "-1", "1"):  # im0 is row 0 of part 0; row 1 holds im1
        index.write_text("\n".join(lines) + "\n" + json.dumps({"key": "im0.png", "part": "part-00000.safetensors",
                                                                "status": "encoded"})[:-1] + f', "row": {row}}}\n')
        r = run_cli("inspect", str(packed), "--key", "im0.png")
        assert r.returncode == 1 and "which does not hold it" in r.stderr.decode(), (row, r.stderr.decode())
    index.write_text("\n".join(lines) + "\n")
    (packed / "part-00001.safetensors").unlink()
    info = json.loads(run_cli("inspect", str(packed), "--json").stdout)
    assert (info["outputs"], info["parts"], info["missing_parts"]) == (3, 1, 1)
    index.unlink()  # the part left still holds its rows: found as export and show find them
    r = run_cli("inspect", str(packed), "--key", "im1.png", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["metadata"]["key"] == "im1.png", r.stderr.decode()
