"""Image intake: decode, check limits, strip metadata, re-encode, hash.

Every image that enters the lake goes through :func:`normalise_image`, so the lake never holds
EXIF (GPS, camera serials) and the same picture always gets the same content address, whatever
metadata the client sent with it.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

IMAGES_PREFIX = "raw/images"  # content-addressed product photos in the lake


class ImageError(ValueError):
    """The bytes are not an image vloop accepts (corrupt, unsupported, empty)."""


class ImageTooLarge(ImageError):
    """The image is over the byte or pixel limit (HTTP 413 at the gateway)."""


@dataclass(frozen=True)
class NormalisedImage:
    data: bytes  # re-encoded, metadata-free
    sha256: str  # of ``data``: the content address
    ext: str  # "jpg" or "png"
    width: int
    height: int

    @property
    def content_type(self) -> str:
        return "image/jpeg" if self.ext == "jpg" else "image/png"


def open_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode ``data`` within the limits, with the EXIF orientation applied; ``ImageError`` if not.

    The returned image's ``format`` attribute is cleared by the transpose, so the source
    format is kept in ``info["source_format"]``.
    """
    if not data:
        raise ImageError("image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image is {len(data):,} bytes, over the limit of {max_bytes:,} bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not a readable image (unknown or corrupt format)") from None
    if img.format not in ACCEPTED_FORMATS:
        raise ImageError(f"image format {img.format} is not accepted; use one of {', '.join(ACCEPTED_FORMATS)}")
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:  # checked from the header, before decoding a possible bomb
        raise ImageTooLarge(f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
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
    """Validate ``data`` and return the image re-encoded without metadata.

    JPEG stays JPEG (quality 95); everything else becomes PNG. The EXIF orientation is applied
    before the EXIF is dropped, so the stored pixels look the way the user saw them.
    """
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


def image_key(sha256: str, ext: str) -> str:
    """The lake key of a content-addressed image (DESIGN.md: raw/images/<sha256[:2]>/<sha256>.<ext>)."""
    return f"{IMAGES_PREFIX}/{sha256[:2]}/{sha256}.{ext}"
