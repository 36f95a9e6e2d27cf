"""The ``nearstore`` command line: synth, ingest, info, bench, demo.

Thin layer over the library: parses arguments (typer), shows progress (rich),
prints tables, writes ``--json`` results. Errors from nearstore are printed as
one clear line and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from nearstore.core.errors import ConfigError, NearstoreError

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Near-storage processing for deep learning.")
console = Console(stderr=True)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@app.callback()
def _setup(log_level: Optional[str] = typer.Option(None, "--log-level", envvar="NEARSTORE_LOG_LEVEL",
                                                  help="level of nearstore's log on stderr: DEBUG, INFO, WARNING "
                                                  "(default), ERROR; node processes that `up` starts log at it "
                                                  "too (default INFO), to STORE/.nearstore/node-XXX.log")) -> None:
    level = (log_level or "WARNING").upper()
    if level not in LOG_LEVELS:
        raise typer.BadParameter(f"--log-level must be one of {', '.join(LOG_LEVELS)} (got {log_level!r})")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if log_level:
        os.environ["NEARSTORE_LOG_LEVEL"] = level  # node processes inherit it


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


def write_json(path: Optional[Path], data: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, default=str))
        console.print(f"wrote {path}")


@app.command()
def synth(
    out: Path = typer.Argument(..., help="folder to write (class subfolders)"),
    n: int = typer.Option(1000, "--n", help="number of images"),
    seed: int = typer.Option(0, help="seed: the same seed gives the same images"),
    classes: int = typer.Option(10, help="number of classes"),
    large: bool = typer.Option(False, "--large", help="1-4 MP photos instead of ImageNet-like 200-1000 px"),
    class_colors: bool = typer.Option(False, "--class-colors", help="tint each class with its own hue (separable "
                                      "classes, for transfer-learning runs)"),
    workers: Optional[int] = typer.Option(None, help="processes (default: all cores)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write a summary as JSON"),
) -> None:
    """Write a synthetic ImageNet-like JPEG folder (deterministic for a seed)."""
    from nearstore.store.synth import SynthSpec, synth_folder

    spec = SynthSpec(n=n, seed=seed, classes=classes, large=large, class_colors=class_colors)
    with _progress() as p:
        task = p.add_task("synth", total=n)
        summary = synth_folder(out, spec, workers=workers, progress=lambda k: p.advance(task, k))
    console.print(f"{summary['images']} images, {summary['classes']} classes, mean {summary['mean_bytes'] / 1e3:.1f} KB")
    write_json(json_path, summary)


@app.command("ingest")
def ingest_cmd(
    src: Path = typer.Argument(..., help="image folder (SRC/<class>/*.jpg), a .tar, or a folder of WebDataset .tar"),
    store: Path = typer.Argument(..., help="store directory to create or replace"),
    nodes: int = typer.Option(1, help="node directories (K)"),
    replicas: int = typer.Option(1, help="copies of each shard on distinct nodes (R <= K)"),
    shard_size: int = typer.Option(64 << 20, help="target shard size in bytes"),
    shard_samples: Optional[int] = typer.Option(None, help="at most this many samples per shard (default: no limit)"),
    on_error: str = typer.Option("raise", help="'raise' or 'skip' unreadable images"),
    json_path: Optional[Path] = typer.Option(None, "--json"),
) -> None:
    """Ingest a folder or WebDataset tars into a sharded, checksummed store."""
    from nearstore.store.ingest import ingest

    with _progress() as p:
        task = p.add_task("ingest", total=None)
        report = ingest(src, store, nodes=nodes, replicas=replicas, shard_size=shard_size,
                        shard_samples=shard_samples, on_error=on_error,
                        progress=lambda done, total: p.update(task, completed=done, total=total))
    console.print(f"{report.samples} samples in {report.shards} shards on {report.nodes} nodes x{report.replicas} "
                  f"({report.bytes / 1e6:.1f} MB) in {report.seconds:.1f} s; skipped {len(report.skipped)}, "
                  f"converted to JPEG {len(report.converted)}")
    write_json(json_path, report.__dict__)


@app.command()
def info(store: Path = typer.Argument(...), json_path: Optional[Path] = typer.Option(None, "--json")) -> None:
    """Summarize a store: samples, classes, shards, placement, sizes, and its derived datasets."""
    from nearstore.store.derived import list_derived, load_derived
    from nearstore.store.manifest import Manifest

    man = Manifest.load(store)
    derived = {}
    for name in list_derived(store):  # STORE/derived/NAME.json (docs/jobs.md: where the record lives and why)
        d = load_derived(store, name)
        derived[name] = {"samples": d.num_samples, "generation": d.generation, "file_bytes": d.file_bytes,
                         "current": d.dataset_fingerprint == man.fingerprint, **d.fingerprint.model_dump()}
    data = {
        "name": man.name, "generation": man.generation, "payload": man.payload, "samples": man.num_samples,
        "classes": len(man.classes), "shards": len(man.shards), "nodes": man.nodes, "replicas": man.replicas,
        "tar_bytes": sum(s.tar_bytes for s in man.shards), "mean_payload_bytes": man.mean_payload_bytes,
        "mean_width": man.mean_width, "mean_height": man.mean_height, "fingerprint": man.fingerprint,
        "placement": {s.name: s.nodes for s in man.shards}, "derived": derived,
    }
    t = Table(title=f"store {store}")
    t.add_column("field")
    t.add_column("value")
    for k, v in data.items():
        if k not in ("placement", "derived"):
            t.add_row(k, f"{v:.1f}" if isinstance(v, float) else str(v))
    for name, d in derived.items():
        t.add_row(f"derived {name}", f"{d['arch']} {d['cut']} {d['dtype']} {d['engine']}, {d['samples']} samples"
                  + ("" if d["current"] else " (made from an older version of the store: stale)"))
    per_node = {n: sum(1 for s in man.shards if n in s.nodes) for n in range(man.nodes)}
    t.add_row("shards per node", ", ".join(f"node-{n:03d}: {c}" for n, c in per_node.items()))
    Console().print(t)
    write_json(json_path, data)


node_app = typer.Typer(no_args_is_help=True, help="Run a storage node by hand (one per storage host).")
app.add_typer(node_app, name="node")


@node_app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def node_serve(ctx: typer.Context) -> None:
    """Serve one node directory over Arrow Flight: --data DIR [--port P] [--host H] [--workers W]
    [--link-mbps MB/s] [--token T] [--ops-module MODULE] [--allow-shutdown]."""
    from nearstore.node.server import main as serve_main

    raise typer.Exit(serve_main(list(ctx.args)))


@app.command()
def up(
    store: Path = typer.Argument(..., help="store whose node directories to serve"),
    nodes: Optional[int] = typer.Option(None, help="how many node directories (default: all)"),
    link_mbps: Optional[float] = typer.Option(None, help="per-node link cap in MB/s (10^6 bytes/s)"),
    workers_per_node: int = typer.Option(2, help="worker processes running ops on each node"),
    worker_kind: str = typer.Option("process", help="process (a decoder crash costs one request) or thread "
                                    "(no process hop)"),
    host: str = typer.Option("127.0.0.1", help="address the nodes bind (default: loopback only)"),
    token: Optional[str] = typer.Option(None, envvar="NEARSTORE_TOKEN", help="require this token"),
    token_file: Optional[Path] = typer.Option(None, help="require the token in this file (it is not copied into "
                                              "the cluster file; loaders read the file)"),
    tls_cert: Optional[Path] = typer.Option(None, help="serve TLS with this PEM certificate"),
    tls_key: Optional[Path] = typer.Option(None, help="PEM private key of --tls-cert"),
    tls_root_cert: Optional[Path] = typer.Option(None, help="CA loaders verify the nodes against "
                                                 "(default: --tls-cert, for a self-signed certificate)"),
    metrics_port: Optional[int] = typer.Option(None, help="Prometheus endpoint of node n on this port + n "
                                               "(0: any free port; the URLs go into the cluster file)"),
    ray: Optional[str] = typer.Option(None, "--ray", help="start the nodes as actors on the Ray cluster at this "
                                      "address, each on the host declaring its node directory "
                                      "(docs/multihost.md); needs the ray extra"),
    ray_namespace: str = typer.Option("nearstore", help="with --ray: Ray namespace of the node actors"),
    max_restarts: int = typer.Option(-1, help="with --ray: times Ray restarts a dead node actor (-1: no limit)"),
    ops_module: list[str] = typer.Option([], "--ops-module", help="import ops from this module on every node "
                                         "(dotted name or .py file; repeatable)"),
) -> None:
    """Start a cluster (one node per node directory: local processes, or Ray actors with --ray) and write
    STORE/cluster.json."""
    from nearstore.node.cluster import CLUSTER_FILE, NodeOptions, read_token_file, start_cluster

    if (store / CLUSTER_FILE).exists():
        raise typer.BadParameter(f"{store / CLUSTER_FILE} exists: run `nearstore down {store}` first")
    secret = read_token_file(token_file) if token_file else token
    opts = NodeOptions.of(link_mbps=link_mbps, workers_per_node=workers_per_node, worker_kind=worker_kind,
                          token=secret, host=host, tls_cert=_opt_str(tls_cert), tls_key=_opt_str(tls_key),
                          metrics_port=metrics_port, ops_modules=[_module_arg(m) for m in ops_module])
    if ray is not None:
        from nearstore.node.ray import start_ray_cluster

        spec = start_ray_cluster(store, ray, opts, nodes=nodes, namespace=ray_namespace, max_restarts=max_restarts,
                                 tls_root_cert=_opt_str(tls_root_cert))
    else:
        spec, procs = start_cluster(store, opts, nodes=nodes, tls_root_cert=_opt_str(tls_root_cert), detach=True)
        for p in procs:
            if p.stdout:
                p.stdout.close()
    if token_file:
        spec = spec.model_copy(update={"token": None, "token_file": str(token_file.resolve())})
    spec.save(store / CLUSTER_FILE)
    for ep in spec.nodes:
        console.print(f"node {ep.node}: {ep.uri} (pid {ep.pid})" + (f", metrics {ep.metrics}" if ep.metrics else "")
                      + (f", Ray actor {ep.actor}" if ep.actor else ""))
    console.print(f"cluster file: {store / CLUSTER_FILE}; stop with `nearstore down {store}`")


def _module_arg(m: str) -> str:
    """An --ops-module as the nodes will see it: a .py file by absolute path (nodes run elsewhere), a dotted
    module as given."""
    return str(Path(m).resolve()) if m.endswith(".py") or "/" in m else m


def _opt_str(p: Optional[Path]) -> Optional[str]:
    return str(p.resolve()) if p is not None else None


@app.command()
def down(store: Path = typer.Argument(...)) -> None:
    """Stop the cluster recorded in STORE/cluster.json (local processes, or Ray actors)."""
    from nearstore.node.cluster import CLUSTER_FILE, ClusterSpec, stop_cluster

    spec = ClusterSpec.load(store)
    if spec.ray_address:
        from nearstore.node.ray import stop_ray_cluster

        names = stop_ray_cluster(spec)
        (store / CLUSTER_FILE).unlink(missing_ok=True)
        console.print(f"stopped {len(names)} node actors on Ray at {spec.ray_address}")
        return
    pids = stop_cluster(store)
    console.print(f"stopped {len(pids)} node processes")


@app.command()
def top(
    store: Path = typer.Argument(..., help="store (or cluster file) of a running cluster"),
    interval: float = typer.Option(1.0, help="seconds between refreshes"),
    iterations: Optional[int] = typer.Option(None, help="stop after this many refreshes (default: until Ctrl-C)"),
) -> None:
    """Live view of a running cluster: per node samples/s, MB/s, link use, CPU, errors, worker restarts."""
    from nearstore.cli.top import run_top
    from nearstore.node.cluster import ClusterSpec

    if interval <= 0:
        raise typer.BadParameter(f"--interval must be > 0 seconds (got {interval})")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())  # Ctrl-C ends the loop between refreshes
    run_top(ClusterSpec.load(store), interval=interval, console=Console(), iterations=iterations, stop=stop)
    if stop.is_set():
        console.print("stopped")


@app.command()
def rebalance(
    store: Path = typer.Argument(..., help="the store directory"),
    nodes: int = typer.Option(..., "--nodes", help="node directories after the move (more: grow, fewer: shrink)"),
    replicas: Optional[int] = typer.Option(None, "--replicas", help="copies per shard (default: the store's)"),
    grace: float = typer.Option(2.0, "--grace", help="seconds between the new manifest and deleting old copies"),
) -> None:
    """Move the shards to the placement of --nodes node directories, online: a running local cluster
    (STORE/cluster.json) gets servers for new nodes and loses those of removed ones."""
    from nearstore.node.cluster import CLUSTER_FILE, ClusterSpec, NodeOptions, start_node, stop_node
    from nearstore.store.rebalance import rebalance as run_rebalance

    spec = ClusterSpec.load(store) if (store / CLUSTER_FILE).exists() else None
    if spec is not None and spec.tls_root_cert:
        raise typer.BadParameter("a TLS cluster is running: stop it (`nearstore down`), rebalance, start it again")

    def follow(stage: str, man) -> None:  # noqa: ANN001
        if spec is None:
            return
        have = {ep.node for ep in spec.nodes}
        if stage == "widened":
            opts = NodeOptions.of(link_mbps=spec.link_mbps, workers_per_node=spec.workers_per_node, token=spec.token)
            for n in range(man.nodes):
                if n not in have:
                    ep, _ = start_node(store, n, opts, detach=True)
                    spec.nodes.append(ep)
                    console.print(f"node {n}: {ep.uri} (pid {ep.pid})")
        elif stage == "swept":
            for ep in [e for e in spec.nodes if e.node >= man.nodes]:
                stop_node(ep)
                spec.nodes.remove(ep)
        spec.save(store / CLUSTER_FILE)

    r = run_rebalance(store, nodes, replicas=replicas, grace=grace, on_stage=follow)
    console.print(f"{r.nodes_before} -> {r.nodes_after} nodes x{r.replicas}: {r.copies_made} copies made "
                  f"({r.bytes_copied / 1e6:.1f} MB), {r.copies_removed} removed, {r.seconds:.1f} s")


@app.command()
def scrub(
    store: Path = typer.Argument(..., help="the store directory (or, with --cluster, its cluster file's folder)"),
    repair: bool = typer.Option(False, "--repair", help="restore damaged or missing copies from good ones"),
    cluster: bool = typer.Option(False, "--cluster", help="scrub through the running nodes (STORE/cluster.json)"),
    json_path: Optional[Path] = typer.Option(None, "--json"),
) -> None:
    """Check every copy of every shard, index and manifest (crc32c); exit 1 if damage remains."""
    if cluster:
        from nearstore.node.cluster import ClusterSpec
        from nearstore.node.maintenance import scrub_cluster

        data = scrub_cluster(ClusterSpec.load(store), repair=repair)
        for d in data["damage"]:
            console.print(f"damaged: node {d['node']} shard {d['shard']}: {d['detail'] or d['missing']}"
                          + (" [repaired]" if d.get("repaired") else ""))
        remaining = [d for d in data["damage"] if not d.get("repaired")] + list(data["unreachable"].values())
    else:
        from nearstore.store.scrub import scrub as run_scrub

        report = run_scrub(store, repair=repair)
        data = report.to_dict()
        for d in report.damage:
            console.print(f"damaged: {d.file} ({d.kind}): {d.detail}" + (" [repaired]" if d.repaired else ""))
        remaining = [d for d in report.damage if not d.repaired] + report.unrepairable
        console.print(f"{report.copies} copies of {report.shards} shards, {report.samples_checked} samples, "
                      f"{report.bytes_read / 1e6:.1f} MB in {report.seconds:.1f} s")
    for u in data["unrepairable"]:
        console.print(f"[red]cannot repair:[/red] {u}")
    print("clean" if not data["damage"] else f"{len(data['damage'])} damaged, {len(remaining)} left")
    write_json(json_path, data)
    if remaining:
        raise typer.Exit(1)


@app.command()
def bench(
    local: Optional[Path] = typer.Option(None, "--local", help="store to benchmark the host pipeline on"),
    cluster: Optional[Path] = typer.Option(None, "--cluster", help="cluster file (or store dir) for the "
                                           "emulated-accelerator benchmark"),
    split: Optional[str] = typer.Option(None, help="with --cluster: 'host', 'node' or an op index (default: host; "
                                        "node with --train-head)"),
    step_time: Optional[float] = typer.Option(None, help="with --cluster: seconds of emulated compute per batch"),
    accel: Optional[str] = typer.Option(None, help="with --cluster: emulate this accelerator (h100, a100) ..."),
    model: str = typer.Option("resnet50", help="... running this model (step time from MLPerf Storage)"),
    batch_size: int = typer.Option(64, help="with --cluster: batch size"),
    samples: int = typer.Option(512, help="with --cluster: samples to time"),
    normalize: bool = typer.Option(True, help="with --cluster: end the pipeline with normalize"),
    train_head: bool = typer.Option(False, "--train-head", help="with --cluster: the accelerator's work is a real "
                                    "training step (a classifier head on --net features) instead of a sleep"),
    net: str = typer.Option("resnet18", help="with --train-head: backbone (resnet18, resnet50, mobilenet_v2)"),
    cut: str = typer.Option("pooled", help="with --train-head: where the backbone stops"),
    dtype: str = typer.Option("float16", help="with --train-head: feature dtype (float32, float16, int8)"),
    engine: str = typer.Option("auto", help="with --train-head: auto, pytorch, onnxruntime, onnxruntime-int8"),
    size: int = typer.Option(224, help="with --train-head: crop size the backbone sees"),
    hidden: int = typer.Option(0, help="with --train-head: hidden units of an MLP head (0: linear)"),
    lr: float = typer.Option(1e-2, help="with --train-head: Adam learning rate"),
    n: int = typer.Option(1280, help="images per system per round"),
    rounds: int = typer.Option(3, help="interleaved rounds (median reported)"),
    workers: int = typer.Option(2, help="host workers for every system"),
    dali: bool = typer.Option(True, help="include NVIDIA DALI CPU when importable"),
    overhead: bool = typer.Option(True, help="also measure loader overhead on decoded samples"),
    overhead_samples: int = typer.Option(20000, min=1, help="decoded samples per round of the overhead measurement"),
    json_path: Optional[Path] = typer.Option(None, "--json"),
) -> None:
    """Host pipeline benchmark (--local) or emulated-accelerator training over a cluster (--cluster)."""
    from nearstore.bench.host import host_pipeline_bench, loader_overhead_bench

    if cluster is not None:
        from nearstore.bench.accel import emulated_training, step_time_for
        from nearstore.node.cluster import ClusterSpec
        from nearstore.ops.pipeline import standard_train

        spec = ClusterSpec.load(cluster)
        split = split or ("node" if train_head else "host")
        split_arg = int(split) if split.isdigit() else split
        if train_head:
            from nearstore.bench.accel import head_training

            if step_time is not None or accel is not None:
                raise typer.BadParameter("--train-head measures a real step: drop --step-time / --accel")
            res = head_training(spec, net=net, cut=cut, dtype=dtype, engine=engine, size=size, hidden=hidden,
                                lr=lr, split=split_arg, samples=samples, batch_size=batch_size)
            title = (f"head training on {net} {cut} {dtype} features, split {split}, "
                     f"step {res['step_time']:.4f} s (measured)")
            keys = ("samples_per_s", "au", "stall_seconds", "bytes_per_sample", "link_utilization", "loss_first",
                    "loss_last")
        else:
            if (step_time is None) == (accel is None):
                raise typer.BadParameter("give exactly one of --step-time S, --accel NAME [--model M] or "
                                         "--train-head")
            step = step_time if step_time is not None else step_time_for(accel, model, batch_size)
            res = emulated_training(spec, pipeline=standard_train(normalize=normalize), split=split_arg,
                                    step_time=step, samples=samples, batch_size=batch_size)
            res["accelerator"] = {"name": accel, "model": model} if accel else None
            title = f"emulated training, split {split}, step {step:.4f} s" + (f" ({accel} {model})" if accel else "")
            keys = ("samples_per_s", "au", "stall_seconds", "bytes_per_sample", "link_utilization")
        t = Table(title=title)
        t.add_column("metric")
        t.add_column("value", justify="right")
        for k in keys:
            v = res[k]
            t.add_row(k, "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        for where in ("node_stage_seconds", "host_stage_seconds"):
            for k, v in sorted(res[where].items()):
                t.add_row(f"{where.removesuffix('_stage_seconds')}: {k} s", f"{v:.3f}")
        Console().print(t)
        write_json(json_path, res)
        return
    if local is None:
        raise typer.BadParameter("give --local STORE (host pipeline) or --cluster FILE (emulated training)")

    with console.status("benchmarking") as status:
        res = host_pipeline_bench(local, n=n, rounds=rounds, workers=workers, dali=dali,
                                  progress=lambda msg: status.update(msg))
        out = {"host_pipeline": res}
        if overhead:
            status.update("loader overhead")
            out["loader_overhead"] = loader_overhead_bench(n=overhead_samples, rounds=rounds, workdir=local.parent)
    from nearstore.cli.demo import host_table

    Console().print(host_table(res, out.get("loader_overhead")))
    if res["dali_note"]:
        console.print(f"note: {res['dali_note']}")
    write_json(json_path, out)


def _pipeline_arg(pipeline: str, normalize: bool):  # noqa: ANN202
    from nearstore.ops.pipeline import Pipeline, standard_train

    if pipeline == "standard_train":
        return standard_train(normalize=normalize)
    path = Path(pipeline)
    if not path.exists():
        raise typer.BadParameter(f"--pipeline is 'standard_train' or a JSON file with a list of ops; {path} does "
                                 "not exist")
    return Pipeline(json.loads(path.read_text()))


@app.command()
def plan(
    cluster: Path = typer.Option(..., "--cluster", help="cluster file (or store dir with cluster.json)"),
    pipeline: str = typer.Option("standard_train", help="'standard_train' or a JSON file listing the ops"),
    normalize: bool = typer.Option(True, help="with standard_train: end with normalize"),
    step_time: Optional[float] = typer.Option(None, help="seconds of accelerator compute per batch"),
    accel: Optional[str] = typer.Option(None, help="emulate this accelerator (h100, a100) ..."),
    model: str = typer.Option("resnet50", help="... running this model"),
    batch_size: int = typer.Option(64),
    workers: int = typer.Option(2, help="host op threads of the loader"),
    samples: Optional[int] = typer.Option(None, help="samples each node and the host profile (default: 16 for a "
                                                      "pipeline with a network, else 32)"),
    json_path: Optional[Path] = typer.Option(None, "--json"),
) -> None:
    """Profile the nodes, the host and the link; calibrate with one loader run; predict every split; choose."""
    from nearstore.node.cluster import ClusterSpec
    from nearstore.loader import Loader
    from nearstore.plan import plan as make_plan

    if step_time is not None and accel is not None:
        raise typer.BadParameter("give at most one of --step-time S or --accel NAME")
    if accel is not None:
        from nearstore.bench.accel import step_time_for

        step_time = step_time_for(accel, model, batch_size)
    pipe = _pipeline_arg(pipeline, normalize)
    with console.status("profiling nodes, host and link"):
        p = make_plan(ClusterSpec.load(cluster), pipe, host_workers=workers, step_time=step_time,
                      batch_size=batch_size, samples=samples, loader=Loader)
    t = Table(title="predicted throughput per split (ops[:split] run on the nodes)")
    for col in ("split", "on the nodes", "samples/s", "bottleneck", "bytes/sample on link"):
        t.add_column(col, justify="right" if col in ("samples/s", "bytes/sample on link") else "left")
    for pr in p.predictions:
        mark = " *" if pr.split == p.choice else ""
        t.add_row(f"{pr.split}{mark}", "+".join(pr.node_stages) or "-", f"{pr.samples_per_s:,.0f}", pr.bottleneck,
                  f"{pr.bytes_per_sample:,.0f}")
    Console().print(t)
    console.print(f"[bold]choice:[/bold] {p.reason}")
    cal = p.calibration
    took = ", ".join(f"{k} {v:.1f} s" for k, v in p.measurements.seconds.items())
    console.print(f"[bold]calibration:[/bold] {cal['runs']} loader run"
                  + (f" at split {cal['split']} ({cal['samples_per_s']:,.0f} samples/s, bound by {cal['bound_by']})"
                     if cal["runs"] else f": {cal['why']}") + f"; planning took {took}")
    write_json(json_path, p.as_dict())


@app.command()
def demo(
    workdir: Path = typer.Option(Path("demo-out"), help="where to put the data and results"),
    n: int = typer.Option(640, help="images to synthesize"),
    rounds: int = typer.Option(3, help="benchmark rounds"),
    json_path: Optional[Path] = typer.Option(None, "--json"),
) -> None:
    """Synthesize a dataset, ingest it on 2 nodes, load it, and benchmark the host pipeline."""
    from nearstore.cli.demo import run_demo

    result = run_demo(workdir, n=n, rounds=rounds, console=Console(), progress=_progress)
    write_json(json_path or workdir / "demo.json", result)


@app.command()
def design(
    workload: str = typer.Option("resnet50-train", help="resnet50-train, resnet50-infer, features-head, "
                                 "preprocess-only, unet3d-train, or one from --workloads"),
    arch: str = typer.Option("all", help="host_gpu_server, smart_ebof, smart_nvme_2u, nvdimm (comma list) or all"),
    gpus: int = typer.Option(8, help="accelerators in the compute tier every design feeds"),
    gpu: str = typer.Option("h100", help="catalog accelerator of the compute tier"),
    server: str = typer.Option("dgx-h100", help="catalog gpu_server of the compute tier"),
    compute_nics: Optional[str] = typer.Option(None, "--compute-nics", help="storage NICs per GPU server, "
                                               "COUNTxMODEL (default: the server's own)"),
    nics: Optional[str] = typer.Option(None, "--nics", help="uplinks of each storage box, COUNTxMODEL (e.g. 3x100gbe)"),
    drive: Optional[str] = typer.Option(None, "--drive", help="drive model of the chosen --arch"),
    drives: Optional[int] = typer.Option(None, "--drives", help="drives per box (or per GPU server)"),
    boxes: Optional[int] = typer.Option(None, "--boxes", help="storage boxes of each design"),
    no_gpu_decode: bool = typer.Option(False, "--no-gpu-decode", help="compute servers preprocess on CPUs only "
                                       "(no DALI on the GPUs)"),
    core_ms: Optional[float] = typer.Option(None, "--core-ms", help="per-image preprocessing cost on one reference "
                                            "server core, ms (overrides the workload's)"),
    dataset_samples: Optional[int] = typer.Option(None, "--dataset-samples", help="dataset size in samples"),
    years: float = typer.Option(5.0, help="TCO horizon in years"),
    usd_per_kwh: float = typer.Option(0.10, "--usd-per-kwh", help="energy price for the TCO"),
    pue: float = typer.Option(1.3, help="data-center PUE for the TCO"),
    validate_: bool = typer.Option(False, "--validate", help="check the model against published measurements; "
                                   "exit 1 if any check fails"),
    accelerators_fed: bool = typer.Option(False, "--accelerators-fed", help="how many accelerators one storage "
                                          "system keeps at AU >= 90%, preprocessing and offload included"),
    scale: bool = typer.Option(False, "--scale", help="storage boxes of each design needed to feed --gpus "
                               "accelerators, their cost and power, and what binds"),
    sensitivity: bool = typer.Option(False, "--sensitivity", help="tornado: the verdict as mfu, the per-core "
                                     "preprocessing rate, the JPEG decoder and prices vary"),
    accelerator: Optional[str] = typer.Option(None, help="with --accelerators-fed: a catalog accelerator or an MLPerf "
                                              "emulated one (default h100)"),
    catalog: list[Path] = typer.Option([], "--catalog", help="extra catalog YAML files (override by name)"),
    workloads: list[Path] = typer.Option([], "--workloads", help="extra workload YAML files"),
    json_path: Optional[Path] = typer.Option(None, "--json"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG: bars and Pareto fronts (or the tornado with "
                                        "--sensitivity)"),
) -> None:
    """Size storage for a workload: each architecture's throughput, bottleneck, power, cost, TCO; a verdict."""
    from nearstore.cli.design import Request, run_design, run_fed, run_scale, run_sensitivity, run_validate
    from nearstore.design import ComputeTier, Economics, load_catalog, parse_nics

    modes = [m for m, on in (("--validate", validate_), ("--accelerators-fed", accelerators_fed), ("--scale", scale),
                             ("--sensitivity", sensitivity)) if on]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} are separate questions: pass one of them")
    if accelerator is not None and not accelerators_fed:
        raise ConfigError("--accelerator only makes sense with --accelerators-fed (the compute tier's GPU is --gpu)")
    if plot is not None and (validate_ or accelerators_fed or scale):
        raise ConfigError("--plot draws the design table or, with --sensitivity, the tornado; not with "
                          f"{modes[0]}")
    if boxes is not None and scale:
        raise ConfigError("--scale finds the number of boxes itself: drop --boxes")
    out = Console()
    if validate_:
        ok, res = run_validate(load_catalog(*catalog), out)
        write_json(json_path, res)
        if not ok:
            raise typer.Exit(1)
        return
    template: dict = {}
    if nics is not None:
        template["nics"] = parse_nics(nics)
    if drive is not None:
        template["drive"] = drive
    if drives is not None:
        template["drives"] = drives
    if boxes is not None:
        template["boxes"] = boxes
    tier = ComputeTier(gpus=gpus, gpu=gpu, server=server, gpu_decode=not no_gpu_decode,
                       nics=parse_nics(compute_nics) if compute_nics else None)
    req = Request(workload=workload, arch=arch, tier=tier, template=template,
                  econ=Economics(years=years, usd_per_kwh=usd_per_kwh, pue=pue), workload_files=tuple(workloads),
                  core_ms=core_ms, dataset_samples=dataset_samples)
    if accelerators_fed:
        res = run_fed(load_catalog(*catalog), req, accelerator or "h100", out)
    elif scale:
        res = run_scale(load_catalog(*catalog), req, out)
    elif sensitivity:
        res = run_sensitivity(load_catalog(*catalog), req, out, plot)
    else:
        res = run_design(catalogs=catalog, req=req, plot=plot, console=out)
    write_json(json_path, res)


