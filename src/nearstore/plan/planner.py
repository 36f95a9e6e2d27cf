"""Measure a cluster, predict every split with the one model, choose.

Resources (``nearstore.model.Resource``), per split k (ops[:k] on the nodes):

- ``node<i>``: node i runs ``workers`` op threads (W thread-seconds/s); demand:
  its share of the samples x (read + node stages + per-byte send cost), from
  its own profile (nodes hold different shards, so shares and sizes differ).
- ``host_threads``: the loader's ``workers`` op threads; demand: host stages
  + the per-byte receive cost (crc check, batch assembly, gRPC).
- ``cpu``: when nodes and loader share a machine (loopback endpoints), its
  effective cores, measured (for a split that is CPU-bound: the cores its own
  calibration runs kept busy); demand: everything above, measured per split.

``choose`` takes the fastest split; predictions within the calibration runs'
own spread of it are a tie, won by the fewest bytes on the link, then the most
stages on the nodes.
- ``link<i>``: node i's link at the cap (when capped); demand: its share of
  the samples x bytes per sample on the wire at this split.
- ``accelerator``: batch / step time samples/s; demand: 1 per sample.

Per-stage seconds come from the nodes' ``profile`` action and from running
the same stages on the host; bytes from the pipeline's declared specs.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from nearstore.core.checksum import crc32c
from nearstore.core.errors import ConfigError
from nearstore.model.core import Resource, Stage, evaluate
from nearstore.model.placement import Placement, Site, StageCost, place
from nearstore.node.client import ClusterSource, node_client
from nearstore.ops.image import worker_init
from nearstore.ops.base import Spec
from nearstore.ops.pipeline import Pipeline, input_spec_of

__all__ = ["Measurements", "SplitPrediction", "Plan", "measure", "predict", "plan", "ROW_OVERHEAD_BYTES"]

#: Arrow framing per row besides the data (sample, key, label, shape, crc, offsets), measured on our batches
ROW_OVERHEAD_BYTES = 96


@dataclass
class Measurements:
    """What the planner knows about a cluster, all measured (or given: link cap, step time)."""

    nodes: int
    node_workers: int
    host_workers: int
    colocated: bool
    cores: float  # effective parallel cores of the machine the loader runs on
    link_bytes_per_s: float | None  # per node; None: not a constraint
    raw_bytes: float  # stored bytes per sample
    stage_names: list[str]
    stage_stops: list[int]  # op index after each stage
    node_share: list[float]  # fraction of the samples each node serves (its primary shards)
    node_raw_bytes: list[float]  # mean stored bytes of each node's samples
    node_read_s: list[float]  # seconds per sample to read and verify, per node
    node_stage_s: list[list[float]]  # per node, per stage
    node_slowdown: list[float]  # emulated weaker CPUs: that factor of the node's op time is idle, not CPU
    host_stage_s: list[float]
    out_bytes: list[float]  # bytes per sample after each stage
    send_s_per_byte: float
    recv_s_per_byte: float
    # when nodes share the loader's machine: CPU seconds per sample at each split, measured by running the
    # loader there for a moment (every process's CPU time: stages, gRPC, Arrow, Python, copies)
    cpu_measured: dict[int, float] = field(default_factory=dict)
    # cores kept busy during that run, per split: where the split is CPU-bound this is the CPU it can use
    # (below the machine's cores when, say, a node's single worker idles between requests)
    busy_cores: dict[int, float] = field(default_factory=dict)
    # how far apart repeated calibration runs of the same split landed (median relative difference of their
    # throughputs): predictions closer than this cannot be told apart
    noise: float = 0.0
    # seconds a training-loop thread that sleeps (the accelerator step) waits to run again, per split:
    # the loader's Python threads hold the GIL; the step effectively lasts step_time + this
    wake_s: dict[int, float] = field(default_factory=dict)
    step_time: float | None = None
    batch_size: int = 64
    samples_per_epoch: int = 0  # a short last batch per epoch lowers the mean batch the accelerator gets
    stage_macs: list[float] = field(default_factory=list)  # declared multiply-accumulates per sample, per stage

    @property
    def mean_batch(self) -> float:
        if not self.samples_per_epoch:
            return float(self.batch_size)
        return self.samples_per_epoch / math.ceil(self.samples_per_epoch / self.batch_size)

    def wire_bytes(self, k: int, node: int | None = None) -> float:
        if k == 0:
            return (self.raw_bytes if node is None else self.node_raw_bytes[node]) + ROW_OVERHEAD_BYTES
        return self.out_bytes[self.stage_stops.index(k)] + ROW_OVERHEAD_BYTES


@dataclass
class SplitPrediction:
    split: int
    node_stages: list[str]
    samples_per_s: float
    bottleneck: str
    bytes_per_sample: float
    utilization: dict[str, float]
    node_macs_per_sample: float = 0.0  # multiply-accumulates each sample gets on the nodes (declared by the ops)


@dataclass
class Plan:
    choice: int
    reason: str
    predictions: list[SplitPrediction]
    measurements: Measurements = field(repr=False)

    def as_dict(self) -> dict:
        return {"choice": self.choice, "reason": self.reason, "predictions": [asdict(p) for p in self.predictions],
                "measurements": asdict(self.measurements)}


def _costs(names: list[str], seconds: list[float], out_bytes: list[float], macs: list[float]) -> list[StageCost]:
    return [StageCost(name=n, core_s=s, out_bytes=b, macs=c) for n, s, b, c in zip(names, seconds, out_bytes, macs)]


def sites(m: Measurements) -> tuple[list[Site], Site]:
    """The nodes (storage side, each with its share of the samples and its own measured costs) and the host."""
    macs = m.stage_macs or [0.0] * len(m.stage_names)
    nodes = [Site(cpu=f"node{n}", share=m.node_share[n], costs=_costs(m.stage_names, m.node_stage_s[n], m.out_bytes,
                                                                      macs),
                  input_bytes=m.node_raw_bytes[n], fixed_s=m.node_read_s[n], byte_s=m.send_s_per_byte,
                  link={f"link{n}": 1.0} if m.link_bytes_per_s else {},
                  also={"cpu": 1.0 / m.node_slowdown[n]} if m.colocated else {})
             for n in range(m.nodes)]
    host = Site(cpu="host_threads", costs=_costs(m.stage_names, m.host_stage_s, m.out_bytes, macs),
                byte_s=m.recv_s_per_byte, also={"cpu": 1.0} if m.colocated else {})
    return nodes, host


def predict(m: Measurements) -> list[SplitPrediction]:
    """Evaluate every valid split with the model (the placement of stages[:i] on the nodes: ``model.place``)."""
    res = [Resource(name=f"node{i}", rate=m.node_workers, unit="thread-s") for i in range(m.nodes)]
    res.append(Resource(name="host_threads", rate=m.host_workers, unit="thread-s"))
    if m.colocated:
        res.append(Resource(name="cpu", rate=m.cores, unit="core-s"))
    if m.link_bytes_per_s:
        res += [Resource(name=f"link{i}", rate=m.link_bytes_per_s) for i in range(m.nodes)]
    nodes, host = sites(m)
    macs = m.stage_macs or [0.0] * len(m.stage_names)
    out = []
    for i, k in enumerate([0, *m.stage_stops]):
        placed = place(Placement(i), _costs(m.stage_names, m.host_stage_s, m.out_bytes, macs), storage=nodes,
                       compute=host, input_bytes=m.raw_bytes, frame_bytes=ROW_OVERHEAD_BYTES)
        demands: dict[str, float] = {}
        for st in placed:
            for r, d in st.demands.items():
                demands[r] = demands.get(r, 0.0) + d
        wire = sum(m.node_share[n] * m.wire_bytes(k, n) for n in range(m.nodes))
        if m.colocated and k in m.cpu_measured:
            demands["cpu"] = m.cpu_measured[k]
        step_res = []
        if m.step_time:
            step = m.step_time + m.wake_s.get(k, 0.0)
            step_res = [Resource(name="accelerator", rate=m.mean_batch / step, unit="sample")]
            demands["accelerator"] = 1.0
        ev = evaluate(res + step_res, [Stage(name=f"split {k}", demands=demands)])
        if ev.bottleneck == "cpu" and m.busy_cores.get(k, 0.0) > 0:  # CPU-bound: the cores this split used
            cpu_res = Resource(name="cpu", rate=m.busy_cores[k], unit="core-s")
            ev = evaluate([cpu_res if r.name == "cpu" else r for r in res] + step_res,
                          [Stage(name=f"split {k}", demands=demands)])
        out.append(SplitPrediction(split=k, node_stages=m.stage_names[:i],
                                   samples_per_s=ev.samples_per_s, bottleneck=ev.bottleneck or "-",
                                   bytes_per_sample=wire, node_macs_per_sample=sum(macs[:i]),
                                   utilization={n: round(u, 3) for n, u in ev.utilization.items()}))
    return out


MIN_TIE, MAX_TIE = 0.03, 0.10


def choose(preds: list[SplitPrediction], *, noise: float = 0.0) -> tuple[int, str]:
    """The fastest split; among those it cannot tell from the fastest, the fewest bytes on the link, then
    the most stages on the nodes.

    Predictions within ``noise`` (the measurements' own spread, 3-10%) of the
    fastest are a tie: then the split that leaves the link more headroom wins,
    and among equal bytes the one that offloads more (the host's CPU is the
    training job's).
    """
    tie = min(MAX_TIE, max(MIN_TIE, noise))
    best = max(p.samples_per_s for p in preds)
    near = [p for p in preds if p.samples_per_s >= (1 - tie) * best]
    pick = min(near, key=lambda p: (round(p.bytes_per_sample), -len(p.node_stages), -p.samples_per_s))
    where = "+".join(pick.node_stages) if pick.node_stages else "nothing"
    others = ", ".join(f"split {p.split}: {p.samples_per_s:,.0f}/s ({p.bottleneck})" for p in preds if p is not pick)
    tied = [p for p in near if p is not pick]
    why = ""
    if tied:
        fewer = all(round(pick.bytes_per_sample) < round(p.bytes_per_sample) for p in tied)
        because = "it moves the fewest bytes" if fewer else "it moves the fewest bytes and, of those, runs the most on the nodes"
        why = (f"; tied within {tie:.0%} (the measurements' spread) with split(s) "
               f"{', '.join(str(p.split) for p in tied)}: {because}")
    reason = (f"split {pick.split} (nodes run {where}): {pick.samples_per_s:,.0f} samples/s predicted, "
              f"bound by {pick.bottleneck}, {pick.bytes_per_sample:,.0f} B/sample on the link{why}; vs {others}")
    return pick.split, reason


# -- measuring -----------------------------------------------------------------------------------------


def _per_byte_seconds() -> tuple[float, float]:
    """(send, receive) CPU seconds per byte: a crc32c and a copy on each side, plus gRPC's copy."""
    buf = np.random.default_rng(0).integers(0, 255, 16 << 20, dtype=np.uint8)
    dst = np.empty_like(buf)
    t0 = time.perf_counter()
    for _ in range(3):
        crc32c(buf)
    crc = (time.perf_counter() - t0) / (3 * buf.nbytes)
    t0 = time.perf_counter()
    for _ in range(3):
        np.copyto(dst, buf)
    copy = (time.perf_counter() - t0) / (3 * buf.nbytes)
    return crc + 2 * copy, crc + 2 * copy


def _burn(reps: int) -> float:
    """A CPU-bound kernel (zlib on incompressible-ish bytes); returns its own wall time."""
    data = np.random.default_rng(1).integers(0, 64, 1 << 20, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    for _ in range(reps):
        zlib.compress(data, 6)
    return time.perf_counter() - t0


def effective_cores(*, processes: int | None = None, reps: int = 8) -> float:
    """How many cores ``processes`` concurrent processes really get, measured (a VM's vCPUs may share)."""
    processes = processes or os.cpu_count() or 1
    alone = min(_burn(reps) for _ in range(2))
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes) as pool:
        t0 = time.perf_counter()
        pool.map(_burn, [reps] * processes)
        together = time.perf_counter() - t0
    return max(1.0, min(float(processes), processes * alone / together))


def _host_stage_seconds(pipeline: Pipeline, raw: list, rounds: int = 3) -> list[float]:
    """Seconds per sample of each stage on this host (median of ``rounds`` passes over ``raw``)."""
    stages = pipeline.stages
    per_round = []
    for _ in range(rounds):
        acc = [0.0] * len(stages)
        for f in raw:
            x = f.data
            for i, st in enumerate(stages):
                t0 = time.perf_counter()
                x = pipeline.run(x, key=f.key, seed=0, epoch=0, start=st.start, stop=st.stop)
                acc[i] += time.perf_counter() - t0
        per_round.append([a / len(raw) for a in acc])
    return [float(np.median([r[i] for r in per_round])) for i in range(len(stages))]


def _cpu_per_sample(spec, pipeline: Pipeline, m: Measurements, k: int, loader: Callable[..., Any],  # noqa: ANN001
                    min_seconds: float = 1.0) -> tuple[float, float, float]:
    """Run the loader at split k for a moment (64-512 samples and at least ``min_seconds``): (CPU s per
    sample over every process, cores busy, wake-up lag).

    CPU time is read from this process (``process_time``) and from each node
    (its ``stats`` action), so emulated slowdowns (sleep) and link waits do
    not count; the loader's start-up is not counted either.
    """
    n = int(min(512, max(64, 48e6 / m.wire_bytes(k))))
    lags: list[float] = []
    stop = threading.Event()

    def probe() -> None:  # how late a sleeping thread wakes up while the loader works (GIL)
        while not stop.is_set():
            t0 = time.perf_counter()
            time.sleep(0.02)
            lags.append(time.perf_counter() - t0 - 0.02)

    prober = threading.Thread(target=probe, name="nearstore-plan-probe", daemon=True)
    clients = [node_client(spec, ep.node) for ep in spec.nodes]
    try:
        # the loader that will run: its batch size and prefetch (per-batch work is amortized over the batch)
        with loader(cluster=spec, pipeline=pipeline, split=k, batch_size=m.batch_size,
                    workers=m.host_workers, seed=12345) as ld:
            seen = built0 = 0
            before: list[dict] = []
            h0 = w0 = 0.0
            for i, b in enumerate(ld.epochs(None)):
                if i == 1:
                    prober.start()
                    before = [c.stats() for c in clients]
                    h0, built0 = time.process_time(), ld.stats.samples
                    w0 = time.perf_counter()
                elif i > 1:
                    seen += len(b)
                    if seen >= n and time.perf_counter() - w0 >= min_seconds:
                        break
            stop.set()
            ld.close()  # let batches in flight finish, so the CPU counted matches the samples counted
            wall = time.perf_counter() - w0
            host_cpu = time.process_time() - h0
            after = _settled_stats(clients)
            node_cpu = sum(a["cpu_seconds"] - b["cpu_seconds"] for a, b in zip(after, before))
            # per sample the nodes ran, sent or not: a capped link makes nodes read ahead, and what was
            # still queued when the loader stopped was computed (and costed) but never received
            processed = max(sum(a["processed"] - b["processed"] for a, b in zip(after, before)), 1)
            built = max(ld.stats.samples - built0, 1)
    finally:
        stop.set()
        if prober.is_alive():
            prober.join()
        for c in clients:
            c.close()
    return node_cpu / processed + host_cpu / built, (node_cpu + host_cpu) / wall, float(np.mean(lags or [0.0]))


def _settled_stats(clients: list, timeout: float = 2.0) -> list[dict]:
    """Node stats once their workers are idle (work still running when a stream was cancelled is counted)."""
    last = [c.stats() for c in clients]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = [c.stats() for c in clients]
        if [s["processed"] for s in now] == [s["processed"] for s in last]:
            return now
        last = now
    return last


def _calibrate(spec, pipeline: Pipeline, m: Measurements, loader: Callable[..., Any],  # noqa: ANN001
               passes: int = 2) -> None:
    """CPU seconds per sample at every split, measured (nodes share this machine's cores with the loader).

    Every split runs once per pass, in forward then reverse order, and the
    passes are averaged: a machine whose speed drifts while the planner
    measures does not favour the splits measured first.

    The runs also show how many cores the loader and nodes keep busy at once:
    runs that saturated the machine (busy cores >= 85% of the profile-based
    estimate) measure the effective cores better; their median is used. Each
    split's own busy cores are kept too: a split the model finds CPU-bound is
    predicted with the cores it kept busy (``predict``).
    """
    splits = [0, *m.stage_stops]
    runs: dict[int, list[tuple[float, float, float]]] = {k: [] for k in splits}
    for i in range(passes):
        for k in splits if i % 2 == 0 else splits[::-1]:
            runs[k].append(_cpu_per_sample(spec, pipeline, m, k, loader))
    for k, rs in runs.items():
        m.cpu_measured[k], m.busy_cores[k], m.wake_s[k] = (float(np.mean(v)) for v in zip(*rs))
    if passes > 1:  # throughput of each run = busy cores / CPU seconds per sample
        rates = [[b / max(c, 1e-9) for c, b, _ in rs] for rs in runs.values()]
        spread = [float(np.ptp(r) / max(np.mean(r), 1e-9)) for r in rates]
        m.noise = float(np.median(spread))
    saturated = [b for b in m.busy_cores.values() if b >= 0.85 * m.cores]
    if saturated:
        m.cores = float(np.median(saturated))


def _average_profiles(runs: list[dict]) -> dict:
    out = dict(runs[0])
    out["read_seconds"] = float(np.median([r["read_seconds"] for r in runs]))
    out["stages"] = [dict(st, seconds=float(np.median([r["stages"][i]["seconds"] for r in runs])))
                     for i, st in enumerate(runs[0]["stages"])]
    return out


def _profile_nodes(clients: list, ops: list, samples: int, slowdown: list[float],
                   rounds: int = 3) -> tuple[list[dict], float | None]:
    """Per-node profiles (median of ``rounds`` runs alone) and, with 2+ nodes, the machine's effective cores.

    Effective cores come from the real kernels: every node profiles alone,
    then all at once; cores = sum of the alone times / the time together.
    Emulated slowdowns are idle time, so the nodes' CPU share is used.
    """
    alone: list[list[dict]] = [[] for _ in clients]
    together: list[float] = []
    walls: list[list[float]] = [[] for _ in clients]
    with ThreadPoolExecutor(len(clients)) as pool:
        for _ in range(rounds):
            for i, c in enumerate(clients):
                t0 = time.perf_counter()
                alone[i].append(c.profile(ops, n=samples))
                walls[i].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            list(pool.map(lambda c: c.profile(ops, n=samples), clients))
            together.append(time.perf_counter() - t0)
    profiles = [_average_profiles(runs) for runs in alone]
    if len(clients) < 2 or any(s != 1.0 for s in slowdown):
        return profiles, None
    work = sum(float(np.median(w)) for w in walls)
    return profiles, max(1.0, min(float(len(clients)), work / float(np.median(together))))


def _loopback(uri: str) -> bool:
    host = uri.split("://", 1)[-1].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost", "::1", "[::1]")


def declared(pipeline: Pipeline, spec: Spec) -> dict:
    """The measurements' fields that the pipeline's ops declare (stages, bytes and MACs per sample after each),
    for samples of ``spec``: the same declarations the designer reads (``design.pipelines.workload_of``)."""
    stages = pipeline.declare_stages(spec)
    return {"raw_bytes": float(spec.bytes), "stage_names": [st.name for st in pipeline.stages],
            "stage_stops": [st.stop for st in pipeline.stages], "out_bytes": [float(d.bytes) for d in stages],
            "stage_macs": [float(d.macs) for d in stages]}


def measure(cluster, pipeline: Pipeline, *, host_workers: int = 2, step_time: float | None = None,  # noqa: ANN001
            batch_size: int = 64, samples: int = 32, loader: Callable[..., Any] | None = None) -> Measurements:
    """Profile the cluster's nodes, this host and this machine for ``pipeline``.

    ``loader`` is the loader class to calibrate with (``nearstore.Loader``),
    needed when the nodes share this machine: the planner then runs it at
    every split for a moment. It is passed in because the loader is the layer
    above the planner (its ``split="auto"`` calls ``plan``).
    """
    spec = getattr(cluster, "spec", cluster)
    src = ClusterSource(spec, pipeline, "host")
    try:
        ops = pipeline.to_json()
        src_nodes = list(src.clients)
        slowdown = [float(c.health().get("slowdown", 1.0)) for c in src.clients.values()]
        profiles, node_cores = _profile_nodes(list(src.clients.values()), ops, samples, slowdown)
        man = src.manifest
        ids = np.arange(min(samples, man.num_samples))
        raw = [f for f in src.fetch(ids, epoch=0, seed=0) if f.error is None]
    finally:
        src.close()
    if not raw:
        raise ConfigError("the planner could not fetch any sample to profile the host with")
    stages = pipeline.stages
    order = list(src_nodes)
    node_s = [[p["stages"][i]["seconds"] for i in range(len(stages))] for p in profiles]
    with ThreadPoolExecutor(1, initializer=worker_init) as pool:  # a thread set up as the loader's workers are
        host_s = pool.submit(_host_stage_seconds, pipeline, raw).result()
    figures = declared(pipeline, input_spec_of(man))
    figures["out_bytes"] = [b or float(profiles[0]["stages"][i]["out_bytes"])  # a size no op could declare
                            for i, b in enumerate(figures["out_bytes"])]
    samples_by, bytes_by = {n: 0 for n in order}, {n: 0 for n in order}
    for sh in man.shards:  # the loader asks a shard's first live replica
        n = next(x for x in sh.nodes if x in samples_by)
        samples_by[n] += sh.samples
        bytes_by[n] += sh.payload_bytes
    send, recv = _per_byte_seconds()
    m = Measurements(
        nodes=len(spec.nodes), node_workers=spec.workers_per_node, host_workers=host_workers,
        colocated=all(_loopback(ep.uri) for ep in spec.nodes),
        cores=node_cores if node_cores is not None else effective_cores(),
        link_bytes_per_s=spec.link_mbps * 1e6 if spec.link_mbps else None,
        **figures,
        node_share=[samples_by[n] / man.num_samples for n in order],
        node_raw_bytes=[bytes_by[n] / max(samples_by[n], 1) for n in order],
        node_read_s=[p["read_seconds"] for p in profiles], node_stage_s=node_s, node_slowdown=slowdown,
        host_stage_s=host_s,
        send_s_per_byte=send, recv_s_per_byte=recv, step_time=step_time, batch_size=batch_size,
        samples_per_epoch=man.num_samples,
    )
    if m.colocated:  # the machine's CPU is shared: calibrate what the stages leave out
        if loader is None:
            raise ConfigError("the nodes share this machine, so the planner calibrates by running the loader: "
                              "pass loader=nearstore.Loader")
        _calibrate(spec, pipeline, m, loader)
    return m


def plan(cluster, pipeline: Pipeline, *, host_workers: int = 2, step_time: float | None = None,  # noqa: ANN001
         batch_size: int = 64, samples: int = 32, loader: Callable[..., Any] | None = None) -> Plan:
    """Measure, predict every split, choose; ``Plan.reason`` says why in one line (``loader``: see ``measure``)."""
    m = measure(cluster, pipeline, host_workers=host_workers, step_time=step_time, batch_size=batch_size,
                samples=samples, loader=loader)
    preds = predict(m)
    k, reason = choose(preds, noise=m.noise)
    return Plan(choice=k, reason=reason, predictions=preds, measurements=m)
