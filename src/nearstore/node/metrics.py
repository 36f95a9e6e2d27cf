"""What a storage node tells Prometheus (``nearstore node serve --metrics-port P``).

Every metric is read from the node's own counters at scrape time (nothing is
added to the request path) and carries the label ``node``. Counters
(``_total``) only grow; take their ``rate()``. ``docs/multihost.md`` says what
each one means and what to watch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client.core import Metric

from nearstore.core.metrics import family

if TYPE_CHECKING:  # the server builds the collector; no import at run time (server imports this module)
    from nearstore.node.server import NodeServer

__all__ = ["NodeCollector", "NODE_METRICS"]

# name -> (type, help); the names the docs and `nearstore top` rely on
NODE_METRICS = {
    "nearstore_node_requests": ("counter", "DoGet requests accepted"),
    "nearstore_node_requests_in_flight": ("gauge", "DoGet streams being served now"),
    "nearstore_node_samples": ("counter", "samples sent"),
    "nearstore_node_sent_bytes": ("counter", "bytes sent on the wire (Arrow IPC messages)"),
    "nearstore_node_payload_bytes": ("counter", "bytes of sample outputs sent (without framing)"),
    "nearstore_node_read_bytes": ("counter", "bytes read from shards"),
    "nearstore_node_read_seconds": ("counter", "seconds workers spent reading and verifying samples"),
    "nearstore_node_op_seconds": ("counter", "seconds workers spent in each op (label op)"),
    "nearstore_node_errors": ("counter", "errors by kind: checksum, read, decode (one sample); refused (a bad "
                              "request); worker_crash, failed (a whole request)"),
    "nearstore_node_link_wait_seconds": ("counter", "seconds streams waited for the link cap"),
    "nearstore_node_link_cap_bytes_per_second": ("gauge", "the emulated link cap (0: none)"),
    "nearstore_node_worker_restarts": ("counter", "times the node restarted its worker processes"),
    "nearstore_node_cpu_seconds": ("counter", "CPU seconds of the node process and its workers"),
    "nearstore_node_start_time_seconds": ("gauge", "when the node started (unix time)"),
}


class NodeCollector:
    """Prometheus collector over a ``NodeServer``'s counters."""

    def __init__(self, server: "NodeServer") -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        srv = self.server
        s = srv.stats.snapshot()
        node = str(srv.node_id)

        def fam(name: str, value: float | None = None, **labels: str) -> Metric:
            return family(NODE_METRICS, name, ["node", *labels], [node], value)

        yield fam("nearstore_node_requests", s["requests"])
        yield fam("nearstore_node_requests_in_flight", s["in_flight"])
        yield fam("nearstore_node_samples", s["samples"])
        yield fam("nearstore_node_sent_bytes", s["wire_bytes"])
        yield fam("nearstore_node_payload_bytes", s["payload_bytes"])
        yield fam("nearstore_node_read_bytes", s["read_bytes"])
        yield fam("nearstore_node_read_seconds", s["read_seconds"])
        ops = fam("nearstore_node_op_seconds", op="")
        for op, v in sorted(s["op_seconds"].items()):
            ops.add_metric([node, op], v)
        yield ops
        errors = fam("nearstore_node_errors", kind="")
        for kind, v in sorted({**s["errors_by_kind"], "refused": s["bad_requests"]}.items()):
            errors.add_metric([node, kind], v)
        yield errors
        yield fam("nearstore_node_link_wait_seconds", s["link_wait_seconds"])
        yield fam("nearstore_node_link_cap_bytes_per_second", srv.link.rate or 0.0)
        yield fam("nearstore_node_worker_restarts", srv.pool.restarts)
        yield fam("nearstore_node_cpu_seconds", srv.pool.cpu_seconds())
        yield fam("nearstore_node_start_time_seconds", s["started"])
