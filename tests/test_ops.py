"""Op library: validation, declared specs, determinism, fused decoding, split rules."""

from __future__ import annotations

import hashlib

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
from PIL import Image

from nearstore.core.errors import ConfigError, OpParamError, SampleDecodeError
from nearstore.ops import Pipeline, Spec, input_spec, make_op, registry, rng_for, standard_train
from nearstore.ops.image import RandomResizedCrop, decode_geometry
from nearstore.store.synth import synth_image

JPEG = synth_image(3, 1)


def test_registry_has_the_library():
    assert {"decode_jpeg", "random_resized_crop", "resize", "center_crop", "flip", "to_uint8_chw",
            "normalize", "decode_npy"} <= set(registry())


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"op": "nope"}, "unknown op 'nope'; registered ops:"),
        ({"op": "random_resized_crop", "size": 0}, "size"),
        ({"op": "random_resized_crop", "scale": [0.9, 0.1]}, "scale"),
        ({"op": "flip", "p": 1.5}, "p"),
        ({"op": "normalize", "std": [1, 0, 1]}, "std"),
        ({"op": "resize", "sizee": 3}, "sizee"),
        ({"op": "center_crop"}, "size"),
        ({"size": 3}, "an op is given as"),
    ],
)
def test_bad_parameters_name_the_op_and_field(spec, match):
    with pytest.raises(OpParamError, match=match):
        make_op(spec)


def test_kind_mismatch_is_reported_before_running():
    p = Pipeline(["to_uint8_chw"])
    with pytest.raises(OpParamError, match="to_uint8_chw at position 0 takes image"):
        p.declare(input_spec("jpeg", mean_bytes=1e5, mean_hw=(300, 400)))


def test_declared_specs():
    specs = standard_train(224).declare(input_spec("jpeg", mean_bytes=110e3, mean_hw=(375.0, 500.0)))
    assert specs[0].kind == "jpeg" and specs[0].bytes == 110e3
    assert specs[1] == Spec("image", (None, None, 3), "uint8", 375 * 500 * 3, (375.0, 500.0))
    assert specs[2].shape == (224, 224, 3) and specs[2].bytes == 224 * 224 * 3
    assert specs[4].kind == "chw_u8" and specs[4].shape == (3, 224, 224)
    assert specs[5].kind == "chw_f32" and specs[5].dtype == "float32" and specs[5].bytes == 224 * 224 * 3 * 4
    resize = Pipeline(["decode_jpeg", {"op": "resize", "size": 256}]).declare(
        input_spec("jpeg", mean_bytes=1, mean_hw=(400.0, 800.0)))
    assert resize[-1].shape == (None, None, 3) and resize[-1].hw == (256, 512)


def test_outputs_match_declared_specs():
    p = standard_train(160)
    specs = p.declare(input_spec("jpeg", mean_bytes=1, mean_hw=(1.0, 1.0)))
    x = JPEG
    for i in range(len(p.ops) + 1):
        if i in p.valid_splits and i > 0:
            y = p.run(JPEG, key="k", seed=1, epoch=0, stop=i)
            assert y.dtype == np.dtype(specs[i].dtype)
            assert all(d is None or d == s for d, s in zip(specs[i].shape, y.shape))
    assert x is JPEG


def test_same_bits_for_same_seed_epoch_key():
    p = standard_train()
    a = p.run(JPEG, key="a", seed=1, epoch=0)
    assert np.array_equal(a, p.run(JPEG, key="a", seed=1, epoch=0))
    assert not np.array_equal(a, p.run(JPEG, key="a", seed=1, epoch=1))
    assert not np.array_equal(a, p.run(JPEG, key="b", seed=1, epoch=0))
    assert not np.array_equal(a, p.run(JPEG, key="a", seed=2, epoch=0))


def test_rng_is_pure():
    assert rng_for(1, 2, "k", 3).random() == rng_for(1, 2, "k", 3).random()
    assert rng_for(1, 2, "k", 3).random() != rng_for(1, 2, "k", 4).random()


@given(st.integers(0, 2**63), st.integers(0, 1000), st.text(max_size=40), st.integers(0, 31))
@settings(max_examples=200, deadline=None)
def test_reused_generator_gives_the_same_stream(seed, epoch, key, position):
    from nearstore.ops.base import rng_reused

    want = rng_for(seed, epoch, key, position)
    expected = (want.random(3).tolist(), want.integers(0, 1000, 5).tolist(), want.uniform(0.08, 1.0))
    rng_reused(seed + 1, epoch, key, position).random(7)  # a previous use of this thread's generator
    got = rng_reused(seed, epoch, key, position)
    assert (got.random(3).tolist(), got.integers(0, 1000, 5).tolist(), got.uniform(0.08, 1.0)) == expected


