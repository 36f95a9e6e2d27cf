"""Train a small model with DDP (gloo, CPU) on a nearstore cluster, checkpointing the loader with the model.

    nearstore up STORE                                  # or nodes on Ray: nearstore up STORE --ray ADDRESS
    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py --cluster STORE --ckpt ckpt/

Each rank's TorchLoader takes its rank and world size from torch.distributed:
the ranks get disjoint, equal shares of every epoch. Every ``--save-every``
steps rank 0 writes the model, the optimizer and the loader state (all ranks
stand at the same batch) atomically to ``CKPT/last.pt``. Started again after
a kill (same command), the job loads it and continues with exactly the
batches not consumed by the checkpointed steps; started with another
``--nproc-per-node``, the rest of the epoch is split among the new ranks
(elastic resume; see docs/multihost.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import nearstore
from nearstore.loader.torch import TorchLoader


def model(classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, classes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cluster", required=True, help="cluster file, or the store directory holding cluster.json")
    ap.add_argument("--ckpt", required=True, type=Path, help="checkpoint directory (resumed from when it has one)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16, help="per rank")
    ap.add_argument("--size", type=int, default=32, help="crop size")
    ap.add_argument("--split", default="node", help="ops on the nodes: host, node or an op index")
    ap.add_argument("--save-every", type=int, default=10, help="steps between checkpoints")
    ap.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step (stands for compute)")
    ap.add_argument("--log-ids", type=Path, default=None, help="append each batch's sample ids to DIR/rank-R.jsonl")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pipeline = nearstore.standard_train(args.size)
    split = int(args.split) if args.split.isdigit() else args.split
    loader = TorchLoader(cluster=args.cluster, pipeline=pipeline, batch_size=args.batch_size, seed=0, split=split,
                         workers=1)
    net = nn.parallel.DistributedDataParallel(model(len(loader.loader.manifest.classes)))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    step = 0
    last = args.ckpt / "last.pt"
    if last.exists():
        ck = torch.load(last, weights_only=False)
        net.module.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        loader.load_state_dict(ck["loader"])  # saved with any world size
        step = ck["step"]
    log = open(args.log_ids / f"rank-{rank}.jsonl", "a") if args.log_ids else None
    try:
        while loader.loader.epoch < args.epochs:
            for images, labels in loader:
                loss = nn.functional.cross_entropy(net(images), labels)
                opt.zero_grad()
                loss.backward()  # all-reduce: every rank takes each step together
                opt.step()
                step += 1
                b = loader.last_batch
                if log:
                    log.write(json.dumps({"step": step, "epoch": b.epoch, "index": b.index,
                                          "ids": b.ids.tolist()}) + "\n")
                    log.flush()
                if step % args.save_every == 0 and rank == 0:
                    args.ckpt.mkdir(parents=True, exist_ok=True)
                    tmp = last.with_suffix(".tmp")
                    torch.save({"model": net.module.state_dict(), "optimizer": opt.state_dict(),
                                "loader": loader.state_dict(), "step": step}, tmp)
                    os.replace(tmp, last)  # a kill mid-save leaves the previous checkpoint
                time.sleep(args.step_sleep)
            if rank == 0:
                print(f"epoch {loader.loader.epoch - 1} done at step {step}, loss {loss.item():.3f}", flush=True)
    finally:
        if log:
            log.close()
        loader.close()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
