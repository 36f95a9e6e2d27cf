"""The designer: a workload on a system, every placement, through the one model.

``splits(system, workload)`` lists where the split between storage-side and
compute-side work can go (a prefix of the workload's stages runs
storage-side, on resources that exist and can do it: a device without an
fp16 rate cannot train); ``stages_for`` turns a placement into model stages
(per-sample demands, resident memory). A placement is the split ``k``, the
``share`` of samples whose stage ``k`` (a cpu stage both sides can run) also
runs storage-side, whether the compute side decodes JPEGs on its GPUs
(``gpu_share``: the share of the compute side's images DALI decodes on
the GPUs, the rest on the host CPUs; ``gpu_decode``: the share of those on
the hardware decoder, the rest on CUDA cores, as DALI's ``hw_decoder_load``) and the share of samples served
from the compute servers' page cache (``cached``). ``assess`` evaluates
every placement for the first epoch (nothing cached) and for later epochs
(what fits in the page cache is), and keeps the best feasible one of each.

``accelerators_fed`` answers MLPerf Storage's question over the real
function of the accelerator count (servers come in units of 8);
``boxes_for`` sizes the storage for N accelerators; ``pareto`` and
``verdict`` compare designs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

from nearstore.core.errors import ConfigError
from nearstore.design.archs import IO_CORE_S_PER_BYTE, ComputeTier, Device, Side, System, storage_compute_bandwidth
from nearstore.design.catalog import Catalog, CatalogError
from nearstore.design.workloads import Workload, WorkloadStage
from nearstore.model.core import Evaluation, Resource, Stage, evaluate
from nearstore.model import placement as placing

__all__ = ["splits", "stages_for", "Placement", "Economics", "Assessment", "assess", "accelerators_fed",
           "boxes_for", "pareto", "verdict", "emulated_demand", "resolve_accelerator", "link_bytes", "split_problems"]

SHARES = tuple(round(0.05 * i, 2) for i in range(1, 20))
HW_DECODER_LOADS = (1.0, 0.5, 0.0)  # DALI's hw_decoder_load choices searched
GPU_SHARES = (1.0, 0.75, 0.5, 0.25)  # shares of the compute side's JPEGs DALI decodes on the GPUs (rest: host CPUs)


def _runs(side: Side, ws: WorkloadStage) -> str | None:
    """Why ``side`` cannot run ``ws`` (None: it can)."""
    if ws.kind == "cpu":
        return None if side.cpu else "no cores"
    if side.accel is None:
        return "no accelerator"
    if ws.train and side.accel.train_macs_per_s <= 0:
        return f"{side.accel.resource} has no fp16/bf16 rate to train"
    return None


def split_problems(system: System, workload: Workload) -> dict[int, str]:
    """k -> why stages[:k] cannot run storage-side (and the rest compute-side)."""
    out = {}
    for k in range(len(workload.stages) + 1):
        for i, ws in enumerate(workload.stages):
            side, where = (system.storage, "storage") if i < k else (system.compute, "compute")
            why = _runs(side, ws)
            if why:
                out[k] = f"{ws.name} {where}-side: {why}"
                break
    return out


def splits(system: System, workload: Workload) -> list[int]:
    """Valid k: stages[:k] storage-side, the rest compute-side."""
    bad = split_problems(system, workload)
    return [k for k in range(len(workload.stages) + 1) if k not in bad]


def link_bytes(workload: Workload, k: int, share: float = 0.0) -> float:
    """Bytes per sample crossing the link when stages[:k] run storage-side (and stage k for ``share`` of them)."""
    return placing.link_bytes([ws.cost(0.0) for ws in workload.stages], placing.Placement(k, share),
                              workload.sample_bytes)


def shared_splits(system: System, workload: Workload) -> list[int]:
    """k where stage k is a cpu stage both sides can run, so a share of the samples can run it storage-side."""
    return [k for k in splits(system, workload) if k < len(workload.stages) and workload.stages[k].kind == "cpu"
            and system.storage.cpu and system.compute.cpu]


def _in_bytes(workload: Workload, i: int) -> float:
    return workload.sample_bytes if i == 0 else workload.stages[i - 1].out_bytes


def _capacity(system: System, name: str | None) -> float:
    if name is None:
        return 0.0
    return next(r.capacity for r in system.resources if r.name == name)


def _add(d: dict[str, float], r: str | None, v: float) -> None:
    if r is not None and v:
        d[r] = d.get(r, 0.0) + v


def _spread(system: System, workload: Workload) -> tuple[float, float]:
    """(bytes each drive must hold, share of reads crossing the compute servers' NICs)."""
    media = next(r for r in system.resources if r.name == "media")
    if system.local_drives_per_server:  # host-centric: a full copy per server if it fits, else spread over all
        per_server = system.local_drives_per_server * (media.memory_bytes or 0.0)
        if workload.dataset_bytes <= per_server or system.servers == 1:
            return workload.dataset_bytes / system.local_drives_per_server, 0.0
        return workload.dataset_bytes / media.count, (system.servers - 1) / system.servers
    return workload.dataset_bytes / media.count, 0.0


def _model_stage(ws: WorkloadStage, dev: Device, frac: float, in_bytes: float, demands: dict[str, float],
                 memory: dict[str, float]) -> None:
    rate = dev.train_macs_per_s if ws.train else dev.infer_macs_per_s
    _add(demands, dev.resource, frac * ws.macs / rate)
    _add(demands, dev.bus, frac * in_bytes)
    if ws.train and dev.allreduce and dev.count > 1:  # ring all-reduce of fp16 gradients once per step
        _add(demands, dev.allreduce, frac * 2 * (dev.count - 1) * ws.gradient_bytes() / (dev.count * ws.batch))
    if ws.train and dev.group_link and dev.groups > 1:  # hierarchical: each box's share crosses its uplinks
        _add(demands, dev.group_link, frac * 2 * (dev.groups - 1) * ws.gradient_bytes() / (dev.count * ws.batch))
    if not dev.emulated:
        memory[dev.resource] = ws.resident_bytes(2.0 if ws.train else dev.infer_bytes_per_param)


def stages_for(system: System, workload: Workload, k: int, share: float = 0.0, *, gpu_decode: float | None = None,
               gpu_share: float = 1.0, cached: float = 0.0) -> list[Stage]:
    """Model stages for a placement (see the module docstring); one Stage per workload stage, plus read/transfer."""
    bad = split_problems(system, workload)
    if k in bad:
        raise ConfigError(f"{system.name} cannot run split {k} ({bad[k]}); valid splits: {splits(system, workload)}")
    if share and k not in shared_splits(system, workload):
        raise ConfigError(f"{system.name} cannot share stage {workload.stages[k].name} between storage and compute")
    if not 0 <= cached <= 1:
        raise ConfigError(f"cached must be in 0..1 (got {cached})")
    fresh = 1.0 - cached  # samples read from storage; the rest come from the compute servers' page cache
    per_drive, remote = _spread(system, workload)
    read: dict[str, float] = {}
    for r in system.read:
        _add(read, r, fresh * workload.sample_bytes)
    _add(read, "compute_nic", fresh * remote * workload.sample_bytes)
    out = [Stage(name="read", demands=read, memory={"media": per_drive})]
    st, cp = system.storage, system.compute
    cap_main, cap_extra = _capacity(system, st.cpu), _capacity(system, st.extra_cpu)
    extra_frac = cap_extra / (cap_main + cap_extra) if cap_extra else 0.0

    def on_storage(i: int, frac: float, demands: dict[str, float], memory: dict[str, float]) -> None:
        ws = workload.stages[i]
        if ws.kind == "cpu":
            _add(demands, st.cpu, frac * ws.core_s * (1 - extra_frac))
            _add(demands, st.extra_cpu, frac * ws.core_s * extra_frac)
            raw_share = extra_frac if st.extra_cpu else (1.0 if system.raw_exit and st.cpu else 0.0)
            for r in system.raw_exit:  # samples a storage server CPU or DPU processes leave the drives raw
                _add(demands, r, frac * raw_share * _in_bytes(workload, i))
        else:
            assert st.accel is not None
            _model_stage(ws, st.accel, frac, _in_bytes(workload, i), demands, memory)

    def on_compute(i: int, frac: float, demands: dict[str, float], memory: dict[str, float]) -> None:
        ws = workload.stages[i]
        if ws.kind == "cpu":
            if gpu_decode is not None and ws.gpu is not None and cp.gpu_decode and cp.accel is not None:
                h = gpu_decode if cp.accel.jpeg else 0.0
                g = frac * gpu_share  # decoded on the GPUs; the rest on the host CPUs
                _add(demands, cp.accel.jpeg, g * h)
                _add(demands, cp.accel.resource, g * (ws.gpu.aug_gmacs + (1 - h) * ws.gpu.cuda_decode_gmacs)
                     * 1e9 / cp.accel.train_macs_per_s)
                _add(demands, cp.cpu, g * (ws.gpu.host_core_s + (1 - h) * ws.gpu.huffman_core_s)
                     + (frac - g) * ws.core_s)
            else:
                _add(demands, cp.cpu, frac * ws.core_s)
        else:
            assert cp.accel is not None
            _model_stage(ws, cp.accel, frac, _in_bytes(workload, i), demands, memory)

    link = {r: 1.0 for r in system.link}
    if system.link and any(r.name == "storage_head_cpu" for r in system.resources):
        link["storage_head_cpu"] = IO_CORE_S_PER_BYTE
    # which stages run where, for which share of the samples: the function the runtime planner uses too
    placed = placing.place(placing.Placement(k, share), [ws.cost(0.0) for ws in workload.stages],
                           storage=[placing.Site(run=on_storage, link=link)], compute=placing.Site(run=on_compute),
                           input_bytes=workload.sample_bytes, fresh=fresh)
    return out + (placed if system.link else placed[:-1])


@dataclass(frozen=True)
class Placement:
    split: int
    share: float = 0.0
    gpu_decode: float | None = None  # None: the compute side preprocesses on CPUs; else the hw decoder's share
    gpu_share: float = 1.0  # with gpu_decode: the share of the compute side's images decoded on the GPUs

    def label(self, workload: Workload) -> list[str]:
        side = ["read", *(s.name for s in workload.stages[:self.split])]
        if self.share:
            side.append(f"{workload.stages[self.split].name} ({self.share:.0%} of samples)")
        return side

    def compute_preprocess(self) -> str:
        if self.gpu_decode is None:
            return "host CPUs"
        how = f"hardware decoder {self.gpu_decode:.0%}" if self.gpu_decode else "CUDA decode"
        if self.gpu_share < 1:
            return f"host CPUs {1 - self.gpu_share:.0%} + GPUs {self.gpu_share:.0%} (DALI; {how})"
        return f"GPUs (DALI; {how})"


def placements(system: System, workload: Workload) -> list[Placement]:
    modes: list[tuple[float | None, float]] = [(None, 1.0)]
    if system.compute.gpu_decode and system.compute.accel is not None and any(s.gpu for s in workload.stages):
        loads = HW_DECODER_LOADS if system.compute.accel.jpeg else (0.0,)
        modes += [(h, g) for h in loads for g in GPU_SHARES]
    out = [Placement(k, 0.0, h, g) for k in splits(system, workload) for h, g in modes]
    out += [Placement(k, f, h, g) for k in shared_splits(system, workload) for f in SHARES for h, g in modes]
    return out


@dataclass(frozen=True)
class Economics:
    years: float = 5.0
    usd_per_kwh: float = 0.10
    pue: float = 1.3

    def __post_init__(self) -> None:
        if self.years <= 0 or self.usd_per_kwh < 0 or self.pue < 1:
            raise ConfigError(f"years must be > 0, usd_per_kwh >= 0, pue >= 1 (got {self.years}, "
                              f"{self.usd_per_kwh}, {self.pue})")

    def energy_usd(self, watts: float) -> float:
        return watts * self.pue * self.years * 8766 / 1000 * self.usd_per_kwh


@dataclass
class Assessment:
    """One system running one workload at its best placement, first epoch and later epochs."""

    arch: str
    description: str
    workload: str
    gb_per_s_per_2u: float
    path_limit: str
    split: int
    storage_share: float
    storage_side: list[str]
    compute_preprocess: str
    samples_per_s: float  # first epoch: every sample read from storage
    bottleneck: str | None
    feasible: bool
    reasons: list[str]
    later_samples_per_s: float  # epochs 2..: what fits in the page cache comes from host RAM
    later_bottleneck: str | None
    later_storage_side: list[str]
    cache_hit: float
    mean_samples_per_s: float  # over the whole run
    accelerator_util: float | None  # first epoch: delivered / what the compute accelerators could train
    link_bytes_per_sample: float
    epoch_s: float
    train_s: float
    watts: float  # utilization-weighted, averaged over the run
    peak_watts: float
    storage_watts: float
    energy_per_epoch_kwh: float
    rack_units: float
    cost_usd: float
    storage_cost_usd: float
    storage_tb: float
    usd_per_tb: float
    usd_per_gb_per_s: float
    tco_usd: float
    storage_tco_usd: float
    samples_per_s_per_w: float
    samples_per_s_per_kusd: float
    utilization: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    alternatives: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _best(candidates: list[tuple[Placement, Evaluation]], workload: Workload) -> tuple[Placement, Evaluation]:
    feasible = [c for c in candidates if c[1].feasible]
    pool = feasible or candidates
    # ties (within 0.1%) go to the fewest bytes on the link, then to preprocessing on host CPUs
    top = max(c[1].samples_per_s for c in pool)
    near = [c for c in pool if c[1].samples_per_s >= top * 0.999]
    return min(near, key=lambda c: (link_bytes(workload, c[0].split, c[0].share), c[0].gpu_decode is not None,
                                    -c[1].samples_per_s))


def _model_capacity(system: System, workload: Workload) -> float | None:
    """Samples/s the compute side's accelerators could train/infer if nothing else limited them."""
    dev = system.compute.accel
    models = [ws for ws in workload.stages if ws.kind == "model"]
    if dev is None or not models:
        return None
    secs = sum(ws.macs / (dev.train_macs_per_s if ws.train else dev.infer_macs_per_s) for ws in models)
    return dev.count / secs


def assess(system: System, workload: Workload, econ: Economics | None = None) -> Assessment:
    """Evaluate every placement for the first and the later epochs; keep the best feasible one of each."""
    econ = econ or Economics()
    options = placements(system, workload)
    if not options:
        raise ConfigError(f"{system.name} has nowhere to run {workload.name}'s stages: {split_problems(system, workload)}")
    first = [(p, evaluate(system.resources, stages_for(system, workload, p.split, p.share, gpu_decode=p.gpu_decode,
                                                           gpu_share=p.gpu_share)))
             for p in options]
    hit = min(1.0, system.cache_bytes_per_server / workload.dataset_bytes) if workload.dataset_bytes else 1.0
    p1, ev1 = _best(first, workload)
    if hit > 0 and workload.epochs > 1:
        later = [(p, evaluate(system.resources, stages_for(system, workload, p.split, p.share, gpu_decode=p.gpu_decode,
                                                             gpu_share=p.gpu_share, cached=hit))) for p in options]
        p2, ev2 = _best(later, workload)
        p0, ev0 = _best(first, workload)  # reading from storage anyway can beat the cache (storage-side preprocessing)
        if ev0.feasible and ev0.samples_per_s > ev2.samples_per_s * 1.001:
            p2, ev2, hit = p0, ev0, 0.0
    else:
        p2, ev2 = p1, ev1
    reasons = sorted(set(system.problems) | ({r for _, e in first for r in e.reasons} if not ev1.feasible else set()))
    feasible = ev1.feasible and not system.problems
    thr1 = ev1.samples_per_s if feasible else 0.0
    thr2 = ev2.samples_per_s if feasible else 0.0
    n = workload.dataset_samples
    epoch1 = n / thr1 if thr1 else math.inf
    epoch2 = n / thr2 if thr2 else math.inf
    train = epoch1 + (workload.epochs - 1) * epoch2
    mean = workload.epochs * n / train if math.isfinite(train) and train > 0 else 0.0
    w1, w2 = ev1.watts, ev2.watts
    watts = ((w1 * epoch1 + w2 * (workload.epochs - 1) * epoch2) / train) if math.isfinite(train) and train else w1
    sw = ev1.watts_by_group.get("storage", 0.0)
    bw, limit = storage_compute_bandwidth(system)
    storage_cost = ev1.cost_by_group.get("storage", 0.0)
    tb = system.storage_capacity_bytes / 1e12
    cap = _model_capacity(system, workload)
    warnings = []
    if hit >= 0.999 and workload.epochs > 1:
        warnings.append(f"cache-only after epoch 1: the {workload.dataset_bytes / 1e9:,.0f} GB dataset fits the "
                        f"{system.cache_bytes_per_server / 1e9:,.0f} GB page cache of each compute server, so epochs "
                        f"2-{workload.epochs} never touch storage; the storage design matters for the first epoch only "
                        "(MLPerf Storage requires datasets several times host memory for this reason; try "
                        "--dataset-samples)")
    elif hit > 0 and workload.epochs > 1:
        warnings.append(f"{hit:.0%} of later-epoch reads are page-cache hits")
    bound = "storage" if ev1.bottleneck and ev1.bottleneck not in ("gpu", "host_cpu", "gpu_jpeg") else "compute"
    alternatives = [{"split": p.split, "storage_share": p.share, "storage_side": p.label(workload),
                     "compute_preprocess": p.compute_preprocess(), "samples_per_s": e.samples_per_s,
                     "bottleneck": e.bottleneck, "feasible": e.feasible, "reasons": e.reasons}
                    for p, e in first if not p.share and p.gpu_decode is None]
    for k, why in split_problems(system, workload).items():
        alternatives.append({"split": k, "storage_share": 0.0, "storage_side": Placement(k).label(workload),
                             "compute_preprocess": "-", "samples_per_s": 0.0, "bottleneck": None, "feasible": False,
                             "reasons": [why]})
    return Assessment(
        arch=system.name, description=system.description, workload=workload.name, gb_per_s_per_2u=bw / 1e9,
        path_limit=limit, split=p1.split, storage_share=p1.share, storage_side=p1.label(workload),
        compute_preprocess=p1.compute_preprocess(), samples_per_s=thr1, bottleneck=ev1.bottleneck,
        feasible=feasible, reasons=reasons, later_samples_per_s=thr2, later_bottleneck=ev2.bottleneck,
        later_storage_side=p2.label(workload), cache_hit=hit, mean_samples_per_s=mean,
        accelerator_util=(thr1 / cap if cap else None),
        link_bytes_per_sample=link_bytes(workload, p1.split, p1.share) if system.link else 0.0,
        epoch_s=epoch1, train_s=train, watts=watts, peak_watts=ev1.peak_watts, storage_watts=sw,
        energy_per_epoch_kwh=watts * (train / workload.epochs) / 3.6e6 if math.isfinite(train) else math.inf,
        rack_units=ev1.rack_units, cost_usd=ev1.cost, storage_cost_usd=storage_cost, storage_tb=tb,
        usd_per_tb=storage_cost / tb if tb else math.inf,
        usd_per_gb_per_s=storage_cost / (bw * system.boxes / 1e9) if bw and storage_cost else 0.0,
        tco_usd=ev1.cost + econ.energy_usd(watts), storage_tco_usd=storage_cost + econ.energy_usd(sw),
        samples_per_s_per_w=mean / watts if watts else 0.0,
        samples_per_s_per_kusd=mean / ev1.cost * 1000 if ev1.cost else 0.0,
        utilization={n_: round(u, 4) for n_, u in ev1.utilization.items() if u > 0},
        warnings=warnings + ([f"first epoch bound by {bound} ({ev1.bottleneck})"] if feasible else []),
        alternatives=alternatives,
    )


def resolve_accelerator(cat: Catalog, name: str, workload: Workload) -> str:
    """``name`` if it is a real accelerator or emulates ``workload``; an error naming the right emulation otherwise."""
    key = name.lower()
    if key in cat.accelerator:
        return key
    if key not in cat.emulated_accelerator:
        raise CatalogError(f"no accelerator named {name!r}; accelerators: {', '.join(cat.accelerator_names())}")
    em = cat.emulated_accelerator[key]
    if em.workload == workload.name:
        return key
    fits = [n for n, e in cat.emulated_accelerator.items() if e.workload == workload.name]
    raise ConfigError(f"{name} emulates {em.workload} (MLPerf Storage's step time for that model); for "
                      f"{workload.name} use " + (" or ".join(fits) if fits else "a real accelerator: "
                                                  + ", ".join(sorted(cat.accelerator))))


def emulated_demand(cat: Catalog, name: str) -> dict:
    """Per-accelerator demand of an MLPerf Storage emulated accelerator, computed through the model."""
    em = cat.get("emulated_accelerator", name)
    ev = evaluate([Resource(name="accelerator", rate=em.batch, unit="sample-steps"),
                   Resource(name="step_clock", rate=1.0, unit="s")],
                  [Stage(name="compute", demands={"step_clock": em.step_s, "accelerator": 1.0})])
    per_s = ev.samples_per_s * em.batch  # one step of ``batch`` samples takes step_s
    return {"name": em.name, "workload": em.workload, "samples_per_s": per_s,
            "bytes_per_s": per_s * em.record_bytes, "record_bytes": em.record_bytes, "source": em.source}


def _tier_for(cat: Catalog, workload: Workload, accelerator: str, n: int, base: ComputeTier | None) -> ComputeTier:
    macs = sum(ws.macs for ws in workload.stages if ws.kind == "model")
    base = base or ComputeTier()
    server = base.server
    if accelerator.startswith("a100") and server == "dgx-h100":
        server = "dgx-a100"
    return ComputeTier(gpus=n, gpu=accelerator, server=server, model_macs=macs, gpu_decode=base.gpu_decode,
                       nics=base.nics)


def _without_capacity(system: System) -> System:
    """The same system with unbounded media capacity (what its bandwidth alone would do)."""
    res = [Resource(**{**r.__dict__, "memory_bytes": float("inf")}) if r.name == "media" else r
           for r in system.resources]
    return System(**{**system.__dict__, "resources": res})


def accelerators_fed(make: Callable[..., System], cat: Catalog, workload: Workload, *, accelerator: str,
                     au: float = 0.9, limit: int = 4096, tier: ComputeTier | None = None,
                     econ: Economics | None = None, **template: object) -> dict:
    """How many ``accelerator``s one storage system keeps at AU >= ``au`` (first epoch: nothing cached).

    The compute tier grows with the accelerators (servers of 8, their host
    CPUs and NICs); the storage system is fixed. AU(n) = delivered / what n
    accelerators could consume. AU is not monotone in n: a new server brings
    host CPUs and NICs, so it can rise again; the search evaluates every
    server count's block and keeps the largest n with AU >= ``au``.
    Workloads whose model runs storage-side report what the storage delivers.
    """
    accelerator = resolve_accelerator(cat, accelerator, workload)
    per_server = cat.get("gpu_server", _tier_for(cat, workload, accelerator, 1, tier).server).gpu_slots
    cache: dict[int, tuple[float, Assessment]] = {}
    models = [ws for ws in workload.stages if ws.kind == "model"]

    def at(n: int, capacity: bool = True) -> tuple[float, Assessment]:
        key = n if capacity else -n
        if key not in cache:  # the model runs on the accelerators being counted, not on storage-side devices
            system = _model_on_compute(make(cat, tier=_tier_for(cat, workload, accelerator, n, tier), **template))
            if not capacity:
                system = _without_capacity(system)
            a = assess(_no_cache(system), workload, econ)
            cache[key] = ((a.accelerator_util or 0.0) if a.feasible else 0.0, a)
        return cache[key]

    result: dict = {"accelerator": accelerator, "au_target": au}
    first = assess(_no_cache(make(cat, tier=_tier_for(cat, workload, accelerator, 1, tier), **template)), workload,
                   econ)
    if models and first.feasible and all(ws.name in first.storage_side for ws in models):
        # the storage side can do all the work itself (in-storage inference/training): say what that delivers too,
        # and how many accelerators that equals
        dev = _tier_for(cat, workload, accelerator, 1, tier).device(cat)
        per_acc = 1 / sum(ws.macs / (dev.train_macs_per_s if ws.train else dev.infer_macs_per_s) for ws in models)
        result["storage_alone"] = {"samples_per_s": first.samples_per_s, "storage_side": first.storage_side,
                                   "limited_by": first.bottleneck,
                                   "equivalent_accelerators": first.samples_per_s / per_acc}
    au1, first = at(1)
    if not models:  # nothing for accelerators to do (preprocessing only): report what the storage side delivers
        return {**result, "fed": None, "delivered_samples_per_s": first.samples_per_s,
                "delivered_gb_per_s": first.samples_per_s * first.link_bytes_per_sample / 1e9,
                "storage_side": first.storage_side, "limited_by": first.bottleneck,
                "note": "the storage side does all the work the workload has: this is what it delivers"}
    if not first.feasible:
        out = {**result, "fed": 0, "au_at_1": au1, "limited_by": first.bottleneck, "reasons": first.reasons}
        if any("resident on media" in r for r in first.reasons):  # capacity-limited: what bandwidth alone would feed
            out["bandwidth_only"] = _search(lambda n: at(n, capacity=False), au, limit, per_server)
        return out
    found = _search(at, au, limit, per_server)
    return {**result, **found}


def _model_on_compute(system: System) -> System:
    st = system.storage
    return System(**{**system.__dict__, "storage": Side(cpu=st.cpu, extra_cpu=st.extra_cpu)})


def _no_cache(system: System) -> System:
    return System(**{**system.__dict__, "cache_bytes_per_server": 0.0})


def _search(at: Callable[[int], tuple[float, Assessment]], au: float, limit: int, per_server: int) -> dict:
    """Largest n <= limit with AU(n) >= au. Within a block of servers AU falls with n (same host resources,
    more accelerators); the first n of a block has the most host resources per accelerator, and its AU falls
    as blocks are added (the storage is fixed). So: find the last block whose first n meets ``au``
    (exponential then binary search over blocks), then binary-search inside it."""
    def first_of(b: int) -> int:
        return (b - 1) * per_server + 1

    blocks = math.ceil(limit / per_server)
    if at(1)[0] < au:
        return {"fed": 0, "au_at_1": at(1)[0], "limited_by": at(1)[1].bottleneck, "curve": _curve(at, 1, per_server)}
    lo, hi = 1, 2
    while hi <= blocks and at(first_of(hi))[0] >= au:
        lo, hi = hi, hi * 2
    hi = min(hi, blocks + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(first_of(mid))[0] >= au:
            lo = mid
        else:
            hi = mid
    a, b = first_of(lo), min(lo * per_server, limit)  # AU(a) >= au; AU falls within [a, b]
    while a < b:
        mid = (a + b + 1) // 2
        if at(mid)[0] >= au:
            a = mid
        else:
            b = mid - 1
    best = a
    au_best, best_a = at(best)
    beyond = at(best + 1)[1] if best < limit else best_a
    return {"fed": best, "au": au_best, "samples_per_s": best_a.samples_per_s, "storage_side": best_a.storage_side,
            "compute_preprocess": best_a.compute_preprocess, "limited_by": beyond.bottleneck,
            "at_limit": best >= limit, "curve": _curve(at, best, per_server)}


def _curve(at: Callable[[int], tuple[float, Assessment]], best: int, per_server: int) -> list[dict]:
    """AU at the block edges around ``best`` (shows the saw-tooth: AU can rise again at a new server)."""
    points = sorted({1, *range(per_server, 2 * best + 2 * per_server, per_server),
                     *range(per_server + 1, 2 * best + 2 * per_server, per_server), best, best + 1})
    points = [p for p in points if p <= max(2 * best + per_server, per_server)][:64]
    return [{"accelerators": n, "au": round(at(n)[0], 4), "bottleneck": at(n)[1].bottleneck} for n in points]


def boxes_for(make: Callable[..., System], cat: Catalog, workload: Workload, *, tier: ComputeTier, au: float = 0.9,
              limit: int = 512, econ: Economics | None = None, **template: object) -> dict:
    """Storage boxes of one design needed to keep ``tier``'s accelerators at AU >= ``au`` (first epoch).

    Also what then binds, the cost and the power. If no number of boxes reaches ``au`` (the compute tier
    itself binds), the fewest boxes that reach the plateau are reported with that reason.
    """
    def at(b: int) -> Assessment:
        return assess(_no_cache(make(cat, tier=tier, boxes=b, **template)), workload, econ)

    def ok(a: Assessment) -> bool:
        return a.feasible and (a.accelerator_util or 0.0) >= au

    top = at(limit)
    target = top.samples_per_s * 0.99
    lo, hi = 0, 1
    while hi < limit and not (ok(at(hi)) or (not ok(top) and at(hi).feasible and at(hi).samples_per_s >= target)):
        lo, hi = hi, min(hi * 2, limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        a = at(mid)
        if ok(a) or (not ok(top) and a.feasible and a.samples_per_s >= target):
            hi = mid
        else:
            lo = mid
    a = at(hi)
    return {"boxes": hi, "reaches_au": ok(a), "accelerator_util": a.accelerator_util, "samples_per_s": a.samples_per_s,
            "bottleneck": a.bottleneck, "storage_cost_usd": a.storage_cost_usd, "storage_watts": a.storage_watts,
            "cost_usd": a.cost_usd, "watts": a.watts, "storage_rack_units": a.rack_units,
            "note": "" if ok(a) else f"no number of boxes reaches AU {au:.0%}: beyond {hi} box(es) "
                                     f"{a.bottleneck} binds (the compute tier)"}


def pareto(points: list[dict], x: str, y: str = "samples_per_s") -> list[bool]:
    """For each point, whether no other point has lower-or-equal ``x`` and higher-or-equal ``y`` (one strictly)."""
    out = []
    for p in points:
        dominated = any(q is not p and q[x] <= p[x] and q[y] >= p[y] and (q[x] < p[x] or q[y] > p[y])
                        for q in points)
        out.append(not dominated and p[y] > 0)
    return out


def verdict(rows: list[Assessment]) -> tuple[str | None, str]:
    """Which design to buy: over the whole run, the cheapest per sample/s (TCO) among feasible designs within 10%
    of the best mean throughput."""
    ok = [r for r in rows if r.feasible and r.mean_samples_per_s > 0]
    if not ok:
        return None, "no design is feasible: " + "; ".join(f"{r.arch}: {', '.join(r.reasons)}" for r in rows)
    top = max(r.mean_samples_per_s for r in ok)
    near = [r for r in ok if r.mean_samples_per_s >= 0.9 * top]
    pick = min(near, key=lambda r: r.tco_usd / r.mean_samples_per_s)
    others = ", ".join(f"{r.arch} {r.samples_per_s:,.0f}/s first epoch ({r.bottleneck})" if r.feasible else
                       f"{r.arch} infeasible" for r in rows if r is not pick)
    why = (f"{pick.arch}: {pick.samples_per_s:,.0f} samples/s in the first epoch (bound by {pick.bottleneck}), "
           f"{pick.later_samples_per_s:,.0f}/s later ({pick.later_bottleneck}, cache hit {pick.cache_hit:.0%}), "
           f"TCO ${pick.tco_usd / 1e3:,.0f}k, storage-side: {'+'.join(pick.storage_side)}, "
           f"compute-side preprocessing on {pick.compute_preprocess}; vs {others}")
    return pick.arch, why
