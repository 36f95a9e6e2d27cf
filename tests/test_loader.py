"""Loader: determinism across processes, exact resume, rank shares, errors, stats, PyTorch adapter."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from nearstore import Loader, standard_train
from nearstore.core.errors import ConfigError, ResumeStateError
from nearstore.loader import SampleError
from nearstore.loader.torch import TorchLoader
from nearstore.node.client import REQUEST_BYTES
from nearstore.store import Manifest, Store, node_dir_name

PIPE = standard_train(64)


def digest(batches) -> list[str]:
    return [hashlib.sha256(b.data.tobytes() + b.labels.tobytes()).hexdigest() for b in batches]


def loader(store, **kw):
    kw.setdefault("pipeline", PIPE)
    kw.setdefault("batch_size", 8)
    kw.setdefault("seed", 3)
    return Loader(store, **kw)


def test_epoch_covers_every_sample_once(store):
    with loader(store) as ld:
        batches = list(ld)
    ids = np.concatenate([b.ids for b in batches])
    assert sorted(ids.tolist()) == list(range(48))
    assert batches[0].data.shape == (8, 3, 64, 64) and batches[0].data.dtype == np.float32
    st = Store(store)
    assert [st.ref(int(i)).label for i in batches[0].ids] == batches[0].labels.tolist()
    assert ld.stats.samples == 48 and ld.stats.bytes_read > 48 * 10_000
    assert set(ld.stats.op_seconds) == {"decode_jpeg+random_resized_crop", "flip", "to_uint8_chw", "normalize"}


def test_epochs_differ_and_repeat(store):
    with loader(store) as ld:
        e0 = digest(ld)
        e1 = digest(ld)  # iteration continues with the next epoch
        assert ld.epoch == 2
        ld.set_epoch(0)
        assert digest(ld) == e0
    assert e0 != e1


@pytest.mark.parametrize("stop_after", [0, 1, 3, 5])
@pytest.mark.parametrize("workers", [1, 3])
def test_resume_mid_epoch_is_exact(store, stop_after, workers):
    with loader(store) as ref:
        full = digest(ref) + digest(ref)  # two epochs
    with loader(store, workers=2) as first:
        it = iter(first)
        got = [next(it) for _ in range(stop_after)]
        state = json.loads(json.dumps(first.state_dict()))  # survives serialization
        it.close()
    with loader(store, workers=workers) as second:
        second.load_state_dict(state)
        rest = digest(second) + digest(second)
    assert digest(got) + rest[: len(full) - stop_after] == full


def test_same_bits_in_another_process(store):
    code = f"""
import hashlib, sys
from nearstore import Loader, standard_train
with Loader({str(store)!r}, pipeline=standard_train(64), batch_size=8, seed=3, workers=1) as ld:
    for b in ld:
        print(hashlib.sha256(b.data.tobytes() + b.labels.tobytes()).hexdigest())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    with loader(store, workers=3) as ld:
        assert out.stdout.split() == digest(ld)


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("remainder", ["pad", "drop"])
def test_rank_shares(store, world, remainder):
    shares = []
    for r in range(world):
        with loader(store, rank=r, world_size=world, remainder=remainder) as ld:
            shares.append(np.concatenate([b.ids for b in ld]).tolist())
    flat = sum(shares, [])
    assert len({len(s) for s in shares}) == 1
    if remainder == "drop":
        assert len(set(flat)) == len(flat) and 48 - len(flat) < world
    else:
        assert set(flat) == set(range(48)) and len(flat) - 48 < world


