"""``vitembed verify`` (verify.py + the CLI command): vitembed against transformers on small random
checkpoints of every family, each with its reference processor saved beside it: exit 0 and real
numbers when they match, exit 1 when an override makes the inputs differ, exit 2 for random weights,
a timm-layout file without timm, and no transformers; the --json lines and the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitembed.errors import UsageError
from vitembed.verify import TOLERANCE, verify

from .conftest import jpeg_bytes, photo, run_cli, save_vit
from .helpers import _clip, _dinov2, _dinov3, _siglip, _siglip2_naflex

IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def _vit(path):
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    save_vit(path)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _dino(path):  # DINO v1: a plain ViT with ImageNet statistics and bicubic resizing
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    save_vit(path, seed=1)
    ViTImageProcessorPil(size={"height": 32, "width": 32}, resample=3, **IMAGENET).save_pretrained(path)
    return path


def _deit_ckpt(path):
    from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil

    from .helpers import _deit

    _deit(path)
    DeiTImageProcessorPil(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32},
                          **IMAGENET).save_pretrained(path)
    return path


def _dinov2_ckpt(path, registers=0):
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    _dinov2(path, registers=registers)
    BitImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                         **IMAGENET).save_pretrained(path)
    return path


def _clip_ckpt(path, whole=False):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    _clip(path, whole=whole)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _dinov3_ckpt(path):  # its processor exists only for torchvision: verify runs its torch operations
    from .test_family_dinov3 import PUBLISHED_PROCESSOR

    _dinov3(path)
    (path / "preprocessor_config.json").write_text(json.dumps({**PUBLISHED_PROCESSOR, "size": {"height": 32, "width": 32}}))
    return path


def _dinov2_swiglu_ckpt(path):
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    _dinov2(path, swiglu=True)
    BitImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                         **IMAGENET).save_pretrained(path)
    return path


def _siglip_ckpt(path):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    _siglip(path, whole=True)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


# kind -> (--model, builder, the pooled items compared, the pooled items skipped)
KINDS = {
    "vit": ("vit-base-patch16-224-in21k", _vit, {"cls"}, set()),
    "deit": ("deit-small-patch16-224", _deit_ckpt, {"cls"}, set()),
    "dino": ("dino-vits16", _dino, {"cls"}, set()),
    "dinov2": ("dinov2-small", _dinov2_ckpt, {"cls", "head"}, set()),
    "dinov2-registers": ("dinov2-with-registers-small", lambda p: _dinov2_ckpt(p, registers=4), {"cls", "head"}, set()),
    "clip-vision": ("clip-vit-base-patch16", _clip_ckpt, {"cls"}, {"head"}),
    "clip-whole": ("clip-vit-base-patch16", lambda p: _clip_ckpt(p, whole=True), {"cls", "head"}, set()),
}
NEW_KINDS = {
    "dinov3": ("dinov3-vits16", _dinov3_ckpt, {"cls", "head"}, set()),
    "siglip-whole": ("siglip-base-patch16-224", _siglip_ckpt, {"head"}, set()),
    "siglip2-naflex": ("siglip2-base-patch16-naflex", lambda p: _siglip2_naflex(p, whole=True), {"head"}, set()),
    "dinov2-giant": ("dinov2-giant", lambda p: _dinov2_swiglu_ckpt(p), {"cls", "head"}, set()),
}
KINDS.update(NEW_KINDS)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """kind -> a checkpoint folder with its preprocessor_config.json, built on first use."""
    root, made = tmp_path_factory.mktemp("verify"), {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = KINDS[kind][1](root / kind)
        return made[kind]

    return get


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Three small JPEGs: landscape, portrait, square."""
    root = tmp_path_factory.mktemp("verify-images")
    paths = []
    for i, (w, h) in enumerate([(61, 40), (37, 70), (48, 48)]):
        paths.append(root / f"im{i}.jpg")
        paths[-1].write_bytes(jpeg_bytes(photo(w, h, seed=i)))
    return paths


def _lines(stdout: bytes) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in stdout.decode().splitlines()]
    assert "summary" in lines[-1] and all("summary" not in line for line in lines[:-1])
    return lines[:-1], lines[-1]["summary"]


