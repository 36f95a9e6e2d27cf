"""Fault injection shared by the reliability tests (short runs) and ``bench/reliability.py`` (long runs).

Each harness returns a dict of what it did and saw (cases, faults injected,
samples lost or duplicated, crashes) so the test can assert on it and the
benchmark can record it in ``bench/results/reliability.json``:

- ``failover_run``: a loader over a cluster, one node SIGKILLed mid-epoch.
- ``fuzz_tickets``: hypothesis-generated tickets and actions against a live node.
- ``fuzz_readers``: damaged index, tar and manifest files opened and read.
- ``ingest_kill_loop``: ``ingest`` SIGKILLed at random points, the store checked after each.
- ``load_run``: several loader processes against one cluster for a fixed time.
- ``rebalance_while_reading``: the cluster grown and shrunk while a loader reads, every epoch checked.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from nearstore.core.errors import NearstoreError
from nearstore.loader.loader import Loader
from nearstore.node.cluster import LocalCluster
from nearstore.ops.pipeline import standard_train
from nearstore.store.manifest import Manifest, node_dir_name
from nearstore.store.rebalance import rebalance
from nearstore.store.scrub import scrub
from nearstore.store.store import Store

__all__ = ["failover_run", "fuzz_tickets", "fuzz_readers", "ingest_kill_loop", "load_run", "batch_digests",
           "peak_rss", "copy_store", "flip_bytes", "scrub_found_every_flip", "chaos_run", "rebalance_while_reading"]


def batch_digests(loader: Any, *, epoch_hook: Any = None) -> tuple[list[tuple[list[str], str]], list[float]]:
    """(keys, sha256 of data+labels) of every batch of one epoch, and the seconds each batch took to arrive."""
    out, waits = [], []
    t = time.perf_counter()
    for i, b in enumerate(loader):
        now = time.perf_counter()
        waits.append(now - t)
        h = hashlib.sha256(np.ascontiguousarray(b.data).tobytes())
        h.update(b.labels.tobytes())
        out.append((list(b.keys), h.hexdigest()))
        if epoch_hook is not None:
            epoch_hook(i)
        t = time.perf_counter()
    return out, waits


def rebalance_while_reading(cluster: LocalCluster, pipeline: Any, moves: list[int], *, batch_size: int,
                            seed: int = 2, step_s: float = 0.05, settle_s: float = 0.5, grace: float = 0.5) -> dict:
    """Rebalance ``cluster``'s store to each node count in ``moves`` in turn while a loader (split ``node``)
    reads epoch after epoch; a move starts the servers of new node directories once it has widened the
    placement and stops those of removed ones once it has swept. After the last move the loader reads one
    more whole epoch; then every epoch read is compared with the same epoch read locally (its order never
    depended on placement): samples lost or duplicated in an epoch, batches differing.
    """
    store = cluster.store
    with Loader(store=store, pipeline=pipeline, batch_size=batch_size, seed=seed) as ld:
        per_epoch = len(ld)
    epochs: list[list] = []
    errors: list[str] = []
    done = threading.Event()
    reports = []
    with Loader(cluster=cluster, pipeline=pipeline, split="node", batch_size=batch_size, seed=seed) as ld:
        def read() -> None:
            try:
                cur: list = []
                for b in ld.epochs(None):
                    h = hashlib.sha256(np.ascontiguousarray(b.data).tobytes())
                    h.update(b.labels.tobytes())
                    cur.append((b.epoch, list(b.keys), h.hexdigest()))
                    if len(cur) == per_epoch:
                        epochs.append(cur)
                        cur = []
                        if done.is_set():
                            return
                    time.sleep(step_s)  # a training step
            except Exception as exc:  # noqa: BLE001 - counted
                errors.append(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")

        t = threading.Thread(target=read, name="rebalance-reader")
        t.start()
        try:
            time.sleep(settle_s)
            for k in moves:
                before = Manifest.load(store).nodes

                def on_stage(stage: str, _m: Manifest, before: int = before, k: int = k) -> None:
                    if stage == "widened":
                        for n in range(before, k):
                            cluster.add_node(n)
                    elif stage == "swept":
                        for n in range(before - 1, k - 1, -1):
                            cluster.remove_node(n)

                reports.append(rebalance(store, k, grace=grace, on_stage=on_stage))
            n = len(epochs)
            while len(epochs) < n + 1 and t.is_alive():  # and the one in progress: a whole epoch on the last placement
                time.sleep(0.05)
        finally:
            done.set()
            t.join(300)
        placements = ld.source.stats()["placements"]
    lost = dup = differing = 0
    with Loader(store=store, pipeline=pipeline, batch_size=batch_size, seed=seed) as ref:
        for got in epochs:
            ref.epoch = got[0][0]
            want = batch_digests(ref)[0]
            keys = [k for _, ks, _ in got for k in ks]
            lost += len({k for ks, _ in want for k in ks} - set(keys))
            dup += len(keys) - len(set(keys))
            differing += sum((ks, h) != tuple(w) for (_, ks, h), w in zip(got, want))
    return {"moves": moves, "epochs_read": len(epochs), "errors": errors, "lost": lost, "duplicated": dup,
            "differing_batches": differing, "copies_made": [r.copies_made for r in reports],
            "copies_removed": [r.copies_removed for r in reports], "rebalance_seconds": [r.seconds for r in reports],
            "loader_took_placements": len(placements),
            "last_placement_epoch": placements[-1]["placement_epoch"] if placements else None}


def failover_run(cluster: Any, pipeline: Any, *, kill_node: int = 0, kill_after: int = 2, batch_size: int = 4,
                 seed: int = 1, split: str | int = "node") -> dict:
    """One clean epoch, then the same epoch with ``kill_node`` SIGKILLed after ``kill_after`` batches.

    Returns samples lost/duplicated, whether every batch is bit-identical, and
    the stall: the longest batch wait of the faulty epoch minus the clean
    epoch's median batch wait.
    """

    def epoch(hook: Any = None) -> tuple[list, list[float], dict]:
        with Loader(cluster=cluster.spec, pipeline=pipeline, split=split, batch_size=batch_size, seed=seed) as ld:
            digests, waits = batch_digests(ld, epoch_hook=hook)
            return digests, waits, ld.source.stats()

    clean, clean_waits, _ = epoch()
    faulty, waits, stats = epoch(lambda i: cluster.kill(kill_node) if i == kill_after else None)
    keys = [k for ks, _ in faulty for k in ks]
    expected = [k for ks, _ in clean for k in ks]
    return {
        "samples": len(expected),
        "delivered": len(keys),
        "lost": len(set(expected) - set(keys)),
        "duplicates": len(keys) - len(set(keys)),
        "bit_identical": faulty == clean,
        "failovers": len(stats["failovers"]),
        "failover_batch_wait_s": max((e.get("batch_wait_s", 0.0) for e in stats["failovers"]), default=0.0),
        "detected_s": min((e["detected_s"] for e in stats["failovers"]), default=0.0),
        "refetched": stats["refetched"],
        "stall_s": max(waits) - float(np.median(clean_waits)),
        "median_batch_s": float(np.median(clean_waits)),
    }


# -- fuzzing -------------------------------------------------------------------------------


def _ticket_strategy(dataset: str, n: int) -> Any:
    """Tickets: valid ones, valid ones with one field replaced by junk, and arbitrary JSON or bytes."""
    from hypothesis import strategies as st

    json_leaf = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=40)
    junk = st.recursive(json_leaf, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c,
                                                                                         max_size=5), max_leaves=12)
    op_names = st.sampled_from(["decode_jpeg", "random_resized_crop", "resize", "center_crop", "flip",
                                "to_uint8_chw", "normalize", "../etc", "nope", ""])
    op = st.one_of(op_names, st.fixed_dictionaries({"op": op_names}, optional={
        "size": st.integers(-5, 5000) | junk, "p": st.floats(allow_nan=True) | junk, "scale": junk}))
    names = st.sampled_from([dataset, "..", "../x", "a/b", "", "x" * 300, "other"]) | st.text(max_size=20)
    valid = st.fixed_dictionaries(
        {"dataset": st.just(dataset), "samples": st.lists(st.integers(0, n - 1), min_size=1, max_size=4)},
        optional={"ops": st.lists(op, max_size=4), "seed": st.integers(-2**64, 2**64), "epoch": st.integers(-3, 10**6),
                  "batch_size": st.integers(-1, 10**5) | junk},
    )
    mutated = st.tuples(valid, st.sampled_from(["dataset", "samples", "ranges", "ops", "seed", "epoch",
                                                "batch_size", "v", "extra"]), junk | names).map(
        lambda t: {**t[0], t[1]: t[2]})
    ranges = st.fixed_dictionaries({"dataset": names, "ranges": st.lists(
        st.tuples(st.integers(-5, 10**7), st.integers(-5, 10**7)), max_size=3)})
    as_bytes = (valid | mutated | ranges | junk).map(lambda d: json.dumps(d, allow_nan=True).encode())
    return as_bytes | st.binary(max_size=200) | st.just(b"{" * 5000)


def fuzz_tickets(uri: str, dataset: str, n: int, *, cases: int, token: str | None = None,
                 seed: int = 0) -> dict:
    """Send ``cases`` generated tickets (and action bodies) to a live node; classify every answer.

    A crash is any answer other than data or a Flight error raised by the
    node's validation: the node dying, hanging past the call timeout, or an
    internal error. Ends with a good request, which must succeed.
    """
    import pyarrow.flight as flight
    from hypothesis import HealthCheck, given, seed as hseed, settings
    from hypothesis import strategies as st

    client = flight.FlightClient(uri)
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    opts = flight.FlightCallOptions(headers=headers, timeout=30)
    tally = {"cases": 0, "served": 0, "rejected": 0, "crashes": 0, "examples": {}}

    def record(kind: str, detail: str) -> None:
        tally[kind] += 1
        tally["examples"].setdefault(kind, detail[:200])

    @hseed(seed)
    @settings(max_examples=cases, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(raw=_ticket_strategy(dataset, n), action=st.sampled_from(["", "get", "profile", "health", "stats",
                                                                     "shutdown", "nope"]))
    def one(raw: bytes, action: str) -> None:
        tally["cases"] += 1
        try:
            if action in ("", "get"):
                for _ in client.do_get(flight.Ticket(raw), opts):
                    pass
            else:
                list(client.do_action(flight.Action(action, raw), opts))
            record("served", raw[:80].decode("utf-8", "replace"))
        except (flight.FlightServerError, flight.FlightUnauthenticatedError) as exc:
            msg = str(exc)
            if "Traceback" in msg or ("Python exception" in msg and "FlightServerError" not in msg):
                record("crashes", msg)
            else:
                record("rejected", msg.split(". Detail:")[0])
        except (flight.FlightError, OSError) as exc:  # unavailable, timed out, internal: the node misbehaved
            record("crashes", f"{type(exc).__name__}: {exc}")

    one()
    good = json.dumps({"dataset": dataset, "samples": [0], "ops": ["decode_jpeg"]}).encode()
    try:
        rows = sum(c.data.num_rows for c in client.do_get(flight.Ticket(good), opts))
        tally["good_request_after"] = rows == 1
    except flight.FlightError as exc:
        tally["good_request_after"] = False
        tally["examples"]["good_request_after"] = str(exc)[:200]
    client.close()
    return tally


def fuzz_readers(store: Path, *, cases: int, seed: int = 0) -> dict:
    """Damage one of a store's files per case (flip, truncate, overwrite, extend) and read the whole store.

    Every outcome must be a read of exactly the original samples (keys, labels,
    bytes) or a NearstoreError; another exception counts as a crash, different
    data as ``wrong``. The store is restored between cases.
    """

    def digest() -> str:
        h = hashlib.sha256()
        st = Store(store)
        try:
            for i in range(len(st)):
                data, ref = st.read(i)
                h.update(data)
                h.update(f"{ref.key}:{ref.label};".encode())
        finally:
            st.close()
        return h.hexdigest()

    rng = random.Random(seed)
    files = sorted(p for p in store.rglob("*") if p.is_file() and not p.name.endswith(".log"))
    good = digest()
    tally = {"cases": 0, "clean": 0, "rejected": 0, "crashes": 0, "wrong": 0, "by_file": {}, "examples": {}}
    for _ in range(cases):
        path = rng.choice(files)
        original = path.read_bytes()
        data = bytearray(original)
        how = rng.choice(["flip", "truncate", "overwrite", "extend", "zero"])
        if how == "flip" and data:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif how == "truncate":
            del data[rng.randrange(len(data) + 1):]
        elif how == "overwrite" and data:
            at = rng.randrange(len(data))
            data[at:at + 16] = bytes(rng.randrange(256) for _ in range(16))
        elif how == "extend":
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif how == "zero" and data:
            at = rng.randrange(len(data))
            data[at:at + 512] = bytes(min(512, len(data) - at))
        kind = path.suffix.lstrip(".") or path.name
        tally["by_file"][kind] = tally["by_file"].get(kind, 0) + 1
        try:
            path.write_bytes(bytes(data))
            tally["cases"] += 1
            try:
                if digest() == good:
                    tally["clean"] += 1  # the damage missed everything read (tar headers) or a replica served
                else:
                    tally["wrong"] += 1
                    tally["examples"].setdefault(f"wrong {kind}/{how}", str(path))
            except NearstoreError as exc:
                tally["rejected"] += 1
                tally["examples"].setdefault(f"{kind}/{how}", str(exc)[:200])
            except Exception as exc:  # noqa: BLE001 - counting what escapes is the point of the fuzzer
                tally["crashes"] += 1
                tally["examples"].setdefault(f"crash {kind}/{how}", f"{type(exc).__name__}: {exc}"[:300])
        finally:
            path.write_bytes(original)
    return tally


# -- crash-safe ingest -------------------------------------------------------------------------

_INGEST = """
import sys
from nearstore.store.ingest import ingest
ingest(sys.argv[1], sys.argv[2], nodes=2, replicas=2, shard_size=int(sys.argv[3]))
"""


def ingest_kill_loop(sources: list[Path], store: Path, *, kills: int, seed: int = 0, max_delay: float = 2.0,
                     shard_size: int = 200_000) -> dict:
    """SIGKILL ``ingest`` ``kills`` times at random points, alternating sources.

    After each kill the store must be the previous complete one or the new
    complete one: its manifest loads, its sample count is one of the sources',
    and every sample reads back verified. Returns what was seen.
    """

    rng = random.Random(seed)
    counts = {len([p for p in s.rglob("*") if p.is_file()]) for s in sources}
    tally = {"kills": 0, "old_store": 0, "new_store": 0, "inconsistent": 0, "samples_checked": 0, "examples": []}
    for k in range(kills):
        before = Manifest.load(store).generation
        src = sources[k % len(sources)]
        proc = subprocess.Popen([sys.executable, "-c", _INGEST, str(src), str(store), str(shard_size)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, max_delay))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        tally["kills"] += 1
        try:
            man = Manifest.load(store)
            st = Store(store)
            try:
                for i in range(man.num_samples):
                    st.read(i)
            finally:
                st.close()
            if man.num_samples not in counts:
                raise AssertionError(f"{man.num_samples} samples matches no source ({sorted(counts)})")
            tally["samples_checked"] += man.num_samples
            tally["old_store" if man.generation == before else "new_store"] += 1
        except (NearstoreError, AssertionError) as exc:
            tally["inconsistent"] += 1
            tally["examples"].append(f"kill {k}: {exc}"[:300])
    return tally


# -- load ----------------------------------------------------------------------------------------

_LOADER = """
import json, sys, time
from nearstore import Loader, standard_train
from nearstore.node.cluster import ClusterSpec
spec = ClusterSpec.model_validate_json(sys.argv[1])
seconds, seed, split = float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
n = 0
with Loader(cluster=spec, pipeline=standard_train(64), split=split, batch_size=8, seed=seed, workers=1) as ld:
    print("ready", flush=True)
    sys.stdin.readline()  # every loader starts together
    t0 = time.perf_counter()
    for b in ld.epochs(None):
        n += len(b.keys)
        if time.perf_counter() - t0 > seconds:
            break
