"""Registered, typed transforms (ops) and pipelines; the same code runs on nodes and on the host."""

from nearstore.ops.base import KINDS, Op, OpParams, Spec, make_op, register, registry, rng_for
from nearstore.ops.image import (
    CenterCrop,
    DecodeJpeg,
    DecodeNpy,
    Flip,
    Normalize,
    RandomResizedCrop,
    Resize,
    ToUint8CHW,
)
from nearstore.ops.network import Dequantize, Network, network_ops
from nearstore.ops.pipeline import SPLIT_NAMES, Pipeline, Stage, input_spec, standard_train

__all__ = [
    "KINDS", "Op", "OpParams", "Spec", "make_op", "register", "registry", "rng_for",
    "CenterCrop", "DecodeJpeg", "DecodeNpy", "Flip", "Normalize", "RandomResizedCrop", "Resize", "ToUint8CHW",
    "Dequantize", "Network", "network_ops",
    "SPLIT_NAMES", "Pipeline", "Stage", "input_spec", "standard_train",
]
