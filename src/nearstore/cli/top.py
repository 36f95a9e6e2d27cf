"""``nearstore top STORE``: a live view of a running cluster, refreshed every second.

Each refresh asks every node for its ``stats`` and ``health`` (the same
counters its Prometheus endpoint exports) and shows the rates since the last
refresh. ``rows`` is a pure function of two polls, tested on recorded ones.
Nodes on Ray that stop answering are looked up again through their actor
(``RayResolver``): a restarted node reappears at its new endpoint.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from rich.console import Console
from rich.live import Live
from rich.table import Table

from nearstore.core.errors import NearstoreError
from nearstore.node.client import NodeClient, node_client
from nearstore.node.cluster import ClusterSpec
from nearstore.node.ray import RayResolver

__all__ = ["poll", "rows", "render", "run_top"]

COLUMNS = ("node", "state", "samples/s", "MB/s", "link", "CPU", "in flight", "errors", "worker restarts")


def poll(spec: ClusterSpec, clients: dict[int, NodeClient], pool: ThreadPoolExecutor,
         resolve: RayResolver | None = None) -> dict[int, dict | None]:
    """node -> {stats, health, t} or None when it does not answer (a Ray node is then asked where it went)."""

    def one(node: int) -> dict | None:
        try:
            return {"stats": clients[node].stats(), "health": clients[node].health(), "t": time.monotonic()}
        except NearstoreError:
            ep = resolve(node) if resolve is not None else None
            if ep is not None and ep.uri != clients[node].uri:
                old = clients[node]
                clients[node] = node_client(spec, node, timeout=old.timeout, uri=ep.uri)
                old.close()
            return None

    nodes = [ep.node for ep in spec.nodes]
    return dict(zip(nodes, pool.map(one, nodes)))


def rows(prev: dict[int, dict | None], cur: dict[int, dict | None]) -> list[dict]:
    """One row per node: rates between two polls (None where a node did not answer both times)."""
    out = []
    for node in sorted(cur):
        now, was = cur[node], prev.get(node)
        if now is None:
            out.append({"node": node, "state": "down"})
            continue
        s, h = now["stats"], now["health"]
        row = {"node": node, "state": "up", "errors": s.get("errors", 0) + s.get("bad_requests", 0),
               "worker_restarts": h.get("worker_restarts", 0), "in_flight": s.get("in_flight"),
               "link_cap": h.get("link_bytes_per_s")}
        if was is not None and now["t"] > was["t"]:
            dt = now["t"] - was["t"]
            ps = was["stats"]
            bps = (s["wire_bytes"] - ps["wire_bytes"]) / dt
            row["samples_per_s"] = (s["samples"] - ps["samples"]) / dt
            row["mb_per_s"] = bps / 1e6
            row["link_utilization"] = bps / row["link_cap"] if row["link_cap"] else None
            row["cpu"] = (s.get("cpu_seconds", 0.0) - ps.get("cpu_seconds", 0.0)) / dt  # cores busy
        out.append(row)
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(table_rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("node", "state") else "right")
    for r in table_rows:
        if r["state"] == "down":
            t.add_row(str(r["node"]), "[red]down[/red]", *["-"] * (len(COLUMNS) - 2))
            continue
        link = r.get("link_utilization")
        t.add_row(str(r["node"]), "up", _fmt(r.get("samples_per_s"), ",.0f"), _fmt(r.get("mb_per_s"), ",.1f"),
                  "no cap" if not r["link_cap"] else _fmt(None if link is None else 100 * link, ".0f") + "%",
                  _fmt(None if r.get("cpu") is None else 100 * r["cpu"], ".0f") + "%",
                  _fmt(r.get("in_flight"), "d"), str(r["errors"]), str(r["worker_restarts"]))
    return t


def run_top(spec: ClusterSpec, *, interval: float = 1.0, console: Console, iterations: int | None = None,
            stop: threading.Event | None = None) -> None:
    """Refresh every ``interval`` seconds until ``stop`` is set (the CLI sets it on Ctrl-C) or ``iterations``.

    Ctrl-C sets an event rather than raising KeyboardInterrupt wherever the
    main thread happens to be: an exception inside the pool's result wait or a
    Flight call could leave the process hanging instead of exiting."""
    stop = stop or threading.Event()
    clients = {ep.node: node_client(spec, ep.node, timeout=max(0.5, interval)) for ep in spec.nodes}
    title = f"nearstore top: {spec.dataset}, {len(spec.nodes)} nodes (Ctrl-C to quit)"
    try:
        with ThreadPoolExecutor(max(1, len(clients)), thread_name_prefix="nearstore-top") as pool:
            resolve = RayResolver(spec) if spec.ray_address else None
            prev = poll(spec, clients, pool, resolve)
            with Live(render(rows({}, prev), title), console=console, auto_refresh=False) as live:
                done = 0
                while (iterations is None or done < iterations) and not stop.wait(interval):
                    cur = poll(spec, clients, pool, resolve)
                    live.update(render(rows(prev, cur), title), refresh=True)
                    prev, done = cur, done + 1
    finally:
        for c in clients.values():
            c.close()
