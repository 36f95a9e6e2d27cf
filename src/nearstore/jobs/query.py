"""Queries pushed to the nodes: a filter, or exact top-k nearest neighbours, over a derived dataset.

Each derived shard is asked of one live node that holds its file (the first;
another if that one is down). Nodes read their files, evaluate, and answer only
what matches (``filter``) or their own top k (``knn``); the client concatenates
or merges (``store.query.merge_topk``: exact, ties to the lower sample id).
Every answer reports the bytes the nodes scanned and the bytes that came back
over the link.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from nearstore.core.errors import ConfigError
from nearstore.jobs.infer import node_clients
from nearstore.node.client import NodeClient, NodeUnavailableError
from nearstore.node.cluster import ClusterSpec
from nearstore.store.derived import DerivedManifest, load_derived
from nearstore.store.manifest import Manifest
from nearstore.store.query import METRICS, QueryError, check_k, merge_topk, parse_filter

__all__ = ["QueryResult", "filter_samples", "nearest"]


@dataclass
class QueryResult:
    """Rows (an Arrow table: sample, key, label, score[, class, data]) and what the query cost."""

    table: pa.Table
    bytes_scanned: int  # read from disk on the nodes
    bytes_returned: int  # came back over the link
    by_node: dict[int, dict]
    seconds: float

    @property
    def samples(self) -> list[int]:
        return self.table.column("sample").to_pylist()

    def summary(self) -> dict:
        return {"rows": self.table.num_rows, "bytes_scanned": self.bytes_scanned,
                "bytes_returned": self.bytes_returned, "by_node": self.by_node, "seconds": self.seconds}


def _open(store: Path, name: str) -> DerivedManifest:
    derived = load_derived(store, name)
    man = Manifest.load(store)
    if derived.dataset_fingerprint != man.fingerprint:
        raise ConfigError(f"derived dataset {name!r} was computed from another version of {man.name} (dataset "
                          f"fingerprint {derived.dataset_fingerprint}, the store is now {man.fingerprint}); "
                          f"recompute it with `nearstore infer ... --out {name} --overwrite`")
    return derived


def _ask(derived: DerivedManifest, cluster: ClusterSpec, action: str, extra: dict,
         timeout: float) -> tuple[list[tuple[int, dict, pa.Table]], float]:
    """Send ``action`` to the nodes, each for the shards it answers; failover to other holders."""
    t0 = time.perf_counter()
    clients = node_clients(cluster, timeout)
    down: set[int] = set()
    lock = threading.Lock()
    todo = list(range(len(derived.shards)))
    answers: list[tuple[int, dict, pa.Table]] = []
    try:
        with ThreadPoolExecutor(max(1, len(clients))) as pool:
            while todo:
                groups: dict[int, list[int]] = defaultdict(list)
                for i in todo:
                    sh = derived.shards[i]
                    node = next((n for n in sh.nodes if n in clients and n not in down), None)
                    if node is None:
                        raise NodeUnavailableError(
                            f"derived shard {sh.shard} of {derived.name!r} has no live holder: it lives on nodes "
                            f"{sh.nodes}, down: {sorted(down)}. Restart them (`nearstore up STORE`)")
                    groups[node].append(i)
                futs = {node: pool.submit(_one, clients[node], derived, [derived.shards[i] for i in idx], action,
                                          extra) for node, idx in groups.items()}
                todo = []
                for node, fut in futs.items():
                    try:
                        info, table = fut.result()
                    except NodeUnavailableError:
                        with lock:
                            down.add(node)
                        todo.extend(groups[node])
                        continue
                    answers.append((node, info, table))
    finally:
        for c in clients.values():
            c.close()
    return answers, time.perf_counter() - t0


def _one(client: NodeClient, derived: DerivedManifest, shards: list, action: str, extra: dict) -> tuple[dict, pa.Table]:
    body = {"name": derived.name, "generation": derived.generation, "dtype": derived.dtype, "shape": derived.shape,
            "shards": [{"index": s.index, "crc32c": s.crc32c} for s in shards], **extra}
    res = client.action_raw(action, json.dumps(body).encode())
    info = json.loads(res[0])
    return info, pa.ipc.open_stream(pa.BufferReader(res[1])).read_all()


def _result(answers: list[tuple[int, dict, pa.Table]], table: pa.Table, seconds: float) -> QueryResult:
    by_node: dict[int, dict] = {}
    for node, info, _ in answers:
        agg = by_node.setdefault(node, {"rows": 0, "bytes_scanned": 0, "bytes_returned": 0})
        for k in agg:
            agg[k] += info[k]
    return QueryResult(table, sum(v["bytes_scanned"] for v in by_node.values()),
                       sum(v["bytes_returned"] for v in by_node.values()), by_node, seconds)


def filter_samples(store: str | Path, name: str, expr: str, *, cluster: ClusterSpec, with_data: bool = False,
                   timeout: float = 120.0) -> QueryResult:
    """Samples of derived dataset ``name`` matching ``expr`` (``store.query``), found on the nodes; sorted by
    sample id. ``with_data``: each row also carries the sample's stored bytes."""
    parse_filter(expr)  # a bad expression is refused here, before any node is asked
    derived = _open(Path(store), name)
    answers, seconds = _ask(derived, cluster, "filter", {"filter": expr, "with_data": with_data}, timeout)
    tables = [t for _, _, t in answers if t.num_rows]
    table = pa.concat_tables(tables) if tables else (answers[0][2] if answers else pa.table({"sample": []}))
    if table.num_rows:
        table = table.sort_by("sample")
    return _result(answers, table, seconds)


def nearest(store: str | Path, name: str, vector: np.ndarray | list[float], k: int, *, cluster: ClusterSpec,
            metric: str = "cosine", timeout: float = 120.0) -> QueryResult:
    """The exact top ``k`` samples of derived dataset ``name`` nearest ``vector`` (best first; ties to the lower
    sample id): each node scores its stored outputs and answers its own top k, merged here."""
    check_k(k)
    if metric not in METRICS:
        raise QueryError(f"metric must be one of {', '.join(METRICS)} (got {metric!r})")
    derived = _open(Path(store), name)
    q = np.asarray(vector, np.float64).reshape(-1)
    dim = math.prod(derived.shape)
    if q.size != dim:
        raise QueryError(f"the query embedding has {q.size} values but {name!r} stores {dim} per sample (shape "
                         f"{derived.shape}); give a vector of {dim} values")
    if not np.isfinite(q).all():
        raise QueryError("the query embedding has NaN or Inf values")
    answers, seconds = _ask(derived, cluster, "knn", {"vector": q.tolist(), "k": k, "metric": metric}, timeout)
    parts = [(t.column("sample").to_numpy(), t.column("score").to_numpy()) for _, _, t in answers]
    samples, scores = merge_topk(parts, k)
    rows = {}
    for _, _, t in answers:
        for r in t.to_pylist():
            rows[r["sample"]] = r
    table = pa.table({"sample": pa.array(samples, pa.int64()),
                      "key": pa.array([rows[int(s)]["key"] for s in samples], pa.string()),
                      "label": pa.array([rows[int(s)]["label"] for s in samples], pa.int32()),
                      "score": pa.array(scores, pa.float64())})
    return _result(answers, table, seconds)

