"""Measure a cluster, predict every split with the one model, choose.

What is measured (``measure``), once per plan:

- per node, alone: seconds per sample of reading and of each stage, as the node
  runs them (the ``profile`` action; a batched stage such as a network runs on
  the whole profiled batch), and the bytes after each stage;
- on this host: seconds per sample of each stage, the same way;
- per byte: the CPU a byte costs to send and to receive, over the transport the
  nodes use (rows packed with their crc32c, an Arrow Flight stream on
  loopback, rows checked and copied into a batch);
- the CPU sets (affinity) of this process and of every node on this machine,
  and how many effective cores a CPU of them gives (a VM's vCPUs may share);
- at most ONE end-to-end run of the loader (``calibrate``), at the split the
  profiles predict best: the CPU it really used per sample, on the nodes and
  on the host, beyond what the profiles account for (gRPC, Arrow, Python per
  row). That residue becomes a per-sample overhead of each side at every
  split; the plan records the run, its split and why (``Plan.calibration``).

Resources (``nearstore.model.Resource``), per split k (stages[:k] on the nodes,
placed by ``model.place``):

- ``node<i>``: node i's ``workers`` op threads (thread-seconds/s); demand: its
  share of the samples x (read + its stages, slowed as it is + bytes sent).
- ``host_threads``: the loader's ``workers`` op threads; demand: the host
  stages + the bytes received.
- CPU sets: the nodes on this machine and the loader charge the CPU their
  work really takes (an emulated slowdown is idle time, not CPU) to the cores
  of their CPU set; sets that overlap are one resource (``cpu`` when the loader
  is in it). Nodes on CPU sets of their own (or on other hosts) do not take
  the loader's cores.
- ``link<i>``: node i's link at the cap; demand: its share x bytes per sample
  on the wire at this split (the declared output size of the last node stage,
  so a network's large early activations are priced before anything runs).
- ``accelerator``: mean batch / (step time + the wake-up lag the loader's
  threads cause), when a step time is given.

``choose`` takes the fastest split; over a capped link, predictions within
the measurements' spread of it are a tie, won by the fewest bytes on the link,
then the most stages on the nodes.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np
from pyarrow import flight

from nearstore.core.errors import ChecksumError, ConfigError
from nearstore.model.core import Resource, Stage, evaluate
from nearstore.model.placement import Placement, Site, StageCost, place
from nearstore.node.client import ClusterSource, node_client
from nearstore.node.protocol import decode_rows, encode_rows, response_schema
from nearstore.ops.base import Spec
from nearstore.ops.image import worker_init
from nearstore.ops.pipeline import Pipeline, input_spec_of

__all__ = ["Measurements", "SplitPrediction", "Plan", "measure", "predict", "plan", "choose", "cpu_sets", "fit",
           "ROW_OVERHEAD_BYTES"]

#: Arrow framing per row besides the data (sample, key, label, shape, crc, offsets), measured on our batches
ROW_OVERHEAD_BYTES = 96


@dataclass
class Measurements:
    """What the planner knows about a cluster, all measured (or given: link cap, step time)."""

    nodes: int
    node_workers: int
    host_workers: int
    link_bytes_per_s: float | None  # per node; None: not a constraint
    raw_bytes: float  # stored bytes per sample
    stage_names: list[str]
    stage_stops: list[int]  # op index after each stage
    node_share: list[float]  # fraction of the samples each node serves (its primary shards)
    node_raw_bytes: list[float]  # mean stored bytes of each node's samples
    node_read_s: list[float]  # seconds per sample to read and verify, per node
    node_stage_s: list[list[float]]  # per node, per stage: CPU seconds x its slowdown (how long its thread is busy)
    node_slowdown: list[float]  # emulated weaker CPUs: that factor of the node's op time is idle, not CPU
    host_stage_s: list[float]
    out_bytes: list[float]  # bytes per sample after each stage
    send_s_per_byte: float
    recv_s_per_byte: float
    # CPU sets: this process's and, per node, the node's when it runs on this machine (None: another host)
    host_cpus: list[int] = field(default_factory=lambda: [0])
    node_cpus: list[list[int] | None] = field(default_factory=list)
    core_efficiency: float = 1.0  # effective cores per CPU of a set, measured (below 1 where vCPUs share)
    # cores a CPU set really gave the loader and nodes, where the calibration run was bound by it (it replaces
    # that set's size x core_efficiency: the processes' own idle gaps and other work on the machine count)
    cpu_rates: dict[str, float] = field(default_factory=dict)
    # CPU seconds per sample the profiles do not see (gRPC, Arrow, Python per row), per side: from the
    # calibration run (0 without one)
    node_overhead_s: float = 0.0
    host_overhead_s: float = 0.0
    # where the run used less CPU than the profiles say (they ran alone, colder): each side's CPU, scaled
    node_cpu_scale: float = 1.0
    host_cpu_scale: float = 1.0
    # seconds a training-loop thread that sleeps (the accelerator step) waits to run again: the loader's Python
    # threads hold the GIL; the step effectively lasts step_time + this (from the calibration run)
    wake_s: float = 0.0
    calibration: dict = field(default_factory=lambda: {"runs": 0, "why": "none made"})
    noise: float = 0.0  # relative spread of the measurements: predictions closer than this are a tie
    step_time: float | None = None
    batch_size: int = 64
    samples_per_epoch: int = 0  # a short last batch per epoch lowers the mean batch the accelerator gets
    stage_macs: list[float] = field(default_factory=list)  # declared multiply-accumulates per sample, per stage
    seconds: dict[str, float] = field(default_factory=dict)  # where planning time went (profile, calibrate...)

    def __post_init__(self) -> None:
        if not self.node_cpus:  # not given: nodes on other hosts
            self.node_cpus = [None] * self.nodes
        if len(self.node_cpus) != self.nodes:
            raise ConfigError(f"node_cpus has {len(self.node_cpus)} entries for {self.nodes} nodes")

    @property
    def mean_batch(self) -> float:
        if not self.samples_per_epoch:
            return float(self.batch_size)
        return self.samples_per_epoch / math.ceil(self.samples_per_epoch / self.batch_size)

    def wire_bytes(self, k: int, node: int | None = None) -> float:
        if k == 0:
            return (self.raw_bytes if node is None else self.node_raw_bytes[node]) + ROW_OVERHEAD_BYTES
        return self.out_bytes[self.stage_stops.index(k)] + ROW_OVERHEAD_BYTES

    def index(self, k: int) -> int:
        """The number of stages split ``k`` runs on the nodes."""
        return 0 if k == 0 else self.stage_stops.index(k) + 1


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

    @property
    def calibration(self) -> dict:
        """The end-to-end loader runs the plan made (0 or 1), at which split and why."""
        return self.measurements.calibration

    def as_dict(self) -> dict:
        return {"choice": self.choice, "reason": self.reason, "predictions": [asdict(p) for p in self.predictions],
                "calibration": self.calibration, "measurements": asdict(self.measurements)}


def _costs(names: list[str], seconds: list[float], out_bytes: list[float], macs: list[float]) -> list[StageCost]:
    return [StageCost(name=n, core_s=s, out_bytes=b, macs=c) for n, s, b, c in zip(names, seconds, out_bytes, macs)]


def cpu_sets(m: Measurements) -> tuple[list[str | None], str, dict[str, float]]:
    """The CPU resource each node charges (None: a node on another host), the loader's, and each resource's
    effective cores. CPU sets that overlap are one resource: ``cpu`` when the loader's set is in it."""
    sets: list[set[int]] = [set(m.host_cpus)] + [set(c) if c is not None else set() for c in m.node_cpus]
    owner = list(range(len(sets)))

    def root(i: int) -> int:
        while owner[i] != i:
            i = owner[i]
        return i

    for i in range(len(sets)):
        for j in range(i):
            if sets[i] & sets[j]:
                owner[root(i)] = root(j)
    members: dict[int, set[int]] = {}
    for i, st in enumerate(sets):
        members.setdefault(root(i), set()).update(st)
    others = sorted(r for r, cpus in members.items() if r != root(0) and cpus)  # (a remote node has no set)
    name: dict[int, str | None] = {r: None for r in members}
    name.update({root(0): "cpu", **{r: ("node_cpus" if len(others) == 1 else f"node_cpus{j}")
                                    for j, r in enumerate(others)}})
    rates = {name[r]: len(cpus) * m.core_efficiency for r, cpus in members.items() if cpus and name[r]}
    rates.update({g: r for g, r in m.cpu_rates.items() if g in rates})
    nodes = [name[root(i + 1)] if m.node_cpus[i] is not None else None for i in range(m.nodes)]
    return nodes, "cpu", rates


