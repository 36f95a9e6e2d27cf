"""A node's side of jobs and queries: derived datasets written, copied, filtered and searched where they live.

Flight actions (``ACTIONS``; the server dispatches them here):

- ``derive``: run an op chain (the image pipeline and the network op) over one
  shard this node holds, on the node's workers in batches (the same
  ``WorkerPool`` path as a DoGet), write the derived shard file into this node
  directory (temp + fsync + rename) and answer its description, then the file's
  bytes (the client copies them to the shard's other replicas; with
  ``send_file: false``, when there is no other replica, none).
- ``derived_put``: store a copy of a derived shard file computed elsewhere
  (checked against its crc32c and its schema before it is written).
- ``derived_sweep``: remove this node's files of a derived dataset except one
  generation (after a run commits).
- ``filter`` and ``knn``: evaluate a filter (``store.query``) or score the
  stored outputs against a query vector over the shards the client names, and
  answer only the matching rows (or this node's top k) as an Arrow IPC stream,
  with the bytes scanned here.

Each answer is a JSON document first and, for ``derive``, ``filter`` and
``knn``, a second result with the bytes (what crosses the link, paced by the
node's link cap like any other reply).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nearstore.core.checksum import crc32c
from nearstore.core.errors import ConfigError, StoreError
from nearstore.nets.quant import decode_q8
from nearstore.node.protocol import decode_rows
from nearstore.ops.pipeline import input_spec_of
from nearstore.store.derived import (build_table, check_name, decode_table, encode_table, meta_json, outputs_of,
                                     parse_meta, read_shard_file, sweep_generations, write_shard_file)
from nearstore.store.query import FILTER_COLUMNS, METRICS, QueryError, check_k, parse_filter, topk

__all__ = ["ACTIONS", "handle", "DeriveRequest", "QueryRequest", "frame", "unframe", "NodeCopyError"]

log = logging.getLogger(__name__)

ACTIONS = {
    "derive": "run an op chain over one shard on the workers; write its derived file here; answer it",
    "derived_put": "store a copy of a derived shard file computed on another replica",
    "derived_sweep": "remove this node's files of a derived dataset except one generation",
    "filter": "rows of a derived dataset's shards that match a filter expression",
    "knn": "this node's top k stored outputs nearest a query vector",
}


class NodeCopyError(StoreError):
    """This node's copy of a shard is bad (checksum or read error): the shard should run on a replica."""


class DeriveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    generation: str = Field(pattern=r"^[0-9a-f]{6,32}$")
    shard: int = Field(ge=0)
    ops: list[dict[str, Any] | str] = Field(min_length=1)
    seed: int = 0
    batch_size: int = Field(32, ge=1, le=4096)
    fingerprint: str = ""
    send_file: bool = True  # answer the file's bytes too (the job copies them to the shard's other replicas)


class ShardRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(ge=0)
    crc32c: int = Field(ge=0)


class QueryRequest(BaseModel):
    """A query over stored derived files (``name``, ``generation``), or over a network's outputs computed now
    (``ops``: the op chain, run on the workers as a job would, nothing written)."""

    model_config = ConfigDict(extra="forbid")
    name: str = ""
    generation: str = Field("", pattern=r"^([0-9a-f]{6,32})?$")
    shards: list[ShardRef]
    dtype: str = "float32"
    shape: list[int] = Field(default_factory=list)
    ops: list[dict[str, Any] | str] | None = None
    seed: int = 0
    batch_size: int = Field(32, ge=1, le=4096)
    filter: str | None = None
    with_data: bool = False
    vector: list[float] | None = None
    k: int | None = None
    metric: str = "cosine"


def frame(header: dict, payload: bytes) -> bytes:
    """One action body: a 4-byte length, a JSON header, then raw bytes."""
    head = json.dumps(header).encode()
    return struct.pack("<I", len(head)) + head + payload


