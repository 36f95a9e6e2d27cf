"""Engines that run a cut network on a float32 NCHW batch: PyTorch and ONNX Runtime (fp32, and int8).

- ``pytorch``: the module in channels-last memory format under ``torch.inference_mode``.
- ``onnxruntime``: the module exported once with ``torch.onnx`` (the dynamo exporter; batch-norm folded) to
  a cache file keyed by architecture, cut and weights digest, run by ONNX Runtime's CPU provider with all
  graph optimizations.
- ``onnxruntime-int8``: that model statically quantized by ONNX Runtime (QDQ, per-channel weights,
  activations calibrated on seeded noise): faster where int8 kernels pay, with a looser tolerance
  (``nets.quant.TOLERANCE``). Only chosen when asked for.

``engines()`` lists what this machine can run (a node reports it in its capabilities). ``engine="auto"``
measures the exact engines (``AUTO_CANDIDATES``) on a seeded batch in the process that will run them and
keeps the fastest. Every engine uses as many threads as torch does in that process (one in a node worker).
"""

from __future__ import annotations

import fcntl
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn

from nearstore.core.errors import OpParamError
from nearstore.nets import AUTO_CANDIDATES, ENGINES, engines
from nearstore.nets import quant

__all__ = ["make_engine", "pick_engine", "cache_dir", "Engine", "onnx_model"]

log = logging.getLogger(__name__)


class Engine(Protocol):
    name: str

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, C, H, W) -> float32 activations (N, ...), C-contiguous."""


def cache_dir() -> Path:
    """Where exported models are kept: ``$NEARSTORE_CACHE`` or ``~/.cache/nearstore``, then ``onnx/``."""
    root = os.environ.get("NEARSTORE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nearstore")
    path = Path(root) / "onnx"
    path.mkdir(parents=True, exist_ok=True)
    return path


class TorchEngine:
    name = "pytorch"

    def __init__(self, module: nn.Module) -> None:
        self.module = module.to(memory_format=torch.channels_last)

    def run(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            return self.module(t).contiguous().numpy()


def _export(module: nn.Module, path: Path, shape: tuple[int, ...], *, optimize: bool) -> None:
    """Export ``module`` (input: a batch of ``shape``) with a dynamic batch dimension (atomically: a temp file,
    then a rename)."""
    x = torch.zeros((2, *shape))
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(module, (x,), tmp, input_names=["x"], output_names=["y"],
                          dynamic_shapes={"x": {0: torch.export.Dim("n")}}, dynamo=True, optimize=optimize,
                          verbose=False, external_data=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def onnx_model(module: Callable[[], nn.Module], key: str, shape: tuple[int, ...], *, int8: bool = False) -> Path:
    """The cached ONNX file of the module ``module()`` builds, for inputs of ``shape`` (C, H, W) (exported, and
    quantized when ``int8``, on first use; one process at a time per file). The module is built only on a
    miss: a node that finds the file does not build (and seed, and calibrate) the network in torch."""
    # the int8 recipe's version is in the name: a changed recipe never reuses an old file
    path = cache_dir() / f"{key}{'-int8-' + quant.QUANT_VERSION if int8 else ''}.onnx"
    if path.exists():
        return path
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            if int8:
                _quantize(onnx_model(module, key, shape), path, shape)
            else:
                t0 = time.perf_counter()
                _export(module(), path, shape, optimize=True)
                log.info("exported %s to ONNX in %.1f s", key, time.perf_counter() - t0)
    return path


def _quantize(src: Path, dst: Path, shape: tuple[int, ...]) -> None:
    if shape[0] != 3:  # calibration data are images: a segment fed activations has none to calibrate on
        raise OpParamError(f"the int8 engine runs a network from its input image (3 x H x W), not a segment fed "
                           f"{shape[0]}-channel activations; use engine onnxruntime or pytorch for it")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Noise(CalibrationDataReader):  # seeded uint8 images, normalized like the op's input
        def __init__(self) -> None:
            g = np.random.default_rng(0)
            mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
            std = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
            self.batches = iter([{"x": ((g.integers(0, 256, (4, *shape)).astype(np.float32) / 255 - mean) / std)}
                                 for _ in range(4)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    fd, pre = tempfile.mkstemp(suffix=".onnx", dir=dst.parent)
    os.close(fd)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=dst.parent)
    os.close(fd)
    try:
        quant_pre_process(str(src), pre, skip_symbolic_shape=True)
        # reduce_range: 7-bit weights, so on a node CPU without VNNI (AVX2 only) the u8 x s8 multiply-adds
        # cannot saturate their 16-bit sums (ONNX Runtime's advice for such CPUs); the same file runs anywhere
        quantize_static(pre, tmp, Noise(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        os.replace(tmp, dst)
    finally:
        for f in (pre, tmp):
            if os.path.exists(f):
                os.unlink(f)


class OrtEngine:
    def __init__(self, path: Path, name: str) -> None:
        import onnxruntime as ort

        self.name = name
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # no busy-waiting between calls: spinning pool threads would take the cores from the other stages (and
        # engines) of the same process
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.session.run(None, {"x": np.ascontiguousarray(x, np.float32)})[0])


def make_engine(name: str, module: Callable[[], nn.Module], *, key: str, shape: tuple[int, ...]) -> Engine:
    """Engine ``name`` for the module ``module()`` builds (``key`` names its cached exports; ``shape``: one input
    sample's C, H, W)."""
    if name not in ENGINES:
        raise OpParamError(f"unknown engine {name!r}; engines: auto, {', '.join(ENGINES)}")
    if name not in engines():
        raise OpParamError(f"engine {name!r} is not installed here; available: {', '.join(engines())} "
                           "(pip install 'nearstore[nets]' for ONNX Runtime)")
    if name == "pytorch":
        return TorchEngine(module())
    return OrtEngine(onnx_model(module, key, shape, int8=name == "onnxruntime-int8"), name)


def pick_engine(module: Callable[[], nn.Module], *, key: str, shape: tuple[int, ...], batch: int = 8,
                candidates: tuple[str, ...] = AUTO_CANDIDATES, rounds: int = 3) -> tuple[Engine, dict[str, float]]:
    """The fastest of ``candidates`` here, measured on a seeded batch (median of ``rounds`` after a
    warm-up); returns it and every candidate's seconds per batch."""
    x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
    times: dict[str, float] = {}
    best: Engine | None = None
    for name in candidates:
        if name not in engines():
            continue
        eng = make_engine(name, module, key=key, shape=shape)
        eng.run(x)
        runs = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            eng.run(x)
            runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)
        if best is None or times[name] < times[best.name]:
            best = eng
    assert best is not None  # pytorch is always there
    log.info("engine auto for %s: %s (seconds per batch of %d: %s)", key, best.name, batch, times)
    return best, times
