"""The planner: the model fed by measurements of a real local cluster (real node processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nearstore import Loader, standard_train
from nearstore.node import LocalCluster
from nearstore.plan import Measurements, SplitPrediction, plan, predict
from nearstore.plan.planner import _per_byte_seconds, choose, cpu_sets, fit, modeled_cpu
from nearstore.store.ingest import ingest
from nearstore.store.synth import SynthSpec, synth_folder

pytestmark = pytest.mark.timeout(300)
PIPE = standard_train(224)


def _m(**kw) -> Measurements:
    """Nodes on other hosts (no CPU set shared with this 4-CPU loader) unless a test says otherwise."""
    base = dict(nodes=2, node_workers=1, host_workers=2, link_bytes_per_s=None, host_cpus=[0, 1, 2, 3],
                raw_bytes=100_000.0, stage_names=["decode", "normalize"], stage_stops=[1, 2], node_share=[0.5, 0.5],
                node_raw_bytes=[100_000.0, 100_000.0], node_read_s=[0.0, 0.0],
                node_stage_s=[[0.004, 0.001], [0.004, 0.001]], node_slowdown=[1.0, 1.0], host_stage_s=[0.004, 0.001],
                out_bytes=[150_000.0, 600_000.0], send_s_per_byte=0.0, recv_s_per_byte=0.0)
    base.update(kw)
    return Measurements(**base)


def test_hand_computed_predictions():
    """Two nodes x 1 thread, host 2 threads, 25 MB/s links; nothing else costs."""
    m = _m(link_bytes_per_s=25e6)
    by = {p.split: p for p in predict(m)}
    # host-side: 2 host threads / 5 ms = 400/s (the links could carry 2 x 25e6 / 100,096 = 500/s)
    assert by[0].samples_per_s == pytest.approx(400.0) and by[0].bottleneck == "host_threads"
    wide = {p.split: p for p in predict(_m(link_bytes_per_s=25e6, host_workers=8))}
    assert wide[0].samples_per_s == pytest.approx(2 * 25e6 / 100_096) and wide[0].bottleneck == "link0"
    # decode on the nodes: node threads 1 / (0.5 x 4 ms) = 500/s; links 2 x 25e6 / 150,096 = 333/s
    assert by[1].samples_per_s == pytest.approx(2 * 25e6 / 150_096) and by[1].bottleneck == "link0"
    # without the cap, decode on the nodes: 500/s (node threads) vs host 2 / 1 ms... host does normalize only
    open_ = {p.split: p for p in predict(_m())}
    assert open_[1].samples_per_s == pytest.approx(500.0) and open_[1].bottleneck == "node0"
    assert open_[0].samples_per_s == pytest.approx(2 / 0.005) and open_[0].bottleneck == "host_threads"


def test_shares_and_shared_cores_enter_the_prediction():
    """Nodes on the loader's two CPUs, which give 0.75 of a core each: one 1.5-core resource for all."""
    m = _m(node_share=[0.75, 0.25], host_cpus=[0, 1], node_cpus=[[0, 1], [0, 1]], core_efficiency=0.75)
    assert cpu_sets(m) == (["cpu", "cpu"], "cpu", {"cpu": 1.5})
    by = {p.split: p for p in predict(m)}
    # node 0 serves 3/4 of the samples: 1 / (0.75 x 5 ms) = 267/s; the shared 1.5 cores: 1.5 / 5 ms = 300/s
    assert by[2].samples_per_s == pytest.approx(1 / (0.75 * 0.005)) and by[2].bottleneck == "node0"
    assert by[0].samples_per_s == pytest.approx(1.5 / 0.005) and by[0].bottleneck == "cpu"


