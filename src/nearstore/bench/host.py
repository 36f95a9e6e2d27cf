"""Host pipeline benchmarks: nearstore vs PyTorch DataLoader+Pillow vs DALI CPU, and loader overhead.

Every figure is a ratio against baselines measured in the same run, in
interleaved rounds (the machines are noisy); medians are reported. Results are
plain dicts ready for JSON.
"""

from __future__ import annotations

import io
import statistics
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from nearstore.bench.baselines import dali_available, dali_throughput, timed_batches, torch_pillow_throughput
from nearstore.loader.loader import Loader
from nearstore.ops.pipeline import Pipeline, standard_train
from nearstore.store.ingest import ingest

__all__ = ["nearstore_throughput", "host_pipeline_bench", "loader_overhead_bench", "write_npy_tar"]


def nearstore_throughput(store: str | Path, *, n: int, pipeline: Pipeline | None = None, batch_size: int = 64,
                         workers: int = 2, warmup_batches: int = 2, seed: int = 0) -> dict:
    """Images/s of nearstore.Loader over ``n`` samples after ``warmup_batches`` batches (epochs repeat as needed)."""
    pipeline = pipeline or standard_train()
    total = n + warmup_batches * batch_size

    def sizes(loader: Loader) -> Iterator[int]:
        served = 0
        for batch in loader.epochs(None):
            served += len(batch)
            yield len(batch)
            if served >= total:
                return

    with Loader(store, pipeline=pipeline, batch_size=batch_size, workers=workers, seed=seed) as loader:
        res = timed_batches(sizes(loader), warmup_batches)
        res["op_seconds"] = dict(loader.stats.op_seconds)
    return res


def host_pipeline_bench(store: str | Path, *, n: int = 1280, rounds: int = 3, batch_size: int = 64,
                        workers: int = 2, dali: bool = True,
                        progress: Callable[[str], None] | None = None) -> dict:
    """RRC224 + flip + normalize, batch 64: interleaved rounds of the three systems; medians and ratios."""
    ok, note = dali_available() if dali else (False, "DALI disabled by the caller")
    systems: dict[str, Callable[[], dict]] = {
        "nearstore": lambda: nearstore_throughput(store, n=n, batch_size=batch_size, workers=workers),
        "torch_dataloader_pillow": lambda: torch_pillow_throughput(store, n=n, batch_size=batch_size,
                                                                    workers=workers),
    }
    if ok:
        systems["dali_cpu"] = lambda: dali_throughput(store, n=n, batch_size=batch_size, threads=workers)
    per_round: list[dict[str, float]] = []
    for r in range(rounds):
        row = {}
        for name, fn in systems.items():
            if progress:
                progress(f"round {r + 1}/{rounds}: {name}")
            row[name] = fn()["images_per_s"]
        per_round.append(row)
    result: dict = {
        "benchmark": "host_pipeline",
        "pipeline": "decode + random_resized_crop(224) + flip + normalize, batch %d" % batch_size,
        "workers": workers,
        "images_per_round": n,
        "rounds": per_round,
        "median_images_per_s": {k: statistics.median(r[k] for r in per_round) for k in systems},
        "dali_note": note or None,
    }
    ratios = {"vs_torch": statistics.median(r["nearstore"] / r["torch_dataloader_pillow"] for r in per_round)}
    if ok:
        ratios["vs_dali"] = statistics.median(r["nearstore"] / r["dali_cpu"] for r in per_round)
    result["median_ratio"] = ratios
    result["goals"] = {"vs_torch >= 2.0": ratios["vs_torch"] >= 2.0,
                       "vs_dali >= 1.2": (ratios["vs_dali"] >= 1.2) if ok else None}
    return result


def write_npy_tar(path: Path, *, n: int, shape: tuple[int, int, int] = (32, 32, 3), classes: int = 10,
                  seed: int = 0) -> None:
    """A WebDataset tar of ``n`` already-decoded uint8 arrays (KEY.npy + KEY.cls)."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            np.save(buf, rng.integers(0, 256, size=shape, dtype=np.uint8))
            for ext, data in (("npy", buf.getvalue()), ("cls", str(i % classes).encode())):
                info = tarfile.TarInfo(f"{i:07d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def loader_overhead_bench(*, n: int = 20000, batch_size: int = 256, workers: int = 2, rounds: int = 3,
                          workdir: str | Path | None = None) -> dict:
    """Samples/s of the loader on already-decoded 32x32x3 uint8 samples with ops that only reshape."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        write_npy_tar(src / "decoded-000.tar", n=n)
        ingest(src, Path(tmp) / "store", nodes=1)
        pipe = Pipeline([{"op": "decode_npy", "shape": [32, 32, 3]}, "to_uint8_chw"])
        rates = []
        for _ in range(rounds):
            with Loader(Path(tmp) / "store", pipeline=pipe, batch_size=batch_size, workers=workers) as loader:
                t0 = time.perf_counter()
                seen = sum(len(b) for b in loader)
                rates.append(seen / (time.perf_counter() - t0))
    med = statistics.median(rates)
    return {
        "benchmark": "loader_overhead",
        "pipeline": "decode_npy(32x32x3 view) + to_uint8_chw",
        "samples": n,
        "batch_size": batch_size,
        "rounds_samples_per_s": rates,
        "median_samples_per_s": med,
        "goals": {"samples_per_s >= 20000": med >= 20000},
    }
