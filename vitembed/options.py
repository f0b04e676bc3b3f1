"""The options of vitembed, one frozen object per concern, each value checked once, here.

    ModelOptions     which model, which weights, its preprocessing, where and how it runs
    EncodingOptions  what each image becomes: layer, pooling, saved dtype, how files are decoded
    RunOptions       the batch job: output format and layout, batch size, workers, resume, shards

The CLI builds them from its flags, the Python API from keyword arguments (``split_fields``), and
the library takes them. Allowed values are listed once, here (and ``families.POOLS``); what needs
the model to check (a block number against its depth, a device that must exist) is checked when
the ``Encoder`` is built. Does not import torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from .catalog import CATALOG, DEFAULT_MODEL, get_model_spec
from .errors import UsageError
from .families import POOLS

DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")  # compute precision
SAVE_DTYPES = ("float32", "bfloat16", "float16")  # precision of the saved embeddings
FORMATS = ("safetensors", "npy")
ENGINES = ("local", "ray")  # engines/: threads here, or a Ray cluster

__all__ = ["DTYPES", "ENGINES", "FORMATS", "POOLS", "SAVE_DTYPES", "EncodingOptions", "ModelOptions", "RayOptions", "RunOptions",
           "split_fields"]


def _choice(value: Any, allowed: tuple[str, ...], option: str) -> None:
    if value not in allowed:
        raise UsageError(f"{option} {value!r}: expected one of {', '.join(allowed)}")


def _numbers(text: Any, option: str, kind: type, example: str) -> tuple | None:
    """``"a,b,c"`` or a sequence of three -> a tuple of three ``kind``; None stays None."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text) if isinstance(text, (tuple, list)) else []
    try:
        values = tuple(kind(v) for v in parts)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or (kind is int and any(isinstance(v, float) and not v.is_integer() for v in parts)):
        raise UsageError(f"{option} {text!r}: expected three numbers R,G,B, e.g. {example}")
    return values


def _flag(value: Any, option: str) -> None:
    if not isinstance(value, bool):
        raise UsageError(f"{option} must be True or False (got {value!r})")


def _count(value: Any, option: str, minimum: int = 1, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{option} must be an integer of at least {minimum} (got {value!r})")


@dataclass(frozen=True)
class ModelOptions:
    """Which model and how it runs.

    Attributes:
        model: a catalog name (``vitembed models``) or its Hub repository; a checkpoint folder or
            file path given here (with ``weights`` None) is taken as ``weights``.
        weights: ``"random"``, a checkpoint folder or file, or None to search
            (``weights.resolve_weights``: ``$VITEMBED_WEIGHTS``, ``weights/<model>/``, the Hub).
        seed: seed of random weights, 0 .. 2**63 - 1.
        image_size: input side in pixels (None: the checkpoint's); another size resamples the
            position embedding (``convert.resample_pos_embed``).
        resize, interpolation, crop_pct, mean, std: preprocessing overrides
            (``PreprocessConfig.override``, which checks them against ``config.RESIZE_MODES``,
            ``config.INTERPOLATIONS`` and its bounds); ``mean``/``std`` also as ``"R,G,B"`` text.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` (checked when the encoder is built).
        dtype: compute precision, one of ``DTYPES`` (``auto``: bfloat16 on CUDA that supports it,
            float32 elsewhere; ``int8``: the block linears in int8 on the CPU, ``int8.Int8Linear``).
        compile: run the model through ``torch.compile`` (eager, with a warning, if that fails).

    Raises:
        UsageError: a value outside its allowed set, naming the option.
    """

    model: str = DEFAULT_MODEL
    weights: Any = None
    seed: int = 0
    image_size: int | None = None
    resize: str | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, os.PathLike)):
            raise UsageError(f"--model must be a name or a path (got {self.model!r})")
        object.__setattr__(self, "model", os.fspath(self.model))
        if self.weights is None and self.model not in CATALOG and os.path.exists(self.model):
            object.__setattr__(self, "weights", self.model)  # Encoder("path/to/checkpoint")
            object.__setattr__(self, "model", DEFAULT_MODEL)
        get_model_spec(self.model)  # an unknown name: the message lists the known ones
        _count(self.seed, "--seed", minimum=0, optional=False)
        if self.seed > 2**63 - 1:
            raise UsageError(f"--seed {self.seed}: at most 2**63 - 1")
        _count(self.image_size, "--image-size")
        if self.crop_pct is not None and (isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float))
                                          or not math.isfinite(self.crop_pct)):
            raise UsageError(f"--crop-pct {self.crop_pct!r}: expected a number")
        object.__setattr__(self, "mean", _numbers(self.mean, "--mean", float, "0.485,0.456,0.406"))
        object.__setattr__(self, "std", _numbers(self.std, "--std", float, "0.485,0.456,0.406"))
        _choice(self.dtype, DTYPES, "--dtype")
        if not isinstance(self.device, str):
            raise UsageError(f"--device must be a name such as cpu or cuda:0 (got {self.device!r})")
        _flag(self.compile, "--compile")
        from .weights import ResolvedWeights

        if self.weights is not None and not isinstance(self.weights, (str, os.PathLike, ResolvedWeights)):
            raise UsageError(f"--weights must be 'random', a path or None (got {self.weights!r})")

    def preprocess_overrides(self) -> dict[str, Any]:
        """The preprocessing overrides, as ``PreprocessConfig.override`` takes them."""
        return dict(resize=self.resize, interpolation=self.interpolation, crop_pct=self.crop_pct,
                    mean=self.mean, std=self.std)


