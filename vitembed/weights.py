"""Where the weights come from, and building the model from them.

Resolution order when ``--weights`` is not given: ``$VITEMBED_WEIGHTS`` (empty
means unset), then ``weights/<model name>/`` under the current directory, then
the Hugging Face cache and a download through huggingface_hub (which honours
``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_HUB_CACHE``). ``--weights random`` is
the only way to get random weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .families import ModelSpec
from .config import ViTConfig
from .preprocess_config import PreprocessConfig
from .errors import CheckpointError, UsageError, WeightsNotFoundError, shown
from .hub import SHARD_INDEXES, WEIGHT_FILES

RANDOM = "random"
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
ENV_VAR = "VITEMBED_WEIGHTS"


@dataclass(frozen=True)
class ResolvedWeights:
    """What the model is built from.

    Attributes:
        source: where the weights came from, for humans and metadata
            (``random``, a path, or ``hf://<repo>``).
        config: the architecture.
        preprocess: the checkpoint's reference preprocessing.
        file: the weights file, or a sharded checkpoint's ``*.index.json`` (None for random weights).
        sha256: ``checkpoint_sha256(file)`` ("" for random weights).
        random: True only for ``--weights random``.
        seed: the seed of random weights (None otherwise).
        trained_image_size: the input size of the checkpoint's own config; when it
            differs from ``config.image_size`` the position embedding is resampled.
    """

    source: str
    config: ViTConfig
    preprocess: PreprocessConfig
    file: Path | None = None
    sha256: str = ""
    random: bool = False
    seed: int | None = None
    trained_image_size: int | None = None
    overrides: tuple[str, ...] = ()

    def with_overrides(self, **overrides: Any) -> "ResolvedWeights":
        """These weights with preprocessing overrides (``PreprocessConfig.override`` arguments; None = keep),
        the overridden names kept in ``overrides`` for the metadata."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if not given:
            return self
        return dataclasses.replace(
            self, preprocess=self.preprocess.override(**given), overrides=self.overrides + tuple(sorted(given))
        )

    def at_image_size(self, image_size: int | None) -> "ResolvedWeights":
        """The same weights for inputs of ``image_size`` pixels (None: unchanged).

        Raises:
            UsageError: a size that is not a positive multiple of the patch size.
        """
        if image_size is None or image_size == self.config.image_size:
            return self
        if self.config.naflex:
            raise UsageError(f"--image-size {image_size}: a NaFlex model sizes each image itself, to at most "
                             f"{self.preprocess.max_num_patches} patches (its preprocessor_config.json's max_num_patches)")
        if image_size < 1 or image_size % self.config.patch_size:
            raise UsageError(
                f"--image-size {image_size}: must be a positive multiple of the patch size {self.config.patch_size}"
            )
        trained = None if self.random else self.trained_image_size or self.config.image_size
        return dataclasses.replace(
            self,
            config=self.config.replace(image_size=image_size),
            preprocess=self.preprocess.at_image_size(image_size),
            trained_image_size=None if trained == image_size else trained,  # back at its own size: no resampling
        )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes.

    Raises:
        CheckpointError: the file cannot be read.
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except OSError as e:  # no permission, a read error
        raise CheckpointError(f"{shown(path)}: cannot read: {e.strerror or e}") from None
    return h.hexdigest()


def is_shard_index(file: Path) -> bool:
    """Whether ``file`` is a sharded checkpoint's index (``model.safetensors.index.json``...)."""
    return file.name.endswith(".index.json")


def shard_names(index: Path) -> list[str]:
    """The shard file names a sharded checkpoint's index names (``weight_map`` values), each
    once, sorted; ``shard_files`` checks them on disk.

    Raises:
        CheckpointError: the index is not JSON with a ``weight_map`` of file names, or a name has
            a folder in it or is not a weights file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``).
    """
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{shown(index)}: not a sharded checkpoint index (no weight_map of file names)")
    names = sorted(set(weight_map.values()))
    for name in names:
        if Path(name).name != name or Path(name).suffix not in CHECKPOINT_SUFFIXES:
            raise CheckpointError(f"{shown(index)}: shard {name!r} is not the name of a weights file beside the index")
    return names


def shard_files(index: Path) -> list[Path]:
    """The shard files that a sharded checkpoint's index names (its ``weight_map`` values, the
    transformers format), beside the index, each once, sorted.

    Raises:
        CheckpointError: the index is not JSON with a ``weight_map`` of file names, a name has a
            folder in it, or a shard is not there.
    """
    files = []
    for name in shard_names(index):
        if not (index.parent / name).is_file():
            raise CheckpointError(f"{shown(index)}: shard {name} is missing (expected {shown(index.parent / name)})")
        files.append(index.parent / name)
    return files


def checkpoint_sha256(file: Path) -> str:
    """Hex sha256 identifying a checkpoint: of the file's bytes; for a shard index, of the index's
    bytes followed by each shard's hex digest (``shard_files`` order).

    Raises:
        CheckpointError: an unreadable file, or an index ``shard_files`` refuses.
    """
    if not is_shard_index(file):
        return sha256_file(file)
    h = hashlib.sha256()
    try:
        h.update(file.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{shown(file)}: cannot read: {e.strerror or e}") from None
    for shard in shard_files(file):
        h.update(sha256_file(shard).encode())
    return h.hexdigest()


def _from_path(path: Path, spec: ModelSpec, how: str) -> ResolvedWeights:
    """A transformers checkpoint directory, or a single weights file (architecture from ``spec``)."""
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise WeightsNotFoundError(f"{how}: {path} has no config.json (expected a transformers checkpoint directory)")
        file = next((path / n for n in WEIGHT_FILES + SHARD_INDEXES if (path / n).is_file()), None)
        if file is None:
            raise WeightsNotFoundError(f"{how}: {path} has none of {', '.join(WEIGHT_FILES + SHARD_INDEXES)}")
        config = ViTConfig.from_transformers(_read_json(config_file), str(config_file))
        return _for_checkpoint(str(path), config, path / "preprocessor_config.json", spec, file)
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise WeightsNotFoundError(
                f"{how}: {path} is not a checkpoint file (expected a folder with config.json, "
                f"or a file ending in {', '.join(CHECKPOINT_SUFFIXES)})"
            )
        return ResolvedWeights(str(path), spec.config(), spec.preprocess, path, sha256_file(path))
    if path.exists():
        raise WeightsNotFoundError(f"{how}: {path} is neither a folder nor a regular file")
    raise WeightsNotFoundError(f"{how}: {path} does not exist")


def _for_checkpoint(
    source: str, config: ViTConfig, pre_file: Path | None, spec: ModelSpec, file: Path
) -> ResolvedWeights:
    """Weights of a checkpoint with its own config, and the preprocessing that goes with it.

    The preprocessing comes from the checkpoint's ``preprocessor_config.json``;
    else from ``spec`` when it is of the checkpoint's family; else from the
    family's default (``Family.preprocess``). If it feeds another input size than the config's (DINOv2
    checkpoints are made at 518 and evaluated at 224), the position embedding
    is resampled.

    Raises:
        CheckpointError: a preprocessing size the architecture cannot take.
    """
    from .families import family_of

    family = family_of(config)
    if pre_file is not None and pre_file.is_file():
        preprocess = PreprocessConfig.from_transformers(_read_json(pre_file), str(pre_file))
    else:
        own = spec.family == config.family or family.preprocess is None
        preprocess = spec.preprocess if own else family.preprocess
        if family.preprocess_at_config_size:
            preprocess = preprocess.at_image_size(config.image_size)
    weights = ResolvedWeights(source, config, preprocess, file, checkpoint_sha256(file))
    if config.naflex:  # each image gets its own grid, the learned one resized to it: nothing to resample
        return weights
    try:
        return weights.at_image_size(preprocess.image_size)
    except UsageError as e:
        raise CheckpointError(f"{pre_file or source}: {e}") from None


def _read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file, strictly (``files.read_json``).

    Raises:
        CheckpointError: naming the file: unreadable, not a regular file, or not strict JSON.
    """
    from .files import read_json

    try:
        return read_json(path)
    except OSError as e:
        raise CheckpointError(f"{shown(path)}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise CheckpointError(f"{shown(path)}: not valid JSON: {e}") from None


def _from_hub(spec: ModelSpec, progress: bool) -> tuple[ResolvedWeights | None, str]:
    """Weights from the Hugging Face cache, downloading them if allowed. Returns (weights, why not)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import disable_progress_bars

    from .hub import hub_unreachable

    if not progress:
        disable_progress_bars()
    reasons = []
    # transformers repositories: config.json, then the weights; timm repositories: the weights only,
    # the architecture from the catalog.
    first = "model.safetensors" if spec.source == "timm" else "config.json"
    for local_only in (True, False):
        if not local_only and constants.HF_HUB_OFFLINE:
            reasons.append("download not tried: HF_HUB_OFFLINE is set")
            break
        if not local_only and (unreachable := hub_unreachable(constants.ENDPOINT)):
            reasons.append(f"download not tried: {unreachable}")  # not 25 s of retries
            break
        try:
            first_file = Path(hf_hub_download(spec.repo, first, local_files_only=local_only))
        except Exception as e:  # huggingface_hub raises many kinds: offline, not cached, HTTP
            if local_only:
                reasons.append(f"not in the cache ({constants.HF_HUB_CACHE})")
            else:
                reasons.append(f"download failed: {type(e).__name__}: {str(e).splitlines()[0]}")
            continue
        if spec.source == "timm":
            source = f"hf://{spec.repo}"
            return ResolvedWeights(source, spec.config(), spec.preprocess, first_file, sha256_file(first_file)), ""
        for name in WEIGHT_FILES + SHARD_INDEXES:
            try:
                file = Path(hf_hub_download(spec.repo, name, local_files_only=local_only))
                if is_shard_index(file):  # the shards land beside the index in the same snapshot
                    for shard in shard_names(file):
                        hf_hub_download(spec.repo, shard, local_files_only=local_only)
            except CheckpointError:
                raise
            except Exception as e:
                reasons.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0]}")
                continue
            config = ViTConfig.from_transformers(_read_json(first_file), str(first_file))
            return _for_checkpoint(f"hf://{spec.repo}", config, None, spec, file), ""
    return None, "; ".join(reasons)


