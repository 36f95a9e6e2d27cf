"""The performance model: resources with rates, stages with per-sample demands.

A **resource** has a rate per instance (bytes/s for media, links and memory
buses; core-seconds per second for CPUs; MAC/s for accelerators) and a count
(scale-out: N storage nodes multiply storage-side capacity), plus watts, cost,
rack units and, for accelerators, memory. A **stage** demands units of some
resources per sample (bytes read, bytes moved, core-seconds, MACs). The
throughput of a mapping is the minimum over resources of capacity / load; the
argmin is the bottleneck. Memory is a constraint, not a rate: a stage may need
bytes resident on a resource (parameters, optimizer state, activations), and a
design where they do not fit is infeasible, with the reason.

Power is weighted by utilization: a resource draws ``idle_watts`` when idle
and ``watts`` when fully busy, linearly in between (``idle_watts=None``: a
constant draw, e.g. a chassis). Resources may carry a ``group`` (e.g.
"storage", "compute") so power and cost can be reported per group.

The same functions serve the runtime planner (rates measured on a cluster)
and the designer (rates from a hardware catalog). ``evaluate_grid`` is the
vectorized form for sweeps over many design points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from nearstore.core.errors import ConfigError

__all__ = ["Resource", "Stage", "Evaluation", "evaluate", "evaluate_grid", "GridResult"]


@dataclass(frozen=True, kw_only=True)
class Resource:
    """A capacity: ``rate`` units/s per instance, ``count`` instances."""

    name: str
    rate: float
    count: float = 1.0
    unit: str = "B"
    watts: float = 0.0
    cost: float = 0.0
    rack_units: float = 0.0
    memory_bytes: float | None = None
    idle_watts: float | None = None  # None: draws ``watts`` whatever its utilization
    group: str = ""

    def __post_init__(self) -> None:
        if self.idle_watts is not None and not 0 <= self.idle_watts <= self.watts:
            raise ConfigError(f"resource {self.name}: idle_watts must be in 0..watts ({self.watts}), "
                              f"got {self.idle_watts}")
        if not self.name:
            raise ConfigError("a resource needs a name")
        if self.rate <= 0:
            raise ConfigError(f"resource {self.name}: rate must be > 0 {self.unit}/s (got {self.rate})")
        if self.count <= 0:
            raise ConfigError(f"resource {self.name}: count must be > 0 (got {self.count})")

    @property
    def capacity(self) -> float:
        return self.rate * self.count

    def power(self, utilization: float) -> float:
        """Watts of all ``count`` instances at ``utilization`` (0..1)."""
        idle = self.watts if self.idle_watts is None else self.idle_watts
        return self.count * (idle + (self.watts - idle) * min(max(utilization, 0.0), 1.0))


@dataclass(frozen=True, kw_only=True)
class Stage:
    """Per-sample demands of one pipeline stage: resource name -> units per sample."""

    name: str
    demands: Mapping[str, float]
    memory: Mapping[str, float] = field(default_factory=dict)  # resource name -> resident bytes needed

    def __post_init__(self) -> None:
        for r, d in self.demands.items():
            if d < 0:
                raise ConfigError(f"stage {self.name}: demand on {r} must be >= 0 (got {d})")


@dataclass(frozen=True)
class Evaluation:
    samples_per_s: float
    bottleneck: str | None
    utilization: dict[str, float]
    load_per_sample: dict[str, float]
    watts: float
    joules_per_sample: float
    cost: float
    rack_units: float
    feasible: bool
    reasons: list[str]
    peak_watts: float = 0.0  # every resource at full power
    watts_by_group: dict[str, float] = field(default_factory=dict)
    cost_by_group: dict[str, float] = field(default_factory=dict)

    def seconds_for(self, samples: float) -> float:
        return samples / self.samples_per_s if self.samples_per_s > 0 else float("inf")


def _loads(resources: Sequence[Resource], stages: Sequence[Stage]) -> dict[str, float]:
    names = {r.name for r in resources}
    load = {r.name: 0.0 for r in resources}
    for st in stages:
        for r, d in st.demands.items():
            if r not in names:
                raise ConfigError(f"stage {st.name} demands {r!r}, which is not a resource "
                                  f"(resources: {', '.join(sorted(names))})")
            load[r] += d
    return load


def evaluate(resources: Sequence[Resource], stages: Sequence[Stage]) -> Evaluation:
    """Throughput, bottleneck, utilization, power, energy, cost and feasibility of one mapping."""
    by_name = {r.name: r for r in resources}
    if len(by_name) != len(resources):
        raise ConfigError("resource names must be unique")
    load = _loads(resources, stages)
    best, bottleneck = float("inf"), None
    for name, l in load.items():
        if l > 0:
            t = by_name[name].capacity / l
            if t < best:
                best, bottleneck = t, name
    reasons = []
    for st in stages:
        for r, need in st.memory.items():
            mem = by_name[r].memory_bytes if r in by_name else None
            if mem is None or need > mem:
                have = "no memory" if mem is None else f"{mem / 1e9:.1f} GB"
                reasons.append(f"stage {st.name} needs {need / 1e9:.2f} GB resident on {r}, which has {have}")
    throughput = 0.0 if reasons or bottleneck is None else best
    util = {n: (throughput * l / by_name[n].capacity) for n, l in load.items()}
    watts_by: dict[str, float] = {}
    cost_by: dict[str, float] = {}
    for r in resources:
        watts_by[r.group] = watts_by.get(r.group, 0.0) + r.power(util[r.name])
        cost_by[r.group] = cost_by.get(r.group, 0.0) + r.cost * r.count
    watts = sum(watts_by.values())
    return Evaluation(
        samples_per_s=throughput,
        bottleneck=bottleneck,
        utilization=util,
        load_per_sample=load,
        watts=watts,
        joules_per_sample=watts / throughput if throughput > 0 else float("inf"),
        cost=sum(r.cost * r.count for r in resources),
        rack_units=sum(r.rack_units * r.count for r in resources),
        feasible=not reasons,
        reasons=reasons,
        peak_watts=sum(r.watts * r.count for r in resources),
        watts_by_group=watts_by,
        cost_by_group=cost_by,
    )


@dataclass(frozen=True)
class GridResult:
    samples_per_s: np.ndarray  # (points,)
    bottleneck: np.ndarray  # (points,) index into resource names
    utilization: np.ndarray  # (points, resources)
    names: list[str]


def evaluate_grid(names: Sequence[str], capacity: np.ndarray, load: np.ndarray) -> GridResult:
    """Vectorized evaluation of many design points.

    ``capacity`` is (points, resources) in units/s; ``load`` is (points,
    resources) or (resources,) in units per sample. Resources with zero load
    never bind.
    """
    cap = np.asarray(capacity, dtype=np.float64)
    ld = np.broadcast_to(np.asarray(load, dtype=np.float64), cap.shape)
    if cap.ndim != 2 or cap.shape[1] != len(names):
        raise ConfigError(f"capacity must be (points, {len(names)}), got {cap.shape}")
    if (cap <= 0).any():
        raise ConfigError("every capacity must be > 0")
    with np.errstate(divide="ignore"):
        per = np.where(ld > 0, cap / np.where(ld > 0, ld, 1.0), np.inf)
    idx = per.argmin(axis=1)
    thr = per[np.arange(len(per)), idx]
    thr = np.where(np.isinf(thr), 0.0, thr)
    return GridResult(thr, idx, thr[:, None] * ld / cap, list(names))
