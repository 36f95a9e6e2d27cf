"""Real-world JPEGs (issue 15): real photos from scikit-image re-encoded in the variants datasets hold.

CMYK and YCCK decode to RGB as Pillow does; grayscale, progressive, 4:4:4, restart markers and tiny
images decode as Pillow does too (tolerance: 0, every pixel equal; both use libjpeg-turbo's ISLOW IDCT and
fancy upsampling); other image formats are converted to JPEG at ingest.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from nearstore import Loader, Pipeline
from nearstore.ops.jpeg import decode_region, header, scaled_size
from nearstore.store import Store
from nearstore.store.ingest import ingest

skimage_data = pytest.importorskip("skimage.data")

TOLERANCE = 0  # max |ours - Pillow| per channel; docs/errors.md states it


def photos() -> dict[str, np.ndarray]:
    """Real photographs shipped inside scikit-image (no download)."""
    return {"astronaut": skimage_data.astronaut(), "chelsea": skimage_data.chelsea(), "coffee": skimage_data.coffee(),
            "camera": skimage_data.camera()}  # camera is grayscale


def encode(a: np.ndarray, variant: str) -> bytes:
    im = Image.fromarray(a)
    if im.mode != "RGB" and variant not in ("gray",):
        im = im.convert("RGB")
    kw: dict = {"quality": 85}
    if variant == "progressive":
        kw["progressive"] = True
    elif variant == "444":
        kw.update(quality=92, subsampling=0)
    elif variant == "restart":
        kw["restart_marker_rows"] = 1
    elif variant == "gray":
        im = im.convert("L")
    elif variant == "tiny":
        im = im.resize((3, 5))
    elif variant == "one-pixel":
        im = im.resize((1, 1))
    elif variant == "cmyk":
        im = im.convert("CMYK")  # written with Adobe's inverted polarity, as Photoshop does
    elif variant == "ycck":
        return ycck_jpeg(np.asarray(im))
    out = io.BytesIO()
    im.save(out, "JPEG", **kw)
    return out.getvalue()


def ycck_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """A YCCK JPEG (Adobe transform 2), as Photoshop writes CMYK, made without an encoder that writes YCCK.

    libjpeg's CMYK -> YCCK step (jccolor.c) is done here: R, G, B = 255 - the stored C, M, Y, then the JFIF
    YCbCr transform; K passes through. Pillow encodes those four planes as a CMYK JPEG (inverting them, so we
    hand it 255 - YCCK), and the Adobe marker's transform byte is set from 0 (CMYK) to 2 (YCCK): the file is
    what a YCCK encoder writes, down to the entropy-coded data.
    """
    stored = 255.0 - np.asarray(Image.fromarray(rgb).convert("CMYK"), np.float64)  # what a CMYK JPEG holds
    r, g, b = (255.0 - stored[..., k] for k in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168735892 * r - 0.331264108 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418687589 * g - 0.081312411 * b + 128
    ycck = np.clip(np.rint(np.stack([y, cb, cr, stored[..., 3]], -1)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(255 - ycck, "CMYK").save(out, "JPEG", quality=quality)
    raw = bytearray(out.getvalue())
    at = raw.index(b"\xff\xee")  # APP14: FFEE, length (2), "Adobe", version (2), flags0 (2), flags1 (2), transform
    assert raw[at + 4 : at + 9] == b"Adobe" and raw[at + 15] == 0
    raw[at + 15] = 2
    return bytes(raw)


VARIANTS = ["plain", "progressive", "444", "restart", "gray", "tiny", "one-pixel", "cmyk", "ycck"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_decodes_as_pillow_does(variant):
    for name, a in photos().items():
        data = encode(a, variant)
        if variant == "restart":
            assert b"\xff\xdd" in data  # a DRI marker: restart intervals really are there
        if variant in ("cmyk", "ycck"):
            im = Image.open(io.BytesIO(data))
            assert im.mode == "CMYK" and im.info["adobe_transform"] == (2 if variant == "ycck" else 0)
        w, h = header(data)
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
        got = decode_region(data, 8, 0, 0, w, h).astype(int)
        assert got.shape == ref.shape and np.abs(got - ref).max() <= TOLERANCE, (name, variant)


def test_ycck_really_is_ycck_and_decodes_close_to_the_photo():
    """The YCCK file's colour transform matters: read with transform 0 (as CMYK) its colours are far off."""
    a = photos()["astronaut"]
    data = encode(a, "ycck")
    w, h = header(data)
    got = decode_region(data, 8, 0, 0, w, h).astype(int)
    assert np.abs(got - a).mean() < 3.0  # quality 90, 4:4:4: close to the original photo
    as_cmyk = bytearray(data)
    as_cmyk[as_cmyk.index(b"Adobe") + 11] = 0
    wrong = decode_region(bytes(as_cmyk), 8, 0, 0, w, h).astype(int)
    assert np.abs(wrong - a).mean() > 30.0