def resolve_weights(
    spec: ModelSpec,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    cwd: str | os.PathLike | None = None,
    environ: dict[str, str] | None = None,
    progress: bool = True,
) -> ResolvedWeights:
    """Find the weights for ``spec``.

    Args:
        spec: the catalog entry (architecture and preprocessing defaults).
        weights: ``"random"``, a checkpoint directory or file, or None to search.
        seed: seed of random weights.
        cwd: directory whose ``weights/<name>/`` is searched (default: current).
        environ: environment to read ``VITEMBED_WEIGHTS`` from (default: os.environ).
        progress: show huggingface_hub's download progress bars (on stderr).

    Raises:
        WeightsNotFoundError: nothing found; the message says every place looked
            at and how to provide weights.
        CheckpointError: a config that is not a supported ViT.
    """
    environ = os.environ if environ is None else environ
    if weights is not None and os.fspath(weights) == RANDOM:
        return ResolvedWeights(RANDOM, spec.config(), spec.preprocess, random=True, seed=seed)
    if weights is not None:
        if not os.fspath(weights):
            raise WeightsNotFoundError("--weights: empty path")
        return _from_path(Path(weights).expanduser(), spec, "--weights")
    looked = ["--weights: not given"]
    env_value = environ.get(ENV_VAR, "")
    if env_value:
        return _from_path(Path(env_value).expanduser(), spec, f"${ENV_VAR}")
    looked.append(f"${ENV_VAR}: not set")
    local = Path(cwd or os.getcwd()) / "weights" / spec.name
    if local.exists():
        return _from_path(local, spec, str(local))
    looked.append(f"{local}: does not exist")
    resolved, why = _from_hub(spec, progress)
    if resolved is not None:
        return resolved
    looked.append(f"Hugging Face cache and Hub ({spec.repo}): {why}")
    raise WeightsNotFoundError(
        f"no weights found for model {spec.name!r}. Looked at:\n"
        + "".join(f"  - {line}\n" for line in looked)
        + "Provide them in one of these ways:\n"
        f"  - vitembed encode ... --weights DIR   (a transformers checkpoint: config.json + model.safetensors)\n"
        f"  - vitembed encode ... --weights FILE.safetensors   (architecture from --model)\n"
        f"  - export {ENV_VAR}=DIR\n"
        f"  - put config.json and model.safetensors in {local}/\n"
        f"  - on a machine with network access: hf download {spec.repo} (into the Hugging Face cache,\n"
        f"    which later runs read first), or copy its files to a folder and pass --weights DIR\n"
        f"  - without network, set HF_HUB_OFFLINE=1 so that only the cache is read, at once\n"
        f"  - vitembed encode ... --weights random   (random weights: meaningless embeddings, for testing)"
    )


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _read_unmapped(file: Path, layout: dict[str, tuple[str, list[int]]]) -> dict[str, Any]:
    """The tensors of a safetensors file (already checked by safetensors' ``safe_open``), each read
    into a CPU tensor of its own (``readinto``, no mapping, one tensor's memory at a time).
    ``layout``: key -> (safetensors dtype name, shape), as ``safe_open`` reports them. The
    offsets come from the file's JSON header (the format: an 8-byte little-endian header length,
    the header, then the data)."""
    import json
    import struct

    import torch

    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        tensors = {}
        for key, (dtype, shape) in layout.items():
            begin, end = header[key]["data_offsets"]
            tensor = torch.empty(shape, dtype=getattr(torch, _SAFETENSORS_DTYPES[dtype]))
            f.seek(8 + length + begin)
            if end > begin and f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise ValueError(f"{key}: the file ends inside its data")
            tensors[key] = tensor
    return tensors


