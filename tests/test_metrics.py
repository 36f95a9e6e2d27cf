"""What an operator sees: Prometheus endpoints of nodes and loaders, `nearstore top`, and the logs."""

from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nearstore import Loader, standard_train
from nearstore.cli.top import rows
from nearstore.core.errors import ConfigError
from nearstore.core.metrics import MetricsServer
from nearstore.loader.metrics import LOADER_METRICS, serve_metrics
from nearstore.node import LocalCluster
from nearstore.node.client import NodeClient, NodeRequestError
from nearstore.node.metrics import NODE_METRICS
from nearstore.node.protocol import Ticket

pytestmark = pytest.mark.timeout(120)
PIPE = standard_train(64)
SRC = Path(__file__).resolve().parents[1] / "src" / "nearstore"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text endpoint, via prometheus_client's parser."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def cluster(store):
    """Two nodes with metrics endpoints."""
    with LocalCluster(store, metrics_port=0) as c:
        yield c


def test_node_and_loader_endpoints_count_what_happened(cluster):
    """A loader epoch: the node endpoints and the loader endpoint agree with the loader's own counts."""
    c = cluster
    with Loader(cluster=c, pipeline=PIPE, split=2, batch_size=8, seed=1) as ld, serve_metrics(ld) as lm:
        batches = sum(1 for _ in ld)
        counters = ld.source.node_counters()
        nodes = {ep.node: scrape(ep.metrics) for ep in c.spec.nodes}
        for n, m in nodes.items():
            assert {name for name, _ in m} >= {f"{k}_total" if t == "counter" else k
                                                for k, (t, _) in NODE_METRICS.items()} - {
                "nearstore_node_op_seconds_total", "nearstore_node_errors_total"}
            assert value(m, "nearstore_node_samples_total", node=str(n)) == counters[n][1]
            assert value(m, "nearstore_node_sent_bytes_total", node=str(n)) == counters[n][0]
            assert value(m, "nearstore_node_requests_total", node=str(n)) >= 1
            assert value(m, "nearstore_node_requests_in_flight", node=str(n)) == 0
            assert value(m, "nearstore_node_op_seconds_total", node=str(n), op="decode_jpeg+random_resized_crop") > 0
            assert value(m, "nearstore_node_cpu_seconds_total", node=str(n)) > 0
        assert sum(k for _, k in counters.values()) == 48
        lmet = scrape(lm.url)
        assert {name for name, _ in lmet} >= {f"{k}_total" if t == "counter" else k
                                              for k, (t, _) in LOADER_METRICS.items()}
        assert value(lmet, "nearstore_loader_batches_total", rank="0") == batches == 6
        assert value(lmet, "nearstore_loader_samples_total", rank="0") == 48
        assert value(lmet, "nearstore_loader_received_bytes_total", rank="0") == ld.source.wire_bytes
        for n, (b, k) in counters.items():
            assert value(lmet, "nearstore_loader_node_received_bytes_total", rank="0", node=str(n)) == b
            assert value(lmet, "nearstore_loader_node_samples_total", rank="0", node=str(n)) == k
        assert value(lmet, "nearstore_loader_failovers_total", rank="0") == 0
        assert value(lmet, "nearstore_loader_wait_seconds_total", rank="0") >= 0



