"""Core types shared by every layer: errors and checksums. Depends on nothing else in nearstore."""

from nearstore.core.checksum import crc32c
from nearstore.core.errors import *  # noqa: F401,F403
from nearstore.core.errors import __all__ as _errors_all

__all__ = ["crc32c", *_errors_all]
