"""The inference question: embed N images, with the network next to the data or on the host's accelerators.

For a workload whose last stage is a network (``resnet50-infer``; its output
made an embedding of ``embedding_bytes``, 2048 fp16 values by default), every
architecture is evaluated twice with the same model (``designer.stages_for``
and ``model.evaluate``): the network on the storage side's processors (every
stage storage-side; only embeddings cross the link) and on the compute side's
accelerators (the best placement of the stages before it). Each answers
images/s, time to embed N, energy per million images and bytes over the link,
so the table shows where in-storage inference wins (bytes, energy) and where
it loses (a large network on small processors), and why (the bottleneck).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from nearstore.core.errors import ConfigError
from nearstore.design.archs import ARCHITECTURES, ComputeTier
from nearstore.design.catalog import Catalog
from nearstore.design.designer import _without_capacity, link_bytes, placements, split_problems, stages_for
from nearstore.design.workloads import Workload
from nearstore.model.core import evaluate

__all__ = ["EmbedAnswer", "embed_workload", "embed_question", "WHERE"]

WHERE = ("storage", "host")


@dataclass
class EmbedAnswer:
    arch: str
    where: str  # the network on the storage side's processors, or on the host's accelerators
    feasible: bool
    images_per_s: float
    seconds: float  # to embed all N images
    kwh_per_million: float
    link_bytes_per_image: float
    link_bytes_total: float
    bottleneck: str | None
    storage_side: list[str]
    reasons: list[str]

    def as_dict(self) -> dict:
        return asdict(self)


def embed_workload(base: Workload, n_images: int, *, embedding_bytes: float = 2048 * 2) -> Workload:
    """``base`` (its last stage a network) run once over ``n_images``, emitting an embedding per image."""
    if n_images < 1:
        raise ConfigError(f"the number of images must be >= 1 (got {n_images})")
    if base.stages[-1].kind != "model":
        raise ConfigError(f"workload {base.name} does not end in a network stage; the inference question needs one "
                          "(e.g. resnet50-infer)")
    last = base.stages[-1].model_copy(update={"out_bytes": float(embedding_bytes)})
    return base.model_copy(update={"name": f"{base.name}-embed", "dataset_samples": int(n_images), "epochs": 1,
                                   "stages": [*base.stages[:-1], last],
                                   "description": f"embed {n_images:,} images: {base.description}"})


def _answer(system, wl: Workload, arch: str, where: str) -> EmbedAnswer:  # noqa: ANN001
    net = len(wl.stages) - 1
    keep = [p for p in placements(system, wl) if not p.share and ((p.split > net) == (where == "storage"))]
    n = wl.dataset_samples
    if not keep:
        why = [v for k, v in split_problems(system, wl).items() if (k > net) == (where == "storage")]
        return EmbedAnswer(arch, where, False, 0.0, math.inf, math.inf, 0.0, 0.0, None, [],
                           why or [f"no placement with the network on the {where} side"])
    evals = [(p, evaluate(system.resources, stages_for(system, wl, p.split, p.share, gpu_decode=p.gpu_decode,
                                                         gpu_share=p.gpu_share))) for p in keep]
    ok = [pe for pe in evals if pe[1].feasible] or evals
    p, ev = max(ok, key=lambda pe: pe[1].samples_per_s)
    feasible = ev.feasible and not system.problems
    ips = ev.samples_per_s if feasible else 0.0
    per = link_bytes(wl, p.split, 0.0) if system.link else 0.0
    return EmbedAnswer(arch, where, feasible, ips, n / ips if ips else math.inf,
                       ev.joules_per_sample * 1e6 / 3.6e6 if feasible else math.inf, per, per * n, ev.bottleneck,
                       p.label(wl), sorted(set(ev.reasons) | set(system.problems)) if not feasible else [])


def embed_question(cat: Catalog, base: Workload, n_images: int, *, tier: ComputeTier | None = None,
                   archs: list[str] | None = None, embedding_bytes: float = 2048 * 2) -> list[EmbedAnswer]:
    """Each architecture (default: all) with the network storage-side and host-side (see the module doc)."""
    wl = embed_workload(base, n_images, embedding_bytes=embedding_bytes)
    names = archs or list(ARCHITECTURES)
    bad = [a for a in names if a not in ARCHITECTURES]
    if bad:
        raise ConfigError(f"unknown architecture(s) {bad}; architectures: {', '.join(ARCHITECTURES)}")
    out = []
    for a in names:
        # one system as configured: holding N images is the capacity question (`design --scale`), not this one
        system = _without_capacity(ARCHITECTURES[a](cat, tier=tier))
        out += [_answer(system, wl, a, where) for where in WHERE]
    return out
