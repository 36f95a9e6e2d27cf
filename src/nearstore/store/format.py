"""On-disk format of one shard: a WebDataset tar plus an Arrow index.

A shard ``NAME.tar`` holds members ``KEY.jpg`` and ``KEY.cls`` (label as ASCII
digits), so the ``webdataset`` package reads it as is. Beside it,
``NAME.idx.arrow`` (Arrow IPC) lists per sample: key, label, byte offset and
size of the image payload inside the tar, its crc32c, and the image width and
height (read from the JPEG header at ingest, so planners know decoded sizes
without decoding). Files are written to a temp name, fsynced, then renamed.
"""

from __future__ import annotations

import io
import mmap
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from nearstore.core.checksum import crc32c
from nearstore.core.errors import ChecksumError, StoreFormatError

__all__ = ["INDEX_SCHEMA", "ShardIndex", "ShardWriter", "ShardReader", "atomic_write_bytes", "fsync_dir"]

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("label", pa.int32()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("crc32c", pa.uint32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class ShardIndex:
    """Columns of a shard index as numpy arrays (plus keys as a list)."""

    keys: list[str]
    label: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    crc: np.ndarray
    width: np.ndarray
    height: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def load(cls, path: Path, *, tar_size: int | None = None, expected_crc: int | None = None) -> "ShardIndex":
        """Read an index; ``expected_crc`` (the manifest's) is checked before anything is parsed."""
        if not path.exists():
            raise StoreFormatError(
                f"missing shard index {path}: the store is incomplete; re-run `nearstore ingest` "
                "or restore the file from a replica"
            )
        raw = path.read_bytes()
        if expected_crc is not None and crc32c(raw) != expected_crc:
            raise ChecksumError(f"shard index {path}: crc32c {crc32c(raw):08x} does not match the manifest's "
                                f"{expected_crc:08x}; the file is corrupt. Restore it from a replica or re-run "
                                "`nearstore ingest`")
        try:
            table = ipc.open_file(pa.BufferReader(raw)).read_all()
            if table.schema.equals(INDEX_SCHEMA):
                table.validate(full=True)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise StoreFormatError(f"unreadable shard index {path}: {exc}; re-run `nearstore ingest`") from None
        if not table.schema.equals(INDEX_SCHEMA):
            raise StoreFormatError(f"shard index {path} has schema {table.schema}, expected {INDEX_SCHEMA}")
        idx = cls(
            keys=table.column("key").to_pylist(),
            label=table.column("label").to_numpy(),
            offset=table.column("offset").to_numpy(),
            size=table.column("size").to_numpy(),
            crc=table.column("crc32c").to_numpy(),
            width=table.column("width").to_numpy(),
            height=table.column("height").to_numpy(),
        )
        if tar_size is not None and len(idx) and int((idx.offset + idx.size).max()) > tar_size:
            raise StoreFormatError(
                f"shard index {path} points past the end of its tar ({tar_size} bytes): the tar is truncated; "
                "restore it from a replica or re-run `nearstore ingest`"
            )
        return idx


class ShardWriter:
    """Writes one shard (tar + index) under temp names; ``commit()`` makes it visible."""

    def __init__(self, tar_path: Path) -> None:
        self.tar_path = tar_path
        self.idx_path = tar_path.with_name(tar_path.name[: -len(".tar")] + ".idx.arrow")
        self._tmp_tar = tar_path.with_name(tar_path.name + ".tmp")
        self._file = open(self._tmp_tar, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._rows: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}

    def add(self, key: str, payload: bytes, label: int, width: int, height: int, *, ext: str = "jpg") -> None:
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(payload)
        info.mtime = 0
        self._tar.addfile(info, io.BytesIO(payload))
        data_offset = self._tar.offset - (-(-len(payload) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
        cls_bytes = str(int(label)).encode()
        cinfo = tarfile.TarInfo(f"{key}.cls")
        cinfo.size = len(cls_bytes)
        cinfo.mtime = 0
        self._tar.addfile(cinfo, io.BytesIO(cls_bytes))
        for name, value in zip(
            INDEX_SCHEMA.names,
            (key, int(label), data_offset, len(payload), crc32c(payload), int(width), int(height)),
        ):
            self._rows[name].append(value)

    def __len__(self) -> int:
        return len(self._rows["key"])

    @property
    def bytes_written(self) -> int:
        return self._file.tell()

    def commit(self) -> dict:
        """Close, fsync and rename tar then index; return the shard's manifest entry."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp_tar, self.tar_path)
        table = pa.Table.from_pydict(self._rows, schema=INDEX_SCHEMA)
        sink = pa.BufferOutputStream()
        with ipc.new_file(sink, INDEX_SCHEMA) as w:
            w.write_table(table)
        idx_bytes = sink.getvalue().to_pybytes()
        atomic_write_bytes(self.idx_path, idx_bytes)
        return {
            "samples": len(self),
            "tar_bytes": self.tar_path.stat().st_size,
            "payload_bytes": int(sum(self._rows["size"])),
            "index_crc32c": crc32c(idx_bytes),
        }

    def abort(self) -> None:
        try:
            self._tar.close()
            self._file.close()
        finally:
            self._tmp_tar.unlink(missing_ok=True)


class ShardReader:
    """Random access to the samples of one shard, each verified against its crc32c.

    The tar is memory-mapped read-only: a sample is a zero-copy ``memoryview``
    of the page cache (no allocation, no copy), checked before it is returned.
    Stores never rewrite a shard in place (each ingest writes new files), so a
    mapping stays valid for the reader's life.
    """

    def __init__(self, tar_path: Path, *, shard: str, index_crc32c: int | None = None) -> None:
        self._map: mmap.mmap | None = None
        self.shard = shard
        self.tar_path = tar_path
        if not tar_path.exists():
            raise StoreFormatError(
                f"shard {shard}: missing file {tar_path}; the manifest points at a shard that is not on disk. "
                "Restore it from a replica or re-run `nearstore ingest`"
            )
        fd = os.open(tar_path, os.O_RDONLY)
        try:
            stat = os.fstat(fd)
            size = stat.st_size
            self._identity = (stat.st_dev, stat.st_ino)
            self.index = ShardIndex.load(tar_path.with_name(tar_path.name[: -len(".tar")] + ".idx.arrow"),
                                         tar_size=size, expected_crc=index_crc32c)
            self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else None
        finally:
            os.close(fd)
        self._view = memoryview(self._map) if self._map is not None else memoryview(b"")

    def replaced(self) -> bool:
        """Whether the file at ``tar_path`` is no longer the one mapped (a repair or rebalance renamed a new
        file over it): the caller should open it again."""
        try:
            stat = os.stat(self.tar_path)
        except OSError:
            return False
        return (stat.st_dev, stat.st_ino) != self._identity

    def read(self, i: int) -> memoryview:
        """Bytes of sample ``i``; raises ChecksumError (naming shard and key) on mismatch."""
        off, size = int(self.index.offset[i]), int(self.index.size[i])
        data = self._view[off : off + size]
        if len(data) != size:
            raise StoreFormatError(
                f"shard {self.shard}, key {self.index.keys[i]}: short read ({len(data)} of {size} bytes); "
                "the tar is truncated"
            )
        if crc32c(data) != int(self.index.crc[i]):
            raise ChecksumError(
                f"shard {self.shard}, key {self.index.keys[i]}: crc32c mismatch (stored "
                f"{int(self.index.crc[i]):08x}, read {crc32c(data):08x}); the bytes on disk are corrupt. "
                "Restore the shard from a replica or re-run `nearstore ingest`"
            )
        return data

    def close(self) -> None:
        if self._map is not None:
            try:
                self._view.release()
                self._map.close()
            except BufferError:  # samples handed out still view the mapping; it closes when they go
                pass
            self._map = None

    def __del__(self) -> None:
        self.close()