def test_nodes_on_cpu_sets_of_their_own_do_not_take_the_loaders_cores():
    """Loader on CPU 0, both nodes pinned to CPU 1 (emulated storage hosts); 4 host threads, 4 node threads."""
    m = _m(host_workers=4, node_workers=4, host_cpus=[0], node_cpus=[[1], [1]])
    assert cpu_sets(m) == (["node_cpus", "node_cpus"], "cpu", {"cpu": 1.0, "node_cpus": 1.0})
    by = {p.split: p for p in predict(m)}
    assert by[0].bottleneck == "cpu" and by[0].samples_per_s == pytest.approx(1 / 0.005)  # the host does it all
    assert by[2].bottleneck == "node_cpus" and by[2].samples_per_s == pytest.approx(1 / 0.005)
    assert by[1].bottleneck == "node_cpus" and by[1].samples_per_s == pytest.approx(1 / 0.004)  # 4 ms vs 1 ms
    slow = {p.split: p for p in predict(_m(host_workers=4, node_workers=4, host_cpus=[0], node_cpus=[[1], [1]],
                                           node_stage_s=[[0.016, 0.004]] * 2, node_slowdown=[4.0, 4.0]))}
    # a 4x slowdown is idle time: the nodes' CPU set still does 1 / 5 ms, their threads 4 / 20 ms
    assert slow[2].samples_per_s == pytest.approx(1 / 0.005) and slow[2].bottleneck in ("node_cpus", "node0")
    # sets that overlap are one resource, named cpu when the loader's set is in it
    assert cpu_sets(_m(nodes=3, node_share=[1 / 3] * 3, node_raw_bytes=[1e5] * 3, node_read_s=[0.0] * 3,
                       node_stage_s=[[0.004, 0.001]] * 3, node_slowdown=[1.0] * 3, host_cpus=[0],
                       node_cpus=[[1], [1, 2], None]))[0] == ["node_cpus", "node_cpus", None]


def test_one_calibration_run_fits_the_overheads_and_the_cores_it_got():
    """A recorded run at split 0 (loader and nodes sharing 2 CPUs): the CPU beyond the profiles becomes each
    side's per-sample overhead at every split; the cores the CPU-bound run kept busy, beyond what the set's
    measured efficiency gives, replace it."""
    m = _m(host_cpus=[0, 1], node_cpus=[[0, 1], [0, 1]], host_workers=8, node_workers=2, core_efficiency=0.75)
    assert modeled_cpu(m, 0) == pytest.approx((0.0, 0.005)) and modeled_cpu(m, 2) == pytest.approx((0.005, 0.0))
    fit(m, 0, {"node_cpu_s": 0.0004, "host_cpu_s": 0.0061, "samples_per_s": 300.0, "node_busy": [0.05, 0.05],
               "host_busy": 1.525, "wake_s": 0.002})
    assert m.node_overhead_s == pytest.approx(0.0004) and m.host_overhead_s == pytest.approx(0.0011)
    assert m.calibration["runs"] == 1 and m.calibration["bound_by"] == "cpu"
    assert m.cpu_rates["cpu"] == pytest.approx(1.625)  # every process on the set: 0.05 + 0.05 + 1.525 cores,
    # more than the measured efficiency's 2 x 0.75
    by = {p.split: p for p in predict(m)}
    assert by[0].samples_per_s == pytest.approx(1.625 / 0.0065)  # not the run's samples/s: read-ahead inflates it
    # split 2: 5 ms on the nodes + both overheads (1.5 ms) on the same 1.625 cores
    assert by[2].samples_per_s == pytest.approx(1.625 / 0.0065) and by[2].bottleneck == "cpu"
    fit(m, 0, {"node_cpu_s": 0.0, "host_cpu_s": 0.004, "samples_per_s": 400.0, "node_busy": [0.0, 0.0],
               "host_busy": 0.4, "wake_s": 0.0})
    assert m.host_overhead_s == 0.0 and m.host_cpu_scale == pytest.approx(0.8)  # profiles slower than the run
    assert predict(m)[-1].utilization["cpu"] >= 0  # a split with little host work stays a demand, not a credit
    fit(m, 0, {"node_cpu_s": 0.0, "host_cpu_s": 0.001, "samples_per_s": 400.0, "node_busy": [0.0, 0.0],
               "host_busy": 0.4, "wake_s": 0.0})
    assert m.host_cpu_scale == 0.5  # at most half comes off
    sep = _m(host_cpus=[0], node_cpus=[[1], [1]], host_workers=4, node_workers=4)  # nodes bound on their CPU
    fit(sep, 2, {"node_cpu_s": 0.005, "host_cpu_s": 0.0, "samples_per_s": 500.0, "node_busy": [0.45, 0.4],
                 "host_busy": 0.1, "wake_s": 0.0})
    # 0.85 of the nodes' one CPU busy: the nodes left their set idle at times, which lowers it by at most a tenth
    assert sep.calibration["bound_by"] == "node_cpus" and sep.cpu_rates == {"node_cpus": pytest.approx(0.9)}
    busy_loader = _m(host_cpus=[0], node_cpus=[[1], [1]], host_workers=4, node_workers=4)
    fit(busy_loader, 0, {"node_cpu_s": 0.0, "host_cpu_s": 0.005, "samples_per_s": 150.0, "node_busy": [0.0, 0.0],
                         "host_busy": 0.75, "wake_s": 0.0})
    # the loader's own set is never lowered: a short run's idle time is as often its start-up as the set's limit
    assert busy_loader.calibration["bound_by"] == "cpu" and busy_loader.cpu_rates == {}
    fit(sep, 2, {"node_cpu_s": 0.006, "host_cpu_s": 0.0, "samples_per_s": 160.0, "node_busy": [0.5, 0.5],
                 "host_busy": 0.1, "wake_s": 0.0})
    # the nodes ran both stages: of the 1 ms beyond their profiles, a row's overhead (at most 0.2 ms) is per
    # sample; the rest is those stages running slower beside other work: it scales the nodes' CPU (x1.16)
    assert sep.node_overhead_s == pytest.approx(0.0002) and sep.node_cpu_scale == pytest.approx(1.16)
    by = {p.split: p for p in predict(sep)}
    assert by[2].samples_per_s == pytest.approx(1 / 0.006) and by[2].bottleneck == "node_cpus"
    assert by[1].samples_per_s == pytest.approx(1 / (0.004 * 1.16 + 0.0002))  # decode only: 4.84 ms, not 5
    fit(sep, 2, {"node_cpu_s": 0.0051, "host_cpu_s": 0.0, "samples_per_s": 190.0, "node_busy": [0.5, 0.5],
                 "host_busy": 0.1, "wake_s": 0.0})
    assert sep.node_overhead_s == pytest.approx(0.0001) and sep.node_cpu_scale == 1.0  # within a row's overhead