def sites(m: Measurements) -> tuple[list[Site], Site]:
    """The nodes (storage side, each with its share of the samples and its own measured costs) and the host."""
    macs = m.stage_macs or [0.0] * len(m.stage_names)
    groups, host_group, _ = cpu_sets(m)
    nodes = [Site(cpu=f"node{n}", share=m.node_share[n], costs=_costs(m.stage_names, m.node_stage_s[n], m.out_bytes,
                                                                      macs),
                  input_bytes=m.node_raw_bytes[n], fixed_s=m.node_read_s[n], byte_s=m.send_s_per_byte,
                  link={f"link{n}": 1.0} if m.link_bytes_per_s else {},
                  also={groups[n]: m.node_cpu_scale / m.node_slowdown[n]} if groups[n] else {})
             for n in range(m.nodes)]
    host = Site(cpu="host_threads", costs=_costs(m.stage_names, m.host_stage_s, m.out_bytes, macs),
                byte_s=m.recv_s_per_byte, also={host_group: m.host_cpu_scale})
    return nodes, host


def _demands(m: Measurements, i: int) -> dict[str, float]:
    """Per-sample demands of the split that runs the first ``i`` stages on the nodes."""
    nodes, host = sites(m)
    macs = m.stage_macs or [0.0] * len(m.stage_names)
    placed = place(Placement(i), _costs(m.stage_names, m.host_stage_s, m.out_bytes, macs), storage=nodes,
                   compute=host, input_bytes=m.raw_bytes, frame_bytes=ROW_OVERHEAD_BYTES)
    demands: dict[str, float] = {}
    for st in placed:
        for r, d in st.demands.items():
            demands[r] = demands.get(r, 0.0) + d
    groups, host_group, _ = cpu_sets(m)
    for n, g in enumerate(groups):
        # the per-row work the profiles miss (packing rows, their crc) runs on the node's worker threads too
        demands[f"node{n}"] += m.node_share[n] * m.node_overhead_s
        if g:  # reading is not slowed (the site charged it at 1/slowdown), and the overhead the profiles miss
            slow = m.node_slowdown[n]
            demands[g] += m.node_share[n] * (m.node_read_s[n] * m.node_cpu_scale * (1.0 - 1.0 / slow)
                                             + m.node_overhead_s)
    demands[host_group] = demands.get(host_group, 0.0) + m.host_overhead_s
    return demands


