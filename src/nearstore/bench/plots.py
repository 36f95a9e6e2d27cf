"""Plots of benchmark results (matplotlib, PNG)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_sweep"]


def plot_sweep(runs: list[dict], path: Path) -> Path:
    """Bars of samples/s, AU and bytes per sample for each (source, cap, split) run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.get('source', '')} {r['cap_mb_per_s'] or 'open'}\n{'host' if r['split'] == 'host' else 'node'}"
              for r in runs]
    colors = ["#888888" if r["split"] == "host" else "#1f77b4" for r in runs]
    fig, axes = plt.subplots(3, 1, figsize=(max(6, len(runs) * 0.9), 9), sharex=True)
    for ax, key, title in zip(axes, ("samples_per_s", "au", "bytes_per_sample"),
                              ("samples/s", "accelerator utilization (AU)", "bytes per sample on the link")):
        ax.bar(range(len(runs)), [r[key] for r in runs], color=colors)
        ax.set_ylabel(title)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(runs)), labels, fontsize=8)
    axes[0].set_title("host-side vs node-side split (grey: host, blue: node)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
