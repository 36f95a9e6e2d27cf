"""Scrub and repair a running cluster through its nodes (``nearstore scrub --cluster STORE [--repair]``).

Each node checks the copies it holds (action ``scrub``); a damaged copy is
repaired on its own node (action ``repair``) from its own good samples plus
the samples it lacks, fetched verified from a replica node (a plain DoGet
with no ops returns the stored bytes, checked by crc32c on both ends) and a
good index from a replica (action ``shard_index``). Nobody needs shell
access to the storage hosts; each node writes its files with the store's
crash-safety contract (temp, fsync, rename) and picks them up itself.
"""

from __future__ import annotations

import base64
import logging

from nearstore.core.errors import NearstoreError
from nearstore.node.client import NodeClient, node_client
from nearstore.node.cluster import ClusterSpec
from nearstore.node.protocol import MAX_SAMPLES, Ticket, decode_rows

__all__ = ["scrub_cluster"]

log = logging.getLogger(__name__)


def _fetch_stored(client: NodeClient, dataset: str, ids: list[int]) -> dict[int, bytes]:
    """The stored bytes of ``ids`` from one node, each verified (a bad row is left out)."""
    out: dict[int, bytes] = {}
    for at in range(0, len(ids), MAX_SAMPLES):
        batches, _ = client.get(Ticket(dataset=dataset, samples=ids[at : at + MAX_SAMPLES], batch_size=64))
        for b in batches:
            for row in decode_rows(b):
                if row.error_kind is None and row.crc_ok:
                    out[row.sample] = row.value
    return out


def scrub_cluster(spec: ClusterSpec, *, repair: bool = False, timeout: float = 600.0) -> dict:
    """Ask every node to scrub its copies; with ``repair``, repair each damaged copy from replicas."""
    clients = {ep.node: node_client(spec, ep.node, timeout=timeout) for ep in spec.nodes}
    try:
        reports, unreachable = {}, {}
        for n, c in clients.items():
            try:
                reports[n] = c.action("scrub")["copies"]
            except NearstoreError as exc:
                unreachable[n] = str(exc)
        man = next(clients[n] for n in reports).manifest() if reports else None
        damage = [{"node": n, **copy} for n, copies in reports.items() for copy in copies]
        repaired, unrepairable = 0, []
        if repair and man is not None:
            for d in damage:
                try:
                    d["repaired"] = _repair_copy(clients, man, d)
                    repaired += d["repaired"]
                except NearstoreError as exc:
                    d["repaired"] = False
                    unrepairable.append(f"node {d['node']}, shard {d['shard']}: {exc}")
        return {"nodes": sorted(reports), "unreachable": unreachable, "damage": damage, "repaired": repaired,
                "unrepairable": unrepairable, "clean": not damage and not unreachable}
    finally:
        for c in clients.values():
            c.close()


def _repair_copy(clients: dict[int, NodeClient], man, d: dict) -> bool:  # noqa: ANN001
    entry = next(e for e in man.shards if e.name == d["shard"])
    target = clients[d["node"]]
    donors = [clients[m] for m in entry.nodes if m != d["node"] and m in clients]
    req: dict = {"shard": entry.name}
    if not d["index_ok"] or any(f.endswith(".idx.arrow") for f in d["missing"]):
        for donor in donors:
            try:
                req["index"] = donor.action("shard_index", {"shard": entry.name})["index"]
                break
            except NearstoreError:
                continue
    answer = target.action("repair", req)
    if answer["need"]:
        got: dict[int, bytes] = {}
        for donor in donors:
            missing = [i for i in answer["need"] if i not in got]
            if not missing:
                break
            try:
                got.update(_fetch_stored(donor, man.name, missing))
            except NearstoreError as exc:
                log.warning("repair of %s: donor node %s failed: %s", entry.name, donor.node, exc)
        if len(got) < len(answer["need"]):
            raise NearstoreError(f"no good copy of {len(answer['need']) - len(got)} sample(s) on nodes {entry.nodes}")
        req["samples"] = {str(k): base64.b64encode(v).decode() for k, v in got.items()}
        answer = target.action("repair", req)
    return bool(answer["repaired"])