def read_state_dict(file: Path) -> dict[str, Any]:
    """Tensors of a ``.safetensors`` file, of a torch pickle read with ``weights_only=True``, or of
all the shards a sharded checkpoint's index names (``shard_files``).

    A safetensors file is read tensor by tensor into memory of each tensor's own (``_read_unmapped``),
    not memory-mapped: a mapping stays resident as long as any tensor of the file lives, so a model
    whose linears are packed into oneDNN's layout would hold the checkpoint twice.

    Wrapper dicts (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.

    Raises:
        CheckpointError: unreadable or cut file, one that needs code to unpickle, an index whose
            shards are missing (``shard_files``), a key in two shards or listed but in none.
    """
    import pickle

    import torch

    if is_shard_index(file):  # every shard read as below, one after the other, into one dict
        state_dict: dict[str, Any] = {}
        for shard in shard_files(file):
            part = read_state_dict(shard)
            if twice := next((k for k in part if k in state_dict), None):
                raise CheckpointError(f"{shown(file)}: key {twice!r} is in more than one shard")
            state_dict.update(part)
        listed = _read_json(file)["weight_map"]  # shard_files checked its form
        if missing := next((k for k in listed if k not in state_dict), None):
            raise CheckpointError(f"{shown(file)}: key {missing!r} is listed for {listed[missing]} but in no shard")
        return state_dict
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:  # safetensors checks the header and offsets
                layout = {key: (f.get_slice(key).get_dtype(), f.get_slice(key).get_shape()) for key in f.keys()}
            return _read_unmapped(file, layout)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read checkpoint: not a valid safetensors file ({e})") from None
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what weights_only=True raises for anything but tensors and containers
        raise CheckpointError(
            f"{file}: cannot read checkpoint: not a torch file of plain tensors "
            "(vitembed reads pickles with weights_only=True and never runs code from them)"
        ) from None
    except Exception as e:  # a cut or damaged file: torch's zip reader, EOF
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{file}: cannot read checkpoint: not a complete torch file ({first})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise CheckpointError(f"{file}: not a state dict of tensors")
    return obj


