"""Reading a derived dataset instead of running the network: a loader source of stored outputs.

``Loader(source=DerivedSource(store, "emb", pipeline), pipeline=pipeline, ...)``
yields the network's outputs exactly as a loader running ``pipeline`` would
(same order, labels, keys, output shape and dtype), read from the derived
dataset's files on local disk (``store.derived``) instead of computed. The
pipeline must be what produced them: its ops before the network and the
network op's architecture, cut, weights, engine, dtype and int8 recipe versions give a
``Fingerprint``; one that differs from the stored fingerprint is refused with
every field that differs. ``derived_loader(store, name, pipeline, ...)`` builds
both in one call.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from nearstore.core.errors import ConfigError, SampleDecodeError, StoreError
from nearstore.loader.loader import Loader
from nearstore.store.sources import Fetched
from nearstore.nets import quant
from nearstore.nets.archs import weights_digest
from nearstore.ops.pipeline import Pipeline, input_spec_of
from nearstore.store.derived import DerivedMismatchError, Fingerprint, load_derived, outputs_of, read_shard_file
from nearstore.store.manifest import Manifest, node_dir_name

__all__ = ["DerivedSource", "DerivedMismatchError", "pipeline_fingerprint", "derived_loader"]


def pipeline_fingerprint(pipeline: Pipeline | list) -> Fingerprint:
    """The fingerprint of what a pipeline ending in a ``network`` op produces."""
    pipe = pipeline if isinstance(pipeline, Pipeline) else Pipeline(pipeline)
    ops = pipe.to_json()
    if not ops or ops[-1]["op"] != "network":
        raise ConfigError("a derived dataset holds a network's outputs: the pipeline must end in a 'network' op "
                          f"(it ends in {ops[-1]['op'] if ops else 'nothing'})")
    net = ops[-1]
    return Fingerprint(arch=net["arch"], cut=net["cut"], weights=weights_digest(net.get("weights"), net.get("seed", 0)),
                       engine=net["engine"], dtype=net["dtype"], pipeline=ops[:-1],
                       quant=quant.recipe(net["engine"], net["dtype"]))


class DerivedSource:
    """A loader source whose samples are a derived dataset's stored outputs (every op already applied)."""

    def __init__(self, store: str | Path, name: str, pipeline: Pipeline | list) -> None:
        self.store = Path(store)
        pipe = pipeline if isinstance(pipeline, Pipeline) else Pipeline(pipeline)
        self.manifest = Manifest.load(self.store)
        self.derived = load_derived(self.store, name)
        self.derived.check(pipeline_fingerprint(pipe))  # refused, naming what differs
        if self.derived.dataset_fingerprint != self.manifest.fingerprint:
            raise ConfigError(f"derived dataset {name!r} was computed from another version of the store (dataset "
                              f"fingerprint {self.derived.dataset_fingerprint}, now {self.manifest.fingerprint}); "
                              "recompute it with --overwrite")
        self.prefix = len(pipe.ops)
        spec = pipe.declare(input_spec_of(self.manifest))[-1]
        self._shape, self._dtype = tuple(int(d) for d in spec.shape), np.dtype(spec.dtype)  # type: ignore[union-attr]
        self._firsts = np.array([s.first for s in self.manifest.shards], np.int64)
        self._tables: dict[int, tuple[pa.Table, np.ndarray]] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def _shard(self, s: int) -> tuple[pa.Table, np.ndarray]:
        with self._lock:  # held while reading: two fetch threads never read the same file twice
            hit = self._tables.get(s)
            if hit is None:
                sh = self.derived.shards[s]
                errors = []
                for n in sh.nodes:  # any replica on this machine whose file is intact
                    try:
                        table, size = read_shard_file(self.store / node_dir_name(n), self.derived.name,
                                                      self.derived.generation, sh.shard, expected_crc=sh.crc32c)
                        break
                    except StoreError as exc:
                        errors.append(str(exc))
                else:
                    raise StoreError(f"no readable copy of derived shard {sh.shard}: " + " | ".join(errors))
                hit = self._tables[s] = (table, outputs_of(table))
                self.bytes_read += size
            return hit

    def fetch(self, ids: np.ndarray, *, epoch: int, seed: int = 0, into: np.ndarray | None = None) -> list[Fetched]:
        shards = (np.searchsorted(self._firsts, ids, side="right") - 1).tolist()
        out = []
        for sid, s in zip(ids.tolist(), shards):
            table, values = self._shard(s)
            i = sid - int(self._firsts[s])
            key, label, err = (table.column(c)[i].as_py() for c in ("key", "label", "error"))
            name = self.manifest.shards[s].name
            if err is not None:
                out.append(Fetched(sid, key, label, name, None, 0, SampleDecodeError(err)))
                continue
            x = values[i].view(self._dtype).reshape(self._shape) if values.dtype == self._dtype else \
                values[i].astype(self._dtype).reshape(self._shape)
            out.append(Fetched(sid, key, label, name, x, x.nbytes))
        return out

    def batches_per_fetch(self, batch_size: int) -> int:
        return 1  # rows of tables already in memory: no per-request cost to share

    def close(self) -> None:
        with self._lock:
            self._tables.clear()


def derived_loader(store: str | Path, name: str, pipeline: Pipeline | list, **loader_kw: Any) -> Loader:
    """A ``Loader`` over derived dataset ``name`` of ``store`` for ``pipeline`` (see the module doc)."""
    return Loader(source=DerivedSource(store, name, pipeline), pipeline=pipeline, **loader_kw)
