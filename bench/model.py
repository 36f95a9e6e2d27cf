"""Model sweep speed: `python bench/model.py [--points N] --json PATH`.

Evaluates N random design points (4 resources: media, link, node CPU,
accelerator) with the vectorized model, after a warm-up; reports the median
of 5 runs and points per second. Goal (issue #5): >= 100,000 points in < 1 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from nearstore.model import evaluate_grid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    names = ["media", "link", "node_cpu", "accelerator"]
    cap = rng.uniform(1e6, 1e11, size=(args.points, len(names)))
    load = rng.uniform(0, 1e6, size=(args.points, len(names)))
    evaluate_grid(names, cap[:1000], load[:1000])  # warm-up
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        res = evaluate_grid(names, cap, load)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {"points": args.points, "seconds_median": med, "points_per_s": args.points / med,
           "bottleneck_counts": {n: int((res.bottleneck == i).sum()) for i, n in enumerate(names)},
           "goal": {"100k points < 1 s": args.points >= 100_000 and med < 1.0}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
