"""Storage nodes: the Flight server that runs pipeline prefixes next to the data, its protocol,
clients, and local clusters of node processes."""

from nearstore.node.cluster import CLUSTER_FILE, ClusterSpec, LocalCluster, NodeEndpoint, start_cluster, stop_cluster

__all__ = ["CLUSTER_FILE", "ClusterSpec", "LocalCluster", "NodeEndpoint", "start_cluster", "stop_cluster"]