@app.command("infer")
def infer_cmd(
    cluster: Path = typer.Option(..., "--cluster", help="store directory of a running cluster (`nearstore up`)"),
    out: str = typer.Option(..., "--out", help="name of the derived dataset to write"),
    model: str = typer.Option("resnet50", "--model", help="architecture: resnet18, resnet50, mobilenet_v2"),
    cut: str = typer.Option("pooled", help="where the network stops: stem, layer1-4, pooled"),
    dtype: str = typer.Option("fp16", help="output dtype: fp32, fp16, int8"),
    engine: str = typer.Option("pytorch", help="pytorch, onnxruntime, onnxruntime-int8 or auto"),
    weights: Optional[Path] = typer.Option(None, help="weights file (state dict or ONNX); default seeded init"),
    seed: int = typer.Option(0, help="seed of the random weights when no file is given"),
    size: int = typer.Option(224, help="crop size the network sees"),
    batch_size: int = typer.Option(32, help="samples per batch on a node's worker"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing derived dataset (atomically)"),
    json_path: Optional[Path] = typer.Option(None, "--json"),
) -> None:
    """Run a network over every sample on the nodes that hold it; store the outputs there as a derived dataset."""
    from nearstore.cli.jobs import run_infer

    dtypes = {"fp32": "float32", "fp16": "float16", "int8": "int8", "float32": "float32", "float16": "float16"}
    if dtype not in dtypes:
        raise ConfigError(f"--dtype must be one of fp32, fp16, int8 (got {dtype!r})")
    res = run_infer(cluster, console, out=out, arch=model, cut=cut, dtype=dtypes[dtype], engine=engine,
                    weights=_opt_str(weights), seed=seed, size=size, batch_size=batch_size, overwrite=overwrite)
    write_json(json_path, res)


@app.command()
def query(
    cluster: Path = typer.Option(..., "--cluster", help="store directory of a running cluster"),
    name: str = typer.Argument(..., help="derived dataset to query"),
    where: Optional[str] = typer.Option(None, "--where", help="filter, e.g. \"class in {3, 7} and score > 0.9\" "
                                        "(grammar: docs/jobs.md)"),
    near: Optional[int] = typer.Option(None, "--near", help="top k nearest this sample's stored embedding"),
    vector: Optional[Path] = typer.Option(None, "--vector", help="top k nearest this .npy vector"),
    k: int = typer.Option(10, "--k", help="how many neighbours"),
    metric: str = typer.Option("cosine", help="cosine, dot or l2"),
    with_data: bool = typer.Option(False, "--with-data", help="filter rows also carry the samples' stored bytes"),
    json_path: Optional[Path] = typer.Option(None, "--json"),
) -> None:
    """Query a derived dataset on the nodes: a filter, or the exact top k nearest neighbours."""
    from nearstore.cli.jobs import run_query

    res = run_query(cluster, name, console, where=where, near=near, vector=vector, k=k, metric=metric,
                    with_data=with_data)
    write_json(json_path, res)


@app.command("design-embed")
def design_embed(
    images: float = typer.Option(1e9, "--images", help="how many images to embed (e.g. 1e9)"),
    workload: str = typer.Option("resnet50-infer", help="a workload ending in a network stage"),
    embedding_bytes: float = typer.Option(4096, help="bytes of one embedding (2048 fp16 values: 4096)"),
    json_path: Optional[Path] = typer.Option(None, "--json"),
) -> None:
    """The inference question: each architecture embedding N images with the network storage-side or host-side."""
    from nearstore.design import load_catalog, load_workloads
    from nearstore.design.inference import embed_question

    wls = load_workloads()
    if workload not in wls:
        raise ConfigError(f"unknown workload {workload!r}; workloads: {', '.join(wls)}")
    rows = embed_question(load_catalog(), wls[workload], int(images), embedding_bytes=embedding_bytes)
    t = Table(title=f"embed {int(images):,} images ({workload}): the network next to the data vs on the host")
    for col in ("design", "network on", "images/s", "time", "kWh per 10^6 images", "link bytes/image",
                "link total", "bound by"):
        t.add_column(col, justify="left" if col in ("design", "network on", "bound by") else "right")
    for r in rows:
        ok = r.feasible
        t.add_row(r.arch, r.where, f"{r.images_per_s:,.0f}" if ok else "[red]cannot",
                  f"{r.seconds / 3600:,.1f} h" if ok else "-", f"{r.kwh_per_million:.3f}" if ok else "-",
                  f"{r.link_bytes_per_image:,.0f}" if ok else "-", f"{r.link_bytes_total / 1e12:,.1f} TB" if ok else "-",
                  (r.bottleneck or "-") if ok else "; ".join(r.reasons)[:60])
    Console().print(t)
    write_json(json_path, {"images": int(images), "workload": workload, "rows": [r.as_dict() for r in rows]})


def main() -> None:
    try:
        app()
    except NearstoreError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
