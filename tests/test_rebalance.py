"""Grow and shrink (issue 15): rebalance 3 -> 4 -> 2 nodes while a loader reads, online and crash-safe."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nearstore import Loader, standard_train
from nearstore.bench.faults import batch_digests, copy_store, rebalance_while_reading
from nearstore.loader.order import epoch_order
from nearstore.node import LocalCluster
from nearstore.store import Manifest, Store
from nearstore.store.ingest import ingest
from nearstore.store.manifest import node_dir_name, placement
from nearstore.store.rebalance import rebalance
from nearstore.store.scrub import scrub

pytestmark = pytest.mark.timeout(240)
PIPE = standard_train(64)


@pytest.fixture(scope="module")
def store3(tmp_path_factory, image_folder):
    path = tmp_path_factory.mktemp("s3") / "s"
    ingest(image_folder, path, nodes=3, replicas=2, shard_size=300_000)
    return path


def all_samples(store) -> list[tuple[str, bytes]]:
    st = Store(store)
    try:
        return [(st.read(i)[1].key, bytes(st.read(i)[0])) for i in range(len(st))]
    finally:
        st.close()


def test_epoch_order_does_not_depend_on_placement(store3, tmp_path):
    copy = copy_store(store3, tmp_path / "s")
    before = Manifest.load(copy)
    rebalance(copy, 4, grace=0)
    after = Manifest.load(copy)
    assert after.nodes == 4 and after.placement_epoch == 2 and after.shards != before.shards
    assert after.fingerprint == before.fingerprint
    for e in range(3):
        assert np.array_equal(epoch_order(after.num_samples, seed=0, epoch=e, fingerprint=after.fingerprint),
                              epoch_order(before.num_samples, seed=0, epoch=e, fingerprint=before.fingerprint))
    with Loader(store=store3, pipeline=PIPE, batch_size=8, seed=3) as a, \
            Loader(store=copy, pipeline=PIPE, batch_size=8, seed=3) as b:
        assert batch_digests(a)[0] == batch_digests(b)[0]


def test_rebalance_places_every_shard_and_keeps_every_sample(store3, tmp_path):
    copy = copy_store(store3, tmp_path / "s")
    original = all_samples(copy)
    for k in (4, 2, 5, 1, 3):
        r = rebalance(copy, k, replicas=min(2, k), grace=0)  # back up from 1 node: replicas asked for
        man = Manifest.load(copy)
        assert man.nodes == k and man.replicas == min(2, k) and r.nodes_after == k
        for i, e in enumerate(man.shards):
            assert e.nodes == placement(i, nodes=k, replicas=min(2, k))
        assert sorted(p.name for p in copy.glob("node-*")) == [node_dir_name(n) for n in range(k)]
        assert all_samples(copy) == original
        assert scrub(copy).clean  # every copy the manifest names is there and whole, and no others


KILL = """
import sys
from nearstore.store.rebalance import rebalance
rebalance(sys.argv[1], int(sys.argv[2]), grace=0.2)
"""


def test_rebalance_killed_at_any_moment_leaves_a_readable_store_and_a_rerun_finishes(store3, tmp_path):
    copy = copy_store(store3, tmp_path / "s")
    original = all_samples(copy)
    for target, delay in ((4, 0.5), (2, 1.0)):
        p = subprocess.Popen([sys.executable, "-c", KILL, str(copy), str(target)])
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert all_samples(copy) == original  # whatever state the kill left serves every sample
    rebalance(copy, 2, grace=0)
    assert Manifest.load(copy).nodes == 2 and scrub(copy).clean and all_samples(copy) == original


def test_rebalance_2_to_3_to_2_while_a_loader_reads(store, tmp_path):
    """The live smoke test of an online rebalance (growing, then shrinking: a server started and one stopped);
    3 -> 4 -> 2 runs with the long runs (tests/test_long.py) and in bench/reliability.py."""
    copy = copy_store(store, tmp_path / "s")
    with LocalCluster(copy) as c:
        r = rebalance_while_reading(c, PIPE, [3, 2], batch_size=4, seed=3, step_s=0.05, settle_s=0.3)
    assert not r["errors"], r["errors"]
    assert r["epochs_read"] >= 2
    assert r["lost"] == 0 and r["duplicated"] == 0 and r["differing_batches"] == 0
    assert r["last_placement_epoch"] == Manifest.load(copy).placement_epoch and Manifest.load(copy).nodes == 2
    assert all(r["copies_made"]) and all(r["copies_removed"])
