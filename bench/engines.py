"""Engine benchmark: `python bench/engines.py [--quick] --json PATH`.

ResNet-50 pooled features on 224x224 crops: PyTorch eager (baseline), the
op's PyTorch engine (channels-last, inference mode), ONNX Runtime fp32 and
int8 (static QDQ), each with float32 / float16 / int8 outputs, at batch 1, 16
and 32; median of 3 after a warm-up, one thread per engine (``--threads``; a node
worker runs one). Goal (issue #11): the fastest
engine >= 2x eager at batch >= 16, or the table shows why not. ``--quick``
(CI): MobileNetV2 up to layer1 at 64x64, batches 1 and 4, one round.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nearstore.bench.engines import engine_grid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--cut", default="pooled")
    ap.add_argument("--threads", type=int, default=1, help="threads per engine (a node worker runs 1)")
    args = ap.parse_args(argv)
    if args.quick:
        res = engine_grid(arch="mobilenet_v2", cut="layer1", size=64, batches=(1, 4), rounds=1, threads=args.threads)
    else:
        res = engine_grid(arch=args.arch, cut=args.cut, threads=args.threads,
                          progress=lambda m: print(m, file=sys.stderr, flush=True))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    for r in res["rows"]:
        print(f"{r['engine']:>18} {r['dtype']:>8} batch {r['batch']:>3}: {r['samples_per_s']:8.1f} samples/s "
              f"({r['speedup_vs_eager']:.2f}x eager)")
    print(json.dumps({"best_per_batch": res["best_per_batch"], "goal": res["goal"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
