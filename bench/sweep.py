"""Where each cut of a network wins: `python bench/sweep.py [--quick] --json PATH`.

Link cap {2, 10, 100 MB/s per node} x cut {images: the nodes decode and crop
and send 224x224 uint8 crops, the host runs the network; mid: the nodes run
the network to layer2 and send its float16 activations, the host runs the
rest; pooled: the nodes run the whole backbone and send pooled float16
features} x network {ResNet-18, ResNet-50, MobileNetV2}, on large photos
(1-4 MP) on 2 nodes. The loader is pinned to CPU 0 and both nodes to CPU 1
(separate CPU sets: the storage side's CPU and the host's can be told
apart). Each point is measured with emulated training (no accelerator step,
the first 3 batches untimed), with the CPU each side kept busy and the
busiest link's utilization: the resource at ~100% is why that cut is where it
is. The planner's prediction and bottleneck for the same split come from one
`plan` per (network, cap).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nearstore.bench.accel import emulated_training
from nearstore.loader import Loader
from nearstore.node import LocalCluster
from nearstore.node.client import node_client
from nearstore.ops.network import network_ops
from nearstore.ops.pipeline import Pipeline
from nearstore.plan import plan
from nearstore.store.ingest import ingest
from nearstore.store.synth import SynthSpec, synth_folder

CAPS = (2.0, 10.0, 100.0)
NETS = ("resnet18", "resnet50", "mobilenet_v2")
CROP = ["decode_jpeg", {"op": "random_resized_crop", "size": 224}, "to_uint8_chw"]


def pipeline_of(arch: str) -> Pipeline:
    return Pipeline(CROP + network_ops(arch, "pooled", dtype="float16", engine="onnxruntime", segments=("layer2",),
                                       between="float16"))


#: cut name -> split (ops run on the nodes)
CUT_SPLITS = {"images": len(CROP), "mid (layer2)": len(CROP) + 1, "pooled": len(CROP) + 2}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_point(c: LocalCluster, pipe: Pipeline, split: int, seconds: float, rate: float) -> dict:
    clients = [node_client(c.spec, ep.node) for ep in c.spec.nodes]
    try:
        before = [x.stats()["cpu_seconds"] for x in clients]
        h0, t0 = time.process_time(), time.perf_counter()
        n = int(min(1024, max(64, rate * seconds)))
        r = emulated_training(c.spec, pipeline=pipe, split=split, step_time=0.0, samples=n, batch_size=16,
                              warmup_batches=3)
        wall = time.perf_counter() - t0
        after = [x.stats()["cpu_seconds"] for x in clients]
    finally:
        for x in clients:
            x.close()
    return {"samples_per_s": r["samples_per_s"], "bytes_per_sample": r["bytes_per_sample"],
            "link_utilization": r["link_utilization"],
            "node_cpu_busy": sum(a - b for a, b in zip(after, before)) / wall,  # of the nodes' one CPU
            "host_cpu_busy": (time.process_time() - h0) / wall}  # of the loader's one CPU


def why(p: dict) -> str:
    """The resource the measurement shows near its limit."""
    cand = {"link": p["link_utilization"] or 0.0, "node CPU": p["node_cpu_busy"], "host CPU": p["host_cpu_busy"]}
    name, u = max(cand.items(), key=lambda kv: kv[1])
    return f"{name} ({u:.0%})"


def sweep(store: Path, nets: list[str], caps: list[float], seconds: float) -> list[dict]:
    rows = []
    for arch in nets:
        pipe = pipeline_of(arch)
        for cap in caps:
            log(f"{arch}, {cap:g} MB/s")
            with LocalCluster(store, link_mbps=cap, workers_per_node=1, cpus=[1]) as c:
                p = plan(c, pipe, batch_size=16, loader=Loader)
                pred = {x.split: x for x in p.predictions}
                for cut, split in CUT_SPLITS.items():
                    m = run_point(c, pipe, split, seconds, pred[split].samples_per_s)
                    rows.append({"arch": arch, "cap_mb_per_s": cap, "cut": cut, "split": split, **m,
                                 "why": why(m), "predicted": pred[split].samples_per_s,
                                 "predicted_bottleneck": pred[split].bottleneck, "planner_choice": p.choice})
                    log(f"  {cut:13s} {m['samples_per_s']:7.1f}/s  {m['bytes_per_sample']:9,.0f} B/sample  "
                        f"bound: {rows[-1]['why']}  (predicted {pred[split].samples_per_s:.1f}, "
                        f"{pred[split].bottleneck})")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="MobileNetV2 at 10 MB/s only")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per point (default 4; quick 1)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--pinned", action="store_true", help=argparse.SUPPRESS)  # internal: already under taskset
    args = ap.parse_args(argv)
    if not args.pinned:  # the loader on CPU 0, the nodes (LocalCluster cpus=[1]) on CPU 1
        return subprocess.run(["taskset", "-c", "0", sys.executable, __file__, "--pinned",
                               *(argv if argv is not None else sys.argv[1:])]).returncode
    seconds = args.seconds or (1.0 if args.quick else 4.0)
    nets, caps = (["mobilenet_v2"], [10.0]) if args.quick else (list(NETS), list(CAPS))
    with tempfile.TemporaryDirectory(prefix="nearstore-sweep-") as tmp:
        n = 8 if args.quick else 32
        log(f"synthesizing {n} large photos")
        synth_folder(Path(tmp) / "src", SynthSpec(n=n, seed=2, large=True))
        ingest(Path(tmp) / "src", Path(tmp) / "store", nodes=2, replicas=1, shard_size=16 << 20)
        rows = sweep(Path(tmp) / "store", nets, caps, seconds)
    out = {"quick": args.quick, "seconds_per_point": seconds, "cpus": "loader CPU 0, both nodes CPU 1",
           "batch_size": 16, "points": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
