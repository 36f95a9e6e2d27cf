"""What a loader tells Prometheus, opt-in in the training process.

    from nearstore.loader.metrics import serve_metrics
    endpoint = serve_metrics(loader, port=9464)      # http://127.0.0.1:9464/metrics; endpoint.close() at the end

Every metric is read from the loader's own counters (``Loader.stats``, and
the cluster source's) when the endpoint is scraped: nothing is added to the
batch path. Labels: ``rank`` (and ``node`` for per-node counters), so one
Prometheus can scrape every rank. ``docs/multihost.md`` says what each
metric means.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client.core import Metric

from nearstore.core.metrics import MetricsServer, family
from nearstore.loader.loader import Loader

__all__ = ["LoaderCollector", "serve_metrics", "LOADER_METRICS"]

LOADER_METRICS = {
    "nearstore_loader_batches": ("counter", "batches handed to the training loop"),
    "nearstore_loader_samples": ("counter", "samples in those batches"),
    "nearstore_loader_skipped_samples": ("counter", "bad samples skipped (on_error='skip')"),
    "nearstore_loader_wait_seconds": ("counter", "seconds the training loop waited for a batch (stall)"),
    "nearstore_loader_wall_seconds": ("counter", "seconds between the first request and the last batch handed out"),
    "nearstore_loader_received_bytes": ("counter", "bytes received: from the nodes on the wire, or read from local "
                                        "disk"),
    "nearstore_loader_failovers": ("counter", "times a node stopped answering mid-batch and replicas took over"),
    "nearstore_loader_refetched_samples": ("counter", "samples asked again of another replica"),
    "nearstore_loader_node_rejoins": ("counter", "times a down node answered again and was used again"),
    "nearstore_loader_nodes_down": ("gauge", "nodes this loader currently considers down"),
    "nearstore_loader_node_received_bytes": ("counter", "bytes received from each node (label node)"),
    "nearstore_loader_node_samples": ("counter", "samples received from each node (label node)"),
    "nearstore_loader_epoch": ("gauge", "the epoch the loader stands in"),
}


class LoaderCollector:
    """Prometheus collector over a ``Loader`` (local or cluster source)."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader

    def collect(self) -> Iterator[Metric]:
        ld = self.loader
        st = ld.stats_snapshot()
        rank = str(ld.rank)
        src = ld.source
        per_node = getattr(src, "node_counters", None)  # a cluster source; a local one reads from disk

        def fam(name: str, value: float | None = None, node: bool = False) -> Metric:
            return family(LOADER_METRICS, name, ["rank", "node"] if node else ["rank"], [rank], value)

        yield fam("nearstore_loader_batches", st["batches"])
        yield fam("nearstore_loader_samples", st["samples"])
        yield fam("nearstore_loader_skipped_samples", st["skipped"])
        yield fam("nearstore_loader_wait_seconds", st["wait_seconds"])
        yield fam("nearstore_loader_wall_seconds", st["wall_seconds"])
        yield fam("nearstore_loader_epoch", ld.epoch)
        if per_node is None:
            yield fam("nearstore_loader_received_bytes", st["bytes_read"])
            return
        s, by_node = src.stats(), per_node()
        yield fam("nearstore_loader_received_bytes", sum(b for b, _ in by_node.values()))
        yield fam("nearstore_loader_failovers", len(s["failovers"]))
        yield fam("nearstore_loader_refetched_samples", s["refetched"])
        yield fam("nearstore_loader_node_rejoins", len(s["rejoined"]))
        yield fam("nearstore_loader_nodes_down", len(s["down"]))
        nb, ns = fam("nearstore_loader_node_received_bytes", node=True), fam("nearstore_loader_node_samples",
                                                                              node=True)
        for n, (b, k) in sorted(by_node.items()):
            nb.add_metric([rank, str(n)], b)
            ns.add_metric([rank, str(n)], k)
        yield nb
        yield ns


def serve_metrics(loader: Loader, *, port: int = 0, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``loader``'s metrics at http://host:port/metrics (port 0: any free port); ``.close()`` stops it."""
    return MetricsServer(LoaderCollector(loader), port=port, host=host)
