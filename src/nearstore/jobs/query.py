"""Queries pushed to the nodes: a filter, or exact top-k nearest neighbours, over a derived dataset.

Each derived shard is asked of one live node that holds its file (the first;
another if that one is down). Nodes read their files, evaluate, and answer only
what matches (``filter``) or their own top k (``knn``); the client concatenates
or merges (``store.query.merge_topk``: exact, ties to the lower sample id).
Every answer reports the bytes the nodes scanned and the bytes that came back
over the link. A filter may also run over a network's outputs computed on the
nodes at query time (``filter_samples(store, None, expr, pipeline=...)``):
each shard runs on its first live replica, as in a job, and nothing is stored.
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
from nearstore.ops.pipeline import Pipeline, input_spec_of
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


def _units(derived: DerivedManifest) -> list[tuple[int, list[int], int]]:
    """(store shard index, nodes holding its file, the file's crc32c) for every shard of ``derived``."""
    return [(s.index, s.nodes, s.crc32c) for s in derived.shards]


def _ask(units: list[tuple[int, list[int], int]], cluster: ClusterSpec, action: str, body: dict,
         timeout: float, what: str) -> tuple[list[tuple[int, dict, pa.Table]], float]:
    """Send ``action`` to the nodes, each for the shards (``units``) it answers; failover to other holders."""
    t0 = time.perf_counter()
    clients = node_clients(cluster, timeout)
    down: set[int] = set()
    lock = threading.Lock()
    todo = list(range(len(units)))
    answers: list[tuple[int, dict, pa.Table]] = []
    try:
        with ThreadPoolExecutor(max(1, len(clients))) as pool:
            while todo:
                groups: dict[int, list[int]] = defaultdict(list)
                for i in todo:
                    index, nodes, _ = units[i]
                    node = next((n for n in nodes if n in clients and n not in down), None)
                    if node is None:
                        raise NodeUnavailableError(
                            f"shard {index} of {what} has no live holder: it lives on nodes {nodes}, down: "
                            f"{sorted(down)}. Restart them (`nearstore up STORE`)")
                    groups[node].append(i)
                futs = {node: pool.submit(_one, clients[node], [units[i] for i in idx], action, body)
                        for node, idx in groups.items()}
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


def _one(client: NodeClient, units: list, action: str, body: dict) -> tuple[dict, pa.Table]:
    req = {**body, "shards": [{"index": index, "crc32c": crc} for index, _, crc in units]}
    res = client.action_raw(action, json.dumps(req).encode())
    info = json.loads(res[0])
    return info, pa.ipc.open_stream(pa.BufferReader(res[1])).read_all()


def _derived_body(derived: DerivedManifest) -> dict:
    return {"name": derived.name, "generation": derived.generation, "dtype": derived.dtype, "shape": derived.shape}


def _result(answers: list[tuple[int, dict, pa.Table]], table: pa.Table, seconds: float) -> QueryResult:
    by_node: dict[int, dict] = {}
    for node, info, _ in answers:
        agg = by_node.setdefault(node, {"rows": 0, "bytes_scanned": 0, "bytes_returned": 0})
        for k in agg:
            agg[k] += info[k]
    return QueryResult(table, sum(v["bytes_scanned"] for v in by_node.values()),
                       sum(v["bytes_returned"] for v in by_node.values()), by_node, seconds)


def filter_samples(store: str | Path, name: str | None, expr: str, *, cluster: ClusterSpec, with_data: bool = False,
                   pipeline: Pipeline | list | None = None, batch_size: int = 32,
                   timeout: float = 600.0) -> QueryResult:
    """Samples matching ``expr`` (``store.query``), found on the nodes, sorted by sample id: over derived dataset
    ``name``, or (``name=None``, ``pipeline`` a chain ending in a network op) over the network's outputs computed
    on the nodes now, each shard on its first live replica, nothing stored. ``with_data``: each row also carries
    the sample's stored bytes."""
    parse_filter(expr)  # a bad expression is refused here, before any node is asked
    body = {"filter": expr, "with_data": with_data}
    if name is not None:
        derived = _open(Path(store), name)
        units, what = _units(derived), f"derived dataset {name!r}"
        body.update(_derived_body(derived))
    else:
        if pipeline is None:
            raise QueryError("give a derived dataset name, or a pipeline whose network outputs the filter reads")
        man = Manifest.load(Path(store))
        pipe = pipeline if isinstance(pipeline, Pipeline) else Pipeline(pipeline)
        pipe.declare(input_spec_of(man))  # a bad chain is refused here
        units, what = [(i, s.nodes, 0) for i, s in enumerate(man.shards)], man.name
        body.update({"ops": pipe.to_json(), "batch_size": batch_size})
    answers, seconds = _ask(units, cluster, "filter", body, timeout, what)
    tables = [t for _, _, t in answers if t.num_rows]
    table = pa.concat_tables(tables) if tables else (answers[0][2] if answers else pa.table({"sample": []}))
    if table.num_rows:
        table = table.sort_by("sample")
    return _result(answers, table, seconds)


def nearest(store: str | Path, name: str, vector: np.ndarray | list[float], k: int, *, cluster: ClusterSpec,
            metric: str = "cosine", timeout: float = 600.0) -> QueryResult:
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
    answers, seconds = _ask(_units(derived), cluster, "knn", {**_derived_body(derived), "vector": q.tolist(), "k": k,
                                                               "metric": metric}, timeout, f"derived dataset {name!r}")
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