def test_choice_breaks_ties_within_the_measurement_noise():
    def pred(split: int, rate: float, nbytes: float, stages: int, link: bool = True) -> SplitPrediction:
        return SplitPrediction(split=split, node_stages=[f"s{i}" for i in range(stages)], samples_per_s=rate,
                               bottleneck="cpu", bytes_per_sample=nbytes,
                               utilization={"link0": nbytes * rate / 1e9} if link else {})

    preds = [pred(0, 930.0, 100e3, 0), pred(2, 1040.0, 150e3, 1), pred(4, 1030.0, 150e3, 3), pred(5, 1050.0, 600e3, 4)]
    k, reason = choose(preds)
    assert k == 4 and "of those, runs the most on the nodes" in reason  # 2, 4, 5 tie: fewest bytes (2, 4), then
    # the most on the nodes
    assert choose(preds, noise=0.5)[0] == 4  # the band is at most 10%: split 0 (11% slower) is not a tie
    preds[0] = pred(0, 980.0, 100e3, 0)
    k, reason = choose(preds, noise=0.08)
    assert k == 0 and "tied within 8%" in reason and "of those" not in reason  # split 0 moves the fewest bytes
    assert choose(preds, noise=0.0)[0] == 4
    # an open link: bytes bind nothing, and the fastest prediction wins whatever the noise
    open_link = [pred(p.split, p.samples_per_s, p.bytes_per_sample, len(p.node_stages), link=False) for p in preds]
    k, reason = choose(open_link, noise=0.08)
    assert k == 5 and "tied" not in reason
    open_link[-1] = pred(5, 900.0, 600e3, 4, link=False)
    assert choose(open_link, noise=0.08)[0] == 2


def test_per_byte_costs_come_from_a_real_loopback_stream():
    send, recv = _per_byte_seconds(row_bytes=64 << 10, rows=8, reps=2)  # 1 MB streams: a smoke test
    assert send == recv and 1e-12 < send < 1e-7  # a stream moves bytes at 10 MB/s to 1 TB/s of CPU per side


@pytest.fixture(scope="module")
def large_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    synth_folder(root / "src", SynthSpec(n=12, seed=3, large=True, classes=2), workers=2)
    ingest(root / "src", root / "store", nodes=2, replicas=1, shard_size=8 << 20)
    return root / "store"


def test_tight_link_with_large_photos_chooses_node_side(large_store):
    with LocalCluster(large_store, link_mbps=10) as c:
        p = plan(c, PIPE, batch_size=8, samples=4, loader=Loader)
        assert p.choice >= 2, p.reason  # decode and crop on the nodes: ~150 KB instead of ~1 MB per sample
        assert p.calibration["runs"] == 1 and p.calibration["split"] in [x.split for x in p.predictions]
        assert p.measurements.node_cpus == [sorted(os.sched_getaffinity(0))] * 2  # the nodes share this machine
        host = next(x for x in p.predictions if x.split == 0)
        assert host.bottleneck.startswith("link") and "bound by" in p.reason
        with Loader(cluster=c, pipeline=PIPE, split="auto", batch_size=4, seed=1) as auto, \
                Loader(cluster=c, pipeline=PIPE, split="host", batch_size=4, seed=1) as ref:
            assert auto.plan is not None and auto.source.prefix == auto.plan.choice
            for a, b in zip(auto, ref):  # the chosen split changes where ops run, never the bits
                assert np.array_equal(a.data, b.data)


