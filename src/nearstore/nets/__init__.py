"""Convolutional networks cut at named points: architectures and their costs, weights, engines, output dtypes.

Light to import (no torch): ``archs`` (shapes, MACs, parameters per cut) and
``quant`` (output encodings), plus ``engines()``. ``nets.models`` (the torch
modules) and ``nets.runtime`` (the engines: PyTorch, ONNX Runtime) load torch and are
imported where a network actually runs.
"""

import importlib.util

from nearstore.nets.archs import ARCHS, CUTS, NetInfo, describe
from nearstore.nets.quant import DTYPES, decode_q8, encode, encoded_shape, max_rel_error

__all__ = ["ARCHS", "CUTS", "DTYPES", "ENGINES", "AUTO_CANDIDATES", "NetInfo", "describe", "decode_q8", "encode",
           "encoded_shape", "engines", "max_rel_error"]

#: every engine, and those ``engine="auto"`` measures (the int8 engine only runs when asked for)
ENGINES = ("pytorch", "onnxruntime", "onnxruntime-int8")
AUTO_CANDIDATES = ("pytorch", "onnxruntime")


def engines() -> list[str]:
    """The engines this machine can run (a node reports them in its capabilities)."""
    have = ["pytorch"] if importlib.util.find_spec("torch") else []
    if have and importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        have += ["onnxruntime", "onnxruntime-int8"]
    return have
