"""Each kind of odd image decodes to the pixels a viewer shows, or fails cleanly while the job goes on."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vitembed.decode import DecodeOptions, decode_image
from vitembed.errors import InputError
from vitembed.inputs import plan_jobs

from .conftest import jpeg_bytes, photo, run_cli
from .test_decode import DISPLAY, INVERSE


def smooth(width: int = 64, height: int = 40) -> Image.Image:
    """A smooth, asymmetric picture: lossy codecs keep it within a few levels."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // width, y * 255 // height, 128 + 0 * x], -1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _save_oriented(upright: Image.Image, orientation: int, path, fmt: str) -> None:
    method = DISPLAY[orientation]
    stored = upright if method is None else upright.transpose(INVERSE.get(method, method))
    exif = Image.Exif()
    exif[0x0112] = orientation
    kwargs = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    stored.save(path, fmt, exif=exif.tobytes(), **kwargs)


@pytest.mark.parametrize("fmt,tolerance", [("JPEG", 3.0), ("PNG", 0), ("WEBP", 0), ("TIFF", 0)])
def test_exif_orientation_in_each_format(tmp_path, fmt, tolerance):
    upright = smooth()
    for orientation in DISPLAY:
        path = tmp_path / f"o{orientation}.{fmt.lower()}"
        _save_oriented(upright, orientation, path, fmt)
        got = decode_image(path)
        assert got.size == upright.size, (fmt, orientation)
        diff = np.abs(np.asarray(got, np.int16) - np.asarray(upright, np.int16)).mean()
        assert diff <= tolerance, (fmt, orientation, diff)


XMP = (
    b'<?xpacket begin=""?><x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
    b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_orientation_stored_only_in_xmp(tmp_path, fmt):
    upright = smooth()
    path = tmp_path / f"xmp.{fmt.lower()}"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, fmt, xmp=XMP, quality=95)
    with Image.open(path) as raw:
        assert raw.size == (40, 64) and b"tiff:Orientation" in XMP  # stored sideways, no EXIF block
    got = decode_image(path)
    assert got.size == (64, 40)
    assert np.abs(np.asarray(got, np.int16) - np.asarray(upright, np.int16)).mean() < 3


def test_corrupt_exif_block_keeps_the_image(tmp_path):
    data = jpeg_bytes(smooth(), quality=95)
    garbage = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff" + os.urandom(40)
    app1 = b"\xff\xe1" + struct.pack(">H", len(garbage) + 2) + garbage
    path = tmp_path / "bad-exif.jpg"
    path.write_bytes(data[:2] + app1 + data[2:])
    got = decode_image(path)
    assert got.size == (64, 40)
    assert np.abs(np.asarray(got, np.int16) - np.asarray(smooth(), np.int16)).mean() < 3


@pytest.mark.parametrize("fmt,ext", [("GIF", "gif"), ("PNG", "apng"), ("WEBP", "webp"), ("TIFF", "tif"), ("MPO", "mpo")])
def test_animations_and_multi_page_files_give_the_first_frame(tmp_path, fmt, ext):
    frames = [Image.new("RGB", (16, 16), c) for c in [(250, 10, 10), (10, 250, 10), (10, 10, 250)]]
    path = tmp_path / f"multi.{ext}"
    kwargs = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "MPO" else {}
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], **kwargs)
    with Image.open(path) as im:
        assert getattr(im, "n_frames", 1) == 3
    r, g, b = np.asarray(decode_image(path))[8, 8].tolist()
    assert r > 240 and g < 20 and b < 20


