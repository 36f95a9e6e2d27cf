"""Checksums used end to end: crc32c (Castagnoli), hardware accelerated by ``google-crc32c`` (Apache-2.0).

The checksums are the standard CRC-32C (iSCSI, RFC 3720): the same values the
``crc32c`` package computed for stores written before the switch (tested with
the RFC's vectors and a store written by the old library).
"""

from __future__ import annotations

import numpy as np
from google_crc32c import _crc32c as _impl  # the C extension; its pure-Python fallback is ~1000x slower

__all__ = ["crc32c"]


def crc32c(data: bytes | bytearray | memoryview | np.ndarray, value: int = 0) -> int:
    """Return the crc32c of ``data`` (any contiguous buffer), continuing from ``value``."""
    if type(data) is not bytes and not isinstance(data, np.ndarray):
        # the extension takes only buffers without a release hook (bytes, numpy arrays): view others as an
        # array, zero-copy (memoryviews of mmapped shards, bytearrays)
        data = np.frombuffer(data, np.uint8)
    return _impl.extend(value, data) if value else _impl.value(data)
