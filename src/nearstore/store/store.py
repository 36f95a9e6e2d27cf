"""Opening a store and reading samples by global id, verified end to end."""

from __future__ import annotations

import bisect
import re
import threading
from pathlib import Path

import numpy as np

from nearstore.core.errors import ChecksumError, StoreError
from nearstore.store.format import ShardReader
from nearstore.store.manifest import Manifest, node_dir_name

__all__ = ["Store", "SampleRef", "contained"]


def contained(base: Path, *paths: Path) -> None:
    """Refuse to read a file that resolves (symlinks, '..') outside the node directory ``base``.

    Shard names are checked when a manifest loads; this also stops a symlink planted in a node
    directory from making a node serve a file elsewhere on its host.
    """
    root = base.resolve()
    for p in paths:
        real = p.resolve()
        if not real.is_relative_to(root):
            raise StoreError(f"{p} resolves to {real}, outside its node directory {root}: refused (a symlink or "
                             "'..' in the store); replace it with the real file")


class SampleRef:
    """Where a global sample id lives."""

    __slots__ = ("shard", "local", "key", "label")

    def __init__(self, shard: str, local: int, key: str, label: int) -> None:
        self.shard, self.local, self.key, self.label = shard, local, key, label


class Store:
    """A read-only view of a store directory (all its node directories).

    Shard readers open lazily and are shared by threads. ``nodes`` restricts
    reading to those node directories (used by a node server that owns one).
    A sample whose bytes fail their crc32c is read from another replica when
    the store can see one (``repaired`` counts those); when no copy is good
    the ChecksumError names the shard, the key and every copy tried.
    """

    def __init__(self, path: str | Path, *, nodes: list[int] | None = None) -> None:
        self.path = Path(path)
        self.manifest = Manifest.load(self.path)
        self._firsts = [s.first for s in self.manifest.shards]
        self._readers: dict[int, ShardReader] = {}
        self._lock = threading.Lock()
        self._nodes = set(nodes) if nodes is not None else None
        self._node_local = False
        self._alternates: dict[tuple[int, int], ShardReader] = {}
        self.repaired = 0

    @classmethod
    def node(cls, node_dir: str | Path) -> "Store":
        """The part of a store held by one node directory (``.../node-XXX``), read on its own."""
        node_dir = Path(node_dir)
        m = re.fullmatch(r"node-(\d+)", node_dir.name)
        if m is None:
            raise StoreError(f"{node_dir} is not a node directory (expected a name like node-000 inside a store)")
        st = cls(node_dir, nodes=[int(m.group(1))])
        st._node_local = True
        return st

    def reload_manifest(self) -> bool:
        """Take the manifest on disk if it changed and describes the same dataset (a rebalance moved
        shards); returns whether it changed. Open shard readers stay valid: shard files never change."""
        try:
            man = Manifest.load(self.path)
        except StoreError:
            return False  # mid-write or removed: keep the one we have
        if man.fingerprint != self.manifest.fingerprint or man == self.manifest:
            return False
        self.manifest = man
        return True

    @property
    def node_id(self) -> int | None:
        return next(iter(self._nodes)) if self._node_local and self._nodes else None

    def holds(self, shard: int) -> bool:
        return self._nodes is None or any(n in self._nodes for n in self.manifest.shards[shard].nodes)

    def __len__(self) -> int:
        return self.manifest.num_samples

    def locate(self, sample: int) -> tuple[int, int]:
        if not 0 <= sample < len(self):
            raise IndexError(f"sample id {sample} out of range 0..{len(self) - 1}")
        s = bisect.bisect_right(self._firsts, sample) - 1
        return s, sample - self._firsts[s]

    def reader(self, shard: int) -> ShardReader:
        r = self._readers.get(shard)
        if r is None:
            with self._lock:
                r = self._readers.get(shard)
                if r is None:
                    r = self._open(shard)
                    self._readers[shard] = r
        return r

    def _open(self, shard: int) -> ShardReader:
        entry = self.manifest.shards[shard]
        candidates = [n for n in entry.nodes if self._nodes is None or n in self._nodes]
        if self._node_local and self._nodes:
            # a node reads whatever copy its directory has: a rebalance may have moved the shard here after
            # this manifest was read (the node server checks placement against its current manifest)
            candidates = list(self._nodes)
        if not candidates:
            raise StoreError(f"shard {entry.name} is not held by nodes {sorted(self._nodes or [])}")
        errors: list[StoreError] = []
        for n in candidates:
            base = self.path if self._node_local else self.path / node_dir_name(n)
            path = base / f"{entry.name}.tar"
            try:
                contained(base, path, path.with_name(f"{entry.name}.idx.arrow"))
                return ShardReader(path, shard=entry.name, index_crc32c=entry.index_crc32c)
            except StoreError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise type(errors[0])(f"no replica of shard {entry.name} is readable: " + "; ".join(map(str, errors)))

    def ref(self, sample: int) -> SampleRef:
        s, i = self.locate(sample)
        r = self.reader(s)
        return SampleRef(self.manifest.shards[s].name, i, r.index.keys[i], int(r.index.label[i]))

    def read(self, sample: int) -> tuple[memoryview, SampleRef]:
        s, i = self.locate(sample)
        r = self.reader(s)
        ref = SampleRef(self.manifest.shards[s].name, i, r.index.keys[i], int(r.index.label[i]))
        try:
            return r.read(i), ref
        except ChecksumError as first:
            if r.replaced():  # repaired since it was opened (scrub --repair renames a good copy over it)
                fresh = self._reopen(s, r)
                try:
                    return fresh.read(i), ref
                except ChecksumError as again:
                    return self._read_replica(s, i, fresh, again), ref
            return self._read_replica(s, i, r, first), ref

    def _reopen(self, shard: int, old: ShardReader) -> ShardReader:
        """Open ``shard`` again; the old reader stays valid for samples already handed out."""
        with self._lock:
            if self._readers.get(shard) is old:
                del self._readers[shard]
        return self.reader(shard)

    def _read_replica(self, shard: int, i: int, bad: ShardReader, first: ChecksumError) -> memoryview:
        entry = self.manifest.shards[shard]
        errors = [str(first)]
        for n in entry.nodes:
            if self._node_local or (self._nodes is not None and n not in self._nodes):
                continue
            path = self.path / node_dir_name(n) / f"{entry.name}.tar"
            if path == bad.tar_path:
                continue
            try:
                contained(path.parent, path, path.with_name(f"{entry.name}.idx.arrow"))
                with self._lock:
                    alt = self._alternates.get((shard, n))
                    if alt is None:
                        alt = self._alternates[(shard, n)] = ShardReader(path, shard=entry.name,
                                                                       index_crc32c=entry.index_crc32c)
                data = alt.read(i)
            except StoreError as exc:
                errors.append(f"{node_dir_name(n)}: {exc}")
                continue
            with self._lock:
                self.repaired += 1
            return data
        if len(errors) == 1:
            raise first
        raise ChecksumError(f"shard {entry.name}, key {bad.index.keys[i]}: no good copy on nodes {entry.nodes}: "
                            + " | ".join(errors))

    def labels(self) -> np.ndarray:
        return np.concatenate([self.reader(s).index.label for s in range(len(self.manifest.shards))])

    def close(self) -> None:
        for r in [*self._readers.values(), *self._alternates.values()]:
            r.close()
        self._readers.clear()
        self._alternates.clear()
