"""The stage contract: declared cost fields, batches whose grouping never changes a sample's bits, plugins."""

from __future__ import annotations

import io
import textwrap

import numpy as np
import pytest

from nearstore.core.errors import OpParamError
from nearstore.nets import max_rel_error
from nearstore.nets.quant import TOLERANCE
from nearstore.ops import Spec, make_op, registry, rng_for
from nearstore.ops.base import PLACES, unregister
from nearstore.ops.plugins import import_errors, load_op_modules, op_origins
from nearstore.store.synth import synth_image

#: parameters to build each registered op with (ops without an entry are built with none); an op added to the
#: library (or by a plugin imported in the test process) that needs parameters gets an entry here
EXAMPLE_PARAMS: dict[str, dict] = {
    "center_crop": {"size": 40},
    "resize": {"size": 48},
    "random_resized_crop": {"size": 56},
    "flip": {"p": 0.5},
    # a small network, run by one engine: its test below compares within the documented tolerance
    "network": {"arch": "mobilenet_v2", "cut": "stem", "engine": "pytorch"},
    "dequantize": {"shape": [4, 2, 2]},
}
#: input shapes for ops that need a fixed-size input to declare
EXAMPLE_SHAPES: dict[str, tuple[int, ...]] = {"network": (3, 64, 64), "dequantize": (20,)}
#: ops whose outputs depend on summation order (engine, batch size): equal within a tolerance, not bit for bit
#: (issue 11: network layers are compared against ``nets.quant.TOLERANCE``)
TOLERANT = {"network": TOLERANCE["pytorch", "float32"]}


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _inputs(kind: str, n: int = 5) -> list:
    """n different samples of ``kind`` (variable sizes where the kind allows them)."""
    rng = np.random.default_rng(3)
    sizes = [(64, 80), (96, 64), (72, 72), (120, 90), (64, 64)][:n]
    if kind == "jpeg":
        return [synth_image(i, 1) for i in range(n)]
    if kind == "npy":
        return [_npy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    if kind == "image":
        return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    if kind == "chw_u8":
        return [rng.integers(0, 256, (3, 64, 64), dtype=np.uint8) for _ in range(n)]
    if kind == "chw_f32":
        return [rng.standard_normal((3, 64, 64)).astype(np.float32) for _ in range(n)]
    if kind == "act_q8":  # int8 activations: a float32 scale in the first 4 bytes, then 16 values
        return [np.concatenate([np.float32(0.5 + i).reshape(1).view(np.int8),
                                rng.integers(-127, 128, 16, dtype=np.int8)]) for i in range(n)]
    raise AssertionError(f"no example inputs for kind {kind!r}: add them to tests/test_contract.py")


def _run(op, xs: list, keys: list[str], groups: list[list[int]]) -> list[np.ndarray]:
    """Each sample's output when the samples are grouped into batches ``groups`` (index lists)."""
    out: list = [None] * len(xs)
    for g in groups:
        rngs = [rng_for(7, 1, keys[i], 0) if op.random else None for i in g]
        got: list = [None] * len(g)
        op.run_batch([xs[i] for i in g], rngs, got)
        for i, y in zip(g, got):
            out[i] = np.asarray(y).copy()
    return out


@pytest.mark.parametrize("name", sorted(registry()))
def test_any_batch_grouping_gives_the_same_bits(name):
    cls = registry()[name]
    op = make_op({"op": name, **EXAMPLE_PARAMS.get(name, {})})
    xs = _inputs(cls.inputs[0])
    keys = [f"k{i}" for i in range(len(xs))]
    alone = _run(op, xs, keys, [[i] for i in range(len(xs))])
    for groups in ([[0, 1, 2, 3, 4]], [[4, 3], [2, 1, 0]], [[1], [0, 2], [4, 3]], [[3, 0, 4, 1, 2]]):
        got = _run(op, xs, keys, groups)
        for i, (a, b) in enumerate(zip(alone, got)):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, groups, i)
            if name in TOLERANT:
                assert max_rel_error(b, a) <= TOLERANT[name], (name, groups, i)
            else:
                assert np.array_equal(a, b), (name, groups, i)
    # the per-sample path is the same op: __call__ gives the same bits as a batch of one
    for i, x in enumerate(xs):
        rng = rng_for(7, 1, keys[i], 0) if op.random else None
        assert np.array_equal(np.asarray(op(x, rng)), alone[i])


@pytest.mark.parametrize("name", sorted(registry()))
def test_declare_says_where_and_what_it_costs(name):
    op = make_op({"op": name, **EXAMPLE_PARAMS.get(name, {})})
    kind = op.inputs[0]
    spec_in = Spec(kind, EXAMPLE_SHAPES.get(name), "uint8", 1e4, (64.0, 80.0), where=("accelerator",), macs=5e9)
    out = op.declare(spec_in)
    assert out.where and set(out.where) <= set(PLACES)
    assert out.macs >= 0 and out.param_bytes >= 0 and out.resident_bytes >= 0
    if cls_is_cpu_only(op):  # the image library: cpu ops, costs measured, never inherited from the input spec
        assert out.where == ("cpu",) and out.macs == 0.0


def cls_is_cpu_only(op) -> bool:
    return type(op).__module__ == "nearstore.ops.image"


def test_spec_rejects_unknown_places_and_negative_costs():
    with pytest.raises(OpParamError, match="subset of"):
        Spec("image", None, "uint8", 1.0, where=("gpu",))
    with pytest.raises(OpParamError, match="macs must be >= 0"):
        Spec("image", None, "uint8", 1.0, macs=-1)


def test_batch_into_an_array_equals_the_list_path():
    op = make_op("normalize")
    xs = _inputs("chw_u8")
    out = np.empty((len(xs), 3, 64, 64), np.float32)
    op.run_batch(xs, [None] * len(xs), out)
    listed: list = [None] * len(xs)
    op.run_batch(xs, [None] * len(xs), listed)
    assert np.array_equal(out, np.stack(listed))


def test_user_op_module_file_registers_ops_and_a_broken_one_is_reported(tmp_path):
    good = tmp_path / "good_ops.py"
    good.write_text(textwrap.dedent('''
        from nearstore.ops.base import Op, register

        @register
        class Invert(Op):
            name = "test_invert_u8"
            inputs = ("chw_u8",)
            version = "2.1"

            def declare(self, spec):
                return spec.costless()

            def __call__(self, x, rng):
                return 255 - x
    '''))
    bad = tmp_path / "bad_ops.py"
    bad.write_text(textwrap.dedent('''
        from nearstore.ops.base import Op, register

        @register
        class Half(Op):
            name = "test_half_registered"
            inputs = ("chw_u8",)

        raise RuntimeError("this module is broken on purpose")
    '''))
    try:
        errors = load_op_modules([str(good), str(bad)], entry_points=False)
        assert "test_invert_u8" in registry() and registry()["test_invert_u8"].version == "2.1"
        assert op_origins()["test_invert_u8"] == f"module {good}" and op_origins()["flip"] == "builtin"
        assert "test_half_registered" not in registry()  # a module that fails leaves none of its ops behind
        msg = errors[f"module {bad}"]
        assert "broken on purpose" in msg and "Traceback" in msg
        assert import_errors() == errors
        x = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
        assert np.array_equal(make_op("test_invert_u8")(x, None), 255 - x)
    finally:
        unregister("test_invert_u8")
