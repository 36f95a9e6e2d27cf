"""Shared fixtures: small real datasets made by the synth generator, and a leak check.

Every test runs under ``no_leaks``: a test that leaves a child process or a
non-daemon thread behind fails.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest

from nearstore.store.ingest import ingest
from nearstore.store.synth import SynthSpec, synth_folder


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
        children = [p for p in me.children(recursive=True) if p.pid not in before_children and p.is_running()
                    and p.status() != psutil.STATUS_ZOMBIE]
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


@pytest.fixture
def fresh_store(tmp_path, image_folder) -> Path:
    """A private copy a test may damage."""
    path = tmp_path / "store"
    ingest(image_folder, path, nodes=2, replicas=1, shard_size=1 << 20)
    return path
