"""Scrub and repair (issue 15): damaged copies found, repaired crash-safely, while readers read."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from nearstore import Loader, standard_train
from nearstore.bench.faults import batch_digests, copy_store, flip_bytes, scrub_found_every_flip
from nearstore.node import LocalCluster
from nearstore.store import Manifest, Store
from nearstore.store.manifest import MANIFEST_NAME, node_dir_name
from nearstore.store.scrub import scrub

pytestmark = pytest.mark.timeout(240)
PIPE = standard_train(64)


def sample_crcs(store) -> list[tuple[str, int]]:
    """(key, crc32c) of every sample as read (and verified) from ``store``."""
    from nearstore.core.checksum import crc32c

    st = Store(store)
    try:
        return [(st.read(i)[1].key, crc32c(st.read(i)[0])) for i in range(len(st))]
    finally:
        st.close()


def test_scrub_finds_every_flipped_byte_and_repair_restores_every_sample(store, tmp_path):
    original = sample_crcs(store)
    copy = copy_store(store, tmp_path / "s")
    flips = flip_bytes(copy, 40, seed=4)
    (copy / node_dir_name(1) / MANIFEST_NAME).write_text("{}")  # and a node's manifest copy
    first = scrub(copy)
    found = scrub_found_every_flip(first, flips)
    assert found["found"] == 40, (found, [d for d in first.damage])
    assert any(d.kind == "manifest" and d.node == 1 for d in first.damage)
    assert {d.kind for d in first.damage} >= {"samples", "manifest"} and not first.repaired
    fixed = scrub(copy, repair=True)
    assert fixed.repaired > 0 and not fixed.unrepairable and all(d.repaired for d in fixed.damage)
    again = scrub(copy)
    assert again.clean, again.damage
    assert sample_crcs(copy) == original
    for f in copy.rglob("*.tmp"):
        raise AssertionError(f"left a temp file {f}")


def test_scrub_reports_missing_copies_and_repair_restores_them(store, tmp_path):
    copy = copy_store(store, tmp_path / "s")
    entry = Manifest.load(copy).shards[1]
    (copy / node_dir_name(entry.nodes[0]) / f"{entry.name}.tar").unlink()
    (copy / node_dir_name(entry.nodes[1]) / f"{entry.name}.idx.arrow").unlink()
    r = scrub(copy)
    assert sorted(d.kind for d in r.damage) == ["missing", "missing"]
    assert scrub(copy, repair=True).repaired == 2 and scrub(copy).clean


def test_scrub_cli_json_and_exit_codes(store, tmp_path):
    copy = copy_store(store, tmp_path / "s")
    flip_bytes(copy, 3, seed=1, index_share=0.0)
    run = lambda *a: subprocess.run([sys.executable, "-m", "nearstore.cli.main", "scrub", str(copy), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    r = run("--json", str(tmp_path / "a.json"))
    assert r.returncode == 1 and "damaged" in r.stdout, r.stdout + r.stderr
    assert len(json.loads((tmp_path / "a.json").read_text())["damage"]) >= 1
    assert run("--repair").returncode == 0
    r = run()
    assert r.returncode == 0 and "clean" in r.stdout


REPAIR_LOOP = """
import sys
from nearstore.store.scrub import scrub
scrub(sys.argv[1], repair=True)
"""


def test_repair_killed_at_any_moment_leaves_a_readable_store(store, tmp_path):
    original = sample_crcs(store)
    copy = copy_store(store, tmp_path / "s")
    flip_bytes(copy, 24, seed=20, index_share=0.2)
    for delay in (0.1, 0.5, 1.0):  # each run gets further before the kill
        p = subprocess.Popen([sys.executable, "-c", REPAIR_LOOP, str(copy)])
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert sample_crcs(copy) == original  # every sample still reads, verified (from a good copy)
    scrub(copy, repair=True)
    assert scrub(copy).clean


def test_scrub_and_repair_through_the_nodes_while_a_loader_reads(store, tmp_path):
    """Damage under a running cluster: loaders get replicas' copies; the nodes find and repair it (no shell
    access needed), pick up the repaired files, and the local scrub agrees."""
    from nearstore.node.maintenance import scrub_cluster

    original = sample_crcs(store)
    copy = copy_store(store, tmp_path / "s")
    with Loader(store=copy, pipeline=PIPE, batch_size=8, seed=3) as ld:
        reference = batch_digests(ld)[0]
    flips = flip_bytes(copy, 12, seed=5, index_share=0.25)
    expected = scrub(copy)
    assert scrub_found_every_flip(expected, flips)["found"] == 12
    with LocalCluster(copy) as c:
        with Loader(cluster=c, pipeline=PIPE, split="node", batch_size=8, seed=3) as ld:
            assert batch_digests(ld)[0] == reference  # nodes map the damaged files; replicas cover
            found = scrub_cluster(c.spec)
            assert {(d["node"], d["shard"]) for d in found["damage"]} == {
                (d.node, d.file.split("/")[1].split(".")[0]) for d in expected.damage}
            fixed = scrub_cluster(c.spec, repair=True)
            assert fixed["repaired"] == len(found["damage"]) and not fixed["unrepairable"], fixed
            assert scrub_cluster(c.spec)["clean"]
            refetched = ld.source.stats()["refetched"]
            ld.epoch = 0
            assert batch_digests(ld)[0] == reference
            # the nodes picked up the repaired files: no sample needed a replica this time
            assert ld.source.stats()["refetched"] == refetched
    assert scrub(copy).clean and sample_crcs(copy) == original
