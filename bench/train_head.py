"""Transfer learning benchmark: `python bench/train_head.py [--quick] --json PATH`.

A labelled synthetic dataset whose classes are separable (``synth --class-colors``), on a 2-node local
cluster with a capped link; a frozen backbone up to its pooled features, fp16, and a real head-training step
on the host as the accelerator's work (``bench.accel.head_training``). Two placements of the backbone: on the
nodes (features cross the link) and on the host (uint8 crops cross the link). Reported per placement:
samples/s, AU (training-step time / wall), bytes per sample, node and host stage seconds, the loss at the
start and end. ``--quick`` (CI): 48 images, ResNet-18 on 64x64 crops.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from nearstore.bench.accel import head_training
from nearstore.node import LocalCluster
from nearstore.store.ingest import ingest
from nearstore.store.synth import SynthSpec, synth_folder

UINT8_SPLIT = 4  # decode+crop, flip, to_uint8_chw on the node; the network on the host


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--net", default="resnet18")
    ap.add_argument("--link-mbps", type=float, default=25.0)
    args = ap.parse_args(argv)
    images, size, samples, batch = (48, 64, 96, 16) if args.quick else (320, 224, 320, 32)
    out: dict = {"net": args.net, "cut": "pooled", "dtype": "float16", "images": images, "size": size,
                 "link_mbps": args.link_mbps, "nodes": 2, "workers_per_node": 1, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        synth_folder(Path(tmp) / "img", SynthSpec(n=images, seed=1, classes=4, class_colors=True))
        ingest(Path(tmp) / "img", Path(tmp) / "store", nodes=2, shard_size=8 << 20)
        with LocalCluster(Path(tmp) / "store", link_mbps=args.link_mbps, workers_per_node=1) as cluster:
            for where, split in (("nodes", "node"), ("host", UINT8_SPLIT)):
                print(f"backbone on the {where}", file=sys.stderr, flush=True)
                r = head_training(cluster.spec, net=args.net, size=size, split=split, samples=samples,
                                  batch_size=batch, workers=2)
                r["backbone_on"] = where
                out["runs"].append(r)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    for r in out["runs"]:
        print(f"backbone on {r['backbone_on']:>5}: {r['samples_per_s']:.1f} samples/s, AU {r['au']:.2f}, "
              f"{r['bytes_per_sample']:.0f} B/sample, loss {r['loss_first']:.2f} -> {r['loss_last']:.2f}, "
              f"node {r['node_stage_seconds']}, host {r['host_stage_seconds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
