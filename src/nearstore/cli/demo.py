"""The demo: the README's main job, end to end on one machine in a few minutes."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from nearstore.bench.accel import emulated_training, split_sweep
from nearstore.bench.host import host_pipeline_bench, loader_overhead_bench
from nearstore.bench.nodes import UINT8_SPLIT, classify
from nearstore.bench.plots import plot_sweep
from nearstore.cli.design import Request, design_table, render_design
from nearstore.cli.jobs import jobs_demo
from nearstore.design import load_catalog
from nearstore.design.plots import plot_design
from nearstore.loader.loader import Loader
from nearstore.node.cluster import LocalCluster
from nearstore.ops.network import network_ops
from nearstore.ops.pipeline import Pipeline, standard_train
from nearstore.plan import plan
from nearstore.store.ingest import ingest
from nearstore.store.synth import SynthSpec, synth_folder

__all__ = ["run_demo", "host_table", "features_demo"]

_RATIO_KEYS = {"torch_dataloader_pillow": "vs_torch", "dali_cpu": "vs_dali"}


def host_table(host: dict, overhead: dict | None = None) -> Table:
    """The host-pipeline benchmark as a table: median images/s per system and nearstore's ratio."""
    t = Table(title=f"{host['pipeline']}, {host['workers']} workers each, median of interleaved rounds")
    t.add_column("system")
    t.add_column("images/s", justify="right")
    t.add_column("nearstore is", justify="right")
    for name, v in host["median_images_per_s"].items():
        r = host["median_ratio"].get(_RATIO_KEYS.get(name, ""))
        t.add_row(name, f"{v:.0f}", f"{r:.2f}x faster" if r else "")
    if overhead is not None:
        t.add_row("loader overhead (decoded 32x32, reshape only)", f"{overhead['median_samples_per_s']:.0f}", "")
    return t


def run_demo(workdir: Path, *, n: int, rounds: int, console: Console, progress: Callable[[], Progress]) -> dict:
    t0 = time.perf_counter()
    workdir = Path(workdir)
    src, store = workdir / "images", workdir / "store"
    if src.exists():
        shutil.rmtree(src)
    console.rule("1. synthesize an ImageNet-like JPEG folder")
    with progress() as p:
        task = p.add_task("synth", total=n)
        summary = synth_folder(src, SynthSpec(n=n, seed=0), progress=lambda k: p.advance(task, k))
    console.print(f"{summary['images']} JPEGs, mean {summary['mean_bytes'] / 1e3:.0f} KB")

    console.rule("2. ingest into a sharded store on 2 nodes, 2 replicas")
    report = ingest(src, store, nodes=2, replicas=2, shard_size=8 << 20)
    console.print(f"{report.samples} samples, {report.shards} shards, {report.bytes / 1e6:.0f} MB written")

    console.rule("3. one epoch through the loader (RRC224 + flip + normalize, batch 64)")
    with Loader(store, pipeline=standard_train(), batch_size=64, workers=2, seed=0) as loader:
        batches = 0
        for batch in loader:
            batches += 1
        st = loader.stats
    console.print(f"{st.samples} samples in {batches} batches, last batch {tuple(batch.data.shape)} "
                  f"{batch.data.dtype}; {st.samples_per_second:.0f} samples/s; per-op seconds "
                  + ", ".join(f"{k} {v:.2f}" for k, v in st.op_seconds.items()))

    console.rule("4. benchmark: nearstore vs PyTorch DataLoader+Pillow vs DALI CPU (same run)")
    with console.status("benchmarking") as status:
        host = host_pipeline_bench(store, n=1280, rounds=rounds, progress=lambda m: status.update(m))
        overhead = loader_overhead_bench(n=10000, rounds=rounds, workdir=workdir)
    console.print(host_table(host, overhead))
    if host["dali_note"]:
        console.print(f"note: {host['dali_note']}")
    console.rule("5. storage nodes: 2-node local cluster, link capped at 25 MB/s per node, large photos")
    nodes = node_demo(workdir, console=console, progress=progress)
    console.rule("6. features at storage: a network on the nodes vs crops over a 0.5 MB/s link")
    features = features_demo(store, console=console)
    console.rule("7. the designer: which storage system to buy for ResNet-50 training on ImageNet")
    design = design_demo(workdir, console=console)
    console.rule("8. inference on the nodes: embed a dataset where it lives, then query it there")
    jobs = jobs_demo(workdir, console=console)
    elapsed = time.perf_counter() - t0
    console.print(f"demo finished in {elapsed:.0f} s; results in {workdir / 'demo.json'}")
    return {"synth": summary, "ingest": report.__dict__, "epoch": st.as_dict(), "host_pipeline": host,
            "loader_overhead": overhead, "nodes": nodes, "features": features, "design": design, "jobs": jobs,
            "seconds": elapsed}


