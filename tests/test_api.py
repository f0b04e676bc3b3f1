"""The Python API: Encoder.encode on paths, PIL images, arrays and mixes; Encoder.preprocess;
vitembed.load on both layouts. Equal to the CLI's outputs, bit for bit, on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

import vitembed
from vitembed.errors import InputError, UsageError

from .conftest import jpeg_bytes, photo, run_cli


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three images on disk: a PNG, a JPEG, and a JPEG whose EXIF says 'rotate 90'."""
    folder = tmp_path_factory.mktemp("images")
    photo(50, 40, seed=1).save(folder / "a.png")
    (folder / "b.jpg").write_bytes(jpeg_bytes(photo(64, 48, seed=2)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to view
    photo(60, 30, seed=3).save(folder / "c.jpg", "JPEG", quality=90, exif=exif)
    return folder


@pytest.fixture(scope="module")
def cli_out(images, small_ckpt, tmp_path_factory):
    """What `vitembed encode` writes for the images: one file per image, and --pack 2."""
    out = tmp_path_factory.mktemp("cli")
    for name, extra in (("files", ()), ("packed", ("--pack", "2"))):
        r = run_cli("encode", str(images), "--out", str(out / name), "--weights", str(small_ckpt), "--device", "cpu", *extra)
        assert r.returncode == 0, r.stderr.decode()
    return out


@pytest.fixture(scope="module")
def encoder(small_ckpt):
    return vitembed.Encoder(weights=str(small_ckpt), device="cpu")


def _cli(cli_out, name):
    return torch.from_numpy(load_file(cli_out / "files" / f"{name}.safetensors")["embedding"])


def test_encode_paths_pil_images_arrays_and_a_mix_equal_the_cli(images, cli_out, encoder):
    want = torch.stack([_cli(cli_out, n) for n in ("a.png", "b.jpg", "c.jpg")])  # (3, 17, 48)
    paths = [images / "a.png", str(images / "b.jpg"), images / "c.jpg"]
    pil = [Image.open(p) for p in paths]  # lazily loaded, EXIF orientation still to apply
    array = np.asarray(Image.open(images / "a.png").convert("RGB"))  # (40, 50, 3) uint8: the PNG's own pixels
    assert want.shape == (3, 17, 48)
    for given in (paths, pil, [array, pil[1], str(paths[2])]):
        got = encoder.encode(given, batch_size=2)
        assert got.dtype == torch.float32 and got.shape == (3, 17, 48)
        assert (got - want).abs().max().item() == 0.0
    assert (encoder.encode(array) - want[:1]).abs().max().item() == 0.0  # one (H, W, 3) array is one image
    batch = np.stack([array, array])  # (N, H, W, 3) is N images
    assert encoder.encode(batch).shape == (2, 17, 48)


def test_pooled_encoder_returns_vectors_equal_to_the_cli(images, small_ckpt, tmp_path):
    r = run_cli("encode", str(images / "b.jpg"), "--out", str(tmp_path), "--weights", str(small_ckpt), "--pool", "cls",
                "--save-dtype", "float16")
    assert r.returncode == 0, r.stderr.decode()
    want = torch.from_numpy(load_file(tmp_path / "b.jpg.safetensors")["embedding"])
    enc = vitembed.Encoder(weights=str(small_ckpt), pool="cls", save_dtype="float16", device="cpu")
    got = enc.encode([images / "b.jpg"])
    assert got.shape == (1, 48) and got.dtype == torch.float16 and torch.equal(got[0], want)


def test_preprocess_is_the_model_input(images, encoder):
    x = encoder.preprocess(images / "b.jpg")
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    pixels = np.array(Image.open(images / "b.jpg").convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    want = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - 0.5) / 0.5  # the checkpoint's mean = std = 0.5
    assert (x - want).abs().max().item() < 1e-6
    with torch.inference_mode():
        tokens = encoder.model(x[None], layers=("last",))["last"]
    assert (tokens - encoder.encode([images / "b.jpg"])).abs().max().item() == 0.0


def test_a_bad_image_raises_naming_which_or_is_skipped(images, encoder, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    given = [images / "a.png", bad, np.zeros((4, 4), np.uint8), images / "b.jpg"]
    with pytest.raises(InputError, match=r"image 1 \(.*bad.jpg\): cannot identify image format"):
        encoder.encode(given)
    got, failures = encoder.encode(given, errors="skip")
    assert got.shape == (2, 17, 48)
    assert (got - encoder.encode([given[0], given[3]])).abs().max().item() == 0.0
    assert [(i, e.kind) for i, e in failures] == [(1, "not-an-image"), (2, "unsupported")]
    assert "image 2: array of shape (4, 4)" in str(failures[1][1])
    with pytest.raises(InputError, match="image 0: expected a path, a PIL image"):
        encoder.encode([3.5])
    with pytest.raises(UsageError, match="errors='ignore'"):
        encoder.encode(given, errors="ignore")
    empty = encoder.encode([])
    assert empty.shape == (0, 17, 48)


def test_encoder_options_are_checked_by_name(small_ckpt):
    with pytest.raises(UsageError, match=r"unknown option\(s\) pooling"):
        vitembed.Encoder(weights=str(small_ckpt), pooling="cls")
    with pytest.raises(UsageError, match="--pool 'max': expected one of none, cls, mean, patch"):
        vitembed.Encoder(weights=str(small_ckpt), pool="max")
    with pytest.raises(UsageError, match="--layer '7'"):
        vitembed.Encoder(weights=str(small_ckpt), layer=7)
    by_path = vitembed.Encoder(str(small_ckpt), device="cpu")  # a checkpoint folder as the model
    assert by_path.weights.source == str(small_ckpt) and by_path.output_shape == (17, 48)


def test_load_reads_both_layouts_a_file_and_a_part(cli_out, encoder, images):
    files = vitembed.load(cli_out / "files")
    packed = vitembed.load(cli_out / "packed")
    assert files.keys == packed.keys == ["a.png", "b.jpg", "c.jpg"]
    assert files.embeddings.shape == packed.embeddings.shape == (3, 17, 48)
    assert np.array_equal(files.embeddings, packed.embeddings)
    assert files.sources == packed.sources == [str(images / n) for n in ("a.png", "b.jpg", "c.jpg")]
    assert files.metadata["layout"] == "files" and packed.metadata["layout"] == "packed"
    assert files.metadata["layer"] == packed.metadata["layer"] == "last"
    api = encoder.encode([images / n for n in ("a.png", "b.jpg", "c.jpg")])
    assert (torch.from_numpy(files.embeddings) - api).abs().max().item() == 0.0
    one = vitembed.load(cli_out / "files" / "b.jpg.safetensors", as_torch=True)
    assert one.keys == ["b.jpg"] and torch.equal(one.embeddings[0], api[1])
    part = vitembed.load(cli_out / "packed" / "part-00000.safetensors")
    assert part.keys == ["a.png", "b.jpg"] and np.array_equal(part.embeddings, files.embeddings[:2])


def test_load_reads_npy_folders_and_refuses_what_is_not_an_output(images, small_ckpt, tmp_path):
    out = tmp_path / "npy"
    r = run_cli("encode", str(images), "--out", str(out), "--weights", str(small_ckpt), "--format", "npy")
    assert r.returncode == 0, r.stderr.decode()
    loaded = vitembed.load(out)
    assert loaded.keys == ["a.png", "b.jpg", "c.jpg"] and loaded.embeddings.shape == (3, 17, 48)
    assert loaded.metadata["format"] == "npy" and loaded.sources == ["", "", ""]
    with pytest.raises(InputError, match="no such file"):
        vitembed.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no vitembed outputs"):
        vitembed.load(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UsageError, match="is not a vitembed output"):
        vitembed.load(tmp_path / "notes.txt")


def test_import_and_load_need_no_torch(cli_out):
    import subprocess
    import sys

    code = ("import sys, vitembed; vitembed.ModelOptions(); vitembed.RunOptions(pack=2); "
            f"n = len(vitembed.load({str(cli_out / 'packed')!r})); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(n)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stderr


def test_encode_takes_one_path_as_one_input_not_its_characters(images, small_ckpt, tmp_path):
    summary = vitembed.encode(str(images / "a.png"), tmp_path / "out", vitembed.Encoder(weights=str(small_ckpt)))
    assert (summary.encoded, summary.failed) == (1, 0)
    assert [p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".safetensors"] == ["a.png.safetensors"]


def test_random_weights_warn_and_the_package_lists_its_api(small_ckpt):
    from vitembed.errors import VitembedWarning

    with pytest.warns(VitembedWarning, match="random weights; its embeddings carry no meaning"):
        enc = vitembed.Encoder("vit_tiny_patch16_224.augreg_in21k", weights="random", layer="embeddings")
    assert "layer='embeddings'" in repr(enc) and "(197, 192)" in repr(enc)
    assert {"Encoder", "encode", "load", "ModelOptions", "InputError"} <= set(dir(vitembed))
    assert vitembed.errors.VitembedError is vitembed.VitembedError


def test_warnings_point_at_the_callers_line_not_into_vitembed(images, tmp_path):
    """New-user report: vitembed.encode(weights="random") warned at vitembed/run.py:86."""
    from vitembed.errors import VitembedWarning

    with pytest.warns(VitembedWarning, match="carry no meaning") as caught:
        vitembed.encode([images / "a.png"], tmp_path / "out", model="vit_tiny_patch16_224.augreg_in21k",
                        weights="random", layer="embeddings", progress=False)
    assert [w.filename for w in caught if issubclass(w.category, VitembedWarning)] == [__file__]


def test_wrong_types_are_usage_or_input_errors(images, small_ckpt, encoder, tmp_path):
    for fields, match in ((dict(device=None), "--device must be"), (dict(weights=3), "--weights must be"),
                          (dict(allow_truncated="no"), "--allow-truncated must be True or False"),
                          (dict(compile="no"), "--compile must be True or False"), (dict(layer=2.5), "--layer must be")):
        with pytest.raises(UsageError, match=match):
            vitembed.Encoder(**{"weights": str(small_ckpt), **fields})
    with pytest.raises(UsageError, match="expected a vitembed.ModelOptions"):
        vitembed.Encoder(options={"model": "x"})
    for kwargs, match in ((dict(overwrite="no"), "--overwrite must be True or False"),
                          (dict(fail_fast=1), "--fail-fast must be True or False")):
        with pytest.raises(UsageError, match=match):
            vitembed.encode([str(images)], tmp_path / "o", encoder, **kwargs)
    with pytest.raises(UsageError, match="got a PngImageFile"):
        vitembed.encode([Image.open(images / "a.png")], tmp_path / "o", encoder)
    with pytest.raises(UsageError, match="--out must be a path"):
        vitembed.encode([str(images)], None, encoder)
    with pytest.raises(UsageError, match="workers must be an integer"):
        encoder.encode([images / "a.png"], workers="2")
    for given in ({images / "a.png"}, {"a": 1}):
        with pytest.raises(UsageError, match="has no order"):
            encoder.encode(given)
    for array, match in ((np.array(5), r"shape \(\) "), (np.zeros((20, 30), np.uint8), r"shape \(20, 30\)")):
        with pytest.raises(InputError, match=match):
            encoder.encode(array)
    with pytest.raises(InputError, match=r"image 0: image has no pixels \(0x0\)"):
        encoder.encode(Image.new("RGB", (0, 0)))
    small = vitembed.Encoder(weights=str(small_ckpt), max_pixels=100, device="cpu")
    with pytest.raises(InputError, match="20x20 pixels exceeds the limit of 100"):
        small.encode(np.zeros((20, 20, 3), np.uint8))


def test_layer_numbers_are_recorded_alike_and_the_old_calls_still_work(images, small_ckpt, tmp_path):
    assert vitembed.Encoder(weights=str(small_ckpt), layer="03").metadata()["layer"] == "3"
    with pytest.warns(DeprecationWarning, match="use vitembed.Encoder"):
        old = vitembed.load_encoder(weights=str(small_ckpt), layer="2", preprocess=dict(resize=None, mean=None))
    assert old.layer == "2"
    summary = vitembed.encode([str(images / "a.png")], tmp_path / "o", weights=str(small_ckpt), layer="2", pack=2)
    assert summary.encoded == 1 and vitembed.load(tmp_path / "o").metadata["layer"] == "2"


def test_a_failed_encode_stops_its_threads(images, encoder, tmp_path):
    import threading

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    before = threading.active_count()
    for _ in range(3):
        with pytest.raises(InputError):
            encoder.encode([bad, images / "a.png", images / "b.jpg"], batch_size=1)
    assert threading.active_count() == before


def test_encode_with_model_as_a_keyword_as_the_readme_shows(images, tmp_path):
    """Found by a new user: encode(..., model=..., weights=...) raised a TypeError."""
    import vitembed

    summary = vitembed.encode([images], tmp_path / "emb", model="dinov2-small", weights="random", pack=16)
    assert summary.encoded == 3 and summary.failed == 0
    with pytest.raises(vitembed.UsageError, match="given twice"):
        vitembed.encode([images], tmp_path / "x", "dinov2-small", model="dinov2-small", weights="random")