@dataclass(frozen=True)
class EncodingOptions:
    """What each image becomes.

    Attributes:
        layer: ``last``, ``embeddings`` or a block number ``"1"`` .. depth (``config.layer_index``;
            the number is checked against the model's depth when the encoder is built).
        pool: one of ``POOLS`` (``Family.pool``): none (all tokens), cls, mean (of the patch
            tokens), patch (the patch tokens only), head (the family's own pooled embedding:
            SigLIP's attention-pooling head, CLIP's projection; ``Family.check_pool`` says which
            a model allows).
        normalize: L2-normalise each pooled vector (``cls``, ``mean``, ``head``) to unit length, in
            float32 before ``save_dtype``, so vectors compare by dot product (as CLIP's and SigLIP's
            image-text logits do).
        save_dtype: dtype of the returned and saved embeddings, one of ``SAVE_DTYPES``.
        background: RGB (0..255 each, or ``"R,G,B"``) that transparent pixels are composited onto.
        allow_truncated: decode truncated files (the missing part grey) instead of refusing them.
        max_pixels: refuse images with more pixels than this (None: ``decode.DEFAULT_MAX_PIXELS``).
        fast_decode: reduced JPEG decoding and resizing (``decode.DecodeOptions.fast``): several
            times faster on large photos, not exact; recorded in the metadata.

    Raises:
        UsageError: a value outside its allowed set, naming the option.
    """

    layer: str = "last"
    pool: str = "none"
    normalize: bool = False
    save_dtype: str = "float32"
    background: tuple[int, int, int] = (255, 255, 255)
    allow_truncated: bool = False
    max_pixels: int | None = None
    fast_decode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.layer, int) and not isinstance(self.layer, bool):
            object.__setattr__(self, "layer", str(self.layer))  # layer=6 from Python
        if not isinstance(self.layer, str):
            raise UsageError(f"--layer must be last, embeddings or a block number (got {self.layer!r})")
        if self.layer.isdigit() and self.layer.isascii():
            object.__setattr__(self, "layer", str(int(self.layer)))  # "06" is block 6, recorded as "6"
        _flag(self.allow_truncated, "--allow-truncated")
        _flag(self.fast_decode, "--fast-decode")
        _choice(self.pool, POOLS, "--pool")
        _flag(self.normalize, "--normalize")
        if self.normalize and self.pool in ("none", "patch"):
            raise UsageError(f"--normalize: normalises pooled vectors; use it with --pool cls, mean or head "
                             f"(not --pool {self.pool})")
        _choice(self.save_dtype, SAVE_DTYPES, "--save-dtype")
        try:
            rgb = _numbers(self.background, "--background", int, "255,255,255")
        except UsageError:
            rgb = None
        if rgb is None or not all(0 <= v <= 255 for v in rgb):
            raise UsageError(f"--background {self.background!r}: expected R,G,B with values 0..255, e.g. 255,255,255")
        object.__setattr__(self, "background", rgb)
        _count(self.max_pixels, "--max-pixels")

    @property
    def decode(self):
        """These options as ``decode.DecodeOptions``."""
        from .decode import DecodeOptions

        return DecodeOptions(max_pixels=self.max_pixels, background=self.background, allow_truncated=self.allow_truncated,
                             fast=self.fast_decode)


