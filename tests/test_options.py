"""Option values, checked before anything is loaded (options.py): seeds, preprocessing and size
values that would give NaN or exhaust memory, and encoder options given next to an Encoder."""

from __future__ import annotations

import pytest

from .conftest import photo, run_cli
from .helpers import _encoder


def test_huge_seed_is_a_usage_error(tmp_path):
    photo(20, 20).save(tmp_path / "p.png")
    r = run_cli("encode", str(tmp_path / "p.png"), "--out", str(tmp_path / "o"), "--weights", "random", "--seed", "99999999999999999999")
    assert r.returncode == 2 and "--seed" in r.stderr.decode()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--mean", "nan,0,0"], "mean and std need 3 finite numbers"),
        (["--std", "1e-45,1,1"], "mean and std need 3 finite numbers"),
        (["--mean", "1e40,0,0"], "mean and std need 3 finite numbers"),
        (["--image-size", "10000"], "at most 16384 are allowed"),
    ],
)
def test_preprocessing_and_size_values_that_would_give_nan_or_exhaust_memory(tmp_path, small_ckpt, args, message):
    photo(20, 20).save(tmp_path / "p.png")
    r = run_cli("encode", str(tmp_path / "p.png"), "--out", str(tmp_path / "o"), "--weights", str(small_ckpt), *args)
    assert r.returncode == 2 and message in r.stderr.decode(), r.stderr.decode()


def test_encode_refuses_encoder_options_next_to_an_encoder(tmp_path, small_ckpt):
    import vitembed
    from vitembed.errors import UsageError

    with pytest.raises(UsageError, match=r"unknown option\(s\) bogus; expected RunOptions fields \(batch_size, engine, "):
        vitembed.encode([str(tmp_path)], tmp_path / "out", encoder=_encoder(small_ckpt), layer="2", bogus=1)
    with pytest.raises(UsageError, match="layer cannot be given with encoder="):
        vitembed.encode([str(tmp_path)], tmp_path / "out", encoder=_encoder(small_ckpt), layer="2")


def test_an_unknown_model_name_gets_the_closest_known_names():
    from vitembed.catalog import get_model_spec
    from vitembed.errors import UsageError

    with pytest.raises(UsageError, match=r"unknown model 'dinov2-smal'; did you mean 'dinov2-small'"):
        get_model_spec("dinov2-smal")
    with pytest.raises(UsageError, match=r"did you mean 'vit_small_patch16_224.augreg_in21k'"):
        get_model_spec("vit-small-patch16-224")  # timm's name, written with hyphens
    with pytest.raises(UsageError, match=r"unknown model 'xyz'; `vitembed models` lists the \d+ known names"):
        get_model_spec("xyz")
