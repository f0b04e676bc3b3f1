"""Across the families (vit, deit, clip, dinov2): each family's weights in timm's layout give the
same model, and every pooling gives the shapes that its prefix tokens call for."""

from __future__ import annotations

import json
import pytest
import torch

from vitembed.catalog import get_model_spec
from vitembed.weights import build_model, resolve_weights

from .helpers import _clip, _deit, _dinov2


def _timm_roundtrip(ours, x):
    """The same model saved in timm's layout (vitembed's names are timm's), read back as a timm checkpoint."""
    from vitembed.convert import convert_state_dict, detect_format, load_converted
    from vitembed.model import VisionTransformer

    timm_sd = {f"module.{k}": v.clone() for k, v in ours.state_dict().items()}
    timm_sd["module.head.weight"] = torch.zeros(10, ours.cfg.hidden_size)
    assert detect_format({k[7:]: v for k, v in timm_sd.items()}) == "timm"
    again = VisionTransformer(ours.cfg)
    load_converted(again, convert_state_dict(timm_sd))
    with torch.no_grad():
        return again.eval()(x)["last"]


def test_timm_layouts_give_the_same_outputs_for_every_family(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    cases = {
        "deit": (_deit(tmp_path / "deit"), "vit-base-patch16-224"),
        "clip": (_clip(tmp_path / "clip"), "clip-vit-base-patch16"),
        "dinov2": (_dinov2(tmp_path / "d2"), "dinov2-small"),
        "dinov2-reg": (_dinov2(tmp_path / "d2r", 4), "dinov2-small"),
    }
    for family, (ckpt, name) in cases.items():
        ours = build_model(resolve_weights(get_model_spec(name), ckpt).at_image_size(32))
        with torch.no_grad():
            want = ours(x)["last"]
        assert torch.equal(_timm_roundtrip(ours, x), want), family


@pytest.mark.parametrize("family", ["vit", "deit", "clip", "dinov2", "dinov2-reg"])
def test_pool_shapes_for_every_family(tmp_path, family, small_ckpt):
    import numpy as np

    from vitembed.encoder import Encoder

    ckpt = {
        "vit": lambda: small_ckpt,
        "deit": lambda: _deit(tmp_path / "m"),
        "clip": lambda: _clip(tmp_path / "m"),
        "dinov2": lambda: _dinov2(tmp_path / "m"),
        "dinov2-reg": lambda: _dinov2(tmp_path / "m", 4),
    }[family]()
    weights = resolve_weights(get_model_spec("vit-base-patch16-224"), ckpt).at_image_size(32)
    prefix = {"vit": 1, "deit": 2, "clip": 1, "dinov2": 1, "dinov2-reg": 5}[family]
    assert weights.config.num_prefix_tokens == prefix
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    shapes = {pool: tuple(Encoder(weights=weights, pool=pool, device="cpu")(pixels).shape) for pool in ("none", "cls", "mean", "patch")}
    assert shapes == {"none": (2, prefix + 16, 48), "cls": (2, 48), "mean": (2, 48), "patch": (2, 16, 48)}
    assert Encoder(weights=weights, pool="patch", device="cpu").output_shape == (16, 48)


def test_models_lists_every_family_with_tokens_prefix_tokens_head_and_preprocessing():
    import json

    from vitembed.catalog import CATALOG

    from .conftest import run_cli

    done = run_cli("models", "--json")
    assert done.returncode == 0
    rows = {row["name"]: row for row in map(json.loads, done.stdout.decode().splitlines())}
    assert set(rows) == set(CATALOG) and {r["family"] for r in rows.values()} == {
        "vit", "deit", "dino", "dinov2", "dinov3", "clip", "siglip"}
    expected = {  # name: (tokens, prefix tokens, head width, resize backend, interpolation)
        "siglip-base-patch16-224": (196, 0, 768, "pil", "bicubic"),
        "siglip-so400m-patch14-384": (729, 0, 1152, "pil", "bicubic"),
        "siglip2-giant-opt-patch16-256": (256, 0, 1536, "pil", "bicubic"),
        "dinov3-vitl16": (201, 5, 1024, "torch", "bilinear"),
        "dinov2-with-registers-giant": (261, 5, 1536, "pil", "bicubic"),
        "clip-vit-large-patch14": (257, 1, 768, "pil", "bicubic"),
        "vit-base-patch16-224": (197, 1, None, "pil", "bilinear"),
    }
    for name, want in expected.items():
        row = rows[name]
        assert (row["tokens"], row["prefix_tokens"], row["head_size"], row["resize_backend"], row["interpolation"]) == want
    text = run_cli("models").stdout.decode().splitlines()
    header = text[0].split()
    assert header[:7] == ["name", "family", "variant", "tokens", "prefix", "head", "weights"]
    line = next(line for line in text if line.startswith("siglip-so400m-patch14-384 "))
    assert line.split()[:7] == ["siglip-so400m-patch14-384", "siglip", "So400m/14", "729x1152", "0", "1152", "-"]
    assert "squash 384 bicubic" in line
    starts = {text[0].index(column) for column in ("family", "tokens", "weights", "preprocessing", "repository")}
    assert all(line[i - 1] == " " and line[i] != " " for line in text[1:] for i in starts)  # aligned columns


def test_models_marks_the_names_with_weights_on_disk(tmp_path):
    """``local``: a weights/<name>/ folder here; ``cache``: config and weights in the Hugging Face
    cache (laid out as huggingface_hub lays it out); nothing is fetched."""
    from .conftest import run_cli

    (tmp_path / "weights" / "dino-vits16").mkdir(parents=True)
    snapshot = tmp_path / "cache" / "models--facebook--dinov2-small" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_text("{}")
    env = {"HF_HUB_CACHE": str(tmp_path / "cache")}
    rows = {r["name"]: r["weights_on_disk"] for r in map(json.loads, run_cli("models", "--json", env=env, cwd=tmp_path).stdout.decode().splitlines())}
    assert rows["dino-vits16"] == "local" and rows["dinov2-small"] == "cache"
    assert [n for n, where in rows.items() if where] == ["dino-vits16", "dinov2-small"]
    text = run_cli("models", env=env, cwd=tmp_path).stdout.decode().splitlines()
    column = text[0].index("weights")
    assert {line.split()[0]: line[column:].split()[0] for line in text[1:]}["dinov2-small"] == "cache"
