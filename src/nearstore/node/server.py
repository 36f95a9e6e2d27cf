"""A storage node: an Arrow Flight server that owns one node directory of a store.

It reads the samples a ticket names, verifies their crc32c, runs the ticket's
op prefix (the same ``Pipeline`` code the host runs) on ``workers`` worker
processes (``workers.py``), and streams record batches back, paced by an optional link cap that emulates
the storage-to-compute link. Every bad request is answered with a precise
Flight error; nothing a client sends can stop the server.

Run one: ``nearstore node serve --data STORE/node-000 --port 0`` (it prints one
JSON line with its port when it is ready). Ops beyond the built-in library come
from the ``nearstore.ops`` entry-point group and ``--ops-module`` (a module
that fails to import is reported by ``capabilities``; the node serves on with
the ops it has).
"""

from __future__ import annotations

import argparse
import binascii
import hmac
import importlib.metadata
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Iterator, Sequence

import psutil
import pyarrow as pa
import pyarrow.flight as flight

from nearstore.core.errors import ConfigError, NearstoreError
from nearstore.core.memory import MALLOC_ENV, retain_freed_memory
from nearstore.core.metrics import MetricsServer
from nearstore.node import derive
from nearstore.node.metrics import NodeCollector
from nearstore.nets import engines
from nearstore.node.protocol import parse_ticket, wire_bytes
from nearstore.node.spec import read_token_file, token_from_env
from nearstore.node.workers import WORKER_KINDS, NodeWork, WorkerCrashedError, WorkerKind, WorkerPool
from nearstore.ops.base import registry
from nearstore.ops.pipeline import Pipeline
from nearstore.ops.plugins import import_errors, load_op_modules, op_origins
from nearstore.store.scrub import node_repair, node_scrub, node_shard_index

__all__ = ["NodeServer", "LinkCap", "TokenMiddlewareFactory", "StreamLimits", "main"]

MAX_PROFILE_SAMPLES = 256
LOG_LEVEL_ENV = "NEARSTORE_LOG_LEVEL"  # the level a node process logs at when --log-level is not given
log = logging.getLogger("nearstore.node.server")  # not __main__ when run with -m
MAX_STREAMS_PER_CLIENT = 16  # concurrent DoGets per client connection (a loader uses at most a few per node)
MAX_STREAMS = 64  # concurrent DoGets on the node, all clients together
READ_AHEAD_BUDGET = 4  # record batches built ahead, per worker, shared by every open stream
MAX_MESSAGE_BYTES = 16 << 20  # rows per record batch are cut so a batch's declared size stays under this


class LinkCap:
    """Paces bytes leaving the node to ``bytes_per_s`` across all of its streams (None: no cap).

    A virtual clock advances by n / rate per send; a send waits until the
    clock catches up. The clock may lag real time by at most ``burst_s``, so
    time lost outside the node (gRPC, a slow reader) is made up within that
    window instead of being lost: the long-run rate is the cap, and it never
    exceeds the cap by more than ``burst_s`` worth of bytes.
    """

    def __init__(self, bytes_per_s: float | None, *, burst_s: float = 0.05) -> None:
        self.rate = bytes_per_s
        self.burst_s = burst_s
        self._next_free = time.monotonic()
        self._lock = threading.Lock()

    def send(self, nbytes: int) -> float:
        """Block until ``nbytes`` may go out; returns the seconds waited."""
        if not self.rate:
            return 0.0
        with self._lock:
            now = time.monotonic()
            start = max(now - self.burst_s, self._next_free)
            self._next_free = start + nbytes / self.rate
            wait = self._next_free - now
        if wait > 0:
            time.sleep(wait)
        return max(wait, 0.0)


class TokenMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Rejects every call that does not carry ``authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self._expected = f"Bearer {token}".encode()

    def start_call(self, info, headers):  # noqa: ANN001, ANN201
        got = headers.get("authorization") or headers.get("Authorization") or []
        # constant time: how long a refusal takes says nothing about how much of the token was right
        ok = False
        for value in got:
            ok |= hmac.compare_digest(value.encode() if isinstance(value, str) else bytes(value), self._expected)
        if not ok:
            raise flight.FlightUnauthenticatedError(
                "missing or wrong token: pass the node's token (cluster file, or NEARSTORE_TOKEN)")
        return None


class StreamLimits:
    """Admission and read-ahead for DoGet streams, so one client cannot exhaust a node.

    At most ``per_client`` concurrent streams per client connection (gRPC peer) and ``total`` on the node;
    a stream beyond either is refused at once with a message naming the limit. Record batches built
    ahead of the client are shared out: a stream may keep ``budget // open streams`` (at least 1, at
    most its own window) in flight, so the bytes a node buffers stay near ``budget`` batches however many
    streams are open (and each batch's rows are cut to about ``MAX_MESSAGE_BYTES``).
    """

    def __init__(self, *, per_client: int = MAX_STREAMS_PER_CLIENT, total: int = MAX_STREAMS,
                 budget: int = 8) -> None:
        self.per_client, self.total, self.budget = per_client, total, budget
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()
        self.refused = 0

    def admit(self, peer: str) -> "_Lease":
        with self._lock:
            mine, everyone = self._open.get(peer, 0), sum(self._open.values())
            if mine >= self.per_client or everyone >= self.total:
                self.refused += 1
                which = (f"{mine} streams open from this client (limit {self.per_client})" if mine >= self.per_client
                         else f"{everyone} streams open on the node (limit {self.total})")
                raise flight.FlightUnavailableError(f"node busy: {which}; wait for a stream to finish, then retry")
            self._open[peer] = mine + 1
        return _Lease(self, peer)

    def _release(self, peer: str) -> None:
        with self._lock:
            left = self._open.get(peer, 0) - 1
            if left > 0:
                self._open[peer] = left
            else:
                self._open.pop(peer, None)

    def window(self, own: int) -> int:
        """Record batches a stream may have in flight now."""
        with self._lock:
            streams = max(1, sum(self._open.values()))
        return max(1, min(own, self.budget // streams))

    def snapshot(self) -> dict:
        with self._lock:
            return {"open_streams": sum(self._open.values()), "clients": len(self._open), "refused": self.refused,
                    "per_client": self.per_client, "total": self.total, "budget": self.budget}


class _Lease:
    """One admitted stream; released when its generator ends, or when it is dropped unstarted."""

    def __init__(self, limits: StreamLimits, peer: str) -> None:
        self._limits, self._peer, self._done = limits, peer, False

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._limits._release(self._peer)

    def __del__(self) -> None:
        self.release()


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.in_flight = 0  # streams being served now
        self.samples = 0
        self.processed = 0  # samples the workers ran, sent or not (a cancelled stream's read-ahead too)
        self.wire_bytes = 0
        self.payload_bytes = 0
        self.read_bytes = 0
        self.errors = 0
        self.errors_by_kind: dict[str, int] = {}
        self.bad_requests = 0
        self.link_wait_seconds = 0.0
        self.read_seconds = 0.0
        self.op_seconds: dict[str, float] = {}  # with the emulated slowdown's idle time in them
        self.slowdown_seconds = 0.0  # of which idle (--slowdown): ops take slowdown x the CPU they used
        self.started = time.time()

    def snapshot(self) -> dict:
        with self.lock:
            return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items() if k != "lock"}


class NodeServer(flight.FlightServerBase):
    """Serve one node directory. ``link_bytes_per_s`` caps what it sends; ``workers`` processes run ops."""

    def __init__(self, data: str | Path, *, host: str = "127.0.0.1", port: int = 0, workers: int = 2,
                 worker_kind: WorkerKind = "process", link_bytes_per_s: float | None = None,
                 token: str | None = None, tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                 slowdown: float = 1.0, allow_shutdown: bool = False, ops_modules: Sequence[str] = ()) -> None:
        if workers < 1:
            raise ConfigError(f"workers must be >= 1 (got {workers})")
        if worker_kind not in WORKER_KINDS:
            raise ConfigError(f"worker_kind must be one of {', '.join(WORKER_KINDS)} (got {worker_kind!r})")
        if slowdown < 1.0:
            raise ConfigError(f"slowdown must be >= 1 (1: full speed; got {slowdown})")
        self.slowdown = slowdown
        if link_bytes_per_s is not None and link_bytes_per_s <= 0:
            raise ConfigError(f"link cap must be > 0 bytes/s (got {link_bytes_per_s})")
        self.ops_modules = list(ops_modules)
        load_op_modules(self.ops_modules)  # here too: this process validates tickets against the registry
        self.work = NodeWork(data, slowdown=slowdown)  # validates tickets here (and runs them on thread workers)
        self.store = self.work.store
        self.node_id = self.store.node_id
        middleware = {"auth": TokenMiddlewareFactory(token)} if token else None
        if bool(tls_cert) != bool(tls_key):
            raise ConfigError("--tls-cert and --tls-key go together: give both PEM files or neither")
        certs = []
        if tls_cert:
            try:
                certs = [flight.CertKeyPair(Path(tls_cert).read_bytes(), Path(tls_key).read_bytes())]  # type: ignore
            except OSError as exc:
                raise ConfigError(f"cannot read TLS certificate or key {exc.filename}: {exc.strerror}") from None
        scheme = "grpc+tls" if certs else "grpc"
        self.workers = workers
        self.link = LinkCap(link_bytes_per_s)
        self.stats = _Stats()
        self.allow_shutdown = allow_shutdown
        self.limits = StreamLimits(budget=READ_AHEAD_BUDGET * workers)
        self._manifest_stamp: tuple[int, int] | None = None
        self._follow_manifest()
        self.pool = WorkerPool(self.work, workers=workers, kind=worker_kind,  # ready before the first call
                               ops_modules=self.ops_modules)
        try:
            super().__init__(f"{scheme}://{host}:{port}", middleware=middleware, tls_certificates=certs)
        except (pa.ArrowException, OSError) as exc:
            self.pool.close()
            raise ConfigError(f"cannot serve on {scheme}://{host}:{port}: {exc}") from None

    # -- helpers -----------------------------------------------------------------
    def _pipeline(self, ops: list[dict | str]) -> Pipeline:
        return self.work.pipeline(ops)

    def capabilities(self) -> dict:
        """What this node can run: ops (version, inputs, whether batched, origin), op modules that failed to
        import, inference engines installed, cores and memory."""
        origins = op_origins()
        ops = {name: {"version": cls.version, "inputs": list(cls.inputs), "batched": cls.batched,
                      "origin": origins.get(name, "builtin")} for name, cls in sorted(registry().items())}
        mem = psutil.virtual_memory()
        return {"node": self.node_id, "ops": ops, "import_errors": import_errors(), "ops_modules": self.ops_modules,
                "engines": {e: _engine_version(e) for e in engines()}, "cores": len(os.sched_getaffinity(0)),
                "workers": self.workers, "memory_bytes": mem.total, "memory_available_bytes": mem.available}

    def _bad(self, msg: str) -> flight.FlightServerError:
        with self.stats.lock:
            self.stats.bad_requests += 1
        log.warning("node %s refused a request: %s", self.node_id, msg)
        return flight.FlightServerError(msg)

    def _check_dataset(self, name: str) -> None:
        if name != self.store.manifest.name:
            raise self._bad(f"unknown dataset {name!r}: node {self.node_id} serves {self.store.manifest.name!r}")

    def _add(self, delta: dict) -> None:
        """Fold a worker's stats delta into the node's counters."""
        with self.stats.lock:
            self.stats.processed += delta["processed"]
            self.stats.read_seconds += delta["read_seconds"]
            self.stats.read_bytes += delta["read_bytes"]
            self.stats.slowdown_seconds += delta.get("slowdown_seconds", 0.0)
            for k, v in delta["op_seconds"].items():
                self.stats.op_seconds[k] = self.stats.op_seconds.get(k, 0.0) + v
            for k, v in delta["errors_by_kind"].items():
                self.stats.errors += v
                self.stats.errors_by_kind[k] = self.stats.errors_by_kind.get(k, 0) + v

    # -- Flight methods ------------------------------------------------------------
    def _follow_manifest(self) -> None:
        """Reload this node's manifest when a rebalance replaced it (one stat per request)."""
        try:
            st = os.stat(Path(self.store.path) / "manifest.json")
        except OSError:
            return
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp != self._manifest_stamp:
            with self.stats.lock:
                if stamp != self._manifest_stamp:
                    self._manifest_stamp = stamp
                    self.store.reload_manifest()

    def do_get(self, context, ticket):  # noqa: ANN001, ANN201
        self._follow_manifest()
        try:
            t = parse_ticket(ticket.ticket)
            self._check_dataset(t.dataset)
            ids = t.ids()
            schema = self.work.schema(t.ops, batch_size=t.batch_size, copies=self.workers)  # validates the ops here
            if t.prefixes is not None:
                valid = set(self._pipeline(t.ops).valid_splits)
                wrong = sorted(set(t.prefixes) - valid)
                if wrong:
                    raise ConfigError(f"prefixes {wrong} are not valid splits of the ticket's ops; valid: "
                                      f"{sorted(valid)}")
        except (ConfigError, ValueError) as exc:
            raise self._bad(str(exc)) from None
        n = len(self.store)
        for sid in ids:
            if sid >= n:
                raise self._bad(f"sample id {sid} out of range: dataset {t.dataset!r} has {n} samples (0..{n - 1})")
            s, _ = self.store.locate(sid)
            if not self.store.holds(s):
                raise self._bad(f"sample {sid} lives in shard {self.store.manifest.shards[s].name}, which node "
                                f"{self.node_id} does not hold (nodes {self.store.manifest.shards[s].nodes} do)")
        lease = self.limits.admit(context.peer())
        with self.stats.lock:
            self.stats.requests += 1
        if log.isEnabledFor(logging.DEBUG):  # context.peer() is not free: only when the line is written
            log.debug("node %s: %d samples, %d ops, epoch %d, from %s", self.node_id, len(ids), len(t.ops), t.epoch,
                      context.peer())
        specs = self.work.specs(t.ops)
        per_row = max(specs[k].bytes for k in set(t.prefix_of())) if ids else 1.0  # the largest rows it sends
        rows = max(1, min(t.batch_size, int(MAX_MESSAGE_BYTES // (per_row or 1.0))))
        return flight.GeneratorStream(schema, self._stream(t.ops, t.seed, t.epoch, ids, t.prefixes, rows, context,
                                                           lease))

    def _stream(self, ops: list, seed: int, epoch: int, ids: list[int], prefixes: list[int] | None,
                batch_size: int, context, lease: _Lease) -> Iterator[pa.RecordBatch]:  # noqa: ANN001
        """Record batches of ``batch_size`` rows, built on the workers a few ahead, sent in order."""
        chunks = iter([(ids[i : i + batch_size], None if prefixes is None else prefixes[i : i + batch_size])
                       for i in range(0, len(ids), batch_size)])
        pending: deque[Future] = deque()
        with self.stats.lock:
            self.stats.in_flight += 1
        try:
            for chunk, pre in chunks:
                pending.append(self.pool.submit(ops, chunk, seed, epoch, pre))
                if len(pending) >= self.limits.window(2 * self.workers):
                    break
            while pending:
                try:
                    batch, delta = self.pool.result(pending.popleft())
                except WorkerCrashedError as exc:  # unavailable: a loader re-asks a replica, then this node again
                    self._count_error("worker_crash")
                    log.warning("node %s: a worker died mid-request; workers restarted (%d so far)", self.node_id,
                                self.pool.restarts)
                    raise flight.FlightUnavailableError(f"node {self.node_id}: {exc}") from None
                except NearstoreError as exc:
                    self._count_error("failed")
                    log.error("node %s: request failed: %s", self.node_id, exc)
                    raise flight.FlightServerError(f"node {self.node_id}: {exc}") from None
                self._add(delta)
                while len(pending) < self.limits.window(2 * self.workers):
                    nxt = next(chunks, None)
                    if nxt is None:
                        break
                    pending.append(self.pool.submit(ops, nxt[0], seed, epoch, nxt[1]))
                size = wire_bytes(batch)
                waited = self.link.send(size)
                with self.stats.lock:
                    self.stats.samples += batch.num_rows
                    self.stats.wire_bytes += size
                    self.stats.payload_bytes += batch.column("data").buffers()[2].size
                    self.stats.link_wait_seconds += waited
                # a cancelled call stops before building more; not asked before the last batch (asking polls
                # gRPC's completion queue while holding the GIL, and a cancelled call drops the batch anyway)
                if pending and context.is_cancelled():
                    return
                yield batch
        finally:
            with self.stats.lock:
                self.stats.in_flight -= 1
            lease.release()
            for f in pending:
                self.pool.discard(f, account=self._add)

    def _count_error(self, kind: str) -> None:
        with self.stats.lock:
            self.stats.errors += 1
            self.stats.errors_by_kind[kind] = self.stats.errors_by_kind.get(kind, 0) + 1

    def list_actions(self, context):  # noqa: ANN001, ANN201
        return [("health", "liveness and what this node holds"), ("stats", "counters since start"),
                ("manifest", "the store's manifest"),
                ("profile", "run an op chain on n samples: per-stage seconds and output bytes"),
                ("capabilities", "ops and their versions, op import errors, engines, cores, memory"),
                ("scrub", "check every copy this node holds (indexes, samples, tar bytes)"),
                ("shard_index", "this node's verified index of a shard (base64), for a repair elsewhere"),
                ("repair", "rebuild this node's copy of a shard from its good samples and the ones sent"),
                ("shutdown", "stop the server (only with --allow-shutdown)"), *derive.ACTIONS.items()]

    def do_action(self, context, action):  # noqa: ANN001, ANN201
        kind = action.type
        body = action.body.to_pybytes() if action.body is not None else b""
        self._follow_manifest()
        if kind in derive.ACTIONS:  # jobs and queries (node/derive.py)
            yield from self._derived(kind, body)
            return
        if kind == "health":
            man = self.store.manifest
            held = [s.name for i, s in enumerate(man.shards) if self.store.holds(i)]
            result = {"ok": True, "node": self.node_id, "dataset": man.name, "samples": man.num_samples,
                      "shards_held": len(held), "workers": self.workers, "worker_kind": self.pool.kind,
                      "worker_restarts": self.pool.restarts, "worker_pids": self.pool.pids, "link_bytes_per_s": self.link.rate,
                      "slowdown": self.slowdown, "cpus": sorted(os.sched_getaffinity(0)),
                      "pid": os.getpid()}
        elif kind == "stats":
            result = {**self.stats.snapshot(), "cpu_seconds": self.pool.cpu_seconds(), "streams": self.limits.snapshot()}
        elif kind == "manifest":
            result = json.loads(self.store.manifest.dumps())
        elif kind == "profile":
            result = self._profile(body)
        elif kind == "capabilities":
            result = self.capabilities()
        elif kind in ("scrub", "shard_index", "repair"):
            result = self._maintenance(kind, body)
        elif kind == "shutdown":
            if not self.allow_shutdown:
                raise self._bad("shutdown is not allowed on this node (start it with --allow-shutdown)")
            threading.Thread(target=self.shutdown, daemon=True).start()
            result = {"ok": True}
        else:
            raise self._bad(f"unknown action {kind!r}; actions: {', '.join(n for n, _ in self.list_actions(None))}")
        yield flight.Result(json.dumps(result).encode())

    def _derived(self, kind: str, body: bytes) -> Iterator[flight.Result]:
        try:
            results = derive.handle(self, kind, body)
        except WorkerCrashedError as exc:
            self._count_error("worker_crash")
            raise flight.FlightUnavailableError(f"node {self.node_id}: {exc}") from None
        except derive.NodeCopyError as exc:
            self._count_error("checksum")
            raise flight.FlightServerError(f"node {self.node_id}: {exc}") from None
        except (NearstoreError, ValueError) as exc:
            raise self._bad(f"{kind}: {exc}") from None
        for r in results:
            yield flight.Result(r)

    def _maintenance(self, kind: str, body: bytes) -> dict:
        """Scrub and repair through the node (``nearstore scrub --cluster``): no shell access to hosts needed."""
        try:
            req = json.loads(body or b"{}")
            if not isinstance(req, dict):
                raise ValueError(f"{kind} body must be a JSON object")
            man = self.store.manifest
            if kind == "scrub":
                return {"node": self.node_id, "copies": node_scrub(self.store)}
            entry = next((e for e in man.shards if e.name == req.get("shard")), None)
            if entry is None or not self.store.holds(man.shards.index(entry)):
                raise ValueError(f"shard {str(req.get('shard'))[:80]!r} is not held by node {self.node_id}")
            if kind == "shard_index":
                return {"node": self.node_id, "index": node_shard_index(self.store, entry)}
            return {"node": self.node_id, **node_repair(self.store, entry, req)}
        except (ValueError, TypeError, NearstoreError, binascii.Error) as exc:
            raise self._bad(f"bad {kind} request: {exc}") from None

    def _profile(self, body: bytes) -> dict:
        try:
            req = json.loads(body or b"{}")
            if not isinstance(req, dict):
                raise ValueError("profile body must be a JSON object {ops, n, seed}")
            n = int(req.get("n", 16))
            if not 1 <= n <= MAX_PROFILE_SAMPLES:
                raise ValueError(f"n must be in 1..{MAX_PROFILE_SAMPLES}")
            self._pipeline(list(req.get("ops", [])))
        except (ValueError, TypeError, NearstoreError) as exc:
            raise self._bad(f"bad profile request: {exc}") from None
        try:
            return self.pool.profile(list(req.get("ops", [])), n)  # on a worker: the processes that serve
        except NearstoreError as exc:
            raise flight.FlightServerError(f"node {self.node_id}: {exc}") from None

    def close(self) -> None:
        self.pool.close()
        self.work.close()


def _engine_version(engine: str) -> str | None:
    """The installed version of the package behind a network engine (read from metadata: nothing imported)."""
    dist = "torch" if engine == "pytorch" else engine.split("-")[0]
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_list(text: str) -> list[int]:
    try:
        cpus = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cpus takes CPU numbers separated by commas (e.g. 1 or 2,3), got {text!r}") from None
    if not cpus or min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"--cpus takes CPU numbers >= 0, got {text!r}")
    return cpus


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nearstore node serve", description="Serve one node directory over Flight.")
    ap.add_argument("--data", required=True, help="the node directory (STORE/node-XXX)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    ap.add_argument("--port", type=int, default=0, help="port (0: any free port, printed on start)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes running ops (default 2)")
    ap.add_argument("--worker-kind", choices=WORKER_KINDS, default="process",
                    help="process (default): a crash in a decoder costs one request; thread: no process hop")
    ap.add_argument("--link-mbps", type=float, default=None,
                    help="cap on bytes sent, in MB/s (10^6 bytes per second): emulates the link")
    ap.add_argument("--token", default=None,
                    help="require this bearer token (default: NEARSTORE_TOKEN or the file NEARSTORE_TOKEN_FILE names)")
    ap.add_argument("--token-file", default=None, help="require the bearer token stored in this file")
    ap.add_argument("--tls-cert", default=None, help="serve TLS with this PEM certificate (needs --tls-key)")
    ap.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    ap.add_argument("--slowdown", type=float, default=1.0,
                    help="emulate a weaker CPU: ops that used C seconds of CPU take slowdown x C (the worker "
                         "idles for the rest), whatever else runs on the machine (default 1)")
    ap.add_argument("--allow-shutdown", action="store_true", help="honour the shutdown action")
    ap.add_argument("--metrics-port", type=int, default=None,
                    help="serve Prometheus metrics on this port (0: any free port; default: none)")
    ap.add_argument("--metrics-host", default=None, help="address the metrics endpoint binds (default: --host)")
    ap.add_argument("--log-level", default=os.environ.get(LOG_LEVEL_ENV, "INFO"), type=str.upper,
                    choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                    help="log to stderr at this level (DEBUG: one line per request; default INFO or $%s)"
                    % LOG_LEVEL_ENV)
    ap.add_argument("--ops-module", action="append", default=[], metavar="MODULE",
                    help="import ops from this module (dotted name or .py file; repeatable); one that fails to "
                         "import is reported by the capabilities action, and the node serves its other ops")
    ap.add_argument("--cpus", type=_cpu_list, default=None, metavar="LIST",
                    help="pin the node and its workers to these CPUs (e.g. 1 or 2,3): a storage host's own cores")
    args = ap.parse_args(argv)
    if args.cpus is not None:  # first, before any thread or worker process starts: they inherit it
        try:
            os.sched_setaffinity(0, args.cpus)
        except OSError as exc:
            ap.error(f"--cpus {','.join(map(str, args.cpus))}: {exc.strerror} (CPUs here: "
                     f"{sorted(os.sched_getaffinity(0))})")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    retain_freed_memory()  # this process is the server's own: reuse freed message buffers
    os.environ.update(MALLOC_ENV)  # and its worker processes (they inherit the environment)
    metrics = None
    try:
        if args.metrics_port is not None:  # first: a taken port fails the node before any worker starts
            metrics = MetricsServer(port=args.metrics_port, host=args.metrics_host or args.host)
        token = args.token or (read_token_file(args.token_file) if args.token_file else token_from_env())
        server = NodeServer(args.data, host=args.host, port=args.port, workers=args.workers,
                            worker_kind=args.worker_kind,
                            link_bytes_per_s=args.link_mbps * 1e6 if args.link_mbps else None, token=token,
                            tls_cert=args.tls_cert, tls_key=args.tls_key, slowdown=args.slowdown,
                            allow_shutdown=args.allow_shutdown, ops_modules=args.ops_module)
    except NearstoreError as exc:
        log.error("%s", exc)
        if metrics is not None:
            metrics.close()
        return 2
    if metrics is not None:
        metrics.add(NodeCollector(server))

    def stop(*_: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("node %s serving %s on port %d (%d %s workers, link cap %s)", server.node_id, args.data, server.port,
             args.workers, args.worker_kind, f"{args.link_mbps} MB/s" if args.link_mbps else "none")
    # the handshake with the launcher (start_cluster reads this one line), not a message for people
    ready = {"port": server.port, "node": server.node_id, "pid": os.getpid()}
    if metrics is not None:
        ready["metrics_port"] = metrics.port
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    server.serve()
    server.close()
    if metrics is not None:
        metrics.close()
    log.info("node %s stopped", server.node_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