def modeled_cpu(m: Measurements, k: int) -> tuple[float, float]:
    """(node, host) CPU seconds per sample at split ``k`` that the profiles account for (no overheads)."""
    i = m.index(k)
    node = sum(m.node_share[n] * (m.node_read_s[n] + sum(m.node_stage_s[n][:i]) / m.node_slowdown[n]
                                  + m.wire_bytes(k, n) * m.send_s_per_byte) for n in range(m.nodes))
    wire = sum(m.node_share[n] * m.wire_bytes(k, n) for n in range(m.nodes))
    host = sum(m.host_stage_s[i:]) + wire * m.recv_s_per_byte
    return node, host


def predict(m: Measurements) -> list[SplitPrediction]:
    """Evaluate every valid split with the model (the placement of stages[:i] on the nodes: ``model.place``)."""
    res = [Resource(name=f"node{i}", rate=m.node_workers, unit="thread-s") for i in range(m.nodes)]
    res.append(Resource(name="host_threads", rate=m.host_workers, unit="thread-s"))
    res += [Resource(name=g, rate=rate, unit="core-s") for g, rate in cpu_sets(m)[2].items()]
    if m.link_bytes_per_s:
        res += [Resource(name=f"link{i}", rate=m.link_bytes_per_s) for i in range(m.nodes)]
    if m.step_time:
        res.append(Resource(name="accelerator", rate=m.mean_batch / (m.step_time + m.wake_s), unit="sample"))
    macs = m.stage_macs or [0.0] * len(m.stage_names)
    out = []
    for i, k in enumerate([0, *m.stage_stops]):
        demands = _demands(m, i)
        if m.step_time:
            demands["accelerator"] = 1.0
        ev = evaluate(res, [Stage(name=f"split {k}", demands=demands)])
        wire = sum(m.node_share[n] * m.wire_bytes(k, n) for n in range(m.nodes))
        out.append(SplitPrediction(split=k, node_stages=m.stage_names[:i],
                                   samples_per_s=ev.samples_per_s, bottleneck=ev.bottleneck or "-",
                                   bytes_per_sample=wire, node_macs_per_sample=sum(macs[:i]),
                                   utilization={n: round(u, 3) for n, u in ev.utilization.items()}))
    return out


