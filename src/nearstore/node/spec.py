"""Where a cluster's nodes answer (``ClusterSpec``, saved as ``STORE/cluster.json``) and how tokens are read.

Below both the clients (``client.py``) and the local clusters that start node
processes (``cluster.py``), so neither imports the other for it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from nearstore.core.errors import ConfigError, StoreError

__all__ = ["NodeEndpoint", "ClusterSpec", "CLUSTER_FILE", "token_from_env", "read_token_file"]

CLUSTER_FILE = "cluster.json"


class NodeEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node: int
    uri: str
    pid: int | None = None
    metrics: str | None = None  # the node's Prometheus endpoint (http://host:port/metrics), when it has one
    actor: str | None = None  # the Ray actor serving it (nodes started with `up --ray`)


class ClusterSpec(BaseModel):
    """Where the nodes of a dataset answer. Saved as ``STORE/cluster.json`` by ``nearstore up``."""

    model_config = ConfigDict(extra="forbid")
    dataset: str
    nodes: list[NodeEndpoint]
    token: str | None = None
    token_file: str | None = None  # read at load time; keeps the secret out of the cluster file
    tls_root_cert: str | None = None  # PEM file the nodes' certificates chain to (grpc+tls:// endpoints)
    link_mbps: float | None = None
    workers_per_node: int = 2
    ray_address: str | None = None  # nodes are Ray actors of this cluster (nearstore.node.ray) ...
    ray_namespace: str | None = None  # ... named in this namespace; loaders ask them for moved endpoints

    @classmethod
    def load(cls, path: str | Path) -> "ClusterSpec":
        """Read a cluster file; the token is in it, in its ``token_file``, in NEARSTORE_TOKEN or NEARSTORE_TOKEN_FILE."""
        path = Path(path)
        if path.is_dir():
            path = path / CLUSTER_FILE
        if not path.exists():
            raise StoreError(f"no cluster file at {path}: start the nodes with `nearstore up {path.parent}`")
        spec = cls.model_validate_json(path.read_text())
        if spec.token is None:
            spec.token = read_token_file(spec.token_file) if spec.token_file else token_from_env()
        return spec

    def root_certs(self) -> bytes | None:
        if self.tls_root_cert is None:
            return None
        try:
            return Path(self.tls_root_cert).read_bytes()
        except OSError as exc:
            raise ConfigError(f"tls_root_cert {self.tls_root_cert}: cannot read it ({exc.strerror})") from None

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.model_dump_json(indent=1))
        os.replace(tmp, path)


def token_from_env() -> str | None:
    """NEARSTORE_TOKEN, else the first line of the file NEARSTORE_TOKEN_FILE names, else None."""
    if os.environ.get("NEARSTORE_TOKEN"):
        return os.environ["NEARSTORE_TOKEN"]
    path = os.environ.get("NEARSTORE_TOKEN_FILE")
    if path:
        return read_token_file(path)
    return None


def read_token_file(path: str | Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"token file {path}: cannot read it ({exc.strerror})") from None
    if not token:
        raise ConfigError(f"token file {path} is empty")
    return token
