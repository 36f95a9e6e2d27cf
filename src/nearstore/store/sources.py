"""Where a loader's samples come from, with ops[0:k] already applied (the source contract).

``LocalSource`` reads a store's directories directly (k = 0: every op runs on
the host). The cluster source (``nearstore.node.client.ClusterSource``, node
servers over Arrow Flight) implements the same ``fetch`` so the loader does not
care where the prefix ran. The contract lives here, below both the loader and
the nodes, so neither imports the other to share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from nearstore.core.errors import NearstoreError, StoreError
from nearstore.store.manifest import Manifest
from nearstore.store.store import Store

__all__ = ["Fetched", "SampleSource", "LocalSource"]


@dataclass
class Fetched:
    """One sample as delivered by a source: data (or the error that stopped it)."""

    sample: int
    key: str
    label: int
    shard: str
    data: Any
    nbytes: int
    error: NearstoreError | None = None
    prefix: int | None = None  # how many pipeline ops were applied to ``data`` (None: the source's ``prefix``)


class SampleSource(Protocol):
    manifest: Manifest
    prefix: int  # how many pipeline ops the source applies unless a sample says otherwise (``Fetched.prefix``)

    def fetch(self, ids: np.ndarray, *, epoch: int, seed: int, into: np.ndarray | None = None) -> list[Fetched]:
        """``into``, when given, is the batch's output array (one slot per id): a source may write a sample
        that needs no more ops into its slot (``Fetched.data`` is then that slot), or ignore it."""
        ...

    def batches_per_fetch(self, batch_size: int) -> int:
        """How many consecutive batches the loader should ask for in one ``fetch`` (1: one at a time). A
        source whose every request has a fixed cost (a network call) asks for more where that cost matters."""
        ...

    def close(self) -> None: ...


class LocalSource:
    """Reads raw samples from a store on local disk, verifying crc32c."""

    prefix = 0

    def __init__(self, store: Store | str) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        self.manifest = self.store.manifest

    def fetch(self, ids: np.ndarray, *, epoch: int, seed: int = 0, into: np.ndarray | None = None) -> list[Fetched]:
        out: list[Fetched] = []
        for sid in ids.tolist():
            s, i = self.store.locate(sid)
            shard = self.manifest.shards[s].name
            try:
                data, ref = self.store.read(sid)  # a copy that fails its crc32c is read from a replica
            except StoreError as exc:
                try:  # only on failure: which key it was (the shard's index may itself be unreadable)
                    bad = self.store.ref(sid)
                    out.append(Fetched(sid, bad.key, bad.label, shard, None, 0, exc))
                except StoreError:
                    out.append(Fetched(sid, f"#{i}", -1, shard, None, 0, exc))
                continue
            out.append(Fetched(sid, ref.key, ref.label, shard, data, len(data)))
        return out

    def batches_per_fetch(self, batch_size: int) -> int:
        return 1  # a local read has no per-request cost to share

    def close(self) -> None:
        self.store.close()
