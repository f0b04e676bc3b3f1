"""``vitembed show``: the PCA picture of patch tokens (vitembed/show.py, vitembed/cli/show.py).

Outputs are made once per module with the small random checkpoint (32x32 input, patch 8: a 4x4
grid, 8-pixel patches), so each map is 32x32 pixels beside a 32x32 image.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli
from vitembed.show import GAP, LABEL, pca_basis, pca_maps

SIDE = 32  # the small checkpoint's input, and so its map's side in pixels
TILE = (SIDE, 2 * SIDE + GAP)  # (height, width) of image | gap | map


def halves(width: int = 64) -> Image.Image:
    """Left half a black-and-white checkerboard of 4-pixel squares (every 8-pixel patch alike),
    right half flat blue."""
    y, x = np.mgrid[0:width, 0:width]
    a = np.zeros((width, width, 3), np.uint8)
    a[:, : width // 2] = np.where(((x // 4 + y // 4) % 2 == 0)[:, : width // 2, None], 250, 10)
    a[:, width // 2:] = (40, 160, 220)
    return Image.fromarray(a, "RGB")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, small_ckpt):
    """Per-image outputs (emb/), a packed folder of patch tokens (packed/), pooled ones (pooled/);
    ``gone.png`` is removed after encoding, so its output's source is missing."""
    root = tmp_path_factory.mktemp("show")
    (root / "src").mkdir()
    for name in ("halves.png", "twin.png", "gone.png"):
        halves().save(root / "src" / name)
    src = [str(root / "src" / n) for n in ("halves.png", "twin.png")]
    weights = ("--weights", str(small_ckpt), "-q")
    for args in ((*src, str(root / "src" / "gone.png"), "--out", str(root / "emb")),
                 (*src, "--out", str(root / "packed"), "--pack", "4", "--pool", "patch"),
                 (src[0], "--out", str(root / "pooled"), "--pool", "mean")):
        r = run_cli("encode", *args, *weights)
        assert r.returncode == 0, r.stderr
    (root / "src" / "gone.png").unlink()
    return root


def show(*args: str):
    r = run_cli("show", *args)
    return r, r.stdout.decode(), r.stderr.decode()


