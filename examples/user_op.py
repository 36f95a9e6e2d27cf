"""A user-written op that runs on the storage nodes: serve it with
`nearstore up STORE --ops-module examples/user_op.py` (or `nearstore node serve ... --ops-module ...`, or
an entry point in the `nearstore.ops` group), and load the same file in the training process
(`nearstore.ops.plugins.load_op_modules(["examples/user_op.py"])`) so pipelines can name it.
Each node then lists it in `capabilities` (name, version, origin); a node without it refuses the pipeline
before any data moves. tests/test_contract_node.py runs this file on real nodes."""

import numpy as np

from nearstore.ops.base import Op, OpParams, Spec, register


class PosterizeParams(OpParams):
    levels: int = 4  # checked by pydantic: a bad value is an OpParamError naming the op and the field


@register
class Posterize(Op):
    """Keep the top bits of each uint8 channel value (a cheap cpu op, exact in any batch)."""

    name = "posterize"
    inputs = ("image", "chw_u8")  # HWC images after decoding, or CHW crops
    version = "1.0"
    Params = PosterizeParams
    batched = True

    def declare(self, spec: Spec) -> Spec:
        return spec.costless()  # same kind, shape, dtype and bytes; no MACs; runs on cpu

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        step = 256 // self.params.levels
        return (x // step * step).astype(np.uint8)

    def run_batch(self, xs: list, rngs: list, out: np.ndarray | list) -> None:
        if not isinstance(out, np.ndarray):  # samples of different shapes: one at a time
            return super().run_batch(xs, rngs, out)
        step = np.uint8(256 // self.params.levels)  # crops of one shape: the whole batch in two numpy calls
        np.floor_divide(np.stack(xs), step, out=out)
        out *= step
