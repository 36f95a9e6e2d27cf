"""Emulated-accelerator training (DLIO / MLPerf Storage style) and the node-split sweep.

Each batch "computes" for a fixed step time (a sleep on the consumer thread,
which is what an accelerator-bound training loop looks like to the input
pipeline). Reported: samples/s, accelerator utilization AU = compute time /
wall time (first step excluded), stall time, bytes per sample on the link,
link utilization against the cap, and per-stage seconds on nodes and host.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from nearstore.core.errors import ConfigError
from nearstore.loader.loader import Loader
from nearstore.nets import describe
from nearstore.node.client import node_client
from nearstore.node.cluster import ClusterSpec, LocalCluster
from nearstore.ops.network import network_ops
from nearstore.ops.pipeline import Pipeline
from nearstore.store.manifest import Manifest
from nearstore.train import HeadTrainer

__all__ = ["emulated_training", "head_training", "split_sweep", "step_time_for"]

def step_time_for(accel: str, model: str, batch_size: int) -> float:
    """Emulated compute seconds for one batch of ``batch_size`` on ``accel`` (linear in batch size).

    The figures are the catalog's MLPerf Storage emulated accelerators
    (``emulated_accelerator`` entries named ``<accel>-mlperf``), so the runtime
    benchmark and the designer use the same numbers.
    """
    from nearstore.design.catalog import load_catalog

    # "<accel>-mlperf[-<model>]" entries, each for one workload "<model>-train"
    table = {(name.split("-mlperf")[0], em.workload.split("-")[0]): em
             for name, em in load_catalog().emulated_accelerator.items()}
    accels = sorted({a for a, _ in table})
    if accel.lower() not in accels:
        raise ConfigError(f"unknown accelerator {accel!r}; known: {', '.join(accels)}")
    em = table.get((accel.lower(), model.lower()))
    if em is None:
        models = sorted(m for a, m in table if a == accel.lower())
        raise ConfigError(f"no emulation figure for model {model!r} on {accel}; known: {', '.join(models)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    return em.step_s * batch_size / em.batch


def _node_stats(spec: ClusterSpec) -> list[dict]:
    out = []
    for ep in spec.nodes:
        c = node_client(spec, ep.node)
        out.append(c.stats())
        c.close()
    return out


def emulated_training(spec: ClusterSpec, *, pipeline: Pipeline, split: int | str, step_time: float,
                      samples: int, batch_size: int = 64, workers: int = 2, seed: int = 0,
                      warmup_batches: int = 1, step: Callable[[Any], None] | None = None) -> dict:
    """Run ``samples`` samples through Loader(cluster=spec) with a fixed compute time per batch.

    With ``step`` (a real training step, e.g. ``train.HeadTrainer``), each batch
    runs it instead of sleeping, and its measured time is the compute time
    (``step_time`` is then ignored). The first ``warmup_batches`` are not timed
    (start-up, and batches prefetched before the timed window would otherwise
    inflate a short run's rate).
    """

    def run_step(batch: Any) -> float:
        if step is None:
            if step_time:
                time.sleep(step_time)
            return step_time
        t0 = time.perf_counter()
        step(batch)
        return time.perf_counter() - t0

    before = _node_stats(spec)
    with Loader(cluster=spec, pipeline=pipeline, split=split, batch_size=batch_size, workers=workers,
                seed=seed) as loader:
        source = loader.source
        seen = steps = 0
        compute = stall = 0.0
        t_first = t_prev = None
        wire0 = 0
        node0: dict[int, int] = {}
        warm = 0
        for batch in loader.epochs(None):
            now = time.perf_counter()
            if warm < warmup_batches - 1:
                warm += 1
                run_step(batch)
                continue
            if t_first is None:
                t_first = now  # the warm-up steps' waits (start-up, prefetch) are excluded
                cpu0, host0 = _node_stats(spec), time.process_time()
                wire0 = source.wire_bytes
                node0 = dict(source.wire_by_node)
                first_step = run_step(batch)
            else:
                stall += now - t_prev
                seen += len(batch)
                steps += 1
                compute += run_step(batch)
            t_prev = time.perf_counter()
            if seen >= samples:
                break
        wall = t_prev - t_first - first_step  # the window opens with the first timed step, whose samples are not counted
        # cores each side kept busy over the window (CPU time: an emulated slowdown's idling does not count)
        span = max(t_prev - t_first, 1e-9)
        host_busy = (time.process_time() - host0) / span
        node_busy = [(a["cpu_seconds"] - b["cpu_seconds"]) / span for a, b in zip(_node_stats(spec), cpu0)]
        wire = source.wire_bytes - wire0
        received = (source.wire_bytes, source.samples_received)
        node_wire = [source.wire_by_node[ep.node] - node0[ep.node] for ep in spec.nodes]
        host_ops = dict(loader.stats.op_seconds)
        prefix = source.prefix
    after = _node_stats(spec)
    node_ops: dict[str, float] = {}
    for b, a in zip(before, after):
        for k, v in a["op_seconds"].items():
            node_ops[k] = node_ops.get(k, 0.0) + v - b["op_seconds"].get(k, 0.0)
        node_ops["read"] = node_ops.get("read", 0.0) + a["read_seconds"] - b["read_seconds"]
    cap = spec.link_mbps * 1e6 if spec.link_mbps else None  # per node: each node has its own link
    bytes_per_s = wire / wall if wall else 0.0
    per_node = [w / wall / cap for w in node_wire] if cap and wall else None
    return {
        "split": split,
        "prefix_ops": prefix,
        "step_time": step_time if step is None else (compute / steps if steps else 0.0),
        "step": "emulated" if step is None else "real",
        "samples": seen,
        "samples_per_s": seen / wall if wall else 0.0,
        "au": compute / wall if wall else 0.0,
        "stall_seconds": stall,
        "wall_seconds": wall,
        "wire_bytes": wire,
        # over everything received (prefetch may fetch a short run's samples before the timed window)
        "bytes_per_sample": received[0] / received[1] if received[1] else 0.0,
        "link_bytes_per_s": bytes_per_s,
        "link_cap_bytes_per_s_per_node": cap,
        # the busiest node's link is the one that can bottleneck
        "link_utilization": max(per_node) if per_node else None,
        "link_utilization_per_node": per_node,
        "node_stage_seconds": node_ops,
        "host_stage_seconds": host_ops,
        "node_cpu_busy": node_busy,
        "host_cpu_busy": host_busy,
    }


def split_sweep(store: str | Path, *, pipeline: Pipeline, caps: list[float | None], splits: list[int | str],
                samples: int, step_time: float = 0.0, workers_per_node: int = 1, batch_size: int = 64,
                progress: Callable[[str], None] | None = None) -> list[dict]:
    """Every (cap, split) on a fresh local cluster per cap; returns one row per run."""
    rows = []
    for cap in caps:
        with LocalCluster(store, link_mbps=cap, workers_per_node=workers_per_node) as cluster:
            for split in splits:
                if progress:
                    progress(f"cap {cap} MB/s, split {split}")
                r = emulated_training(cluster.spec, pipeline=pipeline, split=split, step_time=step_time,
                                      samples=samples, batch_size=batch_size)
                r["cap_mb_per_s"] = cap
                rows.append(r)
    return rows


def head_training(spec: ClusterSpec, *, net: str = "resnet18", cut: str = "pooled", dtype: str = "float16",
                  engine: str = "auto", size: int = 224, hidden: int = 0, lr: float = 1e-2,
                  split: int | str = "node", samples: int = 512, batch_size: int = 64, workers: int = 2,
                  seed: int = 0) -> dict:
    """Transfer learning as the accelerator's work: decode + crop + flip + a frozen ``net`` up to ``cut``
    (on the nodes for split 'node'; with int8 features the host-side ``dequantize`` stays on the host), then a
    real head-training step on the host per batch.

    Reports ``emulated_training``'s figures (samples/s, AU = step time / wall, bytes per sample, node and
    host stage seconds) and the loss at the start and end, after an untimed warm-up pass.
    """
    classes = max(2, len(_manifest(spec).classes))
    pipe = Pipeline(["decode_jpeg", {"op": "random_resized_crop", "size": size}, "flip", "to_uint8_chw",
                     *network_ops(net, cut, dtype=dtype, engine=engine, hw=(size, size))])
    if split == "node" and dtype == "int8":
        split = len(pipe.ops) - 1  # int8 rows cross the link; the host dequantizes them
    features = describe(net, cut, (size, size)).shape[0]
    # a short untimed pass first: each process that runs the network builds it and picks its engine (seconds,
    # once), which would otherwise count as stage time
    emulated_training(spec, pipeline=pipe, split=split, step_time=0.0, samples=min(samples, 2 * batch_size),
                      batch_size=batch_size, workers=workers, seed=seed + 1)
    trainer = HeadTrainer(features, classes, hidden=hidden, lr=lr, seed=seed)
    res = emulated_training(spec, pipeline=pipe, split=split, step_time=0.0, samples=samples,
                            batch_size=batch_size, workers=workers, seed=seed, step=trainer)
    first, last = trainer.loss_fell(min(3, len(trainer.losses) // 2)) if len(trainer.losses) >= 2 else (None, None)
    res.update({"net": net, "cut": cut, "dtype": dtype, "engine": engine, "size": size, "classes": classes,
                "head": {"hidden": hidden, "lr": lr}, "losses": trainer.losses, "loss_first": first,
                "loss_last": last})
    return res


def _manifest(spec: ClusterSpec) -> Manifest:
    c = node_client(spec, spec.nodes[0].node)
    try:
        return c.manifest()
    finally:
        c.close()