MIN_TIE, MAX_TIE = 0.03, 0.10
#: the least fraction of a nodes' CPU set's cores that the calibration run may leave it (see ``fit``)
NODE_SET_FLOOR = 0.9
#: a node's CPU seconds per row beyond its profiled stages, at most: the calibration runs whose nodes ran no
#: stage (they read, packed and sent) measured 0.5-1.7e-4 s; a larger residue where they ran stages is theirs
NODE_ROW_OVERHEAD_S = 2e-4


def choose(preds: list[SplitPrediction], *, noise: float = 0.0) -> tuple[int, str]:
    """The fastest split; over a capped link, among those it cannot tell from the fastest, the fewest bytes.

    Over a capped link (the predictions carry ``link*`` resources),
    predictions within ``noise`` (the measurements' own spread, 3-10%) of the
    fastest are a tie, won by the fewest bytes on the link (headroom where a
    link is what binds), then by the most stages on the nodes (the host's CPU
    is the training job's). Over an open link bytes bind nothing and the
    fastest prediction, the best estimate there is, wins (in four recorded
    accuracy runs, 46 of 52 choices within 5% of the best measured split,
    against 44 for breaking those ties on bytes or on stages too).
    """
    tie = min(MAX_TIE, max(MIN_TIE, noise))
    best = max(p.samples_per_s for p in preds)
    capped = any(r.startswith("link") for p in preds for r in p.utilization)
    near = [p for p in preds if p.samples_per_s >= (1 - tie) * best] if capped else []
    if near:
        pick = min(near, key=lambda p: (round(p.bytes_per_sample), -len(p.node_stages), -p.samples_per_s))
    else:
        pick = max(preds, key=lambda p: p.samples_per_s)
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


class _Echo(flight.FlightServerBase):
    """A loopback Flight server that packs ``rows`` into a record batch (their crc32c, a copy), as a node does
    for every message, and streams ``reps`` of them per ticket."""

    def __init__(self, rows: list[tuple], reps: int) -> None:
        super().__init__("grpc://127.0.0.1:0")
        self.schema, self.rows, self.reps = response_schema("tensor", "uint8"), rows, reps

    def do_get(self, context, ticket):  # noqa: ANN001, ANN201, ARG002
        return flight.GeneratorStream(self.schema, (encode_rows(self.schema, self.rows) for _ in range(self.reps)))


def _per_byte_seconds(row_bytes: int = 256 << 10, rows: int = 32, reps: int = 4) -> tuple[float, float]:
    """(send, receive) CPU seconds per byte over the nodes' transport: rows packed with their crc32c
    (``encode_rows``, per message), an Arrow Flight stream on loopback, rows checked (``decode_rows``) and copied into a
    batch. Both ends run in this process, so their CPU is counted together and split evenly; median of 3
    streams of ``reps`` 8 MB messages after one untimed stream (a crc32c and a copy alone, out of a warm
    cache, measure a third of what the stream costs: gRPC copies and frames every message)."""
    payload = np.random.default_rng(0).integers(0, 255, row_bytes, dtype=np.uint8)
    dst = np.empty((rows, row_bytes), np.uint8)
    server = _Echo([(i, f"s{i}", 0, payload) for i in range(rows)], reps)
    try:
        with flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
            def stream() -> float:
                c0 = time.process_time()
                for chunk in client.do_get(flight.Ticket(b"")):
                    for i, row in enumerate(decode_rows(chunk.data)):
                        if not row.crc_ok:
                            raise ChecksumError("the planner's transport probe read a row whose crc32c differs")
                        np.copyto(dst[i], row.value)
                return time.process_time() - c0

            stream()
            cpu = float(np.median([stream() for _ in range(3)]))
    finally:
        server.shutdown()
    per_byte = cpu / (reps * rows * row_bytes) / 2
    return per_byte, per_byte