def node_demo(workdir: Path, *, console: Console, progress: Callable[[], Progress], n: int = 48,
              cap: float = 25.0) -> dict:
    """Host-side vs node-side split over a capped link: samples/s, AU and bytes per sample, plotted."""
    src, store = workdir / "photos", workdir / "photo-store"
    if src.exists():
        shutil.rmtree(src)
    with progress() as p:
        task = p.add_task("synth large photos", total=n)
        synth_folder(src, SynthSpec(n=n, seed=1, large=True), progress=lambda k: p.advance(task, k))
    ingest(src, store, nodes=2, replicas=1, shard_size=16 << 20)
    pipe = standard_train(224)
    with console.status("emulated training: host-side then node-side split"):
        runs = split_sweep(store, pipeline=pipe, caps=[cap], splits=["host", UINT8_SPLIT], samples=3 * n,
                           step_time=0.05, workers_per_node=1, batch_size=16)
    for r in runs:
        r["source"] = "large"
        r["bottleneck"] = classify(r, node_workers=2, host_workers=2)
    t = Table(title=f"ResNet-style input, 1-4 MP JPEGs, link {cap:.0f} MB/s per node, batch 16, 50 ms emulated step")
    for col in ("split", "samples/s", "AU", "bytes/sample", "link util.", "bottleneck"):
        t.add_column(col, justify="right")
    for r in runs:
        t.add_row("host (raw JPEG over the link)" if r["split"] == "host" else "node (uint8 224x224 over the link)",
                  f"{r['samples_per_s']:.1f}", f"{r['au']:.2f}", f"{r['bytes_per_sample'] / 1e3:.0f} KB",
                  f"{(r['link_utilization'] or 0):.0%}", r["bottleneck"])
    console.print(t)
    png = plot_sweep(runs, workdir / "splits.png")
    console.print(f"plot: {png}")
    with LocalCluster(store, link_mbps=cap, workers_per_node=1) as cluster, \
            console.status("planner: profiling nodes, host and link"):
        chosen = plan(cluster, pipe, batch_size=16, step_time=0.05, samples=16, loader=Loader)
    console.print(f"[bold]planner (Loader(split='auto')):[/bold] {chosen.reason}")
    return {"runs": runs, "plot": str(png), "plan": chosen.as_dict()}


def features_demo(store: Path, *, console: Console, arch: str = "mobilenet_v2", size: int = 112,
                  cap: float = 0.5, samples: int = 64, batch_size: int = 16, step_time: float = 0.05) -> dict:
    """A frozen network cut at pooled features on the nodes vs crops over the link and the network on the host.

    Both runs feed the same emulated accelerator (``step_time`` per batch);
    the table shows samples/s, AU and bytes per sample on the link, then the
    planner's choice among every split with its reason.
    """
    net = network_ops(arch, "pooled", dtype="float16", engine="pytorch", hw=(size, size))
    pipe = Pipeline(["decode_jpeg", {"op": "random_resized_crop", "size": size}, "to_uint8_chw", *net])
    crops = pipe.valid_splits[-2]  # everything before the network: uint8 crops cross the link
    runs = []
    t0 = time.perf_counter()
    with LocalCluster(store, link_mbps=cap, workers_per_node=1) as cluster:
        with console.status(f"emulated training: {arch} on the host, then on the nodes"):
            for split in (crops, "node"):
                # 3 untimed batches: each process builds the network on its first batch
                r = emulated_training(cluster.spec, pipeline=pipe, split=split, step_time=step_time,
                                      samples=samples, batch_size=batch_size, warmup_batches=3)
                # a link at its cap is the limit whatever the CPUs report (their op times include waiting for
                # cores that the nodes, the loader and the network share here)
                saturated = (r["link_utilization"] or 0) >= 0.95
                r["bottleneck"] = "link" if saturated else classify(r, node_workers=2, host_workers=2)
                runs.append(r)
        t1 = time.perf_counter()
        with console.status("planner: profiling nodes, host and link"):
            chosen = plan(cluster, pipe, batch_size=batch_size, step_time=step_time, samples=16, loader=Loader)
        t2 = time.perf_counter()
    t = Table(title=f"{arch} (PyTorch, fp16 pooled features) on {size}x{size} crops, link {cap:g} MB/s per node, "
                    f"batch {batch_size}, {step_time * 1e3:.0f} ms emulated step")
    for col in ("network on", "samples/s", "AU", "bytes/sample", "link", "bottleneck"):  # fits 80 columns
        t.add_column(col, justify="right")
    for r, label in zip(runs, ("host, crops sent", "nodes, features sent")):
        t.add_row(label, f"{r['samples_per_s']:.1f}", f"{r['au']:.2f}", f"{r['bytes_per_sample'] / 1e3:.1f} KB",
                  f"{(r['link_utilization'] or 0):.0%}", r["bottleneck"])
    console.print(t)
    console.print(f"[bold]planner (Loader(split='auto')):[/bold] {chosen.reason}")
    return {"arch": arch, "size": size, "cap_mb_per_s": cap, "pipeline": pipe.to_json(), "runs": runs,
            "plan": chosen.as_dict(), "seconds": {"runs": t1 - t0, "plan": t2 - t1}}


def design_demo(workdir: Path, *, console: Console) -> dict:
    """The designer's table and verdict for ResNet-50 training: host-centric and the seed's three designs, with
    the plot (the host-centric server is the baseline any storage design must beat)."""
    res = design_table(load_catalog(), Request(workload="resnet50-train"), variants=True)
    render_design(res, console)
    png = plot_design(res["designs"], res["variants"], workdir / "design.png",
                      title="ResNet-50 training on ImageNet-1k: host-centric vs the seed's three designs, 8 x H100")
    console.print(f"plot: {png}")
    return {"designs": res["designs"], "verdict": res["verdict"], "plot": str(png)}
