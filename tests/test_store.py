"""Store: ingest layout, WebDataset interop, integrity errors, crash-safe ingest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from nearstore.core.errors import ChecksumError, ConfigError, SampleDecodeError, SourceError, StoreError, StoreFormatError
from nearstore.store import Manifest, Store, ingest, node_dir_name
from nearstore.store.synth import SynthSpec, synth_folder, synth_image


def test_synth_is_deterministic_and_imagenet_like(tmp_path):
    a = synth_image(5, 3)
    assert a == synth_image(5, 3) and a != synth_image(5, 4)
    summary = synth_folder(tmp_path / "x", SynthSpec(n=12, seed=1, classes=3), workers=2)
    files = sorted((tmp_path / "x").rglob("*.jpg"))
    assert len(files) == 12 and summary["classes"] == 3
    assert files[0].read_bytes() == synth_image(1, int(files[0].stem.split("_")[1]))
    from nearstore.ops.jpeg import header

    dims = [header(synth_image(0, i)) for i in range(40)]
    assert all(200 <= d <= 1000 for wh in dims for d in wh)
    sizes = [len(synth_image(0, i)) for i in range(40)]
    assert 60e3 < np.mean(sizes) < 170e3  # near ImageNet's ~110 KB
    w, h = header(synth_image(0, 0, large=True))
    assert 0.9e6 <= w * h <= 4.2e6


def test_ingest_layout_and_manifest(store, image_folder):
    man = Manifest.load(store)
    assert man.num_samples == 48 and man.classes == [f"class_{i:04d}" for i in range(4)]
    assert len(man.shards) > 2 and man.nodes == 2 and man.replicas == 2
    for s in man.shards:
        assert len(s.nodes) == 2 and len(set(s.nodes)) == 2
        for n in s.nodes:
            assert (store / node_dir_name(n) / f"{s.name}.tar").exists()
            assert (store / node_dir_name(n) / f"{s.name}.idx.arrow").exists()
    for n in range(2):
        assert json.loads((store / node_dir_name(n) / "manifest.json").read_text()) == json.loads(man.dumps())
    st = Store(store)
    data, ref = st.read(0)
    first = sorted((image_folder / "class_0000").glob("*.jpg"))[0]
    assert data == first.read_bytes() and ref.label == 0
    assert not list(store.rglob("*.tmp"))


def test_webdataset_reads_our_shards(store):
    man = Manifest.load(store)
    st = Store(store)
    seen = {}
    for s in man.shards:
        tar = str(store / node_dir_name(s.nodes[0]) / f"{s.name}.tar")
        for sample in wds.WebDataset(tar, shardshuffle=False):
            seen[sample["__key__"]] = (sample["jpg"], int(sample["cls"]))
    assert len(seen) == 48
    for i in range(48):
        data, ref = st.read(i)
        assert seen[ref.key] == (data, ref.label)


def test_ingest_reads_webdataset_tars(tmp_path):
    with wds.TarWriter(str(tmp_path / "in-000.tar")) as w:
        for i in range(10):
            w.write({"__key__": f"sample{i:03d}", "jpg": synth_image(2, i), "cls": str(i % 3).encode()})
    src = tmp_path / "wds"
    src.mkdir()
    (tmp_path / "in-000.tar").rename(src / "in-000.tar")
    rep = ingest(src, tmp_path / "store", nodes=3, replicas=2)
    assert rep.samples == 10 and rep.nodes == 3
    st = Store(tmp_path / "store")
    assert [st.read(i)[0] for i in range(10)] == [synth_image(2, i) for i in range(10)]
    assert st.labels().tolist() == [i % 3 for i in range(10)]


def _empty(d: Path) -> Path:
    return d


def _no_images(d: Path) -> Path:
    (d / "a").mkdir()
    (d / "a" / "x.txt").write_text("hi")
    return d


def _missing(d: Path) -> Path:
    return d / "missing"


def _not_tar(d: Path) -> Path:
    (d / "f.bin").write_bytes(b"x")
    return d / "f.bin"


def _bad_tar(d: Path) -> Path:
    (d / "t.tar").write_bytes(b"garbage" * 100)
    return d


@pytest.mark.parametrize(
    "make,match",
    [
        (_empty, "has no class subfolders"),
        (_no_images, "holds no images"),
        (_missing, "does not exist"),
        (_not_tar, "is a file but not a .tar"),
        (_bad_tar, "not a readable tar"),
    ],
)
def test_bad_sources_are_specific(tmp_path, make, match):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(SourceError, match=match):
        ingest(make(src), tmp_path / "store")
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_bad_ingest_parameters(tmp_path, image_folder):
    with pytest.raises(ConfigError, match="replicas must be in 1..nodes=2"):
        ingest(image_folder, tmp_path / "s", nodes=2, replicas=3)
    with pytest.raises(ConfigError, match="shard_size"):
        ingest(image_folder, tmp_path / "s", shard_size=10)
    with pytest.raises(ConfigError, match="shard_samples must be >= 1"):
        ingest(image_folder, tmp_path / "s", shard_samples=0)


def test_shard_samples_caps_each_shard(tmp_path, image_folder):
    ingest(image_folder, tmp_path / "s", nodes=4, shard_samples=6)  # 48 samples: 8 shards, 2 on each node
    man = Manifest.load(tmp_path / "s")
    assert [s.samples for s in man.shards] == [6] * 8
    assert sorted(n for s in man.shards for n in s.nodes) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_corrupt_image_in_source(tmp_path, image_folder):
    src = tmp_path / "src"
    (src / "c0").mkdir(parents=True)
    for i in range(3):
        (src / "c0" / f"{i}.jpg").write_bytes(synth_image(0, i))
    (src / "c0" / "bad.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(SampleDecodeError, match="bad.jpg.*--on-error skip"):
        ingest(src, tmp_path / "store")
    rep = ingest(src, tmp_path / "store", on_error="skip")
    assert rep.samples == 3 and len(rep.skipped) == 1 and "bad.jpg" in rep.skipped[0]["source"]


def test_missing_store_and_manifest(tmp_path):
    with pytest.raises(StoreError, match="no such directory.*nearstore ingest"):
        Store(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    with pytest.raises(StoreError, match="an ingest never finished there"):
        Store(tmp_path / "half")
    (tmp_path / "half" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreFormatError, match="manifest .* is malformed"):
        Store(tmp_path / "half")


def _first_shard(path: Path) -> Path:
    man = Manifest.load(path)
    s = man.shards[0]
    return path / node_dir_name(s.nodes[0]) / f"{s.name}.tar"


def test_manifest_pointing_at_missing_shard(fresh_store):
    _first_shard(fresh_store).unlink()
    with pytest.raises(StoreFormatError, match="missing file .*manifest points at a shard that is not on disk"):
        Store(fresh_store).read(0)


def test_missing_index(fresh_store):
    tar = _first_shard(fresh_store)
    tar.with_name(tar.name.replace(".tar", ".idx.arrow")).unlink()
    with pytest.raises(StoreFormatError, match="missing shard index"):
        Store(fresh_store).read(0)


def test_truncated_tar(fresh_store):
    tar = _first_shard(fresh_store)
    os.truncate(tar, tar.stat().st_size // 2)
    with pytest.raises(StoreFormatError, match="points past the end of its tar.*truncated"):
        Store(fresh_store).read(0)


def test_checksum_mismatch_is_never_delivered(fresh_store):
    tar = _first_shard(fresh_store)
    st = Store(fresh_store)
    idx = st.reader(0).index
    st.close()
    with open(tar, "r+b") as f:
        f.seek(int(idx.offset[1]) + 100)
        b = f.read(1)
        f.seek(int(idx.offset[1]) + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    st = Store(fresh_store)
    st.read(0)
    with pytest.raises(ChecksumError, match=f"key {idx.keys[1]}: crc32c mismatch"):
        st.read(1)


INGEST_SCRIPT = """
import sys
from nearstore.store.ingest import ingest
ingest(sys.argv[1], sys.argv[2], nodes=2, replicas=2, shard_size=200_000)
"""


@pytest.mark.timeout(120)
def test_ingest_killed_midway_leaves_old_or_new(tmp_path, image_folder):
    """SIGKILL at several points: the store is the previous one or the complete new one, never half."""
    store = tmp_path / "store"
    ingest(image_folder, store, nodes=2, replicas=1, shard_size=1 << 20)
    old = Manifest.load(store)
    other = tmp_path / "other"
    synth_folder(other, SynthSpec(n=20, seed=99, classes=2), workers=1)
    outcomes = set()
    for delay in (0.05, 0.15, 0.3, 0.5, 0.8, 1.5):
        proc = subprocess.Popen([sys.executable, "-c", INGEST_SCRIPT, str(other), str(store)])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        man = Manifest.load(store)
        st = Store(store)
        assert man.generation == old.generation or man.num_samples == 20
        outcomes.add(man.generation == old.generation)
        for i in range(man.num_samples):  # every sample readable and verified
            st.read(i)
        st.close()
        if man.generation != old.generation:
            break
    # a finished run afterwards sweeps what killed runs left behind
    ingest(other, store, nodes=2, replicas=2, shard_size=200_000)
    man = Manifest.load(store)
    names = {f.name for f in store.rglob("*") if f.is_file()}
    expected = {"manifest.json"} | {f"{s.name}{ext}" for s in man.shards for ext in (".tar", ".idx.arrow")}
    assert names == expected
    assert True in outcomes  # at least one kill landed before the commit point


# -- checksums: crc32c-rs computes what google-crc32c and the crc32c package did ----------------------

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("data,expected", [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),  # the CRC-32C check value
    (bytes(32), 0x8A9136AA),  # RFC 3720 B.4: 32 bytes of zeros
    (b"\xff" * 32, 0x62A8AB43),  # 32 bytes of ones
    (bytes(range(32)), 0x46DD794E),  # 32 incrementing bytes
])
def test_crc32c_known_vectors_on_every_buffer_kind(data, expected):
    from nearstore.core.checksum import crc32c

    assert crc32c(data) == expected
    assert crc32c(bytearray(data)) == crc32c(memoryview(data)) == crc32c(np.frombuffer(data, np.uint8)) == expected
    assert crc32c(data[5:], crc32c(data[:5])) == expected  # continuing from a value


def test_a_store_written_with_the_old_crc32c_package_still_verifies():
    """tests/data/store-crc32c-v1 was ingested with the LGPL ``crc32c`` package; every checksum must still hold."""
    st = Store(DATA / "store-crc32c-v1")
    try:
        man = st.manifest
        assert man.checksum == man.body_crc32c() and len(st) == 6
        for i in range(len(st)):
            data, ref = st.read(i)  # verifies the sample's crc32c (and the index's, on first open)
            assert len(data) > 0 and ref.key
        for n in (0, 1):
            assert Manifest.load(DATA / "store-crc32c-v1" / node_dir_name(n)).checksum == man.checksum
    finally:
        st.close()
