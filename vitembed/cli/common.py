"""What the commands share: the Typer app, the option types of more than one command, and
turning a library error into one line on stderr and an exit status."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from .. import __version__
from ..catalog import CATALOG
from ..console import say
from ..options import DTYPES, ENGINES, FORMATS, POOLS, SAVE_DTYPES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Turn image files into Vision Transformer embeddings (197x768 tokens per image for ViT-B/16).",
)


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A click choice from the library's list of allowed values (written once, in ``options.py``)."""
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


Pool, DType, SaveDType, Format, Engine = (
    _choices(n, v) for n, v in
    (("Pool", POOLS), ("DType", DTYPES), ("SaveDType", SAVE_DTYPES), ("Format", FORMATS), ("Engine", ENGINES)))


def _opt(help: str, *names: str, default_shown: bool = False, **kwargs):
    return typer.Option(*names, help=help, show_default=default_shown, **kwargs)


# The flags of `vitembed encode`, one line each; ModelOptions, EncodingOptions and RunOptions say what each means.

# Options of more than one command; ModelOptions and EncodingOptions say what each means.
Model = Annotated[str, _opt(f"Model name ({', '.join(CATALOG)}).", default_shown=True)]
Weights = Annotated[Optional[str], _opt("Checkpoint directory (config.json + model.safetensors or pytorch_model.bin), a .safetensors/.bin file (architecture from --model), or 'random'.")]
ImageSize = Annotated[Optional[int], _opt("Input size in pixels; the position embedding is resampled [default: the model's preprocessing size].")]
Resize = Annotated[Optional[str], _opt("Override the model's resize: squash | shortest.")]
Interpolation = Annotated[Optional[str], _opt("Override the resampling filter: bilinear, bicubic, ...")]
CropPct = Annotated[Optional[float], _opt("timm's crop_pct: resize to size/crop_pct, then centre-crop.")]
Mean = Annotated[Optional[str], _opt("Override the normalisation mean: R,G,B.")]
Std = Annotated[Optional[str], _opt("Override the normalisation std: R,G,B.")]
AsJson = Annotated[bool, _opt("One JSON object per input on stdout.", "--json")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vitembed {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    pass



def _fail(message: str, code: int = 2) -> "typer.Exit":
    say(f"error: {message}")
    return typer.Exit(code)


def _quiet_pillow() -> None:
    import warnings

    from PIL import Image

    from ..console import show_warning

    # vitembed refuses images over the pixel limit itself, with a message naming the file.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    # Pillow warns about what it repairs (a corrupt EXIF block); the image is still good.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    warnings.showwarning = show_warning

