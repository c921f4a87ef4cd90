"""Image intake without a decode: JPEG and PNG metadata is removed by rewriting the file's
segments/chunks, so the pixels a reader decodes are exactly the user's, and nothing else of the
file (EXIF, GPS, XMP, ICC, comments, appended pictures) survives but a JPEG's orientation."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageOps, PngImagePlugin

from vloop.store.images import ImageError, ImageTooLarge, normalise_image, open_image

LIMITS = {"max_bytes": 2**24, "max_pixels": 2**24}


def photo(w=96, h=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85, **kw)
    return out.getvalue()


def app_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def with_segments(data: bytes, *segments: bytes, trailer: bytes = b"") -> bytes:
    """``data`` (a JPEG) with ``segments`` inserted right after SOI and ``trailer`` after EOI."""
    return data[:2] + b"".join(segments) + data[2:] + trailer


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def private_exif(orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    exif[0xA431] = "SERIAL-12345"  # BodySerialNumber
    exif[0x8825] = {2: (51.0, 30.0, 0.0), 4: (0.0, 7.0, 0.0)}  # GPS latitude/longitude
    if orientation:
        exif[0x0112] = orientation
    return exif.tobytes()


SECRETS = (b"SecretCam", b"SERIAL-12345", b"secret-xmp", b"secret comment", b"secret-icc", b"secret-trailer")


def dirty_jpeg(img: Image.Image, orientation: int | None = None, **kw) -> bytes:
    """A phone-like JPEG: EXIF with GPS and serials, XMP, an ICC profile, a comment, and a
    second picture appended after the end of the image (as phones do for depth maps)."""
    clean = jpeg(img, **kw)
    return with_segments(
        clean,
        app_segment(0xE1, private_exif(orientation)),
        app_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta>secret-xmp</x:xmpmeta>"),
        app_segment(0xE2, b"ICC_PROFILE\x00\x01\x01secret-icc"),
        app_segment(0xFE, b"secret comment"),
        trailer=clean[:200] + b"secret-trailer")


@pytest.mark.parametrize("kw", [{}, {"progressive": True}, {"restart_marker_blocks": 1}, {"subsampling": 0}],
                         ids=["baseline", "progressive", "restart-markers", "444"])
def test_jpeg_metadata_goes_and_the_pixels_stay_exactly(kw):
    img = photo()
    data = dirty_jpeg(img, **kw)
    assert all(s in data for s in SECRETS)
    out = normalise_image(data, **LIMITS)
    assert not any(s in out.data for s in SECRETS)
    assert b"Exif" not in out.data and b"ICC_PROFILE" not in out.data
    assert out.data.endswith(b"\xff\xd9") and out.data.count(b"\xff\xd9") >= 1
    assert np.array_equal(pixels(out.data), pixels(jpeg(img, **kw)))  # not one pixel changed
    assert (out.ext, out.width, out.height, out.orientation) == ("jpg", 96, 64, 1)
    # The same picture with or without metadata gets one content address.
    assert normalise_image(jpeg(img, **kw), **LIMITS).sha256 == out.sha256


@pytest.mark.parametrize("orientation, size", [(3, (96, 64)), (6, (64, 96)), (8, (64, 96))])
def test_jpeg_orientation_is_the_one_tag_kept(orientation, size):
    img = photo()
    out = normalise_image(dirty_jpeg(img, orientation), **LIMITS)
    assert not any(s in out.data for s in SECRETS)
    tags = dict(Image.open(io.BytesIO(out.data)).getexif())
    assert tags == {0x0112: orientation}
    assert (out.width, out.height, out.orientation) == (*size, orientation)
    # Every reader applies it: what open_image gives is the user's picture as they saw it.
    seen = np.asarray(open_image(out.data, **LIMITS).convert("RGB"))
    expected = pixels(with_segments(jpeg(img), app_segment(0xE1, private_exif(orientation))))
    assert seen.shape[:2] == (size[1], size[0]) and np.array_equal(seen, expected)


def test_a_clean_jpeg_passes_through_byte_for_byte():
    data = jpeg(photo())
    assert normalise_image(data, **LIMITS).data is data


def test_cmyk_jpeg_keeps_its_adobe_segment():
    cmyk = photo().convert("CMYK")
    data = with_segments(jpeg(cmyk), app_segment(0xFE, b"secret comment"))
    out = normalise_image(data, **LIMITS)
    assert b"secret comment" not in out.data and b"Adobe" in out.data
    assert np.array_equal(pixels(out.data), pixels(jpeg(cmyk)))


@pytest.mark.parametrize("cut, message", [
    (lambda d: d[:len(d) // 2], "corrupt or truncated"),
    (lambda d: d[:-2], "scan runs to the end"),
    (lambda d: d[:20], "end-of-image"),  # SOI and the APP0 segment, then nothing
    (lambda d: d[:2] + b"\xff\xdb\xff\xff", "runs past the end"),
    (lambda d: d[:20] + b"\x00\x00\x00", "no marker"),
])
def test_broken_jpegs_get_clear_errors(cut, message):
    with pytest.raises(ImageError, match=message):
        normalise_image(cut(jpeg(photo())), **LIMITS)


def test_jpeg_pixel_limit_is_checked_from_the_header():
    data = bytearray(jpeg(photo()))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 40000, 40000)  # a "bomb": claims 1.6 gigapixels
    with pytest.raises(ImageTooLarge, match="pixels, over the limit"):
        normalise_image(bytes(data), **LIMITS)


def png_bytes(img: Image.Image, info: PngImagePlugin.PngInfo | None = None, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG", pnginfo=info, **kw)
    return out.getvalue()


def test_png_text_and_exif_chunks_go_and_the_pixels_stay():
    img = photo().convert("RGBA")
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "SecretCam")
    info.add_itxt("Comment", "secret comment", zip=True)
    data = png_bytes(img, info, exif=private_exif(1))
    out = normalise_image(data, **LIMITS)
    assert b"SecretCam" not in out.data and b"tEXt" not in out.data and b"eXIf" not in out.data
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(out.data))), np.asarray(img))
    assert (out.ext, out.width, out.height) == ("png", 96, 64)
    assert out.sha256 == normalise_image(png_bytes(img), **LIMITS).sha256


def test_png_that_says_rotate_is_decoded_and_rotated():
    img = photo()
    out = normalise_image(png_bytes(img, exif=private_exif(6)), **LIMITS)
    assert b"SecretCam" not in out.data and (out.width, out.height, out.orientation) == (64, 96, 1)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(out.data))), np.asarray(img.transpose(Image.ROTATE_270)))


def test_truncated_png_is_refused():
    data = png_bytes(photo())
    with pytest.raises(ImageError, match="corrupt or truncated"):
        normalise_image(data[:-12], **LIMITS)  # IEND cut off
    broken = data[:8] + struct.pack(">I4s", 13, b"IDAT") + data[16:]
    with pytest.raises(ImageError, match="IHDR"):
        normalise_image(broken, **LIMITS)
