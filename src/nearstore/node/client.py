"""Talking to nodes: a Flight client per node, and the loader source that fetches from a cluster.

``ClusterSource`` sends each node the ids of a batch that it holds (in order),
with the op prefix ops[0:k]; replies are checked against the crc32c the node
computed over its output, reassembled in batch order, and handed to the
loader, which runs ops[k:]. Bytes on the wire are counted per record batch.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import pyarrow.flight as flight

from nearstore.core.errors import ChecksumError, ConfigError, NearstoreError
from nearstore.loader.sources import Fetched
from nearstore.node.cluster import ClusterSpec
from nearstore.node.protocol import Ticket, decode_rows, wire_bytes
from nearstore.ops.pipeline import Pipeline, input_spec_of
from nearstore.store.manifest import Manifest

__all__ = ["NodeUnavailableError", "NodeRequestError", "NodeClient", "ClusterSource", "MESSAGE_BYTES"]

MESSAGE_BYTES = 2 << 20


class NodeUnavailableError(NearstoreError, ConnectionError):
    """A node does not answer; the message names the endpoint and what to run."""


class NodeRequestError(NearstoreError, ValueError):
    """A node refused a request (the node's message is included)."""


class NodeClient:
    """Flight client for one node; thread-safe (one gRPC channel)."""

    def __init__(self, uri: str, *, node: int | None = None, token: str | None = None, timeout: float = 60.0,
                 hint: str = "") -> None:
        self.uri, self.node = uri, node
        self._client = flight.FlightClient(uri)
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._opts = flight.FlightCallOptions(headers=headers, timeout=timeout)
        self._hint = hint or "start it with `nearstore up STORE` or `nearstore node serve --data STORE/node-XXX`"

    def _fail(self, exc: Exception) -> NearstoreError:
        if isinstance(exc, (flight.FlightUnavailableError, flight.FlightTimedOutError, ConnectionError)):
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

    def health(self) -> dict:
        return self.action("health")

    def stats(self) -> dict:
        return self.action("stats")

    def profile(self, ops: list[dict], n: int = 16) -> dict:
        return self.action("profile", {"ops": ops, "n": n})

    def manifest(self) -> Manifest:
        return Manifest.model_validate(self.action("manifest"))

    def get(self, ticket: Ticket, on_message: Callable[[int], None] | None = None) -> tuple[list, int]:
        """All record batches of a DoGet and the wire bytes they took.

        ``on_message(nbytes)`` is called as each record batch arrives (for rate accounting).
        """
        batches, total = [], 0
        try:
            for chunk in self._client.do_get(flight.Ticket(ticket.encode()), self._opts):
                n = wire_bytes(chunk.data)
                batches.append(chunk.data)
                total += n
                if on_message is not None:
                    on_message(n)
        except (flight.FlightError, OSError) as exc:
            raise self._fail(exc) from None
        return batches, total

    def close(self) -> None:
        self._client.close()


class ClusterSource:
    """A loader source backed by node servers; ``prefix`` ops run on the nodes."""

    def __init__(self, cluster: ClusterSpec, pipeline: Pipeline, split: int | str, *, streams_per_node: int = 4,
                 timeout: float = 120.0) -> None:
        self.cluster = cluster
        self.prefix = pipeline.resolve_split(split)
        self._ops = pipeline.to_json()[: self.prefix]
        self.clients = {ep.node: NodeClient(ep.uri, node=ep.node, token=cluster.token, timeout=timeout)
                        for ep in cluster.nodes}
        if not self.clients:
            raise ConfigError("the cluster has no nodes")
        first = next(iter(self.clients.values()))
        self.manifest = first.manifest()
        # record batches of about MESSAGE_BYTES keep a capped link evenly busy
        per_sample = pipeline.declare(input_spec_of(self.manifest))[self.prefix].bytes or 1.0
        self._rows_per_message = max(1, int(MESSAGE_BYTES // per_sample))
        self._firsts = np.array([s.first for s in self.manifest.shards], np.int64)
        self._io = ThreadPoolExecutor(max(1, streams_per_node * len(self.clients)),
                                      thread_name_prefix="nearstore-fetch")
        self._lock = threading.Lock()
        self.wire_bytes = 0
        self.payload_bytes = 0
        self.wire_by_node: dict[int, int] = {n: 0 for n in self.clients}
        self.samples_received = 0

    def _node_for(self, shard: int) -> int:
        for n in self.manifest.shards[shard].nodes:
            if n in self.clients:
                return n
        raise NodeUnavailableError(f"no node of the cluster holds shard {self.manifest.shards[shard].name} "
                                   f"(it lives on nodes {self.manifest.shards[shard].nodes})")

    def fetch(self, ids: np.ndarray, *, epoch: int, seed: int = 0) -> list[Fetched]:
        shards = np.searchsorted(self._firsts, ids, side="right") - 1
        groups: dict[int, list[int]] = defaultdict(list)
        for pos, s in enumerate(shards.tolist()):
            groups[self._node_for(s)].append(pos)
        futures = {
            node: self._io.submit(self._get, node, [int(ids[p]) for p in positions], epoch, seed)
            for node, positions in groups.items()
        }
        out: list[Fetched | None] = [None] * len(ids)
        for node, fut in futures.items():
            rows = fut.result()
            for pos, (sample, key, label, value, nbytes, ok) in zip(groups[node], rows):
                shard = self.manifest.shards[int(shards[pos])].name
                err = None if ok else ChecksumError(
                    f"shard {shard}, key {key}: crc32c of the data node {node} sent does not match; "
                    "the bytes were corrupted between node and loader")
                out[pos] = Fetched(sample, key, label, shard, value if ok else None, nbytes, err)
        return out  # type: ignore[return-value]

    def _get(self, node: int, samples: list[int], epoch: int, seed: int) -> list:
        t = Ticket(dataset=self.manifest.name, samples=samples, ops=self._ops, seed=seed, epoch=epoch,
                   batch_size=min(len(samples), self._rows_per_message))
        batches, _ = self.clients[node].get(t, on_message=lambda n: self._count(node, n))
        rows = [r for b in batches for r in decode_rows(b)]
        with self._lock:
            self.payload_bytes += sum(r[4] for r in rows)
            self.samples_received += len(rows)
        if [r[0] for r in rows] != samples:
            raise NodeRequestError(f"node {node} answered {len(rows)} samples out of order or incomplete")
        return rows

    def _count(self, node: int, nbytes: int) -> None:
        with self._lock:
            self.wire_bytes += nbytes
            self.wire_by_node[node] += nbytes

    def close(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)
        for c in self.clients.values():
            c.close()