def unframe(body: bytes) -> tuple[dict, bytes]:
    if len(body) < 4:
        raise ConfigError("framed body too short: expected a 4-byte header length")
    (n,) = struct.unpack_from("<I", body)
    if n > len(body) - 4:
        raise ConfigError(f"framed body's header length {n} exceeds the body ({len(body) - 4} bytes)")
    try:
        header = json.loads(body[4 : 4 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"framed body's header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ConfigError("framed body's header must be a JSON object")
    return header, body[4 + n :]


def _model(cls: type[BaseModel], doc: Any) -> Any:
    try:
        return cls.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise ConfigError(f"bad {cls.__name__}: {problems}") from None


def handle(server: Any, kind: str, body: bytes) -> list[bytes]:
    """Answer action ``kind`` (one of ``ACTIONS``) for ``server`` (a ``NodeServer``): the results' bodies."""
    if kind == "derived_put":
        header, raw = unframe(body)
        return [json.dumps(_put(server, header, raw)).encode()]
    try:
        doc = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{kind}: body is not JSON: {exc}") from None
    if kind == "derive":
        info, raw = _derive(server, _model(DeriveRequest, doc))
        server.link.send(len(raw))
        return [json.dumps(info).encode(), raw]
    if kind == "derived_sweep":
        name = check_name(str(doc.get("name", "")))
        keep = doc.get("keep")
        return [json.dumps({"removed": sweep_generations(server.store.path, name, keep)}).encode()]
    req = _model(QueryRequest, doc)
    info, raw = _knn(server, req) if kind == "knn" else _filter(server, req)
    server.link.send(len(raw))
    info["bytes_returned"] = len(raw)
    return [json.dumps(info).encode(), raw]


def _held(server: Any, index: int) -> Any:
    man = server.store.manifest
    if index >= len(man.shards):
        raise ConfigError(f"shard {index} out of range: dataset {man.name!r} has {len(man.shards)} shards")
    if not server.store.holds(index):
        raise ConfigError(f"node {server.node_id} does not hold shard {man.shards[index].name} (nodes "
                          f"{man.shards[index].nodes} do)")
    return man.shards[index]


def _compute(server: Any, ops: list, index: int, seed: int, batch_size: int,
             meta: dict[str, Any]) -> tuple[pa.Table, int, dict]:
    """Run ``ops`` over held shard ``index`` on the workers: its derived table, the errors, and what it is."""
    entry = _held(server, index)
    pipe = server.work.pipeline(ops)  # validates every op against this node's registry and store
    specs = pipe.declare(input_spec_of(server.store.manifest))
    spec = specs[-1]
    if not spec.fixed:
        raise ConfigError(f"a derived dataset needs a fixed-size output; the op chain ends in {spec.kind} of shape "
                          f"{spec.shape} (put a crop or resize and a network op in it)")
    encoded = tuple(int(d) for d in spec.shape)  # type: ignore[union-attr]
    act_shape = encoded
    if spec.kind == "act_q8":  # the network op's int8 rows carry a scale: the activation's shape is the cut's
        net = pipe.ops[-1]
        hw = specs[-2].shape
        act_shape = tuple(int(d) for d in net.info((int(hw[1]), int(hw[2]))).shape)  # type: ignore[attr-defined,index]
    rows = _run(server, ops, list(range(entry.first, entry.first + entry.samples)), seed, batch_size)

    def decode(values: np.ndarray) -> np.ndarray:
        return decode_q8(values, act_shape) if spec.kind == "act_q8" else values.astype(np.float32)

    what = {"shard": entry.name, "kind": spec.kind, "dtype": spec.dtype, "shape": list(act_shape)}
    table = build_table(rows, dtype=spec.dtype, shape=act_shape, encoded=encoded, decode=decode,
                        meta=meta_json(**meta, **what, encoded=list(encoded), node=server.node_id))
    return table, sum(r[5] is not None for r in rows), what


def _derive(server: Any, req: DeriveRequest) -> tuple[dict, bytes]:
    check_name(req.name)
    t0 = time.perf_counter()
    table, errors, what = _compute(server, req.ops, req.shard, req.seed, req.batch_size,
                                   {"name": req.name, "generation": req.generation, "fingerprint": req.fingerprint})
    raw = encode_table(table)
    write_shard_file(server.store.path, req.name, req.generation, what["shard"], raw)
    seconds = time.perf_counter() - t0
    log.info("node %s: derived %s shard %s (%d samples, %d errors) in %.2f s", server.node_id, req.name,
             what["shard"], table.num_rows, errors, seconds)
    return ({"node": server.node_id, "index": req.shard, "samples": table.num_rows, "errors": errors,
             "file_bytes": len(raw), "crc32c": crc32c(raw), "seconds": seconds, **what},
            raw if req.send_file else b"")  # no replica to copy to: nothing crosses the link


def _run(server: Any, ops: list, ids: list[int], seed: int, batch_size: int) -> list[tuple]:
    """(sample, key, label, output or None, crc32c, error) for ``ids``, computed on the node's workers in batches
    of ``batch_size``, a few ahead (as a DoGet is)."""
    chunks = deque(ids[i : i + batch_size] for i in range(0, len(ids), batch_size))
    pending: deque[Future] = deque()
    rows: list[tuple] = []
    try:
        while chunks and len(pending) < 2 * server.workers:
            pending.append(server.pool.submit(ops, chunks.popleft(), seed, 0))
        while pending:
            batch, delta = server.pool.result(pending.popleft())  # a dead worker: WorkerCrashedError
            server._add(delta)
            if chunks:
                pending.append(server.pool.submit(ops, chunks.popleft(), seed, 0))
            crcs = batch.column("crc32c").to_pylist()
            for row, crc in zip(decode_rows(batch), crcs):
                if row.error_kind in ("checksum", "read"):
                    raise NodeCopyError(f"node {server.node_id}'s copy of sample {row.sample} ({row.key}) is bad: "
                                        f"{row.error}; run this shard on a replica")
                if not row.crc_ok:
                    raise NodeCopyError(f"node {server.node_id}: sample {row.sample}'s output failed its crc32c "
                                        "between worker and server")
                value = None if row.error_kind else np.array(row.value)  # a copy: the batch's slot is reused
                rows.append((row.sample, row.key, row.label, value, int(crc) if value is not None else 0,
                             row.error))
    finally:
        for f in pending:
            server.pool.discard(f, account=server._add)
    return rows


def _put(server: Any, header: dict, raw: bytes) -> dict:
    name = check_name(str(header.get("name", "")))
    gen = str(header.get("generation", ""))
    if not gen.isalnum():
        raise ConfigError(f"bad generation {gen!r}")
    entry = _held(server, int(header.get("shard", -1)))
    if crc32c(raw) != int(header.get("crc32c", -1)):
        raise ConfigError(f"derived file for shard {entry.name} arrived corrupt (crc32c {crc32c(raw):08x}, sender "
                          f"says {int(header.get('crc32c', -1)):08x}); send it again")
    table = decode_table(raw, what=f"copy of derived shard {entry.name}")
    meta = parse_meta(table)
    if meta.get("shard") != entry.name or meta.get("generation") != gen or meta.get("name") != name:
        raise ConfigError(f"derived file says it is {meta.get('name')}/{meta.get('generation')}/{meta.get('shard')}, "
                          f"not {name}/{gen}/{entry.name}")
    write_shard_file(server.store.path, name, gen, entry.name, raw)
    return {"node": server.node_id, "shard": entry.name, "file_bytes": len(raw)}


def _tables(server: Any, req: QueryRequest) -> tuple[list[pa.Table], int]:
    """The tables the query runs over and the bytes read for them (derived files, or the raw samples)."""
    tables, scanned = [], 0
    if req.ops is not None:
        for ref in req.shards:
            table, _, _ = _compute(server, req.ops, ref.index, req.seed, req.batch_size, {})
            tables.append(table)
            scanned += server.store.manifest.shards[ref.index].payload_bytes
        return tables, scanned
    check_name(req.name)
    for ref in req.shards:
        entry = _held(server, ref.index)
        table, size = read_shard_file(server.store.path, req.name, req.generation, entry.name,
                                      expected_crc=ref.crc32c)
        tables.append(table)
        scanned += size
    return tables, scanned


_ANSWER = ("sample", "key", "label", "class", "score")


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _filter(server: Any, req: QueryRequest) -> tuple[dict, bytes]:
    if req.filter is None:
        raise QueryError("filter: give an expression")
    expr = parse_filter(req.filter, FILTER_COLUMNS)
    tables, scanned = _tables(server, req)
    parts = []
    for t in tables:
        try:
            parts.append(t.select(list(_ANSWER)).filter(expr))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise QueryError(f"filter {req.filter!r} cannot be evaluated: {exc} (compare columns with values of "
                             "their type; a filter must be true or false for each sample)") from None
    out = pa.concat_tables(parts) if parts else pa.table({c: [] for c in _ANSWER})
    if req.with_data:
        data = []
        for sid in out.column("sample").to_pylist():
            payload, _ = server.store.read(int(sid))
            data.append(bytes(payload))
            scanned += len(payload)
        out = out.append_column("data", pa.array(data, pa.binary()))
    return {"node": server.node_id, "rows": out.num_rows, "bytes_scanned": scanned}, _ipc(out)


def _knn(server: Any, req: QueryRequest) -> tuple[dict, bytes]:
    if req.vector is None or req.k is None:
        raise QueryError("knn: give a query vector and k")
    check_k(req.k)
    if req.ops is not None:
        raise QueryError("knn scores stored embeddings: compute them first (`nearstore infer --out NAME`)")
    if req.metric not in METRICS:
        raise QueryError(f"metric must be one of {', '.join(METRICS)} (got {req.metric!r})")
    tables, scanned = _tables(server, req)
    if not tables:
        return {"node": server.node_id, "rows": 0, "bytes_scanned": 0}, _ipc(pa.table(
            {"sample": pa.array([], pa.int64()), "key": pa.array([], pa.string()),
             "label": pa.array([], pa.int32()), "score": pa.array([], pa.float64())}))
    table = pa.concat_tables(tables)
    values = outputs_of(table)
    if req.dtype == "int8":
        values = decode_q8(values, tuple(req.shape)).reshape(len(values), -1)
    valid = pc.is_null(table.column("error")).to_numpy(zero_copy_only=False)
    samples = table.column("sample").to_numpy()
    pos, scores = topk(samples, values, valid, np.asarray(req.vector, np.float64), req.k, req.metric)
    out = pa.table({"sample": pa.array(samples[pos], pa.int64()),
                    "key": table.column("key").take(pa.array(pos, pa.int64())),
                    "label": table.column("label").take(pa.array(pos, pa.int64())),
                    "score": pa.array(scores, pa.float64())})
    return {"node": server.node_id, "rows": out.num_rows, "bytes_scanned": scanned}, _ipc(out)

