"""``nearstore design``: tables, plots, accelerators fed, and the validation checks."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from nearstore.core.errors import ConfigError
from nearstore.design import (ARCHITECTURES, ComputeTier, accelerators_fed, assess, load_catalog, load_workloads,
                              validate, verdict)
from nearstore.design.archs import VARIANTS
from nearstore.design.catalog import Catalog

__all__ = ["design_table", "run_design", "run_validate", "run_fed", "render_design"]


def _archs(arch: str) -> list[str]:
    if arch == "all":
        return list(ARCHITECTURES)
    names = [a.strip() for a in arch.split(",")]
    for n in names:
        if n not in ARCHITECTURES:
            raise ConfigError(f"arch must be 'all' or among {', '.join(ARCHITECTURES)} (got {n!r})")
    return names


def _workload(workloads: dict, name: str):  # noqa: ANN202
    if name not in workloads:
        raise ConfigError(f"workload must be one of {', '.join(workloads)} (got {name!r})")
    return workloads[name]


def design_table(cat: Catalog, workload: str, arch: str = "all", *, tier: ComputeTier | None = None,
                 workload_files: tuple = (), variants: bool = False) -> dict:
    """Assessments of each architecture (default template), the verdict, and optionally every variant."""
    wl = _workload(load_workloads(*workload_files), workload)
    tier = tier or ComputeTier()
    rows = [assess(ARCHITECTURES[a](cat, tier=tier), wl) for a in _archs(arch)]
    pick, why = verdict(rows)
    out = {"workload": wl.model_dump(), "tier": tier.__dict__, "designs": [r.as_dict() for r in rows],
           "verdict": {"buy": pick, "why": why}}
    if variants:
        pts = []
        for a in _archs(arch):
            for params in VARIANTS[a]:
                r = assess(ARCHITECTURES[a](cat, tier=tier, **params), wl).as_dict()
                pts.append({**r, "params": params})
        out["variants"] = pts
    return out


def render_design(res: dict, console: Console) -> None:
    """The design table; on a narrow console (< 150 columns) the essential columns only."""
    wl = res["workload"]
    wide = console.width >= 150
    t = Table(title=f"{wl['name']}: {wl['description']} — {res['tier']['gpus']} x {res['tier']['gpu']} fed by each "
                    "design")
    cols = (("design", "GB/s per 2U", "samples/s", "bottleneck", "storage-side", "bytes/sample on link", "epoch",
             "power kW", "energy/epoch kWh", "RU", "cost k$", "samples/s per W", "per k$") if wide else
            ("design", "samples/s", "bottleneck", "storage-side", "kW", "k$", "per W", "per k$"))
    for col in cols:
        t.add_column(col, justify="left" if col in ("design", "bottleneck", "storage-side") else "right")
    for r in res["designs"]:
        ok = r["feasible"]
        cells = {"design": r["arch"], "GB/s per 2U": f"{r['gb_per_s_per_2u']:.1f}",
                 "samples/s": f"{r['samples_per_s']:,.0f}" if ok else "[red]infeasible",
                 "bottleneck": (r["bottleneck"] or "-") if ok else "-", "storage-side": "+".join(r["storage_side"]),
                 "bytes/sample on link": f"{r['link_bytes_per_sample']:,.0f}",
                 "epoch": _dur(r["epoch_s"]) if ok else "-", "power kW": f"{r['watts'] / 1e3:.1f}",
                 "kW": f"{r['watts'] / 1e3:.1f}",
                 "energy/epoch kWh": f"{r['energy_per_epoch_kwh']:.3g}" if ok else "-", "RU": f"{r['rack_units']:.0f}",
                 "cost k$": f"{r['cost_usd'] / 1e3:,.0f}", "k$": f"{r['cost_usd'] / 1e3:,.0f}",
                 "samples/s per W": f"{r['samples_per_s_per_w']:.2f}", "per W": f"{r['samples_per_s_per_w']:.2f}",
                 "per k$": f"{r['samples_per_s_per_kusd']:.1f}"}
        t.add_row(*(cells[c] for c in cols))
    console.print(t)
    for r in res["designs"]:
        if not r["feasible"]:
            console.print(f"  {r['arch']} infeasible: {'; '.join(r['reasons'])}")
        losing = [a for a in r["alternatives"] if a["split"] != r["split"] or r["storage_share"]]
        if losing:
            console.print(f"  {r['arch']} other splits: " + "; ".join(
                f"{'+'.join(a['storage_side'])} storage-side: "
                + (f"{a['samples_per_s']:,.0f}/s ({a['bottleneck']})" if a["feasible"] else
                   "infeasible (" + "; ".join(a["reasons"]) + ")") for a in losing))
    v = res["verdict"]
    console.print(f"[bold]verdict:[/bold] buy {v['buy']}: {v['why']}" if v["buy"] else f"[bold]verdict:[/bold] {v['why']}")


def _dur(s: float) -> str:
    if s == float("inf"):
        return "-"
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def run_validate(cat: Catalog, console: Console) -> tuple[bool, dict]:
    checks = validate(cat)
    t = Table(title="model vs published figures")
    for col in ("check", "published", "computed", "error", "ok", "from"):
        t.add_column(col)
    for c in checks:
        t.add_row(c.name, f"{c.expected:g}", f"{c.computed:.2f}", f"{c.error:.1%}",
                  "[green]yes[/green]" if c.ok else "[red]NO[/red]", c.detail)
    console.print(t)
    return all(c.ok for c in checks), {"checks": [dict(c.__dict__, ok=c.ok, error=c.error) for c in checks]}


def run_fed(cat: Catalog, workload: str, arch: str, accelerator: str, console: Console,
            workload_files: tuple = ()) -> dict:
    wl = _workload(load_workloads(*workload_files), workload)
    t = Table(title=f"accelerators kept at AU >= 90% on {wl.name} (preprocessing and offload included)")
    for col in ("design", "accelerator", "fed", "AU", "samples/s", "storage-side", "limited beyond by"):
        t.add_column(col)
    rows = []
    for a in _archs(arch):
        r = {"arch": a, **accelerators_fed(ARCHITECTURES[a], cat, wl, accelerator=accelerator)}
        rows.append(r)
        limit = "; ".join(r["reasons"]) if r.get("reasons") else str(r["limited_by"])
        fed = f">= {r['fed']}" if r.get("at_limit") else str(r["fed"])
        t.add_row(a, accelerator, fed, f"{r.get('au', r.get('au_at_1', 0)):.2f}",
                  f"{r.get('samples_per_s', 0):,.0f}", "+".join(r.get("storage_side", [])), limit)
    console.print(t)
    return {"workload": wl.name, "accelerator": accelerator, "designs": rows}


def run_design(*, catalogs: list[Path], workload: str, arch: str, tier: ComputeTier, plot: Path | None,
               console: Console, workload_files: tuple = ()) -> dict:
    cat = load_catalog(*catalogs)
    res = design_table(cat, workload, arch, tier=tier, workload_files=workload_files, variants=plot is not None)
    render_design(res, console)
    if plot is not None:
        from nearstore.design.plots import plot_design

        plot_design(res["designs"], res["variants"], plot,
                    title=f"{workload}: {tier.gpus} x {tier.gpu}; Pareto over {len(res['variants'])} variants")
        console.print(f"plot: {plot}")
    return res
