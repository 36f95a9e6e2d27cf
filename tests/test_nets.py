"""Network layers as ops: counts against the papers, cuts, weights, engines, output dtypes, a real node.

Cheap by design: counting runs on torch's meta device (no arithmetic); forwards use MobileNetV2 and
ResNet-18 on small inputs; ResNet-50 only declares and counts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nearstore import Loader, Pipeline
from nearstore.bench.accel import emulated_training
from nearstore.core.errors import ConfigError, OpParamError, SampleDecodeError
from nearstore.nets import ARCHS, CUTS, decode_q8, describe, encode, encoded_shape, engines, max_rel_error
from nearstore.nets import models
from nearstore.nets.quant import TOLERANCE
from nearstore.node import LocalCluster
from nearstore.node.workers import NodeWork
from nearstore.ops import Spec, make_op, network_ops
from nearstore.ops.pipeline import input_spec
from nearstore.store.ingest import ingest
from nearstore.store.synth import SynthSpec, synth_folder
from nearstore.train import HeadTrainer

pytestmark = pytest.mark.timeout(240)

#: published figures at 224x224, classifier included: parameters, MACs
PAPER = {"resnet18": (11.69e6, 1.82e9), "resnet50": (25.557e6, 4.1e9), "mobilenet_v2": (3.5e6, 300e6)}
CLASSIFIER = {"resnet18": 512 * 1000 + 1000, "resnet50": 2048 * 1000 + 1000, "mobilenet_v2": 1280 * 1000 + 1000}
CROP = Spec("chw_u8", (3, 224, 224), "uint8", 3 * 224 * 224)


@pytest.fixture(autouse=True)
def onnx_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NEARSTORE_CACHE", str(tmp_path_factory.getbasetemp() / "nets-cache"))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_counts_match_the_papers(arch):
    info = describe(arch, "pooled")
    params, macs = PAPER[arch]
    assert info.params + CLASSIFIER[arch] == pytest.approx(params, rel=0.005)
    assert info.macs + CLASSIFIER[arch] - 1000 == pytest.approx(macs, rel=0.03)


def _meta_count(net, arch: str, cut: str, hw: tuple[int, int]) -> tuple[int, tuple, int]:  # noqa: ANN001
    """Parameters, output shape and conv MACs of the real module cut at ``cut``, measured on the meta device
    (no arithmetic)."""
    module = models.Cut([(models._mangle(p), m) for p, m in models._parts(arch, net, cut)], cut == "pooled")
    macs = [0]

    def hook(m, inp, out):  # noqa: ANN001
        macs[0] += m.weight.numel() * out.shape[2] * out.shape[3]

    hooks = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    y = module(torch.empty((1, 3, *hw), device="meta"))
    for h in hooks:
        h.remove()
    return sum(p.numel() for p in module.parameters()), tuple(y.shape[1:]), macs[0]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_describe_matches_the_modules_at_every_cut(arch):
    with torch.device("meta"):
        net = models.backbone(arch)
    for cut in CUTS:
        for hw in ((224, 224), (96, 128)):
            params, shape, macs = _meta_count(net, arch, cut, hw)
            info = describe(arch, cut, hw)
            assert (info.params, info.shape, info.macs) == (params, shape, macs), (cut, hw)


def test_declare_shapes_bytes_and_costs():
    layer1 = make_op({"op": "network", "arch": "resnet50", "cut": "layer1"}).declare(CROP)
    assert (layer1.kind, layer1.shape, layer1.dtype, layer1.bytes) == ("act", (256, 56, 56), "float32", 3211264)
    assert layer1.bytes / CROP.bytes > 21
    pooled = make_op({"op": "network", "arch": "resnet50", "cut": "pooled", "dtype": "float16"}).declare(CROP)
    assert pooled.shape == (2048,) and pooled.bytes == 4096 and pooled.bytes <= CROP.bytes / 30
    assert pooled.macs == describe("resnet50", "pooled").macs and pooled.macs == pytest.approx(4.09e9, rel=0.01)
    assert pooled.param_bytes == pytest.approx(4 * 23.56e6, rel=0.01) and pooled.resident_bytes > 0
    assert "cpu" in pooled.where and "accelerator" in pooled.where
    q8 = make_op({"op": "network", "arch": "resnet18", "cut": "layer3", "dtype": "int8"}).declare(CROP)
    assert (q8.kind, q8.shape, q8.dtype, q8.bytes) == ("act_q8", (4 + 256 * 14 * 14,), "int8", 4 + 256 * 14 * 14)
    pipe = Pipeline(["to_uint8_chw", *network_ops("resnet18", "layer3", dtype="int8")])
    spec = pipe.declare(Spec("image", (224, 224, 3), "uint8", 150528))[-1]
    assert (spec.kind, spec.shape, spec.dtype) == ("act", (256, 14, 14), "float32")
    with pytest.raises(OpParamError, match="fixed-size 3xHxW"):
        make_op("network").declare(Spec("chw_u8", (3, None, None), "uint8", 1.0))


@pytest.mark.parametrize("bad, words", [({"arch": "resnet51"}, ["resnet18", "resnet50", "mobilenet_v2"]),
                                        ({"cut": "layer5"}, list(CUTS)),
                                        ({"dtype": "bfloat16"}, ["float32", "float16", "int8"]),
                                        ({"engine": "tvm"}, ["auto", "pytorch", "onnxruntime"])])
def test_bad_parameters_list_the_valid_ones(bad, words):
    with pytest.raises(OpParamError) as exc:
        make_op({"op": "network", **bad})
    assert all(w in str(exc.value) for w in words)


def test_quantization_round_trip_and_non_finite():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((3, 8, 2, 2)).astype(np.float32) * np.array([1, 100, 1e-3], np.float32)[:, None, None, None]
    out = np.empty((3, *encoded_shape((8, 2, 2), "int8")), np.int8)
    assert encode(y, "int8", out) == []
    back = decode_q8(out, (8, 2, 2))
    for i in range(3):
        assert max_rel_error(back[i], y[i]) <= 0.5 / 127 + 1e-6
    y[1, 0, 0, 0] = np.nan
    y[2, 1, 1, 1] = 1e6  # fine in float32 and int8, an Inf in float16
    assert encode(y, "int8", out) == [1]
    assert encode(y, "float16", np.empty(y.shape, np.float16)) == [1, 2]


def _crops(n: int, hw: tuple[int, int] = (64, 64), seed: int = 0) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    return [g.integers(0, 256, (3, *hw), dtype=np.uint8) for _ in range(n)]


def _run(op, xs):  # noqa: ANN001
    spec = op.declare(Spec("chw_u8", xs[0].shape, "uint8", float(xs[0].size)))
    out = np.empty((len(xs), *spec.shape), spec.dtype)
    op.run_batch(xs, [None] * len(xs), out)
    return out


def _net(cut: str, **kw) -> object:
    return make_op({"op": "network", "arch": "mobilenet_v2", "cut": cut, **kw})


def test_batches_engines_and_dtypes_agree_within_tolerance():
    xs = _crops(6)
    ref_op = _net("layer3", engine="pytorch")
    ref = _run(ref_op, xs)
    alone = np.stack([ref_op(x, None) for x in xs])  # the same sample in a batch of one
    f16 = _run(_net("layer3", dtype="float16", engine="pytorch"), xs)
    q8 = decode_q8(_run(_net("layer3", dtype="int8", engine="pytorch"), xs), (96, 4, 4))
    normalized = [make_op("normalize")(x, None) for x in xs]  # chw_f32 input: the same numbers
    from_f32 = np.empty((6, *ref_op.declare(Spec("chw_f32", (3, 64, 64), "float32", 1.0)).shape), np.float32)
    ref_op.run_batch(normalized, [None] * 6, from_f32)
    # ONNX Runtime on the stem (exporting a deep cut costs seconds; the engine is the same code for any cut)
    stem = _run(_net("stem", engine="pytorch"), xs)
    ort = _run(_net("stem", engine="onnxruntime"), xs)
    ort_q8 = decode_q8(_run(_net("stem", engine="onnxruntime", dtype="int8"), xs), (16, 32, 32))
    for i in range(6):
        assert max_rel_error(alone[i], ref[i]) <= TOLERANCE["pytorch", "float32"]
        assert max_rel_error(f16[i], ref[i]) <= TOLERANCE["pytorch", "float16"]
        assert max_rel_error(q8[i], ref[i]) <= TOLERANCE["pytorch", "int8"]
        assert max_rel_error(ort[i], stem[i]) <= TOLERANCE["onnxruntime", "float32"]
        assert max_rel_error(ort_q8[i], stem[i]) <= TOLERANCE["onnxruntime", "int8"]
        assert np.array_equal(from_f32[i], ref[i])
    assert float(np.abs(ref).max()) > 0.1  # seeded weights give activations of a sane scale, not ~0
    assert not np.allclose(ref[0], ref[1])


def test_auto_engine_measures_and_engines_are_listed():
    assert {"pytorch", "onnxruntime"} <= set(engines())
    op = _net("stem")
    _run(op, _crops(2))  # the same export as above (cached by architecture, cut, size and weights)
    assert op.engine_name in ("pytorch", "onnxruntime") and set(op.engine_times) == {"pytorch", "onnxruntime"}
    assert op.engine_times[op.engine_name] == min(op.engine_times.values())


def test_weights_files_round_trip_and_mismatches_name_the_key(tmp_path):
    ref = models.build("mobilenet_v2", "layer1", seed=4)
    x = torch.randn(2, 3, 64, 64)
    state = models.state_of(ref)
    pt = tmp_path / "m.pt"
    torch.save({f"mobilenet_v2.{k}": v for k, v in state.items()} | {"classifier.weight": torch.zeros(3)}, pt)
    assert torch.equal(models.build("mobilenet_v2", "layer1", weights=str(pt))(x), ref(x))
    onnx_path = tmp_path / "m.onnx"
    models.export_onnx(models.build("mobilenet_v2", "stem", seed=4), onnx_path)
    assert torch.equal(models.build("mobilenet_v2", "stem", weights=str(onnx_path))(x),
                       models.build("mobilenet_v2", "stem", seed=4)(x))
    bad = dict(state)
    key = "layer.1.conv_3x3.convolution.weight"
    bad[key] = torch.zeros(144, 1, 5, 5)
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(OpParamError, match=r"'layer.1.conv_3x3.convolution.weight' has shape \(144, 1, 5, 5\).*"
                                           r"needs \(144, 1, 3, 3\)"):
        models.build("mobilenet_v2", "layer1", weights=str(tmp_path / "shape.pt"))
    del bad[key]
    torch.save(bad, tmp_path / "missing.pt")
    with pytest.raises(OpParamError, match="lack 'layer.1.conv_3x3.convolution.weight'"):
        models.build("mobilenet_v2", "layer1", weights=str(tmp_path / "missing.pt"))
    r18 = tmp_path / "r18.pt"  # a ResNet-18 file (its stem is ResNet-50's) for ResNet-50: the first key that differs
    torch.save(models.state_of(models.build("resnet18", "stem")), r18)
    with pytest.raises(OpParamError, match="lack 'encoder.stages.0.layers.0.shortcut.convolution.weight'"):
        models.build("resnet50", "layer1", weights=str(r18))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(OpParamError, match="not a readable PyTorch state dict"):
        models.build("resnet18", "stem", weights=str(tmp_path / "junk.pt"))
    with pytest.raises(OpParamError, match="does not exist"):
        models.build("resnet18", "stem", weights=str(tmp_path / "nope.pt"))


def test_nan_is_a_sample_error_not_a_sample(tmp_path):
    op = make_op({"op": "network", "arch": "mobilenet_v2", "cut": "stem", "engine": "pytorch"})
    xs = [make_op("normalize")(x, None) for x in _crops(3, (32, 32))]
    xs[1] = xs[1].copy()
    xs[1][0, 3, 3] = np.nan
    with pytest.raises(SampleDecodeError, match=r"NaN or Inf for sample\(s\) \[1\]"):
        op.run_batch(xs, [None] * 3, np.empty((3, 16, 16, 16), np.float32))


@pytest.fixture(scope="module")
def labelled_store(tmp_path_factory):
    """48 JPEGs of 4 classes that their colors separate (synth --class-colors), on one node."""
    base = tmp_path_factory.mktemp("labelled")
    synth_folder(base / "img", SynthSpec(n=48, seed=3, classes=4, class_colors=True), workers=1)
    ingest(base / "img", base / "store", nodes=1, shard_size=1 << 20)
    return base / "store"


@pytest.fixture(scope="module")
def cluster(labelled_store):
    with LocalCluster(labelled_store, workers_per_node=1) as c:
        yield c


CROP64 = ["decode_jpeg", {"op": "random_resized_crop", "size": 64, "scale": [0.5, 1.0]}, "flip", "to_uint8_chw"]


def _features(store, ops, split, cluster=None):  # noqa: ANN001
    kw = {"cluster": cluster, "split": split} if cluster else {}
    with Loader(None if cluster else store, pipeline=Pipeline(CROP64 + ops), batch_size=16, shuffle=False,
                workers=1, **kw) as loader:
        return np.concatenate([b.data for b in loader])


def test_node_side_equals_host_side_for_every_cut(labelled_store, cluster, tmp_path):
    for cut in CUTS:
        ops = [{"op": "network", "arch": "mobilenet_v2", "cut": cut, "engine": "pytorch"}]
        host = _features(labelled_store, ops, "host")
        node = _features(labelled_store, ops, "node", cluster)
        assert host.shape == node.shape == (48, *describe("mobilenet_v2", cut, (64, 64)).shape)
        for a, b in zip(node, host):
            assert max_rel_error(a, b) <= TOLERANCE["pytorch", "float32"], cut
    ops = network_ops("mobilenet_v2", "layer2", dtype="int8", engine="pytorch", hw=(64, 64))
    node = _features(labelled_store, ops[:1], "node", cluster)  # int8 rows on the wire, dequantized on the host
    assert node.dtype == np.int8 and node.shape == (48, 4 + 32 * 8 * 8)
    both = _features(labelled_store, ops, len(CROP64) + 1, cluster)
    host = _features(labelled_store, ops, "host")
    for a, b in zip(both, host):
        assert max_rel_error(a, b) <= TOLERANCE["pytorch", "int8"]
    nan = tmp_path / "nan.pt"
    state = models.state_of(models.build("mobilenet_v2", "stem"))
    state["conv_stem.first_conv.convolution.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, nan)
    pipe = Pipeline(CROP64 + [{"op": "network", "arch": "mobilenet_v2", "cut": "stem", "weights": str(nan)}])
    with Loader(cluster=cluster, pipeline=pipe, split="node", batch_size=16, on_error="skip", workers=1) as loader:
        assert sum(len(b) for b in loader) == 0
        assert loader.stats.skipped == 48
        assert "NaN or Inf" in loader.stats.skipped_samples[0]["error"]


def test_segments_compute_what_the_uncut_network_computes():
    """input..layer1, layer1..layer3, layer3..pooled run one after the other equal the network to pooled (same
    seeded weights); for every architecture they declare the uncut network's MACs and parameters between them."""
    x = torch.from_numpy(np.stack([make_op("normalize")(c, None) for c in _crops(2, (64, 64))]))
    bounds = (("input", "layer1"), ("layer1", "layer3"), ("layer3", "pooled"))
    y = x
    for a, b in bounds:
        y = models.build("resnet18", b, seed=5, start=a)(y)
    assert torch.allclose(y, models.build("resnet18", "pooled", seed=5)(x), rtol=1e-5, atol=1e-5)
    for arch in ARCHS:
        parts = [describe(arch, b, (224, 224), a) for a, b in bounds]
        full = describe(arch, "pooled")
        assert sum(p.macs for p in parts) == full.macs and sum(p.params for p in parts) == full.params
        assert parts[1].in_shape == describe(arch, "layer1").shape and parts[2].shape == full.shape


