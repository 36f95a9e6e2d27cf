"""Local clusters: one node server process per node directory, on loopback.

``LocalCluster(store, ...)`` is a context manager for tests and notebooks;
``start_cluster``/``stop_cluster`` back ``nearstore up``/``nearstore down``,
which leave the processes running and record them in ``STORE/cluster.json``.
The cluster layout is an object (``ClusterSpec``) passed to loaders, never a
global.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from nearstore.core.errors import ConfigError, NearstoreError, StoreError
from nearstore.store.manifest import Manifest, node_dir_name

__all__ = ["NodeEndpoint", "ClusterSpec", "LocalCluster", "start_cluster", "stop_cluster", "CLUSTER_FILE",
           "ClusterStartError"]

CLUSTER_FILE = "cluster.json"


class ClusterStartError(NearstoreError, RuntimeError):
    """A node process did not come up; the message includes its stderr."""


class NodeEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node: int
    uri: str
    pid: int | None = None


class ClusterSpec(BaseModel):
    """Where the nodes of a dataset answer. Saved as ``STORE/cluster.json`` by ``nearstore up``."""

    model_config = ConfigDict(extra="forbid")
    dataset: str
    nodes: list[NodeEndpoint]
    token: str | None = None
    link_mbps: float | None = None
    workers_per_node: int = 2

    @classmethod
    def load(cls, path: str | Path) -> "ClusterSpec":
        path = Path(path)
        if path.is_dir():
            path = path / CLUSTER_FILE
        if not path.exists():
            raise StoreError(f"no cluster file at {path}: start the nodes with `nearstore up {path.parent}`")
        spec = cls.model_validate_json(path.read_text())
        if spec.token is None and os.environ.get("NEARSTORE_TOKEN"):
            spec.token = os.environ["NEARSTORE_TOKEN"]
        return spec

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.model_dump_json(indent=1))
        os.replace(tmp, path)


def _read_port(proc: subprocess.Popen, timeout: float) -> dict:
    """The JSON line a node prints when it is serving."""
    box: dict = {}

    def reader() -> None:
        line = proc.stdout.readline() if proc.stdout else b""
        box["line"] = line

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    line = box.get("line", b"")
    if not line:
        return {}
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return {}


def start_cluster(store: str | Path, *, nodes: int | None = None, link_mbps: float | None = None,
                  workers_per_node: int = 2, token: str | None = None, host: str = "127.0.0.1",
                  detach: bool = False, timeout: float = 60.0) -> tuple[ClusterSpec, list[subprocess.Popen]]:
    """Start one node process per node directory and wait until each answers ``health``."""
    from nearstore.node.client import NodeClient, NodeUnavailableError

    store = Path(store)
    man = Manifest.load(store)
    k = man.nodes if nodes is None else nodes
    if not 1 <= k <= man.nodes:
        raise ConfigError(f"nodes must be in 1..{man.nodes} (the store has {man.nodes} node directories), got {k}")
    if workers_per_node < 1:
        raise ConfigError(f"workers_per_node must be >= 1 (got {workers_per_node})")
    logs = store / ".nearstore"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen] = []
    endpoints: list[NodeEndpoint] = []
    try:
        for n in range(k):
            cmd = [sys.executable, "-m", "nearstore.node.server", "--data", str(store / node_dir_name(n)),
                   "--host", host, "--port", "0", "--workers", str(workers_per_node)]
            if link_mbps:
                cmd += ["--link-mbps", str(link_mbps)]
            env = dict(os.environ)
            if token:
                env["NEARSTORE_TOKEN"] = token
            log = open(logs / f"{node_dir_name(n)}.log", "wb")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=detach)
            log.close()
            procs.append(proc)
            info = _read_port(proc, timeout)
            if not info.get("port"):
                proc.kill()
                proc.wait()
                err = (logs / f"{node_dir_name(n)}.log").read_text()[-2000:]
                raise ClusterStartError(f"node {n} did not start: {err.strip() or 'no output'}")
            endpoints.append(NodeEndpoint(node=n, uri=f"grpc://{host}:{info['port']}", pid=proc.pid))
        spec = ClusterSpec(dataset=man.name, nodes=endpoints, token=token, link_mbps=link_mbps,
                           workers_per_node=workers_per_node)
        deadline = time.monotonic() + timeout
        for ep in endpoints:
            client = NodeClient(ep.uri, node=ep.node, token=token, timeout=5)
            while True:
                try:
                    client.health()
                    break
                except NodeUnavailableError:
                    if time.monotonic() > deadline:
                        raise ClusterStartError(f"node {ep.node} at {ep.uri} never answered health") from None
                    time.sleep(0.1)
            client.close()
    except BaseException:
        _terminate(procs)
        raise
    return spec, procs


def _terminate(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stdout:
            p.stdout.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_cluster(store: str | Path, timeout: float = 10.0) -> list[int]:
    """Stop the processes recorded in ``STORE/cluster.json`` (SIGTERM, then SIGKILL); return their pids."""
    path = Path(store) / CLUSTER_FILE
    spec = ClusterSpec.load(path)
    pids = [ep.pid for ep in spec.nodes if ep.pid]
    for pid in pids:
        if _pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while _pid_alive(pid) and time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                pass
            time.sleep(0.05)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return pids


class LocalCluster:
    """``with LocalCluster(store, link_mbps=100) as cluster: Loader(cluster=cluster.spec, ...)``."""

    def __init__(self, store: str | Path, *, nodes: int | None = None, link_mbps: float | None = None,
                 workers_per_node: int = 2, token: str | None = None) -> None:
        self.store = Path(store)
        self.spec, self.procs = start_cluster(store, nodes=nodes, link_mbps=link_mbps,
                                              workers_per_node=workers_per_node, token=token)

    def stop(self) -> None:
        _terminate(self.procs)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