@dataclass(frozen=True)
class RunOptions:
    """How a batch job runs (``vitembed encode``).

    Attributes:
        format: output file format, one of ``FORMATS`` (npy holds no metadata and no bfloat16).
        pack: write N embeddings per part file plus ``DIR/index.jsonl`` (``layouts/packed.py``)
            instead of one file per image (``layouts/files.py``); needs safetensors.
        batch_size: images per model call.
        workers: decode threads (None: the usable cores).
        overwrite: re-encode inputs whose outputs exist, also if made with other settings.
        fail_fast: stop at the first input that fails.
        shard: (K, N) or ``"K/N"``: only shard K (0-based) of N, by a stable hash of each output path.
        relative_to: key every input by its path relative to this folder (``inputs.plan_jobs``), so a
            folder walk, paths on stdin and a table give one file one output.
        engine: ``local`` (threads in this process, ``run.py``) or ``ray`` (Ray Data, ``engines/ray.py``).
        ray: the Ray engine's ``RayOptions`` (None: its defaults).

    Raises:
        UsageError: a value outside its allowed set, naming the option.
    """

    format: str = "safetensors"
    pack: int | None = None
    batch_size: int = 32
    workers: int | None = None
    overwrite: bool = False
    fail_fast: bool = False
    shard: tuple[int, int] | None = None
    relative_to: str | None = None
    engine: str = "local"
    ray: "RayOptions | None" = None

    def __post_init__(self) -> None:
        _choice(self.format, FORMATS, "--format")
        _choice(self.engine, ENGINES, "--engine")
        if self.relative_to is not None and not isinstance(self.relative_to, (str, os.PathLike)):
            raise UsageError(f"--relative-to must be a folder's path (got {self.relative_to!r})")
        if self.ray is not None and not isinstance(self.ray, RayOptions):
            raise UsageError(f"ray= takes a vitembed.RayOptions (got {type(self.ray).__name__})")
        _count(self.pack, "--pack")
        if self.pack is not None and self.format != "safetensors":
            raise UsageError("--pack writes safetensors part files; it cannot be used with --format npy")
        _count(self.batch_size, "--batch-size", optional=False)
        _count(self.workers, "--workers")
        _flag(self.overwrite, "--overwrite")
        _flag(self.fail_fast, "--fail-fast")
        if self.shard is not None:
            object.__setattr__(self, "shard", _shard(self.shard))


@dataclass(frozen=True)
class RayOptions:
    """How the Ray engine (``--engine ray``, ``engines/ray.py``) lays out its work.

    Attributes:
        address: the cluster (``--ray-address``; None: ``RAY_ADDRESS``, else a local Ray instance).
        actors: model actors (None: one per GPU in the cluster, or ``CPU_ACTORS`` CPU actors when it
            has none).
        decode_cpus: CPUs each decode + preprocess task reserves (fractions allowed).
        actor_cpus: CPUs each model actor reserves (None: 1 with a GPU, else the cluster's CPUs left
            after one decode task per actor, shared out among the actors).

    Raises:
        UsageError: a count below 1 or a CPU share that is not positive.
    """

    address: str | None = None
    actors: int | None = None
    decode_cpus: float = 1.0
    actor_cpus: float | None = None

    def __post_init__(self) -> None:
        _count(self.actors, "--actors")
        for value, option in ((self.decode_cpus, "--decode-cpus"), (self.actor_cpus, "--actor-cpus")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                                      or not math.isfinite(value)):
                raise UsageError(f"{option} must be a positive number of CPUs (got {value!r})")


def _shard(value: Any) -> tuple[int, int]:
    """``"K/N"`` or (K, N) -> (K, N) with 0 <= K < N."""
    text = value if isinstance(value, str) else "/".join(map(str, value)) if isinstance(value, (tuple, list)) else repr(value)
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected K/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= k < n):
        raise UsageError(f"--shard {text!r}: expected K/N with 0 <= K < N")
    return k, n


def split_fields(fields: dict[str, Any], *kinds: type) -> list[Any]:
    """Keyword arguments -> one options object of each of ``kinds`` (each takes its own fields).

    Raises:
        UsageError: a keyword that none of ``kinds`` has, naming it.
    """
    names = [{f.name for f in dataclasses.fields(kind)} for kind in kinds]
    unknown = sorted(set(fields) - set().union(*names))
    if unknown:
        known = ", ".join(sorted(set().union(*names)))
        raise UsageError(f"unknown option(s) {', '.join(unknown)}; expected some of: {known}")
    return [kind(**{k: v for k, v in fields.items() if k in own}) for kind, own in zip(kinds, names)]
