"""Image intake: check limits, strip metadata, hash.

Every image that enters the lake goes through :func:`normalise_image`, so the lake never holds
EXIF (GPS, camera serials), XMP, ICC profiles or comments, and the same picture always gets the
same content address, whatever metadata the client sent with it.

JPEG and PNG, which is what apps upload, are cleaned **without decoding a pixel**: the file is
rewritten segment by segment (JPEG) or chunk by chunk (PNG), keeping only what the decoder needs,
so the model server and the lake see exactly the pixels the user sent, at a tenth of a
millisecond instead of the ~7 ms a decode, rotate and re-encode costs (bench/gateway_overhead.py).
A JPEG's EXIF orientation is the one fact kept, as a minimal EXIF block holding that tag alone:
rotating pixels would need a decode and a lossy re-encode, and every reader applies it (vLLM's
image loader, :func:`open_image`, browsers in Label Studio). Other formats, and a PNG whose
orientation says to rotate, are decoded and re-encoded as before (PNG out, orientation applied).
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

IMAGES_PREFIX = "raw/images"  # content-addressed product photos in the lake

EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """The bytes are not an image vloop accepts (corrupt, unsupported, empty)."""


class ImageTooLarge(ImageError):
    """The image is over the byte or pixel limit (HTTP 413 at the gateway)."""


@dataclass(frozen=True)
class NormalisedImage:
    data: bytes  # metadata-free (a JPEG may keep its orientation tag, nothing else)
    sha256: str  # of ``data``: the content address
    ext: str  # "jpg" or "png"
    width: int  # as displayed, i.e. with the orientation applied
    height: int
    orientation: int = 1  # EXIF orientation (1: as stored) still carried by a JPEG's ``data``

    @property
    def content_type(self) -> str:
        return "image/jpeg" if self.ext == "jpg" else "image/png"


def _check_size(data: bytes, max_bytes: int) -> None:
    if not data:
        raise ImageError("image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image is {len(data):,} bytes, over the limit of {max_bytes:,} bytes")


def _check_pixels(w: int, h: int, max_pixels: int) -> None:
    if w <= 0 or h <= 0:
        raise ImageError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:  # checked from the header, before anyone decodes a possible bomb
        raise ImageTooLarge(f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")


def open_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode ``data`` within the limits, with the EXIF orientation applied; ``ImageError`` if not.

    The returned image's ``format`` attribute is cleared by the transpose, so the source
    format is kept in ``info["source_format"]``.
    """
    _check_size(data, max_bytes)
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not a readable image (unknown or corrupt format)") from None
    if img.format not in ACCEPTED_FORMATS:
        raise ImageError(f"image format {img.format} is not accepted; use one of {', '.join(ACCEPTED_FORMATS)}")
    _check_pixels(*img.size, max_pixels)
    source_format = img.format
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image data is corrupt or truncated: {e}") from None
    img.info["source_format"] = source_format
    return img


def normalise_image(data: bytes, *, max_bytes: int, max_pixels: int) -> NormalisedImage:
    """Validate ``data`` and return it without metadata (see the module docstring for how)."""
    _check_size(data, max_bytes)
    if data[:3] == b"\xff\xd8\xff":
        return _finish(*_strip_jpeg(data, max_pixels), "jpg")
    if data[:8] == _PNG_SIGNATURE:
        stripped = _strip_png(data, max_pixels)
        if stripped is not None:
            return _finish(*stripped, "png")
    return _reencode(data, max_bytes=max_bytes, max_pixels=max_pixels)


def _finish(data: bytes, w: int, h: int, orientation: int, ext: str) -> NormalisedImage:
    if orientation in (5, 6, 7, 8):  # a quarter turn: displayed sideways
        w, h = h, w
    return NormalisedImage(data, hashlib.sha256(data).hexdigest(), ext, w, h, orientation)


def _reencode(data: bytes, *, max_bytes: int, max_pixels: int) -> NormalisedImage:
    """The slow path: decode, apply the orientation, re-encode from raw pixels (JPEG stays JPEG at
    quality 95, everything else becomes PNG)."""
    img = open_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    source_format = img.info["source_format"]
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    clean = img.convert("RGBA" if has_alpha else "RGB")
    # A fresh image from raw pixels carries no info dict: no EXIF, XMP, ICC or comments.
    clean = Image.frombytes(clean.mode, clean.size, clean.tobytes())
    out = io.BytesIO()
    if source_format == "JPEG" and not has_alpha:
        clean.save(out, format="JPEG", quality=95, optimize=False)
        ext = "jpg"
    else:
        clean.save(out, format="PNG", optimize=False)
        ext = "png"
    encoded = out.getvalue()
    return NormalisedImage(encoded, hashlib.sha256(encoded).hexdigest(), ext, clean.width, clean.height)


# -- JPEG: keep the segments a decoder needs ---------------------------------------------------------