# A choice between measured rates: under CPU contention from other work on a 2-core machine it can flip,
# so it runs with the long runs (pytest -m long), next to bench/plan.py's accuracy scenarios.
@pytest.mark.long
def test_open_link_with_a_slow_node_chooses_host_side(store):
    with LocalCluster(store, slowdown=6.0) as c:
        p = plan(c, PIPE, batch_size=16, samples=8, loader=Loader)
    assert p.choice == 0, p.reason
    node_side = [x for x in p.predictions if x.split > 0]
    assert all(x.bottleneck.startswith("node") for x in node_side)


def test_plan_cli_prints_table_and_writes_json(store, tmp_path):
    last = max(os.sched_getaffinity(0))
    with LocalCluster(store, link_mbps=50, cpus=[last]) as c:  # nodes pinned to one CPU (--cpus)
        c.spec.save(tmp_path / "cluster.json")
        r = subprocess.run([sys.executable, "-m", "nearstore.cli.main", "plan", "--cluster", str(tmp_path),
                            "--accel", "h100", "--batch-size", "16", "--samples", "8", "--json",
                            str(tmp_path / "p.json")], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["choice"] in [p["split"] for p in d["predictions"]] and "choice:" in r.stdout + r.stderr
    assert d["measurements"]["step_time"] == pytest.approx(0.224 * 16 / 400)
    assert all(p["samples_per_s"] > 0 for p in d["predictions"])
    assert d["measurements"]["node_cpus"] == [[last]] * 2 and d["calibration"]["runs"] == 1
    assert "calibration: 1 loader run at split" in r.stdout + r.stderr


def test_accelerator_gets_the_mean_batch_of_an_epoch():
    """400 samples in batches of 64: 6 full batches and one of 16, so a step carries 57.1 samples on average."""
    m = _m(step_time=0.2, batch_size=64, samples_per_epoch=400, host_workers=64)
    by = {p.split: p for p in predict(m)}
    assert by[0].bottleneck == "accelerator"
    assert by[0].samples_per_s == pytest.approx(400 / 7 / 0.2)


# -- the model over the recorded bench scenarios (bench/results/plan.json): measurements in, predictions out --

RECORDED = Path(__file__).parents[1] / "bench" / "results" / "plan.json"


def _recorded() -> list[dict]:
    return json.loads(RECORDED.read_text())["scenarios"]


@pytest.mark.parametrize("i", range(len(_recorded())))
def test_recorded_scenarios_replay_their_predictions_and_choices(i):
    """predict() and choose() are pure: fed a benchmark scenario's recorded measurements they give exactly the
    predictions and the choice the benchmark reported (so the figures in docs/benchmarks.md are this code's)."""
    sc = _recorded()[i]
    m = Measurements(**sc["measurements"])
    preds = predict(m)
    assert [p.split for p in preds] == [r["split"] for r in sc["splits"]]
    for p, r in zip(preds, sc["splits"]):
        assert p.samples_per_s == pytest.approx(r["predicted"], rel=1e-9), (sc["name"], p.split)
        assert p.bottleneck == r["predicted_bottleneck"]
    assert choose(preds, noise=m.noise)[0] == sc["choice"]
    assert sc["calibration"]["runs"] <= 1


@pytest.mark.parametrize("i", range(len(_recorded())))
def test_recorded_calibrations_refit_to_the_recorded_measurements(i):
    """fit() is pure: the scenario's calibration run, folded again into its measurements, gives back the
    overheads, scales and cores the benchmark's planner used."""
    sc = _recorded()[i]
    m = Measurements(**sc["measurements"])
    cal = m.calibration
    run = {k: cal[k] for k in ("node_cpu_s", "host_cpu_s", "node_busy", "host_busy", "samples_per_s")}
    again = Measurements(**sc["measurements"])
    fit(again, cal["split"], {**run, "wake_s": m.wake_s})
    for name in ("node_overhead_s", "host_overhead_s", "node_cpu_scale", "host_cpu_scale", "cpu_rates"):
        assert getattr(again, name) == pytest.approx(getattr(m, name), rel=1e-9), (sc["name"], name)
