"""Planner accuracy: `python bench/plan.py [--quick] [--only N ...] --json PATH`.

Scenarios across link caps, pipelines (the image pipeline; ResNet-18,
ResNet-50 and MobileNetV2 cut into segments, so splits fall inside the
network), node counts, emulated node slowdowns, and CPU sets: ``shared`` (the
nodes and the loader share this machine's cores) or ``separate`` (the loader
pinned to CPU 0, every node to CPU 1: storage hosts whose cores the loader
does not take; on this 2-CPU machine the nodes share their one CPU).

Each scenario runs in its own process (pinned with taskset where
``separate``): ``nearstore.plan`` profiles and calibrates (one loader run),
predicts every split; then every split is measured with emulated training
(about 4 s each at the predicted rate, at least 24 batches, the first 7 batches untimed), in three
rounds (forward, reverse, forward order; the mean is reported). Per split:
predicted vs measured samples/s and the error; per scenario: the choice's
measured throughput against the best measured, the calibration runs made, and
where planning time went. Goals (issue #11): every prediction within +-15%,
the choice within 5% of the best measured in >= 11 of 12 scenarios, at most one
calibration run per plan, planning <= 10 s for the image pipeline on 2 nodes,
and for a network's cuts no more than the nodes' profiling plus 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from nearstore.bench.accel import emulated_training
from nearstore.loader import Loader
from nearstore.node import LocalCluster
from nearstore.ops.network import network_ops
from nearstore.ops.pipeline import Pipeline, standard_train
from nearstore.plan import plan
from nearstore.store.ingest import ingest
from nearstore.store.synth import SynthSpec, synth_folder

#: name -> (source, pipeline, link MB/s per node or None, nodes, slowdown, cpus, accelerator s/batch or None)
SCENARIOS: dict[str, tuple] = {
    "images, 25 MB/s, 2 nodes, shared": ("synth", "images", 25.0, 2, 1.0, "shared", None),
    "images, open link, 2 nodes, shared": ("synth", "images", None, 2, 1.0, "shared", None),
    "images, 100 MB/s, 3 nodes, shared": ("synth", "images", 100.0, 3, 1.0, "shared", None),
    "images, open link, 2 nodes slowed 4x, shared": ("synth", "images", None, 2, 4.0, "shared", None),
    "images, 25 MB/s, accelerator 0.2 s/batch, shared": ("synth", "images", 25.0, 2, 1.0, "shared", 0.2),
    "large photos, 25 MB/s, 2 nodes, separate": ("large", "images", 25.0, 2, 1.0, "separate", None),
    "large photos, open link, 2 nodes, separate": ("large", "images", None, 2, 1.0, "separate", None),
    "resnet18, 10 MB/s, 2 nodes, shared": ("synth", "resnet18", 10.0, 2, 1.0, "shared", None),
    "resnet18, open link, 2 nodes, separate": ("synth", "resnet18", None, 2, 1.0, "separate", None),
    "resnet18, 10 MB/s, 1 node, separate": ("synth", "resnet18", 10.0, 1, 1.0, "separate", None),
    "mobilenet_v2, 2 MB/s, 2 nodes, shared": ("synth", "mobilenet_v2", 2.0, 2, 1.0, "shared", None),
    "mobilenet_v2, open link, 2 nodes slowed 3x, shared": ("synth", "mobilenet_v2", None, 2, 3.0, "shared", None),
    "resnet50, 10 MB/s, 2 nodes, separate": ("synth", "resnet50", 10.0, 2, 1.0, "separate", None),
}
QUICK = ["images, 25 MB/s, 2 nodes, shared", "mobilenet_v2, 2 MB/s, 2 nodes, shared"]
#: scenarios no planner rule was chosen on (`--held-out`): other node counts, caps and CPU sets per network
HELD_OUT: dict[str, tuple] = {
    "resnet18, 2 MB/s, 3 nodes, shared": ("synth", "resnet18", 2.0, 3, 1.0, "shared", None),
    "mobilenet_v2, 10 MB/s, 3 nodes, separate": ("synth", "mobilenet_v2", 10.0, 3, 1.0, "separate", None),
}
#: untimed batches before a split's window opens: the loader's read-ahead (prefetch 4 + 2 workers) once, plus
#: one. Requests in flight at start-up all began together and finish in a clump; with 3 warm-up batches a slow,
#: link-bound split (9 timed batches) measured up to 9% above its link's cap
WARMUP_BATCHES = 7
#: a split's window is at least this many batches (four read-aheads): in-flight requests progress together, so
#: batches arrive in clumps whose phase a shorter window would count (ResNet-50's link-bound split measured 39%
#: above its link's cap over 8 batches)
WINDOW_BATCHES = 24
NET_SIZE = 112  # network input side: small enough that 2 CPUs measure every split in seconds


def pipeline_of(kind: str) -> Pipeline:
    """The image pipeline, or a crop followed by a network in three segments (input..layer1, layer1..layer3,
    layer3..pooled, activations in float32 between them): splits before, inside and after the network."""
    if kind == "images":
        return standard_train(224)
    crop = ["decode_jpeg", {"op": "random_resized_crop", "size": NET_SIZE}, "to_uint8_chw"]
    return Pipeline(crop + network_ops(kind, "pooled", engine="onnxruntime", segments=("layer1", "layer3")))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_scenario(store: Path, name: str, *, rounds: int, seconds: float) -> dict:
    """Plan once, then measure every split ``rounds`` times, forward then reverse order (so a machine that
    speeds up or slows down during the scenario does not favour one split); measured = the mean."""
    source, kind, cap, nodes, slowdown, cpus, step = {**SCENARIOS, **HELD_OUT}[name]
    pipe = pipeline_of(kind)
    batch = 16 if kind != "images" or source == "large" else 64
    node_cpus = [max(os.sched_getaffinity(0)) + 1] if cpus == "separate" else None
    with LocalCluster(store, nodes=nodes, link_mbps=cap, workers_per_node=1, slowdown=slowdown,
                      cpus=node_cpus) as c:
        p = plan(c, pipe, batch_size=batch, step_time=step, loader=Loader)
        order = [pr.split for pr in p.predictions]
        rate = {pr.split: pr.samples_per_s for pr in p.predictions}
        runs: dict[int, list[dict]] = {k: [] for k in order}
        for rnd in range(rounds):
            for k in (order if rnd % 2 == 0 else order[::-1]):
                n = int(min(4096, max(WINDOW_BATCHES * batch, rate[k] * seconds)))
                runs[k].append(emulated_training(c.spec, pipeline=pipe, split=k, step_time=step or 0.0,
                                                 samples=n, batch_size=batch, warmup_batches=WARMUP_BATCHES))
    rows = []
    for pr in p.predictions:
        rs = runs[pr.split]
        measured = sum(r["samples_per_s"] for r in rs) / len(rs)
        rows.append({"split": pr.split, "node_stages": pr.node_stages, "predicted": pr.samples_per_s,
                     "predicted_bottleneck": pr.bottleneck, "measured": measured,
                     "measured_rounds": [r["samples_per_s"] for r in rs],
                     "error": pr.samples_per_s / measured - 1 if measured else None,
                     "bytes_per_sample_predicted": pr.bytes_per_sample,
                     "bytes_per_sample_measured": rs[-1]["bytes_per_sample"], "au": rs[-1]["au"],
                     # where the measured run's limit was: cores each side kept busy, the busiest link's use
                     "node_cpu_busy": [sum(r["node_cpu_busy"][i] for r in rs) / len(rs) for i in range(nodes)],
                     "host_cpu_busy": sum(r["host_cpu_busy"] for r in rs) / len(rs),
                     "link_utilization": (sum(r["link_utilization"] for r in rs) / len(rs)
                                          if rs[-1]["link_utilization"] is not None else None)})
    best = max(r["measured"] for r in rows)
    chosen = next(r for r in rows if r["split"] == p.choice)
    m = p.measurements
    budget = (10.0 if kind == "images" else m.seconds["profile_nodes"] + 5.0)
    return {"name": name, "source": source, "pipeline": kind, "cap_mb_per_s": cap, "nodes": nodes,
            "slowdown": slowdown, "cpus": cpus, "step_s": step, "choice": p.choice, "reason": p.reason,
            "splits": rows, "best_measured": best, "chosen_measured": chosen["measured"],
            "choice_within_5pct": chosen["measured"] >= 0.95 * best,
            "max_abs_error": max(abs(r["error"]) for r in rows), "calibration": p.calibration,
            "planning_seconds": m.seconds, "planning_budget_s": budget,
            "planning_within_budget": m.seconds["total"] <= budget, "measurements": asdict(m)}


def make_stores(work: Path, quick: bool) -> dict[str, Path]:
    """One store per (source, node count), the same images in each."""
    stores = {}
    for source, n, large in (("synth", 192 if quick else 384, False), ("large", 16 if quick else 48, True)):
        log(f"synthesizing {n} {source} images")
        synth_folder(work / f"{source}-src", SynthSpec(n=n, seed=1, large=large))
        for nodes in (1, 2, 3):
            ingest(work / f"{source}-src", work / f"{source}-{nodes}", nodes=nodes, replicas=1,
                   shard_size=(16 if large else 2) << 20)
            stores[f"{source}-{nodes}"] = work / f"{source}-{nodes}"
    return stores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="two scenarios, one round each")
    ap.add_argument("--only", nargs="*", type=int, default=None, help="scenario numbers (0-based) to run")
    ap.add_argument("--held-out", action="store_true", help="only the scenarios no planner rule was chosen on")
    ap.add_argument("--rounds", type=int, default=None, help="measurements of each split (default 3; quick 1)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per measurement (default 4; quick 2)")
    ap.add_argument("--json", type=Path, required=True)
    # internal: run one scenario in this process (the parent pins it with taskset where the CPUs are separate)
    ap.add_argument("--scenario", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 4.0)
    if args.scenario is not None:
        r = run_scenario(args.store, args.scenario, rounds=rounds, seconds=seconds)
        args.json.write_text(json.dumps(r, indent=1))
        return 0
    names = list(SCENARIOS)
    chosen = (list(HELD_OUT) if args.held_out else QUICK if args.quick else
              [names[i] for i in args.only] if args.only is not None else names)
    out: dict = {"quick": args.quick, "rounds": rounds, "seconds_per_measurement": seconds,
                 "cpus_here": sorted(os.sched_getaffinity(0)), "scenarios": []}
    with tempfile.TemporaryDirectory(prefix="nearstore-plan-") as tmp:
        work = Path(tmp)
        stores = make_stores(work, args.quick)
        for name in chosen:
            source, _, _, nodes, _, cpus, _ = {**SCENARIOS, **HELD_OUT}[name]
            log(name)
            one = work / "scenario.json"
            cmd = [sys.executable, __file__, "--scenario", name, "--store", str(stores[f"{source}-{nodes}"]),
                   "--rounds", str(rounds), "--seconds", str(seconds), "--json", str(one)]
            if cpus == "separate":  # the loader on CPU 0; the scenario pins its nodes to CPU 1
                cmd = ["taskset", "-c", "0", *cmd]
            subprocess.run(cmd, check=True)
            r = json.loads(one.read_text())
            out["scenarios"].append(r)
            for s in r["splits"]:
                log(f"  split {s['split']}: predicted {s['predicted']:7.1f} ({s['predicted_bottleneck']}), "
                    f"measured {s['measured']:7.1f}, error {s['error']:+.1%}")
            log(f"  choice {r['choice']}: within 5% of best: {r['choice_within_5pct']}; planning "
                f"{r['planning_seconds']['total']:.1f} s (budget {r['planning_budget_s']:.1f} s)")
    errs = [abs(s["error"]) for sc in out["scenarios"] for s in sc["splits"]]
    out["summary"] = {
        "scenarios": len(out["scenarios"]), "predictions": len(errs),
        "within_15pct": sum(e <= 0.15 for e in errs), "within_10pct": sum(e <= 0.10 for e in errs),
        "max_abs_error": max(errs), "median_abs_error": sorted(errs)[len(errs) // 2],
        "choices_within_5pct": sum(sc["choice_within_5pct"] for sc in out["scenarios"]),
        "max_calibration_runs": max(sc["calibration"]["runs"] for sc in out["scenarios"]),
        "planning_within_budget": sum(sc["planning_within_budget"] for sc in out["scenarios"]),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(json.dumps(out["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
