"""Node sweep: `python bench/nodes.py [--quick] --json PATH [--plot PNG]`.

split in {host, node (uint8 224^2)} x link cap in {25, 100, 400 MB/s per node} x source in
{default synth, large photos}, on a 2-node local cluster; plus uncapped streaming of uint8
batches. Quick mode (CI) runs one cap with tiny data to check the code, not the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from nearstore.bench.nodes import run_all, streaming_bench, streaming_params
from nearstore.bench.plots import plot_sweep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--streaming-only", action="store_true", help="only the uncapped uint8 streaming figure")
    args = ap.parse_args(argv)
    if args.streaming_only:  # a re-check of one figure, without the sweep
        with tempfile.TemporaryDirectory() as tmp:
            res = {"streaming": streaming_bench(Path(tmp), **streaming_params(args.quick))}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
        print(f"uncapped uint8 streaming: {res['streaming']['gb_per_s']:.2f} GB/s")
        return 0
    res = run_all(quick=args.quick, progress=lambda m: print(m, file=sys.stderr))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    if args.plot:
        plot_sweep(res["runs"], args.plot)
    for c in res["comparisons"]:
        print(f"{c['source']:8s} cap {c['cap_mb_per_s']:5.0f} MB/s: host {c['host_samples_per_s']:6.1f}/s "
              f"({c['host_bottleneck']}), node {c['node_samples_per_s']:6.1f}/s ({c['node_bottleneck']}), "
              f"speedup {c['speedup']:.2f}x, bytes ratio {c['bytes_ratio']:.2f}x, goal {c['goal']}")
    print(f"uncapped uint8 streaming: {res['streaming']['gb_per_s']:.2f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
