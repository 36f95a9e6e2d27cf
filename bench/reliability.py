"""Reliability runs (issues 4, 15): `python bench/reliability.py [--quick] [--only A,B] --json PATH`, and the
chaos soak: `python bench/reliability.py --chaos [--seconds 600] [--seed 0] --json PATH`.

The long versions of the fault tests, with their figures recorded for
docs/reliability.md: SIGKILL failover (samples lost, duplicates, bit-identical,
stall), flipped bytes, ticket fuzzing against a live node (10,000 cases),
damaged store files, ingest killed at random points (25 times), and 8
concurrent loaders against 2 nodes (fairness, node peak RSS). ``--quick`` (CI)
runs each with small counts to check the code, not the figures. Issue 15 adds
a hung node (SIGSTOP: stall, lost, duplicated, bits), scrub of 100 flipped
bytes (found, repaired, read back), a rebalance 3 -> 4 -> 2 nodes while a
loader reads, and the chaos soak (every fault at once, seeded).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from nearstore import Loader, standard_train
import hashlib
import os
import signal

import numpy as np
import psutil

from nearstore.bench.faults import (batch_digests, chaos_run, copy_store, failover_run, flip_bytes, fuzz_readers,
                                    fuzz_tickets, ingest_kill_loop, load_run, rebalance_while_reading,
                                    scrub_found_every_flip)
from nearstore.core.checksum import crc32c
from nearstore.store.scrub import scrub
from nearstore.node import LocalCluster
from nearstore.store import Store
from nearstore.store.ingest import ingest
from nearstore.store.manifest import node_dir_name
from nearstore.store.synth import SynthSpec, synth_folder

PIPE = standard_train(64)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def flip_random_bytes(store: Path, flips: int, seed: int) -> int:
    """Flip one payload byte in ``flips`` random samples, each in one random replica (never both)."""
    rng = random.Random(seed)
    st = Store(store)
    samples = rng.sample(range(len(st)), flips)
    for sid in samples:
        s, i = st.locate(sid)
        entry = st.manifest.shards[s]
        idx = st.reader(s).index
        off = int(idx.offset[i]) + rng.randrange(int(idx.size[i]))
        with open(store / node_dir_name(rng.choice(entry.nodes)) / f"{entry.name}.tar", "r+b") as f:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ (1 << rng.randrange(8))]))
    st.close()
    return len(samples)


def integrity(store: Path, work: Path, flips: int) -> dict:
    """Flipped bytes in one replica each: every path must deliver exactly the undamaged epoch."""
    with Loader(store=store, pipeline=PIPE, batch_size=16, seed=3) as ld:
        reference = batch_digests(ld)[0]
    damaged = copy_store(store, work / "damaged")
    injected = flip_random_bytes(damaged, flips, seed=11)
    out = {"faults_injected": injected}
    with Loader(store=damaged, pipeline=PIPE, batch_size=16, seed=3) as ld:
        out["local_identical"] = batch_digests(ld)[0] == reference
        out["local_repaired"] = ld.source.store.repaired
    with LocalCluster(damaged) as c:
        for split in ("host", "node"):
            with Loader(cluster=c, pipeline=PIPE, split=split, batch_size=16, seed=3) as ld:
                out[f"{split}_identical"] = batch_digests(ld)[0] == reference
                out[f"{split}_refetched"] = ld.source.stats()["refetched"]
    return out


def hung_node(store: Path, *, step_s: float, batch_size: int = 16, early: bool = False) -> dict:
    """One clean epoch, then the same epoch with node 0 and its workers SIGSTOPped mid-epoch (SIGCONT after).

    ``early``: the faulty epoch is a fresh cluster and loader's first, stopped after its first batch (the deadlines then
    know only the first answers). The figure: the worst extra stall, i.e. the longest wait for a batch after
    the SIGSTOP minus the clean epoch's median wait, against max(1 s, 3x the median batch time), a batch's
    time being what the training loop sees per batch (the wait plus the step).
    """
    out: dict = {}

    def timed(ld: Loader, hook=None) -> tuple[list, list[float]]:  # noqa: ANN001
        digests, waits, t = [], [], time.perf_counter()
        for i, b in enumerate(ld):
            waits.append(time.perf_counter() - t)
            h = hashlib.sha256(np.ascontiguousarray(b.data).tobytes())
            h.update(b.labels.tobytes())
            digests.append((list(b.keys), h.hexdigest()))
            if hook:
                hook(i)
            time.sleep(step_s)  # a training step
            t = time.perf_counter()
        return digests, waits

    def faulty_epoch(c: LocalCluster, ld: Loader, stop_at: int) -> tuple[list, list[float], dict, list[int]]:
        stopped: list[int] = []

        def stop(i: int) -> None:
            if i == stop_at:
                p = psutil.Process(c.procs[0].pid)
                stopped.extend([p.pid] + [x.pid for x in p.children(recursive=True)])
                for pid in stopped:
                    os.kill(pid, signal.SIGSTOP)

        ld.source.retry_after = 0.5
        ld.epoch = 0
        try:
            faulty, waits = timed(ld, stop)
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        stats = ld.source.stats()
        t0 = time.monotonic()
        while ld.source.stats()["slow"] and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        out["slow_cleared_after_cont_s"] = time.monotonic() - t0
        sent = ld.source.wire_by_node[0]
        ld.epoch = 0
        again, _ = timed(ld)
        out["node_used_again"] = ld.source.wire_by_node[0] > sent and again == clean
        return faulty, waits, stats, stopped

    kw = dict(pipeline=PIPE, split="node", batch_size=batch_size, seed=5)
    with LocalCluster(store) as c, Loader(cluster=c, **kw) as ld:
        clean, clean_waits = timed(ld)
        stop_at = 0 if early else len(clean) // 3
        if not early:
            faulty, waits, stats, stopped = faulty_epoch(c, ld, stop_at)
    if early:  # a fresh cluster and loader: node 0 stops right after the first batch
        with LocalCluster(store) as c, Loader(cluster=c, **kw) as ld:
            faulty, waits, stats, stopped = faulty_epoch(c, ld, stop_at)
    keys = [k for ks, _ in faulty for k in ks]
    expected = [k for ks, _ in clean for k in ks]
    median_wait = float(np.median(clean_waits))
    median_batch = median_wait + step_s
    after = waits[stop_at + 1:]  # the batches the SIGSTOP could hold
    stall = max(after) - median_wait
    bound = max(1.0, 3 * median_batch)
    out.update({"early": early, "step_s": step_s, "stopped_after_batch": stop_at,
                "samples": len(expected), "delivered": len(keys), "lost": len(set(expected) - set(keys)),
                "duplicates": len(keys) - len(set(keys)), "bit_identical": faulty == clean,
                "processes_stopped": len(stopped), "hedges": len(stats["hedges"]),
                "hedges_won_by_replica": sum(1 for h in stats["hedges"] if h.get("won") == "hedge"),
                "hedge_after_s": [round(h["after_s"], 3) for h in stats["hedges"]],
                "deadlines_at_end_s": {"latency": stats["hedge_after_s"], "silence": stats["hedge_silence_s"]},
                "extra_stall_s": stall, "stalled_batch": stop_at + 1 + int(np.argmax(after)),
                "median_wait_s": median_wait, "median_batch_s": median_batch, "bound_s": bound,
                "within_bound": stall <= bound,
                "waits_s": [round(w, 4) for w in waits], "clean_waits_s": [round(w, 4) for w in clean_waits]})
    return out


def scrub_figure(store: Path, work: Path, flips: int) -> dict:
    """``flips`` flipped bytes across the replicas: found by scrub, repaired, a second scrub clean."""
    copy = copy_store(store, work / "scrub")
    st = Store(copy)
    original = [crc32c(st.read(i)[0]) for i in range(len(st))]
    st.close()
    hit = flip_bytes(copy, flips, seed=17, index_share=0.1)
    first = scrub(copy)
    found = scrub_found_every_flip(first, hit)
    fixed = scrub(copy, repair=True)
    second = scrub(copy)
    st = Store(copy)
    after = [crc32c(st.read(i)[0]) for i in range(len(st))]
    st.close()
    return {**found, "damaged_files": len(first.damage), "repaired_copies": fixed.repaired,
            "unrepairable": len(fixed.unrepairable), "second_scrub_damage": len(second.damage),
            "samples_read_back_with_original_crc": sum(a == b for a, b in zip(after, original)),
            "samples": len(original), "scrub_seconds": first.seconds, "repair_seconds": fixed.seconds}


def rebalance_figure(src: Path, work: Path, *, step_s: float) -> dict:
    """3 -> 4 -> 2 nodes while a loader reads epoch after epoch; every epoch checked against local reads."""
    store = work / "rebal"
    ingest(src, store, nodes=3, replicas=2, shard_size=512 << 10)
    with LocalCluster(store) as c:
        return rebalance_while_reading(c, PIPE, [4, 2], batch_size=16, seed=2, step_s=step_s, settle_s=2.0,
                                       grace=1.0)


def chaos(args: argparse.Namespace) -> int:
    seconds = args.seconds or (45.0 if args.quick else 600.0)
    with tempfile.TemporaryDirectory(prefix="nearstore-chaos-") as tmp:
        work = Path(tmp)
        n = 120 if args.quick else 240
        log(f"chaos: {n} images, 3 nodes x 2 replicas, 2 loaders, {seconds:.0f} s, seed {args.seed}")
        synth_folder(work / "img", SynthSpec(n=n, seed=31, classes=8), workers=2)
        store = work / "store"
        ingest(work / "img", store, nodes=3, replicas=2, shard_size=256 << 10)
        res = chaos_run(store, work, seconds=seconds, seed=args.seed, step_s=0.3, log=log,
                        verify_s=60.0 if args.quick else 120.0)
    res["quick"] = args.quick
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    log(f"delivered {res['delivered']}, lost {res['lost']}, duplicated {res['duplicated']}, differing "
        f"{res['differing']}, errors {res['errors']}, worst stall {res['worst_stall_s']:.2f} s; faults {res['faults']}")
    ok = res["lost"] == 0 and res["duplicated"] == 0 and res["differing"] == 0 and res["errors"] == 0 \
        and res["final_scrub_clean"] and res["flips_found"] == res["flipped"]
    print("chaos:", "all guarantees held" if ok else "A GUARANTEE FAILED (see the JSON)")
    return 0 if ok else 1


SECTIONS = ("failover", "integrity", "fuzz", "files", "kills", "load", "hung", "scrub", "rebalance")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    ap.add_argument("--chaos", action="store_true", help="run the chaos soak instead (>= 10 minutes; --quick: 45 s)")
    ap.add_argument("--seconds", type=float, default=None, help="chaos soak length")
    ap.add_argument("--seed", type=int, default=0, help="chaos soak seed (replays the same faults)")
    args = ap.parse_args(argv)
    if args.chaos:
        return chaos(args)
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        ap.error(f"--only: unknown sections {sorted(only - set(SECTIONS))}; choose from {SECTIONS}")
    q = args.quick
    n_images = 96 if q else 480
    res: dict = {"quick": q, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with tempfile.TemporaryDirectory(prefix="nearstore-rel-") as tmp:
        work = Path(tmp)
        log(f"synthesizing {n_images} images")
        synth_folder(work / "img", SynthSpec(n=n_images, seed=21, classes=8), workers=2)
        synth_folder(work / "img2", SynthSpec(n=n_images // 2, seed=22, classes=4), workers=2)
        store = work / "store"
        ingest(work / "img", store, nodes=2, replicas=2, shard_size=2 << 20)

        if "failover" in only:
            log("failover: SIGKILL a node mid-epoch")
            runs = []
            for trial, (cap, kill_after) in enumerate([(None, 3), (25.0, 3), (None, 10), (25.0, 10)][: 2 if q else 4]):
                with LocalCluster(store, link_mbps=cap) as c:
                    r = failover_run(c, PIPE, kill_node=trial % 2, kill_after=kill_after, batch_size=16)
                runs.append({"link_mbps": cap, "kill_after_batches": kill_after, **r})
                log(f"  cap {cap}: lost {r['lost']}, dup {r['duplicates']}, identical {r['bit_identical']}, "
                    f"stall {r['stall_s']:.2f} s (median batch {r['median_batch_s']:.2f} s)")
            res["failover"] = runs

        if "integrity" in only:
            log("integrity: flipped bytes")
            res["integrity"] = integrity(store, work, flips=4 if q else 24)
            log(f"  {res['integrity']}")

        if "fuzz" in only:
            cases = 300 if q else 10_000
            log(f"fuzzing tickets: {cases} cases against a live node")
            with LocalCluster(store, nodes=1) as c:
                from nearstore.store import Manifest

                man = Manifest.load(store)
                t0 = time.perf_counter()
                r = fuzz_tickets(c.spec.nodes[0].uri, man.name, man.num_samples, cases=cases, seed=7)
                r["seconds"] = time.perf_counter() - t0
                r["node_alive"] = c.procs[0].poll() is None
            res["fuzz_tickets"] = r
            log(f"  served {r['served']}, rejected {r['rejected']}, crashes {r['crashes']}, "
                f"good request after: {r['good_request_after']}")

        if "files" in only:
            for replicas in (1, 2):
                files_store = work / f"fuzz-r{replicas}"
                ingest(work / "img2", files_store, nodes=2, replicas=replicas, shard_size=1 << 20)
                cases = 100 if q else 1500
                log(f"fuzzing store files ({replicas} replica(s)): {cases} cases")
                r = fuzz_readers(files_store, cases=cases, seed=3 + replicas)
                res[f"fuzz_files_r{replicas}"] = r
                log(f"  clean {r['clean']}, rejected {r['rejected']}, wrong {r['wrong']}, crashes {r['crashes']}")

        if "kills" in only:
            kills = 3 if q else 25
            log(f"ingest kill loop: {kills} kills")
            kill_store = work / "kill"
            ingest(work / "img2", kill_store, nodes=2, replicas=2, shard_size=200_000)
            res["ingest_kills"] = ingest_kill_loop([work / "img", work / "img2"], kill_store, kills=kills, seed=9,
                                                   max_delay=3.0)
            log(f"  {res['ingest_kills']}")

        if "load" in only:
            loaders, seconds = (4, 4.0) if q else (8, 30.0)
            log(f"load: {loaders} loaders x {seconds:.0f} s against 2 nodes")
            with LocalCluster(store) as c:
                res["load"] = load_run(c, loaders=loaders, seconds=seconds)
            log(f"  max/min {res['load']['max_over_min']:.2f}, rates {[round(x, 1) for x in res['load']['samples_per_s']]}"
                f", node peak RSS {[x >> 20 for x in res['load']['node_peak_rss_bytes']]} MiB")

        if "hung" in only:
            log("hung node: SIGSTOP a node and its workers mid-epoch")
            runs = [(0.05, False), (0.05, True)] if q else [(0.0, False), (0.05, False), (0.2, False), (0.05, True)]
            res["hung_node"] = [hung_node(store, step_s=step, early=early) for step, early in runs]
            for r in res["hung_node"]:
                log(f"  step {r['step_s']} s{' early' if r['early'] else ''}: extra stall {r['extra_stall_s']:.2f} s "
                    f"(bound {r['bound_s']:.2f}), lost {r['lost']}, dup "
                    f"{r['duplicates']}, identical {r['bit_identical']}, hedges {r['hedges']}, used again "
                    f"{r['node_used_again']}")

        if "scrub" in only:
            flips = 20 if q else 100
            log(f"scrub: {flips} flipped bytes across replicas")
            res["scrub"] = scrub_figure(store, work, flips)
            log(f"  {res['scrub']}")

        if "rebalance" in only:
            log("rebalance 3 -> 4 -> 2 nodes while a loader reads")
            res["rebalance"] = rebalance_figure(work / "img", work, step_s=0.05)
            log(f"  {res['rebalance']}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    checks = {
        "failover": lambda r: all(x["lost"] == 0 and x["duplicates"] == 0 and x["bit_identical"] for x in r),
        "integrity": lambda r: all(v for k, v in r.items() if k.endswith("identical")),
        "fuzz_tickets": lambda r: r["crashes"] == 0 and r["good_request_after"],
        "fuzz_files_r1": lambda r: r["crashes"] == 0 and r["wrong"] == 0,
        "fuzz_files_r2": lambda r: r["crashes"] == 0 and r["wrong"] == 0,
        "ingest_kills": lambda r: r["inconsistent"] == 0,
        "load": lambda r: not r["errors"],
        "hung_node": lambda r: all(x["lost"] == 0 and x["duplicates"] == 0 and x["bit_identical"]
                                   and x["node_used_again"] for x in r),
        "scrub": lambda r: r["found"] == r["flipped"] and r["second_scrub_damage"] == 0
        and r["samples_read_back_with_original_crc"] == r["samples"],
        "rebalance": lambda r: not r["errors"] and r["lost"] == 0 and r["duplicated"] == 0
        and r["differing_batches"] == 0,
    }
    failed = [k for k, check in checks.items() if k in res and not check(res[k])]
    ok = not failed
    print("reliability:", "all guarantees held" if ok else f"A GUARANTEE FAILED: {failed} (see the JSON)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
