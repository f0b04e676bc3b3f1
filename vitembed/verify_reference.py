"""The references ``vitembed verify`` compares with: transformers for a checkpoint folder (its image
processor, or the torch operations of a torchvision-only one, and its model), timm for a single
timm-layout weights file. Each answers the questions of ``Reference``. Imports torch, transformers
and timm only when a reference is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CheckpointError, VitembedError

INSTALL_HINT = "pip install 'vitembed[verify]'"


class ReferenceUnavailableError(VitembedError):
    """The reference implementation cannot be run here: transformers (or timm, for a single
    timm-layout file) is not installed, or the weights are of a kind no reference reads. Exit 2."""


def reference_for(resolved: Any, spec: Any) -> "Reference":
    """The reference implementation of these weights.

    Raises:
        ReferenceUnavailableError: its library is missing, or no reference reads these weights.
    """
    file = resolved.file
    folder = None
    if Path(resolved.source).is_dir():
        folder = Path(resolved.source)
    elif resolved.source.startswith("hf://") and spec.source != "timm" and (file.parent / "config.json").is_file():
        folder = file.parent  # the Hub snapshot folder
    if folder is not None:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ReferenceUnavailableError(
                f"the reference of a checkpoint folder is transformers, which is not installed: {INSTALL_HINT}") from None
        return TransformersReference(folder)
    layout = layout_of(file)
    if layout != "timm":
        raise ReferenceUnavailableError(
            f"{resolved.source}: a single weights file in the {layout} layout has no config.json for the transformers "
            "reference; give the checkpoint folder (config.json + weights), or a timm-layout file")
    try:
        import timm  # noqa: F401
    except ImportError:
        raise ReferenceUnavailableError(
            f"{resolved.source}: the reference of a timm-layout weights file is timm, which is not installed: "
            f"{INSTALL_HINT}") from None
    if not spec.repo.startswith("timm/"):
        raise ReferenceUnavailableError(
            f"--model {spec.name} names no timm architecture; give --model the timm entry these weights are of "
            "(vitembed models: the vit_*.augreg_in21k names)")
    return TimmReference(spec.repo.split("/", 1)[1], file)


def layout_of(file: Path) -> str:
    """The key layout of a weights file (``convert.detect_format``), reading only its key names
    when it is a safetensors file."""
    from .convert import detect_format, strip_prefixes

    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                keys = dict.fromkeys(f.keys())
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read: {e}") from None
    else:
        from .checkpoint_files import read_state_dict

        keys = read_state_dict(file)
    return detect_format(strip_prefixes(keys), str(file))


class Reference:
    """What verify asks of a reference (transformers or timm)."""

    description = ""
    has_processor = True
    no_processor_reason = ""

    def pixels(self, image: Any) -> Any:
        """An RGB PIL image -> the reference's (3, S, S) float32 input."""
        raise NotImplementedError

    def run(self, pixels: Any) -> dict[str, Any]:
        """(N, 3, S, S) -> {"hidden_states": [(N, T, D)...], "last_hidden_state": (N, T, D), ...}."""
        raise NotImplementedError

    def pooled(self, outputs: dict[str, Any], pixels: Any, name: str) -> tuple[Any, str]:
        """(the reference's pooled output ``name`` (N, P), '') or (None, why it has none)."""
        raise NotImplementedError


class TransformersReference(Reference):
    def __init__(self, folder: Path):
        import torch
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.folder = folder
        self.processor, self._torch_ops, self.no_processor_reason = processor_of(folder)
        self.has_processor = self.processor is not None or self._torch_ops is not None
        try:
            model = AutoModel.from_pretrained(folder, dtype=torch.float32)
        except Exception as e:  # transformers raises many kinds on a checkpoint it cannot load
            raise ReferenceUnavailableError(f"{folder}: transformers cannot load it: {type(e).__name__}: "
                                            f"{(str(e).strip().splitlines() or [''])[0]}") from None
        self.model = model.float().eval()
        whole = hasattr(model, "get_image_features") and hasattr(model, "vision_model")
        self.tower = model.vision_model if whole else model
        what = (type(self.processor).__name__ if self.processor is not None
                else f"{self._torch_ops['image_processor_type']} (its torch operations)" if self._torch_ops
                else "no processor")
        self.description = f"transformers {type(model).__name__}" + (".vision_model" if whole else "") + f" + {what}"

    def pixels(self, image: Any) -> Any:
        if self.processor is not None:
            return self.processor(images=image, do_convert_rgb=True, return_tensors="pt")["pixel_values"][0].float()
        return torch_ops_pixels(image, self._torch_ops)

    def run(self, pixels: Any) -> dict[str, Any]:
        out = self.tower(pixel_values=pixels, output_hidden_states=True)
        return {"hidden_states": out.hidden_states, "last_hidden_state": out.last_hidden_state,
                "pooler_output": getattr(out, "pooler_output", None)}

    def pooled(self, outputs: dict[str, Any], pixels: Any, name: str) -> tuple[Any, str]:
        if name == "cls_of_last":
            return outputs["last_hidden_state"][:, 0], ""
        if name == "pooler_output":
            if outputs["pooler_output"] is None:
                return None, f"{type(self.tower).__name__} gives no pooler_output"
            return outputs["pooler_output"], ""
        if name == "image_features":
            if not hasattr(self.model, "get_image_features"):
                return None, (f"{type(self.model).__name__} has no get_image_features (a vision-only checkpoint; "
                              "the whole model's checkpoint has it)")
            features = self.model.get_image_features(pixel_values=pixels)
            return (features if is_tensor(features) else features.pooler_output), ""
        return None, f"unknown reference output {name!r}"