def available_memory() -> int | None:
    """Bytes of memory this process can still get: ``MemAvailable`` of ``/proc/meminfo``
    (Linux), else the physical memory (``os.sysconf``); None when neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_memory(cfg: ViTConfig, source: str, copies: float = 1) -> int:
    """Refuse a model whose float32 parameters would not fit in the memory at hand.

    Args:
        cfg: the architecture.
        source: what it came from (a config.json, a model name), for the message.
        copies: copies of the parameters held at once while loading (1.3 for a checkpoint: its
            tensors become the model's, plus what conversion and packing hold for a while).

    Returns:
        The number of parameters (``VisionTransformer.num_parameters``).

    Raises:
        CheckpointError: the parameters need more than the available memory;
            the message says how many and how large.
    """
    from .model import num_parameters

    count = num_parameters(cfg)
    need = int(count * 4 * copies)
    have = available_memory()
    if have is not None and need > have:
        raise CheckpointError(
            f"{source}: the model has {count:,} parameters ({count * 4 / 2**30:.1f} GiB in float32"
            f"{f', {need / 2**30:.1f} GiB while loading' if copies > 1 else ''}); only {have / 2**30:.1f} GiB "
            "of memory is available"
        )
    return count


def build_model(weights: ResolvedWeights):
    """The ``VisionTransformer`` for ``weights``: float32, CPU, eval mode.

    Random weights use the standard initialisation from ``weights.seed``;
    otherwise the checkpoint is converted (``convert.convert_state_dict``), its
    position embedding resampled if the input size changed
    (``convert.resample_pos_embed``), checked key by key and shape by shape
    against the architecture built on the ``meta`` device (no memory), and only
    then are the checkpoint's tensors assigned to it (float32, no copy of a float32 checkpoint). Before
    anything is allocated, a model too large for the available memory is refused.

    Raises:
        CheckpointError: keys or shapes that do not fit (first mismatching key
            named), or a model larger than the available memory.
    """
    import torch

    from .convert import check_converted, convert_state_dict, embed_class_positions, resample_pos_embed
    from .model import VisionTransformer

    cfg = weights.config
    source = str(weights.file) if weights.file is not None else weights.source
    if weights.random:
        check_fits_memory(cfg, f"model {weights.source} ({cfg.family})")
        return VisionTransformer(cfg).init_weights(seed=weights.seed or 0).eval()
    assert weights.file is not None
    config_file = weights.file.parent / "config.json"  # where the sizes came from, when there is one
    check_fits_memory(cfg, str(config_file) if config_file.is_file() else source, copies=1.3)
    state_dict = convert_state_dict(read_state_dict(weights.file), str(weights.file))
    state_dict = embed_class_positions(state_dict, cfg.num_embedded_prefix_tokens)
    if weights.trained_image_size and "pos_embed" in state_dict:
        grid = (cfg.grid_size, cfg.grid_size)
        state_dict["pos_embed"] = resample_pos_embed(
            state_dict["pos_embed"], grid, cfg.num_embedded_prefix_tokens, antialias=cfg.pos_embed_antialias
        )
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    check_converted(model, state_dict, str(weights.file))  # before the model takes any memory
    for key, value in state_dict.items():  # one tensor at a time: the other dtype's copy goes as it is cast
        if value.is_floating_point() and value.dtype != torch.float32:
            state_dict[key] = value.float()
    # The checkpoint's own tensors become the parameters (no second copy of the model), so
    # the loading peak is about the model's size (bench/bench.py measures it).
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()
