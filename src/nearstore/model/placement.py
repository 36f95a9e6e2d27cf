"""Placements: which stages run where, for which share of the samples, as the model's per-sample demands.

One vocabulary for a stage of work, whoever describes it: ``StageCost`` has
the fields an op declares (``nearstore.ops.base.Spec``: where it can run,
MACs, parameter and resident bytes, output bytes) plus the CPU seconds it
takes per sample (measured by the planner, or a workload's reference-core
seconds in the designer). ``place`` is the one function that turns a
``Placement`` of such stages on storage-side and compute-side ``Site``s into
``model.Stage`` demands; the runtime planner (``nearstore.plan.predict``) and
the designer (``nearstore.design.stages_for``) both call it.

A placement is a split ``k`` (stages[:k] run storage-side for every sample)
and a ``share``: stage ``k`` also runs storage-side for that fraction of the
samples (the rest run it compute-side). The bytes a sample sends over the link
are those after the last stage it ran storage-side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from nearstore.core.errors import ConfigError
from nearstore.model.core import Stage

__all__ = ["StageCost", "Site", "Placement", "place", "runs_on", "link_bytes", "Charge"]

#: how a site charges stage ``i`` run on it for ``frac`` of the samples: adds to (demands, memory)
Charge = Callable[[int, float, dict, dict], None]


@dataclass(frozen=True, kw_only=True)
class StageCost:
    """What one stage demands per sample (the fields of an op's declared ``Spec``, plus CPU seconds)."""

    name: str
    out_bytes: float  # bytes per sample after the stage
    where: tuple[str, ...] = ("cpu",)  # "cpu", "accelerator": where it can run
    core_s: float = 0.0  # CPU seconds per sample when it runs on a CPU
    macs: float = 0.0  # multiply-accumulates per sample (what an accelerator is charged)
    param_bytes: float = 0.0  # parameters, held once by the device that runs it
    resident_bytes: float = 0.0  # bytes held per sample in the batch while it runs
    batch: int = 1

    @property
    def memory_bytes(self) -> float:
        """Memory the stage needs on the device that runs it."""
        return self.param_bytes + self.resident_bytes * self.batch


@dataclass(frozen=True, kw_only=True)
class Site:
    """A place stages run: its CPU and accelerator resources (by name), the share of the samples it serves,
    and its own per-stage costs where they differ from the common ones (measured on it)."""

    cpu: str | None = None
    accelerator: str | None = None
    share: float = 1.0
    costs: Sequence[StageCost] | None = None  # this site's costs of each stage (default: the common ones)
    input_bytes: float | None = None  # stored bytes per sample of its samples (default: the common figure)
    fixed_s: float = 0.0  # CPU seconds per sample whatever the split (reading and verifying)
    byte_s: float = 0.0  # CPU seconds per byte it sends or receives over the link
    link: Mapping[str, float] = field(default_factory=dict)  # resource -> units charged per byte it sends
    also: Mapping[str, float] = field(default_factory=dict)  # more resources charged its CPU seconds x factor
    run: Charge | None = None  # its own cost model of running a stage (default: MACs on the accelerator, else
    # CPU seconds, from ``costs``)

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ConfigError(f"site share must be in [0, 1], got {self.share}")


@dataclass(frozen=True)
class Placement:
    """stages[:split] storage-side; stage ``split`` storage-side too for ``share`` of the samples."""

    split: int
    share: float = 0.0

    def __post_init__(self) -> None:
        if self.split < 0 or not 0.0 <= self.share < 1.0:
            raise ConfigError(f"a placement needs split >= 0 and 0 <= share < 1, got {self.split}, {self.share}")


def runs_on(stage: StageCost, site: Site) -> str | None:
    """The resource of ``site`` that runs ``stage`` (its accelerator when it has one and the stage may use
    it, else its CPU), or None when the site cannot run it."""
    if "accelerator" in stage.where and site.accelerator:
        return site.accelerator
    if "cpu" in stage.where and site.cpu:
        return site.cpu
    return None


def link_bytes(stages: Sequence[StageCost], placement: Placement, input_bytes: float) -> float:
    """Bytes per sample on the link: after the last stage each sample ran storage-side."""
    k, share = placement.split, placement.share
    whole = input_bytes if k == 0 else stages[k - 1].out_bytes
    return whole if not share else share * stages[k].out_bytes + (1 - share) * whole


def _charge(demands: dict[str, float], site: Site, resource: str, amount: float) -> None:
    demands[resource] = demands.get(resource, 0.0) + amount
    if resource == site.cpu:
        for other, factor in site.also.items():
            demands[other] = demands.get(other, 0.0) + amount * factor


def place(placement: Placement, stages: Sequence[StageCost], *, storage: Sequence[Site], compute: Site,
          input_bytes: float, frame_bytes: float = 0.0, fresh: float = 1.0) -> list[Stage]:
    """The model stages (per-sample demands, resident memory) of ``stages`` placed by ``placement``.

    Every storage site serves its ``share`` of the samples (their shares sum
    to 1); the compute site takes the rest of each stage. A stage runs on the
    site's accelerator (MACs) or CPU (seconds), or as the site's ``run`` says;
    ``frame_bytes`` is the framing each sample adds on the link. ``fresh`` is
    the fraction of the samples that come from storage at all (the others,
    cached compute-side, run every stage there and cross no link). Returns one
    model stage per workload stage and a ``transfer`` stage (bytes and
    per-byte costs), so a bottleneck names what binds.
    """
    k, share = placement.split, placement.share
    if k > len(stages) or (share and k >= len(stages)):
        raise ConfigError(f"placement split {k} (share {share}) is outside the {len(stages)} stages")
    if not 0.0 <= fresh <= 1.0:
        raise ConfigError(f"fresh (the share of samples read from storage) must be in [0, 1], got {fresh}")
    out: list[Stage] = []
    for i, common in enumerate(stages):
        demands: dict[str, float] = {}
        memory: dict[str, float] = {}
        storage_frac = fresh * (1.0 if i < k else share if i == k else 0.0)
        portions = [(site, site.share * storage_frac) for site in storage] + [(compute, 1.0 - storage_frac)]
        for site, frac in portions:
            if frac <= 0.0:
                continue
            if site.run is not None:
                site.run(i, frac, demands, memory)
                continue
            cost = site.costs[i] if site.costs is not None else common
            res = runs_on(cost, site)
            if res is None:
                side = "compute" if site is compute else "storage"
                raise ConfigError(f"stage {cost.name} ({'/'.join(cost.where)}) cannot run {side}-side: that side "
                                  "has no " + " or ".join(cost.where))
            amount = cost.macs if res == site.accelerator else cost.core_s
            _charge(demands, site, res, frac * amount)
            if res == site.accelerator:  # resident on the device (a device without memory cannot hold it)
                memory[res] = max(memory.get(res, 0.0), cost.memory_bytes)
        out.append(Stage(name=common.name, demands=demands, memory=memory))
    transfer: dict[str, float] = {}
    wire_total = 0.0
    for site in storage:
        wire = link_bytes(stages if site.costs is None else site.costs, placement,
                          input_bytes if site.input_bytes is None else site.input_bytes) + frame_bytes
        moved = fresh * site.share * wire
        wire_total += moved
        for r, per_byte in site.link.items():
            transfer[r] = transfer.get(r, 0.0) + moved * per_byte
        if site.cpu:
            _charge(transfer, site, site.cpu, fresh * site.share * site.fixed_s + moved * site.byte_s)
    if compute.cpu and compute.byte_s:
        _charge(transfer, compute, compute.cpu, wire_total * compute.byte_s)
    out.append(Stage(name="transfer", demands=transfer))
    return out
