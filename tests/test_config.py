"""A checkpoint's config.json and preprocessor_config.json, read into ViTConfig and PreprocessConfig
(config.py): every field checked, and malformed JSON, fields of the wrong type and absurd sizes
refused with the file named, before anything is built."""

from __future__ import annotations

import json
import shutil

import pytest

from vitembed.catalog import get_model_spec
from vitembed.config import MAX_RESIZE, PreprocessConfig
from vitembed.errors import CheckpointError
from vitembed.weights import resolve_weights

from .conftest import SMALL, photo, run_cli
from .helpers import DEEP, _checkpoint_with_config

SPEC = get_model_spec("vit-base-patch16-224-in21k")


# config.json --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config,message",
    [
        ([1, 2], "expected a JSON object, got list"),
        ({"hidden_size": "abc"}, "hidden_size must be an integer (got 'abc')"),
        ({"num_attention_heads": 0}, "num_heads must be a positive integer (got 0)"),
        ({"image_size": None}, "image_size must be an integer (got None)"),
        ({"hidden_act": ["gelu"]}, "hidden_act ['gelu'] is not supported"),
        ({"layer_norm_eps": "x"}, "layer_norm_eps must be a number (got 'x')"),
    ],
)
def test_bad_config_json_is_a_checkpoint_error_naming_the_file(tmp_path, small_ckpt, config, message):
    ckpt = tmp_path / "c"
    shutil.copytree(small_ckpt, ckpt)
    base = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config if isinstance(config, list) else {**base, **config}))
    with pytest.raises(CheckpointError) as info:
        resolve_weights(SPEC, ckpt)
    assert str(info.value).startswith(str(ckpt / "config.json")) and message in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        '{"hidden_size": Infinity}',
        '{"hidden_size": 1e400}',
        '{"hidden_size": NaN}',
        '{"hidden_size": 48, "deep": ' + DEEP + "}",
        '{"hidden_size": 1' + "0" * 5000 + "}",
    ],
    ids=["infinity", "overflow", "nan", "deep", "long-int"],
)
def test_malformed_config_json_is_a_setup_error_naming_the_file(tmp_path, small_ckpt, text):
    ckpt = _checkpoint_with_config(tmp_path, small_ckpt)
    hf = json.loads((ckpt / "config.json").read_text())
    body = json.dumps({k: v for k, v in hf.items() if k != "hidden_size"})
    (ckpt / "config.json").write_text(body[:-1] + ", " + text[1:])
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    r = run_cli("encode", str(img), "--out", str(tmp_path / "out"), "--weights", str(ckpt))
    err = r.stderr.decode()
    assert r.returncode == 2 and "config.json" in err and "Traceback" not in err, err


@pytest.mark.parametrize("field,value", [("qkv_bias", "false"), ("layer_norm_eps", "1e-12")])
def test_config_fields_of_the_wrong_type_are_refused(field, value):
    from vitembed.config import ViTConfig
    from vitembed.errors import CheckpointError

    with pytest.raises(CheckpointError, match=field):
        ViTConfig.from_transformers({**SMALL, field: value}, "x/config.json")


@pytest.mark.parametrize("config", [{"hidden_size": "9", "mlp_ratio": 300000000}, {"hidden_size": [0], "mlp_ratio": 1e12}])
def test_dinov2_mlp_ratio_is_checked_before_it_is_used(config):
    from vitembed.config import ViTConfig
    from vitembed.errors import CheckpointError

    hf = {"model_type": "dinov2", "num_hidden_layers": 2, "num_attention_heads": 3, **config}
    with pytest.raises(CheckpointError, match="mlp_ratio"):
        ViTConfig.from_transformers(hf, "x/config.json")


def test_huge_register_count_is_a_checkpoint_error(tmp_path, small_ckpt):
    ckpt = tmp_path / "c"
    shutil.copytree(small_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "dinov2_with_registers", "mlp_ratio": 2,
                                                  "num_register_tokens": 1_000_000_000}))
    with pytest.raises(CheckpointError, match="reg_tokens 1000000000 is more than vitembed allows"):
        resolve_weights(SPEC, ckpt)


# preprocessor_config.json -------------------------------------------------------------------


@pytest.mark.parametrize(
    "pre,message",
    [
        ([1], "expected a JSON object"),
        ({"image_mean": "x"}, "mean and std need 3 finite numbers each"),
        ({"resample": None}, "unknown resample None"),
        ({"size": {"height": 0, "width": 0}}, "image size must be a positive integer"),
        ({"size": {"height": 60, "width": 60}}, "--image-size 60: must be a positive multiple of the patch size 8"),
    ],
)
def test_bad_preprocessor_config_is_refused_at_load(tmp_path, small_ckpt, pre, message):
    ckpt = tmp_path / "c"
    shutil.copytree(small_ckpt, ckpt)
    (ckpt / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(CheckpointError) as info:
        resolve_weights(SPEC, ckpt)
    assert str(ckpt / "preprocessor_config.json") in str(info.value) and message in str(info.value)


@pytest.mark.parametrize("text", ['{"size": {"height": Infinity, "width": 32}}', '{"size": ' + DEEP + "}"])
def test_malformed_preprocessor_config_is_a_setup_error(tmp_path, small_ckpt, text):
    ckpt = _checkpoint_with_config(tmp_path, small_ckpt)
    (ckpt / "preprocessor_config.json").write_text(text)
    img = tmp_path / "a.png"
    photo(40, 30).save(img)
    r = run_cli("encode", str(img), "--out", str(tmp_path / "out"), "--weights", str(ckpt))
    err = r.stderr.decode()
    assert r.returncode == 2 and "preprocessor_config.json" in err and "Traceback" not in err, err


def test_a_missing_crop_size_field_is_named():
    from vitembed.config import PreprocessConfig
    from vitembed.errors import CheckpointError

    with pytest.raises(CheckpointError, match="x/preprocessor_config.json: missing field 'height'"):
        PreprocessConfig.from_transformers({"do_center_crop": True, "crop_size": {}}, "x/preprocessor_config.json")


def test_huge_shortest_edge_in_preprocessor_config_is_a_checkpoint_error():
    source = "/ckpt/preprocessor_config.json"
    for hf in (
        {"size": {"shortest_edge": 100000}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}},
        {"size": {"shortest_edge": 100000}},
        {"size": {"height": 100000, "width": 100000}},
    ):
        with pytest.raises(CheckpointError) as info:
            PreprocessConfig.from_transformers(hf, source)
        assert source in str(info.value) and "100000" in str(info.value) and str(MAX_RESIZE) in str(info.value)
    published = {"size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}}
    assert PreprocessConfig.from_transformers(published, source).resize_to == 256