print(json.dumps({"samples": n, "seconds": time.perf_counter() - t0}), flush=True)
"""


def peak_rss(pid: int) -> int:
    """Peak resident set size of a live process in bytes (VmHWM), 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def load_run(cluster: Any, *, loaders: int, seconds: float, split: str = "node") -> dict:
    """``loaders`` loader processes, started together, each reading for ``seconds``; per-loader samples/s."""
    spec = cluster.spec.model_dump_json()
    procs = [subprocess.Popen([sys.executable, "-c", _LOADER, spec, str(seconds), str(i), split],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(loaders)]
    try:
        for p in procs:
            line = p.stdout.readline() if p.stdout else ""
            if line.strip() != "ready":
                raise RuntimeError(f"loader did not start: {line}{p.stderr.read() if p.stderr else ''}")
        for p in procs:
            p.stdin.write("go\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        rates, errors = [], []
        for p in procs:
            out, err = p.communicate(timeout=seconds + 120)
            if p.returncode != 0:
                errors.append(err[-500:])
                continue
            r = json.loads(out.strip().splitlines()[-1])
            rates.append(r["samples"] / r["seconds"])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    rss = [peak_rss(p.pid) for p in cluster.procs]
    return {
        "loaders": loaders, "seconds": seconds, "split": split, "errors": errors,
        "samples_per_s": rates, "total_samples_per_s": sum(rates),
        "max_over_min": (max(rates) / min(rates)) if rates and min(rates) > 0 else float("inf"),
        "node_peak_rss_bytes": rss,
    }


def copy_store(src: Path, dst: Path) -> Path:
    """A private copy of a store (tests that damage files work on one)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".nearstore", "cluster.json"))
    return dst



def flip_bytes(store: Path, flips: int, *, seed: int = 0, index_share: float = 0.1) -> list[dict]:
    """Flip one bit in each of ``flips`` random bytes across the copies of ``store``'s shards and indexes.

    Every sample keeps at least one good copy next to a good index (a byte is flipped only where the
    other copies are still good there, and an index only when the other copies are undamaged), so
    readers always find a good copy and a repair can always succeed. Returns one record per flip: file,
    offset, and the global sample id whose payload it hit (None: a tar header, padding or an index).
    """

    rng = random.Random(seed)
    man = Manifest.load(store)
    st = Store(store)
    indexes = [st.reader(k).index for k in range(len(man.shards))]
    st.close()
    damaged: set[tuple[int, object]] = set()  # (shard, sample local index or "index"/"tar") already hit somewhere
    done: list[dict] = []
    hit: set[tuple[str, int]] = set()
    while len(done) < flips:
        k = rng.randrange(len(man.shards))
        entry, idx = man.shards[k], indexes[k]
        node = rng.choice(entry.nodes)
        if rng.random() < index_share:
            path, unit = store / node_dir_name(node) / f"{entry.name}.idx.arrow", ("index", None)
            offset = rng.randrange(path.stat().st_size)
            sample = None
        else:
            path = store / node_dir_name(node) / f"{entry.name}.tar"
            offset = rng.randrange(entry.tar_bytes)
            i = int(np.searchsorted(idx.offset, offset, side="right")) - 1
            inside = i >= 0 and offset < int(idx.offset[i]) + int(idx.size[i])
            unit = ("sample", i) if inside else ("tar", None)
            sample = entry.first + i if inside else None
        others = [n for n in entry.nodes if n != node]
        if (str(path), offset) in hit or any((k, unit, n) in damaged or (k, ("index", None), n) in damaged
                                             for n in others) or (
                unit[0] == "index" and any(d[0] == k and d[2] in others for d in damaged)):
            continue  # keep a good copy of every sample *with* a good index beside it (readers need both)
        hit.add((str(path), offset))
        damaged.add((k, unit, node))
        with open(path, "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ (1 << rng.randrange(8))]))
        done.append({"file": str(path.relative_to(store)), "offset": offset, "sample": sample})
    return done


def scrub_found_every_flip(report: Any, flips: list[dict]) -> dict:
    """How many flipped bytes a scrub report points at (its file, and its sample for a payload byte)."""
    files = {d.file for d in report.damage}
    samples = {(d.file, s) for d in report.damage for s in d.samples}
    found = sum(1 for f in flips if f["file"] in files and (f["sample"] is None or (f["file"], f["sample"]) in samples))
    return {"flipped": len(flips), "found": found, "found_pct": 100.0 * found / max(1, len(flips))}


# -- chaos soak ----------------------------------------------------------------------------------------

_CHAOS_LOADER = """
import hashlib, json, sys, time
import numpy as np
from nearstore import Loader, standard_train
from nearstore.node.cluster import ClusterSpec
spec = ClusterSpec.model_validate_json(open(sys.argv[1]).read())
seed, split, step, out, stop = int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5], sys.argv[6]
import os
with open(out, "w") as log, Loader(cluster=spec, pipeline=standard_train(64), split=split, batch_size=16,
                                   seed=seed, workers=1) as ld:
    print("ready", flush=True)
    t = time.perf_counter()
    try:
        for b in ld.epochs(None):
            wait = time.perf_counter() - t
            h = hashlib.sha256(np.ascontiguousarray(b.data).tobytes()); h.update(b.labels.tobytes())
            log.write(json.dumps({"e": b.epoch, "i": b.index, "k": list(b.keys), "h": h.hexdigest(), "w": wait}) + "\\n")
            log.flush()
            if os.path.exists(stop):
                break
            time.sleep(step)  # the training step
            t = time.perf_counter()
    except Exception as exc:
        import traceback
        log.write(json.dumps({"error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()[-2000:]}) + "\\n")
        sys.exit(1)
    s = ld.source.stats()
    log.write(json.dumps({"stats": {"failovers": len(s["failovers"]), "hedges": len(s["hedges"]),
                                    "refetched": s["refetched"], "rejoined": len(s["rejoined"]),
                                    "placements": len(s["placements"])}}) + "\\n")
"""


def _node_tree(pid: int) -> list[int]:
    import psutil

    try:
        return [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def chaos_run(store: Path, work: Path, *, seconds: float, seed: int = 0, step_s: float = 0.05,
              rebalance_at: float = 0.6, verify_s: float = float("inf"), log: Any = None) -> dict:
    """Two training loaders against a 3-node, 2-replica cluster while faults land, chosen by ``seed``.

    Faults, one at a time (each shard always keeps a live, good replica): SIGKILL a node (restarted a
    few seconds later), SIGSTOP a node and its workers (SIGCONT later), flip bytes on disk (then scrub
    --repair while everything runs); at ``rebalance_at`` of the run, one rebalance 3 -> 2 nodes. Every
    batch the loaders deliver is compared with the same batch of an undisturbed run (local reads), for
    at most ``verify_s`` seconds per loader (whole epochs in a seeded order; ``checked`` says how many).
    """
    import os as _os


    say = log or (lambda msg: None)
    rng = random.Random(seed)
    man = Manifest.load(store)
    events: list[dict] = []
    t_start = time.monotonic()

    def event(kind: str, **kw: Any) -> None:
        events.append({"t": round(time.monotonic() - t_start, 2), "kind": kind, **kw})
        say(f"  {events[-1]['t']:7.1f} s  {kind} {kw if kw else ''}")

    stop_flag = work / "chaos.stop"
    stop_flag.unlink(missing_ok=True)
    with LocalCluster(store, workers_per_node=1) as c:
        spec_file = work / "chaos-cluster.json"
        spec_file.write_text(c.spec.model_dump_json())
        loaders = []
        for i, split in enumerate(("node", "host")):
            out = work / f"chaos-loader{i}.jsonl"
            p = subprocess.Popen([sys.executable, "-c", _CHAOS_LOADER, str(spec_file), str(i), split, str(step_s),
                                  str(out), str(stop_flag)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            loaders.append((p, out, split))
        for p, _, _ in loaders:
            if (p.stdout.readline() if p.stdout else "").strip() != "ready":
                raise RuntimeError(f"chaos loader did not start: {p.stderr.read() if p.stderr else ''}")
        t_start = time.monotonic()  # the soak starts once both loaders run
        event("loaders running")
        live = list(range(man.nodes))
        rebalanced = False
        flips_total = found_total = 0
        try:
            while time.monotonic() - t_start < seconds:
                if any(p.poll() is not None for p, _, _ in loaders):
                    event("loader exited early")
                    break
                if not rebalanced and time.monotonic() - t_start > rebalance_at * seconds:
                    event("rebalance", frm=len(live), to=2)

                    def follow(stage: str, m: Any) -> None:
                        if stage == "swept":
                            c.remove_node(2)

                    rebalance(store, 2, grace=2.0, on_stage=follow)
                    live = [0, 1]
                    rebalanced = True
                    event("rebalanced")
                    continue
                what = rng.choice(["kill", "stop", "flip", "pause"])
                node = rng.choice(live)
                hold = rng.uniform(1.0, 4.0)
                if what == "kill":
                    event("SIGKILL", node=node, down_s=round(hold, 1))
                    c.kill(node)
                    time.sleep(hold)
                    c.restart(node)
                    event("restarted", node=node)
                elif what == "stop":
                    pids = _node_tree(c.procs[node].pid)
                    event("SIGSTOP", node=node, processes=len(pids), stopped_s=round(hold, 1))
                    for pid in pids:
                        _os.kill(pid, signal.SIGSTOP)
                    try:
                        time.sleep(hold)
                    finally:
                        for pid in pids:
                            _os.kill(pid, signal.SIGCONT)
                    event("SIGCONT", node=node)
                elif what == "flip":
                    n = rng.randint(5, 30)
                    flips = flip_bytes(store, n, seed=rng.randrange(1 << 30), index_share=0.0)
                    event("flipped bytes", count=n)
                    time.sleep(hold)  # loaders read through the damage (replicas serve)
                    report = scrub(store, repair=True)
                    got = scrub_found_every_flip(report, flips)
                    flips_total += n
                    found_total += got["found"]
                    event("scrub --repair", found=got["found"], repaired=report.repaired,
                          unrepairable=len(report.unrepairable))
                else:
                    time.sleep(hold)
                time.sleep(rng.uniform(0.5, 2.0))
        finally:
            stop_flag.write_text("stop")
            results = []
            for p, out, split in loaders:
                try:
                    _, err = p.communicate(timeout=180)
                except subprocess.TimeoutExpired:
                    p.kill()
                    _, err = p.communicate()
                results.append((p.returncode, out, split, err))
        final_scrub = scrub(store)
    # -- what the loaders saw, against an undisturbed run --------------------------------------------------
    summary: dict = {"seconds": round(time.monotonic() - t_start, 1), "seed": seed, "events": events,
                     "faults": {k: sum(1 for e in events if e["kind"] == k)
                                for k in ("SIGKILL", "SIGSTOP", "flipped bytes", "rebalance")},
                     "flipped": flips_total, "flips_found": found_total, "final_scrub_clean": final_scrub.clean,
                     "loaders": []}
    for i, (rc, out, split, err) in enumerate(results):
        lines = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
        batches = [x for x in lines if "h" in x]
        errors = [x["error"] for x in lines if "error" in x] + ([err[-500:]] if rc not in (0, None) and err else [])
        stats = next((x["stats"] for x in lines if "stats" in x), {})
        by_epoch: dict[int, list] = {}
        for b in batches:
            by_epoch.setdefault(b["e"], []).append(b)
        lost = dup = 0
        for e, bs in by_epoch.items():
            keys = [k for b in bs for k in b["k"]]
            dup += len(keys) - len(set(keys))
            complete = e < max(by_epoch)
            if complete:
                lost += man.num_samples - len(set(keys))
        differing = checked = 0
        # every batch against the undisturbed run, epoch by epoch in a seeded order, until verify_s runs out
        # (reported: checked of batches)
        order = sorted(by_epoch)
        random.Random(seed + i).shuffle(order)
        t_verify = time.monotonic()
        with Loader(store=store, pipeline=_chaos_pipeline(), batch_size=16, seed=i, workers=2) as ref:
            for e in order:
                if time.monotonic() - t_verify > verify_s:
                    break
                ref.epoch = e
                want = batch_digests(ref)[0]
                for b in by_epoch[e]:
                    checked += 1
                    differing += (b["k"], b["h"]) != tuple(want[b["i"]])
        waits = [b["w"] for b in batches[1:]]
        summary["loaders"].append({
            "split": split, "returncode": rc, "delivered": sum(len(b["k"]) for b in batches), "batches": len(batches),
            "epochs": len(by_epoch), "lost": lost, "duplicated": dup, "differing": differing, "checked": checked,
            "errors": errors, "worst_stall_s": max(waits, default=0.0), "verify_s": time.monotonic() - t_verify,
            "median_batch_wait_s": float(np.median(waits)) if waits else 0.0, **stats})
    ls = summary["loaders"]
    summary.update({"delivered": sum(x["delivered"] for x in ls), "lost": sum(x["lost"] for x in ls),
                    "duplicated": sum(x["duplicated"] for x in ls), "differing": sum(x["differing"] for x in ls),
                    "errors": sum(len(x["errors"]) for x in ls), "worst_stall_s": max(x["worst_stall_s"] for x in ls)})
    return summary


def _chaos_pipeline() -> Any:

    return standard_train(64)
