"""Shared fixtures: small real datasets made by the synth generator, and a leak check.

Every test runs under ``no_leaks``: a test that leaves a child process or a
non-daemon thread behind fails.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from nearstore.node import LocalCluster
from nearstore.store.ingest import ingest
from nearstore.store.synth import SynthSpec, synth_folder


_SHARED: list[LocalCluster] = []  # clusters of session/module fixtures (see ``shared``)


def _shared_pids() -> set[int]:
    """The node processes of shared clusters and every process under them (a node restarted by a test too)."""
    pids: set[int] = set()
    for c in _SHARED:
        for proc in c.procs:
            try:
                pids |= {proc.pid, *(x.pid for x in psutil.Process(proc.pid).children(recursive=True))}
            except psutil.NoSuchProcess:
                pass
    return pids


@pytest.fixture(autouse=True)
def no_leaks():
    before_threads = {t.ident for t in threading.enumerate()}
    me = psutil.Process()
    before_children = {p.pid for p in me.children(recursive=True)}
    yield
    deadline = time.monotonic() + 5
    while True:
        threads = [t for t in threading.enumerate() if t.ident not in before_threads and t.is_alive()
                   and not t.daemon]
        shared = _shared_pids()
        children = [p for p in me.children(recursive=True) if p.pid not in before_children and p.is_running()
                    and p.status() != psutil.STATUS_ZOMBIE and p.pid not in shared]
        if not threads and not children:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"test leaked threads {[t.name for t in threads]} / child processes "
                        f"{[(p.pid, p.name()) for p in children]}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """48 ImageNet-like JPEGs in 4 class folders."""
    out = tmp_path_factory.mktemp("images")
    synth_folder(out, SynthSpec(n=48, seed=7, classes=4), workers=1)
    return out


@pytest.fixture(scope="session")
def store(tmp_path_factory, image_folder) -> Path:
    """The 48 images in a store on 2 nodes, 2 replicas, several small shards (read-only for tests)."""
    path = tmp_path_factory.mktemp("store") / "s"
    ingest(image_folder, path, nodes=2, replicas=2, shard_size=1 << 20)
    return path


@contextmanager
def shared(c: LocalCluster) -> Iterator[LocalCluster]:
    """Share a cluster between tests (a session or module fixture): its node processes, and nodes a test
    restarts in it, are not that test's leaks. A cluster start costs seconds (every node's worker forkserver
    imports torch), the largest cost of the live tests."""
    _SHARED.append(c)
    try:
        with c:
            yield c
    finally:
        _SHARED.remove(c)


@pytest.fixture(scope="session")
def share():
    """``with share(LocalCluster(...)) as c:`` in a module fixture: see ``shared``."""
    return shared


@pytest.fixture(scope="session")
def cluster(store) -> Iterator[LocalCluster]:
    """A 2-node cluster (default options) serving ``store``, for tests that read through it, or stop or kill
    a node and bring it back before they end (SIGCONT, ``restart``). Tests that reconfigure nodes or serve
    another store start their own."""
    with shared(LocalCluster(store)) as c:
        yield c


@pytest.fixture
def fresh_store(tmp_path, image_folder) -> Path:
    """A private copy a test may damage."""
    path = tmp_path / "store"
    ingest(image_folder, path, nodes=2, replicas=1, shard_size=1 << 20)
    return path
