"""``vitembed verify``: are these the real embeddings? vitembed against its reference, on your images.

    >>> from vitembed.verify import verify
    >>> report = verify("vit-base-patch16-224-in21k", "weights/vit-b16/")    # synthetic images
    >>> report.ok, [(row.name, row.max_abs) for row in report.rows]

For a checkpoint folder (config.json + weights) the reference is transformers: its image processor
(``AutoImageProcessor.from_pretrained(folder, backend="pil")``) and its model
(``AutoModel.from_pretrained(folder)``, float32, eval, ``output_hidden_states=True``; for a whole
CLIP/SigLIP-style model its ``vision_model`` for the hidden states and ``get_image_features`` for
``image_features``). For a single timm-layout weights file the reference is timm. Both sides
decode an image the same way (vitembed's decoder: EXIF orientation, sRGB, alpha onto the
background); from there each side preprocesses and runs on its own, so a difference in the
preprocessing shows up in the layers too. vitembed runs on the CPU in float32, as the reference.

Three kinds of comparison (``Row.item``):

- ``pixels``: ``Encoder.preprocess(image)`` (3, S, S) float32 against the reference processor's
  ``pixel_values[0]``, per image; they must be bit-identical (``torch.equal``).
- ``layer``: the (N, T, D) tokens of a layer (``embeddings`` = ``hidden_states[0]``, block ``N`` =
  ``hidden_states[N]``, ``last`` = ``last_hidden_state``), cosine similarity per token.
- ``pooled``: each (vitembed pool mode, reference output) pair the family declares
  (``Family.reference_pooled``), (N, P) vectors, cosine similarity per image.

An item passes when its max-abs difference is at most ``TOLERANCE`` (float32 noise of a different
order of summation; the pixels: 0). Imports torch and the reference only when called.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError
from .verify_reference import INSTALL_HINT, Reference, ReferenceUnavailableError, TransformersReference, reference_for

TOLERANCE = 1e-4  # max-abs difference allowed between vitembed's and the reference's float32 outputs
OVERRIDES = ("image_size", "resize", "interpolation", "crop_pct", "mean", "std")  # passed to vitembed only
SYNTHETIC_SIZES = ((320, 213), (180, 300), (256, 256))  # (width, height) of the default images

__all__ = ["INSTALL_HINT", "TOLERANCE", "ReferenceUnavailableError", "Row", "Skipped", "VerifyReport",
           "synthetic_images", "verify"]


@dataclass(frozen=True)
class Row:
    """One compared item.

    Attributes:
        item: ``pixels``, ``layer`` or ``pooled``.
        name: ``pixel_values``; the layer (``embeddings``, ``N``, ``last``); the pool mode.
        reference: what it is compared with (``pixel_values``, ``hidden_states[N]``,
            ``last_hidden_state``, ``pooler_output``, ``image_features``, ``cls_of_last``).
        max_abs: largest absolute difference (None when the shapes differ).
        cosine_mean, cosine_min: cosine similarity, mean and minimum over tokens (layers),
            images (pixels, flattened; pooled vectors); None when the shapes differ.
        ok: within ``TOLERANCE``; for pixels, bit-identical.
        equal: ``torch.equal`` of the two (the pixels' criterion).
        note: why it failed, when it is not just the numbers (shapes, a pooling vitembed refuses).
    """

    item: str
    name: str
    reference: str
    max_abs: float | None
    cosine_mean: float | None
    cosine_min: float | None
    ok: bool
    equal: bool = False
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        out = {"item": self.item, "name": self.name, "reference": self.reference, "max_abs": self.max_abs,
               "cosine_mean": self.cosine_mean, "cosine_min": self.cosine_min, "ok": self.ok, "equal": self.equal}
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True)
class Skipped:
    """An item that was not compared, and why (no reference processor, an output the loaded
    reference model does not have)."""

    item: str
    name: str
    reason: str


@dataclass
class VerifyReport:
    """What ``verify`` found.

    Attributes:
        rows: the compared items, pixels first, then the layers, then the pooled vectors.
        skipped: items not compared, with the reason.
        model: vitembed's model name (``Encoder.model_name``); family: its family.
        weights: where the weights came from; reference: the reference, in words
            (``transformers ViTModel + ViTImageProcessorPil``).
        reference_input: ``own`` (the reference ran on its processor's pixels) or ``vitembed``
            (no reference processor: it ran on vitembed's).
        images: how many images were compared; image_names: them, for messages.
        tolerance: ``TOLERANCE``.
    """

    rows: list[Row]
    skipped: list[Skipped]
    model: str
    family: str
    weights: str
    reference: str
    reference_input: str
    images: int
    image_names: list[str] = field(default_factory=list)
    tolerance: float = TOLERANCE

    @property
    def ok(self) -> bool:
        """Every compared item within tolerance and the inputs bit-identical."""
        return all(row.ok for row in self.rows)

    @property
    def failed(self) -> list[Row]:
        return [row for row in self.rows if not row.ok]

    def summary(self) -> dict[str, Any]:
        """The ``{"summary": ...}`` object of ``--json``."""
        return {"ok": self.ok, "model": self.model, "family": self.family, "weights": self.weights,
                "reference": self.reference, "reference_input": self.reference_input, "images": self.images,
                "tolerance": self.tolerance, "compared": len(self.rows),
                "failed": [f"{row.item} {row.name}" for row in self.failed],
                "skipped": [dataclasses.asdict(s) for s in self.skipped]}

    def json_lines(self) -> list[str]:
        """One JSON object per compared item, then the summary."""
        return [json.dumps(row.as_json()) for row in self.rows] + [json.dumps({"summary": self.summary()})]


def synthetic_images(sizes: tuple[tuple[int, int], ...] = SYNTHETIC_SIZES, seed: int = 0) -> list[Any]:
    """Made-up RGB PIL images (gradients, stripes and noise; seeded, so always the same), of the
    (width, height) ``sizes``: landscape, portrait and square, so that resize and crop have work."""
    import numpy as np
    from PIL import Image

    images = []
    for i, (width, height) in enumerate(sizes):
        rng = np.random.default_rng(seed + i)
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        r = 127 + 120 * np.sin(x / width * (5.0 + i) + i)
        g = 127 + 120 * np.cos(y / height * (4.0 + i))
        b = (x + y) / (width + height) * 255
        arr = np.stack([r, g, b], axis=-1) + rng.normal(0, 20, (height, width, 3))
        images.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"))
    return images


def verify(model: str | os.PathLike | None = None, weights: Any = None, images: Any = None,
           layers: Any = None, **overrides: Any) -> VerifyReport:
    """Run vitembed and its reference on ``images`` and compare inputs, layers and pooled vectors.

    Args:
        model: a catalog name (None: the default model), or a checkpoint folder (as ``Encoder``).
        weights: a checkpoint folder (config.json + model.safetensors / pytorch_model.bin; the
            reference is transformers), a single timm-layout weights file (the reference is timm),
            or None to find them as ``vitembed encode`` does. Not ``random``: nothing to compare with.
        images: paths, PIL images or (H, W, 3) uint8 arrays (None: ``synthetic_images()``).
        layers: layer names (``embeddings``, ``N``, ``last``); None: ``embeddings``, the middle
            block (depth // 2) and ``last``.
        **overrides: ``image_size``, ``resize``, ``interpolation``, ``crop_pct``, ``mean``, ``std``:
            applied to vitembed's Encoder only; the reference keeps its own processor, so an
            override that changes the input shows up as a difference.

    Returns:
        A ``VerifyReport``: ``ok`` when every max-abs is at most ``TOLERANCE`` (1e-4) and the
        inputs are bit-identical.

    Raises:
        UsageError: ``weights="random"``, an unknown override, a layer the model does not have,
            a NaFlex checkpoint (variable-size inputs are not compared yet).
        ReferenceUnavailableError: transformers (or timm) missing, weights no reference reads.
        WeightsNotFoundError, CheckpointError: as ``Encoder``.
        InputError: an image that cannot be decoded.
    """
    from .catalog import DEFAULT_MODEL, get_model_spec
    from .config import layer_index
    from .options import ModelOptions
    from .weights import RANDOM, resolve_weights

    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise UsageError(f"verify: unknown option(s) {', '.join(unknown)}; expected some of: {', '.join(OVERRIDES)}")
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise UsageError(f"--weights must be a path (got {weights!r})")
    if weights is not None and os.fspath(weights) == RANDOM:
        raise UsageError("verify --weights random: random weights have no reference to compare with; "
                         "give a checkpoint folder or file")
    options = ModelOptions(model=DEFAULT_MODEL if model is None else model, weights=weights, device="cpu",
                           dtype="float32", **{k: v for k, v in overrides.items() if v is not None})
    spec = get_model_spec(options.model)
    resolved = resolve_weights(spec, options.weights, options.seed, progress=False)
    reference = reference_for(resolved, spec)  # before the Encoder: a missing reference costs nothing

    from .encoder import Encoder
    from .options import EncodingOptions

    encoder = Encoder(options=dataclasses.replace(options, weights=resolved), encoding=EncodingOptions())
    cfg = encoder.weights.config
    layers = [layers] if isinstance(layers, (str, int)) else list(layers or ())
    if not layers:
        layers = ["embeddings", str(max(1, cfg.depth // 2)), "last"]
    names = []
    for layer in layers:
        name = str(int(layer)) if isinstance(layer, int) or (isinstance(layer, str) and layer.isdigit()) else layer
        if not isinstance(name, str):
            raise UsageError(f"--layer must be last, embeddings or a block number (got {layer!r})")
        layer_index(name, cfg.depth)
        if name not in names:
            names.append(name)
    if cfg.naflex:
        return _compare_naflex(encoder, reference, _inputs(images), names)
    return _compare(encoder, reference, _inputs(images), names)


# --- comparing ---------------------------------------------------------------------------------


def _inputs(images: Any) -> list[tuple[str, Any]]:
    """(name, image) pairs: paths, PIL images or arrays as given, or the synthetic images."""
    from .encoder import _as_list

    if images is None:
        return [(f"synthetic-{i}", im) for i, im in enumerate(synthetic_images())]
    items = _as_list(images)
    if not items:
        raise UsageError("verify: no images given (give none at all for the synthetic ones)")
    return [(os.fspath(im) if isinstance(im, (str, os.PathLike)) else f"image {i}", im) for i, im in enumerate(items)]


def _decoded(encoder: Any, image: Any) -> Any:
    """The RGB PIL image both sides start from: vitembed's decoding of a file (EXIF orientation,
    sRGB, alpha onto the background); a PIL image or an array as it is, made RGB the same way."""
    from PIL import Image

    from .decode import decode_image, to_rgb, upright

    if isinstance(image, (str, os.PathLike)):
        return decode_image(image, encoder.encoding.decode)
    if isinstance(image, Image.Image):
        return to_rgb(upright(image), encoder.encoding.decode.background)
    encoder.pixels(image)  # an array that is not (H, W, 3) uint8: the Encoder's InputError
    return Image.fromarray(image, "RGB")


def _row(item: str, name: str, reference: str, ours: Any, theirs: Any, per: str, exact: bool = False) -> Row:
    """Compare two tensors: ``per`` says what a cosine is taken over (``token``: the last dim of
    (N, T, D); ``row``: each row of (N, ...) flattened)."""
    import torch
    import torch.nn.functional as F

    if tuple(ours.shape) != tuple(theirs.shape):
        return Row(item, name, reference, None, None, None, False,
                   note=f"shapes differ: vitembed {tuple(ours.shape)}, reference {tuple(theirs.shape)}")
    a, b = ours.detach().double(), theirs.detach().double()
    if per == "row":
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    cos = F.cosine_similarity(a, b, dim=-1)
    equal = torch.equal(ours, theirs)
    max_abs = float((a - b).abs().max()) if a.numel() else 0.0
    ok = equal if exact else max_abs <= TOLERANCE
    return Row(item, name, reference, max_abs, float(cos.mean()), float(cos.min()), bool(ok), bool(equal))


def _compare(encoder: Any, reference: Reference, images: list[tuple[str, Any]], names: list[str]) -> VerifyReport:
    import torch

    rows: list[Row] = []
    skipped: list[Skipped] = []
    with torch.inference_mode():
        ours_px = torch.stack([encoder.preprocess(image) for _, image in images])  # (N, 3, S, S) float32
        if reference.has_processor:
            theirs_list = [reference.pixels(_decoded(encoder, image)) for _, image in images]
            same = len({tuple(t.shape) for t in theirs_list}) == 1
            theirs_px = torch.stack(theirs_list) if same else None
            if theirs_px is None:
                rows.append(Row("pixels", "pixel_values", "pixel_values", None, None, None, False,
                                note="the reference's inputs differ in shape from image to image"))
            else:
                rows.append(_row("pixels", "pixel_values", "pixel_values", ours_px, theirs_px, "row", exact=True))
            used = "own"
        else:
            skipped.append(Skipped("pixels", "pixel_values", reference.no_processor_reason + "; the reference model "
                                   "runs on vitembed's inputs, so only the model is compared"))
            theirs_px, used = ours_px, "vitembed"
        if theirs_px is not None:
            ours = encoder.model(ours_px, layers=tuple(dict.fromkeys([*names, "last"])))
            theirs = reference.run(theirs_px)
            hidden = theirs["hidden_states"] or ()
            for name in names:
                if name == "last":
                    want, label = theirs["last_hidden_state"], "last_hidden_state"
                else:
                    index = 0 if name == "embeddings" else int(name)
                    label = f"hidden_states[{index}]"
                    if index >= len(hidden):
                        rows.append(Row("layer", name, label, None, None, None, False,
                                        note=f"the reference gives {len(hidden)} hidden states"))
                        continue
                    want = hidden[index]
                rows.append(_row("layer", name, label, ours[name], want, "token"))
            family, cfg = encoder.family, encoder.weights.config
            for mode, output in family.reference_pooled:
                want, why = reference.pooled(theirs, theirs_px, output)
                if want is None:
                    skipped.append(Skipped("pooled", mode, why))
                    continue
                try:
                    family.check_pool(cfg, mode, "last")
                    got = family.pool(encoder.model, ours["last"], mode, "last")
                except UsageError as e:
                    rows.append(Row("pooled", mode, output, None, None, None, False,
                                    note=f"vitembed cannot give it: {e}"))
                    continue
                rows.append(_row("pooled", mode, output, got, want, "row"))
    return VerifyReport(rows, skipped, encoder.model_name, encoder.family.name, encoder.weights.source,
                        reference.description, used, len(images), [n for n, _ in images])


def _compare_naflex(encoder: Any, reference: Reference, images: list[tuple[str, Any]], names: list[str]) -> VerifyReport:
    """As ``_compare`` for SigLIP 2 NaFlex: both sides batch the images padded to
    ``max_num_patches`` (the reference with ``pixel_attention_mask`` and ``spatial_shapes``); the
    patches are compared whole (padding included), tokens over each image's real patches only."""
    import torch

    from .model import token_mask
    from .preprocess import normalize_patches

    if not isinstance(reference, TransformersReference) or reference.processor is None:
        raise UsageError("verify: a NaFlex checkpoint needs its transformers reference and its Siglip2ImageProcessor "
                         "(preprocessor_config.json)")
    rows: list[Row] = []
    with torch.inference_mode():
        batch = encoder.collate([encoder.pixels(image) for _, image in images])
        ours_px, grids = normalize_patches(batch, encoder.stats, torch.float32)
        inputs = reference.processor(images=[_decoded(encoder, image) for _, image in images], do_convert_rgb=True,
                                     return_tensors="pt")
        rows.append(_row("pixels", "pixel_values", "pixel_values", ours_px, inputs["pixel_values"].float(), "row",
                         exact=True))
        same_grids = torch.equal(grids.cpu(), inputs["spatial_shapes"].long())
        rows.append(Row("pixels", "spatial_shapes", "spatial_shapes", 0.0 if same_grids else None, None, None,
                        same_grids, same_grids, note="" if same_grids else "the patch grids differ"))
        mask = token_mask(grids, ours_px.shape[1])
        ours = encoder.model(ours_px, layers=tuple(dict.fromkeys([*names, "last"])), grids=grids)
        out = reference.tower(pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"],
                              spatial_shapes=inputs["spatial_shapes"], output_hidden_states=True)
        real = inputs["pixel_attention_mask"].bool()
        for name in names:
            want = out.last_hidden_state if name == "last" else out.hidden_states[0 if name == "embeddings" else int(name)]
            label = "last_hidden_state" if name == "last" else f"hidden_states[{0 if name == 'embeddings' else name}]"
            if not same_grids:
                rows.append(Row("layer", name, label, None, None, None, False, note="the patch grids differ"))
                continue
            rows.append(_row("layer", name, label, ours[name][mask][None], want[real][None], "token"))
        family = encoder.family
        if getattr(out, "pooler_output", None) is not None and same_grids:
            got = family.pool(encoder.model, ours["last"], "head", "last", mask=mask)
            rows.append(_row("pooled", "head", "pooler_output", got, out.pooler_output, "row"))
    return VerifyReport(rows, [], encoder.model_name, family.name, encoder.weights.source, reference.description,
                        "own", len(images), [n for n, _ in images])
