"""Exception types of nearstore.

Every error says what went wrong, where (shard, key, parameter, file) and how
to fix it. Each class subclasses the built-in exception it refines, so callers
that already catch ``ValueError`` or ``OSError`` keep working.
"""

from __future__ import annotations

__all__ = [
    "NearstoreError",
    "ConfigError",
    "OpParamError",
    "SourceError",
    "StoreError",
    "StoreFormatError",
    "ChecksumError",
    "SampleDecodeError",
    "ResumeStateError",
]


class NearstoreError(Exception):
    """Base class of every error raised by nearstore."""


class ConfigError(NearstoreError, ValueError):
    """A parameter has a value outside what is allowed; the message names it."""


class OpParamError(ConfigError):
    """An op was given an unknown name or a bad parameter."""


class SourceError(NearstoreError, ValueError):
    """An ingest source (folder or tar files) is missing, empty or unreadable."""


class StoreError(NearstoreError, OSError):
    """A store is missing, incomplete or inconsistent on disk."""


class StoreFormatError(StoreError):
    """A shard, index or manifest file is truncated or malformed."""


class ChecksumError(StoreError):
    """Bytes read back do not match their recorded crc32c: never delivered."""


class SampleDecodeError(NearstoreError, ValueError):
    """A sample could not be decoded (corrupt JPEG, bad label)."""


class ResumeStateError(ConfigError):
    """A state_dict does not fit the loader it is loaded into."""
