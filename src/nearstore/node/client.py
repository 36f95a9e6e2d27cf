"""Talking to nodes: a Flight client per node, and the loader source that fetches from a cluster.

``ClusterSource`` sends each node the ids of a batch that it holds (in order),
with the op prefix ops[0:k]; replies are checked against the crc32c the node
computed over its output, reassembled in batch order, and handed to the
loader, which runs ops[k:]. Bytes on the wire are counted per record batch.

Failover: a node that stops answering is marked down and the samples it owed
are asked of the next replica of their shard; rows of a broken stream are
dropped, so every sample is delivered exactly once, and the determinism
contract makes the replica's output bit-identical. A sample whose copy fails
its checksum on a node (or on the wire) is asked of another replica. A down
node is probed again every ``retry_after`` seconds and used again once it
answers ``health``. Nodes that can move (Ray actors, restarted on a new port)
come with a resolver: while such a node is down, a background thread asks it
for its current endpoint, and the next probe uses that.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow.flight as flight

from nearstore.core.checksum import crc32c
from nearstore.core.errors import ChecksumError, ConfigError, NearstoreError, SampleDecodeError
from nearstore.core.memory import retain_freed_memory
from nearstore.node.protocol import Row, Ticket, decode_rows, wire_bytes
from nearstore.node.resolve import RayResolver
from nearstore.node.spec import ClusterSpec, NodeEndpoint
from nearstore.ops.pipeline import Pipeline, input_spec_of
from nearstore.store.manifest import Manifest
from nearstore.store.sources import Fetched

__all__ = ["NodeUnavailableError", "NodeRequestError", "NodeClient", "ClusterSource", "message_bytes", "node_client",
           "Cancel", "RequestCancelled", "Latencies"]

log = logging.getLogger(__name__)
MIN_MESSAGE_BYTES, MAX_MESSAGE_BYTES = 2 << 20, 8 << 20
MESSAGE_SECONDS = 0.02  # a record batch is about this much time on a capped link
#: on an open link, a request asks each node for about this many bytes (``ClusterSource.batches_per_fetch``)
REQUEST_BYTES = 16 << 20


def message_bytes(link_mbps: float | None) -> int:
    """Bytes per record batch: ~20 ms of a capped link (2-8 MiB), 8 MiB on an open one.

    Small messages keep a slow link evenly busy; on a fast link every message
    costs the node and the loader a fixed amount of work (a worker task, a gRPC
    message, a contiguous receive buffer), so fewer, larger ones go faster.
    """
    if not link_mbps:
        return MAX_MESSAGE_BYTES
    return int(min(MAX_MESSAGE_BYTES, max(MIN_MESSAGE_BYTES, link_mbps * 1e6 * MESSAGE_SECONDS)))


# how gRPC words a stream cut by a peer that died (it is sometimes reported as an internal error)
_BROKEN = re.compile(r"RST_STREAM|Socket closed|Connection reset|connection refused|EOF|unavailable", re.I)


class NodeUnavailableError(NearstoreError, ConnectionError):
    """A node does not answer; the message names the endpoint and what to run."""


class NodeRequestError(NearstoreError, ValueError):
    """A node refused a request (the node's message is included)."""


class RequestCancelled(NearstoreError, RuntimeError):
    """A request was cancelled by its caller (the losing half of a hedged pair)."""


class Cancel:
    """Cancels one in-flight DoGet from another thread (the loser of a hedged pair)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reader: Any = None
        self.cancelled = False

    def bind(self, reader: Any) -> None:
        with self._lock:
            self._reader = reader
            if self.cancelled:
                reader.cancel()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._reader is not None:
                self._reader.cancel()


_RECHECK_S = 0.1  # how often a waiting batch looks at its hedge deadlines again


class Latencies:
    """How long recent requests took, and how long a busy node went between answers: the hedge deadlines.

    Two clocks, either one hedges a request (``due``):

    - *latency*: the request has run ``max(floor, factor x percentile)`` of recent request latencies
      (``deadline()``), counted from when it was sent. Catches a node that answers others but not this one.
    - *silence*: its node has sent nothing (no record batch, to any request) for ``max(floor, factor x
      percentile)`` of recent *gaps* (``silence()``), counted from the later of when the request was sent and
      the node's last progress. A gap is the time from the later of a request's sending and the node's previous
      progress to its next (``progress()``): a node working through a queue of prefetched requests makes
      progress every gap even though each request waited for the ones before it, so a hung node is found after
      a couple of gaps, not after a couple of whole queued latencies.

    Until ``warmup`` values are known, each deadline is ``factor x`` the largest value seen so far (the first
    answers of every node, start-up costs included), and ``initial`` until the first one. The silence deadline
    is never above ``cap``: a node silent that long is hedged however slow the cluster has been (a spurious
    hedge costs a replica some work and is undone by the prober; a missed one stalls training). The latency
    deadline has no cap: on a slow link every request may take longer, while record batches keep arriving.
    The floor (0.5 s) keeps a busy host's hiccups (a descheduled worker) from hedging, and leaves the
    replica's answer room within a 1 s stall.
    """

    def __init__(self, *, percentile: float = 95.0, factor: float = 2.0, floor: float = 0.5,
                 initial: float = 1.0, cap: float = 2.0, window: int = 128, warmup: int = 8) -> None:
        if not 50.0 <= percentile <= 100.0 or factor < 1.0 or floor <= 0 or initial <= 0 or cap < floor:
            raise ConfigError("hedging: percentile must be in 50..100, factor >= 1, floor and initial > 0, "
                              f"cap >= floor (got percentile {percentile}, factor {factor}, floor {floor}, "
                              f"initial {initial}, cap {cap})")
        self.percentile, self.factor, self.floor, self.initial, self.cap = percentile, factor, floor, initial, cap
        self.warmup = warmup
        self._seen: deque[float] = deque(maxlen=window)
        self._gaps: deque[float] = deque(maxlen=window)
        self._last: dict[int, float] = {}  # node -> monotonic time of its last progress
        self._memo: dict[int, float] = {}  # id(values) -> its statistic, until a value is added (asked per check)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        """A request was answered in full ``seconds`` after it was sent."""
        with self._lock:
            self._seen.append(seconds)
            self._memo.pop(id(self._seen), None)

    def progress(self, node: int, sent: float, now: float | None = None) -> None:
        """``node`` sent part of an answer (a record batch) to a request sent at ``sent`` (monotonic): the gap
        since its previous progress, or since ``sent`` if it had none since, is learned."""
        now = time.monotonic() if now is None else now
        with self._lock:
            last = self._last.get(node, sent)
            self._gaps.append(max(0.0, now - max(sent, last)))
            self._memo.pop(id(self._gaps), None)
            self._last[node] = max(now, last)

    def _of(self, values: deque, cap: float = float("inf")) -> float:
        v = self._memo.get(id(values))
        if v is None:
            if not values:
                v = self.initial
            elif len(values) < self.warmup:
                v = self.factor * max(values)
            else:
                v = self.factor * float(np.percentile(np.fromiter(values, float), self.percentile))
            self._memo[id(values)] = v
        return min(cap, max(self.floor, v))

    def deadline(self) -> float:
        with self._lock:
            return self._of(self._seen)

    def silence(self) -> float:
        with self._lock:
            return self._of(self._gaps, self.cap)

    def due(self, node: int, sent: float) -> float:
        """When a request sent to ``node`` at ``sent`` (monotonic) is hedged if still unanswered."""
        with self._lock:
            quiet_since = max(sent, self._last.get(node, sent))  # the node's last progress, if after ``sent``
            return min(sent + self._of(self._seen), quiet_since + self._of(self._gaps, self.cap))


@dataclass(eq=False)
class _Attempt:
    """One request of a race: a node asked for some of the race's samples."""

    node: int
    positions: list[int]
    future: Future
    cancel: Cancel
    started: float

    def outcome(self) -> tuple[str, Any]:
        """('running', None), ('ok', rows), ('down', NodeUnavailableError) or ('error', other exception)."""
        if not self.future.done():
            return "running", None
        exc = self.future.exception()
        if exc is None:
            return "ok", self.future.result()
        return ("down" if isinstance(exc, NodeUnavailableError) else "error"), exc


@dataclass(eq=False)
class _Race:
    """A node's share of a batch, and the hedge asked of replicas once it ran past its deadline.

    The first *complete* answer wins: the primary's rows, or the rows of every hedge request.
    """

    primary: _Attempt
    hedge: bool  # whether it may be hedged at all (``ClusterSource(hedge=False)``: never)
    hedges: list[_Attempt] = field(default_factory=list)
    hedged: bool = False
    primary_failed: bool = False
    hedge_failed: bool = False


class NodeClient:
    """Flight client for one node; thread-safe (one gRPC channel)."""

    def __init__(self, uri: str, *, node: int | None = None, token: str | None = None, timeout: float = 60.0,
                 hint: str = "", tls_root_certs: bytes | None = None) -> None:
        self.uri, self.node, self.timeout = uri, node, timeout
        self._client = flight.FlightClient(uri, tls_root_certs=tls_root_certs) if tls_root_certs else \
            flight.FlightClient(uri)
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._opts = flight.FlightCallOptions(headers=headers, timeout=timeout)
        self._hint = hint or "start it with `nearstore up STORE` or `nearstore node serve --data STORE/node-XXX`"

    def _fail(self, exc: Exception) -> NearstoreError:
        if isinstance(exc, (flight.FlightUnavailableError, flight.FlightTimedOutError, ConnectionError)) or (
                isinstance(exc, flight.FlightInternalError) and _BROKEN.search(str(exc))):
            said = str(exc).split(". Detail:")[0]
            if "worker process died" in said:  # the node is up but lost a worker: say so, not "start it"
                return NodeUnavailableError(f"node {self.node} at {self.uri} is restarting its workers: {said}")
            return NodeUnavailableError(f"node {self.node} at {self.uri} is not answering ({type(exc).__name__}); "
                                        f"{self._hint}")
        msg = str(exc).split(". Detail:")[0]
        return NodeRequestError(f"node {self.node} at {self.uri} refused the request: {msg}")

    def action(self, name: str, body: dict | None = None) -> Any:
        try:
            results = list(self._client.do_action(flight.Action(name, json.dumps(body or {}).encode()), self._opts))
        except (flight.FlightError, OSError) as exc:
            raise self._fail(exc) from None
        return json.loads(results[0].body.to_pybytes())

    def action_raw(self, name: str, body: bytes) -> list[bytes]:
        """Every result of action ``name`` as bytes (for actions that answer JSON and then data)."""
        try:
            return [r.body.to_pybytes() for r in self._client.do_action(flight.Action(name, body), self._opts)]
        except (flight.FlightError, OSError) as exc:
            raise self._fail(exc) from None

    def health(self) -> dict:
        return self.action("health")

    def stats(self) -> dict:
        return self.action("stats")

    def profile(self, ops: list[dict], n: int = 16) -> dict:
        return self.action("profile", {"ops": ops, "n": n})

    def manifest(self) -> Manifest:
        return Manifest.model_validate(self.action("manifest"))

    def capabilities(self) -> dict:
        return self.action("capabilities")

    def get(self, ticket: Ticket, on_message: Callable[[int], None] | None = None,
            cancel: "Cancel | None" = None) -> tuple[list, int]:
        """All record batches of a DoGet and the wire bytes they took.

        ``on_message(nbytes)`` is called as each record batch arrives (for rate accounting);
        ``cancel.cancel()`` from another thread ends the call (``RequestCancelled``).
        """
        batches, total = [], 0
        try:
            reader = self._client.do_get(flight.Ticket(ticket.encode()), self._opts)
            if cancel is not None:
                cancel.bind(reader)
            for chunk in reader:
                n = wire_bytes(chunk.data)
                batches.append(chunk.data)
                total += n
                if on_message is not None:
                    on_message(n)
        except (flight.FlightError, OSError) as exc:
            if cancel is not None and cancel.cancelled:
                raise RequestCancelled(f"request to node {self.node} cancelled") from None
            raise self._fail(exc) from None
        return batches, total

    def close(self) -> None:
        self._client.close()


def node_client(spec: ClusterSpec, node: int, *, timeout: float = 60.0, uri: str | None = None) -> NodeClient:
    """The client of node ``node`` of ``spec``: the one place a client is built from a cluster spec, so
    every caller passes the cluster's token and TLS root certificate. ``uri``: where the node answers now,
    when it moved since the spec was written (a restarted Ray actor)."""
    if uri is None:
        ep = next((e for e in spec.nodes if e.node == node), None)
        if ep is None:
            raise ConfigError(f"node {node} is not in the cluster (nodes {[e.node for e in spec.nodes]})")
        uri = ep.uri
    return NodeClient(uri, node=node, token=spec.token, timeout=timeout, tls_root_certs=spec.root_certs())


class ClusterSource:
    """A loader source backed by node servers; ``prefix`` ops run on the nodes.

    ``split`` is one split for every sample (an op index, "host" or "node"),
    or a function from sample ids to one split per sample: the node then runs
    each sample to its own depth, each row says how far (``Fetched.prefix``),
    and the loader finishes the rest.

    ``stats()`` reports failovers (node, when, how long the batch waited),
    samples re-fetched from a replica, and nodes that rejoined.
    """

    def __init__(self, cluster: ClusterSpec, pipeline: Pipeline,
                 split: int | str | Callable[[np.ndarray], Sequence[int]], *, streams_per_node: int = 4,
                 timeout: float = 120.0, retry_after: float = 1.0,
                 resolve: Callable[[int], NodeEndpoint | None] | None = None, hedge: bool = True,
                 latencies: Latencies | None = None) -> None:
        self.cluster = cluster
        self._uris = {ep.node: ep.uri for ep in cluster.nodes}  # where each node answers now
        # a node that can move (a Ray actor restarted on another port) is asked where it went
        self._resolve = resolve if resolve is not None else RayResolver(cluster) if cluster.ray_address else None
        self._watching: set[int] = set()
        self._closed = threading.Event()
        self.hedge = hedge
        self.latencies = latencies or Latencies()
        self._slow: dict[int, float] = {}  # node -> when a request to it ran past the hedge deadline
        self.hedges: list[dict] = []
        self._closing = threading.Event()
        self._prober = ThreadPoolExecutor(1, thread_name_prefix="nearstore-probe")
        retain_freed_memory()  # every message is a fresh multi-MB receive buffer: keep those pages mapped
        self._pipeline = pipeline
        self._split_of = split if callable(split) else None
        self.prefix = len(pipeline.ops) if callable(split) else pipeline.resolve_split(split)
        self._ops = pipeline.to_json()[: self.prefix]
        self._timeout, self.retry_after = timeout, retry_after
        self.clients = {ep.node: self._client(ep.node) for ep in cluster.nodes}
        if not self.clients:
            raise ConfigError("the cluster has no nodes")
        self._down: dict[int, tuple[float, str]] = {}  # node -> (when marked down, why)
        self.manifest = self._first_manifest()
        self._check_ops(pipeline.ops[: self.prefix])  # before any data moves
        specs = pipeline.declare(input_spec_of(self.manifest))
        splits = pipeline.valid_splits if callable(split) else [self.prefix]
        per_sample = max(specs[k].bytes for k in splits) or 1.0
        self._rows_per_message = max(1, int(message_bytes(cluster.link_mbps) // per_sample))
        self._per_sample = per_sample
        self._firsts = np.array([s.first for s in self.manifest.shards], np.int64)
        # + 2 per node: a hedged request's primary may sit on a thread until its node answers again
        self._io = ThreadPoolExecutor(max(1, (streams_per_node + 2) * len(self.clients)),
                                      thread_name_prefix="nearstore-fetch")
        self._lock = threading.Lock()
        self.wire_bytes = 0
        self.payload_bytes = 0
        self.wire_by_node: dict[int, int] = {n: 0 for n in self.clients}
        self.samples_by_node: dict[int, int] = {n: 0 for n in self.clients}
        self.samples_received = 0
        self.failovers: list[dict] = []
        self.rejoined: list[dict] = []
        self.placements: list[dict] = []  # manifests taken after a rebalance
        self.refetched = 0

    def _client(self, node: int, timeout: float | None = None) -> NodeClient:
        return node_client(self.cluster, node, timeout=timeout or self._timeout, uri=self._uris.get(node))

    def _first_manifest(self) -> Manifest:
        errors = []
        for node, client in self.clients.items():
            try:
                return client.manifest()
            except NodeUnavailableError as exc:
                self._down[node] = (time.monotonic(), str(exc))
                errors.append(str(exc))
        raise NodeUnavailableError("no node of the cluster answers: " + " | ".join(errors))

    def _check_ops(self, ops: list) -> None:
        """Refuse a pipeline whose node-side ops a node lacks (or has in another version), naming both."""
        if not ops:
            return
        problems = []
        for node, client in self.clients.items():
            if node in self._down:
                continue  # asked again when it comes back: a node without the op then refuses the ticket
            try:
                caps = client.capabilities()
            except NodeUnavailableError as exc:
                self._down[node] = (time.monotonic(), str(exc))
                continue
            have = caps.get("ops", {})
            for op in ops:
                mine = type(op).version
                if op.name not in have:
                    failed = caps.get("import_errors") or {}
                    why = ("; op modules that failed to import there: "
                           + "; ".join(f"{src}: {err.strip().splitlines()[-1]}" for src, err in failed.items())
                           if failed else "")
                    problems.append(f"node {node} at {client.uri} has no op {op.name!r} (its ops: "
                                    f"{', '.join(sorted(have))}){why}")
                elif have[op.name].get("version") != mine:
                    problems.append(f"node {node} at {client.uri} has op {op.name!r} version "
                                    f"{have[op.name].get('version')!r}, this host has {mine!r}")
        if problems:
            raise NodeRequestError("the pipeline's node-side ops cannot run on every node: " + "; ".join(problems)
                                   + ". Serve the op module on the nodes (`nearstore up STORE --ops-module M`, "
                                   "or the nearstore.ops entry point), or split before that op")

    # -- which node serves a shard ---------------------------------------------------
    def _is_up(self, node: int, *, now: bool = False) -> bool:
        """Whether ``node`` answers; a down node is probed every ``retry_after`` s (``now``: at once)."""
        with self._lock:
            down = self._down.get(node)
        if down is None:
            return True
        if not now and time.monotonic() - down[0] < self.retry_after:
            return False
        fresh = self._client(node, timeout=2.0)  # a new channel: gRPC's reconnect backoff would delay a restart
        try:
            fresh.health()
        except NearstoreError as exc:
            fresh.close()
            with self._lock:
                self._down[node] = (time.monotonic(), str(exc))
            return False
        fresh.close()
        with self._lock:
            if node in self._down:
                del self._down[node]
                old, self.clients[node] = self.clients[node], self._client(node)
                old.close()
                self.rejoined.append({"node": node, "at": time.time()})
                log.info("node %d answers again; using it", node)
        return True

    def _node_for(self, shard: int, exclude: set[int] = frozenset()) -> int | None:  # type: ignore[assignment]
        """A node that holds ``shard`` and answers, primary first; None when every copy was excluded."""
        entry = self.manifest.shards[shard]
        candidates = [n for n in entry.nodes if n in self.clients and n not in exclude]
        if not candidates:
            return None
        up = [n for n in candidates if self._is_up(n)]
        if not up:  # every copy looks down: probe them now (one may have restarted within retry_after)
            up = [n for n in candidates if self._is_up(n, now=True)]
        if up:
            with self._lock:
                fast = [n for n in up if n not in self._slow]
            return fast[0] if fast else up[0]  # a slow node only when no other copy answers
        with self._lock:
            why = "; ".join(f"node {n}: {self._down[n][1]}" for n in candidates if n in self._down)
        raise NodeUnavailableError(
            f"shard {entry.name} has no live replica: it lives on nodes {entry.nodes} and none answers ({why}). "
            "Restart them (`nearstore up STORE`), or ingest with more --replicas")

    # -- fetching ----------------------------------------------------------------------
    def batches_per_fetch(self, batch_size: int) -> int:
        """Loader batches per ``fetch``. Each request costs a node and the loader about 2-3 ms of CPU whatever
        its size (a gRPC call, a ticket, a worker task: measured on loopback), which on an open link, where
        CPU is the limit, is a tenth of a 64-sample batch of 224x224 uint8 from 2 nodes; so there a request
        asks each node for about ``REQUEST_BYTES``. On a capped link the link is the limit: one batch per
        request keeps it evenly busy."""
        if self.cluster.link_mbps:
            return 1
        per_node = batch_size * self._per_sample / len(self.clients)
        return max(1, round(REQUEST_BYTES / per_node))

    def fetch(self, ids: np.ndarray, *, epoch: int, seed: int = 0, into: np.ndarray | None = None) -> list[Fetched]:
        """The samples ``ids``, each from a node that holds it (a replica when a copy is bad or a node is down).

        ``into`` (the batch's output array, one slot per id): a sample whose every op ran on its node is
        copied into ``into[i]`` and its crc32c checked over that copy while it is in cache (one read of the
        received bytes from memory instead of two: the check, then the loader's batch copy); its
        ``Fetched.data`` is then ``into[i]``.
        """
        shards = (np.searchsorted(self._firsts, ids, side="right") - 1).tolist()
        out: list[Fetched | None] = [None] * len(ids)
        tried: dict[int, set[int]] = defaultdict(set)  # position -> nodes whose copy failed
        problems: dict[int, list[tuple[str, str]]] = defaultdict(list)
        todo = list(range(len(ids)))
        t0 = time.monotonic()
        refreshes = rounds = 0
        while todo:
            rounds += 1
            if rounds > 50:  # every round either delivers, or marks a node down or a copy bad: this never loops
                raise NodeUnavailableError(f"gave up on {len(todo)} samples after 50 rounds of re-asking replicas "
                                           f"({self.stats()})")
            groups: dict[int, list[int]] = defaultdict(list)
            picked: dict[int, int | None] = {}  # shard -> its node this round, for samples no node failed yet
            for pos in todo:
                untried = not tried[pos]
                if untried and shards[pos] in picked:
                    node = picked[shards[pos]]
                else:
                    node = self._node_for(shards[pos], tried[pos])
                    if untried:
                        picked[shards[pos]] = node
                if node is None and refreshes < 2 and any("cannot read" in m or "missing" in m or "No such" in m
                                                          for _, m in problems[pos]):
                    refreshes += 1  # copies gone, not bad: a rebalance may have moved them
                    self._refresh_manifest()
                    picked.clear()
                    tried[pos] = set()
                    node = self._node_for(shards[pos], tried[pos])
                if node is None:  # every copy was bad: an error for this sample, never its bytes
                    entry = self.manifest.shards[shards[pos]]
                    key = problems[pos][-1][0] if problems[pos] else f"#{int(ids[pos])}"
                    out[pos] = Fetched(int(ids[pos]), key, -1, entry.name, None, 0, ChecksumError(
                        f"shard {entry.name}, key {key}: no good copy on nodes {entry.nodes}: "
                        + " | ".join(msg for _, msg in problems[pos])))
                    continue
                groups[node].append(pos)
            races = [self._race(node, positions, ids, epoch, seed) for node, positions in groups.items()]
            todo = []
            for node, positions, rows in self._settle(races, shards, tried, ids, epoch, seed, t0):
                if rows is None:  # no complete answer: ask again (down nodes are skipped next round)
                    todo.extend(positions)
                    continue
                for pos, row in zip(positions, rows):
                    f = self._accept(node, pos, shards[pos], row, problems, into)
                    if f is None:
                        tried[pos].add(node)
                        todo.append(pos)
                    else:
                        out[pos] = f
            if todo:
                with self._lock:
                    self.refetched += len(todo)
        self._close_failovers(t0)
        return out  # type: ignore[return-value]

    def _accept(self, node: int, pos: int, shard: int, row: Row, problems: dict,
                into: np.ndarray | None = None) -> Fetched | None:
        """The Fetched for a received row, or None when this copy is bad and another replica should be asked.
        Its crc32c is checked here, over ``into[pos]`` after copying it there when the row is final output."""
        name = self.manifest.shards[shard].name
        if row.error_kind == "decode":  # the sample itself is bad: every replica would fail the same way
            return Fetched(row.sample, row.key, row.label, name, None, 0, SampleDecodeError(row.error or ""))
        if row.error_kind is not None:
            problems[pos].append((row.key, row.error or row.error_kind))
            return None
        value = row.value
        ok = row.crc_ok
        if ok is None:  # not checked on arrival (decode_rows(verify=False)): check it now, over what is kept
            if (into is not None and isinstance(value, np.ndarray) and value.shape == into.shape[1:]
                    and value.dtype == into.dtype and (self.prefix if row.prefix is None else row.prefix)
                    == len(self._pipeline.ops)):
                into[pos] = value  # the batch's slot: nothing left to run on the host
                value = into[pos]
            check = value.reshape(-1).view(np.uint8) if isinstance(value, np.ndarray) else value
            ok = crc32c(check) == row.crc
        if not ok:
            problems[pos].append((row.key, f"node {node}: crc32c of the data it sent does not match; the bytes "
                                           "were corrupted between node and loader"))
            return None
        return Fetched(row.sample, row.key, row.label, name, value, row.nbytes, prefix=row.prefix)

    def _mark_down(self, node: int, exc: Exception, t0: float, samples: int) -> None:
        with self._lock:
            if node not in self._down:
                self._down[node] = (time.monotonic(), str(exc))
                log.warning("node %d is down, asking replicas for its %d samples: %s", node, samples, exc)
                if self._resolve is not None and node not in self._watching:
                    self._watching.add(node)
                    threading.Thread(target=self._follow, args=(node,), daemon=True,
                                     name=f"nearstore-resolve-{node}").start()
            self.failovers.append({"node": node, "error": str(exc), "at": time.time(), "samples": samples,
                                   "detected_s": time.monotonic() - t0, "_t0": t0})

    def _follow(self, node: int) -> None:
        """While ``node`` is down, ask where it serves now; a new endpoint is used from the next probe on."""
        assert self._resolve is not None
        try:
            while not self._closed.is_set():
                with self._lock:
                    if node not in self._down:
                        return
                    old = self._uris[node]
                ep = self._resolve(node)
                if ep is not None and ep.uri != old:
                    with self._lock:
                        self._uris[node] = ep.uri
                    log.info("node %d moved: %s -> %s", node, old, ep.uri)
                    return
                self._closed.wait(self.retry_after)
        finally:
            with self._lock:
                self._watching.discard(node)

    def _close_failovers(self, t0: float) -> None:
        with self._lock:
            for ev in self.failovers:
                if ev.get("_t0") == t0:
                    ev["batch_wait_s"] = time.monotonic() - t0
                    del ev["_t0"]

    # -- hedged requests ------------------------------------------------------------------
    def _attempt(self, node: int, positions: list[int], ids: np.ndarray, epoch: int, seed: int) -> _Attempt:
        cancel = Cancel()
        started = time.monotonic()
        fut = self._io.submit(self._get, node, [int(ids[p]) for p in positions], epoch, seed, cancel, started)
        fut.add_done_callback(lambda f: self._answered(f, cancel, started))
        return _Attempt(node, positions, fut, cancel, started)

    def _answered(self, fut: Future, cancel: Cancel, sent: float) -> None:
        """A complete answer's latency, as it arrives (each message it took was the node's progress, noted as
        it came). The loser of a race never counts: a hung node's answers after it resumes would teach the
        deadlines the length of the hang."""
        if not fut.cancelled() and not cancel.cancelled and fut.exception() is None:
            self.latencies.add(time.monotonic() - sent)

    def _race(self, node: int, positions: list[int], ids: np.ndarray, epoch: int, seed: int) -> _Race:
        return _Race(self._attempt(node, positions, ids, epoch, seed), self.hedge)

    def _due(self, r: _Race) -> float:
        """When ``r`` is hedged if its primary has not answered (live: earlier answers move it)."""
        return self.latencies.due(r.primary.node, r.primary.started) if r.hedge else float("inf")

    def _hedge(self, race: _Race, shards: list[int], tried: dict, ids: np.ndarray, epoch: int, seed: int) -> None:
        """Ask other replicas for every sample of ``race``; the node it waits on is marked slow."""
        race.hedged = True
        slow = race.primary.node
        by_node: dict[int, list[int]] = defaultdict(list)
        try:
            for pos in race.primary.positions:
                alt = self._node_for(shards[pos], tried[pos] | {slow})
                if alt is None:
                    return  # a sample with no other copy: only the primary can answer
                by_node[alt].append(pos)
        except NodeUnavailableError:
            return
        self._mark_slow(slow)
        race.hedges = [self._attempt(n, pos, ids, epoch, seed) for n, pos in by_node.items()]
        with self._lock:
            self.hedges.append({"node": slow, "at": time.time(), "after_s": time.monotonic() - race.primary.started,
                                "samples": len(race.primary.positions), "replicas": sorted(by_node)})

    def _settle(self, races: list[_Race], shards: list[int], tried: dict, ids: np.ndarray, epoch: int, seed: int,
                t0: float) -> list[tuple[int, list[int], list[Row] | None]]:
        """Wait for every race; each yields (node, positions, rows) once, from the first complete answer
        (rows None: no answer, ask again). The loser of a won race is cancelled and its rows never used."""
        done: list[tuple[int, list[int], list[Row] | None]] = []
        running = list(races)
        try:
            while running:
                now = time.monotonic()
                for r in running:
                    if not r.hedged and now >= self._due(r) and not r.primary.future.done():
                        self._hedge(r, shards, tried, ids, epoch, seed)
                still = []
                for r in running:
                    result = self._outcome(r, t0)
                    if result is None:
                        still.append(r)
                    else:
                        done.extend(result)
                running = still
                if not running:
                    break
                live = [a.future for r in running for a in (r.primary, *r.hedges) if not a.future.done()]
                waits = [self._due(r) - time.monotonic() for r in running if not r.hedged and r.hedge]
                # at most _RECHECK_S: answers to other batches' requests (other threads) move the deadlines
                wait(live, timeout=min(_RECHECK_S, max(0.0, min(waits))) if waits else None,
                     return_when=FIRST_COMPLETED)
        except BaseException:
            for r in running:
                for a in (r.primary, *r.hedges):
                    a.cancel.cancel()
            raise
        return done

    def _outcome(self, r: _Race, t0: float) -> list[tuple[int, list[int], list[Row] | None]] | None:
        """The race's result once it is decided, else None; raises a request error that is not 'down'."""
        state, value = r.primary.outcome()
        if state == "ok":
            for h in r.hedges:
                h.cancel.cancel()
            self._note_hedge(r, "primary")
            return [(r.primary.node, r.primary.positions, value)]
        if state == "error":
            if isinstance(value, NodeRequestError) and "does not hold" in str(value):
                self._refresh_manifest()  # a rebalance moved the shard: re-route with the newer placement
                return [(r.primary.node, r.primary.positions, None)]
            raise value
        if state == "down" and not r.primary_failed:
            r.primary_failed = True
            self._mark_down(r.primary.node, value, t0, len(r.primary.positions))
        if r.hedges and not r.hedge_failed:
            outs = [h.outcome() for h in r.hedges]
            if all(o[0] == "ok" for o in outs):
                r.primary.cancel.cancel()
                self._note_hedge(r, "hedge")
                return [(h.node, h.positions, o[1]) for h, o in zip(r.hedges, outs)]
            for h, (st, v) in zip(r.hedges, outs):
                if st == "error" and isinstance(v, NodeRequestError) and "does not hold" in str(v):
                    self._refresh_manifest()  # moved by a rebalance: the primary may still answer
                    r.hedge_failed = True
                elif st == "error":
                    raise v
                if st == "down":
                    r.hedge_failed = True
                    self._mark_down(h.node, v, t0, len(h.positions))
            if r.hedge_failed:
                for h in r.hedges:
                    h.cancel.cancel()
        hedge_open = bool(r.hedges) and not r.hedge_failed
        if r.primary_failed and not hedge_open:
            return [(r.primary.node, r.primary.positions, None)]
        return None

    def _note_hedge(self, r: _Race, winner: str) -> None:
        if r.hedges:
            with self._lock:
                for ev in reversed(self.hedges):
                    if ev["node"] == r.primary.node and "won" not in ev:
                        ev["won"] = winner
                        ev["waited_s"] = time.monotonic() - r.primary.started
                        break

    def _refresh_manifest(self) -> None:
        """Take the newest placement the nodes know (highest ``placement_epoch``) for the same dataset, and
        clients for nodes added to the cluster spec since (a rebalance that grew the cluster)."""
        for ep in list(self.cluster.nodes):
            with self._lock:
                if ep.node not in self.clients:
                    self._uris.setdefault(ep.node, ep.uri)
                    self.clients[ep.node] = self._client(ep.node)
                    self.wire_by_node.setdefault(ep.node, 0)
                    self.samples_by_node.setdefault(ep.node, 0)
        best = self.manifest
        for node in list(self.clients):
            with self._lock:
                if node in self._down or node in self._slow:
                    continue
            try:
                man = self.clients[node].manifest()
            except NearstoreError:
                continue
            if man.fingerprint != self.manifest.fingerprint:
                raise NodeRequestError(f"node {node} now serves different data (fingerprint {man.fingerprint}, "
                                       f"loader started with {self.manifest.fingerprint}); restart the loader")
            if man.placement_epoch > best.placement_epoch:
                best = man
        if best is not self.manifest:
            with self._lock:
                self.manifest = best
                self.placements.append({"at": time.time(), "placement_epoch": best.placement_epoch,
                                        "nodes": best.nodes})

    def _mark_slow(self, node: int) -> None:
        with self._lock:
            if node in self._slow or self._closing.is_set():
                return
            self._slow[node] = time.monotonic()
        self._prober.submit(self._probe, node)

    def _probe(self, node: int) -> None:
        """Ask a slow node for ``health`` every ``retry_after`` seconds; it takes its shards back when it
        answers within the hedge deadline (off the fetch path: a hung node never stalls a batch here)."""
        while not self._closing.wait(self.retry_after):
            limit = max(1.0, self.latencies.deadline())
            probe = self._client(node, timeout=limit)
            try:
                t = time.monotonic()
                probe.health()
                if time.monotonic() - t <= limit:
                    with self._lock:
                        del self._slow[node]
                        self.rejoined.append({"node": node, "at": time.time(), "was": "slow"})
                    return
            except NearstoreError:
                pass
            finally:
                probe.close()

    def _prefixes(self, samples: list[int]) -> list[int] | None:
        """Each sample's split when it differs per sample (checked against the pipeline's valid splits)."""
        if self._split_of is None:
            return None
        got = [int(k) for k in self._split_of(np.asarray(samples, np.int64))]
        valid = set(self._pipeline.valid_splits)
        if len(got) != len(samples) or not set(got) <= valid:
            raise ConfigError(f"the per-sample split function gave {sorted(set(got) - valid) or len(got)} for "
                              f"{len(samples)} samples; it must give one valid split per sample "
                              f"({sorted(valid)})")
        return got

    def _get(self, node: int, samples: list[int], epoch: int, seed: int, cancel: Cancel | None = None,
             sent: float | None = None) -> list[Row]:
        t = Ticket(dataset=self.manifest.name, samples=samples, ops=self._ops, seed=seed, epoch=epoch,
                   batch_size=min(len(samples), self._rows_per_message), prefixes=self._prefixes(samples))
        def on_message(n: int) -> None:
            self._count(node, n)
            if sent is not None and not (cancel is not None and cancel.cancelled):  # a race's loser never counts
                self.latencies.progress(node, sent)

        batches, _ = self.clients[node].get(t, on_message=on_message, cancel=cancel)
        rows = [r for b in batches for r in decode_rows(b, verify=False)]  # checked by _accept
        with self._lock:
            self.payload_bytes += sum(r.nbytes for r in rows)
            self.samples_received += len(rows)
            self.samples_by_node[node] += len(rows)
        if [r.sample for r in rows] != samples:
            raise NodeRequestError(f"node {node} answered {len(rows)} samples out of order or incomplete")
        return rows

    def _count(self, node: int, nbytes: int) -> None:
        with self._lock:
            self.wire_bytes += nbytes
            self.wire_by_node[node] += nbytes

    def node_counters(self) -> dict[int, tuple[int, int]]:
        """node -> (wire bytes received, samples received) so far."""
        with self._lock:
            return {n: (self.wire_by_node[n], self.samples_by_node[n]) for n in self.wire_by_node}

    def stats(self) -> dict:
        with self._lock:
            return {"failovers": [dict(e) for e in self.failovers], "refetched": self.refetched,
                    "rejoined": list(self.rejoined), "down": {n: why for n, (_, why) in self._down.items()},
                    "hedges": [dict(e) for e in self.hedges], "slow": sorted(self._slow),
                    "placements": list(self.placements), "endpoints": dict(self._uris),  # where it asks each node now
                    "hedge_after_s": self.latencies.deadline(), "hedge_silence_s": self.latencies.silence()}

    def close(self) -> None:
        self._closed.set()
        self._closing.set()
        self._prober.shutdown(wait=True, cancel_futures=True)
        self._io.shutdown(wait=True, cancel_futures=True)
        for c in self.clients.values():
            c.close()
