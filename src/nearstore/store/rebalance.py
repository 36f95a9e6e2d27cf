"""Rebalance: move a store's shards to the placement of K' node directories, online and crash-safe.

Placement is a pure function of (shard, nodes, replicas), so a new node count
names a new placement. The move goes through states that each serve every
sample:

1. **copy**: every shard is copied to the nodes of its new placement that
   lack it (from a verified copy; temp, fsync, rename). The old manifest
   still rules; the new files are invisible to it.
2. **widen**: a manifest listing each shard on its new nodes first and its
   old ones after (``nodes = max(K, K')``) is written to every node
   directory, then to the root (the commit point). Every listed copy exists.
3. **narrow**: the final manifest (``nodes = K'``, new placement only) is
   written the same way; ``placement_epoch`` counts up, so readers that ask
   several nodes take the newest.
4. **sweep**, after ``grace`` seconds (requests admitted under the wider
   manifest finish first): copies the final placement does not name are
   deleted, and node directories beyond K' are removed.

A kill at any point leaves a state a reader can use: before 2 the old store
(plus invisible new files, which the next rebalance or ingest reuses or
sweeps), after 2 or 3 a manifest whose every copy exists, after 4 the new
store. Running again finishes the job. Shard names, sample ids and the
dataset fingerprint never change, so an epoch's order does not depend on the
placement; node servers reload a changed manifest on their next request, and
a loader refused by a node that no longer holds a shard asks the nodes for
the newer manifest and re-routes (``ClusterSource``).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nearstore.core.errors import ConfigError, StoreError
from nearstore.store.format import atomic_write_bytes, fsync_dir
from nearstore.store.manifest import MANIFEST_NAME, Manifest, node_dir_name, placement
from nearstore.store.scrub import check_copy

__all__ = ["rebalance", "RebalanceReport", "STAGES"]

log = logging.getLogger(__name__)
STAGES = ("copied", "widened", "narrowed", "swept")


@dataclass
class RebalanceReport:
    store: str
    nodes_before: int
    nodes_after: int
    replicas: int
    copies_made: int
    copies_removed: int
    bytes_copied: int
    seconds: float


def _commit(store: Path, man: Manifest, dirs: int) -> None:
    """Write ``man`` to node directories 0..dirs-1, then to the root (the commit point)."""
    text = man.dumps().encode()
    for n in range(dirs):
        (store / node_dir_name(n)).mkdir(exist_ok=True)
        atomic_write_bytes(store / node_dir_name(n) / MANIFEST_NAME, text)
    atomic_write_bytes(store / MANIFEST_NAME, text)
    fsync_dir(store)


def _copy_shard(store: Path, man: Manifest, k: int, to: int) -> int:
    """Copy shard ``k`` to node ``to`` from a copy that verifies; returns bytes copied (0: already there)."""
    entry = man.shards[k]
    ext = "jpg" if man.payload == "jpeg" else "npy"
    dst = store / node_dir_name(to)
    dst.mkdir(exist_ok=True)
    have, _, _ = check_copy(dst, to, entry, ext)
    if have.ok:
        return 0  # a rerun after a kill: this copy was finished
    for src in entry.nodes:
        st, idx, tar = check_copy(store / node_dir_name(src), src, entry, ext)
        if st.ok and idx is not None and tar is not None:
            atomic_write_bytes(dst / f"{entry.name}.tar", tar)
            atomic_write_bytes(dst / f"{entry.name}.idx.arrow", idx)
            return len(tar) + len(idx)
    raise StoreError(f"shard {entry.name}: no copy on nodes {entry.nodes} verifies; run `nearstore scrub "
                     f"{store} --repair` first")


def rebalance(store: str | Path, nodes: int, *, replicas: int | None = None, grace: float = 2.0,
              on_stage: Callable[[str, Manifest], None] | None = None) -> RebalanceReport:
    """Move ``store`` to ``nodes`` node directories (see the module docstring).

    ``replicas`` defaults to the store's, capped at ``nodes``. ``on_stage(stage, manifest)`` is called
    after each stage of ``STAGES`` (a local cluster starts new nodes after "widened" and stops removed
    ones after "swept").
    """
    t0 = time.perf_counter()
    store = Path(store)
    old = Manifest.load(store)
    if nodes < 1:
        raise ConfigError(f"nodes must be >= 1 (got {nodes})")
    r = min(replicas or old.replicas, nodes)
    if replicas is not None and not 1 <= replicas <= nodes:
        raise ConfigError(f"replicas must be in 1..nodes={nodes} (got {replicas})")
    new_places = [placement(k, nodes=nodes, replicas=r) for k in range(len(old.shards))]
    made = nbytes = 0
    for k, entry in enumerate(old.shards):
        for n in new_places[k]:
            if n not in entry.nodes:
                got = _copy_shard(store, old, k, n)
                made += got > 0
                nbytes += got
    if on_stage:
        on_stage("copied", old)
    wide_n = max(old.nodes, nodes)
    epoch = old.placement_epoch + 1
    wide = old.model_copy(update={
        "nodes": wide_n, "placement_epoch": epoch,
        "shards": [e.model_copy(update={"nodes": new_places[k] + [n for n in e.nodes if n not in new_places[k]]})
                   for k, e in enumerate(old.shards)]}, deep=True)
    wide = Manifest.model_validate(wide.model_dump(exclude={"checksum"}))
    _commit(store, wide, wide_n)
    if on_stage:
        on_stage("widened", wide)
    final = Manifest.model_validate({
        **wide.model_dump(exclude={"checksum"}), "nodes": nodes, "replicas": r, "placement_epoch": epoch + 1,
        "shards": [{**e.model_dump(), "nodes": new_places[k]} for k, e in enumerate(wide.shards)]})
    _commit(store, final, wide_n)  # removed nodes get it too: they refuse what they no longer hold
    if on_stage:
        on_stage("narrowed", final)
    time.sleep(grace)
    removed = 0
    for k, entry in enumerate(old.shards):
        for n in set(entry.nodes) - set(new_places[k]):
            for suffix in (".tar", ".idx.arrow"):
                f = store / node_dir_name(n) / f"{entry.name}{suffix}"
                if f.exists():
                    f.unlink()
                    removed += suffix == ".tar"
    for n in range(nodes, wide_n):
        shutil.rmtree(store / node_dir_name(n), ignore_errors=True)
    fsync_dir(store)
    if on_stage:
        on_stage("swept", final)
    log.info("rebalanced %s: %d -> %d nodes, %d copies made, %d removed", store, old.nodes, nodes, made, removed)
    return RebalanceReport(str(store), old.nodes, nodes, r, made, removed, nbytes, time.perf_counter() - t0)
