"""Render bench/results/*.json as the markdown tables in docs/benchmarks.md: `python bench/report.py`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def host_table(path: Path) -> str:
    d = json.loads(path.read_text())
    h, o = d["host_pipeline"], d["loader_overhead"]
    lines = [f"`{path.name}` ({d['images']} synthetic JPEGs, {len(h['rounds'])} interleaved rounds of "
             f"{h['images_per_round']} images per system, {h['workers']} workers each)", "",
             "| round | nearstore | PyTorch DataLoader+Pillow | DALI CPU | vs PyTorch | vs DALI |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(h["rounds"], 1):
        dali, ns = r.get("dali_cpu"), r["nearstore"]
        lines.append(f"| {i} | {r['nearstore']:.0f} | {r['torch_dataloader_pillow']:.0f} | "
                     f"{dali and f'{dali:.0f}' or '-'} | {r['nearstore'] / r['torch_dataloader_pillow']:.2f}x | "
                     f"{dali and f'{ns / dali:.2f}x' or '-'} |")
    m, q = h["median_images_per_s"], h["median_ratio"]
    lines.append(f"| **median** | **{m['nearstore']:.0f}** | **{m['torch_dataloader_pillow']:.0f}** | "
                 f"**{m.get('dali_cpu', 0):.0f}** | **{q['vs_torch']:.2f}x** | **{q.get('vs_dali', 0):.2f}x** |")
    lines += ["", f"Loader overhead (decoded 32x32x3 samples, reshape-only ops, batch {o['batch_size']}): rounds "
              + ", ".join(f"{x:,.0f}" for x in o["rounds_samples_per_s"])
              + f" samples/s, median **{o['median_samples_per_s']:,.0f}**."]
    return "\n".join(lines)


def nodes_table(path: Path) -> str:
    d = json.loads(path.read_text())
    lines = ["| source | cap MB/s/node | host-side samples/s (bottleneck) | node-side samples/s (bottleneck) | "
             "speedup | bytes ratio | speedup / bytes ratio | host link util. | node link util. | goal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in d["comparisons"]:
        lines.append(
            f"| {c['source']} | {c['cap_mb_per_s']:.0f} | {c['host_samples_per_s']:.1f} ({c['host_bottleneck']}) | "
            f"{c['node_samples_per_s']:.1f} ({c['node_bottleneck']}) | {c['speedup']:.2f}x | {c['bytes_ratio']:.2f}x | "
            f"{c['speedup_over_bytes_ratio']:.2f} | {c['host_link_utilization']:.0%} | "
            f"{c['node_link_utilization']:.0%} | {c['goal'] or 'n/a'} |")
    lines += ["", "| source | cap | split | samples/s | bytes/sample | node busy | host busy | node stage s | "
              "host stage s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in d["runs"]:
        node = ", ".join(f"{k} {v:.1f}" for k, v in r["node_stage_seconds"].items() if v > 0.05)
        host = ", ".join(f"{k} {v:.1f}" for k, v in r["host_stage_seconds"].items() if v > 0.05)
        lines.append(f"| {r['source']} | {r['cap_mb_per_s']:.0f} | {r['split']} | {r['samples_per_s']:.1f} | "
                     f"{r['bytes_per_sample'] / 1e3:.0f} KB | {r['node_busy']:.0%} | "
                     f"{r['host_busy']:.0%} | {node or '-'} | {host or '-'} |")
    s = d["streaming"]
    if "runs" in s:  # the process run at the median: its samples, bytes and seconds agree with its GB/s
        s = {**s, **min((r for r in s["runs"] if r["worker_kind"] == "process"),
                        key=lambda r: abs(r["gb_per_s"] - s["gb_per_s"]))}
    lines += ["", f"Uncapped loopback streaming of preprocessed uint8 224x224x3 samples from 2 nodes: "
              f"**{s['gb_per_s']:.2f} GB/s** ({s['samples']} samples, {s['wire_bytes'] / 1e6:.0f} MB in "
              f"{s['seconds']:.2f} s)."]
    if "thread_gb_per_s" in s:
        lines += ["", f"Node workers as processes (default, shared-memory hand-off) vs threads, interleaved in the "
                  f"same run: {s['gb_per_s']:.2f} vs {s['thread_gb_per_s']:.2f} GB/s (median of "
                  f"{len(s['runs']) // 2} each; ratio {s['process_over_thread']:.2f})."]
    return "\n".join(lines)


def plan_table(path: Path) -> str:
    d = json.loads(path.read_text())
    lines = ["| scenario | split | on the nodes | predicted samples/s (bottleneck) | measured samples/s | error | "
             "measured: cores busy nodes / host, link use | chosen |", "|---|---|---|---|---|---|---|---|"]
    for sc in d["scenarios"]:
        for r in sc["splits"]:
            chosen = "**yes**" if r["split"] == sc["choice"] else ""
            busy = "-"
            if "host_cpu_busy" in r:  # recorded since run j
                link = f", {r['link_utilization']:.0%}" if r.get("link_utilization") is not None else ""
                busy = f"{sum(r['node_cpu_busy']):.2f} / {r['host_cpu_busy']:.2f}{link}"
            lines.append(f"| {sc['name']} | {r['split']} | {'+'.join(r['node_stages']) or '-'} | "
                         f"{r['predicted']:.1f} ({r['predicted_bottleneck']}) | {r['measured']:.1f} | "
                         f"{r['error']:+.1%} | {busy} | {chosen} |")
    lines += ["", "| scenario | chosen split | its measured samples/s | best measured | within 5% of best | "
              "max abs error | calibration runs (split) | planning s (nodes' profiling) | within budget |",
              "|---|---|---|---|---|---|---|---|---|"]
    for sc in d["scenarios"]:
        cal, sec = sc.get("calibration", {}), sc.get("planning_seconds", {})
        runs = f"{cal.get('runs', '?')} ({cal.get('split', '-')})"
        took = f"{sec.get('total', 0):.1f} ({sec.get('profile_nodes', 0):.1f})" if sec else "-"
        ok = ("yes" if sc["planning_within_budget"] else "**no**") if "planning_within_budget" in sc else "-"
        lines.append(f"| {sc['name']} | {sc['choice']} | {sc['chosen_measured']:.1f} | {sc['best_measured']:.1f} | "
                     f"{'yes' if sc['choice_within_5pct'] else '**no**'} | {sc['max_abs_error']:.1%} | {runs} | "
                     f"{took} | {ok} |")
    m = d["summary"]
    lines += ["", f"{m['predictions']} predictions in {m['scenarios']} scenarios: {m['within_15pct']} within +-15%, "
              f"{m['within_10pct']} within +-10%; median |error| {m['median_abs_error']:.1%}, max "
              f"{m['max_abs_error']:.1%}; choice within 5% of the best measured in {m['choices_within_5pct']} of "
              f"{m['scenarios']} scenarios; at most {m.get('max_calibration_runs', '?')} calibration run per plan; "
              f"planning within its budget in {m.get('planning_within_budget', '?')} of {m['scenarios']}."]
    return "\n".join(lines)


def sweep_table(path: Path) -> str:
    d = json.loads(path.read_text())
    lines = ["| network | link MB/s | cut | samples/s | bytes/sample | bound by (measured) | planner: predicted "
             "(bottleneck) | planner's choice |", "|---|---|---|---|---|---|---|---|"]
    for p in d["points"]:
        lines.append(f"| {p['arch']} | {p['cap_mb_per_s']:g} | {p['cut']} | {p['samples_per_s']:.1f} | "
                     f"{p['bytes_per_sample']:,.0f} | {p['why']} | {p['predicted']:.1f} ({p['predicted_bottleneck']})"
                     f" | {'**this**' if p['planner_choice'] == p['split'] else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    for f in sorted(RESULTS.glob("host*.json")) if which in ("all", "host") else []:
        print(host_table(f), "\n")
    for f in [*RESULTS.glob("nodes.json"), *sorted(RESULTS.glob("nodes-run*.json"))] if which in ("all", "nodes") else []:
        print(nodes_table(f), "\n")
    for f in sorted(RESULTS.glob("plan.json")) if which in ("all", "plan") else []:
        print(plan_table(f), "\n")
    for f in sorted(RESULTS.glob("sweep.json")) if which in ("all", "sweep") else []:
        print(sweep_table(f), "\n")
