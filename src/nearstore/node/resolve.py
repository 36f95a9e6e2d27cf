"""Where a node of a Ray cluster answers now: ``RayResolver`` asks its actor (after a restart it serves on a new
port). Apart from ``node/ray.py`` (which starts the actors) so that the client, which calls it when a node
stops answering, does not import the code that starts clusters.

Ray is an optional extra: this module imports without it and says which extra to install when it is used.
"""

from __future__ import annotations

import logging
from typing import Any

from nearstore.core.errors import NearstoreError
from nearstore.node.spec import ClusterSpec, NodeEndpoint

__all__ = ["RayResolver", "RayExtraMissingError", "DEFAULT_NAMESPACE", "RAY_EXTRA"]

log = logging.getLogger(__name__)
DEFAULT_NAMESPACE = "nearstore"
RAY_EXTRA = "pip install 'nearstore[ray]' (ray==2.60.0)"


class RayExtraMissingError(NearstoreError, ImportError):
    """Ray is not installed; the message names the extra to install."""


def _ray() -> Any:
    try:
        import ray  # the optional extra: imported on use so nearstore works without it
    except ImportError:
        raise RayExtraMissingError(f"Ray is not installed; nodes on a Ray cluster need the ray extra: {RAY_EXTRA}") \
            from None
    return ray


def _connect(address: str, namespace: str) -> Any:
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, namespace=namespace, logging_level=logging.WARNING, log_to_driver=False,
                 configure_logging=False)
    return ray


class RayResolver:
    """node -> its current endpoint, asked of its Ray actor (after a restart it serves on a new port).

    ``ClusterSource`` calls it when a node stops answering; the training
    process connects to Ray as a driver then, not before.
    """

    def __init__(self, spec: ClusterSpec, timeout: float = 5.0) -> None:
        self.spec, self.timeout = spec, timeout
        self._names = {ep.node: ep.actor for ep in spec.nodes if ep.actor}

    def __call__(self, node: int) -> NodeEndpoint | None:
        name = self._names.get(node)
        if name is None or not self.spec.ray_address:
            return None
        ns = self.spec.ray_namespace or DEFAULT_NAMESPACE
        try:
            ray = _connect(self.spec.ray_address, ns)
            info = ray.get(ray.get_actor(name, namespace=ns).endpoint.remote(), timeout=self.timeout)
        except RayExtraMissingError:
            raise
        except Exception as exc:  # noqa: BLE001 - restarting, gone, or Ray unreachable: the node stays down
            log.info("node %d: its Ray actor %s gave no endpoint (%s)", node, name, type(exc).__name__)
            return None
        return NodeEndpoint(node=node, uri=info["uri"], pid=info["pid"], metrics=info["metrics"], actor=name)
