"""The long runs (``pytest -m long``; `make test` skips them): the chaos soak, the long fuzzers, fairness
over 30 s, and a rebalance 3 -> 4 -> 2 while a loader reads.

They are the same harnesses bench/reliability.py records figures from (`docs/reliability.md`); here
they run as tests, so a failure names the guarantee that broke.
"""

from __future__ import annotations

import pytest

from nearstore import standard_train
from nearstore.bench.faults import (chaos_run, copy_store, fuzz_readers, fuzz_tickets, load_run,
                                    rebalance_while_reading)
from nearstore.node import LocalCluster
from nearstore.store import Manifest
from nearstore.store.ingest import ingest
from nearstore.store.synth import SynthSpec, synth_folder

pytestmark = [pytest.mark.long, pytest.mark.timeout(3600)]


def test_chaos_soak_ten_minutes(tmp_path):
    synth_folder(tmp_path / "img", SynthSpec(n=240, seed=31, classes=8), workers=2)
    ingest(tmp_path / "img", tmp_path / "store", nodes=3, replicas=2, shard_size=256 << 10)
    r = chaos_run(tmp_path / "store", tmp_path, seconds=600, seed=0, step_s=0.3, verify_s=120.0)
    assert r["errors"] == 0, [x["errors"] for x in r["loaders"]]
    assert r["lost"] == 0 and r["duplicated"] == 0 and r["differing"] == 0
    assert r["final_scrub_clean"] and r["flips_found"] == r["flipped"]
    assert all(r["faults"][k] >= 1 for k in ("SIGKILL", "SIGSTOP", "flipped bytes", "rebalance"))


def test_ten_thousand_fuzzed_tickets(store):
    man = Manifest.load(store)
    with LocalCluster(store, nodes=1) as c:
        r = fuzz_tickets(c.spec.nodes[0].uri, man.name, man.num_samples, cases=10_000, seed=7)
        assert c.procs[0].poll() is None
    assert r["crashes"] == 0 and r["good_request_after"], r["examples"]


def test_fifteen_hundred_damaged_store_files(store, tmp_path):
    r = fuzz_readers(copy_store(store, tmp_path / "s"), cases=1500, seed=4)
    assert r["crashes"] == 0 and r["wrong"] == 0, r["examples"]


def test_eight_loaders_for_thirty_seconds_share_fairly(store):
    """The bound docs/reliability.md states: equal loaders' samples/s within 1.5x (fastest / slowest)."""
    with LocalCluster(store) as c:
        r = load_run(c, loaders=8, seconds=30)
    assert not r["errors"], r["errors"]
    assert r["max_over_min"] <= 1.5, r["samples_per_s"]


def test_rebalance_3_to_4_to_2_while_a_loader_reads(image_folder, tmp_path):
    """The figure of issue 15 (make test runs 2 -> 3 -> 2: tests/test_rebalance.py)."""
    ingest(image_folder, tmp_path / "s", nodes=3, replicas=2, shard_size=300_000)
    with LocalCluster(tmp_path / "s") as c:
        r = rebalance_while_reading(c, standard_train(64), [4, 2], batch_size=4, seed=3, step_s=0.05)
    assert not r["errors"], r["errors"]
    assert r["epochs_read"] >= 3
    assert r["lost"] == 0 and r["duplicated"] == 0 and r["differing_batches"] == 0
    assert r["last_placement_epoch"] == 4 and Manifest.load(tmp_path / "s").nodes == 2
