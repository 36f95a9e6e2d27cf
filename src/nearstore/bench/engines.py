"""Engine benchmark: a network cut's seconds per batch for each engine x output dtype x batch size.

Every cell runs the ``network`` op's own ``run_batch`` (stacking, normalizing
uint8 crops, the engine, encoding the output dtype) on seeded 3xHxW uint8
crops, after one warm-up call, and reports the median of ``rounds`` calls.
The baseline, ``pytorch-eager``, is the same module run the plain way
(NCHW, ``torch.no_grad``) on the same normalized batch. Threads: torch's
setting in this process (``threads``), the same for every engine.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import torch

from nearstore.nets import describe, engines, max_rel_error
from nearstore.nets import models
from nearstore.ops.base import Spec
from nearstore.ops.network import Network

__all__ = ["engine_grid"]


def _time(fn: Callable[[], object], rounds: int) -> float:
    fn()  # warm-up (first-call allocations, lazy kernels)
    runs = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def engine_grid(*, arch: str = "resnet50", cut: str = "pooled", size: int = 224, batches: tuple[int, ...] = (1, 16, 32),
                dtypes: tuple[str, ...] = ("float32", "float16", "int8"), rounds: int = 3, threads: int = 2,
                progress: Callable[[str], None] | None = None) -> dict:
    """Seconds per batch and samples/s for every (engine, dtype, batch), and each engine's speedup over eager."""
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (3, size, size), dtype=np.uint8) for _ in range(max(batches))]
    spec_in = Spec("chw_u8", (3, size, size), "uint8", 3.0 * size * size)
    eager = models.build(arch, cut)
    ops = {(e, d): Network(arch=arch, cut=cut, dtype=d, engine=e) for e in engines() for d in dtypes}
    rows = []
    for batch in batches:
        xs = crops[:batch]
        t = torch.from_numpy(Network()._batch(xs))  # the op's own normalization of the uint8 crops

        def run_eager(t: torch.Tensor = t) -> None:
            with torch.no_grad():
                eager(t)

        base = _time(run_eager, rounds)
        rows.append({"engine": "pytorch-eager", "dtype": "float32", "batch": batch, "seconds": base,
                     "samples_per_s": batch / base, "speedup_vs_eager": 1.0})
        for engine in engines():
            for dtype in dtypes:
                if progress:
                    progress(f"{arch} {cut} batch {batch} {engine} {dtype}")
                op = ops[engine, dtype]
                out = np.empty((batch, *op.declare(spec_in).shape), dtype)
                sec = _time(lambda op=op, out=out, xs=xs: op.run_batch(xs, [None] * len(xs), out), rounds)
                rows.append({"engine": engine, "dtype": dtype, "batch": batch, "seconds": sec,
                             "samples_per_s": batch / sec, "speedup_vs_eager": base / sec})
    # how far each engine's float32 output lies from eager's (an int8 engine computes with quantized weights and
    # activations: it is fast, but not the same function)
    xs = crops[: min(4, len(crops))]
    with torch.no_grad():
        ref = eager(torch.from_numpy(Network()._batch(xs))).numpy()
    accuracy = {}
    for engine in engines():
        op = ops[engine, "float32"] if (engine, "float32") in ops else Network(arch=arch, cut=cut, engine=engine)
        got = np.empty((len(xs), *op.declare(spec_in).shape), np.float32)
        op.run_batch(xs, [None] * len(xs), got)
        accuracy[engine] = max(max_rel_error(g, r) for g, r in zip(got, ref))
    info = describe(arch, cut, (size, size))
    best = {}
    for b in batches:
        cand = [r for r in rows if r["batch"] == b and r["engine"] != "pytorch-eager"]
        top = max(cand, key=lambda r: r["samples_per_s"])
        best[b] = {"engine": top["engine"], "dtype": top["dtype"], "speedup_vs_eager": top["speedup_vs_eager"]}
    goal = all(best[b]["speedup_vs_eager"] >= 2.0 for b in batches if b >= 16)
    return {"arch": arch, "cut": cut, "size": size, "threads": threads, "rounds": rounds,
            "gmacs_per_sample": info.macs / 1e9, "cpu_flags": _cpu_flags(), "engines": engines(), "rows": rows,
            "max_rel_error_vs_eager": accuracy,
            "best_per_batch": best, "goal": {"fastest >= 2x eager at batch >= 16": goal}}


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":")[1].split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8",
                                             "amx_bf16", "avx512_bf16", "f16c"))