def test_bad_config_names_the_parameter(store):
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        loader(store, workers=0)
    with pytest.raises(ConfigError, match="on_error must be 'raise' or 'skip'"):
        loader(store, on_error="ignore")
    with pytest.raises(ConfigError, match="rank must be in 0..1"):
        loader(store, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size"):
        loader(store, batch_size=0)


def test_resume_state_must_match(store):
    with loader(store) as a:
        state = a.state_dict()
    with loader(store, seed=4) as b, pytest.raises(ResumeStateError, match="seed=3 does not match"):
        b.load_state_dict(state)
    with loader(store, batch_size=4) as b, pytest.raises(ResumeStateError, match="batch_size"):
        b.load_state_dict(state)
    with loader(store) as b, pytest.raises(ResumeStateError, match="not a nearstore loader state"):
        b.load_state_dict({"epoch": 1})


def _flip_byte(store, sample: int) -> tuple[str, str]:
    st = Store(store)
    s, i = st.locate(sample)
    entry = st.manifest.shards[s]
    idx = st.reader(s).index
    st.close()
    with open(store / node_dir_name(entry.nodes[0]) / f"{entry.name}.tar", "r+b") as f:
        f.seek(int(idx.offset[i]) + 50)
        b = f.read(1)
        f.seek(int(idx.offset[i]) + 50)
        f.write(bytes([b[0] ^ 0x55]))
    return entry.name, idx.keys[i]


def _corrupt_jpeg(store, sample: int) -> tuple[str, str]:
    """Rewrite a sample's bytes and index crc so the checksum passes but the JPEG is broken."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from nearstore.core.checksum import crc32c
    from nearstore.store.format import INDEX_SCHEMA

    st = Store(store)
    s, i = st.locate(sample)
    entry = st.manifest.shards[s]
    data = bytes(st.read(sample)[0])
    st.close()
    node = store / node_dir_name(entry.nodes[0])
    idx_path = node / f"{entry.name}.idx.arrow"
    table = ipc.open_file(pa.BufferReader(idx_path.read_bytes())).read_all()
    bad = data[:600] + bytes(len(data) - 600)
    with open(node / f"{entry.name}.tar", "r+b") as f:
        f.seek(table.column("offset")[i].as_py())
        f.write(bad)
    crcs = table.column("crc32c").to_pylist()
    crcs[i] = crc32c(bad)
    table = table.set_column(4, "crc32c", pa.array(crcs, pa.uint32()))
    with ipc.new_file(str(idx_path), INDEX_SCHEMA) as w:
        w.write_table(table)
    # re-seal: the manifest records each index's crc32c (a real corruption would be caught there)
    man = Manifest.load(store)
    man.shards[s].index_crc32c = crc32c(idx_path.read_bytes())
    for d in [store, *sorted(store.glob("node-*"))]:
        (d / "manifest.json").write_text(man.dumps())
    return entry.name, table.column("key")[i].as_py()


def test_checksum_mismatch_raises_with_shard_and_key(fresh_store):
    shard, key = _flip_byte(fresh_store, 5)
    with loader(fresh_store) as ld, pytest.raises(SampleError, match=f"shard {shard}, key {key}.*crc32c mismatch"):
        list(ld)


def test_corrupt_jpeg_raise_or_skip_and_count(fresh_store):
    shard, key = _corrupt_jpeg(fresh_store, 7)
    with loader(fresh_store) as ld, pytest.raises(SampleError, match=f"shard {shard}, key {key}.*on_error='skip'"):
        list(ld)
    with loader(fresh_store, on_error="skip") as ld:
        batches = list(ld)
    ids = np.concatenate([b.ids for b in batches]).tolist()
    assert ld.stats.skipped_samples[0]["key"] == key, ld.stats.skipped_samples[:2]
    assert sorted(ids) == [i for i in range(48) if i != 7]
    assert ld.stats.skipped == 1 and ld.stats.skipped_samples[0]["key"] == key
    assert sum(len(b) for b in batches) == 47 and all(b.data.shape[0] == len(b) for b in batches)


def test_torch_adapter(store):
    with loader(store, pipeline=standard_train(32, normalize=False)) as ld:
        tl = TorchLoader(ld)
        x, y = next(iter(tl))
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 32, 32) and y.dtype == torch.int64
    tl2 = TorchLoader(store, pipeline=PIPE, batch_size=16, seed=0)
    xs = [x for x, _ in tl2]
    assert len(xs) == len(tl2) == 3 and xs[0].dtype == torch.float32
    assert abs(float(xs[0].mean())) < 2.5
    tl2.close()
    with pytest.raises(ConfigError, match="varies per sample"):
        TorchLoader(store, pipeline=["decode_jpeg"], batch_size=4)


def test_variable_shape_batches_are_lists(store):
    with loader(store, pipeline=["decode_jpeg", {"op": "resize", "size": 48}], batch_size=5) as ld:
        b = next(iter(ld))
    assert isinstance(b.data, list) and len(b.data) == 5 and min(b.data[0].shape[:2]) == 48


def test_epochs_back_to_back_equal_separate_epochs(store):
    with loader(store) as a:
        want = digest(a) + digest(a) + digest(a)
    with loader(store) as b:
        got = list(b.epochs(3))
        assert b.epoch == 3
    assert digest(got) == want


def test_resume_across_an_epoch_boundary(store):
    with loader(store) as ref:
        want = digest(ref.epochs(2))
    with loader(store) as a:
        it = a.epochs(None)
        head = [next(it) for _ in range(8)]  # 6 batches per epoch: stops inside epoch 1
        state = a.state_dict()
        it.close()
    assert state["epoch"] == 1 and state["batches_done"] == 2
    with loader(store) as b:
        b.load_state_dict(state)
        tail = list(b.epochs(1))
    assert digest(head) + digest(tail) == want


def test_empty_rank_share_is_an_error(store):
    with loader(store, world_size=64, rank=63, remainder="drop", drop_last=True) as ld:
        with pytest.raises(ConfigError, match="gets no batch"):
            next(iter(ld))


@pytest.mark.parametrize("world,new_world,stop_after", [(3, 2, 1), (2, 4, 2), (2, 2, 1)])
def test_elastic_resume_with_another_world_size(store, world, new_world, stop_after):
    """48 samples, batch 4: W ranks consume stop_after batches each; the state of rank 0 (a JSON round trip)
    resumes on W' ranks, which deliver exactly the samples not yet consumed; the next epoch is W''s normal one."""
    consumed = []
    for r in range(world):
        with loader(store, batch_size=4, rank=r, world_size=world, pipeline=["decode_jpeg"]) as ld:
            it = iter(ld)
            consumed += [i for _ in range(stop_after) for i in next(it).ids.tolist()]
            if r == 0:
                state = json.loads(json.dumps(ld.state_dict()))
            it.close()
    rest, following = [], []
    for r in range(new_world):
        with loader(store, batch_size=4, rank=r, world_size=new_world, pipeline=["decode_jpeg"]) as ld:
            ld.load_state_dict(state)
            assert ld.epoch == 0
            rest += [i for b in ld for i in b.ids.tolist()]
            assert ld.epoch == 1
            following.append([i for b in ld for i in b.ids.tolist()])
        with loader(store, batch_size=4, rank=r, world_size=new_world, pipeline=["decode_jpeg"]) as fresh:
            fresh.set_epoch(1)
            assert following[-1] == [i for b in fresh for i in b.ids.tolist()]
    assert len(consumed) == len(set(consumed)) == stop_after * 4 * world
    assert sorted(consumed + rest) == list(range(48))  # 48 divides every W' here: no padding
    with loader(store, batch_size=4, rank=0, world_size=new_world, pipeline=["decode_jpeg", "flip"]) as other:
        with pytest.raises(ResumeStateError, match="pipeline"):  # another pipeline: refused, whatever the W
            other.load_state_dict(state)


def test_elastic_state_can_be_saved_again(store):
    """W=2 -> W'=3 mid-epoch -> W''=1 mid-epoch: still every sample exactly once."""
    seen = []
    with loader(store, batch_size=2, world_size=2, rank=0, pipeline=["decode_jpeg"]) as a, \
            loader(store, batch_size=2, world_size=2, rank=1, pipeline=["decode_jpeg"]) as b:
        ia, ib = iter(a), iter(b)
        seen += next(ia).ids.tolist() + next(ib).ids.tolist()
        state = a.state_dict()
        ia.close()
        ib.close()
    states = []
    for r in range(3):
        with loader(store, batch_size=2, world_size=3, rank=r, pipeline=["decode_jpeg"]) as ld:
            ld.load_state_dict(state)
            it = iter(ld)
            seen += next(it).ids.tolist() + next(it).ids.tolist()
            states.append(ld.state_dict())
            it.close()
    assert states[0]["epoch_start"] == 4 and states[0]["batches_done"] == 2
    with loader(store, batch_size=2, pipeline=["decode_jpeg"]) as ld:
        ld.load_state_dict(states[2])
        seen += [i for bt in ld for i in bt.ids.tolist()]
    assert sorted(seen) == list(range(48))


@pytest.mark.parametrize("stop_after", [0, 2, 3, 5])
def test_batches_fetched_in_groups_are_the_same_batches(store, cluster, stop_after):
    """Over an open link a request carries several batches (``batches_per_fetch``): same batches, same bits,
    in the same order as one batch per request and as the local loader, across an epoch's end (6 batches in
    groups of 4: 4 + 2) and when resumed from inside a group."""
    with loader(store) as local:
        want = digest(local) + digest(local)
    with loader(None, cluster=cluster, split="node", prefetch=8) as grouped:
        assert grouped.batches_per_fetch == 4  # 4 of tiny batches per request, at most half of prefetch 8
        it = grouped.epochs(2)
        got = [next(it) for _ in range(stop_after)]
        state = json.loads(json.dumps(grouped.state_dict()))
        it.close()
    with loader(None, cluster=cluster, split="node", prefetch=8) as resumed:
        resumed.load_state_dict(state)
        rest = list(resumed.epochs(2))
    assert digest(got) + digest(rest)[: len(want) - stop_after] == want
    with loader(None, cluster=cluster, split="node", prefetch=1) as single:
        assert single.batches_per_fetch == 1
        assert digest(single) == want[:6]


def test_batches_per_fetch_follows_the_link_and_the_request_size(store, cluster):
    with loader(None, cluster=cluster, split="node") as ld:
        src = ld.source
        per_node = 8 * src._per_sample / 2
        assert src.batches_per_fetch(8) == round(REQUEST_BYTES / per_node) > 2
        assert src.batches_per_fetch(1 << 20) == 1  # a batch already larger than a request
        assert ld.batches_per_fetch == 2  # default prefetch 4: two requests always in flight
    with loader(store, prefetch=8) as local:
        assert local.batches_per_fetch == 1  # a local read has no per-request cost
    capped = cluster.spec.model_copy(update={"link_mbps": 100.0})
    with loader(None, cluster=capped, split="node", prefetch=8) as ld:
        assert ld.batches_per_fetch == 1  # a capped link: one batch per request keeps it evenly busy