def test_fused_decode_equals_decode_then_crop_without_scaling():
    """At DCT scale 8/8 region decoding is exact: the fused stage equals decode + crop + resize."""
    op = RandomResizedCrop(size=64, scale=(0.9, 1.0))  # large boxes: 64 px targets use DCT scaling, so
    big = RandomResizedCrop(size=400, scale=(0.9, 1.0))  # check scale 8/8 with a target near full size
    for seed in range(5):
        full = make_op("decode_jpeg")(JPEG, None)
        ref = np.asarray(Image.open(__import__("io").BytesIO(JPEG)).convert("RGB"))
        assert np.array_equal(full, ref)  # full decode is libjpeg-turbo's exact output (as Pillow's)
        fused = decode_geometry(JPEG, big, rng_for(seed, 0, "k", 1))
        unfused = big(full, rng_for(seed, 0, "k", 1))
        assert np.array_equal(fused, unfused)
        small = decode_geometry(JPEG, op, rng_for(seed, 0, "k", 1))
        assert small.shape == (64, 64, 3)


def test_fused_scaled_decode_is_close_to_full_decode():
    """With DCT scaling the fused result differs in bits but not in content."""
    op = RandomResizedCrop(size=96, scale=(0.9, 1.0))
    full = make_op("decode_jpeg")(JPEG, None)
    a = decode_geometry(JPEG, op, rng_for(0, 0, "k", 1)).astype(np.int16)
    b = op(full, rng_for(0, 0, "k", 1)).astype(np.int16)
    assert np.abs(a - b).mean() < 6


def test_split_rules():
    p = standard_train()
    assert p.valid_splits == [0, 2, 3, 4, 5]
    assert p.resolve_split("host") == 0 and p.resolve_split("node") == 5
    with pytest.raises(ConfigError, match="inside the fused stage decode_jpeg\\+random_resized_crop"):
        p.resolve_split(1)
    with pytest.raises(ConfigError, match="split must be"):
        p.resolve_split("middle")


@pytest.mark.parametrize("k", [0, 2, 3, 4, 5])
def test_any_split_gives_the_same_bits(k):
    p = standard_train()
    whole = p.run(JPEG, key="x", seed=9, epoch=3)
    mid = p.run(JPEG, key="x", seed=9, epoch=3, stop=k)
    assert np.array_equal(whole, p.run(mid, key="x", seed=9, epoch=3, start=k))


