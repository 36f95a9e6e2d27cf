"""Designer plots (matplotlib, PNG): bars per architecture, and Pareto fronts of throughput vs cost and power."""

from __future__ import annotations

from pathlib import Path

from nearstore.design.designer import pareto

__all__ = ["plot_design", "plot_tornado"]


def plot_design(rows: list[dict], points: list[dict], path: Path, *, title: str) -> Path:
    """``rows``: one assessment per architecture (defaults); ``points``: every variant, for the fronts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    names = [r["arch"] for r in rows]
    colors = {n: c for n, c in zip(sorted({p["arch"] for p in points} | set(names)),
                                   ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"))}
    for ax, key, label in ((axes[0][0], "samples_per_s", "samples/s"),
                           (axes[0][1], "samples_per_s_per_kusd", "samples/s per k$ and per W (x100)")):
        vals = [r[key] if r["feasible"] else 0 for r in rows]
        ax.bar(range(len(rows)), vals, color=[colors[n] for n in names])
        if key == "samples_per_s_per_kusd":
            ax.plot(range(len(rows)), [100 * r["samples_per_s_per_w"] if r["feasible"] else 0 for r in rows], "ko",
                    label="per W (x100)")
            ax.legend(fontsize=8)
        for i, r in enumerate(rows):
            ax.text(i, 0, ("" if r["feasible"] else "infeasible\n") + (r["bottleneck"] or ""), ha="center",
                    va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(range(len(rows)), names, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    for ax, x, label in ((axes[1][0], "cost_usd", "cost (USD)"), (axes[1][1], "watts", "power (W)")):
        feas = [p for p in points if p["feasible"] and p["samples_per_s"] > 0]
        front = pareto(feas, x)
        for p, on in zip(feas, front):
            ax.scatter(p[x], p["samples_per_s"], color=colors[p["arch"]], s=40 if on else 12,
                       edgecolors="black" if on else "none")
        line = sorted((p for p, on in zip(feas, front) if on), key=lambda p: p[x])
        ax.plot([p[x] for p in line], [p["samples_per_s"] for p in line], "k--", lw=1, label="Pareto front")
        for n in colors:
            ax.scatter([], [], color=colors[n], label=n)
        ax.set_xlabel(label)
        ax.set_ylabel("samples/s")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_tornado(res: dict, path: Path, *, title: str) -> Path:
    """Tornado: the near-storage advantage at each parameter's low and high end, around the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(reversed(res["rows"]))
    base = res["baseline"]
    fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * len(rows)))
    for i, r in enumerate(rows):
        for v, label, color in ((r["low"], r["low_label"], "#1f77b4"), (r["high"], r["high_label"], "#ff7f0e")):
            ax.barh(i, v - base, left=base, color=color, alpha=0.8)
            ax.text(v, i, f" {label}: {v:.2f} ({r['low_pick'] if v == r['low'] else r['high_pick']})", va="center",
                    fontsize=7)
    ax.axvline(base, color="k", lw=1)
    ax.axvline(1.0, color="r", lw=1, ls="--", label="near-storage = host-centric")
    ax.set_yticks(range(len(rows)), [r["parameter"] for r in rows], fontsize=8)
    ax.set_xlabel("host-centric TCO per sample/s / best near-storage design's (>1: near-storage cheaper)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
