"""pipelines/core/images.decode_rgb, the one decode of every stage, on the image kinds the web serves:
each test builds the file with PIL (or OpenCV for 16-bit RGB, which PIL cannot write) and checks pixels."""

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines.core.images import TooManyPixels, decode_rgb


def _encoded(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _close(pixel, expected, tol=3) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def test_16_bit_grayscale_png_is_scaled_not_clipped_to_white():
    levels = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    data = _encoded(Image.fromarray(levels), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # PIL really reads it as 16-bit
    got = np.asarray(decode_rgb(data))
    assert got.shape == (4, 4, 3)
    assert got[0, :, 0].tolist() == [0, 64, 128, 255]  # v / 257, rounded


def test_16_bit_rgb_png_keeps_its_colours():
    bgr = np.zeros((4, 4, 3), dtype=np.uint16)
    bgr[..., 2] = 65535  # red, in OpenCV's channel order
    bgr[..., 1] = 32896  # half green
    ok, png = cv2.imencode(".png", bgr)
    assert ok
    assert _close(np.asarray(decode_rgb(png.tobytes()))[0, 0], (255, 128, 0), tol=1)


def test_exif_rotated_jpeg_comes_out_upright():
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red, right half blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    got = decode_rgb(_encoded(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert got.size == (20, 40)  # portrait, as displayed
    assert _close(got.getpixel((10, 5)), (255, 0, 0), tol=30)  # the stored left side is on top
    assert _close(got.getpixel((10, 35)), (0, 0, 255), tol=30)


def test_cmyk_jpeg_is_converted():
    got = decode_rgb(_encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))  # red in CMYK
    assert got.mode == "RGB" and _close(got.getpixel((4, 4)), (255, 0, 0), tol=8)


def test_palette_png_with_a_transparent_colour_is_composited_on_white():
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)  # 0: black, 1: green
    img.paste(0, (0, 0, 4, 8))  # left half palette index 0, made transparent below
    got = decode_rgb(_encoded(img, "PNG", transparency=0))
    assert got.getpixel((1, 1)) == (255, 255, 255) and got.getpixel((6, 1)) == (0, 255, 0)


@pytest.mark.parametrize("mode, transparent, opaque", [
    ("RGBA", (255, 0, 0, 0), (255, 0, 0, 255)),
    ("LA", (0, 0), (0, 255)),
])
def test_alpha_is_composited_on_white(mode, transparent, opaque):
    img = Image.new(mode, (8, 8), opaque)
    img.paste(transparent, (0, 0, 4, 8))
    half = {"RGBA": (255, 0, 0, 128)}.get(mode, (0, 128))
    img.paste(half, (4, 0, 8, 1))
    got = decode_rgb(_encoded(img, "PNG"))
    solid = (255, 0, 0) if mode == "RGBA" else (0, 0, 0)
    assert got.getpixel((1, 4)) == (255, 255, 255)  # fully transparent: the white background
    assert got.getpixel((6, 4)) == solid
    assert _close(got.getpixel((6, 0)), (255, 127, 127) if mode == "RGBA" else (127, 127, 127), tol=1)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height, and a tiny IDAT: a bomb's header costs nothing."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_too_many_pixels_is_refused_on_the_header():
    with pytest.raises(TooManyPixels, match="9000x9000 = 81000000 pixels > max_image_pixels 80000000"):
        decode_rgb(_png_header_only(9000, 9000), max_pixels=80_000_000)
    with pytest.raises(TooManyPixels, match="400000000 pixels"):  # over PIL's own bomb limit, whatever max_pixels
        decode_rgb(_png_header_only(20000, 20000), max_pixels=10**9)
    with pytest.raises(TooManyPixels, match="max_image_pixels 99"):
        decode_rgb(_encoded(Image.new("RGB", (10, 10)), "PNG"), max_pixels=99)
    assert decode_rgb(_encoded(Image.new("RGB", (10, 10)), "PNG"), max_pixels=100).size == (10, 10)
