"""``nearstore design``: tables, plots, accelerators fed, boxes needed, sensitivity, and the validation checks."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nearstore.core.errors import ConfigError
from nearstore.design import (ARCHITECTURES, ComputeTier, Economics, accelerators_fed, assess, boxes_for,
                              load_catalog, load_workloads, validate, verdict)
from nearstore.design.archs import VARIANTS
from nearstore.design.catalog import Catalog
from nearstore.design.sensitivity import sensitivity
from nearstore.design.workloads import Workload

__all__ = ["Request", "design_table", "run_design", "run_validate", "run_fed", "run_scale", "run_sensitivity",
           "render_design"]


@dataclass
class Request:
    """What the user asked for: workload adjustments, the compute tier, template parameters, economics."""

    workload: str = "resnet50-train"
    arch: str = "all"
    tier: ComputeTier = field(default_factory=ComputeTier)
    template: dict = field(default_factory=dict)
    econ: Economics = field(default_factory=Economics)
    workload_files: tuple = ()
    core_ms: float | None = None
    dataset_samples: int | None = None

    def archs(self) -> list[str]:
        if self.arch == "all":
            names = list(ARCHITECTURES)
        else:
            names = [a.strip() for a in self.arch.split(",")]
            for n in names:
                if n not in ARCHITECTURES:
                    raise ConfigError(f"arch must be 'all' or among {', '.join(ARCHITECTURES)} (got {n!r})")
        for key in self.template:
            takes = [n for n in names if key in inspect.signature(ARCHITECTURES[n]).parameters]
            if len(takes) != len(names):
                others = [n for n in names if n not in takes]
                raise ConfigError(f"--{key} applies to {', '.join(takes) or 'no design'}, not to {', '.join(others)}:"
                                  f" pass --arch with the design(s) it applies to")
        return names

    def load(self) -> Workload:
        wls = load_workloads(*self.workload_files)
        if self.workload not in wls:
            raise ConfigError(f"workload must be one of {', '.join(wls)} (got {self.workload!r})")
        wl = wls[self.workload]
        if self.dataset_samples is not None:
            if self.dataset_samples < 1:
                raise ConfigError(f"--dataset-samples must be >= 1 (got {self.dataset_samples})")
            wl = wl.with_dataset(self.dataset_samples)
        if self.core_ms is not None:
            if self.core_ms <= 0:
                raise ConfigError(f"--core-ms must be > 0 (got {self.core_ms})")
            wl = wl.with_core_s(self.core_ms / 1e3)
        return wl


def design_table(cat: Catalog, req: Request, *, variants: bool = False) -> dict:
    """Assessments of each architecture, the verdict, and optionally every variant (for the Pareto plot)."""
    wl = req.load()
    names = req.archs()
    rows = [assess(ARCHITECTURES[a](cat, tier=req.tier, **req.template), wl, req.econ) for a in names]
    pick, why = verdict(rows)
    out = {"workload": wl.model_dump(), "tier": {**req.tier.__dict__, "nics": str(req.tier.nics)},
           "template": {k: str(v) for k, v in req.template.items()}, "economics": req.econ.__dict__,
           "designs": [r.as_dict() for r in rows], "verdict": {"buy": pick, "why": why}}
    if variants:
        pts = []
        for a in names:
            for params in VARIANTS[a]:
                r = assess(ARCHITECTURES[a](cat, tier=req.tier, **params), wl, req.econ).as_dict()
                pts.append({**r, "params": {k: str(v) for k, v in params.items()}})
        out["variants"] = pts
    return out


def render_design(res: dict, console: Console) -> None:
    """The design table; on a narrow console (< 150 columns) the essential columns only."""
    wl, tier = res["workload"], res["tier"]
    wide = console.width >= 150
    t = Table(title=f"{wl['name']}: {wl['description']} — {tier['gpus']} x {tier['gpu']} fed by each design "
                    f"({wl['dataset_samples']:,} samples, {wl['dataset_samples'] * wl['sample_bytes'] / 1e9:,.0f} GB)")
    cols = (("design", "GB/s per 2U", "epoch 1 /s", "bound by", "later /s", "cache", "storage-side", "compute prep",
             "kW", "storage kW", "k$", "storage k$", "$/TB", "$/(GB/s)", "TCO k$") if wide else
            ("design", "epoch 1 /s", "bound by", "later /s", "storage-side", "kW", "k$", "TCO k$"))
    for col in cols:
        t.add_column(col, justify="left" if col in ("design", "bound by", "storage-side", "compute prep") else "right")
    for r in res["designs"]:
        ok = r["feasible"]
        cells = {"design": r["arch"], "GB/s per 2U": f"{r['gb_per_s_per_2u']:.1f}",
                 "epoch 1 /s": f"{r['samples_per_s']:,.0f}" if ok else "[red]infeasible",
                 "bound by": (r["bottleneck"] or "-") if ok else "-",
                 "later /s": f"{r['later_samples_per_s']:,.0f}" if ok else "-", "cache": f"{r['cache_hit']:.0%}",
                 "storage-side": "+".join(r["storage_side"]), "compute prep": r["compute_preprocess"],
                 "kW": f"{r['watts'] / 1e3:.1f}", "storage kW": f"{r['storage_watts'] / 1e3:.2f}",
                 "k$": f"{r['cost_usd'] / 1e3:,.0f}", "storage k$": f"{r['storage_cost_usd'] / 1e3:,.1f}",
                 "$/TB": f"{r['usd_per_tb']:,.0f}", "$/(GB/s)": f"{r['usd_per_gb_per_s']:,.0f}",
                 "TCO k$": f"{r['tco_usd'] / 1e3:,.0f}"}
        t.add_row(*(cells[c] for c in cols))
    console.print(t)
    for r in res["designs"]:
        if not r["feasible"]:
            console.print(f"  {r['arch']} infeasible: {'; '.join(r['reasons'])}")
        losing = [a for a in r["alternatives"] if (a["split"] != r["split"] or not a["feasible"])]
        if losing:
            console.print(f"  {r['arch']} other placements: " + "; ".join(
                f"{'+'.join(a['storage_side'])} storage-side: "
                + (f"{a['samples_per_s']:,.0f}/s ({a['bottleneck']})" if a["feasible"] else
                   "infeasible (" + "; ".join(a["reasons"]) + ")") for a in losing[:4]))
        for w in r["warnings"]:
            console.print(f"  [yellow]{r['arch']}: {w}[/yellow]")
    v = res["verdict"]
    console.print(f"[bold]verdict:[/bold] buy {v['buy']}: {v['why']}" if v["buy"] else f"[bold]verdict:[/bold] {v['why']}")


def run_validate(cat: Catalog, console: Console) -> tuple[bool, dict]:
    checks = validate(cat)
    t = Table(title="model vs published measurements")
    for col in ("check", "published", "predicted", "error", "tolerance", "ok", "from"):
        t.add_column(col)
    for c in checks:
        t.add_row(c.name, f"{c.expected:,.4g}", f"{c.computed:,.4g}", f"{c.signed_error:+.1%}", f"{c.tolerance:.0%}",
                  "[green]yes[/green]" if c.ok else "[red]NO[/red]", c.detail)
    console.print(t)
    return all(c.ok for c in checks), {"checks": [dict(c.__dict__, ok=c.ok, error=c.error, signed_error=c.signed_error)
                                                  for c in checks]}


def run_fed(cat: Catalog, req: Request, accelerator: str, console: Console) -> dict:
    wl = req.load()
    t = Table(title=f"accelerators one storage system keeps at AU >= 90% on {wl.name} (first epoch, no page cache; "
                    "preprocessing and offload included)")
    for col in ("design", "accelerator", "fed", "AU", "samples/s", "storage-side", "limited beyond by", "note"):
        t.add_column(col)
    rows = []
    for a in req.archs():
        r = {"arch": a, **accelerators_fed(ARCHITECTURES[a], cat, wl, accelerator=accelerator, tier=req.tier,
                                           econ=req.econ, **req.template)}
        rows.append(r)
        if r.get("fed") is None:
            t.add_row(a, accelerator, "-", "-", f"{r['delivered_samples_per_s']:,.0f}",
                      "+".join(r["storage_side"]), str(r["limited_by"]), "no model: what the storage side delivers")
            continue
        note = ""
        if "storage_alone" in r:
            s = r["storage_alone"]
            note = (f"storage alone ({'+'.join(s['storage_side'])}): {s['samples_per_s']:,.0f}/s = "
                    f"{s['equivalent_accelerators']:,.1f} accelerators; ")
        if "bandwidth_only" in r:
            note += f"capacity-limited; bandwidth alone would feed {r['bandwidth_only']['fed']}"
        limit = "; ".join(r["reasons"]) if r.get("reasons") else str(r["limited_by"])
        fed = f">= {r['fed']}" if r.get("at_limit") else str(r["fed"])
        t.add_row(a, accelerator, fed, f"{r.get('au', r.get('au_at_1', 0)):.2f}", f"{r.get('samples_per_s', 0):,.0f}",
                  "+".join(r.get("storage_side", [])), limit, note)
    console.print(t)
    return {"workload": wl.name, "accelerator": accelerator, "designs": rows}


def run_scale(cat: Catalog, req: Request, console: Console) -> dict:
    wl = req.load()
    t = Table(title=f"storage boxes needed to keep {req.tier.gpus} x {req.tier.gpu} at AU >= 90% on {wl.name} "
                    "(first epoch, no page cache)")
    for col in ("design", "boxes", "reaches AU", "samples/s", "binds", "storage k$", "storage kW", "total k$",
                "total kW", "note"):
        t.add_column(col)
    rows = []
    for a in req.archs():
        if a == "host_gpu_server":
            r = {"arch": a, "boxes": 0, "note": "storage lives in the GPU servers: it grows with them"}
            ass = assess(ARCHITECTURES[a](cat, tier=req.tier, **req.template), wl, req.econ)
            r.update(samples_per_s=ass.samples_per_s, bottleneck=ass.bottleneck, reaches_au=(ass.accelerator_util or 0)
                     >= 0.9, storage_cost_usd=ass.storage_cost_usd, storage_watts=ass.storage_watts,
                     cost_usd=ass.cost_usd, watts=ass.watts)
        else:
            r = {"arch": a, **boxes_for(ARCHITECTURES[a], cat, wl, tier=req.tier, econ=req.econ, **req.template)}
        rows.append(r)
        t.add_row(a, str(r["boxes"]), "yes" if r["reaches_au"] else "no", f"{r['samples_per_s']:,.0f}",
                  str(r["bottleneck"]), f"{r['storage_cost_usd'] / 1e3:,.0f}", f"{r['storage_watts'] / 1e3:.1f}",
                  f"{r['cost_usd'] / 1e3:,.0f}", f"{r['watts'] / 1e3:.1f}", r.get("note", ""))
    console.print(t)
    return {"workload": wl.name, "accelerators": req.tier.gpus, "accelerator": req.tier.gpu, "designs": rows}


def run_sensitivity(cat: Catalog, req: Request, console: Console, plot: Path | None = None) -> dict:
    wl = req.load()
    res = sensitivity(cat, wl, req.archs(), tier=req.tier, econ=req.econ, template=req.template)
    t = Table(title=f"sensitivity of the verdict on {wl.name}: best near-storage design vs host-centric "
                    "(TCO per sample/s, >1: near-storage is cheaper)")
    for col in ("parameter", "low", "advantage at low", "verdict at low", "high", "advantage at high",
                "verdict at high", "swing"):
        t.add_column(col)
    for r in res["rows"]:
        t.add_row(r["parameter"], r["low_label"], f"{r['low']:.2f}", r["low_pick"], r["high_label"], f"{r['high']:.2f}",
                  r["high_pick"], f"{r['swing']:.2f}")
    console.print(t)
    console.print(f"baseline: advantage {res['baseline']:.2f}, verdict {res['baseline_pick']}")
    if plot is not None:
        from nearstore.design.plots import plot_tornado

        plot_tornado(res, plot, title=f"{wl.name}: near-storage advantage (TCO per sample/s vs host-centric)")
        console.print(f"plot: {plot}")
    return res


def run_design(*, catalogs: list[Path], req: Request, plot: Path | None, console: Console) -> dict:
    cat = load_catalog(*catalogs)
    res = design_table(cat, req, variants=plot is not None)
    render_design(res, console)
    if plot is not None:
        from nearstore.design.plots import plot_design

        plot_design(res["designs"], res["variants"], plot,
                    title=f"{req.workload}: {req.tier.gpus} x {req.tier.gpu}; Pareto over {len(res['variants'])} "
                          "variants")
        console.print(f"plot: {plot}")
    return res