def _check_good(items: list[dict], pooled: set[str]) -> None:
    assert [i["item"] for i in items][:1] == ["pixels"]
    for item in items:
        assert set(item) >= {"item", "name", "max_abs", "cosine_mean", "cosine_min", "ok"}
        assert item["ok"] is True
        assert 0 <= item["max_abs"] < TOLERANCE
        if item["name"] == "spatial_shapes":  # NaFlex: each image's grid, equal or not
            assert item["equal"] is True and item["max_abs"] == 0
            continue
        assert 1 - 1e-6 < item["cosine_min"] <= item["cosine_mean"] < 1 + 1e-6
    assert items[0]["name"] == "pixel_values" and items[0]["equal"] is True and items[0]["max_abs"] == 0
    assert [i["name"] for i in items if i["item"] == "layer"] == ["embeddings", "1", "last"]  # depth 3: block 1
    assert {i["name"] for i in items if i["item"] == "pooled"} == pooled


@pytest.mark.parametrize("kind", ["vit", "clip-vision", "clip-whole", "dinov3", "siglip2-naflex"])
def test_cli_exit_0_on_a_good_checkpoint(ckpts, images, kind):
    """The CLI on a few families (each run is a process); the library runs every family below."""
    model, _, pooled, skipped = KINDS[kind]
    r = run_cli("verify", *map(str, images), "--model", model, "--weights", str(ckpts(kind)), "--json")
    assert r.returncode == 0, r.stderr.decode()
    items, summary = _lines(r.stdout)
    _check_good(items, pooled)
    assert summary["ok"] is True and summary["images"] == 3 and summary["failed"] == []
    assert summary["reference_input"] == "own" and summary["tolerance"] == TOLERANCE
    assert {s["name"] for s in summary["skipped"]} == skipped
    if skipped:  # a vision-only CLIP has no get_image_features: said, not failed
        assert "get_image_features" in summary["skipped"][0]["reason"]
        assert "skipped: pooled head" in r.stderr.decode()
    assert "verify: ok" in r.stderr.decode()


@pytest.mark.parametrize("kind", list(KINDS))
def test_library_ok_on_every_family(ckpts, images, kind):
    model, _, pooled, skipped = KINDS[kind]
    report = verify(model, ckpts(kind), images=images[:2])
    assert report.ok, [row for row in report.rows if not row.ok]
    _check_good([row.as_json() for row in report.rows], pooled)
    assert {s.name for s in report.skipped} == skipped and report.images == 2


def test_mean_override_makes_the_inputs_differ_exit_1(ckpts, images):
    """--mean goes to vitembed only; the reference keeps its processor's 0.5: the inputs differ,
    and so does every layer after them."""
    r = run_cli("verify", *map(str, images), "--weights", str(ckpts("vit")), "--mean", "0.4,0.4,0.4", "--json")
    assert r.returncode == 1, r.stderr.decode()
    items, summary = _lines(r.stdout)
    pixels = items[0]
    assert pixels["item"] == "pixels" and pixels["equal"] is False and pixels["ok"] is False
    assert pixels["max_abs"] == pytest.approx(0.2, abs=1e-6)  # (x - 0.4) / 0.5 - (x - 0.5) / 0.5
    assert all(not i["ok"] and i["max_abs"] > TOLERANCE for i in items)
    assert summary["ok"] is False and "pixels pixel_values" in summary["failed"]
    assert "verify: FAILED" in r.stderr.decode() and "inputs differ" in r.stderr.decode()


def test_table_on_stdout_verdict_on_stderr(ckpts, images):
    r = run_cli("verify", str(images[0]), "--weights", str(ckpts("vit")), "--layer", "2", "--layer", "last")
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    assert "max-abs" in out and "pixel_values" in out and "hidden_states[2]" in out and "last_hidden_state" in out
    assert "FAIL" not in out and "embeddings" not in out
    assert r.stderr.decode().strip().splitlines()[-1].startswith("verify: ok: 4 items within 0.0001 on 1 image")


