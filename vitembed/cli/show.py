"""``vitembed show``: a picture of the patch features (PCA map beside the image as the model saw it)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..console import out
from ..errors import InputError, VitembedError
from .common import _fail, _opt, _quiet_pillow, command


SHOW_EPILOG = """Examples:
  vitembed show emb/cat.jpg.safetensors --out cat-pca.png
  vitembed show emb/ --out sheet.png --limit 8 --mask

Exit status: 0 written; 1 an output or the PNG could not be read or
written; 2 usage error (a pooled output has no patch tokens to show)."""


@command("A PCA picture of the patch features beside the image.", SHOW_EPILOG)
def show(
    outputs: Annotated[list[str], typer.Argument(help="Output files of encode, folders of them, or a packed folder (--pack; rows by --key).", metavar="OUTPUT", show_default=False)],
    png: Annotated[str, _opt("The PNG file to write.", "--out", "-o", metavar="FILE.png")],
    key: Annotated[Optional[list[str]], _opt("A packed folder's row to show, by its key (sub/cat.jpg; repeatable) [default: its first --limit rows].", metavar="KEY")] = None,
    mask: Annotated[bool, _opt("Background patches black: first-component score below --mask-threshold; colours refitted on the rest (DINOv2 Fig. 1).", "--mask")] = False,
    mask_threshold: Annotated[float, _opt("--mask: the first-component score (centred tokens projected, token units) below which a patch is background.", metavar="SCORE", default_shown=True)] = 0.0,
    limit: Annotated[int, _opt("Show at most this many outputs.", metavar="N", default_shown=True)] = 16,
    columns: Annotated[int, _opt("Tiles per row of the contact sheet.", metavar="N", default_shown=True)] = 4,
) -> None:
    """PCA of the patch tokens as RGB (first three components, one basis for all outputs), beside the
    image as the model saw it; several outputs make a contact sheet. Prints the PNG's path."""
    from ..show import show_outputs

    _quiet_pillow()
    try:
        written = show_outputs(outputs, png, keys=tuple(key or ()), mask=mask, mask_threshold=mask_threshold,
                               limit=limit, columns=columns)
    except InputError as e:
        raise _fail(str(e), 1) from None
    except VitembedError as e:
        raise _fail(str(e), e.exit_code) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    out(f"{written}\n")
