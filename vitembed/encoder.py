"""The Encoder: a model on a device with its preprocessing, images in, embeddings out.

    >>> import vitembed
    >>> encoder = vitembed.Encoder("dinov2-small", weights="random", pool="cls")
    >>> vectors = encoder.encode(["cat.jpg", pil_image, uint8_array])   # (3, 384) float32

It is what ``vitembed encode`` runs for every batch, and what a notebook calls directly.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from .catalog import DEFAULT_MODEL, get_model_spec
from .config import layer_index
from .errors import InputError, UsageError, VitembedWarning, warn
from .families import family_of
from .options import EncodingOptions, ModelOptions, split_fields
from .preprocess import (FAST_REDUCING_GAP, PatchBatch, collate_patches, load_pixels, normalize, normalize_patches,
                         normalize_stats, resize)
from .int8 import quantize_for_cpu
from .runtime import TORCH_DTYPES, compute_dtype, pack_for_cpu, resolve_device, resolve_dtype, usable_cores, will_pack
from .weights import ResolvedWeights, build_model, resolve_weights


class Encoder:
    """A model on a device with its preprocessing: images -> embeddings.

    On the CPU in float32 the block linears run through oneDNN with packed weights
    (``runtime.pack_for_cpu``); on CUDA, batches are copied from pinned host memory
    without blocking, and rescaled and normalised on the device.

    Build it from a model name and weights, with any field of ``ModelOptions`` and
    ``EncodingOptions`` as a keyword (``Encoder("dinov2-small", weights="random",
    device="cpu", layer="last", pool="cls")``), or from the option objects
    (``Encoder(options=ModelOptions(...), encoding=EncodingOptions(...))``), as the CLI does.
    ``model`` may also be a checkpoint folder or file, and ``weights`` an already resolved
    ``weights.ResolvedWeights``. Weights are found as the CLI finds them
    (``weights.resolve_weights``); ``progress`` shows huggingface_hub's download bars.
    ``defer_model`` checks everything but builds the model only when first needed (``build``),
    so that a run with nothing left to do does not load it.

    Random weights (``weights="random"``) are refused nowhere but warned about
    (``VitembedWarning``): their embeddings carry no meaning.

    Raises:
        UsageError: an option outside its allowed set, a layer beyond the model's depth.
        WeightsNotFoundError, CheckpointError: no weights, or weights that do not fit.
        DeviceError: a device that is not there (never a silent fallback).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        weights: Any = None,
        *,
        options: ModelOptions | None = None,
        encoding: EncodingOptions | None = None,
        progress: bool = False,
        defer_model: bool = False,
        **fields: Any,
    ):
        if options is None and encoding is None:
            options, encoding = split_fields({"model": model, "weights": weights, **fields}, ModelOptions, EncodingOptions)
        elif fields or model != DEFAULT_MODEL or weights is not None:
            raise UsageError("Encoder(): give options=/encoding= objects, or a model and keyword options, not both")
        for given, kind in ((options, ModelOptions), (encoding, EncodingOptions)):
            if given is not None and not isinstance(given, kind):
                raise UsageError(f"Encoder(): expected a vitembed.{kind.__name__}, got {type(given).__name__}")
        self.options, self.encoding = options or ModelOptions(), encoding or EncodingOptions()
        opts, spec = self.options, get_model_spec(self.options.model)
        given = opts.weights
        resolved = given if isinstance(given, ResolvedWeights) else resolve_weights(spec, given, opts.seed, progress=progress)
        self.weights = resolved.at_image_size(opts.image_size).with_overrides(**opts.preprocess_overrides())
        cfg = self.weights.config
        layer_index(self.encoding.layer, cfg.depth)  # a block the model does not have: refused before it is built
        family_of(cfg).check_pool(cfg, self.encoding.pool, self.encoding.layer)
        self.device = resolve_device(opts.device)
        self.dtype_name = resolve_dtype(opts.dtype, self.device)
        self.dtype, self.save_dtype = compute_dtype(self.dtype_name), TORCH_DTYPES[self.encoding.save_dtype]
        self.family = family_of(cfg)
        # A checkpoint with an architecture of its own is not the catalog model: say where it came from.
        theirs = spec.config()
        same = (cfg.family, cfg.hidden_size, cfg.depth, cfg.patch_size) == (
            theirs.family, theirs.hidden_size, theirs.depth, theirs.patch_size)
        self.model_name = spec.name if same else f"checkpoint:{cfg.family}"  # not its path: resume must not depend on it
        self.naflex = cfg.naflex
        if opts.compile and self.naflex:
            warn("--compile: NaFlex batches change shape with every batch; running eager")
        elif opts.compile and self.dtype_name == "int8":
            warn("--compile: --dtype int8 runs its oneDNN int8 linears eager; running eager")
        self._eager = self.naflex or self.dtype_name == "int8"  # --compile does not apply
        self._model: torch.nn.Module | None = None
        self._compiled, self._compiled_rows, self._packed = None, 0, False
        if not defer_model:
            self.build()
        self.stats = normalize_stats(self.weights.preprocess).to(self.device)  # (2, 3) mean, std
        if self.weights.random:
            warn("--weights random: the model has random weights; its embeddings carry no meaning.")

    def build(self) -> None:
        """Build the model from the weights on the device (done by the constructor unless
        ``defer_model``; again a no-op): compiled with ``compile``, else with packed CPU linears.

        Raises:
            CheckpointError: weights that do not fit the architecture.
        """
        if self._model is not None:
            return
        model = build_model(self.weights).to(device=self.device, dtype=self.dtype).eval()
        if self.options.compile and not self._eager:
            # On the CPU, Inductor's freezing packs the weights for oneDNN, as pack_for_cpu does for eager.
            self._compiled = torch.compile(model, options={"freezing": True} if self.device.type == "cpu" else None)
        else:
            self._packed = self._pack(model)
        self._model = model

    def _pack(self, model: torch.nn.Module) -> bool:
        """The CPU kernels for this dtype: int8 linears (``--dtype int8``), else packed float32 ones."""
        return quantize_for_cpu(model) if self.dtype_name == "int8" else pack_for_cpu(model)

    @property
    def model(self) -> torch.nn.Module:
        """The ``model.VisionTransformer`` (built now if the constructor deferred it)."""
        if self._model is None:
            self.build()
        return self._model

    @property
    def packed(self) -> bool:
        """Whether the block linears run as oneDNN packed linears (before ``build``: whether they will)."""
        if self._model is None:
            return (not self.options.compile or self._eager) and (self.dtype_name == "int8" or will_pack(self.device, self.dtype))
        return self._packed

    def __repr__(self) -> str:
        return (f"Encoder(model={self.model_name!r}, weights={self.weights.source!r}, layer={self.layer!r}, "
                f"pool={self.pool!r}, device='{self.device}', dtype={self.dtype_name!r}, "
                f"output_shape={self.output_shape})")

    @property
    def layer(self) -> str:
        return self.encoding.layer

    @property
    def pool(self) -> str:
        return self.encoding.pool

    @property
    def save_dtype_name(self) -> str:
        return self.encoding.save_dtype

    @property
    def preprocess_config(self):
        """The ``PreprocessConfig`` images go through (the checkpoint's, with the overrides)."""
        return self.weights.preprocess

    @property
    def compiled(self) -> bool:
        """Whether the model runs through ``torch.compile`` (False again after a fallback to eager;
        before ``build``, whether it will)."""
        if self._model is None:
            return self.options.compile and not self._eager
        return self._compiled is not None

    @property
    def ragged(self) -> bool:
        """Whether each image's embedding has its own shape (NaFlex token outputs)."""
        return self.naflex and self.pool in ("none", "patch")

    def collate(self, images: list[np.ndarray]) -> np.ndarray | PatchBatch:
        """Decoded images -> one model batch: (B, S, S, 3) stacked, or for NaFlex a ``PatchBatch``
        padded to ``max_num_patches``."""
        if self.naflex:
            pre = self.weights.preprocess
            return collate_patches(images, pre.patch_size, pre.max_num_patches)
        return np.stack(images)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one image's embedding: (197, 768) for ViT-B/16 at 224 without pooling,
        (768,) for ``cls`` and ``mean``, (196, 768) for ``patch``, (512,) for CLIP B's ``head``."""
        cfg = self.weights.config
        if self.ragged:  # (T_i, D): at most max_num_patches tokens, each image its own
            return (self.weights.preprocess.max_num_patches, cfg.hidden_size)
        return {
            "none": (cfg.num_tokens, cfg.hidden_size),
            "patch": (cfg.num_patches, cfg.hidden_size),
        }.get(self.pool, (self.family.pooled_dim(cfg, self.pool),))

    def metadata(self) -> dict[str, str]:
        """String metadata saying exactly how the embeddings are made (``settings.encoder_metadata``)."""
        from .settings import encoder_metadata

        return encoder_metadata(self)

    def pixels(self, image: Any) -> np.ndarray:
        """One image -> the (S, S, 3) uint8 RGB pixels the model gets, decoded and resized as the CLI
        does: a path (str or PathLike), a PIL image (made upright and RGB as a file would be), or an
        (H, W, 3) uint8 RGB array.

        Raises:
            InputError: a file that cannot be decoded, or an object that is not an image.
        """
        from PIL import Image

        pre, decode = self.weights.preprocess, self.encoding.decode
        if isinstance(image, (str, os.PathLike)):
            return load_pixels(image, pre, decode)
        from .decode import check_size, to_rgb, upright

        if isinstance(image, Image.Image):
            check_size("<image>", image.width, image.height, decode.max_pixels)
            return resize(to_rgb(upright(image), decode.background), pre,
                          reducing_gap=FAST_REDUCING_GAP if decode.fast else None)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise InputError("<array>", "unsupported", f"array of shape {image.shape} and dtype {image.dtype}; "
                                 "expected (H, W, 3) uint8 RGB")
            check_size("<array>", image.shape[1], image.shape[0], decode.max_pixels)
            return resize(Image.fromarray(np.ascontiguousarray(image), "RGB"), pre)
        raise InputError(f"<{type(image).__name__}>", "unsupported",
                         "expected a path, a PIL image or an (H, W, 3) uint8 array")

    def preprocess(self, image: Any) -> torch.Tensor:
        """Exactly the model input for one image (see ``pixels``): a (3, S, S) float32 CPU tensor,
        rescaled to [0, 1] and normalised with the checkpoint's mean and std, as transformers'
        image processors return ``pixel_values[0]``.

        Raises:
            InputError: as ``pixels``.
        """
        pixels = self.pixels(image)
        if self.naflex:  # (h * w, P * P * 3): its patches, unpadded
            x, grids = normalize_patches(self.collate([pixels]), self.stats, torch.float32)
            return x[0, : int(grids[0].prod())].cpu()
        batch = torch.from_numpy(pixels[None]).to(self.device)
        return normalize(batch, self.stats, torch.float32)[0].cpu()

    def encode(self, images: Any, batch_size: int = 32, errors: str = "raise", workers: int | None = None):
        """Embeddings of images given in Python: paths, PIL images, (H, W, 3) uint8 arrays, or a mix.

        Decoding and resizing run in ``workers`` threads (default: the usable cores), batches
        in the model threads, as ``vitembed encode`` runs them; results are the same numbers.

        Args:
            images: one image, or a sequence of them (an (N, H, W, 3) array is N images).
            batch_size: images per model call.
            errors: ``raise``: the first bad image raises; ``skip``: bad images are left out.

        Returns:
            With ``errors="raise"``: a CPU tensor in ``save_dtype`` (float32 by default), (N, T, D),
            or (N, D) / (N, grid * grid, D) when pooled. With ``errors="skip"``: (that tensor for
            the good images, in order, [(index, InputError) for the bad ones]).

        Raises:
            InputError: naming which image (``image 3: ...``) and why, with ``errors="raise"``.
            UsageError: ``errors`` or ``batch_size`` out of range.
        """
        from .stages import batch_stage, decode_stage, model_stage

        if errors not in ("raise", "skip"):
            raise UsageError(f"errors={errors!r}: expected 'raise' or 'skip'")
        for value, name, optional in ((batch_size, "batch_size", False), (workers, "workers", True)):
            if not (optional and value is None) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{name} must be an integer of at least 1 (got {value!r})")
        items = list(enumerate(_as_list(images)))

        def load(item: tuple[int, Any]) -> np.ndarray:
            index, image = item
            try:
                return self.pixels(image)
            except InputError as e:  # name which one: a path names itself, an array does not
                raise InputError(f"image {index}" + ("" if e.path.startswith("<") else f" ({e.path})"), e.kind, e.reason) from None

        from .runtime import hold_torch_threads, release_torch_threads

        out, failures = [], []
        hold_torch_threads()
        model_threads, torch_threads = self.thread_layout()
        torch.set_num_threads(torch_threads)
        decoded = decode_stage(items, load, workers or usable_cores(), 2 * batch_size, name=lambda i: f"image {i[0]}")
        batches = model_stage(batch_stage(decoded, batch_size), self, model_threads, self.collate)
        try:
            for chunk, embeddings in batches:
                for (index, _), item in chunk:
                    if isinstance(item, InputError):
                        if errors == "raise":
                            raise item
                        failures.append((index, item))
                if embeddings is not None:
                    out.append(embeddings)
        finally:  # an error: stop the decode and model threads now, not when the traceback is collected
            batches.close()
            decoded.close()
            release_torch_threads()
        if self.naflex:  # lists of per-image rows: pooled ones stack, token outputs stay a list
            rows = [row for part in out for row in part]
            result = rows if self.ragged else (torch.stack(rows) if rows else
                                               torch.zeros((0, *self.output_shape), dtype=self.save_dtype))
        else:
            empty = torch.zeros((0, *self.output_shape), dtype=self.save_dtype)
            result = torch.cat(out) if out else empty
        return (result, failures) if errors == "skip" else result

    def thread_layout(self) -> tuple[int, int]:
        """(model threads, torch threads each) for batches of this encoder (``runtime.model_layout``)."""
        from .runtime import model_layout

        return model_layout(self.device, self.compiled)

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray | torch.Tensor | PatchBatch) -> torch.Tensor | "RaggedRows":
        """(B, S, S, 3) uint8 RGB -> (B, T, D) CPU tensor in ``save_dtype`` ((B, D) when pooled).
        A NaFlex ``PatchBatch`` -> ``RaggedRows``: each image's (T_i, D) tokens or (D,) vector."""
        if isinstance(pixels, PatchBatch):
            x, grids = normalize_patches(pixels, self.stats, self.dtype)  # (B, N, P * P * 3), (B, 2)
            tokens = self.model(x, layers=(self.layer,), grids=grids)[self.layer]  # (B, N, D)
            from .model import token_mask

            out = self.family.pool(self.model, tokens, self.pool, self.layer, mask=token_mask(grids, x.shape[1]))
            if self.encoding.normalize:
                out = torch.nn.functional.normalize(out.float(), dim=-1)
            return RaggedRows([row.to(self.save_dtype).cpu() for row in out], [tuple(g) for g in pixels.grids.tolist()])
        batch = torch.as_tensor(pixels)
        if self.device.type == "cuda":  # pinned (page-locked) memory lets the copy run asynchronously
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        x = normalize(batch, self.stats, self.dtype)  # (B, 3, S, S)
        out = self._forward(x)  # (B, T, D)
        out = self.family.pool(self.model, out, self.pool, self.layer)  # (B, T, D) or (B, D)
        if self.encoding.normalize:  # unit length, computed in float32
            out = torch.nn.functional.normalize(out.float(), dim=-1)
        return out.to(self.save_dtype).cpu()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, T, D) tokens of ``self.layer``."""
        rows = x.shape[0]
        if self._compiled is not None:
            self._compiled_rows = self._compiled_rows or rows
            if rows < self._compiled_rows:  # pad a short last batch (rows are independent): no recompile
                x = torch.cat([x, x.new_zeros((self._compiled_rows - rows, *x.shape[1:]))])
            try:
                return self._compiled(x, layers=(self.layer,))[self.layer][:rows]
            except Exception as e:  # compilers fail in many ways: eager always works
                cause: BaseException | None = e
                while cause is not None:  # Ctrl-C while compiling arrives wrapped: it stays Ctrl-C
                    if isinstance(cause, KeyboardInterrupt):
                        raise KeyboardInterrupt from e
                    cause = cause.__cause__ or cause.__context__
                first_line = (str(e).strip().splitlines() or [""])[0][:200]
                warnings.warn(
                    f"--compile: torch.compile failed ({type(e).__name__}: {first_line}); running eager",
                    VitembedWarning,
                    stacklevel=3,
                )
                self._compiled = None
                self._packed = self._pack(self.model)
        return self.model(x, layers=(self.layer,))[self.layer][:rows]


class RaggedRows(list):
    """The embeddings of a NaFlex batch, one CPU tensor per image ((T_i, D) tokens, or (D,) pooled),
    with ``grids``: each image's patch grid (h, w), which its output's metadata records."""

    def __init__(self, rows: Iterable[torch.Tensor], grids: Iterable[tuple[int, int]]):
        super().__init__(rows)
        self.grids = list(grids)

    @classmethod
    def join(cls, parts: list["RaggedRows"]) -> "RaggedRows":
        return cls([row for part in parts for row in part], [grid for part in parts for grid in part.grids])


def load_encoder(model: str = DEFAULT_MODEL, weights: Any = None, preprocess: dict | None = None, **options: Any) -> Encoder:
    """Deprecated: ``Encoder(model, weights, **options)`` (the preprocessing overrides are
    ``Encoder`` keywords now: ``resize``, ``interpolation``, ``crop_pct``, ``mean``, ``std``)."""
    warnings.warn("vitembed.load_encoder is deprecated; use vitembed.Encoder(model, weights, **options)",
                  DeprecationWarning, stacklevel=2)
    overrides = {k: v for k, v in (preprocess or {}).items() if v is not None}
    return Encoder(model, weights, **overrides, **options)


def _as_list(images: Any) -> list[Any]:
    """One image or many -> a list: a path, a PIL image or an array is one image, except that an
    (N, H, W, 3) array is N; a list, tuple or other ordered iterable is one image per item.

    Raises:
        UsageError: a set or a mapping (no order to return the embeddings in).
    """
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, (str, os.PathLike)) or hasattr(images, "getpixel"):  # a path, a PIL image
        return [images]
    if isinstance(images, (set, frozenset, Mapping)):
        raise UsageError(f"images: a {type(images).__name__} has no order; give a list")
    if isinstance(images, Iterable):
        return list(images)
    return [images]
