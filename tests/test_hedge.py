"""Hung nodes (issue 15): a node stopped with SIGSTOP (its workers too) costs a bounded stall, not a timeout.

Real node processes, really stopped; the loader hedges to the replica, and takes the node back when it
answers again.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import psutil
import pytest

from nearstore import Loader, standard_train
from nearstore.bench.faults import batch_digests
from nearstore.core.errors import ConfigError
from nearstore.node.client import Latencies

pytestmark = pytest.mark.timeout(180)
PIPE = standard_train(64)


def test_hedge_deadline_is_a_floored_high_percentile_times_a_factor():
    lat = Latencies(percentile=90, factor=3, floor=0.2, initial=1.5, cap=1.0, warmup=4)
    assert lat.deadline() == 1.5 and lat.silence() == 1.0  # nothing seen yet: initial (silence: capped)
    for s in (0.01, 0.02, 0.03):
        lat.add(s)
    assert lat.deadline() == 0.2  # warming up: 3 x the largest seen (0.09), floored
    lat.add(0.5)
    assert lat.deadline() == pytest.approx(3 * np.percentile([0.01, 0.02, 0.03, 0.5], 90))
    for s in [0.1] * 20:
        lat.add(s)
    assert lat.deadline() == pytest.approx(0.3)
    for s in [4.0] * 20:
        lat.add(s)
    assert lat.deadline() == 12.0  # latency: no cap (a slow link makes every request slow)
    with pytest.raises(ConfigError, match="percentile"):
        Latencies(percentile=20)
    with pytest.raises(ConfigError, match="cap >= floor"):
        Latencies(floor=1.0, cap=0.5)


# a node working through a queue of 4 prefetched requests (sent at 0), 0.1 s each, then one request sent
# every 0.1 s and answered 0.4 s later (each waits for the 3 before it): (sent, answered), one record batch each
QUEUE = [(0.0, 0.1), (0.0, 0.2), (0.0, 0.3), (0.0, 0.4)] + [(0.1 * k, 0.1 * k + 0.4) for k in range(1, 7)]


@pytest.mark.parametrize("warm", [False, True])
def test_a_busy_node_is_hedged_after_a_few_silent_gaps_not_a_few_queued_latencies(warm):
    lat = Latencies(percentile=95, factor=2, floor=0.05, initial=1.0, cap=1.0, warmup=8)
    seen = QUEUE if warm else QUEUE[:3]
    for sent, done in seen:
        lat.progress(0, sent, now=done)
        lat.add(done - sent)
    last = seen[-1][1]
    # latencies are 0.1-0.4 s (each request waited for the ones queued before it); the gaps 0.1 s
    assert lat.silence() == pytest.approx(0.2)
    assert lat.deadline() == pytest.approx(0.8 if warm else 0.6)
    # a request sent before the node's last progress is due 2 gaps after that progress; one sent later, 2 gaps
    # after it was sent; neither later than its latency deadline
    assert lat.due(0, last - 0.3) == pytest.approx(last + 0.2)
    assert lat.due(0, last + 1.0) == pytest.approx(last + 1.2)
    # another node's clock is its own: no progress there yet, so from when its request was sent
    assert lat.due(1, 5.0) == pytest.approx(5.2)
    # the cap bounds the silence clock however long the gaps were; the latency clock is not capped
    for k in range(10):
        lat.progress(0, 0.0, now=100.0 + k)
        lat.add(9.0)
    assert lat.silence() == 1.0 and lat.deadline() == 18.0 and lat.due(0, 200.0) == pytest.approx(201.0)


def stop_node(pid: int, sig: int) -> list[int]:
    """Send ``sig`` to a node process and every process under it (its forkserver and workers)."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for p in procs:
        os.kill(p.pid, sig)
    return [p.pid for p in procs]


def test_sigstopped_node_costs_a_bounded_stall_and_is_used_again(cluster):
    c = cluster  # the shared cluster: a SIGSTOP is undone by the SIGCONT below, whatever happens
    with Loader(cluster=c, pipeline=PIPE, split="node", batch_size=4, seed=3) as ld:
        ld.source.retry_after = 0.2
        clean, clean_waits = batch_digests(ld)
        stopped: list[int] = []

        def hook(i: int) -> None:
            if i == 5:
                stopped.extend(stop_node(c.procs[0].pid, signal.SIGSTOP))

        try:
            ld.epoch = 0
            faulty, waits = batch_digests(ld, epoch_hook=hook)
            stats = ld.source.stats()
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        sent_by_0 = ld.source.wire_by_node[0]
        deadline = time.monotonic() + 20
        while ld.source.stats()["slow"] and time.monotonic() < deadline:
            time.sleep(0.1)  # the prober finds it answering again
        ld.epoch = 0
        again, _ = batch_digests(ld)
        after = ld.source.stats()
    keys = [k for ks, _ in faulty for k in ks]
    assert stopped and faulty == clean and again == clean  # every sample once, the same bits
    assert len(keys) == len(set(keys)) == 48
    median = float(np.median(clean_waits))
    stall = max(waits[6:]) - median
    print(f"hung node: extra stall {stall:.3f} s, median batch {median:.3f} s, hedges {stats['hedges']}")
    # bench/reliability.py records the figure (<= max(1 s, 3x median batch)); here only that the stall is
    # bounded by the hedge deadlines (2 s at most when node 0 goes silent), far below the 120 s request
    # timeout that bounded it before
    assert stall < 5.0, (stall, median, stats["hedges"])
    assert stats["hedges"] and all(h["node"] == 0 for h in stats["hedges"])
    assert any(h.get("won") == "hedge" for h in stats["hedges"])
    assert 0 in stats["slow"] and not after["slow"]
    assert any(e["node"] == 0 and e.get("was") == "slow" for e in after["rejoined"])
    assert ld.source.wire_by_node[0] > sent_by_0  # node 0 serves again