def _png_rgba16(path, array: np.ndarray) -> None:
    """Write a 16-bit-per-channel RGBA PNG (Pillow cannot write one)."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_rgba_png(tmp_path):
    array = np.zeros((2, 2, 4), np.uint16)
    array[0, 0] = [65535, 32896, 0, 65535]  # opaque orange
    array[0, 1] = [0, 0, 65535, 0]  # transparent blue -> white
    array[1, :] = [4660, 4660, 4660, 65535]  # opaque dark grey: 18, not clipped to white
    path = tmp_path / "rgba16.png"
    _png_rgba16(path, array)
    got = np.asarray(decode_image(path)).tolist()
    assert got[0][0] == [255, 128, 0]
    assert got[0][1] == [255, 255, 255]
    assert got[1][0] == [18, 18, 18]


def test_cmyk_jpeg_is_close_to_its_rgb_twin(tmp_path):
    rgb = smooth()
    path = tmp_path / "cmyk.jpg"
    rgb.convert("CMYK").save(path, "JPEG", quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    got = decode_image(path)
    assert got.mode == "RGB"
    assert np.abs(np.asarray(got, np.int16) - np.asarray(rgb, np.int16)).mean() < 4


@pytest.mark.parametrize("size", [(1, 1), (1, 37), (37, 1), (3000, 2)])
def test_tiny_and_extreme_shapes(tmp_path, size):
    path = tmp_path / "t.png"
    photo(*size).save(path)
    assert decode_image(path).size == size


def test_truncated_refused_unless_allowed(tmp_path):
    data = jpeg_bytes(photo(200, 150))
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError) as info:
        decode_image(path)
    assert info.value.kind == "truncated"
    assert decode_image(path, DecodeOptions(allow_truncated=True)).size == (200, 150)


def test_background_option_is_used_and_recorded(tmp_path, small_ckpt):
    logo = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    logo.save(tmp_path / "logo.png")
    assert np.asarray(decode_image(tmp_path / "logo.png", DecodeOptions(background=(0, 0, 0))))[0, 0].tolist() == [0, 0, 0]
    r = run_cli("encode", str(tmp_path / "logo.png"), "--out", str(tmp_path / "o"), "--weights", str(small_ckpt),
                "--background", "0,0,0")
    assert r.returncode == 0, r.stderr.decode()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "o" / "logo.png.safetensors"), "numpy") as f:
        assert f.metadata()["background"] == "0,0,0"
    bad = run_cli("encode", str(tmp_path / "logo.png"), "--out", str(tmp_path / "o2"), "--background", "red")
    assert bad.returncode == 2 and "--background 'red'" in bad.stderr.decode()


def test_max_pixels_refuses_big_images_and_the_job_goes_on(tmp_path, small_ckpt):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    Image.new("RGB", (10, 10)).save(tmp_path / "small.png")
    r = run_cli("encode", str(tmp_path / "big.png"), str(tmp_path / "small.png"), "--out", str(tmp_path / "o"),
                "--weights", str(small_ckpt), "--max-pixels", "5000", "--json")
    assert r.returncode == 1
    lines = {os.path.basename(d["source"]): d for d in map(json.loads, r.stdout.decode().splitlines())}
    assert lines["big.png"]["error_kind"] == "too-large" and lines["small.png"]["status"] == "encoded"


def test_symlink_loops_fifos_and_sockets_are_reported_not_hanging(tmp_path):
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    photo(10, 10).save(root / "sub" / "a.png")
    os.symlink(root, root / "sub" / "loop")  # a folder that contains itself
    os.mkfifo(root / "fifo.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.png"))
    try:
        plan = plan_jobs([str(root)], tmp_path / "o", "safetensors")
        assert sorted(j.relpath for j in plan.jobs) == ["fifo.jpg", "sock.png", "sub/a.png"]
        for special in ("fifo.jpg", "sock.png"):
            with pytest.raises(InputError) as info:
                decode_image(root / special)
            assert info.value.kind == "unreadable" and "not a regular file" in info.value.reason
    finally:
        sock.close()


def test_non_srgb_icc_profile_is_converted_to_srgb(tmp_path):
    from PIL import ImageCms

    from .icc import ADOBE_RGB

    colour = (180, 60, 40)
    plain = Image.new("RGB", (8, 8), colour)
    plain.save(tmp_path / "adobe.png", icc_profile=ADOBE_RGB)
    expected = ImageCms.profileToProfile(
        plain, ImageCms.ImageCmsProfile(io.BytesIO(ADOBE_RGB)), ImageCms.createProfile("sRGB"), outputMode="RGB"
    ).getpixel((0, 0))
    got = decode_image(tmp_path / "adobe.png").getpixel((0, 0))
    assert got == expected and got != colour  # the wider gamut's red is redder than sRGB's (180, 60, 40)
    # Alpha survives the conversion and is then composited.
    rgba = Image.new("RGBA", (8, 8), (*colour, 255))
    rgba.putpixel((0, 0), (*colour, 0))
    rgba.save(tmp_path / "adobe-rgba.png", icc_profile=ADOBE_RGB)
    out = decode_image(tmp_path / "adobe-rgba.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == expected


def test_srgb_profile_gives_the_same_pixels_as_no_profile(tmp_path, small_ckpt):
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    image = photo(40, 30)
    image.save(tmp_path / "with.png", icc_profile=srgb)
    image.save(tmp_path / "without.png")
    assert np.array_equal(np.asarray(decode_image(tmp_path / "with.png")), np.asarray(decode_image(tmp_path / "without.png")))
    r = run_cli("encode", str(tmp_path / "with.png"), str(tmp_path / "without.png"), "--out", str(tmp_path / "o"), "--weights", str(small_ckpt))
    assert r.returncode == 0
    from safetensors.numpy import load_file

    a = load_file(tmp_path / "o" / "with.png.safetensors")["embedding"]
    b = load_file(tmp_path / "o" / "without.png.safetensors")["embedding"]
    assert np.array_equal(a, b)


def test_broken_icc_profile_keeps_the_image(tmp_path):
    photo(20, 20).save(tmp_path / "bad-icc.png", icc_profile=b"not a profile at all")
    assert np.array_equal(np.asarray(decode_image(tmp_path / "bad-icc.png")), np.asarray(photo(20, 20)))


def test_allow_truncated_does_not_leak_into_later_calls(tmp_path):
    data = jpeg_bytes(photo(200, 150))
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    decode_image(path, DecodeOptions(allow_truncated=True))
    with pytest.raises(InputError):
        decode_image(path)


def test_16_bit_grey_transparency_key_is_honoured(tmp_path):
    array = np.full((4, 4), 4660, np.uint16)
    array[0, 0] = 1000
    image = Image.fromarray(array)
    image.info["transparency"] = 4660
    rgb = np.asarray(to_rgb_(image)).tolist()
    assert rgb[1][1] == [255, 255, 255] and rgb[0][0] == [4, 4, 4]


def to_rgb_(image):
    from vitembed.decode import to_rgb

    return to_rgb(image)


def test_icc_profile_on_palette_and_colour_keyed_images(tmp_path):
    from PIL import ImageCms

    from .icc import ADOBE_RGB

    colour = (60, 160, 220)
    expected = ImageCms.profileToProfile(
        Image.new("RGB", (1, 1), colour), ImageCms.ImageCmsProfile(io.BytesIO(ADOBE_RGB)),
        ImageCms.createProfile("sRGB"), outputMode="RGB",
    ).getpixel((0, 0))
    Image.new("RGB", (4, 4), colour).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png", icc_profile=ADOBE_RGB)
    assert decode_image(tmp_path / "p.png").getpixel((0, 0)) == expected
    keyed = Image.new("RGB", (4, 4), colour)
    keyed.putpixel((0, 0), (1, 2, 3))
    keyed.save(tmp_path / "k.png", icc_profile=ADOBE_RGB, transparency=(1, 2, 3))
    out = decode_image(tmp_path / "k.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == expected


@pytest.mark.parametrize("fmt,ext", [("BMP", "bmp"), ("AVIF", "avif"), ("PNG", "jpg"), ("JPEG", "png"), ("WEBP", "gif")])
def test_formats_are_detected_from_content_not_extension(tmp_path, fmt, ext):
    path = tmp_path / f"picture.{ext}"
    kwargs = {"quality": 95} if fmt in ("JPEG", "AVIF") else {"lossless": True} if fmt == "WEBP" else {}
    smooth().save(path, fmt, **kwargs)
    got = decode_image(path)
    assert got.size == (64, 40)
    assert np.abs(np.asarray(got, np.int16) - np.asarray(smooth(), np.int16)).mean() < 3


def test_ds_store_and_other_non_images_are_refused(tmp_path):
    path = tmp_path / ".DS_Store"
    path.write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(range(256)) * 4)
    with pytest.raises(InputError) as info:
        decode_image(path)
    assert info.value.kind == "not-an-image"


def test_a_huge_later_page_is_never_decoded(tmp_path):
    path = tmp_path / "pages.tif"
    first, bomb = Image.new("RGB", (16, 16), (200, 10, 10)), Image.new("L", (3000, 3000))
    first.save(path, save_all=True, append_images=[bomb])
    # The limit is far below the second page: only the first page's header and pixels are read.
    got = decode_image(path, DecodeOptions(max_pixels=16 * 16))
    assert got.size == (16, 16) and got.getpixel((0, 0)) == (200, 10, 10)