def is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def processor_of(folder: Path) -> tuple[Any, dict | None, str]:
    """(the reference image processor, or the settings of one whose torch operations verify runs
    itself, or neither; why there is none).

    The PIL backend is asked for (what vitembed mirrors); a processor that exists only for
    torchvision loads when torchvision is installed, and otherwise, when it rescales before it
    resizes (``config.RESCALE_FIRST_PROCESSORS``: DINOv3's), its torch operations run here.
    """
    from transformers import AutoImageProcessor

    from .preprocess_config import RESCALE_FIRST_PROCESSORS

    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return None, None, f"no reference processor: {folder} has no preprocessor_config.json"
    try:
        return AutoImageProcessor.from_pretrained(folder, backend="pil"), None, ""
    except ImportError:  # a processor that needs torchvision, which is not installed
        settings = json.loads(file.read_text())
        kind = settings.get("image_processor_type", "?")
        if kind in RESCALE_FIRST_PROCESSORS:
            return None, settings, ""
        return None, None, f"no PIL reference processor: {kind} needs torchvision, which is not installed"
    except Exception as e:
        return None, None, f"no reference processor: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


# DINOv3ViTImageProcessor's class defaults (its source), which its preprocessor_config.json may leave out.
_RESCALE_FIRST_DEFAULTS = {"do_resize": True, "size": {"height": 224, "width": 224}, "resample": 2,
                           "do_rescale": True, "rescale_factor": 1 / 255, "do_center_crop": False,
                           "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
_TORCH_MODES = {2: "bilinear", 3: "bicubic"}  # PIL resample codes -> F.interpolate modes (antialiased)


def torch_ops_pixels(image: Any, settings: dict) -> Any:
    """The ``_preprocess`` of a rescale-first processor (DINOv3ViTImageProcessor), by its source,
    on torch tensors: uint8 CHW * rescale_factor, torchvision's resize of a float tensor
    (``F.interpolate``, antialias, align_corners False), centre crop, (x - mean) / std."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    s = {**_RESCALE_FIRST_DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    if s["do_rescale"]:
        x = x * s["rescale_factor"]
    x = x.float()
    if s["do_resize"]:
        size, mode = s["size"], _TORCH_MODES.get(s["resample"])
        if mode is None or "height" not in size:
            raise ReferenceUnavailableError(f"{s.get('image_processor_type')}: resample {s['resample']} / size {size} "
                                            "are not reproduced by verify's torch operations")
        x = F.interpolate(x, size=(size["height"], size["width"]), mode=mode, align_corners=False, antialias=True)
    if s["do_center_crop"]:
        crop = s.get("crop_size") or {}
        ch, cw = crop.get("height", x.shape[2]), crop.get("width", x.shape[3])
        top, left = int(round((x.shape[2] - ch) / 2.0)), int(round((x.shape[3] - cw) / 2.0))
        x = x[:, :, top:top + ch, left:left + cw]
    if s["do_normalize"]:
        mean = torch.tensor(s["image_mean"], dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(s["image_std"], dtype=torch.float32).view(-1, 1, 1)
        x = x.sub(mean).div_(std)
    return x[0].contiguous()


class TimmReference(Reference):
    """timm's VisionTransformer with these weights and its own data config and transforms
    (``resolve_data_config``, ``create_transform``). Hidden states are read with forward hooks:
    ``embeddings`` after ``norm_pre``, block N after ``blocks[N - 1]``, ``last`` is
    ``forward_features``. Only ``cls_of_last`` pooled outputs are compared."""

    def __init__(self, name: str, file: Path):
        import timm
        from timm.data import create_transform, resolve_data_config

        self.model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)},
                                       num_classes=0).float().eval()
        self.transform = create_transform(**resolve_data_config({}, model=self.model))
        self.description = f"timm {name} + its data config"

    def pixels(self, image: Any) -> Any:
        return self.transform(image.convert("RGB")).float()

    def run(self, pixels: Any) -> dict[str, Any]:
        states: list[Any] = []
        modules = [self.model.norm_pre, *self.model.blocks]
        hooks = [m.register_forward_hook(lambda _m, _i, out: states.append(out)) for m in modules]
        try:
            last = self.model.forward_features(pixels)
        finally:
            for hook in hooks:
                hook.remove()
        return {"hidden_states": tuple(states), "last_hidden_state": last, "pooler_output": None}

    def pooled(self, outputs: dict[str, Any], pixels: Any, name: str) -> tuple[Any, str]:
        if name == "cls_of_last":
            return outputs["last_hidden_state"][:, 0], ""
        return None, f"the timm reference gives no {name}"