def test_corrupt_jpeg_is_a_decode_error():
    bad = JPEG[:200] + b"\x00" * 50 + JPEG[250:]
    with pytest.raises(SampleDecodeError):
        standard_train().run(bad[: len(bad) // 3], key="k", seed=0, epoch=0)
    with pytest.raises(SampleDecodeError, match="not a decodable JPEG"):
        standard_train().run(b"GIF89a not a jpeg", key="k", seed=0, epoch=0)


def test_center_crop_too_small_is_clear():
    with pytest.raises(SampleDecodeError, match="center_crop\\(size=5000\\) needs an image of at least"):
        Pipeline(["decode_jpeg", {"op": "center_crop", "size": 5000}]).run(JPEG, key="k", seed=0, epoch=0)


def test_normalize_matches_reference():
    x = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    y = make_op("normalize")(x, None)
    mean = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)
    assert np.allclose(y, (x / 255.0 - mean) / std, atol=1e-5)


def test_normalize_bits_from_any_layout():
    """The table look-up gives the bits of float32 x * (1 / (255 std)) - mean / std, from any view, into any slot."""
    op = make_op("normalize")
    std = np.asarray(op.params.std, np.float32).reshape(3, 1, 1)
    scale, shift = 1.0 / (255.0 * std), np.asarray(op.params.mean, np.float32).reshape(3, 1, 1) / std
    hwc = np.random.default_rng(0).integers(0, 256, (9, 256, 3), dtype=np.uint8)
    hwc[0] = np.arange(256, dtype=np.uint8)[:, None]  # every value in every channel
    ro = hwc.transpose(2, 0, 1).copy()
    ro.flags.writeable = False  # a received buffer
    views = [hwc.transpose(2, 0, 1), hwc[:, ::-1].transpose(2, 0, 1), ro, ro[:, ::-2, 1::3]]
    for v in views:
        want = (v.astype(np.float32) * scale - shift).view(np.uint32)
        assert np.array_equal(op(v, None).view(np.uint32), want)
        slot = np.zeros((3, v.shape[1], 2 * v.shape[2]), np.float32)[:, :, ::2]  # a strided slot
        op.into(v, None, slot)
        assert np.array_equal(slot.view(np.uint32), want)
    with pytest.raises(ValueError, match="uint8"):
        op.into(hwc.transpose(2, 0, 1).astype(np.int32), None, np.empty((3, 9, 256), np.float32))


def test_pipeline_json_round_trip():
    p = standard_train(128)
    q = Pipeline.from_json(p.to_json())
    assert q.ops == p.ops
    digest = lambda pipe: hashlib.sha256(pipe.run(JPEG, key="k", seed=0, epoch=0).tobytes()).hexdigest()  # noqa: E731
    assert digest(p) == digest(q)


def test_region_decode_equals_full_decode_at_every_scale():
    import random

    from nearstore.ops import _jpeg, jpeg

    rnd = random.Random(0)
    for i in range(6):
        data = synth_image(1, i)
        w, h = jpeg.header(data)
        for m in (1, 2, 4, 8):
            sw, sh = jpeg.scaled_size(w, h, m)
            full = jpeg.decode_region(data, m, 0, 0, sw, sh)
            assert full.shape == (sh, sw, 3)
            for _ in range(8):
                x, y = rnd.randrange(sw - 10), rnd.randrange(sh - 10)
                rw, rh = rnd.randint(1, sw - x), rnd.randint(1, sh - y)
                got = jpeg.decode_region(data, m, x, y, rw, rh)
                assert got.flags.c_contiguous
                assert np.array_equal(got, full[y : y + rh, x : x + rw])
    with pytest.raises(ValueError, match="keep window x=0 y=0 w=5 h=5 lies outside the region x=1"):
        _jpeg.decode_region(data, 8, 1, 1, 10, 10, False, 0, 0, 5, 5)


def test_resize_is_torchs_antialiased_bilinear_in_hwc():
    """resize_hwc hands torch a channels-last tensor (faster); the bits are those of the planar call."""
    import torch

    from nearstore.ops.image import resize_hwc

    rng = np.random.default_rng(1)
    for (h, w), (oh, ow) in [((61, 47), (32, 32)), ((20, 30), (45, 41)), ((50, 50), (50, 20))]:
        src = rng.integers(0, 256, (h + 3, w + 5, 3), dtype=np.uint8)[2 : 2 + h, 1 : 1 + w]  # a region view
        got = resize_hwc(src, oh, ow)
        planar = torch.from_numpy(np.ascontiguousarray(src.transpose(2, 0, 1)))[None]
        ref = torch.nn.functional.interpolate(planar, size=(oh, ow), mode="bilinear", antialias=True,
                                              align_corners=False)[0].numpy().transpose(1, 2, 0)
        assert got.shape == (oh, ow, 3) and got.flags.c_contiguous and np.array_equal(got, ref)


def test_layout_op_hands_views_only_to_ops_that_read_them():
    """to_uint8_chw passes a view (no copy) to a next op with accepts_views in the same run, a copy otherwise."""
    from nearstore.ops.base import Op, register, unregister

    seen: list[tuple[str, bool]] = []

    class Probe(Op):
        name = "test_probe_contiguous"
        inputs = ("chw_u8",)

        def declare(self, spec: Spec) -> Spec:
            return spec.costless()

        def __call__(self, x, rng):  # noqa: ANN001, ANN204
            seen.append((self.name, x.flags.c_contiguous))
            return np.ascontiguousarray(x)

    class ViewProbe(Probe):
        name = "test_probe_views"
        accepts_views = True

    for cls in (Probe, ViewProbe):
        register(cls)
    try:
        crop = ["decode_jpeg", {"op": "random_resized_crop", "size": 32}, "flip", "to_uint8_chw"]
        for name in ("test_probe_contiguous", "test_probe_views"):
            p = Pipeline([*crop, name])
            whole = p.run(JPEG, key="k", seed=1, epoch=0)
            assert np.array_equal(whole, p.run(JPEG, key="k", seed=1, epoch=0, stop=4))  # the same values
            p.run(p.run(JPEG, key="k", seed=1, epoch=0, stop=4), key="k", seed=1, epoch=0, start=4)
        assert seen == [("test_probe_contiguous", True), ("test_probe_contiguous", True),
                        ("test_probe_views", False), ("test_probe_views", True)]
    finally:
        for cls in (Probe, ViewProbe):
            unregister(cls.name)
