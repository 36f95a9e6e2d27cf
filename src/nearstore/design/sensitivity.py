"""How the verdict moves when the model's least certain inputs move: a tornado over stated ranges.

The output per parameter is the *near-storage advantage*: host-centric TCO
per sample/s (whole run) divided by the best near-storage design's (> 1:
near-storage is cheaper per unit of work), at the low and the high end of the
range, and which design the verdict picks there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from nearstore.design.archs import ARCHITECTURES, ComputeTier
from nearstore.design.catalog import Catalog
from nearstore.design.designer import Assessment, Economics, assess, verdict
from nearstore.design.workloads import Workload

__all__ = ["Parameter", "PARAMETERS", "sensitivity", "advantage"]

STORAGE_PRICED = ("nvme_ssd", "computational_drive", "ebof", "memory_module", "chassis")


def _scale(cat: Catalog, kind: str, attr: str, factor: float, only: str | None = None) -> Catalog:
    table = {n: (c.model_copy(update={attr: getattr(c, attr) * factor}) if only in (None, n) else c)
             for n, c in getattr(cat, kind).items()}
    return cat.model_copy(update={kind: table})


@dataclass(frozen=True)
class Parameter:
    name: str
    low: float
    high: float
    label: str  # how a factor reads, e.g. "x{:.1f}"
    apply: Callable[[Catalog, Workload, Economics, ComputeTier, float], tuple[Catalog, Workload, Economics]]


def _mfu(cat: Catalog, wl: Workload, econ: Economics, tier: ComputeTier, f: float):  # noqa: ANN202
    return _scale(cat, "accelerator", "mfu", f, tier.gpu), wl, econ


def _core_rate(cat: Catalog, wl: Workload, econ: Economics, tier: ComputeTier, f: float):  # noqa: ANN202
    cpu = next((s for s in wl.stages if s.kind == "cpu"), None)
    return cat, (wl.with_core_s(cpu.core_s / f) if cpu else wl), econ


def _gpu_price(cat: Catalog, wl: Workload, econ: Economics, tier: ComputeTier, f: float):  # noqa: ANN202
    return _scale(cat, "accelerator", "price_usd", f, tier.gpu), wl, econ


def _storage_price(cat: Catalog, wl: Workload, econ: Economics, tier: ComputeTier, f: float):  # noqa: ANN202
    for kind in STORAGE_PRICED:
        cat = _scale(cat, kind, "price_usd", f)
    return cat, wl, econ


def _energy(cat: Catalog, wl: Workload, econ: Economics, tier: ComputeTier, f: float):  # noqa: ANN202
    return cat, wl, replace(econ, usd_per_kwh=f)


def _jpeg(cat: Catalog, wl: Workload, econ: Economics, tier: ComputeTier, f: float):  # noqa: ANN202
    return _scale(cat, "accelerator", "jpeg_images_per_s", f, tier.gpu), wl, econ


PARAMETERS = [
    Parameter("mfu of the compute accelerator", 0.6, 1.5, "x{:g}", _mfu),
    Parameter("per-core preprocessing rate", 0.5, 2.0, "x{:g}", _core_rate),
    Parameter("hardware JPEG decoder rate", 0.5, 2.0, "x{:g}", _jpeg),
    Parameter("accelerator price", 0.7, 1.3, "x{:g}", _gpu_price),
    Parameter("storage part prices", 0.5, 2.0, "x{:g}", _storage_price),
    Parameter("energy price (USD/kWh)", 0.05, 0.30, "{:g}", _energy),
]


def advantage(rows: list[Assessment]) -> float:
    """Host-centric TCO per sample/s over the best near-storage design's (0 if either is infeasible)."""
    def per(r: Assessment) -> float:
        return r.tco_usd / r.mean_samples_per_s if r.feasible and r.mean_samples_per_s > 0 else float("inf")
    host = [per(r) for r in rows if r.arch == "host_gpu_server"]
    near = [per(r) for r in rows if r.arch != "host_gpu_server"]
    if not host or not near or min(near) == float("inf"):
        return 0.0
    return host[0] / min(near) if host[0] != float("inf") else float("inf")


def sensitivity(cat: Catalog, wl: Workload, archs: list[str], *, tier: ComputeTier, econ: Economics,
                template: dict | None = None, parameters: list[Parameter] = PARAMETERS) -> dict:
    template = template or {}
    if "host_gpu_server" not in archs or len(archs) < 2:
        archs = list(ARCHITECTURES)  # the advantage compares host-centric with near-storage designs

    def run(c: Catalog, w: Workload, e: Economics) -> tuple[float, str | None]:
        rows = [assess(ARCHITECTURES[a](c, tier=tier, **template), w, e) for a in archs]
        return advantage(rows), verdict(rows)[0]

    base, base_pick = run(cat, wl, econ)
    out = []
    for p in parameters:
        lo, lo_pick = run(*p.apply(cat, wl, econ, tier, p.low))
        hi, hi_pick = run(*p.apply(cat, wl, econ, tier, p.high))
        out.append({"parameter": p.name, "low_label": p.label.format(p.low), "high_label": p.label.format(p.high),
                    "low": lo, "high": hi, "low_pick": lo_pick or "none", "high_pick": hi_pick or "none",
                    "swing": abs(hi - lo)})
    out.sort(key=lambda r: -r["swing"])
    return {"workload": wl.name, "baseline": base, "baseline_pick": base_pick, "rows": out}
