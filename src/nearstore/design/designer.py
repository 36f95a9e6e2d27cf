"""The designer: a workload on a system, every storage/compute split, through the one model.

``splits(system, workload)`` lists where the split between storage-side and
compute-side work can go (a prefix of the workload's stages runs storage-side,
on resources that exist there); ``stages_for`` turns a split into model
stages (per-sample demands, resident memory); a cpu stage both sides can run
may also be *shared* (a fraction of the samples runs it storage-side, the
rest on the host: a per-sample choice); ``assess`` evaluates every split and
share (in 5% steps) and keeps the best feasible one. ``accelerators_fed`` answers MLPerf Storage's
question with preprocessing and offload included; ``pareto`` marks the
designs no other design beats on both throughput and cost (or power).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

from nearstore.core.errors import ConfigError
from nearstore.design.archs import ComputeTier, System, storage_compute_bandwidth
from nearstore.design.catalog import Catalog
from nearstore.design.workloads import Workload
from nearstore.model.core import Evaluation, Resource, Stage, evaluate

__all__ = ["splits", "stages_for", "Assessment", "assess", "accelerators_fed", "pareto", "verdict",
           "emulated_demand"]


def _placement(system: System, workload: Workload, k: int) -> list[str | None]:
    """Resource each workload stage runs on when stages[:k] are storage-side (None: impossible)."""
    out: list[str | None] = []
    for i, ws in enumerate(workload.stages):
        side = system.storage if i < k else system.compute
        out.append(side.cpu if ws.kind == "cpu" else side.accel)
    return out


def splits(system: System, workload: Workload) -> list[int]:
    """Valid k: stages[:k] storage-side, the rest compute-side."""
    return [k for k in range(len(workload.stages) + 1) if None not in _placement(system, workload, k)]


def link_bytes(workload: Workload, k: int, share: float = 0.0) -> float:
    """Bytes per sample crossing the link when stages[:k] run storage-side (and stage k for ``share`` of them)."""
    whole = workload.sample_bytes if k == 0 else workload.stages[k - 1].out_bytes
    return whole if not share else share * workload.stages[k].out_bytes + (1 - share) * whole


def shared_splits(system: System, workload: Workload) -> list[int]:
    """k where stage k is a cpu stage both sides can run, so a share of the samples can run it storage-side."""
    return [k for k in splits(system, workload) if k < len(workload.stages) and workload.stages[k].kind == "cpu"
            and system.storage.cpu and system.compute.cpu]


SHARES = tuple(round(0.05 * i, 2) for i in range(1, 20))


def stages_for(system: System, workload: Workload, k: int, share: float = 0.0) -> list[Stage]:
    """Model stages for split k; with ``share`` > 0, stage k runs storage-side for that fraction of the samples."""
    where = _placement(system, workload, k)
    if None in where:
        raise ConfigError(f"{system.name} cannot run stage {workload.stages[where.index(None)].name} "
                          f"{'storage' if where.index(None) < k else 'compute'}-side; valid splits: "
                          f"{splits(system, workload)}")
    media = next(r for r in system.resources if r.name == "media")
    out = [Stage(name="read", demands={r: workload.sample_bytes for r in system.read},
                 memory={"media": workload.dataset_bytes / media.count})]
    for i, (ws, res) in enumerate(zip(workload.stages, where)):
        assert res is not None
        side = system.storage if i < k else system.compute
        if ws.kind == "cpu" and share and i == k:
            if k not in shared_splits(system, workload):
                raise ConfigError(f"{system.name} cannot share stage {ws.name} between storage and compute")
            out.append(Stage(name=ws.name, demands={system.storage.cpu: share * ws.core_s,  # type: ignore[dict-item]
                                                    res: (1 - share) * ws.core_s}))
        elif ws.kind == "cpu":
            out.append(Stage(name=ws.name, demands={res: ws.core_s}))
        else:
            out.append(Stage(name=ws.name, demands={res: ws.macs}, memory={res: ws.resident_bytes(side.bytes_per_param)}))
    if system.link:
        out.append(Stage(name="transfer", demands={r: link_bytes(workload, k, share) for r in system.link}))
    return out


@dataclass
class Assessment:
    """One system running one workload at its best split."""

    arch: str
    description: str
    workload: str
    gb_per_s_per_2u: float
    path_limit: str
    split: int
    storage_share: float  # fraction of the samples whose stage ``split`` also runs storage-side (0: none)
    storage_side: list[str]
    samples_per_s: float
    bottleneck: str | None
    feasible: bool
    reasons: list[str]
    link_bytes_per_sample: float
    epoch_s: float
    train_s: float
    watts: float
    energy_per_epoch_kwh: float
    rack_units: float
    cost_usd: float
    samples_per_s_per_w: float
    samples_per_s_per_kusd: float
    utilization: dict[str, float]
    alternatives: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def assess(system: System, workload: Workload) -> Assessment:
    """Evaluate every valid split; keep the best feasible one (else the best, reported infeasible)."""
    options = splits(system, workload)
    if not options:
        raise ConfigError(f"{system.name} has nowhere to run {workload.name}'s stages")
    evals: list[tuple[int, Evaluation]] = [(k, evaluate(system.resources, stages_for(system, workload, k)))
                                           for k in options]
    shared = [((k, f), evaluate(system.resources, stages_for(system, workload, k, f)))
              for k in shared_splits(system, workload) for f in SHARES]
    candidates = [((k, 0.0), e) for k, e in evals] + shared
    feasible = [(kf, e) for kf, e in candidates if e.feasible]
    pool = feasible or candidates
    (k, share), ev = max(pool, key=lambda c: (round(c[1].samples_per_s, 6), -link_bytes(workload, *c[0])))
    bw, limit = storage_compute_bandwidth(system)
    epoch = ev.seconds_for(workload.dataset_samples)
    side = ["read", *(s.name for s in workload.stages[:k])]
    if share:
        side.append(f"{workload.stages[k].name} ({share:.0%} of samples)")
    return Assessment(
        arch=system.name, description=system.description, workload=workload.name, gb_per_s_per_2u=bw / 1e9,
        path_limit=limit, split=k, storage_share=share, storage_side=side,
        samples_per_s=ev.samples_per_s, bottleneck=ev.bottleneck, feasible=ev.feasible,
        reasons=sorted({r for _, e in evals for r in e.reasons}) if not feasible else [],
        link_bytes_per_sample=link_bytes(workload, k, share) if system.link else 0.0,
        epoch_s=epoch, train_s=epoch * workload.epochs, watts=ev.watts,
        energy_per_epoch_kwh=ev.watts * epoch / 3.6e6 if math.isfinite(epoch) else float("inf"),
        rack_units=ev.rack_units, cost_usd=ev.cost,
        samples_per_s_per_w=ev.samples_per_s / ev.watts if ev.watts else 0.0,
        samples_per_s_per_kusd=ev.samples_per_s / ev.cost * 1000 if ev.cost else 0.0,
        utilization={n: round(u, 4) for n, u in ev.utilization.items() if u > 0},
        alternatives=[{"split": kk, "storage_share": 0.0, "storage_side": ["read", *(s.name for s in workload.stages[:kk])],
                       "samples_per_s": e.samples_per_s, "bottleneck": e.bottleneck, "feasible": e.feasible,
                       "reasons": e.reasons} for kk, e in evals],
    )


def emulated_demand(cat: Catalog, name: str) -> dict:
    """Per-accelerator demand of an MLPerf Storage emulated accelerator, computed through the model."""
    em = cat.get("emulated_accelerator", name)
    ev = evaluate([Resource(name="accelerator", rate=em.batch, unit="sample-steps"),
                   Resource(name="step_clock", rate=1.0, unit="s")],
                  [Stage(name="compute", demands={"step_clock": em.step_s, "accelerator": 1.0})])
    # one step of ``batch`` samples takes step_s: samples/s = batch / step_s
    per_s = ev.samples_per_s * em.batch
    return {"name": em.name, "workload": em.workload, "samples_per_s": per_s,
            "bytes_per_s": per_s * em.record_bytes, "record_bytes": em.record_bytes, "source": em.source}


def accelerators_fed(make: Callable[..., System], cat: Catalog, workload: Workload, *, accelerator: str,
                     au: float = 0.9, limit: int = 4096, **template: object) -> dict:
    """How many ``accelerator``s the system keeps at AU >= ``au``, preprocessing and offload included.

    The compute tier grows with the accelerators (servers, host CPUs, NICs);
    the storage system is fixed. AU = delivered samples/s / what the
    accelerators could consume. Returns the largest N and what binds beyond it.
    """
    emulated = accelerator.lower() in cat.emulated_accelerator
    model_macs = sum(ws.macs for ws in workload.stages if ws.kind == "model")

    def at(n: int) -> tuple[float, Assessment]:
        tier = ComputeTier(gpus=n, gpu=accelerator, emulated_macs=model_macs if emulated else None)
        a = assess(make(cat, tier=tier, **template), workload)
        return a.utilization.get("gpu", 0.0) if a.feasible else 0.0, a

    lo_au, first = at(1)
    if lo_au < au:
        return {"accelerator": accelerator, "fed": 0, "au_at_1": lo_au, "limited_by": first.bottleneck,
                "reasons": first.reasons}
    lo, hi = 1, 2
    while hi <= limit and at(hi)[0] >= au:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # AU is non-increasing in N: more accelerators share the same storage
        mid = (lo + hi) // 2
        if at(mid)[0] >= au:
            lo = mid
        else:
            hi = mid
    best = lo
    au_best, best_a = at(best)
    beyond = at(best + 1)[1] if best < limit else best_a
    return {"accelerator": accelerator, "fed": best, "au": au_best, "samples_per_s": best_a.samples_per_s,
            "storage_side": best_a.storage_side, "limited_by": beyond.bottleneck, "at_limit": best >= limit}


def pareto(points: list[dict], x: str, y: str = "samples_per_s") -> list[bool]:
    """For each point, whether no other point has lower-or-equal ``x`` and higher-or-equal ``y`` (one strictly)."""
    out = []
    for p in points:
        dominated = any(q is not p and q[x] <= p[x] and q[y] >= p[y] and (q[x] < p[x] or q[y] > p[y])
                        for q in points)
        out.append(not dominated and p[y] > 0)
    return out


def verdict(rows: list[Assessment]) -> tuple[str | None, str]:
    """Which design to buy: the cheapest per sample/s among feasible designs within 10% of the best throughput."""
    ok = [r for r in rows if r.feasible and r.samples_per_s > 0]
    if not ok:
        return None, "no design is feasible: " + "; ".join(f"{r.arch}: {', '.join(r.reasons)}" for r in rows)
    top = max(r.samples_per_s for r in ok)
    near = [r for r in ok if r.samples_per_s >= 0.9 * top]
    pick = max(near, key=lambda r: r.samples_per_s_per_kusd)
    others = ", ".join(f"{r.arch} {r.samples_per_s:,.0f}/s ({r.bottleneck})" for r in rows if r is not pick)
    why = (f"{pick.arch}: {pick.samples_per_s:,.0f} samples/s (bound by {pick.bottleneck}), "
           f"{pick.samples_per_s_per_kusd:.2f} samples/s per k$ and {pick.samples_per_s_per_w:.2f} per W, "
           f"storage-side: {'+'.join(pick.storage_side)}; vs {others}")
    return pick.arch, why
