"""The stage contract: declared cost fields, batches whose grouping never changes a sample's bits, plugins."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nearstore.core.errors import ConfigError, OpParamError, SampleDecodeError
from nearstore.design import ARCHITECTURES, load_catalog, splits, stages_for
from nearstore.design.pipelines import workload_of
from nearstore.nets import ARCHS, CUTS, describe, max_rel_error
from nearstore.nets.quant import TOLERANCE
from nearstore.ops import Pipeline, Spec, input_spec, make_op, registry, rng_for
from nearstore.ops.base import PLACES, Op, OpParams, register, unregister
from nearstore.ops.network import network_ops
from nearstore.ops.plugins import import_errors, load_op_modules, op_origins
from nearstore.plan.planner import ROW_OVERHEAD_BYTES, Measurements, declared, predict
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


class _ScaleParams(OpParams):
    factor: float = 2.0


@register
class _BatchedScale(Op):
    """A batched op for the tests (like a network: one call per batch); a NaN input is a bad sample."""

    name = "test_batched_scale"
    inputs = ("chw_f32",)
    batched = True
    Params = _ScaleParams

    def declare(self, spec: Spec) -> Spec:
        return spec.with_(where=("cpu", "accelerator"), macs=float(np.prod(spec.shape or (1,))), param_bytes=4.0,
                          resident_bytes=spec.bytes * 2)

    def __call__(self, x, rng):
        out = [None]
        self.run_batch([x], [rng], out)
        return out[0]

    def run_batch(self, xs, rngs, out):
        batch = np.stack(xs)
        if np.isnan(batch).any():
            raise SampleDecodeError("test_batched_scale: NaN in the input")
        res = batch * np.float32(self.params.factor)
        for i in range(len(xs)):
            out[i] = res[i]


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


# -- batches through a pipeline: per-sample splits, a batched op, a bad sample in a batch ------------------


PIPE = Pipeline(["decode_jpeg", {"op": "random_resized_crop", "size": 32}, "flip", "to_uint8_chw", "normalize",
                 "test_batched_scale"])


def test_a_batched_op_declares_its_cost_and_runs_once_per_batch():
    specs = PIPE.declare(input_spec("jpeg", mean_bytes=1e5, mean_hw=(300.0, 400.0)))
    assert specs[-1].where == ("cpu", "accelerator") and specs[-1].macs == 3 * 32 * 32
    assert specs[-2].where == ("cpu",) and specs[-2].macs == 0
    assert [st.batched for st in PIPE.stages] == [False, False, False, False, True]


def test_warm_up_runs_a_batched_stage_over_the_whole_batch_before_a_profile(monkeypatch):
    calls: list[int] = []
    real = _BatchedScale.run_batch
    monkeypatch.setattr(_BatchedScale, "run_batch", lambda self, xs, rngs, out: (calls.append(len(xs)),
                                                                                   real(self, xs, rngs, out)))
    jpegs = [synth_image(i, 3) for i in range(6)]
    PIPE.warm_up(jpegs, [f"k{i}" for i in range(6)])
    assert calls == [2] + [6] * Pipeline.WARM_PASSES  # the first use, then the batch size a profile will time
    calls.clear()
    Pipeline(PIPE.to_json()[:-1]).warm_up(jpegs, [f"k{i}" for i in range(6)])  # no batched stage: one small pass
    assert calls == []


@pytest.mark.parametrize("starts,stops", [(0, 6), ([0, 2, 3, 4, 5, 6], 6), (0, [0, 2, 3, 4, 5, 6]),
                                          ([0, 0, 2, 2, 4, 5], [2, 6, 3, 6, 6, 6])])
def test_run_batch_with_per_sample_splits_equals_one_sample_at_a_time(starts, stops):
    n = 6
    keys = [f"s{i}" for i in range(n)]
    jpegs = [synth_image(i, 2) for i in range(n)]
    first = [starts] * n if isinstance(starts, int) else starts
    last = [stops] * n if isinstance(stops, int) else stops
    # each sample's input: the output of ops[:start], computed alone
    xs = [PIPE.run(jpegs[i], key=keys[i], seed=3, epoch=1, stop=first[i]) if first[i] else jpegs[i]
          for i in range(n)]
    want = [PIPE.run(jpegs[i], key=keys[i], seed=3, epoch=1, stop=last[i]) if last[i] else jpegs[i]
            for i in range(n)]
    got: list = [None] * n
    errors = PIPE.run_batch(xs, keys=keys, seed=3, epoch=1, starts=starts, stops=stops, out=got)
    assert errors == [None] * n
    for w, g in zip(want, got):
        assert (w == g) if isinstance(w, bytes) else np.array_equal(w, g)
    if isinstance(stops, int):  # into one array, as the loader does
        arr = np.empty((n, 3, 32, 32), np.float32)
        assert PIPE.run_batch(xs, keys=keys, seed=3, epoch=1, starts=starts, out=arr) == [None] * n
        assert np.array_equal(arr, np.stack(want))


def test_a_bad_sample_fails_alone_in_a_batched_op_and_in_per_sample_ops():
    keys = ["a", "b", "c", "d"]
    xs = [np.full((3, 4, 4), 1.0, np.float32), np.full((3, 4, 4), np.nan, np.float32),
          np.full((3, 4, 4), 3.0, np.float32), b"not an image"]
    p = Pipeline(["test_batched_scale"])
    out = np.zeros((3, 3, 4, 4), np.float32)
    errors = p.run_batch(xs[:3], keys=keys[:3], seed=0, epoch=0, out=out)
    assert errors[0] is None and isinstance(errors[1], SampleDecodeError) and errors[2] is None
    assert (out[0] == 2).all() and (out[2] == 6).all()
    jp = Pipeline(["decode_jpeg", "to_uint8_chw"])
    got: list = [None] * 2
    errors = jp.run_batch([synth_image(0, 0), xs[3]], keys=keys[:2], seed=0, epoch=0, out=got)
    assert errors[0] is None and isinstance(errors[1], SampleDecodeError) and got[0].shape[0] == 3
    with pytest.raises(ConfigError, match="valid splits"):
        PIPE.run_batch(xs[:1], keys=keys[:1], seed=0, epoch=0, starts=1, out=[None])


# -- point 5: the designer and the planner on the same numbers, for every cut ----------------------------------

_CROP = ["decode_jpeg", {"op": "random_resized_crop", "size": 224}, "flip", "to_uint8_chw"]

#: pipelines whose every split both must agree on: the image pipeline, and every network up to every cut (its
#: activations in fp16; int8 adds the host-side dequantize stage)
CUT_PIPELINES = {
    "images": lambda: Pipeline([*_CROP, "normalize"]),
    "images + a batched accelerator op": lambda: PIPE,
    **{f"{arch} to {cut}": (lambda a=arch, c=cut: Pipeline([*_CROP, *network_ops(a, c, dtype="float16")]))
       for arch in ARCHS for cut in CUTS},
    "resnet50 to layer3, int8": lambda: Pipeline([*_CROP, *network_ops("resnet50", "layer3", dtype="int8")]),
    **{f"{arch} in segments": (lambda a=arch: Pipeline([*_CROP, *network_ops(a, "pooled", dtype="float16",
                                                                            segments=("layer1", "layer3"))]))
       for arch in ARCHS},
}


@pytest.mark.parametrize("name", sorted(CUT_PIPELINES))
def test_designer_and_planner_agree_on_bytes_and_operations_per_sample_for_every_cut(name):
    pipe = CUT_PIPELINES[name]()
    spec = input_spec("jpeg", mean_bytes=110e3, mean_hw=(375.0, 500.0))
    n = len(pipe.stages)
    m = Measurements(nodes=2, node_workers=2, host_workers=2, link_bytes_per_s=25e6,
                     **declared(pipe, spec), node_share=[0.5, 0.5], node_raw_bytes=[spec.bytes] * 2,
                     node_read_s=[1e-4] * 2, node_stage_s=[[1e-3] * n] * 2, node_slowdown=[1.0, 1.0],
                     host_stage_s=[1e-3] * n, send_s_per_byte=0.0, recv_s_per_byte=0.0)
    system = ARCHITECTURES["nvdimm"](load_catalog())  # CPUs and accelerators on both sides: every cut is valid
    wl = workload_of(pipe, spec, name=name, dataset_samples=1000, core_s=[1e-3] * n)
    assert splits(system, wl) == list(range(n + 1))
    total = sum(d.macs for d in pipe.declare_stages(spec))
    sa, ca = system.storage.accel, system.compute.accel
    preds = predict(m)
    assert [p.split for p in preds] == pipe.valid_splits
    for cut, p in enumerate(preds):
        stages = stages_for(system, wl, cut)
        link = sum(st.demands.get("ethernet", 0.0) for st in stages)
        # an accelerator is charged device-seconds (MACs / its inference rate): back to MACs per sample
        storage_macs = sum(st.demands.get(sa.resource, 0.0) for st in stages) * sa.infer_macs_per_s
        compute_macs = sum(st.demands.get(ca.resource, 0.0) for st in stages) * ca.infer_macs_per_s
        assert p.bytes_per_sample - ROW_OVERHEAD_BYTES == pytest.approx(link, rel=1e-12), (name, cut)
        assert p.node_macs_per_sample == pytest.approx(storage_macs, rel=1e-9, abs=0), (name, cut)
        assert storage_macs + compute_macs == pytest.approx(total, rel=1e-9, abs=0)
    if name != "images":
        assert total > 0 and max(p.node_macs_per_sample for p in preds) == total
    if " to " in name:  # the network's own figures: what nets.describe counts for that cut at 224x224
        arch, cut = name.split(",")[0].split(" to ")
        info = describe(arch, cut, (224, 224))
        assert total == info.macs
        cut_here = next(p for p in preds if p.node_stages and p.node_stages[-1] == "network")
        q8 = "int8" in name  # int8: a float32 scale, then one byte per value; else fp16
        assert cut_here.bytes_per_sample - ROW_OVERHEAD_BYTES == math.prod(info.shape) * (1 if q8 else 2) + 4 * q8


def test_ops_of_an_installed_package_come_from_the_entry_point_group(tmp_path):
    """A distribution on the path that declares a ``nearstore.ops`` entry point: its ops are there for any
    pipeline of a fresh process (a node's or a loader's), with their origin."""
    site = tmp_path / "site"
    (site / "shout_ops").mkdir(parents=True)
    (site / "shout_ops" / "__init__.py").write_text(textwrap.dedent('''
        from nearstore.ops.base import Op, register

        @register
        class Shout(Op):
            name = "test_shout"
            inputs = ("chw_u8",)
            version = "3"

            def declare(self, spec):
                return spec.costless()

            def __call__(self, x, rng):
                return x * 2
    '''))
    dist = site / "shout_ops-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-ops\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[nearstore.ops]\nshout = shout_ops\n")
    code = ("from nearstore.ops import Pipeline; from nearstore.ops.plugins import op_origins; "
            "p = Pipeline(['test_shout']); print(type(p.ops[0]).version, op_origins()['test_shout'])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["3", "entry", "point", "shout", "(shout_ops)"]
