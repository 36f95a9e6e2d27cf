"""Run the host benchmarks: `python bench/run.py [--quick] --json PATH`.

Full run (by hand): 2,000 default synthetic JPEGs, 5 interleaved rounds of
1,280 images per system, plus loader overhead on 20,000 decoded samples.
Quick run (CI): 256 images, 1 round, 5,000 decoded samples; it checks the
benchmark code runs and writes its JSON, not the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from nearstore.bench.host import host_pipeline_bench, loader_overhead_bench
from nearstore.store.ingest import ingest
from nearstore.store.synth import SynthSpec, synth_folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes for CI")
    ap.add_argument("--json", type=Path, required=True, help="where to write the results")
    ap.add_argument("--images", type=int, default=None, help="synthetic images in the store")
    ap.add_argument("--no-dali", action="store_true", help="skip the DALI baseline")
    args = ap.parse_args(argv)
    images = args.images or (256 if args.quick else 2000)
    rounds = 1 if args.quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        synth_folder(Path(tmp) / "src", SynthSpec(n=images, seed=0))
        ingest(Path(tmp) / "src", Path(tmp) / "store", nodes=1)
        host = host_pipeline_bench(Path(tmp) / "store", n=min(images, 1280), rounds=rounds, dali=not args.no_dali,
                                   progress=lambda m: print(m, file=sys.stderr))
        overhead = loader_overhead_bench(n=5000 if args.quick else 20000, rounds=rounds, workdir=tmp)
    result = {"quick": args.quick, "images": images, "host_pipeline": host, "loader_overhead": overhead,
              "seconds": time.perf_counter() - t0}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({"median_images_per_s": host["median_images_per_s"], "median_ratio": host["median_ratio"],
                      "loader_overhead_samples_per_s": overhead["median_samples_per_s"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
