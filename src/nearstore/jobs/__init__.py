"""Jobs and queries over a cluster: near-data inference into derived datasets, filters and nearest neighbours.

``infer`` (``jobs.infer``) runs a network over every shard on the nodes that
hold it; ``filter_samples`` and ``nearest`` (``jobs.query``) evaluate queries
on the nodes and return only the answers. See docs/jobs.md.
"""

from nearstore.jobs.infer import JobError, JobProgress, JobResult, infer
from nearstore.jobs.query import QueryResult, filter_samples, nearest

__all__ = ["infer", "JobProgress", "JobResult", "JobError", "filter_samples", "nearest", "QueryResult"]
