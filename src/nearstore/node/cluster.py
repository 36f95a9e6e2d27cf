"""Local clusters: one node server process per node directory, on loopback.

``LocalCluster(store, ...)`` is a context manager for tests and notebooks;
``start_cluster``/``stop_cluster`` back ``nearstore up``/``nearstore down``,
which leave the processes running and record them in ``STORE/cluster.json``.
The cluster layout is an object (``ClusterSpec``) passed to loaders, never a
global.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Literal
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nearstore.core.errors import ConfigError, NearstoreError
from nearstore.node.client import NodeUnavailableError, node_client
from nearstore.node.spec import CLUSTER_FILE, ClusterSpec, NodeEndpoint, read_token_file, token_from_env
from nearstore.store.manifest import Manifest, node_dir_name

__all__ = ["NodeEndpoint", "ClusterSpec", "LocalCluster", "NodeOptions", "start_cluster", "start_node",
           "stop_cluster", "stop_node", "CLUSTER_FILE", "ClusterStartError", "token_from_env", "read_token_file"]

log = logging.getLogger(__name__)


class ClusterStartError(NearstoreError, RuntimeError):
    """A node process did not come up; the message includes its stderr."""


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


class NodeOptions(BaseModel):
    """How each node process of a local cluster is started (checked here, before any process starts)."""

    model_config = ConfigDict(extra="forbid")
    link_mbps: float | None = Field(None, gt=0)
    workers_per_node: int = Field(2, ge=1)
    worker_kind: Literal["process", "thread"] = "process"
    token: str | None = None
    host: str = "127.0.0.1"
    tls_cert: str | None = None
    tls_key: str | None = None
    slowdown: float = Field(1.0, ge=1.0)
    metrics_port: int | None = Field(None, ge=0, le=65535)  # node n serves metrics on this + n (0: any free port)
    ops_modules: list[str] = Field(default_factory=list)  # op modules every node imports (--ops-module)
    # CPUs every node process (and its workers) is pinned to (--cpus): nodes on CPUs of their own emulate
    # storage hosts whose cores the loader does not share; None: the CPUs this process may use
    cpus: list[int] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _cpus_here(self) -> "NodeOptions":
        if self.cpus is not None:  # any of the machine's CPUs (this process may itself be pinned elsewhere)
            count = os.cpu_count() or 1
            if min(self.cpus) < 0 or max(self.cpus) >= count:
                raise ValueError(f"cpus must be CPU numbers of this machine, 0..{count - 1}")
        return self

    def metrics_port_of(self, n: int) -> int | None:
        if self.metrics_port is None:
            return None
        return self.metrics_port + n if self.metrics_port else 0

    @model_validator(mode="after")
    def _tls_pair(self) -> "NodeOptions":
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: give both (PEM files) or neither")
        return self

    @classmethod
    def of(cls, **kwargs: object) -> "NodeOptions":
        """Build options; a bad value is a ``ConfigError`` naming the parameter and what it allows."""
        try:
            return cls(**kwargs)  # type: ignore[arg-type]
        except ValidationError as exc:
            e = exc.errors()[0]
            where = ".".join(map(str, e["loc"]))
            raise ConfigError(f"{where or 'node options'}: {e['msg']} (got {e.get('input')!r})") from None

    @property
    def scheme(self) -> str:
        return "grpc+tls" if self.tls_cert else "grpc"


def start_node(store: Path, n: int, opts: NodeOptions, *, port: int = 0, detach: bool = False,
               timeout: float = 60.0) -> tuple[NodeEndpoint, subprocess.Popen]:
    """Start the server of node directory ``n``; returns when it prints its port."""
    proc = _launch_node(store, n, opts, port=port, detach=detach)
    return _await_node(store, n, opts, proc, timeout), proc


def _launch_node(store: Path, n: int, opts: NodeOptions, *, port: int, detach: bool) -> subprocess.Popen:
    logs = store / ".nearstore"
    logs.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "nearstore.node.server", "--data", str(store / node_dir_name(n)),
           "--host", opts.host, "--port", str(port), "--workers", str(opts.workers_per_node),
           "--worker-kind", opts.worker_kind]
    if opts.link_mbps:
        cmd += ["--link-mbps", str(opts.link_mbps)]
    if opts.tls_cert:
        cmd += ["--tls-cert", opts.tls_cert, "--tls-key", opts.tls_key or ""]
    if opts.slowdown != 1.0:
        cmd += ["--slowdown", str(opts.slowdown)]
    if opts.metrics_port is not None:
        cmd += ["--metrics-port", str(opts.metrics_port_of(n))]
    for m in opts.ops_modules:
        cmd += ["--ops-module", m]
    if opts.cpus is not None:
        cmd += ["--cpus", ",".join(map(str, opts.cpus))]
    env = dict(os.environ)
    if opts.token:
        env["NEARSTORE_TOKEN"] = opts.token
    with open(logs / f"{node_dir_name(n)}.log", "ab") as log:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=detach)


def _await_node(store: Path, n: int, opts: NodeOptions, proc: subprocess.Popen, timeout: float) -> NodeEndpoint:
    info = _read_port(proc, timeout)
    if not info.get("port"):
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
        err = (store / ".nearstore" / f"{node_dir_name(n)}.log").read_text()[-2000:]
        raise ClusterStartError(f"node {n} did not start: {err.strip() or 'no output'}")
    metrics = f"http://{opts.host}:{info['metrics_port']}/metrics" if info.get("metrics_port") else None
    return NodeEndpoint(node=n, uri=f"{opts.scheme}://{opts.host}:{info['port']}", pid=proc.pid, metrics=metrics)


def wait_healthy(spec: ClusterSpec, endpoints: list[NodeEndpoint], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for ep in endpoints:
        client = node_client(spec, ep.node, timeout=5)
        try:
            while True:
                try:
                    client.health()
                    break
                except NodeUnavailableError:
                    if time.monotonic() > deadline:
                        raise ClusterStartError(f"node {ep.node} at {ep.uri} never answered health") from None
                    time.sleep(0.1)
        finally:
            client.close()


def start_cluster(store: str | Path, opts: NodeOptions | None = None, *, nodes: int | None = None,
                  tls_root_cert: str | None = None, detach: bool = False,
                  timeout: float = 60.0) -> tuple[ClusterSpec, list[subprocess.Popen]]:
    """Start one node process per node directory (``opts``: how) and wait until each answers ``health``.

    With ``opts.tls_cert``/``tls_key`` the nodes speak TLS; ``tls_root_cert`` (default: the
    certificate itself, as for a self-signed one) is what clients verify them against.
    """
    store = Path(store)
    opts = opts or NodeOptions()
    man = Manifest.load(store)
    k = man.nodes if nodes is None else nodes
    if not 1 <= k <= man.nodes:
        raise ConfigError(f"nodes must be in 1..{man.nodes} (the store has {man.nodes} node directories), got {k}")
    procs: list[subprocess.Popen] = []
    endpoints: list[NodeEndpoint] = []
    try:
        for n in range(k):  # all at once: each node starts its workers while the others start theirs
            procs.append(_launch_node(store, n, opts, port=0, detach=detach))
        endpoints = [_await_node(store, n, opts, proc, timeout) for n, proc in enumerate(procs)]
        spec = ClusterSpec(dataset=man.name, nodes=endpoints, token=opts.token, link_mbps=opts.link_mbps,
                           workers_per_node=opts.workers_per_node, tls_root_cert=tls_root_cert or opts.tls_cert)
        wait_healthy(spec, endpoints, timeout)
    except BaseException:
        _terminate(procs)
        raise
    log.info("started %d nodes of %s: %s", k, man.name, ", ".join(ep.uri for ep in endpoints))
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


def stop_node(ep: NodeEndpoint, timeout: float = 10.0) -> None:
    """Stop one recorded node process (SIGTERM, then SIGKILL)."""
    if not ep.pid or not _pid_alive(ep.pid):
        return
    os.kill(ep.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(ep.pid) and time.monotonic() < deadline:
        try:
            if os.waitpid(ep.pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if _pid_alive(ep.pid):
        os.kill(ep.pid, signal.SIGKILL)


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
            log.warning("node process %d ignored SIGTERM for %.0f s; killing it", pid, timeout)
            os.kill(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    log.info("stopped node processes %s", pids)
    return pids


class LocalCluster:
    """``with LocalCluster(store, link_mbps=100) as cluster: Loader(cluster=cluster.spec, ...)``.

    ``kill(n)`` SIGKILLs node ``n`` (fault injection); ``restart(n)`` starts it
    again on the same port, so loaders holding the spec use it again.
    """

    def __init__(self, store: str | Path, *, nodes: int | None = None, tls_root_cert: str | None = None,
                 **options: object) -> None:
        """``options``: the fields of ``NodeOptions`` (link_mbps, workers_per_node, worker_kind, token,
        tls_cert, tls_key, slowdown, metrics_port)."""
        self.store = Path(store)
        self._opts = NodeOptions.of(**options)
        self.spec, self.procs = start_cluster(store, self._opts, nodes=nodes, tls_root_cert=tls_root_cert)

    def kill(self, n: int) -> None:
        proc = self.procs[n]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def restart(self, n: int, timeout: float = 60.0) -> None:
        self.kill(n)
        if self.procs[n].stdout:
            self.procs[n].stdout.close()
        port = int(self.spec.nodes[n].uri.rsplit(":", 1)[1])
        deadline = time.monotonic() + timeout
        while True:  # the port can stay taken for a moment after a kill
            try:
                ep, proc = start_node(self.store, n, self._opts, port=port, timeout=timeout)
                break
            except ClusterStartError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.procs[n] = proc
        self.spec.nodes[n] = ep
        wait_healthy(self.spec, [ep], timeout)

    def add_node(self, n: int, timeout: float = 60.0) -> None:
        """Start a server for node directory ``n`` (new after a rebalance) and add it to the spec."""
        if any(ep.node == n for ep in self.spec.nodes):
            raise ConfigError(f"node {n} is already in the cluster")
        ep, proc = start_node(self.store, n, self._opts, timeout=timeout)
        self.procs.append(proc)
        self.spec.nodes.append(ep)
        wait_healthy(self.spec, [ep], timeout)

    def remove_node(self, n: int) -> None:
        """Stop node ``n``'s server and drop it from the spec (after a rebalance moved its shards away)."""
        at = next(i for i, ep in enumerate(self.spec.nodes) if ep.node == n)
        _terminate([self.procs.pop(at)])
        del self.spec.nodes[at]

    def stop(self) -> None:
        _terminate(self.procs)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
