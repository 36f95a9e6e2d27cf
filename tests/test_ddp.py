"""The torchrun example: 2 ranks (gloo, CPU) over a real cluster, the whole job SIGKILLed mid-epoch, then
resumed from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import nearstore
from nearstore.node import LocalCluster

pytestmark = pytest.mark.timeout(240)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_ddp.py"


def torchrun(tmp: Path, cluster: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE),
           "--cluster", str(cluster), "--ckpt", str(tmp / "ckpt"), "--epochs", "1", "--batch-size", "4",
           "--save-every", "2", "--log-ids", str(tmp), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def records(tmp: Path, rank: int) -> list[dict]:
    path = tmp / f"rank-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_torchrun_killed_mid_epoch_resumes_with_exactly_the_rest(store, tmp_path):
    with LocalCluster(store, workers_per_node=1) as c:
        c.spec.save(tmp_path / "cluster.json")
        job = torchrun(tmp_path, tmp_path / "cluster.json", "--step-sleep", "1.0")
        deadline = time.monotonic() + 120
        # 48 samples, 2 ranks, batch 4: 6 steps; checkpoints after steps 2 and 4. Kill once step 3 is logged.
        while len(records(tmp_path, 1)) < 3 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        tree = psutil.Process(job.pid)
        for p in [tree, *tree.children(recursive=True)]:  # torchrun puts its workers in sessions of their own
            p.send_signal(signal.SIGKILL)
        out = job.communicate(timeout=30)[0]
        first = [records(tmp_path, r) for r in range(2)]
        assert all(3 <= len(f) < 6 for f in first), out
        saved = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=False)["step"]
        assert saved in (2, 4) and saved < len(first[0])

        job = torchrun(tmp_path, tmp_path / "cluster.json")
        out = job.communicate(timeout=180)[0]
        assert job.returncode == 0, out
        assert "epoch 0 done at step 6" in out
    shares = []
    for r in range(2):
        recs = records(tmp_path, r)
        before, after = recs[:len(first[r])], recs[len(first[r]):]
        kept = [x for x in before if x["step"] <= saved]  # what the checkpoint had consumed
        assert [x["step"] for x in after] == list(range(saved + 1, 7))  # exactly the rest, once
        ids = [i for x in kept + after for i in x["ids"]]
        with nearstore.Loader(store, pipeline=["decode_jpeg"], batch_size=4, rank=r, world_size=2) as ref:
            assert ids == ref.share(0).tolist()  # this rank's share, in order, nothing repeated or skipped
        shares.append(ids)
    assert len(shares[0]) == len(shares[1]) == 24
    assert sorted(shares[0] + shares[1]) == list(range(48))  # disjoint, equal, union is the epoch