def test_random_weights_is_a_usage_error_exit_2(images):
    r = run_cli("verify", str(images[0]), "--weights", "random")
    assert r.returncode == 2 and r.stdout == b""
    assert "random weights have no reference" in r.stderr.decode()
    with pytest.raises(UsageError, match="random"):
        verify(weights="random")


def _shim(root: Path, name: str) -> dict:
    """An environment in which importing ``name`` fails, as when it is not installed."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(f'raise ImportError("No module named {name!r} (test shim)")\n')
    return {"PYTHONPATH": str(root)}


def test_timm_layout_file_without_timm_exit_2(tmp_path, small_ckpt, images):
    from safetensors.torch import save_file

    from vitembed.catalog import get_model_spec
    from vitembed.convert import detect_format
    from vitembed.weights import build_model, resolve_weights

    model = build_model(resolve_weights(get_model_spec("vit-base-patch16-224-in21k"), small_ckpt))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert detect_format(state) == "timm"
    file = tmp_path / "vit_timm.safetensors"
    save_file(state, str(file))
    r = run_cli("verify", str(images[0]), "--model", "vit_tiny_patch16_224.augreg_in21k", "--weights", str(file),
                env=_shim(tmp_path / "shim", "timm"))
    assert r.returncode == 2 and r.stdout == b""
    err = r.stderr.decode()
    assert "timm" in err and "pip install 'vitembed[verify]'" in err
    # A single file in transformers' layout: no config.json for the reference.
    hf = tmp_path / "hf.safetensors"
    hf.write_bytes((small_ckpt / "model.safetensors").read_bytes())
    r = run_cli("verify", str(images[0]), "--weights", str(hf))
    assert r.returncode == 2 and "config.json" in r.stderr.decode()


def test_no_transformers_exit_2(tmp_path, ckpts, images):
    r = run_cli("verify", str(images[0]), "--weights", str(ckpts("vit")), env=_shim(tmp_path / "shim", "transformers"))
    assert r.returncode == 2 and r.stdout == b""
    assert "transformers" in r.stderr.decode() and "pip install 'vitembed[verify]'" in r.stderr.decode()


def test_no_processor_compares_the_model_on_vitembeds_inputs(tmp_path, images):
    ckpt = save_vit(tmp_path / "bare")  # no preprocessor_config.json
    report = verify(weights=ckpt, images=images[:2])
    assert report.ok and report.reference_input == "vitembed"
    assert [s.item for s in report.skipped] == ["pixels"] and "preprocessor_config.json" in report.skipped[0].reason
    assert [row.item for row in report.rows] == ["layer"] * 3 + ["pooled"]
    assert all(0 <= row.max_abs < TOLERANCE for row in report.rows)


def test_synthetic_images_layers_and_errors(ckpts):
    report = verify(weights=ckpts("vit"), layers=["3", "embeddings", "3"])
    assert report.ok and report.images == 3 and report.image_names[0] == "synthetic-0"
    assert [(r.name, r.reference) for r in report.rows if r.item == "layer"] == [
        ("3", "hidden_states[3]"), ("embeddings", "hidden_states[0]")]
    with pytest.raises(UsageError, match="block number 1..3"):
        verify(weights=ckpts("vit"), layers=["4"])
    with pytest.raises(UsageError, match="unknown option"):
        verify(weights=ckpts("vit"), pool="cls")
    bigger = verify(weights=ckpts("vit"), image_size=48)  # another input size: shapes differ, said so
    assert not bigger.ok and "shapes differ" in bigger.rows[0].note


def test_naflex_mean_override_exit_1(ckpts, images):
    r = run_cli("verify", *map(str, images), "--model", "siglip2-base-patch16-naflex", "--weights",
                str(ckpts("siglip2-naflex")), "--mean", "0.4,0.4,0.4", "--json")
    assert r.returncode == 1
    items, summary = _lines(r.stdout)
    assert items[0]["name"] == "pixel_values" and items[0]["equal"] is False and abs(items[0]["max_abs"] - 0.2) < 1e-6
    assert "pixels pixel_values" in summary["failed"]
