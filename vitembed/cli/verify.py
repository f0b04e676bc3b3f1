"""``vitembed verify``: vitembed against the reference implementation."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..catalog import DEFAULT_MODEL
from ..errors import VitembedError
from .common import CropPct, ImageSize, Interpolation, Mean, Model, Resize, Std, _fail, _opt, _quiet_pillow, command


VERIFY_EPILOG = """Exit status:
  0  all within tolerance (1e-4 for float32)
  1  some differ (the verdict on stderr says where)
  2  usage or setup error, or no reference installed (transformers; timm)"""


@command("Compare with the reference implementation (transformers, timm).", VERIFY_EPILOG)
def verify(
    images: Annotated[Optional[list[str]], typer.Argument(help="Image files [default: a few synthetic images].", metavar="IMAGE", show_default=False)] = None,
    model: Model = DEFAULT_MODEL, weights: Annotated[Optional[str], _opt(
        "A checkpoint folder (config.json + model.safetensors) or one .safetensors/.bin file; not 'random', which has "
        "no reference to compare with. Without it: searched as encode does (see encode --help).", metavar="DIR|FILE")] = None,
    layer: Annotated[Optional[list[str]], _opt("Layer to compare: last, N or embeddings, as encode --layer (repeatable) [default: embeddings, the middle block, last].", metavar="LAYER")] = None,
    image_size: ImageSize = None, resize: Resize = None, interpolation: Interpolation = None, crop_pct: CropPct = None,
    mean: Mean = None, std: Std = None,
    as_json: Annotated[bool, _opt("One JSON object per compared item, then a summary, on stdout.", "--json")] = False,
) -> None:
    """Compare vitembed with the reference (transformers or timm) on these images and weights: the
    model inputs, each layer and the pooled vectors, with the largest differences."""
    from ..console import print_verify
    from ..verify import verify as run_verify

    _quiet_pillow()
    try:
        report = run_verify(model, weights, images or None, layer, image_size=image_size, resize=resize,
                            interpolation=interpolation, crop_pct=crop_pct, mean=mean, std=std)
    except VitembedError as e:
        raise _fail(str(e), e.exit_code) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    print_verify(report, as_json)
    if not report.ok:
        raise typer.Exit(1)

