"""JPEG codec binding: header parsing and region + DCT-scaled decoding (libjpeg-turbo, C extension)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from nearstore.ops import _jpeg

__all__ = ["JpegError", "header", "decode_region", "scaled_size", "to_jpeg", "CONVERT_QUALITY"]

JpegError = _jpeg.DecodeError

def header(data: bytes) -> tuple[int, int]:
    """(width, height) of a JPEG from its header; raises JpegError if it is not one."""
    return _jpeg.header(data)


def scaled_size(width: int, height: int, scale_num: int) -> tuple[int, int]:
    """Output size of libjpeg-turbo's DCT scaling by scale_num/8 (rounded up)."""
    return -(-width * scale_num // 8), -(-height * scale_num // 8)


#: pixels decoded around a region so chroma upsampling sees the same neighbours as a full decode
_MARGIN = 2


def decode_region(data: bytes, scale_num: int, x: int, y: int, w: int, h: int, *,
                  full: tuple[int, int] | None = None) -> np.ndarray:
    """Decode the region (x, y, w, h) of the image scaled by scale_num/8, as an HxWx3 uint8 array.

    Rows outside the region are skipped and columns outside it are not
    reconstructed (jpeg_skip_scanlines / jpeg_crop_scanline). A small margin
    is decoded around the region (``full`` is the scaled image size), so the
    pixels equal those of a full decode at the same scale. The array is
    C-contiguous.
    """
    if full is None:
        full = scaled_size(*header(data), scale_num)
    x0, y0 = max(0, x - _MARGIN), max(0, y - _MARGIN)
    x1, y1 = min(full[0], x + w + _MARGIN), min(full[1], y + h + _MARGIN)
    # the extension keeps only (x, y, w, h) of what it decodes: contiguous, no strided copy later
    buf, out_w, out_h, _ = _jpeg.decode_region(data, scale_num, x0, y0, x1 - x0, y1 - y0, False, x, y, w, h)
    return np.frombuffer(buf, np.uint8).reshape(out_h, out_w, 3)


CONVERT_QUALITY = 95


def to_jpeg(data: bytes) -> tuple[bytes, str]:
    """An image of another format (PNG, WebP, BMP, GIF, TIFF, ...) re-encoded as a JPEG; returns (jpeg, format).

    Used at ingest so every stored payload decodes on the one JPEG path: RGB (an alpha channel is
    dropped, palette and grayscale images are expanded), quality 95, 4:4:4 chroma (no subsampling);
    the first frame of an animation. Raises JpegError when Pillow cannot read it either.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or "unknown"
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise JpegError(f"neither a JPEG nor an image Pillow can read ({exc})") from None
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=CONVERT_QUALITY, subsampling=0)
    return out.getvalue(), fmt