def test_segment_errors_name_the_valid_choices():
    with pytest.raises(OpParamError, match=r"must end at a later cut \(layer3, layer4, pooled\), not 'stem'"):
        make_op({"op": "network", "arch": "resnet18", "start": "layer2", "cut": "stem"})
    with pytest.raises(OpParamError, match="starts: input, stem, layer1"):
        network_ops("resnet18", "pooled", segments=("pooled",))
    seg = Pipeline(["decode_jpeg", {"op": "center_crop", "size": 64}, "to_uint8_chw",
                    {"op": "network", "arch": "resnet18", "start": "layer1", "cut": "pooled"}])
    with pytest.raises(OpParamError, match="takes resnet18's float layer1 activations"):
        seg.declare(input_spec("jpeg", mean_bytes=1e4, mean_hw=(64.0, 64.0)))


def test_a_split_inside_the_network_equals_the_host(labelled_store, cluster):
    """The nodes run the network to layer2 and send its activations; the host runs layer2..pooled."""
    ops = network_ops("resnet18", "pooled", engine="pytorch", segments=("layer2",))
    pipe = Pipeline(CROP64 + ops)
    assert [st.name for st in pipe.stages][-2:] == ["network", "network@layer2"]
    inside = _features(labelled_store, ops, len(CROP64) + 1, cluster)
    host = _features(labelled_store, [{"op": "network", "arch": "resnet18", "cut": "pooled", "engine": "pytorch"}],
                     "host")
    assert inside.shape == host.shape == (48, 512)
    for a, b in zip(inside, host):
        assert max_rel_error(a, b) <= TOLERANCE["pytorch", "float32"]


