"""Storage nodes as Ray actors on a multi-node Ray cluster started on this machine (real `ray start` nodes,
real actor kills)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from nearstore import Loader, standard_train
from nearstore.node.client import NodeClient, NodeRequestError
from nearstore.node.cluster import ClusterSpec
from nearstore.node.ray import PlacementError, RayCluster, RayExtraMissingError, resource_name, start_ray_cluster
from nearstore.store import ingest

from nearstore.bench.localray import LocalRay

ray = pytest.importorskip("ray")  # the [ray] extra; `make test` installs it

pytestmark = pytest.mark.timeout(240)
PIPE = standard_train(64)


@pytest.fixture(scope="module")
def local_ray():
    """Two Ray nodes standing for two storage hosts: one holds node-000, the other node-001."""
    cluster = LocalRay([[0], [1]])
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.stop()


def digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(b.data.tobytes())
        h.update(b.labels.tobytes())
    return h.hexdigest()


def test_actors_on_their_hosts_survive_a_kill_mid_epoch(store, local_ray):
    with Loader(store, pipeline=PIPE, batch_size=4, seed=2) as local:
        want = [digest(local) for _ in range(4)]
    with RayCluster(store, local_ray.address, workers_per_node=1, slowdown=4.0, token="s3cret") as rc:
        with pytest.raises(NodeRequestError, match="token"):  # Flight as before: the token is required
            NodeClient(rc.spec.nodes[0].uri, node=0).health()
        # hard placement: each actor runs on the Ray node declaring its directory
        hosts = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        for n in range(2):
            assert resource_name(n) in hosts[rc.actor_info(n)["ray_node"]]
        with Loader(cluster=rc, pipeline=PIPE, split=2, batch_size=4, seed=2) as ld:
            ld.source.retry_after = 0.2
            it = iter(ld)
            got = [next(it)]
            victim = rc.actor_info(0)["pid"]
            old_uri = rc.spec.nodes[0].uri
            os.kill(victim, signal.SIGKILL)  # the actor process dies mid-epoch; Ray restarts it
            got += list(it)
            assert digest(got) == want[0]  # replicas served node 0's samples: same bits
            assert ld.source.stats()["failovers"]
            info = rc.actor_info(0)
            NodeClient(info["uri"], node=0, timeout=30, token="s3cret").health()  # serving at its new endpoint
            assert info["pid"] != victim and info["uri"] != old_uri  # (how fast: bench/multihost.py)
            # the loader learns the new endpoint from Ray in the background (each ask may wait out Ray's 5 s while
            # the actor restarts: on 2 busy CPU cores, longer than 3 short epochs)
            deadline = time.monotonic() + 60
            while ld.source.stats()["endpoints"][0] != info["uri"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert ld.source.stats()["endpoints"][0] == info["uri"], ld.source.stats()
            # the next epochs: node 0 is used again at its new endpoint once a probe finds it answering (each epoch
            # bit-identical)
            used = False
            for epoch in range(1, 4):
                before = ld.source.node_counters()[0][1]
                assert digest(ld) == want[epoch]
                if ld.source.node_counters()[0][1] > before:
                    used = True
                    break
            assert used, ld.source.stats()
            assert ld.source.stats()["rejoined"][0]["node"] == 0


@pytest.mark.long  # ~20 s; make test keeps one live Ray run (the kill test above, which starts the same actors)
def test_up_and_down_from_the_cli(store, local_ray, tmp_path):
    env = {**os.environ, "COLUMNS": "200"}
    cli = [sys.executable, "-m", "nearstore.cli.main"]
    r = subprocess.run([*cli, "up", str(store), "--ray", local_ray.address, "--workers-per-node", "1"],
                       capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    try:
        spec = ClusterSpec.load(store)
        assert spec.ray_address == local_ray.address and [ep.actor for ep in spec.nodes] == [
            f"{spec.dataset}:node-000", f"{spec.dataset}:node-001"]
        with Loader(cluster=spec, pipeline=PIPE, split="node", batch_size=8) as ld:
            assert sum(len(b) for b in ld) == 48
    finally:
        r = subprocess.run([*cli, "down", str(store)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "stopped 2 node actors" in r.stderr, r.stderr
    assert not (store / "cluster.json").exists()
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)} if ray.is_initialized() else set()
    assert not names & {ep.actor for ep in spec.nodes}


def test_a_directory_without_a_host_is_refused_before_anything_starts(image_folder, tmp_path, local_ray):
    store3 = tmp_path / "s3"
    ingest(image_folder, store3, nodes=3, replicas=1, shard_size=1 << 20)
    with pytest.raises(PlacementError, match=r"no host for node directories node-002 .*nothing was started"):
        start_ray_cluster(store3, local_ray.address)
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if "node-00" in a["name"]]


def test_without_ray_the_error_names_the_extra(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without the extra sees on import
    with pytest.raises(RayExtraMissingError, match=r"pip install 'nearstore\[ray\]'"):
        start_ray_cluster(store, "127.0.0.1:1")
