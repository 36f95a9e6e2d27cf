"""A Prometheus endpoint in a thread of this process: ``MetricsServer(collector, port=...)``.

Nodes and loaders keep their counters as they always have; a collector turns
them into Prometheus metric families only when the endpoint is scraped, so an
endpoint costs nothing between scrapes. A taken port is a ``ConfigError``
naming it, raised before anything else starts.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nearstore.core.errors import ConfigError

__all__ = ["MetricsServer", "family"]

log = logging.getLogger(__name__)


def family(table: dict[str, tuple[str, str]], name: str, labels: list[str], values: list[str] | None = None,
           value: float | None = None) -> Metric:
    """The metric family ``name`` as ``table`` declares it ((``"counter"`` or ``"gauge"``, help)); with
    ``value``, one sample labelled ``values``."""
    kind, doc = table[name]
    m = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc, labels=labels)
    if value is not None:
        m.add_metric(values or [], value)
    return m


class MetricsServer:
    """Serve ``collectors`` at ``http://host:port/metrics`` (port 0: any free port; see ``.port``)."""

    def __init__(self, *collectors: Collector, port: int = 0, host: str = "127.0.0.1") -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"metrics port must be in 0..65535 (got {port})")
        self.registry = CollectorRegistry(auto_describe=False)
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics port {port} on {host} is not available ({exc.strerror or exc}); pick "
                              "another --metrics-port, or 0 for any free port") from None
        self.host, self.port = host, self._httpd.server_address[1]
        for c in collectors:
            self.add(c)
        log.info("metrics at http://%s:%d/metrics", host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def add(self, collector: Collector) -> None:
        self.registry.register(collector)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
