"""``vitembed show``: the patch features as a picture, beside the image as the model saw it.

The DINOv2 paper's visualisation (Oquab et al. 2023, Fig. 1): the first three principal components
of the patch tokens as red, green and blue on the patch grid; with ``mask``, patches whose first
component is below a threshold are background (black), the colours refitted on the rest. Several
outputs share one PCA basis, so a colour means the same in every tile of a contact sheet. Numpy and
Pillow only; no torch (except DINOv3's float resize, ``resize_backend: torch``).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError, UsageError, VitembedWarning, shown

__all__ = ["PatchTokens", "read_patch_tokens", "pca_basis", "pca_maps", "model_view", "show_outputs"]

GAP = 4  # pixels between the image and its map, and around the tiles of a sheet
BACKGROUND = (255, 255, 255)  # the sheet behind the tiles (masked patches are black)
LABEL = 14  # pixels: the strip under each tile of a sheet of several outputs naming it
PERCENTILES = (1.0, 99.0)  # each component is scaled to 0..1 between these percentiles, clipped


@dataclass
class PatchTokens:
    """The patch tokens of one output.

    Attributes:
        name: the output as messages name it (a file, or ``DIR[key]`` for a packed row).
        tokens: (h * w, D) float32, row-major on the patch grid; prefix tokens left out.
        grid: (h, w) in patches.
        source: the input image's path as the metadata records it ('' when none).
        metadata: the output's settings (``settings.run_settings``).
    """

    name: str
    tokens: np.ndarray
    grid: tuple[int, int]
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def read_patch_tokens(paths, keys=(), limit: int = 16) -> list[PatchTokens]:
    """Patch tokens of outputs of ``vitembed encode``: per-image files (.safetensors, .npy), folders
    of them (all, sorted), packed folders (``--pack``: the rows ``keys`` names, each of every packed
    folder, else all by key); the first ``limit`` in all (a ``VitembedWarning`` when more).

    Raises:
        UsageError: a pooled output (``--pool cls/mean/head``: no patch tokens), a key not there,
            ``keys`` without a packed folder, metadata without the grid, outputs of different widths.
        InputError: a path that does not exist or cannot be read.
    """
    from .layouts import PackedLayout
    from .layouts.files import _outputs_under
    from .layouts.packed_index import recover_parts, scan_index

    paths, items = [Path(p) for p in paths], []  # items: (kind, what)
    for path in paths:
        if not os.path.lexists(path):
            raise InputError(str(path), "not-found", "no such file or folder")
        packed = PackedLayout.owns(path)
        if packed and not path.is_dir():  # a part file, or index.jsonl
            raise UsageError(f"{shown(path)} is part of a packed folder: show {shown(path.parent)} (with --key)")
        if packed:  # the index's latest entry of each key (parts it never named included)
            index = recover_parts(path, *scan_index(path, warn=True), write=False)
            index = {k: e for k, e in index.items() if e.get("status") == "encoded"}
            items += [("row", (path, key, index.get(key))) for key in (keys or sorted(index))]
        elif path.is_dir():
            items += [("file", f) for f in sorted(_outputs_under(path))]
        else:
            items.append(("file", path))
    if keys and not any(kind == "row" for kind, _ in items):
        raise UsageError("--key names rows of a packed folder (--pack); none was given")
    if not items:
        raise UsageError(f"no vitembed outputs to show under {', '.join(shown(p) for p in paths)}")
    if len(items) > limit:
        warnings.warn(VitembedWarning(f"showing the first {limit} of {len(items)} outputs (--limit)"))
    out = [_packed_row(*what) if kind == "row" else _file(what) for kind, what in items[:limit]]
    for item in out[1:]:
        if item.tokens.shape[1] != out[0].tokens.shape[1]:
            raise UsageError(f"{item.name}: tokens of width {item.tokens.shape[1]}, {out[0].name}: "
                             f"{out[0].tokens.shape[1]}; show outputs of one model at a time")
    return out


def _file(file: Path) -> PatchTokens:
    """One per-image output (``vitembed.load``; NaFlex's own grid from the file's header)."""
    from .layouts import load

    loaded = load(file)
    meta = dict(loaded.metadata)
    if file.suffix == ".safetensors" and meta.get("grid") in (None, "naflex"):
        from safetensors import safe_open

        with safe_open(str(file), framework="numpy") as f:
            meta["grid"] = (f.metadata() or {}).get("grid", meta.get("grid", ""))
    name = shown(file)
    tokens, grid = _patches(name, np.asarray(loaded.embeddings[0]), meta)
    return PatchTokens(name, tokens, grid, loaded.sources[0], meta)


def _packed_row(folder: Path, key: str, entry: dict | None) -> PatchTokens:
    """One row of a packed folder (``entry``: its index entry, None for a key not there), read alone
    from its part (a ``safe_open`` slice; a bfloat16 part is read whole)."""
    from safetensors import safe_open

    from .layouts.packed_index import part_holds
    from .layouts.packed_index import PACK_TENSOR, PART_NAME, read_part
    from .tensors import load_tensor

    name = f"{shown(folder)}[{shown(key)}]"
    if entry is None:
        raise UsageError(f"{name}: no encoded row with this key in {shown(folder)}")
    part, row = str(entry.get("part")), entry.get("row")
    info = read_part(folder / part) if PART_NAME.match(part) else None
    if info is None or not part_holds(info, row, key):
        raise UsageError(f"{name}: the index names a row that is not in its part; run the same encode again")
    with safe_open(str(folder / part), framework="numpy") as f:
        piece = f.get_slice(PACK_TENSOR)
        array = load_tensor(str(folder / part), PACK_TENSOR)[row] if piece.get_dtype() == "BF16" else piece[row]
    tokens, grid = _patches(name, np.asarray(array), info.settings or {})
    return PatchTokens(name, tokens, grid, entry.get("source", ""), info.settings or {})


def _patches(name: str, array: np.ndarray, meta: dict[str, str]) -> tuple[np.ndarray, tuple[int, int]]:
    """An output's tensor -> ((h * w, D) float32 patch tokens, (h, w)), following its ``pool``,
    ``prefix_tokens`` and ``grid`` metadata."""
    pool = meta.get("pool", "none")
    if pool not in ("none", "patch") or array.ndim != 2:
        raise UsageError(f"{name}: a pooled output (--pool {pool}, shape {array.shape}) has no patch tokens; "
                         "encode with --pool none or --pool patch to show it")
    try:
        h, w = (int(v) for v in meta["grid"].split("x"))
        prefix = 0 if pool == "patch" else int(meta["prefix_tokens"])
    except (KeyError, ValueError):
        raise UsageError(f"{name}: its metadata does not give the patch grid and prefix tokens "
                         "(npy outputs need DIR/vitembed.json)") from None
    if array.shape[0] != prefix + h * w:
        raise UsageError(f"{name}: {array.shape[0]} tokens, but {prefix} prefix tokens and a {h}x{w} grid")
    return np.ascontiguousarray(array[prefix:], dtype=np.float32), (h, w)


def pca_basis(tokens: np.ndarray, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), components (n, D)), float64: the mean of ``tokens`` (N, D) and its first ``n``
    principal directions, the right singular vectors of the centred matrix (the covariance's
    eigenvectors, largest variance first), as orthonormal rows; each one's sign fixed so that its
    largest-magnitude entry is positive (identical tokens, identical components). Directions
    beyond N - 1 or D are zero."""
    x = np.asarray(tokens, dtype=np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    components = np.zeros((n, x.shape[1]))
    components[: min(n, len(vt))] = vt[:n]
    for c in components:
        if c.any() and c[np.argmax(np.abs(c))] < 0:
            c *= -1
    return mean, components


def _scaled(scores: np.ndarray) -> np.ndarray:
    """(N, k) scores -> (N, k) in 0..1: each column between its ``PERCENTILES``, clipped (0.5 when flat)."""
    low, high = np.percentile(scores, PERCENTILES, axis=0)
    span = high - low
    flat = span <= 1e-12 * np.maximum(1.0, np.abs(high))
    out = np.clip((scores - low) / np.where(flat, 1.0, span), 0.0, 1.0)
    out[:, flat] = 0.5
    return out


def pca_maps(token_sets, grids, mask: bool = False, threshold: float = 0.0) -> list[np.ndarray]:
    """Patch tokens of several images -> one RGB map each on its patch grid, sharing one PCA basis.

    As the DINOv2 paper's visualisation (Oquab et al. 2023, Fig. 1): the first three principal
    components of all images' patch tokens together (``pca_basis``) are red, green and blue, each
    scaled to 0..1 between its 1st and 99th percentile over all patches, clipped. With ``mask``,
    patches whose first-component score (the projection of the centred token on the first
    direction, in token units) is below ``threshold`` are background, black, and the PCA and the
    scaling are refitted on the other (foreground) patches.

    Args:
        token_sets: one (h_i * w_i, D) array per image, row-major on its grid.
        grids: one (h_i, w_i) per image.

    Returns:
        One (h_i, w_i, 3) uint8 array per image. A warning when ``mask`` leaves no foreground.
    """
    x = np.concatenate([np.asarray(t, dtype=np.float64) for t in token_sets])
    rgb = np.zeros((len(x), 3))
    keep = np.ones(len(x), dtype=bool)
    if mask:
        mean, comp = pca_basis(x, 1)
        keep = (x - mean) @ comp[0] >= threshold
        if not keep.any():
            warnings.warn(VitembedWarning(f"--mask: no patch has a first-component score of {threshold} or more; "
                                          "every patch is background"))
    if keep.any():
        mean, comp = pca_basis(x[keep])
        rgb[keep] = _scaled((x[keep] - mean) @ comp.T)
    pixels = np.round(rgb * 255).astype(np.uint8)
    bounds = np.cumsum([0] + [h * w for h, w in grids])
    return [pixels[a:b].reshape(h, w, 3) for a, b, (h, w) in zip(bounds[:-1], bounds[1:], grids)]


def _preprocess_of(meta: dict[str, str]):
    """The ``PreprocessConfig`` an output's metadata records (KeyError, ValueError or UsageError if not)."""
    from .preprocess_config import PreprocessConfig

    naflex = meta["resize"] == "naflex"
    return PreprocessConfig(
        image_size=int(meta["image_size"]), resize=meta["resize"], interpolation=meta["interpolation"],
        mean=tuple(float(v) for v in meta["mean"].split(",")), std=tuple(float(v) for v in meta["std"].split(",")),
        resize_size=None if naflex else int(meta["resize_size"]), crop=meta.get("crop") == "true",
        crop_rounding=meta.get("crop_rounding", "floor"),
        crop_pct=float(meta["crop_pct"]) if "crop_pct" in meta else None,
        backend=meta.get("resize_backend", "pil"), patch_size=int(meta["patch_size"]),
        max_num_patches=int(meta["max_num_patches"]) if naflex else 256)


def model_view(item: PatchTokens) -> np.ndarray | None:
    """The source image as the model saw it: (H, W, 3) uint8 RGB, decoded and resized (and cropped)
    by vitembed's own ``preprocess.resize`` with the settings the output records. None, with a
    ``VitembedWarning`` naming the output, when the source is not recorded, missing or unreadable,
    or the metadata lacks the preprocessing settings."""
    from .decode import DecodeOptions, decode_image
    from .preprocess import resize

    if not item.source:
        warnings.warn(VitembedWarning(f"{item.name}: no source recorded; showing the map alone"))
        return None
    try:
        cfg = _preprocess_of(item.metadata)
        background = tuple(int(v) for v in item.metadata.get("background", "255,255,255").split(","))
        options = DecodeOptions(background=background, allow_truncated=item.metadata.get("allow_truncated") == "true")
        pixels = resize(decode_image(item.source, options), cfg)
    except (KeyError, ValueError, UsageError) as e:
        warnings.warn(VitembedWarning(f"{item.name}: its metadata does not give the preprocessing ({e}); "
                                      "showing the map alone"))
        return None
    except (InputError, OSError, MemoryError) as e:
        reason = e.reason if isinstance(e, InputError) else (getattr(e, "strerror", None) or str(e))
        warnings.warn(VitembedWarning(f"{item.name}: source {shown(item.source)}: {reason}; showing the map alone"))
        return None
    if pixels.dtype != np.uint8:  # float in [0, 1] (resize_backend torch)
        pixels = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    return pixels


def _tile(view: np.ndarray | None, grid_map: np.ndarray, patch: int, with_view: bool) -> np.ndarray:
    """[view | GAP | map], the map upsampled by ``patch`` (nearest: each patch a square) onto the
    view's size (black where the grid does not reach); the view's slot blank when it is missing."""
    cells = np.repeat(np.repeat(grid_map, patch, axis=0), patch, axis=1)
    h, w = (view.shape[:2] if view is not None else cells.shape[:2])
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    canvas[: min(h, cells.shape[0]), : min(w, cells.shape[1])] = cells[:h, :w]
    if not with_view:
        return canvas
    tile = np.full((h, 2 * w + GAP, 3), BACKGROUND, dtype=np.uint8)
    if view is not None:
        tile[:, :w] = view
    tile[:, w + GAP:] = canvas
    return tile


def _sheet(tiles: list[np.ndarray], columns: int, labels: list[str] | None = None) -> np.ndarray:
    """Tiles in rows of ``columns``, each in a cell of the largest tile's size (top-left), GAP apart
    and around: (rows * (H + L + GAP) + GAP, cols * (W + GAP) + GAP, 3) uint8, where L is LABEL
    with ``labels`` (each tile's name, written under it, shortened from the left to fit) and 0
    without."""
    cols = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    H, W = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    strip = LABEL if labels else 0
    sheet = np.full((rows * (H + strip + GAP) + GAP, cols * (W + GAP) + GAP, 3), BACKGROUND, dtype=np.uint8)
    for i, t in enumerate(tiles):
        top, left = GAP + (i // cols) * (H + strip + GAP), GAP + (i % cols) * (W + GAP)
        sheet[top: top + t.shape[0], left: left + t.shape[1]] = t
    if not labels:
        return sheet
    from PIL import ImageDraw, ImageFont

    image = Image.fromarray(sheet, "RGB")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for i, label in enumerate(labels):
        top, left = GAP + (i // cols) * (H + strip + GAP) + H, GAP + (i % cols) * (W + GAP)
        tail = label
        while tail and draw.textlength(label, font=font) > W:  # keep the end: the file name
            tail = tail[1:]
            label = "..." + tail
        draw.text((left, top + 1), label, fill=(0, 0, 0), font=font)
    return np.asarray(image)


MODEL_KEYS = ("model", "family", "weights_sha256", "random_weights", "seed", "layer", "hidden_size")  # one feature space


def _check_one_model(items: list[PatchTokens]) -> None:
    """Refuse outputs of different models, weights or layers on one sheet: one PCA basis over
    their tokens would mix two feature spaces whose axes mean different things."""
    first = items[0]
    for item in items[1:]:
        differ = [k for k in MODEL_KEYS if item.metadata.get(k) != first.metadata.get(k)]
        if differ:
            k = differ[0]
            raise UsageError(f"{item.name}: {k} {item.metadata.get(k, '<none>')!r}, but {first.name}: "
                             f"{first.metadata.get(k, '<none>')!r}; one sheet shows the outputs of one model, "
                             "weights and layer (their PCA basis is shared)")


def _label(name: str) -> str:
    """A tile's name: a packed row's key (``DIR[sub/cat.jpg]``: ``sub/cat.jpg``), or the output file's
    name less its suffix (``emb/sub/cat.jpg.safetensors``: ``cat.jpg``)."""
    if name.endswith("]") and "[" in name:
        return name[name.index("[") + 1: -1]
    file = Path(name).name
    return file.rsplit(".", 1)[0] if file.endswith((".safetensors", ".npy")) else file


def show_outputs(paths, out, keys=(), mask: bool = False, mask_threshold: float = 0.0, limit: int = 16,
                 columns: int = 4) -> Path:
    """Write one PNG, ``out`` (atomically: a temporary file renamed into place), and return its path:
    for each output (``read_patch_tokens`` of ``paths``, ``keys``, ``limit``), the image as the model
    saw it (``model_view``) beside its patch-feature map (``pca_maps``, one basis for all, ``mask``),
    each patch a P x P square; tiles GAP pixels apart, ``columns`` a row, each named under it when
    there are several. Outputs whose source is
    missing get the map alone (a warning); when none has one, the tiles are maps only.

    Raises:
        UsageError: ``out`` not a .png, ``limit`` or ``columns`` below 1, or as ``read_patch_tokens``.
        InputError: as ``read_patch_tokens``, or ``out`` cannot be written.
    """
    from .files import atomic_write

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {shown(out)}: expected a .png file")
    if limit < 1 or columns < 1:
        raise UsageError(f"--limit and --columns must be at least 1 (got {limit} and {columns})")
    if not math.isfinite(mask_threshold):
        raise UsageError(f"--mask-threshold {mask_threshold}: must be a finite number")
    items = read_patch_tokens(paths, keys, limit)
    _check_one_model(items)
    target = os.path.realpath(out)
    for item in items:  # the PNG must never replace what it shows
        if item.source and os.path.realpath(item.source) == target:
            raise UsageError(f"--out {shown(out)} is the source image of {item.name}; write the PNG elsewhere")
    maps = pca_maps([i.tokens for i in items], [i.grid for i in items], mask, mask_threshold)
    unsourced = [i.name for i in items if not i.source]
    if unsourced:  # npy outputs hold no metadata: one warning, not one per file
        warnings.warn(VitembedWarning(
            f"{unsourced[0]}" + (f" and {len(unsourced) - 1} more" if len(unsourced) > 1 else "")
            + ": no source recorded (npy files hold no metadata); showing the map alone"))
    views = [model_view(i) if i.source else None for i in items]
    with_view = any(v is not None for v in views)
    tiles = [_tile(v, m, int(i.metadata.get("patch_size", 16)), with_view) for v, m, i in zip(views, maps, items)]
    buffer = io.BytesIO()
    labels = [_label(i.name) for i in items] if len(items) > 1 else None  # which tile is which
    Image.fromarray(_sheet(tiles, columns, labels), "RGB").save(buffer, "PNG")
    try:
        atomic_write(out, buffer.getbuffer())
    except OSError as e:
        raise InputError(str(out), "write-failed", f"cannot write: {e.strerror or e}") from None
    return out
