"""JPEG codec binding: header parsing and region + DCT-scaled decoding (libjpeg-turbo, C extension)."""

from __future__ import annotations

import numpy as np

from nearstore.ops import _jpeg

__all__ = ["JpegError", "header", "decode_region", "scaled_size"]

JpegError = _jpeg.DecodeError


def header(data: bytes) -> tuple[int, int]:
    """(width, height) of a JPEG from its header; raises JpegError if it is not one."""
    return _jpeg.header(data)


def scaled_size(width: int, height: int, scale_num: int) -> tuple[int, int]:
    """Output size of libjpeg-turbo's DCT scaling by scale_num/8 (rounded up)."""
    return -(-width * scale_num // 8), -(-height * scale_num // 8)


def decode_region(data: bytes, scale_num: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Decode the region (x, y, w, h) of the image scaled by scale_num/8, as an HxWx3 uint8 array.

    Rows outside the region are skipped and columns outside it are not
    reconstructed (jpeg_skip_scanlines / jpeg_crop_scanline).
    """
    buf, out_w, out_h, skip = _jpeg.decode_region(data, scale_num, x, y, w, h)
    arr = np.frombuffer(buf, np.uint8).reshape(out_h, out_w, 3)
    return arr[:, skip : skip + w] if (skip or out_w != w) else arr
