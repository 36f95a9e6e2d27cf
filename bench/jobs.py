"""Near-data inference jobs benchmark: `python bench/jobs.py [--quick] --json PATH` (run it under the bench lock).

Three figures (issue #12), MobileNetV2 pooled features in fp16 on 64x64 crops, 1 worker per node:

- **scale-out**: the same images ingested on 1, 2 and 4 nodes (1 replica, so each node holds 1/k of the
  shards), every node's CPU slowed (`--slowdown`, default 8: ops take 8x as long, the extra idle) so the
  nodes and not this 2-core machine are the limit; time of `jobs.infer` after a warm-up (the network is
  built in each worker first). Goal: 4 nodes >= 3.5x, 2 nodes >= 1.8x one node.
- **filter bytes**: a filter matching about 1% of the samples (`score >` the 99th percentile) returns
  <= 2% of the bytes of sending every sample's output (the derived files' bytes).
- **job vs network throughput**: on the 1-node cluster, the job's samples/s against the node's own
  throughput running the same op chain through the loader path (DoGet, split=node, same batch size).
  Goal: within 10%.

Other work shared the machine while it ran (the project's helpers run tests at once); the ratios come from
one run each, in the same process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nearstore.jobs import filter_samples, infer
from nearstore.jobs.infer import inference_pipeline
from nearstore.loader.loader import Loader
from nearstore.node import LocalCluster
from nearstore.node.client import NodeClient
from nearstore.ops.network import network_ops
from nearstore.store.derived import load_derived, read_shard_file
from nearstore.store.ingest import ingest
from nearstore.store.manifest import node_dir_name
from nearstore.store.synth import SynthSpec, synth_folder

NET = {"arch": "mobilenet_v2", "cut": "pooled", "dtype": "float16", "engine": "pytorch", "size": 64}


def _warm(cluster: LocalCluster, ops: list) -> None:
    """Build the network in every worker before timing (a job's first batch per worker pays it)."""
    for ep in cluster.spec.nodes:
        c = NodeClient(ep.uri, node=ep.node, timeout=600)
        try:
            c.profile(ops, 1)
        finally:
            c.close()


def _job(store: Path, k: int, slowdown: float, batch: int, *, loader_baseline: bool) -> dict:
    ops = [*inference_pipeline(NET["size"]), *network_ops(NET["arch"], NET["cut"], dtype=NET["dtype"],
                                                          engine=NET["engine"])]
    with LocalCluster(store, workers_per_node=1, slowdown=slowdown) as cluster:
        _warm(cluster, ops)
        out: dict = {"nodes": k}
        if loader_baseline:  # the node's network throughput on the loader path, same ops and batch
            with Loader(cluster=cluster.spec, pipeline=ops, split="node", batch_size=batch, shuffle=False,
                        workers=2, prefetch=8) as ld:  # enough batches in flight to keep the node busy
                t0 = time.perf_counter()
                n = sum(len(b) for b in ld)
                out["loader_samples_per_s"] = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        res = infer(store, cluster.spec, out="emb", overwrite=True, batch_size=batch, per_node=2,
                    **{k2: v for k2, v in NET.items()})
        out["seconds"] = time.perf_counter() - t0
        out["samples"] = res.manifest.num_samples
        out["samples_per_s"] = out["samples"] / out["seconds"]
        out["by_node"] = res.by_node
        out["file_bytes"] = res.manifest.file_bytes
        if loader_baseline:
            out["filter"] = _filter(store, cluster)
    return out


def _filter(store: Path, cluster: LocalCluster) -> dict:
    d = load_derived(store, "emb")
    scores = []
    for sh in d.shards:
        t, _ = read_shard_file(store / node_dir_name(sh.nodes[0]), "emb", d.generation, sh.shard)
        scores.extend(s for s in t.column("score").to_pylist() if s is not None)
    cut = float(np.quantile(np.asarray(scores, np.float64), 0.99))
    res = filter_samples(store, "emb", f"score > {cut!r}", cluster=cluster.spec)
    every = d.file_bytes  # sending every sample's output (with its key, label, class, score)
    values_only = d.num_samples * int(np.prod(d.shape)) * 2  # the fp16 outputs alone, no framing
    return {"expr": f"score > {cut:.6g}", "matched": res.table.num_rows, "samples": d.num_samples,
            "match_fraction": res.table.num_rows / d.num_samples, "bytes_returned": res.bytes_returned,
            "bytes_scanned": res.bytes_scanned, "bytes_every_output": every, "bytes_every_output_values": values_only,
            "returned_fraction": res.bytes_returned / every, "goal_le_2pct": res.bytes_returned <= 0.02 * every}


def run(n: int, slowdown: float, batch: int, nodes: tuple[int, ...], work: Path) -> dict:
    images = work / "images"
    synth_folder(images, SynthSpec(n=n, seed=3, classes=4), workers=1)
    runs = []
    for k in nodes:
        store = work / f"store-{k}"
        ingest(images, store, nodes=k, replicas=1, shard_size=max(1, n * 110_000 // (8 * k)))  # ~8 shards a node
        runs.append(_job(store, k, slowdown, batch, loader_baseline=k == nodes[0]))
        print(json.dumps({kk: v for kk, v in runs[-1].items() if kk != "filter"}), file=sys.stderr, flush=True)
    one = runs[0]  # the baseline: its filter and loader figures are the ones reported
    speedups = {r["nodes"]: r["samples_per_s"] / one["samples_per_s"] for r in runs}
    ratio = one["samples_per_s"] / one["loader_samples_per_s"]
    return {"config": {"samples": n, "slowdown": slowdown, "batch": batch, "net": NET, "workers_per_node": 1},
            "runs": runs, "speedup": speedups,
            "goals": {"4_nodes_ge_3.5x": speedups.get(4, 0) >= 3.5, "2_nodes_ge_1.8x": speedups.get(2, 0) >= 1.8,
                      "filter_le_2pct": one["filter"]["goal_le_2pct"],
                      "job_within_10pct_of_node_throughput": ratio >= 0.9},
            "job_vs_node_throughput": ratio, "filter": one["filter"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI: 120 samples, slowdown 4, 1 and 2 nodes")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--slowdown", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4], help="cluster sizes (the first is the baseline)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="nearstore-bench-jobs-"))
    try:
        if args.quick:
            res = run(120, 4.0, args.batch, (1, 2), work)
        else:
            res = run(args.samples, args.slowdown, args.batch, tuple(args.nodes), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    print(json.dumps({"speedup": res["speedup"], "job_vs_node_throughput": res["job_vs_node_throughput"],
                      "filter_returned_fraction": res["filter"]["returned_fraction"], "goals": res["goals"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
