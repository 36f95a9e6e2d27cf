"""Checksums used end to end: crc32c (Castagnoli), hardware accelerated by the ``crc32c`` package."""

from __future__ import annotations

import crc32c as _crc32c

__all__ = ["crc32c"]


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """Return the crc32c of ``data``, continuing from ``value``."""
    return _crc32c.crc32c(data, value)
