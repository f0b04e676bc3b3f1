"""Image files -> the RGB pixels a person sees, or an InputError that says why not.

Pillow does the decoding. On top of it: the EXIF orientation is applied
(``ImageOps.exif_transpose``; Pillow also reads an orientation stored only in
XMP), non-sRGB ICC profiles are converted to sRGB, the first frame only is decoded, every mode
becomes 8-bit RGB (transparency composited onto a background, white by default,
as transformers' ``convert_to_rgb`` does), 16-bit greyscale is scaled by its bit
depth instead of being clipped, and each failure becomes an ``InputError`` with
a short kind and a reason. Does not import torch.
"""

from __future__ import annotations

import functools
import io
import os
import re
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import InputError
from .shards import TarMember

WHITE = (255, 255, 255)

# vitembed's default pixel limit: twice Pillow's Image.MAX_IMAGE_PIXELS (89,478,485), the point where
# Pillow itself raises DecompressionBombError. A 10000x10000 photo passes; vitembed checks the limit
# from the header, before decoding.
DEFAULT_MAX_PIXELS = 178_956_970
# Longest side decoded, whatever the pixel limit: Pillow keeps per-row bookkeeping, so a 1 x 50 M
# strip (50 M pixels, under the limit) takes about 0.9 GB to decode. 262144 is four times JPEG's
# maximum side (65535) and keeps such strips to a few MB.
MAX_SIDE = 1 << 18

try:  # optional: HEIF/HEIC through pillow-heif (pip install 'vitembed[heif]')
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_SUPPORT = True
except ImportError:
    HEIF_SUPPORT = False

@dataclass(frozen=True)
class DecodeOptions:
    """How files are decoded.

    Attributes:
        max_pixels: refuse images whose header claims more pixels than this,
            before decoding (None: ``DEFAULT_MAX_PIXELS``, 178,956,970). A limit
            above Pillow's own refusal (``2 * Image.MAX_IMAGE_PIXELS``) works: see
            ``open_image``.
        background: RGB colour that transparency is composited onto (white).
        allow_truncated: decode truncated files, Pillow filling the missing
            part with grey, instead of refusing them. Pillow keeps this switch
            process-wide (``ImageFile.LOAD_TRUNCATED_IMAGES``): vitembed sets it
            before each image, so runs in one process with different settings
            must not decode at the same time.
        fast: reduced decoding (``--fast-decode``): a JPEG is decoded at 1/2, 1/4 or 1/8 scale
            (libjpeg's DCT scaling, Pillow's ``Image.draft``) where the caller's ``min_side`` allows,
            and the resize first reduces by whole factors (Pillow's ``reducing_gap``). Not exact:
            the embeddings move slightly (README, Speed, gives the cosines).
    """

    max_pixels: int | None = None
    background: tuple[int, int, int] = WHITE
    allow_truncated: bool = False
    fast: bool = False


# Pillow modes holding 16 (or 32) bit integers; values are scaled 65535 -> 255 (mode I only when
# all its values lie within 0..65535).
_WIDE_INT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

_PILLOW_LIMIT_LOCK = threading.Lock()


