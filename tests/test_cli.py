"""The vitembed command end to end, in subprocesses: outputs, metadata, exit codes, stdin, warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import ViTModel
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from .conftest import jpeg_bytes, photo, run_cli
from .helpers import _folder, _iter


def _tree(root: Path) -> dict[str, Path]:
    """Nested folders with same-stem files; returns relative name -> path of each image."""
    files = {
        "cat.jpg": lambda p: p.write_bytes(jpeg_bytes(photo(90, 60, seed=1))),
        "cat.png": lambda p: photo(64, 64, seed=2).save(p),
        "sub/cat.jpg": lambda p: p.write_bytes(jpeg_bytes(photo(40, 70, seed=3))),
        "sub/deeper/dog.JPEG": lambda p: p.write_bytes(jpeg_bytes(photo(33, 33, seed=4))),
    }
    out = {}
    for rel, make in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        make(path)
        out[rel] = path
    (root / "readme.txt").write_text("not an image, not picked up by the walk")
    return out


def _load(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    with safe_open(str(path), framework="numpy") as f:
        return f.get_tensor("embedding"), f.metadata()


def _reference(ckpt: Path, image_path: Path, layer: str = "last") -> np.ndarray:
    model = ViTModel.from_pretrained(ckpt).eval()
    with Image.open(image_path) as im:
        pixels = ViTImageProcessorPil(size={"height": 32, "width": 32})(im, do_convert_rgb=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**pixels, output_hidden_states=True)
    state = out.last_hidden_state if layer == "last" else out.hidden_states[0 if layer == "embeddings" else int(layer)]
    return state[0].numpy()


def test_encode_directory_writes_one_file_per_image_matching_transformers(tmp_path, small_ckpt):
    images = _tree(tmp_path / "imgs")
    out = tmp_path / "out"
    r = run_cli("encode", str(tmp_path / "imgs"), "--out", str(out), "--weights", str(small_ckpt), "--json", "--batch-size", "3")
    assert r.returncode == 0, r.stderr.decode()
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted([*(f"{rel}.safetensors" for rel in images), "vitembed.json", ".vitembed.lock"])
    lines = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert sorted(line["source"] for line in lines) == sorted(str(p) for p in images.values())
    assert {line["status"] for line in lines} == {"encoded"}
    for rel, src in images.items():
        array, meta = _load(out / f"{rel}.safetensors")
        assert array.shape == (17, 48) and array.dtype == np.float32
        assert meta["source"] == str(src)
        assert meta["layer"] == "last" and meta["weights"] == str(small_ckpt)
        assert meta["weights_sha256"] and len(meta["weights_sha256"]) == 64
        assert meta["random_weights"] == "false"
        assert meta["image_size"] == "32" and meta["resize"] == "squash" and meta["interpolation"] == "bilinear"
        assert meta["mean"] == "0.5,0.5,0.5" and meta["std"] == "0.5,0.5,0.5"
        assert meta["tokens"] == "17" and meta["prefix_tokens"] == "1" and meta["grid"] == "4x4"
        assert meta["vitembed_version"]
        diff = np.abs(array - _reference(small_ckpt, src)).max()
        assert diff < 1e-4, (rel, diff)
    assert "encoded 4, skipped 0, failed 0" in r.stderr.decode()


def test_inspect_reads_outputs_back(tmp_path, small_ckpt):
    _tree(tmp_path / "imgs")
    out = tmp_path / "out"
    assert run_cli("encode", str(tmp_path / "imgs"), "--out", str(out), "--weights", str(small_ckpt), "-q").returncode == 0
    files = sorted(out.rglob("*.safetensors"))
    r = run_cli("inspect", *map(str, files), "--json")
    assert r.returncode == 0, r.stderr.decode()
    infos = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert [i["path"] for i in infos] == [str(f) for f in files]
    for info, file in zip(infos, files):
        array, meta = _load(file)
        (tensor,) = info["tensors"]
        assert tensor["name"] == "embedding" and tensor["shape"] == [17, 48] and tensor["dtype"] == "float32"
        from vitembed.inspect import typed_metadata

        assert info["metadata"] == typed_metadata(meta) and info["metadata"]["depth"] == int(meta["depth"])
        stats = tensor["stats"]
        assert stats["min"] == pytest.approx(float(array.min())) and stats["max"] == pytest.approx(float(array.max()))
        assert stats["mean"] == pytest.approx(float(array.astype(np.float64).mean()))
        assert stats["nan"] == 0 and stats["inf"] == 0
        assert stats["token0_l2"] == pytest.approx(float(np.linalg.norm(array[0].astype(np.float64))))
    human = run_cli("inspect", str(files[0]))
    assert human.returncode == 0
    text = human.stdout.decode()
    assert "shape (17, 48) float32" in text and "weights_sha256" in text and "token0_l2" in text


def test_bad_files_are_named_and_skipped_and_exit_1(tmp_path, small_ckpt):
    src = tmp_path / "mixed"
    src.mkdir()
    (src / "good1.jpg").write_bytes(jpeg_bytes(photo(50, 50, seed=1)))
    (src / "good2.png").write_bytes(b"")
    photo(50, 40, seed=2).save(src / "good2.png")
    (src / "empty.jpg").write_bytes(b"")
    (src / "text.jpg").write_text("hello, not a jpeg")
    data = jpeg_bytes(photo(300, 200, seed=3))
    (src / "truncated.jpg").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    r = run_cli("encode", str(src), "--out", str(out), "--weights", str(small_ckpt))
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert sorted(p.name for p in out.iterdir()) == [
        ".vitembed.lock", "failures.jsonl", "good1.jpg.safetensors", "good2.png.safetensors", "vitembed.json"]
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted((os.path.basename(f["path"]), f["kind"]) for f in failures) == [
        ("empty.jpg", "empty"), ("text.jpg", "not-an-image"), ("truncated.jpg", "truncated")]
    assert f"{src / 'empty.jpg'}: empty file" in err
    assert f"{src / 'text.jpg'}: cannot identify image format" in err
    assert f"{src / 'truncated.jpg'}: cannot decode: image file is truncated" in err
    assert "encoded 2, skipped 0, failed 3" in err
    for name in ("good1.jpg", "good2.png"):
        assert _load(out / f"{name}.safetensors")[0].shape == (17, 48)


def test_default_model_random_weights_vit_b16_shape(tmp_path):
    img = tmp_path / "one photo.jpg"
    img.write_bytes(jpeg_bytes(photo(120, 90)))
    out = tmp_path / "out"
    r = run_cli("encode", str(img), "--out", str(out), "--weights", "random", "--layer", "embeddings")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "random weights" in err and "carry no meaning" in err
    array, meta = _load(out / "one photo.jpg.safetensors")
    assert array.shape == (197, 768) and array.dtype == np.float32
    assert meta["random_weights"] == "true" and meta["seed"] == "0" and meta["weights"] == "random"
    assert meta["model"] == "vit-base-patch16-224-in21k" and meta["layer"] == "embeddings"
    assert r.stdout == b""  # stdout is for machine output only


def test_npy_any_block_and_save_dtypes(tmp_path, small_ckpt):
    img = tmp_path / "p.png"
    photo(45, 45).save(img)
    r = run_cli("encode", str(img), "--out", str(tmp_path / "n"), "--weights", str(small_ckpt), "--format", "npy", "--layer", "2")
    assert r.returncode == 0, r.stderr.decode()
    array = np.load(tmp_path / "n" / "p.png.npy")
    assert array.shape == (17, 48) and array.dtype == np.float32
    assert np.abs(array - _reference(small_ckpt, img, "2")).max() < 1e-4

    r = run_cli("encode", str(img), "--out", str(tmp_path / "b"), "--weights", str(small_ckpt), "--save-dtype", "bfloat16")
    assert r.returncode == 0, r.stderr.decode()
    info = json.loads(run_cli("inspect", str(tmp_path / "b" / "p.png.safetensors"), "--json").stdout)
    assert info["tensors"][0]["dtype"] == "bfloat16" and info["metadata"]["save_dtype"] == "bfloat16"
    last = _reference(small_ckpt, img)
    assert info["tensors"][0]["stats"]["max"] == pytest.approx(float(last.max()), rel=1e-2)

    r = run_cli("encode", str(img), "--out", str(tmp_path / "x"), "--weights", str(small_ckpt), "--format", "npy", "--save-dtype", "bfloat16")
    assert r.returncode == 2 and "npy cannot hold bfloat16" in r.stderr.decode()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--layer", "4"], "--layer '4': expected 'last', 'embeddings' or a block number 1..3"),
        (["--model", "vit-huge-nope"], "unknown model 'vit-huge-nope'"),
        (["--weights", "/no/such/dir"], "--weights: /no/such/dir does not exist"),
    ],
)
def test_usage_errors_exit_2(tmp_path, small_ckpt, args, message):
    img = tmp_path / "p.png"
    photo(20, 20).save(img)
    base = ["--weights", str(small_ckpt)] if "--weights" not in args else []
    r = run_cli("encode", str(img), "--out", str(tmp_path / "o"), *base, *args)
    assert r.returncode == 2, r.stderr.decode()
    assert message in r.stderr.decode()
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_unavailable_device_is_an_error_not_a_fallback(tmp_path, small_ckpt):
    img = tmp_path / "p.png"
    photo(20, 20).save(img)
    r = run_cli("encode", str(img), "--out", str(tmp_path / "o"), "--weights", str(small_ckpt), "--device", "cuda")
    assert r.returncode == 2 and "--device cuda: CUDA is not available" in r.stderr.decode()


def test_paths_from_stdin_newline_and_nul(tmp_path, small_ckpt):
    work = tmp_path / "work"
    (work / "in dir").mkdir(parents=True)
    names = ["in dir/a b.png", "in dir/quote's.png", "in dir/ünï.png"]
    for i, name in enumerate(names):
        photo(20, 20, seed=i).save(work / name)
    outside = tmp_path / "outside.png"
    photo(20, 20, seed=9).save(outside)
    listing = "\n".join([*names, str(outside)]) + "\n"
    r = run_cli("encode", "-", "--out", "emb", "--weights", str(small_ckpt), input=listing.encode(), cwd=work)
    assert r.returncode == 0, r.stderr.decode()
    for name in names:
        assert (work / "emb" / f"{name}.safetensors").is_file()
    mapped = work / "emb" / "_root" / Path(*outside.parts[1:])
    assert Path(f"{mapped}.safetensors").is_file()

    newline_name = work / "in dir" / "new\nline.png"
    photo(20, 20, seed=5).save(newline_name)
    listing0 = "\0".join([names[0], str(newline_name.relative_to(work))]) + "\0"
    r = run_cli("encode", "-0", "-", "--out", "emb0", "--weights", str(small_ckpt), input=listing0.encode(), cwd=work)
    assert r.returncode == 0, r.stderr.decode()
    assert (work / "emb0" / "in dir" / "new\nline.png.safetensors").is_file()


def test_same_name_from_two_folders_is_a_reported_collision(tmp_path, small_ckpt):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        photo(20, 20).save(tmp_path / d / "cat.png")
    r = run_cli("encode", str(tmp_path / "a" / "cat.png"), str(tmp_path / "b" / "cat.png"), "--out", str(tmp_path / "o"), "--weights", str(small_ckpt))
    assert r.returncode == 1
    assert "would write the same output as" in r.stderr.decode()
    assert _load(tmp_path / "o" / "cat.png.safetensors")[1]["source"] == str(tmp_path / "a" / "cat.png")


def test_help_and_inspect_do_not_import_torch(tmp_path):
    path = tmp_path / "e.safetensors"
    from safetensors.numpy import save_file

    save_file({"embedding": np.ones((3, 4), np.float32)}, str(path), metadata={"layer": "last"})
    for args in (["--help"], ["inspect", str(path)], ["models"]):
        r = run_cli(*args, env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert r.returncode == 0, r.stderr.decode()
        imported = [line.split("|")[-1].strip() for line in r.stderr.decode().splitlines() if "|" in line]
        assert "typer" in imported and "torch" not in imported, args


def test_inspect_bad_file_exit_1(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    r = run_cli("inspect", str(bad), str(tmp_path / "missing.npy"))
    assert r.returncode == 1
    err = r.stderr.decode()
    assert f"{bad}: not a readable safetensors or npy file" in err and "missing.npy: no such file" in err


def test_no_images_found_warns_and_does_not_load_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    r = run_cli("encode", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--weights", "/no/such/weights")
    assert r.returncode == 0, r.stderr.decode()
    assert "no image files found" in r.stderr.decode()
    assert not (tmp_path / "o").exists()


def test_option_errors_come_before_loading_weights(tmp_path):
    photo(20, 20).save(tmp_path / "p.png")
    r = run_cli("encode", str(tmp_path / "p.png"), "--out", str(tmp_path / "o"), "--weights", "random", "--format", "npy", "--save-dtype", "bfloat16")
    assert r.returncode == 2
    assert "npy cannot hold bfloat16" in r.stderr.decode() and "random weights" not in r.stderr.decode()


def test_null_without_stdin_input_is_a_usage_error(tmp_path):
    r = run_cli("encode", str(tmp_path), "-0", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "add - to the inputs" in r.stderr.decode()


def test_closed_stdout_exits_141_and_keeps_the_rows(tmp_path, small_ckpt):
    src, out = _folder(tmp_path / "in", good=6), tmp_path / "out"
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitembed", "encode", str(src), "--out", str(out), "--weights", str(small_ckpt),
         "--pack", "4", "--batch-size", "1", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    proc.wait(timeout=300)
    err = proc.stderr.read().decode()
    assert proc.returncode == 141, err
    assert err.splitlines()[-1].startswith("stopped: stdout was closed by its reader; the outputs already written")
    assert 4 <= len(_iter(out)) <= 6


def test_closed_stderr_loses_the_messages_not_the_work(tmp_path, small_ckpt):
    """Breaking pass: `vitembed encode ... 2>&1 | head -1` exited 1 with nothing written (click
    turned the EPIPE of the start panel into exit 1)."""
    src, out = _folder(tmp_path / "in", good=3), tmp_path / "out"
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    read, write = os.pipe()
    os.close(read)  # no reader: every write to stderr is EPIPE
    proc = subprocess.run([sys.executable, "-m", "vitembed", "encode", str(src), "--out", str(out), "--weights",
                           str(small_ckpt)], env=env, stdout=subprocess.DEVNULL, stderr=write, timeout=300)
    os.close(write)
    assert proc.returncode == 0
    assert len(list(out.glob("*.safetensors"))) == 3


def test_float16_overflow_is_reported(tmp_path):
    from safetensors.torch import load_file as load_torch, save_file

    from .conftest import save_vit

    ckpt = save_vit(tmp_path / "ckpt")
    weights = load_torch(ckpt / "model.safetensors")
    weights["layernorm.weight"] = weights["layernorm.weight"] * 1e6  # outputs far beyond float16's 65504
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    src = _folder(tmp_path / "in", good=2)
    r = run_cli("encode", str(src), "--out", str(tmp_path / "out"), "--weights", str(ckpt), "--save-dtype", "float16")
    assert r.returncode == 0
    assert "warning: 2 embeddings hold Inf or NaN values (--save-dtype float16 overflow?" in r.stderr.decode()
