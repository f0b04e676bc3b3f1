"""Where the weights come from, and building the model from them.

Resolution order when ``--weights`` is not given: ``$VITEMBED_WEIGHTS`` (empty
means unset), then ``weights/<model name>/`` under the current directory, then
the Hugging Face cache and a download through huggingface_hub (which honours
``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_HUB_CACHE``). ``--weights random`` is
the only way to get random weights.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .families import ModelSpec
from .config import ViTConfig
from .preprocess_config import PreprocessConfig
from .errors import CheckpointError, UsageError, WeightsNotFoundError
from .checkpoint_files import (CHECKPOINT_SUFFIXES, checkpoint_sha256, is_shard_index, read_checkpoint_json,
                               read_state_dict, sha256_file, shard_names)
from .hub import SHARD_INDEXES, WEIGHT_FILES

RANDOM = "random"
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


def _from_path(path: Path, spec: ModelSpec, how: str) -> ResolvedWeights:
    """A transformers checkpoint directory, or a single weights file (architecture from ``spec``)."""
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise WeightsNotFoundError(f"{how}: {path} has no config.json (expected a transformers checkpoint directory)")
        file = next((path / n for n in WEIGHT_FILES + SHARD_INDEXES if (path / n).is_file()), None)
        if file is None:
            raise WeightsNotFoundError(f"{how}: {path} has none of {', '.join(WEIGHT_FILES + SHARD_INDEXES)}")
        config = ViTConfig.from_transformers(read_checkpoint_json(config_file), str(config_file))
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
        preprocess = PreprocessConfig.from_transformers(read_checkpoint_json(pre_file), str(pre_file))
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
            config = ViTConfig.from_transformers(read_checkpoint_json(first_file), str(first_file))
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