def test_frozen_backbone_on_the_node_trains_a_head_on_the_host(cluster):
    """Transfer learning end to end (issue 11 point 3): features from a real node, a real training step here."""
    trainer = HeadTrainer(512, 4, lr=1e-2, seed=0)
    pipe = Pipeline(CROP64 + network_ops("resnet18", "pooled", dtype="float16", engine="pytorch"))
    res = emulated_training(cluster.spec, pipeline=pipe, split="node", step_time=0.0, samples=96, batch_size=16,
                            workers=1, step=trainer)
    first, last = trainer.loss_fell()
    assert last < 0.6 * first, trainer.losses
    assert res["step"] == "real" and res["samples"] >= 96 and 0 < res["au"] <= 1
    assert res["bytes_per_sample"] < 512 * 2 + 200  # fp16 features and a row's framing, not a 12 KB crop
    assert "network" in res["node_stage_seconds"] and not res["host_stage_seconds"].get("network")


def test_a_network_too_big_for_the_node_is_refused_with_sizes(labelled_store):
    work = NodeWork(labelled_store / "node-000", memory_bytes=200e6)
    ops = CROP64 + [{"op": "network", "arch": "resnet50"}]
    work.schema(ops, batch_size=16, copies=1)  # ~94 MB of parameters + 16 small samples fit
    with pytest.raises(ConfigError, match=r"2 worker\(s\) x \(94.2 MB of parameters \+ 64 samples x .* MB "
                                          r"resident\) = .* MB, but it has 200.0 MB"):
        work.schema(ops, batch_size=64, copies=2)
    work.close()
    assert math.isclose(describe("resnet50", "pooled").param_bytes, 94.24e6, rel_tol=1e-3)


def test_weights_digest_names_the_file_or_seed(tmp_path):
    (tmp_path / "a.pt").write_bytes(b"x")
    assert models.weights_digest(None, 3) == "seed-3"
    assert models.weights_digest(str(tmp_path / "a.pt"), 0).startswith("sha256-")