def png(path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def test_map_tells_the_halves_apart_beside_the_image_as_the_model_saw_it(outputs, tmp_path):
    r, out, err = show(str(outputs / "emb" / "halves.png.safetensors"), "--out", str(tmp_path / "a.png"))
    assert r.returncode == 0, err
    assert out == f"{tmp_path / 'a.png'}\n" and err == ""
    sheet = png(tmp_path / "a.png")
    assert sheet.shape == (TILE[0] + 2 * GAP, TILE[1] + 2 * GAP, 3)
    view = sheet[GAP: GAP + SIDE, GAP: GAP + SIDE]
    assert np.array_equal(view, np.array(halves().resize((SIDE, SIDE), Image.Resampling.BILINEAR)))  # squash 32
    grid_map = sheet[GAP: GAP + SIDE, 2 * GAP + SIDE: 2 * GAP + 2 * SIDE].astype(float)
    left, right = grid_map[:, : SIDE // 2].reshape(-1, 3), grid_map[:, SIDE // 2:].reshape(-1, 3)
    assert np.linalg.norm(left.mean(0) - right.mean(0)) > 150
    # The first component (red) splits the halves: far apart between them, close within each.
    assert abs(left[:, 0].mean() - right[:, 0].mean()) > 200
    assert left[:, 0].std() < 20 and right[:, 0].std() < 20
    # Nearest upsampling: each 8x8 patch is one colour.
    patches = grid_map.reshape(4, 8, 4, 8, 3)
    assert (patches == patches[:, :1, :, :1]).all()


def test_identical_images_give_identical_tiles_in_a_sheet_of_exact_size(outputs, tmp_path):
    emb = outputs / "emb"
    r, _, err = show(str(emb / "halves.png.safetensors"), str(emb / "twin.png.safetensors"), "--out", str(tmp_path / "s.png"))
    assert r.returncode == 0, err
    sheet = png(tmp_path / "s.png")
    assert sheet.shape == (TILE[0] + LABEL + 2 * GAP, 2 * TILE[1] + 3 * GAP, 3)
    first = sheet[GAP: GAP + TILE[0], GAP: GAP + TILE[1]]
    second = sheet[GAP: GAP + TILE[0], 2 * GAP + TILE[1]: 2 * GAP + 2 * TILE[1]]
    assert np.array_equal(first, second)
    # Each tile is named under it (new-user report: a sheet of 8 could not be told apart): dark
    # text on the white strip, different for the two names.
    strips = [sheet[GAP + TILE[0]: GAP + TILE[0] + LABEL, left: left + TILE[1]] for left in (GAP, 2 * GAP + TILE[1])]
    assert all((strip.min(axis=2) < 128).sum() > 20 for strip in strips)
    assert not np.array_equal(*strips)
    r, _, err = show(str(emb / "halves.png.safetensors"), str(emb / "twin.png.safetensors"),
                     "--out", str(tmp_path / "t.png"), "--columns", "1")
    assert r.returncode == 0, err
    assert png(tmp_path / "t.png").shape == (2 * (TILE[0] + LABEL) + 3 * GAP, TILE[1] + 2 * GAP, 3)
    assert np.array_equal(png(tmp_path / "t.png")[GAP: GAP + TILE[0], GAP: GAP + TILE[1]], first)


def test_pca_recovers_a_known_direction_with_a_fixed_sign():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=16)
    direction /= np.linalg.norm(direction)
    t = np.linspace(-3, 3, 64)
    tokens = 5.0 + t[:, None] * direction + rng.normal(scale=0.01, size=(64, 16))
    mean, components = pca_basis(tokens)
    assert components.shape == (3, 16) and mean.shape == (16,)
    assert abs(components[0] @ direction) > 0.999
    assert np.allclose(components @ components.T, np.eye(3), atol=1e-9)
    for c in components:  # largest-magnitude entry positive
        assert c[np.argmax(np.abs(c))] > 0
    assert np.allclose(pca_basis(-tokens + 10)[1], components, atol=1e-8)  # a flipped copy: the same signs
    # On the grid, red follows the position along the direction (monotone, 1st..99th percentile scaled).
    red = pca_maps([tokens], [(8, 8)])[0][..., 0].reshape(-1).astype(int)
    sign = np.sign(components[0] @ direction)
    assert (np.diff(red) * sign >= 0).all() and red.min() == 0 and red.max() == 255


def test_pooled_output_is_refused_naming_the_file(outputs, tmp_path):
    pooled = outputs / "pooled" / "halves.png.safetensors"
    r, out, err = show(str(pooled), "--out", str(tmp_path / "p.png"))
    assert r.returncode == 2 and out == ""
    assert err.startswith("error: ") and str(pooled) in err and "--pool mean" in err and err.count("\n") == 1
    assert not (tmp_path / "p.png").exists() and list(tmp_path.iterdir()) == []


def test_missing_source_gives_the_map_alone_with_a_warning(outputs, tmp_path):
    gone = outputs / "emb" / "gone.png.safetensors"
    r, out, err = show(str(gone), "--out", str(tmp_path / "g.png"))
    assert r.returncode == 0, err
    assert out == f"{tmp_path / 'g.png'}\n"
    assert err.startswith("warning: ") and str(gone) in err and "gone.png" in err and "map alone" in err
    assert png(tmp_path / "g.png").shape == (SIDE + 2 * GAP, SIDE + 2 * GAP, 3)


def test_packed_rows_by_key_match_the_per_image_outputs(outputs, tmp_path):
    emb = outputs / "emb"
    r, _, err = show(str(outputs / "packed"), "--key", "halves.png", "--key", "twin.png", "--out", str(tmp_path / "k.png"))
    assert r.returncode == 0, err
    r, _, err = show(str(emb / "halves.png.safetensors"), str(emb / "twin.png.safetensors"), "--out", str(tmp_path / "f.png"))
    assert r.returncode == 0, err
    assert np.array_equal(png(tmp_path / "k.png"), png(tmp_path / "f.png"))  # --pool patch: the same patch tokens
    r, out, err = show(str(outputs / "packed"), "--key", "nope.png", "--out", str(tmp_path / "n.png"))
    assert r.returncode == 2 and out == "" and "nope.png" in err and err.startswith("error: ")


def test_mask_blacks_out_one_half(outputs, tmp_path):
    r, _, err = show(str(outputs / "emb" / "halves.png.safetensors"), "--mask", "--out", str(tmp_path / "m.png"))
    assert r.returncode == 0, err
    grid_map = png(tmp_path / "m.png")[GAP: GAP + SIDE, 2 * GAP + SIDE: 2 * GAP + 2 * SIDE]
    black = (grid_map == 0).all(axis=-1)
    left, right = black[:, : SIDE // 2].mean(), black[:, SIDE // 2:].mean()
    assert max(left, right) == 1.0 and min(left, right) < 0.5  # one half all background, the other not
    # A threshold below every score keeps every patch.
    r, _, err = show(str(outputs / "emb" / "halves.png.safetensors"), "--mask", "--mask-threshold", "-1e9",
                     "--out", str(tmp_path / "all.png"))
    assert r.returncode == 0, err
    assert not (png(tmp_path / "all.png")[GAP: GAP + SIDE, 2 * GAP + SIDE: 2 * GAP + 2 * SIDE] == 0).all(axis=-1).all()


def test_a_folder_is_shown_sorted_up_to_limit_and_bad_arguments_are_refused(outputs, tmp_path):
    r, _, err = show(str(outputs / "emb"), "--limit", "2", "--out", str(tmp_path / "d.png"))
    assert r.returncode == 0, err
    assert "first 2 of 3" in err  # gone, halves (twin left out): the sorted order
    assert png(tmp_path / "d.png").shape == (TILE[0] + LABEL + 2 * GAP, 2 * TILE[1] + 3 * GAP, 3)
    for args, code, words in (((str(tmp_path / "none.safetensors"),), 1, "no such file"),
                              ((str(outputs / "emb"), "--key", "x"), 2, "--key"),
                              ((str(outputs / "packed" / "index.jsonl"),), 2, "packed folder")):
        r, out, err = show(*args, "--out", str(tmp_path / "x.png"))
        assert r.returncode == code and out == "" and words in err and err.startswith("error: "), err
    r, out, err = show(str(outputs / "emb"), "--out", str(tmp_path / "x.jpg"))
    assert r.returncode == 2 and ".png" in err
    assert not (tmp_path / "x.png").exists() and not list(tmp_path.glob(".vitembed-*"))


def test_npy_outputs_get_one_warning_for_their_missing_sources(outputs, small_ckpt, tmp_path):
    """New-user report: a --format npy folder warned 'no source recorded' once per file."""
    src = [str(outputs / "src" / n) for n in ("halves.png", "twin.png")]
    r = run_cli("encode", *src, "--out", str(tmp_path / "npy"), "--format", "npy", "--weights", str(small_ckpt), "-q")
    assert r.returncode == 0, r.stderr
    r, _, err = show(str(tmp_path / "npy"), "--out", str(tmp_path / "n.png"))
    assert r.returncode == 0, err
    lines = [line for line in err.splitlines() if "no source recorded" in line]
    assert len(lines) == 1 and "and 1 more" in lines[0], err
    assert png(tmp_path / "n.png").shape == (SIDE + LABEL + 2 * GAP, 2 * SIDE + 3 * GAP, 3)  # maps alone, named


def test_the_png_never_replaces_a_source_and_a_fifo_does_not_block(outputs, tmp_path):
    """Breaking pass: `show so --out s/photo.png` replaced the photo; a FIFO named x.safetensors hung."""
    import os
    import shutil

    source = outputs / "src" / "halves.png"
    before = source.read_bytes()
    r, _, err = show(str(outputs / "emb" / "halves.png.safetensors"), "--out", str(source))
    assert r.returncode == 2 and "is the source image of" in err and source.read_bytes() == before, err
    r, _, err = show(str(outputs / "emb"), "--mask", "--mask-threshold", "nan", "--out", str(tmp_path / "m.png"))
    assert r.returncode == 2 and "--mask-threshold nan" in err, err
    folder = tmp_path / "fifo"
    shutil.copytree(outputs / "emb", folder)
    os.mkfifo(folder / "zz.safetensors")
    r = run_cli("show", str(folder), "--out", str(tmp_path / "f.png"), timeout=60)
    assert r.returncode == 1 and "zz.safetensors: not a regular file" in r.stderr.decode(), r.stderr.decode()


def test_outputs_of_two_models_or_seeds_do_not_share_a_sheet(outputs, tmp_path):
    """Breaking pass: two models of one width were drawn with one PCA basis, exit 0."""
    src = str(outputs / "src" / "halves.png")
    for seed in ("0", "1"):
        r = run_cli("encode", src, "--out", str(tmp_path / seed), "--model", "deit-tiny-patch16-224",
                    "--weights", "random", "--seed", seed, "-q")
        assert r.returncode == 0, r.stderr
    r, _, err = show(str(tmp_path / "0"), str(tmp_path / "1"), "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "seed '1', but" in err and not (tmp_path / "x.png").exists(), err
    r, _, err = show(str(tmp_path / "0"), str(tmp_path / "0" / "halves.png.safetensors"), "--out", str(tmp_path / "y.png"))
    assert r.returncode == 0, err
