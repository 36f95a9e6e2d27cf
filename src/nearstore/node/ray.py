"""Storage nodes as Ray actors: one per node directory, on the Ray node of the host that holds it.

Each storage host joins the Ray cluster declaring the node directories it
holds as custom resources, ``nearstore-node-000`` for ``STORE/node-000``:

    ray start --address HEAD:6379 --resources '{"nearstore-node-000": 1}'

``start_ray_cluster`` (``nearstore up STORE --ray ADDRESS``) checks that
every node directory has a host (refusing, before anything starts, with the
list of those that have none), then starts one detached, named actor per
directory that needs one unit of that resource (hard placement). The actor
runs the same ``NodeServer`` as ``nearstore node serve``: Arrow Flight stays
the data path, with tokens, TLS, checksums and link caps unchanged; Ray only
places, restarts and names the nodes. A node actor that dies is restarted by
Ray (``max_restarts``) on a host that holds its directory, on a new port;
loaders ask the actor for its endpoint again (``RayResolver``) when a node
stops answering, so a training job keeps going without a restart.
``stop_ray_cluster`` (``nearstore down``) removes the actors.

Ray is an optional extra: ``pip install 'nearstore[ray]'``. This module
imports without it and says which extra to install when it is used.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from nearstore.core.errors import ConfigError, NearstoreError
from nearstore.core.memory import MALLOC_ENV, retain_freed_memory
from nearstore.core.metrics import MetricsServer
from nearstore.node.cluster import ClusterSpec, ClusterStartError, NodeEndpoint, NodeOptions, wait_healthy
from nearstore.node.resolve import DEFAULT_NAMESPACE, RayExtraMissingError, RayResolver, _connect, _ray
from nearstore.node.metrics import NodeCollector
from nearstore.node.server import NodeServer
from nearstore.store.manifest import Manifest, node_dir_name

__all__ = ["RayCluster", "RayResolver", "RayExtraMissingError", "PlacementError", "start_ray_cluster",
           "stop_ray_cluster", "resource_name", "NodeActor", "DEFAULT_NAMESPACE"]

log = logging.getLogger(__name__)


class PlacementError(ConfigError):
    """The Ray cluster has no host for some node directory; nothing was started."""


def resource_name(n: int) -> str:
    """The custom resource a Ray node declares to hold node directory ``n``."""
    return f"nearstore-{node_dir_name(n)}"


def actor_name(dataset: str, n: int) -> str:
    return f"{dataset}:{node_dir_name(n)}"


class NodeActor:
    """One storage node inside a Ray actor (wrapped with ``ray.remote`` by ``start_ray_cluster``)."""

    def __init__(self, data: str, n: int, options: dict, log_level: str = "INFO") -> None:
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        retain_freed_memory()
        os.environ.update(MALLOC_ENV)  # the node's worker processes inherit it
        opts = NodeOptions.model_validate(options)
        self.n = n
        self.metrics = MetricsServer(port=opts.metrics_port_of(n), host=opts.host) \
            if opts.metrics_port is not None else None
        try:
            self.server = NodeServer(data, host=opts.host, port=0, workers=opts.workers_per_node,
                                     worker_kind=opts.worker_kind,
                                     link_bytes_per_s=opts.link_mbps * 1e6 if opts.link_mbps else None,
                                     token=opts.token, tls_cert=opts.tls_cert, tls_key=opts.tls_key,
                                     slowdown=opts.slowdown, ops_modules=opts.ops_modules)
        except BaseException:
            if self.metrics is not None:
                self.metrics.close()
            raise
        if self.metrics is not None:
            self.metrics.add(NodeCollector(self.server))
        host = opts.host
        if host in ("0.0.0.0", "::", ""):  # bound to every interface: advertise the Ray node's address
            host = _ray().util.get_node_ip_address()
        self.uri = f"{opts.scheme}://{host}:{self.server.port}"
        self.metrics_url = f"http://{host}:{self.metrics.port}/metrics" if self.metrics is not None else None
        threading.Thread(target=self.server.serve, daemon=True, name="nearstore-node-serve").start()
        log.info("node %d serving %s at %s (Ray actor, pid %d)", n, data, self.uri, os.getpid())

    def endpoint(self) -> dict:
        ray = _ray()
        return {"node": self.n, "uri": self.uri, "pid": os.getpid(), "metrics": self.metrics_url,
                "ray_node": ray.get_runtime_context().get_node_id()}

    def stop(self) -> bool:
        self.server.shutdown()
        self.server.close()
        if self.metrics is not None:
            self.metrics.close()
        return True


def check_placement(ray: Any, k: int) -> None:
    """Refuse unless every node directory 0..k-1 has a Ray node declaring its resource."""
    have = ray.cluster_resources()
    missing = [node_dir_name(n) for n in range(k) if have.get(resource_name(n), 0) < 1]
    if missing:
        lines = "; ".join(f"ray start --address ADDRESS --resources '{{\"{resource_name(int(d[5:]))}\": 1}}' "
                          f"on the host holding {d}" for d in missing)
        raise PlacementError(f"the Ray cluster has no host for node directories {', '.join(missing)} (no Ray node "
                             f"declares {', '.join(resource_name(int(d[5:])) for d in missing)}); nothing was "
                             f"started. Run: {lines}")


def start_ray_cluster(store: str | Path, address: str, opts: NodeOptions | None = None, *,
                      nodes: int | None = None, namespace: str = DEFAULT_NAMESPACE, max_restarts: int = -1,
                      tls_root_cert: str | None = None, timeout: float = 120.0) -> ClusterSpec:
    """Start one node actor per node directory of ``store`` on the Ray cluster at ``address``; returns the spec.

    ``store`` is the store's path on the storage hosts (the same on each) and
    must hold the manifest here too. ``max_restarts``: how often Ray restarts
    a dead node actor (-1: without limit).
    """
    opts = opts or NodeOptions()
    store = Path(store).resolve()
    man = Manifest.load(store)
    k = man.nodes if nodes is None else nodes
    if not 1 <= k <= man.nodes:
        raise ConfigError(f"nodes must be in 1..{man.nodes} (the store has {man.nodes} node directories), got {k}")
    ray = _connect(address, namespace)
    check_placement(ray, k)
    names = [actor_name(man.name, n) for n in range(k)]
    running = [nm for nm in names if _exists(ray, nm, namespace)]
    if running:
        raise ClusterStartError(f"node actors {', '.join(running)} already run in Ray namespace {namespace!r}: "
                                f"stop them with `nearstore down {store}`")
    remote = ray.remote(NodeActor)
    level = os.environ.get("NEARSTORE_LOG_LEVEL", "INFO")
    actors = []
    try:
        for n, nm in enumerate(names):
            actors.append(remote.options(
                name=nm, namespace=namespace, lifetime="detached", max_restarts=max_restarts, num_cpus=0,
                resources={resource_name(n): 1}).remote(str(store / node_dir_name(n)), n, opts.model_dump(), level))
        infos = ray.get([a.endpoint.remote() for a in actors], timeout=timeout)
        endpoints = [NodeEndpoint(node=i["node"], uri=i["uri"], pid=i["pid"], metrics=i["metrics"], actor=nm)
                     for i, nm in zip(infos, names)]
        spec = ClusterSpec(dataset=man.name, nodes=endpoints, token=opts.token, link_mbps=opts.link_mbps,
                           workers_per_node=opts.workers_per_node, tls_root_cert=tls_root_cert or opts.tls_cert,
                           ray_address=address, ray_namespace=namespace)
        wait_healthy(spec, endpoints, timeout)
    except BaseException as exc:
        for a in actors:
            ray.kill(a, no_restart=True)
        if isinstance(exc, NearstoreError):
            raise
        raise ClusterStartError(f"node actors did not start: {exc}") from None
    log.info("started %d node actors of %s on Ray at %s: %s", k, man.name, address,
             ", ".join(ep.uri for ep in endpoints))
    return spec


def _exists(ray: Any, name: str, namespace: str) -> bool:
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True


def stop_ray_cluster(spec: ClusterSpec, timeout: float = 30.0) -> list[str]:
    """Stop and remove the node actors of ``spec``; returns the names of those that were running."""
    if not spec.ray_address:
        raise ConfigError("this cluster's nodes are not Ray actors (no ray_address in the cluster file)")
    ns = spec.ray_namespace or DEFAULT_NAMESPACE
    ray = _connect(spec.ray_address, ns)
    stopped = []
    for ep in spec.nodes:
        if not ep.actor:
            continue
        try:
            actor = ray.get_actor(ep.actor, namespace=ns)
        except ValueError:
            continue
        try:
            ray.get(actor.stop.remote(), timeout=timeout)  # a clean stop: workers and shared memory released
        except Exception as exc:  # noqa: BLE001 - a dead or hung actor is killed below all the same
            log.warning("node actor %s did not stop cleanly (%s); killing it", ep.actor, exc)
        ray.kill(actor, no_restart=True)
        stopped.append(ep.actor)
    deadline = time.monotonic() + timeout
    while any(_exists(ray, nm, ns) for nm in stopped) and time.monotonic() < deadline:
        time.sleep(0.1)
    log.info("stopped node actors %s", stopped)
    return stopped


class RayCluster:
    """``with RayCluster(store, address, link_mbps=100) as cluster: Loader(cluster=cluster, ...)``.

    ``kill(n)`` SIGKILLs node ``n``'s actor process (Ray restarts it);
    ``endpoint(n)`` asks the actor where it serves now.
    """

    def __init__(self, store: str | Path, address: str, *, nodes: int | None = None,
                 namespace: str = DEFAULT_NAMESPACE, max_restarts: int = -1, tls_root_cert: str | None = None,
                 **options: object) -> None:
        self.store = Path(store)
        self.spec = start_ray_cluster(store, address, NodeOptions.of(**options), nodes=nodes, namespace=namespace,
                                      max_restarts=max_restarts, tls_root_cert=tls_root_cert)
        self.resolve = RayResolver(self.spec)

    def actor_info(self, n: int, timeout: float = 60.0) -> dict:
        """Where node ``n``'s actor serves, its pid and Ray node; waits while Ray restarts it."""
        ray = _ray()
        ep = self.spec.nodes[n]
        deadline = time.monotonic() + timeout
        while True:
            try:
                return ray.get(ray.get_actor(ep.actor, namespace=self.spec.ray_namespace).endpoint.remote(),
                               timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def kill(self, n: int) -> None:
        """Kill node ``n``'s actor process (Ray force-kills it, as a crash would); Ray restarts it."""
        ray = _ray()
        ray.kill(ray.get_actor(self.spec.nodes[n].actor, namespace=self.spec.ray_namespace), no_restart=False)

    def stop(self) -> None:
        stop_ray_cluster(self.spec)

    def __enter__(self) -> "RayCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
