"""What a model family is: the unit that each of ``families/<name>.py`` fills in.

A family owns everything that is particular to it, as data where it can be:

- its catalog entries (``ModelSpec``: a name, a Hub repository, an architecture, and the
  preprocessing of its reference);
- how a transformers ``config.json`` of its ``model_type`` maps onto ``ViTConfig``
  (``config_fields``);
- its checkpoints' key layouts: wrapper prefixes, tell-tale keys, rename tables and the keys
  it does not use (``CheckpointLayout``), which ``convert`` applies without knowing whose they are;
- its token semantics: which tokens precede the patches, and what ``cls``, ``mean``,
  ``patch`` and ``head`` pooling take (``check_pool``, ``pool``, ``head_of``).

The rest of vitembed asks the family (``families.family_of``) and never tests a family's name.
Does not import torch at import time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import ViTConfig
from ..preprocess_config import PreprocessConfig
from ..errors import UsageError

POOLS = ("none", "cls", "mean", "patch", "head")


@dataclass(frozen=True)
class ModelSpec:
    """One catalog entry (``vitembed models`` lists them).

    Attributes:
        name: vitembed's name for it (``--model``).
        repo: Hugging Face repository the weights come from.
        variant: big_vision-style architecture name (``"B/16"``).
        image_size: input side in pixels.
        layer_norm_eps: LayerNorm epsilon of the reference implementation.
        preprocess: the reference preprocessing.
        description: one line for ``vitembed models``.
        family: the family module that lists it (``vit``, ``deit``, ``dino``, ``dinov2``, ``clip``).
        arch: ``ViTConfig`` fields that differ from the plain ViT (the family's and the entry's own).
        source: ``transformers`` (the repository has a transformers config.json) or
            ``timm`` (only its weights are read; the architecture is this entry's).
    """

    name: str
    repo: str
    variant: str
    image_size: int = 224
    layer_norm_eps: float = 1e-12
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    description: str = ""
    family: str = "vit"
    arch: tuple[tuple[str, object], ...] = ()
    source: str = "transformers"

    def config(self) -> ViTConfig:
        """The architecture of this entry (``ViTConfig.from_variant``)."""
        return ViTConfig.from_variant(
            self.variant, image_size=self.image_size, layer_norm_eps=self.layer_norm_eps, **dict(self.arch)
        )


@dataclass(frozen=True)
class CheckpointLayout:
    """Key names of one checkpoint layout, as a family's checkpoints use them (timm's
    ``checkpoint_filter_fn`` tables, kept as data).

    Attributes:
        name: the layout (``transformers``, ``transformers-v5``, ``transformers-clip``, ``timm``);
            several families may add renames to one layout (DeiT's distillation token to ``transformers``).
        telltale: regex of a key that only this layout has ('' when another family gives it).
        renames: (regex, replacement) pairs to vitembed's (timm's) names; the first full match wins.
        unused: regexes of keys vitembed drops (heads, pooler, mask token).
        fallback: its tell-tale key is checked after every other layout's (timm's names, which
            other layouts, such as the original DINOv3's, share).
    """

    name: str
    telltale: str = ""
    renames: tuple[tuple[str, str], ...] = ()
    unused: tuple[str, ...] = ()
    fallback: bool = False


@dataclass(frozen=True)
class Family:
    """A model family: its catalog entries, config mapping, checkpoint layouts and token semantics.

    Attributes:
        name: the family's name (``ViTConfig.family`` of its transformers configs).
        model_types: transformers ``model_type`` values of its config.json files.
        models: its catalog entries.
        preprocess: the reference preprocessing of a checkpoint folder of this family that has no
            ``preprocessor_config.json`` (None: the ``--model`` entry's).
        preprocess_at_config_size: whether that preprocessing follows the config's ``image_size``
            (False for DINOv2: configs say 518, the reference evaluates at 224 and the position
            embedding is resampled).
        prefixes: wrapper prefixes of its checkpoints' keys (``vit.``, ``deit.``, ...).
        layouts: its checkpoint key layouts.
        head: what ``--pool head`` gives, in words ('' when the family has no pooled embedding of
            its own: ViT and DeiT, whose transformers pooler is a classifier's pre-logits layer).
        reference_pooled: (pool mode, reference output) pairs: which pooled vector of ``last``
            equals which output of the family's transformers model, for ``vitembed verify``:
            ``pooler_output`` (the vision model's), ``image_features`` (``get_image_features``
            of the whole model: CLIP's projection) or ``cls_of_last`` (``last_hidden_state[:, 0]``).
    """

    name: str
    model_types: tuple[str, ...] = ()
    models: tuple[ModelSpec, ...] = ()
    preprocess: PreprocessConfig | None = None
    preprocess_at_config_size: bool = True
    prefixes: tuple[str, ...] = ()
    layouts: tuple[CheckpointLayout, ...] = ()
    head: str = ""
    reference_pooled: tuple[tuple[str, str], ...] = (("cls", "cls_of_last"),)

    def config_fields(self, hf: Mapping[str, Any], source: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
        """This family's part of reading a transformers config.json.

        Returns:
            (the config as the generic reader takes it, ``ViTConfig`` fields it sets itself).

        Raises:
            CheckpointError: settings of the family that vitembed does not implement.
        """
        return hf, {"family": self.name}

    def check_pool(self, cfg: ViTConfig, how: str, layer: str = "last") -> None:
        """Refuse, before any image is read, a pooling this model cannot give.

        Raises:
            UsageError: an unknown ``how``; ``cls`` on a model without a class token; ``head``
                on a family without a pooled embedding of its own (``head`` is empty), or of a
                layer other than ``last``.
        """
        if how not in POOLS:
            raise UsageError(f"--pool {how!r}: expected one of {', '.join(POOLS)}")
        if how == "cls" and not cfg.class_token:
            raise UsageError(
                f"--pool cls: {self.name} has no class token; use --pool head ({self.head or 'its pooled embedding'}) "
                "or --pool mean (the mean of the patch tokens)"
            )
        if how == "head" and not self.head:
            raise UsageError(
                f"--pool head: {self.name} has no pooled embedding of its own; use --pool cls (the class token) "
                "or --pool mean (the mean of the patch tokens)"
            )
        if how == "head" and layer != "last":
            raise UsageError(f"--pool head pools the last layer ({self.head}); it cannot pool --layer {layer}")

    def pooled_dim(self, cfg: ViTConfig, how: str) -> int:
        """Width of a pooled vector (``cls``, ``mean``, ``head``): the token width D."""
        return cfg.hidden_size

    def pool(self, model: Any, tokens: Any, how: str, layer: str = "last", mask: Any = None) -> Any:
        """Reduce token encodings (B, T, D) of ``layer``; T = prefix tokens + patches.

        ``none``: unchanged. ``cls``: the class token, (B, D). ``mean``: the mean of the
        patch tokens, (B, D) (timm's ``global_pool='avg'``, prefix tokens excluded).
        ``patch``: the patch tokens only, (B, grid * grid, D). ``head``: the family's own
        pooled embedding of ``last`` (``head_of``). ``check_pool`` says which are allowed.

        With ``mask`` (B, T) bool (NaFlex batches: False for padding), ``none`` and ``patch``
        give a list of B (T_i, D) tensors, each image's real tokens, and ``mean`` and ``head``
        leave the padding out.

        Raises:
            UsageError: an unknown ``how``.
        """
        prefix = model.cfg.num_prefix_tokens
        if how in ("none", "patch") and mask is not None:
            counts = mask.sum(dim=1).tolist()
            return [row[prefix if how == "patch" else 0: n] for row, n in zip(tokens, counts)]
        if how == "none":
            return tokens
        if how == "cls":
            return tokens[:, 0]
        if how == "mean" and mask is not None:
            real = mask[:, prefix:, None].to(tokens.dtype)  # (B, N, 1)
            return (tokens[:, prefix:] * real).sum(dim=1) / real.sum(dim=1)
        if how == "mean":
            return tokens[:, prefix:].mean(dim=1)
        if how == "patch":
            return tokens[:, prefix:]
        if how == "head":
            return self.head_of(model, tokens, mask)
        raise UsageError(f"pool {how!r}: expected one of {', '.join(POOLS)}")

    def head_of(self, model: Any, tokens: Any, mask: Any = None) -> Any:
        """The family's own pooled embedding (B, P) of the ``last`` tokens (B, T, D).

        Raises:
            UsageError: the family has none (``check_pool`` refuses it first).
        """
        raise UsageError(f"--pool head: {self.name} has no pooled embedding of its own")
