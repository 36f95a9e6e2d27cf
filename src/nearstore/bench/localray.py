"""A multi-node Ray cluster on this one machine, for tests and benchmarks: each Ray node stands for a storage host
and declares the node directories it holds (``nearstore-node-000``...), as `ray start` does on a real host
(docs/multihost.md). ``stop`` ends exactly the processes this cluster started (found by its temp dir)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(*args: str, temp_dir: str) -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [RAY, "start", "--num-cpus", "1", "--object-store-memory", str(80 << 20), "--node-ip-address",
           "127.0.0.1", "--disable-usage-stats", "--temp-dir", temp_dir, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


__all__ = ["LocalRay"]


class LocalRay:
    """``ray start`` head + one node per entry of ``hosts`` (each a list of node directory numbers)."""

    def __init__(self, hosts: list[list[int]]) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="nsray", dir="/tmp")  # short: Ray's socket paths must fit
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        res = [json.dumps({f"nearstore-node-{n:03d}": 1 for n in h}) for h in hosts]
        try:
            _ray_start("--head", "--port", str(self.port), "--include-dashboard=false", "--resources", res[0],
                       "--dashboard-agent-listen-port", str(_free_port()), temp_dir=self.temp_dir)
            for r in res[1:]:
                _ray_start("--address", self.address, "--resources", r, "--dashboard-agent-listen-port",
                           str(_free_port()), temp_dir=self.temp_dir)
        except BaseException:
            self.stop()
            raise

    def processes(self) -> list[psutil.Process]:
        """This cluster's daemons (every process whose command line names its temp dir) and their children
        (agents and workers retitle themselves `ray::...`)."""
        out: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            if p.pid != os.getpid() and any(self.temp_dir in a for a in (p.info["cmdline"] or [])):
                out[p.pid] = p
                try:
                    out.update((c.pid, c) for c in p.children(recursive=True))
                except psutil.Error:
                    pass
        return list(out.values())

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