def test_refusals_and_worker_restarts_in_metrics_and_logs(store, monkeypatch):
    monkeypatch.setenv("NEARSTORE_LOG_LEVEL", "DEBUG")
    log = store / ".nearstore" / "node-000.log"
    size = log.stat().st_size if log.exists() else 0
    with LocalCluster(store, nodes=1, workers_per_node=1, metrics_port=0) as c:
        ep = c.spec.nodes[0]
        client = NodeClient(ep.uri, node=0)
        with pytest.raises(NodeRequestError):
            client.get(Ticket(dataset="nope", samples=[0]))
        os.kill(client.health()["worker_pids"][0], signal.SIGKILL)
        time.sleep(0.5)
        mine = [s.first for s in client.manifest().shards if 0 in s.nodes][:1]
        client.get(Ticket(dataset=c.spec.dataset, samples=mine, ops=[]))  # the pool notices and restarts
        m = scrape(ep.metrics)
        assert value(m, "nearstore_node_errors_total", node="0", kind="refused") == 1
        assert value(m, "nearstore_node_worker_restarts_total", node="0") == 1
        assert value(m, "nearstore_node_requests_total", node="0") == 1
        client.close()
    text = log.read_bytes()[size:].decode()
    assert "WARNING nearstore.node.server: node 0 refused a request: unknown dataset 'nope'" in text
    assert "WARNING nearstore.node.workers: node 0: a worker process died" in text
    assert "DEBUG nearstore.node.server: node 0: 1 samples, 0 ops" in text
    assert "INFO nearstore.node.server: node 0 serving" in text


def test_a_taken_metrics_port_fails_the_node_and_leaves_no_process(store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"metrics port {port} on 127.0.0.1 is not available"):
            MetricsServer(port=port)
        proc = subprocess.Popen([sys.executable, "-m", "nearstore.node.server", "--data", str(store / "node-000"),
                                 "--metrics-port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)  # its own session: find anything it left
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and out == ""
    assert f"metrics port {port} on 127.0.0.1 is not available" in err
    left = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == proc.pid:
                left.append(pid)
        except OSError:
            pass
    assert not left


def test_top_rows_from_recorded_polls():
    def poll(t, samples, wire, cpu, errors=0, bad=0, restarts=0, cap=None):
        return {"t": t, "stats": {"samples": samples, "wire_bytes": wire, "cpu_seconds": cpu, "errors": errors,
                                  "bad_requests": bad, "in_flight": 1},
                "health": {"worker_restarts": restarts, "link_bytes_per_s": cap}}

    prev = {0: poll(10.0, 100, 1_000_000, 5.0, cap=4e6), 1: poll(10.0, 0, 0, 1.0), 2: None}
    cur = {0: poll(12.0, 300, 7_000_000, 6.5, errors=2, bad=1, restarts=1, cap=4e6), 1: None,
           2: poll(12.0, 50, 10, 0.0)}
    r = {x["node"]: x for x in rows(prev, cur)}
    assert r[0]["samples_per_s"] == 100 and r[0]["mb_per_s"] == 3.0 and r[0]["link_utilization"] == 0.75
    assert r[0]["cpu"] == 0.75 and r[0]["errors"] == 3 and r[0]["worker_restarts"] == 1
    assert r[1] == {"node": 1, "state": "down"}
    assert r[2]["state"] == "up" and "samples_per_s" not in r[2]  # no earlier poll: no rate yet


def test_top_shows_the_cluster_and_exits_cleanly_on_ctrl_c(cluster, tmp_path):
    cluster.spec.save(tmp_path / "cluster.json")
    env = {**os.environ, "COLUMNS": "160", "TTY_INTERACTIVE": "1", "TTY_COMPATIBLE": "1"}  # live frames on a pipe
    proc = subprocess.Popen([sys.executable, "-m", "nearstore.cli.main", "top", str(tmp_path / "cluster.json"),
                             "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = bytearray()

    def read() -> None:
        for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
            out.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    with Loader(cluster=cluster, pipeline=PIPE, split=2, batch_size=8) as ld:
        assert sum(len(b) for b in ld) == 48
    deadline = time.monotonic() + 60
    while out.count(b"samples/s") < 3 and time.monotonic() < deadline:  # it is refreshing
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=30)[1].decode()
    reader.join(10)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "stopped" in err
    assert text.count("samples/s") >= 3 and "worker restarts" in text
    assert "│ 0    │ up" in text and "│ 1    │ up" in text


def test_library_code_does_not_print():
    """Only cli/ prints; everything else logs through named loggers."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if "cli" in path.relative_to(SRC).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not offenders