def _lift_pillow_limit(limit: int) -> None:
    """Make Pillow accept headers of up to ``limit`` pixels, so that a limit above Pillow's works.

    Pillow refuses images over ``2 * Image.MAX_IMAGE_PIXELS`` in ``Image.open`` (and warns over
    ``Image.MAX_IMAGE_PIXELS``). When ``limit`` is above that refusal, ``Image.MAX_IMAGE_PIXELS``
    is raised, process-wide, to ``ceil(limit / 2)``; it is never lowered, and left alone when
    None (no Pillow check). The default limit needs no change. Under a lock: decoding runs in threads.
    """
    with _PILLOW_LIMIT_LOCK:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and limit > 2 * current:
            Image.MAX_IMAGE_PIXELS = -(-limit // 2)


def _source(path: str | os.PathLike | TarMember) -> tuple[str, str | io.BytesIO]:
    """(the name errors give, what Pillow opens): a file's path once it is known to be a
    non-empty regular file, or a shard member's bytes.

    Raises:
        InputError: kinds ``not-found``, ``unreadable`` (also: not a regular file), ``empty``.
    """
    if isinstance(path, TarMember):  # a WebDataset shard's member, read by offset (shards.py)
        return str(path), io.BytesIO(path.read())
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise InputError(name, "not-found", "no such file") from None
    except OSError as e:
        raise InputError(name, "unreadable", e.strerror or str(e)) from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(name, "unreadable", "not a regular file")
    if st.st_size == 0:
        raise InputError(name, "empty", "empty file (0 bytes)")
    return name, name


def open_image(
    path: str | os.PathLike | TarMember,
    max_pixels: int | None = None,
    allow_truncated: bool = False,
    min_side: Callable[[int, int], int] | None = None,
) -> Image.Image:
    """Open ``path`` and decode its first frame, in the file's own mode, upright.

    Args:
        path: an image file, or a WebDataset shard's member (``shards.TarMember``); the format is
            detected from the content.
        max_pixels: refuse images whose header claims more pixels than this,
            before decoding them (None: ``DEFAULT_MAX_PIXELS``, 178,956,970). A
            higher limit lifts Pillow's own refusal (``_lift_pillow_limit``).
            Between ``Image.MAX_IMAGE_PIXELS`` and the limit Pillow still issues
            its ``DecompressionBombWarning``: the CLI filters it; a program may do
            the same (``warnings.simplefilter("ignore", Image.DecompressionBombWarning)``).
            vitembed does not suppress it itself, since ``warnings.catch_warnings``
            is not thread-safe.
        allow_truncated: see ``DecodeOptions``.
        min_side: reduced decoding (``DecodeOptions.fast``): given the stored (width, height), the
            shorter side, in pixels, that the caller will resize the image to. A JPEG is then
            decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose shorter side stays at least
            twice that, so the final resize still filters over two or more source pixels. Other
            formats decode in full. None: always in full (exact).

    Returns:
        A loaded PIL image with the EXIF orientation applied. A corrupt EXIF
        block is ignored rather than losing the image.

    Raises:
        InputError: kinds ``not-found``, ``unreadable``, ``empty``,
            ``not-an-image`` (also for garbage where Pillow expects a chunk or
            marker name), ``too-large``, ``truncated``.
    """
    name, source = _source(path)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    _lift_pillow_limit(limit)
    # Pillow reads this module-wide switch at load time; set it for every image, so each call
    # gets its own setting (two threads decoding with different settings at once would race).
    ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated
    try:
        with Image.open(source) as im:
            check_size(name, im.width, im.height, limit)
            if min_side is not None:  # Image.draft acts on JPEG (and MPO) only; it keeps both sides >= the size asked
                side = 2 * min_side(im.width, im.height)
                im.draft(None, (side, side))
            im.load()
            image = im
    except InputError:
        raise
    except UnidentifiedImageError:
        if _is_heif(source) and not HEIF_SUPPORT:
            raise InputError(
                name, "unsupported", "HEIF/HEIC image: Pillow needs pillow-heif for it (pip install pillow-heif)"
            ) from None
        if _is_heif(source):
            raise InputError(name, "not-an-image", "HEIF/HEIC file that pillow-heif cannot read") from None
        raise InputError(name, "not-an-image", "cannot identify image format") from None
    except Image.DecompressionBombError as e:  # Pillow's own check on the header, at or above the limit
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        what = f"{claimed.group(1)} pixels" if claimed else "the image"
        raise InputError(name, "too-large", f"{what} exceeds the limit of {limit} (decompression bomb?)") from None
    except PermissionError as e:
        raise InputError(name, "unreadable", e.strerror or str(e)) from None
    except UnicodeDecodeError:  # Pillow reads a PNG chunk type as ASCII: garbage there (read on past
        # a bad chunk under allow_truncated) fails so, from Image.open
        if _starts_with(source, b"\x89PNG\r\n\x1a\n"):
            raise InputError(name, "not-an-image", "corrupt PNG data (a chunk name is not text): not a valid PNG file") from None
        raise InputError(name, "not-an-image", "corrupt image data: not a valid image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        message = str(e) or type(e).__name__
        if "ghostscript" in message.lower():  # EPS/PS: Pillow rasterises them through Ghostscript
            raise InputError(name, "unsupported", "PostScript/EPS image: Pillow needs Ghostscript (gs) to read it") from None
        kind = "truncated" if "truncated" in message.lower() or isinstance(e, EOFError) else "unreadable"
        raise InputError(name, kind, f"cannot decode: {message}") from None
    return upright(image)


def check_size(name: str, width: int, height: int, max_pixels: int | None = None) -> None:
    """Refuse an image of ``width`` x ``height`` pixels that has none, more than ``max_pixels``
    (None: ``DEFAULT_MAX_PIXELS``), or a side longer than ``MAX_SIDE``.

    Raises:
        InputError: kinds ``too-large`` and ``not-an-image``, naming ``name``.
    """
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if width * height > limit:
        raise InputError(name, "too-large", f"{width}x{height} pixels exceeds the limit of {limit} (decompression bomb?)")
    if width == 0 or height == 0:
        raise InputError(name, "not-an-image", f"image has no pixels ({width}x{height})")
    if max(width, height) > MAX_SIDE:
        raise InputError(name, "too-large", f"{width}x{height}: a side longer than {MAX_SIDE} pixels")


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (Pillow's ``ImageOps.exif_transpose``);
    a corrupt EXIF block is ignored rather than losing an otherwise good image."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


# ISO BMFF brands of HEIF/HEIC still images (ISO/IEC 23008-12).
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


def _head(source: str | io.BytesIO, size: int) -> bytes:
    """The first ``size`` bytes of a file (by path) or of a member's bytes; b"" if unreadable."""
    if isinstance(source, io.BytesIO):
        return source.getvalue()[:size]
    try:
        with open(source, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def _starts_with(source: str | io.BytesIO, signature: bytes) -> bool:
    """True if the file's first bytes are ``signature``."""
    return _head(source, len(signature)) == signature


def _is_heif(source: str | io.BytesIO) -> bool:
    """True if the file starts with an ISO BMFF ``ftyp`` box of a HEIF brand."""
    head = _head(source, 32)
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


_ICC_MODES = {"RGB": ("RGB", "RGBA"), "GRAY": ("L", "LA"), "CMYK": ("CMYK",)}


def to_srgb(image: Image.Image) -> Image.Image:
    """Convert colours described by an embedded non-sRGB ICC profile to sRGB (Pillow's ImageCms).

    Images without a profile, with an sRGB profile (by its description), or whose
    profile does not fit their mode or cannot be read are returned unchanged, so
    the same pixels with and without an sRGB profile give the same result.
    Alpha is kept. Returns RGB or RGBA when a conversion happened.
    """
    icc = image.info.get("icc_profile")
    if not icc:
        return image
    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in ImageCms.getProfileDescription(source).lower():
            return image
        space = source.profile.xcolor_space.strip()
        if image.mode not in _ICC_MODES.get(space, ()):
            return image
        alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
        colour = image.convert({"RGBA": "RGB", "LA": "L"}.get(image.mode, image.mode))
        out = ImageCms.profileToProfile(colour, source, _srgb_profile(), outputMode="RGB")
    except (OSError, ValueError, ImageCms.PyCMSError):  # a broken profile: keep the pixels as stored
        return image
    if alpha is not None:
        out.putalpha(alpha)
    return out


@functools.lru_cache(maxsize=1)
def _srgb_profile():
    from PIL import ImageCms

    return ImageCms.createProfile("sRGB")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB.

    Colours under a non-sRGB ICC profile are first converted to sRGB
    (``to_srgb``). Images with an alpha band or a transparency key (P, RGB, L with ``tRNS``)
    are alpha-composited onto ``background``, as transformers' ``convert_to_rgb``
    does with white; premultiplied modes (La, RGBa) too. 16-bit integer modes
    (I;16, I;16B) are scaled by 255/65535 and rounded rather than clipped, and so
    are 32-bit integer (I) images whose values all lie within 0..65535 (as a
    16-bit PNG or TIFF decodes); other I images are refused, never clipped.

    Raises:
        InputError: kind ``unsupported`` for 32-bit float (F) images, and 32-bit
            integer (I) images with a value outside 0..65535 (the message gives
            the range found), which have no agreed mapping to display values.
    """
    mode = image.mode
    if mode == "F":
        name = getattr(image, "filename", "") or "<image>"
        raise InputError(name, "unsupported", "32-bit float image (mode F) has no agreed display range")
    if mode in _WIDE_INT_MODES:
        wide = np.asarray(image)  # uint16 (I;16*) or int32 (I): 2 or 4 bytes a pixel, no float copies
        if mode == "I" and wide.size:
            low, high = int(wide.min()), int(wide.max())
            if low < 0 or high > 65535:
                name = getattr(image, "filename", "") or "<image>"
                raise InputError(
                    name,
                    "unsupported",
                    f"32-bit integer image (mode I) with values from {low} to {high}: 32-bit integer images "
                    "outside 0..65535 have no agreed display range",
                )
        # round(v * 255 / 65535) = round(v / 257) = floor((2v + 257) / 514), exactly, for v in 0..65535
        # (v / 257 is never halfway between two integers); integers keep a 16-bit photo's memory small.
        levels = wide.astype(np.uint32)
        levels *= 2
        levels += 257
        levels //= 514
        grey = Image.fromarray(levels.astype(np.uint8), "L")
        del levels
        if image.info.get("icc_profile"):  # a grey profile still applies to the scaled pixels (to_srgb)
            grey.info["icc_profile"] = image.info["icc_profile"]
        key = image.info.get("transparency")
        if isinstance(key, int):  # a 16-bit tRNS key: those pixels are transparent
            grey.putalpha(Image.fromarray(np.where(wide == key, np.uint8(0), np.uint8(255)), "L"))
        image = grey
    elif mode in ("La", "RGBa"):  # premultiplied alpha: un-premultiply, then composite like the others
        image = image.convert("LA" if mode == "La" else "RGBA")
    elif image.info.get("transparency") is not None:  # a palette or colour key: make it an alpha band
        image = image.convert("RGBA")
    elif mode in ("P", "PA"):
        image = image.convert("RGBA" if mode == "PA" else "RGB")
    image = to_srgb(image)
    if "A" in image.getbands():
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def decode_image(
    path: str | os.PathLike | TarMember,
    options: DecodeOptions = DecodeOptions(),
    min_side: Callable[[int, int], int] | None = None,
) -> Image.Image:
    """File -> upright 8-bit RGB PIL image (``open_image`` then ``to_rgb``); ``min_side`` as
    ``open_image`` takes it, used only with ``options.fast``.

    Raises:
        InputError: see ``open_image`` and ``to_rgb``.
    """
    image = open_image(path, max_pixels=options.max_pixels, allow_truncated=options.allow_truncated,
                       min_side=min_side if options.fast else None)
    try:
        return to_rgb(image, options.background)
    except InputError as e:
        raise InputError(source_name(path), e.kind, e.reason) from None


def source_name(path: str | os.PathLike | TarMember) -> str:
    """How errors and metadata name an input: the path, or ``<shard>/<member>`` for a tar member."""
    return str(path) if isinstance(path, TarMember) else os.fspath(path)
