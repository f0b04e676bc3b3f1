"""Weights resolution: --weights, $VITEMBED_WEIGHTS, ./weights/<name>/, the Hugging Face cache, and the error."""

from __future__ import annotations

import shutil

import pytest
from safetensors import safe_open

from vitembed.catalog import get_model_spec
from vitembed.errors import WeightsNotFoundError
from vitembed.weights import resolve_weights, sha256_file
from vitembed.files import atomic_write

from .conftest import photo, run_cli

SPEC = get_model_spec("vit-base-patch16-224-in21k")


def test_explicit_directory_wins(small_ckpt, tmp_path):
    w = resolve_weights(SPEC, small_ckpt, environ={"VITEMBED_WEIGHTS": "/elsewhere"}, cwd=tmp_path)
    assert w.source == str(small_ckpt) and w.config.hidden_size == 48 and not w.random
    assert w.sha256 == sha256_file(small_ckpt / "model.safetensors")
    assert w.preprocess.image_size == 32  # follows the checkpoint's image_size


def test_env_var_then_local_weights_folder(small_ckpt, tmp_path):
    local = tmp_path / "weights" / SPEC.name
    shutil.copytree(small_ckpt, local)
    assert resolve_weights(SPEC, environ={"VITEMBED_WEIGHTS": str(small_ckpt)}, cwd=tmp_path).source == str(small_ckpt)
    # Empty means unset: the next place, ./weights/<name>/, is used.
    assert resolve_weights(SPEC, environ={"VITEMBED_WEIGHTS": ""}, cwd=tmp_path).source == str(local)


def test_random_only_when_asked(tmp_path):
    w = resolve_weights(SPEC, "random", seed=3)
    assert w.random and w.seed == 3 and w.config.hidden_size == 768 and w.sha256 == ""
    with pytest.raises(WeightsNotFoundError):
        resolve_weights(SPEC, environ={"VITEMBED_WEIGHTS": str(tmp_path / "random")}, cwd=tmp_path)


def _hf_cache(hf_home, repo: str, ckpt) -> None:  # noqa: D401
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/...}."""
    base = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ckpt / name, snap / name)


def test_hugging_face_cache_offline(tmp_path, small_ckpt):
    _hf_cache(tmp_path / "hf", SPEC.repo, small_ckpt)
    photo(30, 30).save(tmp_path / "p.png")
    r = run_cli(
        "encode", "p.png", "--out", "o",
        env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "VITEMBED_WEIGHTS": ""},
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr.decode()
    with safe_open(str(tmp_path / "o" / "p.png.safetensors"), "numpy") as f:
        meta = f.metadata()
    assert meta["weights"] == f"hf://{SPEC.repo}"
    assert meta["weights_sha256"] == sha256_file(small_ckpt / "model.safetensors")


def test_nothing_found_exits_2_and_says_how(tmp_path):
    photo(30, 30).save(tmp_path / "p.png")
    r = run_cli(
        "encode", "p.png", "--out", "o",
        env={"HF_HOME": str(tmp_path / "empty-hf"), "HF_HUB_OFFLINE": "1", "VITEMBED_WEIGHTS": ""},
        cwd=tmp_path,
    )
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "no weights found for model 'vit-base-patch16-224-in21k'" in err
    assert "HF_HUB_OFFLINE is set" in err
    for hint in ("--weights DIR", "export VITEMBED_WEIGHTS=DIR", f"weights/{SPEC.name}/", "--weights random", SPEC.repo):
        assert hint in err
    assert not (tmp_path / "o").exists()


def test_atomic_write_leaves_old_file_whole_on_failure(tmp_path):
    target = tmp_path / "out" / "a.safetensors"
    atomic_write(target, b"complete old contents")

    class Exploding:
        def __buffer__(self, flags):
            raise OSError(28, "No space left on device")

    with pytest.raises((OSError, TypeError)):
        atomic_write(target, Exploding())
    assert target.read_bytes() == b"complete old contents"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.safetensors"]


def test_timm_repository_in_the_cache_uses_the_catalog_architecture(tmp_path):
    """A timm hub repository holds timm-layout weights and a timm config: vitembed reads the weights only."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from vitembed.model import VisionTransformer

    spec = get_model_spec("vit_tiny_patch16_224.augreg_in21k")
    model = VisionTransformer(spec.config()).init_weights(seed=5).eval()
    state = {**model.state_dict(), "head.weight": torch.zeros(21843, 192), "head.bias": torch.zeros(21843)}
    ckpt = tmp_path / "timm-ckpt"
    ckpt.mkdir()
    save_file(state, ckpt / "model.safetensors")
    (ckpt / "config.json").write_text('{"architecture": "vit_tiny_patch16_224", "num_classes": 21843}')
    _hf_cache(tmp_path / "hf", spec.repo, ckpt)
    photo(300, 200).save(tmp_path / "p.png")
    r = run_cli("encode", "p.png", "--out", "o", "--model", spec.name,
                env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "VITEMBED_WEIGHTS": ""}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    with safe_open(str(tmp_path / "o" / "p.png.safetensors"), "numpy") as f:
        got, meta = f.get_tensor("embedding"), f.metadata()
    assert meta["weights"] == f"hf://{spec.repo}" and meta["layer_norm_eps"] == "1e-06"
    assert (meta["resize"], meta["resize_size"], meta["crop"], meta["crop_rounding"]) == ("shortest", "248", "true", "round")
    from vitembed.preprocess import load_pixels, normalize, normalize_stats

    pixels = torch.from_numpy(load_pixels(tmp_path / "p.png", spec.preprocess))[None]
    with torch.no_grad():
        want = model(normalize(pixels, normalize_stats(spec.preprocess)))["last"][0].numpy()
    assert got.shape == (197, 192) and np.abs(got - want).max() < 1e-5