def _burn(reps: int) -> float:
    """A CPU-bound kernel (zlib on incompressible-ish bytes); returns its own wall time."""
    data = np.random.default_rng(1).integers(0, 64, 1 << 20, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    for _ in range(reps):
        zlib.compress(data, 6)
    return time.perf_counter() - t0


def core_efficiency(cpus: int, *, reps: int = 4) -> float:
    """Effective cores per CPU when ``cpus`` processes run at once on this process's CPU set, measured (a
    VM's vCPUs may share a physical core; other work may take some): 1.0 for a set of one CPU."""
    if cpus < 2:
        return 1.0
    alone = min(_burn(reps) for _ in range(2))
    with multiprocessing.get_context("fork").Pool(cpus) as pool:
        t0 = time.perf_counter()
        pool.map(_burn, [reps] * cpus)
        together = time.perf_counter() - t0
    return max(0.25, min(1.0, alone / together))


def _stage_seconds(pipeline: Pipeline, xs: list, keys: list[str]) -> list[float]:
    """CPU seconds per sample of each stage run over ``xs`` as a loader's worker runs a batch (a batched
    stage, such as a network, on all of them at once, in this thread: one intra-op thread, as the loader's
    workers run it); a sample that fails is an error: profiles need every one."""
    cur, acc = list(xs), []
    for st in pipeline.stages:
        out: list = [None] * len(cur)
        c0 = time.thread_time()  # CPU, not wall: other work on the machine does not inflate it
        errors = pipeline.run_batch(cur, keys=keys, seed=0, epoch=0, starts=st.start, stops=st.stop, out=out)
        acc.append((time.thread_time() - c0) / max(len(cur), 1))
        bad = next((e for e in errors if e is not None), None)
        if bad is not None:
            raise ConfigError(f"the planner could not profile stage {st.name} on this host: {bad}")
        cur = out
    return acc


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def _host_stage_seconds(pipeline: Pipeline, raw: list, rounds: int = 3) -> list[float]:
    """Seconds per sample of each stage on this host (median of ``rounds`` passes over ``raw``, after the
    untimed passes a node's profile makes too: ``Pipeline.warm_up``)."""
    keys = [f.key for f in raw]
    xs = [f.data for f in raw]
    pipeline.warm_up(xs, keys)
    per_round = [_stage_seconds(pipeline, xs, keys) for _ in range(rounds)]
    return [float(np.median([r[i] for r in per_round])) for i in range(len(pipeline.stages))]


def _run_loader(spec, pipeline: Pipeline, m: Measurements, k: int, loader: Callable[..., Any],  # noqa: ANN001
                rate: float, min_seconds: float = 1.5, warmup: int = 3) -> dict:
    """Run the loader at split k for a moment (``min_seconds`` at the predicted ``rate``, at least 4 batches
    and at most 1024 samples, and at least ``min_seconds``): CPU seconds per sample on the nodes and on the
    host, cores kept busy, samples/s, and the wake-up lag of a sleeping thread.

    CPU time is read from this process (``process_time``) and from each node
    (its ``stats`` action), so emulated slowdowns (sleep) and link waits do
    not count; the loader's start-up (its first ``warmup`` batches, while
    buffers fill) is not counted either.
    """
    n = int(min(1024, max(4 * m.batch_size, rate * min_seconds)))
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
                if i == warmup:
                    prober.start()
                    before = [c.stats() for c in clients]
                    h0, built0 = time.process_time(), ld.stats.samples
                    w0 = time.perf_counter()
                elif i > warmup:
                    seen += len(b)
                    if seen >= n and time.perf_counter() - w0 >= min_seconds:
                        break
            stop.set()
            wall = time.perf_counter() - w0
            # CPU over the window itself: read-ahead makes a short run's samples/s optimistic, CPU busy is not
            h1, mid = time.process_time(), [c.stats() for c in clients]
            ld.close()  # let batches in flight finish, so the CPU counted matches the samples counted
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
    node_busy = [(a["cpu_seconds"] - b["cpu_seconds"]) / wall for a, b in zip(mid, before)]
    return {"node_cpu_s": node_cpu / processed, "host_cpu_s": host_cpu / built, "node_busy": node_busy,
            "host_busy": (h1 - h0) / wall, "samples_per_s": seen / wall, "wake_s": float(np.mean(lags or [0.0]))}


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


def calibrate(spec, pipeline: Pipeline, m: Measurements, loader: Callable[..., Any]) -> None:  # noqa: ANN001
    """The plan's one end-to-end run: the loader at the split the profiles predict best.

    The CPU it used per sample beyond what the profiles account for
    (``modeled_cpu``) becomes the host's per-sample overhead at every split
    (gRPC, Arrow, Python per row: costs per sample, not per stage), and the
    nodes' too where they ran no stage; where they did, it scales their
    profiled CPU (the stages ran slower beside other work than alone). Less
    CPU than the profiles say scales that side's profiled CPU (``fit``). The
    accelerator's wake-up lag comes from the same run.
    """
    preds = predict(m)
    k, _ = choose(preds, noise=m.noise)
    t0 = time.perf_counter()
    run = _run_loader(spec, pipeline, m, k, loader, next(p.samples_per_s for p in preds if p.split == k))
    fit(m, k, run)
    m.calibration["seconds"] = time.perf_counter() - t0


def _residue(measured: float, modeled: float) -> tuple[float, float]:
    """(overhead per sample, scale): CPU beyond the profiles is a per-sample overhead; CPU below them (they
    ran alone and colder) scales that side's profiled CPU, by at most one half."""
    if measured >= modeled or modeled <= 0:
        return max(measured - modeled, 0.0), 1.0
    return 0.0, max(0.5, measured / modeled)


def fit(m: Measurements, k: int, run: dict) -> None:
    """Fold one loader run at split ``k`` into ``m`` (``run``: ``node_cpu_s`` and ``host_cpu_s`` per sample;
    ``node_busy`` per node and ``host_busy``, cores each kept busy over the run; ``samples_per_s``;
    ``wake_s``): each side's overhead, the wake-up lag and, where the run was bound by a CPU set, the cores
    that set really gave (its processes' busy cores). Pure: tested over recorded runs."""
    node_model, host_model = modeled_cpu(m, k)
    extra = run["node_cpu_s"] - node_model
    if m.index(k) > 0 and node_model > 0 and extra > NODE_ROW_OVERHEAD_S:
        # the nodes ran stages and used more CPU than a row's overhead explains: the rest is those stages running
        # slower than when profiled alone (caches and memory bandwidth shared with the loader and the other
        # nodes), so it scales the nodes' profiled CPU and a split that runs less on them carries less of it
        # (replayed over recorded accuracy runs g-p: 110 of 121 choices within 5% of the best measured split,
        # against 104 when it all was a per-sample overhead at every split; 627 of 662 predictions within 15%,
        # against 625)
        m.node_overhead_s = NODE_ROW_OVERHEAD_S
        m.node_cpu_scale = (run["node_cpu_s"] - NODE_ROW_OVERHEAD_S) / node_model
    else:  # what the profiles miss is per row (packing, the hand-off, gRPC)
        m.node_overhead_s, m.node_cpu_scale = _residue(run["node_cpu_s"], node_model)
    m.host_overhead_s, m.host_cpu_scale = _residue(run["host_cpu_s"], host_model)
    m.wake_s = run["wake_s"]
    m.cpu_rates = {}
    at_k = next(p for p in predict(replace(m, step_time=None)) if p.split == k)  # the run had no step
    cores = cpu_sets(m)[2]
    groups, host_group, _ = cpu_sets(m)
    if at_k.bottleneck in cores:  # CPU-bound: the cores that set really gave
        busy = sum(b for g, b in zip(groups, run["node_busy"]) if g == at_k.bottleneck)
        busy += run["host_busy"] if at_k.bottleneck == host_group else 0.0
        # the run can show a set gives more than its measured efficiency says (up to all of its CPUs). The
        # loader's set it never lowers: a short run's idle cores are as often its own start-up or another
        # process as the set's limit, and one such run would understate every split (replayed over four
        # recorded accuracy runs: 263 of 284 predictions within 15%, against 257 when it could). A nodes' set
        # the run did not fill is lowered, by at most NODE_SET_FLOOR: the nodes' request pipeline (a worker
        # per node, requests served in order, sends waiting on the link) left it idle at times (ResNet-50's
        # layer3 split, two nodes on one CPU: 0.81-0.95 of it busy in calibration, predicted 13-23% high in
        # seven runs; replayed over runs g-p with the rule above: 631 of 662 predictions within 15% against
        # 627, choices unchanged)
        if busy > cores[at_k.bottleneck]:
            m.cpu_rates[at_k.bottleneck] = min(busy, cores[at_k.bottleneck] / m.core_efficiency)
        elif at_k.bottleneck != host_group and busy < cores[at_k.bottleneck]:
            m.cpu_rates[at_k.bottleneck] = max(busy, NODE_SET_FLOOR * cores[at_k.bottleneck])
    m.calibration = {"runs": 1, "split": k,
                     "why": (f"split {k} is the profiles' best prediction: one loader run there measures the CPU per "
                             "sample that per-stage profiles miss (gRPC, Arrow, Python per row; on the nodes, their "
                             "stages running beside other work), applied to every split"),
                     "node_cpu_s": run["node_cpu_s"], "node_modeled_s": node_model,
                     "host_cpu_s": run["host_cpu_s"], "host_modeled_s": host_model,
                     "node_busy": run["node_busy"], "host_busy": run["host_busy"],
                     "samples_per_s": run["samples_per_s"],
                     "bound_by": at_k.bottleneck, "cpu_rates": dict(m.cpu_rates)}


def _profile_nodes(clients: list, ops: list, samples: int, rounds: int) -> tuple[list[dict], float]:
    """Per-node profiles, all nodes at once as they serve (median of ``rounds``), and their spread: the median
    relative range of a node's total stage CPU seconds over the rounds (0 for one round).

    A stage's seconds are its CPU time times the node's slowdown (an emulated weaker CPU: the node's thread
    is busy that long, its CPU for the CPU time): CPU time, unlike wall time, is not inflated by other
    processes on the same cores, and nodes that share a CPU set profile sharing it (caches included)."""
    runs: list[list[dict]] = [[] for _ in clients]
    with ThreadPoolExecutor(max(len(clients), 1)) as pool:
        for _ in range(rounds):
            for i, prof in enumerate(pool.map(lambda c: c.profile(ops, n=samples), clients)):
                runs[i].append(prof)
    profiles = []
    spread = []
    for rs in runs:
        out = dict(rs[0])
        out["read_seconds"] = float(np.median([r["read_seconds"] for r in rs]))
        out["stages"] = [dict(st, cpu_seconds=float(np.median([r["stages"][i]["cpu_seconds"] for r in rs])))
                         for i, st in enumerate(rs[0]["stages"])]
        profiles.append(out)
        totals = [sum(st["cpu_seconds"] for st in r["stages"]) for r in rs]
        spread.append(float(np.ptp(totals) / max(np.mean(totals), 1e-12)))
    return profiles, float(np.median(spread))


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
            batch_size: int = 64, samples: int | None = None,
            loader: Callable[..., Any] | None = None) -> Measurements:
    """Profile the cluster's nodes and this host for ``pipeline``, then (with ``loader``) calibrate once.

    ``samples``: how many samples each node and the host profile (default: 16
    for a pipeline with a batched stage such as a network, profiled once; 32
    for per-sample stages, profiled three times). ``loader`` is the loader
    class to calibrate with (``nearstore.Loader``); it is passed in because the
    loader is the layer above the planner (its ``split="auto"`` calls ``plan``).
    Without it the plan makes no end-to-end run and says so.
    """
    t_start = time.perf_counter()
    spec = getattr(cluster, "spec", cluster)
    batched = any(st.batched for st in pipeline.stages)
    samples = samples or (16 if batched else 32)
    rounds = 1 if batched else 3
    src = ClusterSource(spec, pipeline, "host")
    try:
        ops = pipeline.to_json()
        src_nodes = list(src.clients)
        health = [c.health() for c in src.clients.values()]
        man = src.manifest
        ids = np.arange(min(samples, man.num_samples))
        raw = [f for f in src.fetch(ids, epoch=0, seed=0) if f.error is None]
        if not raw:
            raise ConfigError("the planner could not fetch any sample to profile the host with")
        # the host profiles while the nodes do: costs are CPU time, which running side by side barely moves
        with ThreadPoolExecutor(1, initializer=worker_init) as pool:  # a thread set up as the loader's workers
            t0 = time.perf_counter()
            host_job = pool.submit(_timed, _host_stage_seconds, pipeline, raw, rounds)
            profiles, spread = _profile_nodes(list(src.clients.values()), ops, samples, rounds)
            profile_s = time.perf_counter() - t0
            host_s, host_profile_s = host_job.result()
    finally:
        src.close()
    stages = pipeline.stages
    order = list(src_nodes)
    slowdown = [float(h.get("slowdown", 1.0)) for h in health]
    node_s = [[p["stages"][i]["cpu_seconds"] * slow for i in range(len(stages))] for p, slow in zip(profiles, slowdown)]
    figures = declared(pipeline, input_spec_of(man))
    figures["out_bytes"] = [b or float(profiles[0]["stages"][i]["out_bytes"])  # a size no op could declare
                            for i, b in enumerate(figures["out_bytes"])]
    samples_by, bytes_by = {n: 0 for n in order}, {n: 0 for n in order}
    for sh in man.shards:  # the loader asks a shard's first live replica
        n = next(x for x in sh.nodes if x in samples_by)
        samples_by[n] += sh.samples
        bytes_by[n] += sh.payload_bytes
    host_cpus = sorted(os.sched_getaffinity(0))
    # a node on this machine reports its CPU set (one that does not: assume it may use every CPU)
    node_cpus = [sorted(h.get("cpus") or range(os.cpu_count() or 1)) if _loopback(ep.uri) else None
                 for h, ep in zip(health, spec.nodes)]
    send, recv = _per_byte_seconds()
    m = Measurements(
        nodes=len(spec.nodes), node_workers=spec.workers_per_node, host_workers=host_workers,
        link_bytes_per_s=spec.link_mbps * 1e6 if spec.link_mbps else None,
        **figures,
        node_share=[samples_by[n] / man.num_samples for n in order],
        node_raw_bytes=[bytes_by[n] / max(samples_by[n], 1) for n in order],
        node_read_s=[p["read_seconds"] for p in profiles], node_stage_s=node_s,
        node_slowdown=slowdown,
        host_stage_s=host_s, send_s_per_byte=send, recv_s_per_byte=recv,
        host_cpus=host_cpus, node_cpus=node_cpus, core_efficiency=core_efficiency(len(host_cpus)),
        noise=spread, step_time=step_time, batch_size=batch_size, samples_per_epoch=man.num_samples,
    )
    m.seconds = {"profile_nodes": profile_s, "profile_host": host_profile_s}
    if loader is not None:
        calibrate(spec, pipeline, m, loader)
        m.seconds["calibrate"] = m.calibration["seconds"]
    else:
        m.calibration = {"runs": 0, "why": "no loader class given (loader=...): predictions use the profiles alone"}
    m.seconds["total"] = time.perf_counter() - t_start
    return m


def plan(cluster, pipeline: Pipeline, *, host_workers: int = 2, step_time: float | None = None,  # noqa: ANN001
         batch_size: int = 64, samples: int | None = None, loader: Callable[..., Any] | None = None) -> Plan:
    """Measure, predict every split, choose; ``Plan.reason`` says why in one line (``loader``: see ``measure``)."""
    m = measure(cluster, pipeline, host_workers=host_workers, step_time=step_time, batch_size=batch_size,
                samples=samples, loader=loader)
    preds = predict(m)
    k, reason = choose(preds, noise=m.noise)
    return Plan(choice=k, reason=reason, predictions=preds, measurements=m)
