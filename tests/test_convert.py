"""Checkpoint layouts and the errors for checkpoints that do not fit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ViTModel

from vitembed.catalog import get_model_spec
from vitembed.config import ViTConfig
from vitembed.convert import convert_state_dict, detect_format, load_converted
from vitembed.errors import CheckpointError
from vitembed.model import VisionTransformer
from vitembed.weights import build_model, resolve_weights

from .conftest import SMALL, run_cli, save_vit

SPEC = get_model_spec("vit-base-patch16-224-in21k")
SMALL_CFG = ViTConfig.from_transformers({**SMALL, "model_type": "vit"})


def _reference_last(ckpt_dir, x):
    ref = ViTModel.from_pretrained(ckpt_dir, add_pooling_layer=False).eval()
    with torch.no_grad():
        return ref(pixel_values=x).last_hidden_state


def _ours_last(model, x):
    with torch.no_grad():
        return model(x)["last"]


def test_image_classification_checkpoint_drops_head_and_prefix(tmp_path):
    ckpt = save_vit(tmp_path / "cls", classification=True)
    keys = load_file(ckpt / "model.safetensors").keys()
    assert any(k.startswith("vit.") for k in keys) and "classifier.weight" in keys
    x = torch.randn(2, 3, 32, 32)
    ours = build_model(resolve_weights(SPEC, ckpt))
    assert (_ours_last(ours, x) - _reference_last(ckpt, x)).abs().max() < 1e-4


def test_pytorch_model_bin_is_read_without_unpickling_code(tmp_path, small_ckpt):
    ckpt = tmp_path / "bin"
    ckpt.mkdir()
    shutil.copy(small_ckpt / "config.json", ckpt)
    torch.save(load_file(small_ckpt / "model.safetensors"), ckpt / "pytorch_model.bin")
    x = torch.randn(1, 3, 32, 32)
    ours = build_model(resolve_weights(SPEC, ckpt))
    assert (_ours_last(ours, x) - _reference_last(small_ckpt, x)).abs().max() < 1e-4


class Evil:
    pass


def test_pickle_that_needs_code_is_refused(tmp_path, small_ckpt):
    ckpt = tmp_path / "evil"
    ckpt.mkdir()
    shutil.copy(small_ckpt / "config.json", ckpt)
    torch.save({"state_dict": Evil()}, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read checkpoint"):
        build_model(resolve_weights(SPEC, ckpt))


def test_single_file_takes_architecture_from_model_and_names_first_mismatch(small_ckpt):
    # A small checkpoint given as a bare file is read as ViT-B/16 (--model): shapes do not fit.
    weights = resolve_weights(SPEC, small_ckpt / "model.safetensors")
    assert weights.config.hidden_size == 768
    with pytest.raises(CheckpointError, match=r"model.safetensors: key 'cls_token' has shape \[1, 1, 48\], the architecture expects \[1, 1, 768\]"):
        build_model(weights)


def test_missing_key_is_named(small_ckpt):
    sd = convert_state_dict(load_file(small_ckpt / "model.safetensors"))
    del sd["blocks.2.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"missing key 'blocks.2.mlp.fc2.bias'"):
        load_converted(VisionTransformer(SMALL_CFG), sd, "x.safetensors")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_integer_or_bool_tensor_is_a_checkpoint_error_naming_key_and_dtype(tmp_path, small_ckpt, dtype):
    """The breaking pass's input: one weight saved as int32, int8 or bool crashed with a traceback
    (torch refused it as a parameter) and exit 1; it is a setup error (exit 2) naming the key."""
    ckpt = tmp_path / "ints"
    ckpt.mkdir()
    shutil.copy(small_ckpt / "config.json", ckpt)
    sd = load_file(small_ckpt / "model.safetensors")
    sd["encoder.layer.0.intermediate.dense.weight"] = sd["encoder.layer.0.intermediate.dense.weight"].to(dtype)
    save_file(sd, ckpt / "model.safetensors")
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=rf"model.safetensors: key 'blocks.0.mlp.fc1.weight' holds {name} values"):
        build_model(resolve_weights(SPEC, ckpt))
    r = run_cli("encode", str(small_ckpt / "config.json"), "--out", str(tmp_path / "out"), "--weights", str(ckpt))
    assert r.returncode == 2 and "holds " + name in r.stderr.decode() and "Traceback" not in r.stderr.decode()


def test_sharded_checkpoint_loads_as_the_whole_one(tmp_path, small_ckpt):
    """save_pretrained(max_shard_size=...) writes model.safetensors.index.json and shards; the
    breaking pass found them refused ("has neither model.safetensors nor pytorch_model.bin")."""
    sharded = tmp_path / "sharded"
    ViTModel.from_pretrained(small_ckpt).save_pretrained(sharded, max_shard_size="40KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert (sharded / "model.safetensors.index.json").is_file() and len(shards) > 1
    whole, parts = resolve_weights(SPEC, small_ckpt), resolve_weights(SPEC, sharded)
    assert parts.file == sharded / "model.safetensors.index.json" and len(parts.sha256) == 64
    a, b = build_model(whole).state_dict(), build_model(parts).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    index = sharded / "model.safetensors.index.json"
    good = index.read_text()
    for name in ("../outside.safetensors", "/abs/x.safetensors", "model.safetensors.index.json"):  # the last: itself
        data = json.loads(good)
        data["weight_map"]["layernorm.weight"] = name
        index.write_text(json.dumps(data))
        with pytest.raises(CheckpointError, match="is not the name of a weights file beside the index"):
            resolve_weights(SPEC, sharded)
    data = json.loads(good)
    data["weight_map"]["encoder.layer.9.output.dense.bias"] = shards[0].name
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"key 'encoder.layer.9.output.dense.bias' is listed for .* but in no shard"):
        build_model(resolve_weights(SPEC, sharded))
    index.write_text(good)
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json: shard {shards[-1].name} is missing"):
        resolve_weights(SPEC, sharded)


def test_cut_torch_file_is_named_as_cut_not_as_unsafe(tmp_path, small_ckpt):
    ckpt = tmp_path / "cut"
    ckpt.mkdir()
    shutil.copy(small_ckpt / "config.json", ckpt)
    torch.save(load_file(small_ckpt / "model.safetensors"), ckpt / "pytorch_model.bin")
    data = (ckpt / "pytorch_model.bin").read_bytes()
    (ckpt / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read checkpoint: not a complete torch file"):
        build_model(resolve_weights(SPEC, ckpt))


def test_unknown_key_is_named(small_ckpt):
    sd = load_file(small_ckpt / "model.safetensors")
    sd["encoder.layer.0.attention.attention.rope.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected key 'encoder.layer.0.attention.attention.rope.weight'"):
        convert_state_dict(sd, "x.safetensors")


def test_extra_block_is_an_unexpected_key(tmp_path, small_ckpt):
    deeper = save_vit(tmp_path / "deep", num_hidden_layers=4)
    sd = convert_state_dict(load_file(deeper / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected key 'blocks.3."):
        load_converted(VisionTransformer(SMALL_CFG), sd, "deep")


def test_transformers_v5_module_names_and_timm_layout_give_the_same_model(small_ckpt):
    reference = ViTModel.from_pretrained(small_ckpt).eval()
    v5 = reference.state_dict()
    assert detect_format(v5) == "transformers-v5"
    ours_v5 = VisionTransformer(SMALL_CFG)
    load_converted(ours_v5, convert_state_dict(v5))

    timm_sd = {f"module.{k}": v for k, v in ours_v5.state_dict().items()}
    timm_sd["module.head.weight"] = torch.zeros(10, 48)
    assert detect_format({k[7:]: v for k, v in timm_sd.items()}) == "timm"
    ours_timm = VisionTransformer(SMALL_CFG)
    load_converted(ours_timm, convert_state_dict(timm_sd))

    x = torch.randn(2, 3, 32, 32)
    expected = _reference_last(small_ckpt, x)
    assert (_ours_last(ours_v5, x) - expected).abs().max() < 1e-4
    assert torch.equal(_ours_last(ours_timm, x), _ours_last(ours_v5, x))


def test_not_a_vit_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a ViT checkpoint in a known layout"):
        convert_state_dict({"conv1.weight": torch.zeros(1)}, "resnet.safetensors")


def test_config_of_another_model_type_is_refused(tmp_path, small_ckpt):
    ckpt = tmp_path / "deit"
    shutil.copytree(small_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "swin"}))
    with pytest.raises(CheckpointError, match="model_type 'swin' is not supported"):
        resolve_weights(SPEC, ckpt)


def test_fp16_checkpoint_is_cast_to_float32(tmp_path, small_ckpt):
    ckpt = tmp_path / "half"
    shutil.copytree(small_ckpt, ckpt)
    sd = {k: v.half() for k, v in load_file(small_ckpt / "model.safetensors").items()}
    save_file(sd, ckpt / "model.safetensors")
    model = build_model(resolve_weights(SPEC, ckpt))
    assert model.cls_token.dtype == torch.float32
    assert torch.equal(model.cls_token, sd["embeddings.cls_token"].float())