# Markers kept: 0xC0-0xCF (the frame headers SOFn, and the Huffman/arithmetic tables DHT and DAC
# that share the range), DQT, DNL, DRI and SOS. APP0 is kept only as JFIF (its JFXX form carries a thumbnail) and APP14 only as Adobe (it
# says how to read the colour channels). Every other APPn (EXIF, XMP, ICC, MPF, maker notes) and
# COM go, and so does anything after EOI (phones append depth maps and second pictures there).
_KEEP = frozenset(range(0xC0, 0xD0)) | {0xDB, 0xDD, 0xDC, 0xDA}
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# The end of entropy-coded data: 0xFF followed by a marker byte (not stuffing 00, not RSTn, not fill).
_SCAN_END = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")


def _strip_jpeg(data: bytes, max_pixels: int) -> tuple[bytes, int, int, int]:
    """(clean JPEG, width, height, orientation) of a JPEG, its structure checked on the way."""
    out = [b"\xff\xd8"]
    pos, n, size, orientation, scans, seen_exif = 2, len(data), None, 1, 0, False

    def corrupt(why: str) -> ImageError:
        return ImageError(f"image data is corrupt or truncated: JPEG {why}")

    while True:
        while pos < n and data[pos] == 0xFF and pos + 1 < n and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos + 1 >= n:
            raise corrupt("ends without an end-of-image marker")
        if data[pos] != 0xFF:
            raise corrupt(f"has no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI
            break
        if pos + 4 > n:
            raise corrupt("ends inside a segment header")
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if length < 2 or end > n:
            raise corrupt(f"segment 0x{marker:02X} at byte {pos} runs past the end")
        body = data[pos + 4:end]
        if marker in _SOF:
            if length < 8:
                raise corrupt("frame header is too short")
            h, w = struct.unpack_from(">HH", body, 1)
            _check_pixels(w, h, max_pixels)
            size = (w, h)
        if marker == 0xE1 and body.startswith(b"Exif\x00\x00") and not seen_exif:  # decoders read the first
            orientation, seen_exif = _exif_orientation(body[6:]), True
        keep = (marker in _KEEP or (marker == 0xE0 and body.startswith(b"JFIF\x00"))
                or (marker == 0xEE and body.startswith(b"Adobe")))
        if keep:
            out.append(data[pos:end])
        pos = end
        if marker == 0xDA:  # the entropy-coded scan follows, up to the next marker
            if size is None:
                raise corrupt("scan comes before the frame header")
            scans += 1
            m = _SCAN_END.search(data, pos)
            if m is None:
                raise corrupt("scan runs to the end of the data")
            out.append(data[pos:m.start()])
            pos = m.start()
    if scans == 0:
        raise corrupt("has no image scan")
    out.append(b"\xff\xd9")
    if orientation != 1:  # the one tag kept, after SOI and the JFIF header where there is one
        out.insert(2 if len(out) > 1 and out[1].startswith(b"\xff\xe0") else 1, _orientation_segment(orientation))
    clean = b"".join(out)
    return (data if clean == data else clean), size[0], size[1], orientation


def _exif_orientation(tiff: bytes) -> int:
    """The orientation tag (1-8) of IFD0 in an EXIF block; 1 when absent or unreadable."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for i in range(count):
            tag, typ, _, value = struct.unpack_from(order + "HHI4s", tiff, ifd + 2 + 12 * i)
            if tag == EXIF_ORIENTATION and typ == 3:  # SHORT, inline
                (v,) = struct.unpack_from(order + "H", value)
                return v if 1 <= v <= 8 else 1
    except struct.error:
        return 1
    return 1


def _orientation_segment(orientation: int) -> bytes:
    """An APP1 EXIF segment holding the orientation tag and nothing else."""
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) \
        + struct.pack(">HHIH2x", EXIF_ORIENTATION, 3, 1, orientation) + struct.pack(">I", 0)
    body = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


# -- PNG: keep the critical chunks ----------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR, PLTE, IDAT, IEND are the image; tRNS says which pixels are transparent. Text, time, ICC,
# eXIf, physical size and animation chunks go (an animated PNG keeps its first frame, its IDAT).
_PNG_KEEP = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})


def _strip_png(data: bytes, max_pixels: int) -> tuple[bytes, int, int, int] | None:
    """(clean PNG, width, height, 1), or None when its eXIf says to rotate (the slow path does)."""
    out, pos, n, size = [_PNG_SIGNATURE], 8, len(data), None
    while True:
        if pos + 8 > n:
            raise ImageError("image data is corrupt or truncated: PNG ends without an IEND chunk")
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > n:
            raise ImageError(f"image data is corrupt or truncated: PNG chunk {kind!r} runs past the end")
        if size is None:
            if kind != b"IHDR" or length < 8:
                raise ImageError("image data is corrupt or truncated: PNG does not start with IHDR")
            size = struct.unpack_from(">II", data, pos + 8)
            _check_pixels(*size, max_pixels)
        if kind == b"eXIf" and _exif_orientation(data[pos + 8:pos + 8 + length]) != 1:
            return None
        if kind in _PNG_KEEP:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break
    clean = b"".join(out)
    return (data if clean == data else clean), size[0], size[1], 1


def image_key(sha256: str, ext: str) -> str:
    """The lake key of a content-addressed image (DESIGN.md: raw/images/<sha256[:2]>/<sha256>.<ext>)."""
    return f"{IMAGES_PREFIX}/{sha256[:2]}/{sha256}.{ext}"
