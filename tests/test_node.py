"""Storage nodes: real node processes on loopback in every test."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import numpy as np
import pyarrow.flight as flight
import pytest

from nearstore import Loader, standard_train
from nearstore.core.memory import MALLOC_ENV
from nearstore.node import LocalCluster
from nearstore.node.client import NodeClient, NodeRequestError, NodeUnavailableError
from nearstore.node.cluster import ClusterSpec, NodeEndpoint
from nearstore.node.protocol import MAX_TICKET_BYTES, Ticket, decode_rows, wire_bytes
from nearstore.store import Manifest

pytestmark = pytest.mark.timeout(180)
PIPE = standard_train(64)


@pytest.fixture(scope="module")
def cluster(store):
    """The module's 2-node cluster (every cluster start costs seconds); the cap is far above what tests send,
    so it only makes the link figures defined."""
    with LocalCluster(store, workers_per_node=2, link_mbps=1000) as c:
        yield c


def digest(loader) -> str:
    h = hashlib.sha256()
    for b in loader:
        h.update(b.data.tobytes())
        h.update(b.labels.tobytes())
    return h.hexdigest()


def test_health_stats_manifest(cluster, store):
    man = Manifest.load(store)
    for ep in cluster.spec.nodes:
        c = NodeClient(ep.uri, node=ep.node)
        h = c.health()
        assert h["ok"] and h["node"] == ep.node and h["dataset"] == man.name and h["shards_held"] > 0
        assert c.manifest().fingerprint == man.fingerprint
        assert {"requests", "samples", "wire_bytes", "op_seconds", "errors"} <= set(c.stats())
        c.close()


@pytest.mark.parametrize("split", ["host", 2, 3, 4, "node"])
def test_bit_identical_for_every_split(cluster, store, split):
    with Loader(store, pipeline=PIPE, batch_size=8, seed=5) as local:
        want = digest(local)
    with Loader(cluster=cluster, pipeline=PIPE, split=split, batch_size=8, seed=5, workers=2) as remote:
        assert digest(remote) == want
        assert remote.source.wire_bytes > 0


def test_split_inside_fused_stage_is_rejected(cluster):
    with pytest.raises(ValueError, match="inside the fused stage"):
        Loader(cluster=cluster, pipeline=PIPE, split=1, batch_size=8)


def test_profile_action(cluster):
    ep = cluster.spec.nodes[0]
    c = NodeClient(ep.uri, node=ep.node)
    prof = c.profile(PIPE.to_json(), n=4)
    assert prof["samples"] == 4 and prof["raw_bytes"] > 10_000
    names = [s["name"] for s in prof["stages"]]
    assert names == ["decode_jpeg+random_resized_crop", "flip", "to_uint8_chw", "normalize"]
    assert prof["stages"][0]["out_bytes"] == 64 * 64 * 3 and prof["stages"][-1]["out_bytes"] == 64 * 64 * 3 * 4
    assert all(s["seconds"] > 0 for s in prof["stages"])
    c.close()


def _ids_on(store, node: int) -> list[int]:
    man = Manifest.load(store)
    return [s.first + j for s in man.shards if node in s.nodes for j in range(s.samples)]


def test_byte_accounting_is_exact(cluster, store):
    """Both sides count the same wire bytes; wire = payload + measured framing."""
    ep = cluster.spec.nodes[0]
    c = NodeClient(ep.uri, node=ep.node)
    before = c.stats()
    ids = _ids_on(store, ep.node)[:20]
    t = Ticket(dataset=Manifest.load(store).name, samples=ids, ops=PIPE.to_json()[:4], seed=1, batch_size=8)
    batches, client_wire = c.get(t)
    after = c.stats()
    rows = [r for b in batches for r in decode_rows(b)]
    payload = sum(r[4] for r in rows)
    assert [r[0] for r in rows] == ids and all(r[5] for r in rows)
    assert payload == 20 * 3 * 64 * 64
    assert after["wire_bytes"] - before["wire_bytes"] == client_wire
    assert after["payload_bytes"] - before["payload_bytes"] == payload
    framing = client_wire - payload
    assert 0 < framing < 2048 * len(batches)  # Arrow IPC metadata, offsets, keys, labels, shapes, crcs
    assert client_wire == sum(wire_bytes(b) for b in batches)
    c.close()


def _bad_tickets(name: str) -> list[bytes]:
    good = {"dataset": name, "samples": [0], "ops": []}
    return [
        b"{not json",
        b"[1, 2]",
        json.dumps({**good, "dataset": "nope"}).encode(),
        json.dumps({**good, "dataset": "../etc"}).encode(),
        json.dumps({**good, "dataset": "a/b"}).encode(),
        json.dumps({**good, "ops": [{"op": "explode"}]}).encode(),
        json.dumps({**good, "ops": [{"op": "random_resized_crop", "size": -1}]}).encode(),
        json.dumps({**good, "ops": ["to_uint8_chw"]}).encode(),
        json.dumps({**good, "samples": [10**9]}).encode(),
        json.dumps({**good, "samples": [-1]}).encode(),
        json.dumps({**good, "extra": 1}).encode(),
        json.dumps({"dataset": name}).encode(),
        json.dumps({**good, "batch_size": 0}).encode(),
        b"x" * (MAX_TICKET_BYTES + 1),
    ]


def test_burst_of_bad_requests_then_a_good_one(cluster, store):
    ep = cluster.spec.nodes[0]
    name = Manifest.load(store).name
    client = flight.FlightClient(ep.uri)
    messages = []
    for raw in _bad_tickets(name):
        with pytest.raises(flight.FlightError) as info:
            client.do_get(flight.Ticket(raw)).read_all()
        messages.append(str(info.value))
    expected = ["not valid JSON", "must be a JSON object", "unknown dataset 'nope'", "must match",
                "must match", "unknown op 'explode'", "size", "takes image", "out of range",
                "greater than or equal to 0", "extra", "exactly one of 'samples'", "batch_size",
                "the limit is"]
    for msg, want in zip(messages, expected):
        assert want in msg, (want, msg)
    with pytest.raises(flight.FlightError, match="unknown action"):
        list(client.do_action(flight.Action("rm -rf", b"")))
    with pytest.raises(flight.FlightError, match="shutdown is not allowed"):
        list(client.do_action(flight.Action("shutdown", b"")))
    # a client that disconnects mid-stream
    ids = _ids_on(store, ep.node)
    reader = client.do_get(flight.Ticket(Ticket(dataset=name, samples=ids, ops=PIPE.to_json()[:2],
                                                batch_size=1).encode()))
    reader.read_chunk()
    reader.cancel()
    client.close()
    # still serving, and correct
    c = NodeClient(ep.uri, node=ep.node)
    batches, _ = c.get(Ticket(dataset=name, samples=ids[:3], ops=[]))
    assert [r[0] for b in batches for r in decode_rows(b)] == ids[:3]
    assert c.stats()["bad_requests"] >= len(expected)
    c.close()


def test_node_serving_samples_it_does_not_hold(cluster, store, image_folder, tmp_path):
    from nearstore.store import ingest

    # 2 replicas on 2 nodes: every node holds everything
    assert all(NodeClient(ep.uri).health()["shards_held"] == len(Manifest.load(store).shards)
               for ep in cluster.spec.nodes)
    single = tmp_path / "single"
    ingest(image_folder, single, nodes=2, replicas=1, shard_size=1 << 20)
    with LocalCluster(single, nodes=1) as c:
        ids = _ids_on(single, 1)
        cl = NodeClient(c.spec.nodes[0].uri, node=0)
        with pytest.raises(NodeRequestError, match="which node 0 does not hold"):
            cl.get(Ticket(dataset=Manifest.load(single).name, samples=ids[:1]))
        cl.close()


def test_link_cap_is_respected(store):
    """Capped at 2 MB/s per node: measured rate within 10% of the cap over a transfer of ~3 s."""
    with LocalCluster(store, nodes=1, link_mbps=2.0) as c:
        ep = c.spec.nodes[0]
        cl = NodeClient(ep.uri, node=0)
        name = Manifest.load(store).name
        ids = _ids_on(store, 0)
        cl.get(Ticket(dataset=name, samples=ids[:2], batch_size=1))  # warm the bucket's clock
        time.sleep(0.5)
        t0 = time.perf_counter()
        batches, nbytes = cl.get(Ticket(dataset=name, samples=ids[:48], batch_size=1))
        dt = time.perf_counter() - t0
        rate = nbytes / dt
        assert nbytes > 3_000_000
        assert 0.9 * 2e6 <= rate <= 1.1 * 2e6, rate
        cl.close()


def test_loader_at_a_down_node_names_endpoint_and_fix(store):
    spec = ClusterSpec(dataset="x", nodes=[NodeEndpoint(node=0, uri="grpc://127.0.0.1:1")])
    with pytest.raises(NodeUnavailableError, match="node 0 at grpc://127.0.0.1:1 is not answering.*nearstore up"):
        Loader(cluster=spec, pipeline=PIPE, split="node")


def test_token_required_when_set(store):
    with LocalCluster(store, nodes=1, token="s3cret") as c:
        ep = c.spec.nodes[0]
        with pytest.raises(NodeRequestError, match="missing or wrong token"):
            NodeClient(ep.uri, node=0).health()
        with pytest.raises(NodeRequestError, match="missing or wrong token"):
            NodeClient(ep.uri, node=0, token="wrong").health()
        assert NodeClient(ep.uri, node=0, token="s3cret").health()["ok"]
        with Loader(cluster=c, pipeline=PIPE, split="node", batch_size=16) as ld:
            assert np.concatenate([b.ids for b in ld]).size == 48


def test_bench_cluster_with_emulated_accelerator(cluster, tmp_path):
    from nearstore.bench.accel import step_time_for

    assert step_time_for("h100", "resnet50", 400) == pytest.approx(0.224)
    assert step_time_for("A100", "ResNet50", 200) == pytest.approx(0.2175)
    with pytest.raises(ValueError, match="unknown accelerator 'tpu9'; known: a100, h100"):
        step_time_for("tpu9", "resnet50", 4)
    cluster.spec.save(tmp_path / "cluster.json")
    r = subprocess.run([sys.executable, "-m", "nearstore.cli.main", "bench", "--cluster",
                        str(tmp_path / "cluster.json"), "--split", "node", "--accel", "h100", "--batch-size", "8",
                        "--samples", "24", "--json", str(tmp_path / "acc.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "acc.json").read_text())
    assert res["step_time"] == pytest.approx(0.224 * 8 / 400)
    assert res["samples"] >= 24 and 0 < res["au"] <= 1
    assert res["bytes_per_sample"] > 0 and res["link_utilization"] is not None
    assert res["accelerator"] == {"name": "h100", "model": "resnet50"}


# -- worker processes ------------------------------------------------------------------
def _worker_pids(ep) -> list[int]:
    c = NodeClient(ep.uri, node=ep.node)
    h = c.health()
    c.close()
    assert h["worker_kind"] == "process"
    return h["worker_pids"]


def test_nodes_run_ops_on_worker_processes(cluster):
    import psutil

    for ep in cluster.spec.nodes:
        pids = _worker_pids(ep)
        assert len(set(pids)) == 2 and ep.pid not in pids
        assert all(psutil.pid_exists(p) for p in pids)
        c = NodeClient(ep.uri, node=ep.node)
        batches, _ = c.get(Ticket(dataset=cluster.spec.dataset, ranges=[[0, 1]], ops=PIPE.to_json()[:2]))
        c.close()
        assert batches and _worker_pids(ep) == pids  # the same processes serve request after request
        for pid in pids:  # workers keep freed read buffers mapped for reuse (the server calls mallopt itself)
            env = psutil.Process(pid).environ()
            assert {k: env.get(k) for k in MALLOC_ENV} == MALLOC_ENV


def test_thread_workers_give_the_same_bits(store, cluster):
    with Loader(cluster=cluster, pipeline=PIPE, split="node", batch_size=8, seed=3) as ld:
        want = digest(ld)
    with LocalCluster(store, worker_kind="thread") as threads, Loader(
            cluster=threads, pipeline=PIPE, split="node", batch_size=8, seed=3) as ld:
        h = NodeClient(threads.spec.nodes[0].uri, node=0).health()
        assert h["worker_kind"] == "thread" and h["worker_pids"] == [threads.spec.nodes[0].pid]
        assert digest(ld) == want


def test_a_dead_idle_worker_is_replaced_and_a_killed_node_takes_its_workers_with_it(store):
    """One node's life: a worker SIGKILLed while idle is replaced before the next request; then the node is
    SIGKILLed and every worker process (the replacement too) goes with it."""
    import os
    import signal

    import psutil

    with LocalCluster(store, nodes=1) as c:
        ep = c.spec.nodes[0]
        old = _worker_pids(ep)
        os.kill(old[0], signal.SIGKILL)
        time.sleep(0.5)
        client = NodeClient(ep.uri, node=ep.node)
        ids = _ids_on(store, 0)[:6]
        batches, _ = client.get(Ticket(dataset=c.spec.dataset, samples=ids, ops=PIPE.to_json()[:2], batch_size=2))
        assert [r.sample for b in batches for r in decode_rows(b)] == ids
        h = client.health()
        assert h["worker_restarts"] == 1 and not set(h["worker_pids"]) & set(old)
        client.close()
        pids = h["worker_pids"]
        c.kill(0)
        deadline = time.monotonic() + 10
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            assert time.monotonic() < deadline, "worker processes outlived their SIGKILLed node"
            time.sleep(0.1)


def test_a_worker_killed_mid_epoch_costs_a_failover_not_a_sample(store):
    """SIGKILL one worker of node 0 while it serves: the loader re-asks node 1 (a replica), same bits."""
    import os
    import signal

    with Loader(store, pipeline=PIPE, batch_size=4, seed=9) as local:
        want = digest(local)
    with LocalCluster(store, slowdown=10.0, workers_per_node=1) as c, Loader(
            cluster=c, pipeline=PIPE, split="node", batch_size=4, seed=9) as ld:
        ld.source.retry_after = 0.5
        victim = _worker_pids(c.spec.nodes[0])[0]
        h = hashlib.sha256()
        for i, b in enumerate(ld):
            h.update(b.data.tobytes())
            h.update(b.labels.tobytes())
            if i == 0:  # the next batches are in flight: node 0's only worker is running one of them now
                os.kill(victim, signal.SIGKILL)
        assert h.hexdigest() == want
        failovers = ld.source.stats()["failovers"]
        assert failovers and failovers[0]["node"] == 0 and "worker process died" in failovers[0]["error"]
        h = NodeClient(c.spec.nodes[0].uri, node=0).health()
        assert h["worker_restarts"] == 1 and victim not in h["worker_pids"]


def test_slowdown_makes_ops_take_that_many_times_their_cpu_time(store):
    """--slowdown models a slower CPU: ops take slowdown x the CPU they used, the rest idle and reported;
    waiting inside an op (what contention from other processes looks like from inside) is not multiplied."""
    from nearstore.node.workers import NodeWork
    from nearstore.ops.base import Op, register, unregister

    @register
    class _Wait(Op):
        name = "test_wait_50ms"
        inputs = ("image",)

        def declare(self, spec):  # noqa: ANN001, ANN202
            return spec.costless()

        def __call__(self, x, rng):  # noqa: ANN001, ANN204
            time.sleep(0.05)
            return x

    work = NodeWork(store / "node-000", slowdown=40.0)
    try:
        ids = [s.first for i, s in enumerate(work.store.manifest.shards) if work.store.holds(i)][:2]
        t0 = time.thread_time()
        _, plain = work.rows(["decode_jpeg"], ids, 0, 0)
        cpu = time.thread_time() - t0
        work.slowdown = 3.0
        _, waits = work.rows(["decode_jpeg", "test_wait_50ms"], ids, 0, 0)
        # a batch whose CPU time contention inflated (2x) is charged the chain's usual cost per sample
        charged = [work._charged_cpu("chain", per * 8, 8) for per in (0.010, 0.011, 0.010, 0.012, 0.020)]
    finally:
        work.close()
        unregister("test_wait_50ms")
    # two decodes: 40 x their CPU time (the reads around them are not ops)
    assert 0 < plain["slowdown_seconds"] and sum(plain["op_seconds"].values()) <= 40 * cpu + 1e-3
    # 100 ms of waiting already exceeds 3 x the decodes' CPU: nothing to add (scaling measured time added 200 ms)
    assert waits["slowdown_seconds"] < 0.05 and sum(waits["op_seconds"].values()) >= 2 * 0.05
    assert charged[0] == pytest.approx(0.08) and charged[-1] == pytest.approx(0.08)


def test_worker_slots_lease_reuse_and_oversized_batches(store):
    """White box: a batch too big for a slot comes back by pickle and grows the slots; a batch read from a
    slot holds it until the batch is gone; the bits equal the thread path's."""
    import gc
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker

    from nearstore.node.workers import NodeWork, WorkerPool

    work = NodeWork(store / "node-000")
    ops, ids = PIPE.to_json()[:2], _ids_on(store, 0)[:16]
    threads = WorkerPool(work, workers=1, kind="thread")
    want = [threads.result(threads.submit(ops, ids[i:i + 8], 1, 0))[0] for i in (0, 8)]
    threads.close()
    pool = WorkerPool(work, workers=2)
    try:
        slots = pool._slots
        slots.size = 1024  # smaller than any batch of these
        first, _ = pool.result(pool.submit(ops, ids[:8], 1, 0))
        assert slots.size > 1024 and slots.blocks == 0  # came back by pickle; the small slot was dropped
        second, _ = pool.result(pool.submit(ops, ids[8:], 1, 0))
        assert slots.blocks == 1 and slots.idle == 0  # in a slot, which the batch still holds
        assert first.equals(want[0]) and second.equals(want[1])
        del second
        gc.collect()
        assert slots.idle == 1  # given back once the batch was gone
        again, _ = pool.result(pool.submit(ops, ids[8:], 1, 0))
        assert again.equals(want[1]) and slots.blocks == 1  # the same slot, reused
        del again
    finally:
        pool.close()
        work.close()
        del pool, slots
        gc.collect()  # the workers' start barrier releases its semaphore before the tracker goes
        # this test's own forkserver and resource tracker (a node's die with the node)
        multiprocessing.forkserver._forkserver._stop()
        multiprocessing.resource_tracker._resource_tracker._stop()