@pytest.mark.parametrize("variant", ["cmyk", "ycck"])
def test_cmyk_region_at_a_dct_scale_matches_pillows_draft_decode(variant):
    data = encode(photos()["coffee"], variant)
    w, h = header(data)
    for m in (1, 2, 4):
        sw, sh = scaled_size(w, h, m)
        im = Image.open(io.BytesIO(data))
        im.draft("CMYK", (sw, sh))
        ref = np.asarray(im.convert("RGB"))
        assert ref.shape[:2] == (sh, sw)
        got = decode_region(data, m, sw // 4, sh // 5, sw // 2, sh // 2, full=(sw, sh))
        assert np.array_equal(got, ref[sh // 5 : sh // 5 + sh // 2, sw // 4 : sw // 4 + sw // 2])


def test_a_folder_with_every_variant_and_other_formats_ingests_and_loads(tmp_path):
    src = tmp_path / "src"
    a = {k: v for k, v in photos().items() if k in ("astronaut", "camera")}  # a colour and a grayscale photo
    for label, (name, arr) in enumerate(a.items()):
        d = src / f"c{label}"
        d.mkdir(parents=True)
        for v in VARIANTS:
            (d / f"{name}-{v}.jpg").write_bytes(encode(arr, v))
        png = io.BytesIO()
        Image.fromarray(arr).save(png, "PNG")
        (d / f"{name}-png-named.JPEG").write_bytes(png.getvalue())  # ImageNet has such a file
        rgba = io.BytesIO()
        Image.fromarray(arr).convert("RGBA").save(rgba, "WEBP", lossless=True)
        (d / f"{name}.webp").write_bytes(rgba.getvalue())
    report = ingest(src, tmp_path / "store", nodes=1, replicas=1)
    per_class = len(VARIANTS) + 2
    assert report.samples == 2 * per_class and not report.skipped
    assert sorted({c["format"] for c in report.converted}) == ["PNG", "WEBP"] and len(report.converted) == 4
    st = Store(tmp_path / "store")
    png_key = next(i for i in range(len(st)) if st.ref(i).key.endswith("astronaut-png-named"))
    stored, _ = st.read(png_key)
    back = np.asarray(Image.open(io.BytesIO(bytes(stored))).convert("RGB")).astype(int)
    assert np.abs(back - a["astronaut"]).mean() < 2.0  # quality 95, 4:4:4: close to the lossless original
    st.close()
    pipe = Pipeline(["decode_jpeg", {"op": "random_resized_crop", "size": 32}, "flip", "to_uint8_chw"])
    with Loader(store=tmp_path / "store", pipeline=pipe, batch_size=8, seed=1) as ld:
        n = sum(len(b) for b in ld)
        assert n == report.samples and ld.stats.skipped == 0


def test_a_batch_whose_every_sample_was_skipped_is_never_handed_out(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    good = encode(photos()["chelsea"], "plain")
    for i in range(4):
        (src / "a" / f"good{i}.jpg").write_bytes(good)
    for i in range(4):  # a valid header, then cut short: ingest keeps them, decoding fails
        (src / "a" / f"zbad{i}.jpg").write_bytes(good[: len(good) // 2])  # truncated
    ingest(src, tmp_path / "store", nodes=1, replicas=1)
    pipe = Pipeline(["decode_jpeg", {"op": "center_crop", "size": 32}, "to_uint8_chw"])
    with Loader(store=tmp_path / "store", pipeline=pipe, batch_size=4, seed=0, shuffle=False,
                on_error="skip") as ld:
        sizes = [len(b) for b in ld]
    assert sizes == [4] and ld.stats.skipped == 4 and ld.stats.empty_batches == 1
