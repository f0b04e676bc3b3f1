"""What the commands share: the Typer app, the option types of more than one command, and
turning a library error into one line on stderr and an exit status."""

from __future__ import annotations

import re
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from .. import __version__
from ..console import say
from ..options import DTYPES, ENGINES, FORMATS, POOLS, SAVE_DTYPES
from ..preprocess_config import INTERPOLATIONS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Turn image files into Vision Transformer embeddings (197x768 tokens per image for ViT-B/16).",
    epilog="\b\nStart here (random weights need no download):\n"
           "  vitembed encode photos/ --out emb/ --weights random --model deit-tiny-patch16-224\n"
           "  vitembed inspect emb/\n"
           "  vitembed show emb/ --out features.png\n"
           "  vitembed export emb/ vectors.npy --pool cls\n"
           "Each command's --help says what its options mean and its exit codes.",
)


def choice(values: tuple[str, ...]) -> str:
    """The metavar of an option of these values (``none|cls|mean``). The value is text, checked by
    the library (``options.py``, where the lists are written once), so a bad one gets the same
    one-line ``error:`` and exit 2 as every other bad value."""
    return "|".join(values)


POOL, DTYPE, SAVE_DTYPE, FORMAT, ENGINE = (choice(v) for v in (POOLS, DTYPES, SAVE_DTYPES, FORMATS, ENGINES))


def _opt(help: str, *names: str, default_shown: bool = False, **kwargs):
    return typer.Option(*names, help=help, show_default=default_shown, **kwargs)


class HelpCommand(TyperCommand):
    """A command whose ``--help`` names values by their metavar (``--out DIR``, ``--layer LAYER``,
    ``--pool none|cls|mean``), never by a Python type (``<list[str]>``, ``<float range>``)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        """``[OPTIONS] PATH...`` (required) or ``[INPUT]...`` (optional), not Typer's ``{PATH}...``."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or (param.name or "").upper()
                pieces.append((name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else ""))
        return pieces

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {"argument": [], "option": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None and param.param_type_name in sections:
                sections[param.param_type_name].append((_shown_name(param, record[0]), record[1]))
        for title, kind in (("Arguments", "argument"), ("Options", "option")):
            if sections[kind]:
                with formatter.section(title):
                    _write_dl(formatter, sections[kind])


def _write_dl(formatter, rows: list[tuple[str, str]], col_max: int = 30, spacing: int = 2) -> None:
    """click's ``HelpFormatter.write_dl``, wrapping at spaces only: a model name such as
    ``vit-base-patch16-224`` or a path is never cut at its hyphens."""
    import textwrap

    first = min(max(len(name) for name, _ in rows), col_max) + spacing
    width = max(formatter.width - formatter.current_indent - first, 10)
    for name, text in rows:
        formatter.write(" " * formatter.current_indent + name)
        lines = textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False) or [""]
        if len(name) + spacing <= first:
            formatter.write(" " * (first - len(name)) + lines[0] + "\n")
            lines = lines[1:]
        else:
            formatter.write("\n")
        for line in lines:
            formatter.write(" " * (formatter.current_indent + first) + line + "\n")


def _shown_name(param, name: str) -> str:
    """``INPUT...`` for an argument; for an option, click's ``name`` with a type in angle brackets
    (``--pool <none|cls|mean>``, ``--limit <int>``) shown as its values (``none|cls|mean``, ``N``)."""
    if param.param_type_name == "argument":
        return f"{param.metavar or (param.name or '').upper()}{'...' if param.nargs == -1 else ''}"
    return re.sub(r"<(?:list\[)?([^>\]]*)\]?>", lambda m: _TYPE_NAMES.get(m.group(1), m.group(1)), name)


_TYPE_NAMES = {"int": "N", "float": "X", "str": "TEXT", "Path": "PATH", "path": "PATH"}


def command(short_help: str, epilog: str | None = None):
    """``app.command`` with vitembed's help layout: ``short_help`` for the list of commands,
    ``epilog`` printed as written (examples, exit codes), not re-wrapped."""
    return app.command(cls=HelpCommand, short_help=short_help, epilog=None if epilog is None else "\b\n" + epilog.replace("\n\n", "\n\n\b\n"))


# Options of more than one command; ModelOptions and EncodingOptions say what each means.
Model = Annotated[str, _opt("A name from `vitembed models` (vit-base-patch16-224, deit-small-patch16-224, dinov2-small, "
                            "clip-vit-base-patch16, siglip2-base-patch16-224, a timm name such as "
                            "vit_small_patch16_224.augreg_in21k, ...) or its Hugging Face repository id (facebook/dinov2-small).",
                            metavar="NAME", default_shown=True)]
Weights = Annotated[Optional[str], _opt(
    "Where the weights come from: a checkpoint folder (config.json + model.safetensors or pytorch_model.bin), one "
    ".safetensors/.bin file (architecture from --model), or 'random' (meaningless embeddings, for trying things). "
    "Without it: $VITEMBED_WEIGHTS, then ./weights/NAME/, then the Hugging Face cache, then a download from the Hub "
    "(never with HF_HUB_OFFLINE=1).", metavar="DIR|FILE|random")]
ImageSize = Annotated[Optional[int], _opt("Input side in pixels instead of the model's (a multiple of the patch size); the "
                                          "position embedding is resampled bicubically, as timm does [default: the model's].",
                                          metavar="PIXELS")]
Resize = Annotated[Optional[str], _opt(
    "How the image becomes the input square, instead of the model's own way: squash = resize the whole image to "
    "the square, aspect ratio not kept (ViT, DeiT, SigLIP); shortest = shorter side to the size (or size/crop-pct), "
    "aspect kept, then the centre cut out (CLIP, DINO, timm).", metavar="squash|shortest")]
Interpolation = Annotated[Optional[str], _opt(
    f"Resampling filter of the resize, instead of the model's: {', '.join(INTERPOLATIONS)} (Pillow's filters).",
    metavar="FILTER")]
CropPct = Annotated[Optional[float], _opt("timm's crop_pct: resize to size/crop-pct (0.875: 256 for 224), then cut "
                                          "out the centre.", metavar="FRACTION")]
Mean = Annotated[Optional[str], _opt("Normalisation mean per channel, instead of the model's (e.g. 0.485,0.456,0.406).",
                                     metavar="R,G,B")]
Std = Annotated[Optional[str], _opt("Normalisation std per channel, instead of the model's (e.g. 0.229,0.224,0.225).",
                                    metavar="R,G,B")]
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


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's time limit or scancel), handled as Ctrl-C is."""


def _stop_on_sigterm() -> list[bool]:
    """Make SIGTERM stop the run as Ctrl-C does (whole outputs, the counts, resumable); the list
    returned becomes non-empty when it arrives."""
    import signal

    terminated: list[bool] = []

    def on_sigterm(signum, frame) -> None:
        terminated.append(True)
        raise _Terminated()

    signal.signal(signal.SIGTERM, on_sigterm)
    return terminated
