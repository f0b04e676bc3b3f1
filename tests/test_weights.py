"""Weights resolution: --weights, $VITEMBED_WEIGHTS, ./weights/<name>/, the Hugging Face cache, and the error;
building the model, with its shapes and memory checked before it is allocated."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from vitembed.catalog import get_model_spec
from vitembed.errors import WeightsNotFoundError
from vitembed.weights import resolve_weights, sha256_file
from vitembed.files import atomic_write

from .conftest import SMALL, photo, run_cli
from .helpers import _checkpoint_with_config

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


def _hf_cache(hf_home, repo: str, ckpt, names=("config.json", "model.safetensors")) -> None:  # noqa: D401
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/...}."""
    base = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    for name in names:
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


def test_sharded_checkpoint_in_the_hugging_face_cache(tmp_path, small_ckpt):
    from transformers import ViTModel

    from vitembed.weights import checkpoint_sha256

    sharded = tmp_path / "sharded"
    ViTModel.from_pretrained(small_ckpt).save_pretrained(sharded, max_shard_size="40KB")
    names = ["config.json", "model.safetensors.index.json"] + sorted(p.name for p in sharded.glob("model-*"))
    _hf_cache(tmp_path / "hf", SPEC.repo, sharded, names)
    photo(30, 30).save(tmp_path / "p.png")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "VITEMBED_WEIGHTS": ""}
    r = run_cli("encode", "p.png", "--out", "o", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    with safe_open(str(tmp_path / "o" / "p.png.safetensors"), "numpy") as f:
        assert f.metadata()["weights_sha256"] == checkpoint_sha256(sharded / "model.safetensors.index.json")
    direct = run_cli("encode", "p.png", "--out", "d", "--weights", str(sharded), cwd=tmp_path)
    assert direct.returncode == 0, direct.stderr.decode()
    from safetensors.numpy import load_file

    a, b = (load_file(tmp_path / d / "p.png.safetensors")["embedding"] for d in ("o", "d"))
    assert a.shape == (17, 48) and (a == b).all()  # hf:// and the folder: the same model


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


def test_weights_that_are_not_checkpoints(tmp_path, small_ckpt):
    with pytest.raises(WeightsNotFoundError, match="is not a checkpoint file"):
        resolve_weights(SPEC, small_ckpt / "config.json")
    with pytest.raises(WeightsNotFoundError, match="--weights: empty path"):
        resolve_weights(SPEC, "")


# Building the model: shapes and memory checked before it is allocated ---------------------------


@pytest.mark.parametrize(
    "config",
    [
        dict(hidden_size=4096, num_hidden_layers=100, num_attention_heads=16, intermediate_size=16384),
        dict(hidden_size=16384, num_hidden_layers=512, num_attention_heads=128, intermediate_size=65536),
    ],
)
def test_model_too_large_for_memory_is_a_setup_error(tmp_path, small_ckpt, config):
    ckpt = _checkpoint_with_config(tmp_path, small_ckpt, **config)
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    r = run_cli("encode", str(img), "--out", str(tmp_path / "out"), "--weights", str(ckpt))
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "config.json: the model has" in err and "GiB" in err and "memory is available" in err and "Traceback" not in err


def test_checkpoint_shapes_are_checked_before_the_model_is_allocated(tmp_path, small_ckpt, monkeypatch):
    from vitembed.catalog import get_model_spec
    from vitembed.errors import CheckpointError
    from vitembed.model import VisionTransformer
    from vitembed.weights import build_model, resolve_weights

    ckpt = _checkpoint_with_config(tmp_path, small_ckpt, hidden_size=96, intermediate_size=192)
    weights = resolve_weights(get_model_spec("vit-base-patch16-224"), ckpt)

    import torch

    built_on: list[str] = []
    init = VisionTransformer.__init__

    def recording_init(self, cfg):
        built_on.append(torch.get_default_device().type)
        init(self, cfg)

    def no_allocation(*args, **kwargs):
        raise AssertionError("the model was allocated before its shapes were checked")

    monkeypatch.setattr(VisionTransformer, "__init__", recording_init)
    monkeypatch.setattr(VisionTransformer, "to_empty", no_allocation)
    monkeypatch.setattr(VisionTransformer, "init_weights", no_allocation)
    with pytest.raises(CheckpointError, match="has shape"):
        build_model(weights)
    assert built_on and set(built_on) == {"meta"}


def test_memory_check_counts_parameters_exactly():
    import torch

    from vitembed.config import ViTConfig
    from vitembed.model import VisionTransformer, num_parameters

    cfg = ViTConfig.from_transformers({**SMALL, "num_hidden_layers": 2})
    assert num_parameters(cfg) == sum(p.numel() for p in VisionTransformer(cfg).parameters())
    assert num_parameters(ViTConfig()) == 85_798_656  # ViT-B/16 at 224 without a head
    assert torch.get_default_device().type == "cpu"  # counting on meta leaves the default alone


def test_without_network_the_hub_is_given_up_in_seconds_with_the_way_out(tmp_path):
    """No HF_HUB_OFFLINE and a Hub that cannot be reached: the cache is read, then one connection
    attempt, not huggingface_hub's 25 s of retries; the message names HF_HUB_OFFLINE=1 and --weights."""
    import time

    from .conftest import photo, run_cli

    photo().save(tmp_path / "a.png")
    env = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "https://hub.vitembed-test.invalid", "HF_HUB_CACHE": str(tmp_path / "cache")}
    start = time.monotonic()
    r = run_cli("encode", str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--model", "dino-vits16", env=env, cwd=tmp_path)
    seconds = time.monotonic() - start
    err = r.stderr.decode()
    assert r.returncode == 2 and "hub.vitembed-test.invalid:443 cannot be reached" in err
    assert "HF_HUB_OFFLINE=1" in err and "--weights DIR" in err and "Retry" not in err
    assert seconds < 5, seconds


def test_hub_unreachable_probes_the_proxy_when_one_is_set():
    from vitembed.hub import hub_unreachable

    why = hub_unreachable("https://huggingface.co", timeout=1.0, environ={"HTTPS_PROXY": "http://proxy.vitembed-test.invalid:3128"})
    assert why is not None and why.startswith("the proxy proxy.vitembed-test.invalid:3128 cannot be reached")


def test_safetensors_are_read_into_memory_of_their_own_exactly(tmp_path):
    """Each tensor in its own buffer (not a view of a mapped file, which would keep the whole
    checkpoint resident beside packed weights), equal to safetensors' own reading, for every
    dtype, scalars and empty tensors; a cut file is a CheckpointError naming it."""
    import torch
    from safetensors.torch import load_file, save_file

    from vitembed.errors import CheckpointError
    from vitembed.weights import read_state_dict

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(5, 7, generator=g),
        "bf16": torch.randn(3, 4, generator=g).bfloat16(),
        "f16": torch.randn(9, generator=g).half(),
        "i64": torch.arange(6).reshape(2, 3),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    file = tmp_path / "model.safetensors"
    save_file(tensors, str(file))
    ours, theirs = read_state_dict(file), load_file(str(file))
    assert ours.keys() == tensors.keys()
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype and value.shape == theirs[key].shape, key
        assert torch.equal(value, theirs[key]), key
        assert value.untyped_storage().nbytes() == value.nbytes, key
    assert len({v.untyped_storage().data_ptr() for v in ours.values() if v.numel()}) == 6
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: the file is not mapped while its tensors live (safetensors' own reading maps it)
        assert str(file) in maps.read_text()
        del theirs
        assert str(file) not in maps.read_text()

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(file.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match="cut.safetensors: cannot read checkpoint"):
        read_state_dict(cut)
