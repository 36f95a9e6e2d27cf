"""Reliability runs (issue 4): `python bench/reliability.py [--quick] --json PATH`.

The long versions of the fault tests, with their figures recorded for
docs/reliability.md: SIGKILL failover (samples lost, duplicates, bit-identical,
stall), flipped bytes, ticket fuzzing against a live node (10,000 cases),
damaged store files, ingest killed at random points (25 times), and 8
concurrent loaders against 2 nodes (fairness, node peak RSS). ``--quick`` (CI)
runs each with small counts to check the code, not the figures.
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
from nearstore.bench.faults import (batch_digests, copy_store, failover_run, fuzz_readers, fuzz_tickets,
                                    ingest_kill_loop, load_run)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
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

        log("failover: SIGKILL a node mid-epoch")
        runs = []
        for trial, (cap, kill_after) in enumerate([(None, 3), (25.0, 3), (None, 10), (25.0, 10)][: 2 if q else 4]):
            with LocalCluster(store, link_mbps=cap) as c:
                r = failover_run(c, PIPE, kill_node=trial % 2, kill_after=kill_after, batch_size=16)
            runs.append({"link_mbps": cap, "kill_after_batches": kill_after, **r})
            log(f"  cap {cap}: lost {r['lost']}, dup {r['duplicates']}, identical {r['bit_identical']}, "
                f"stall {r['stall_s']:.2f} s (median batch {r['median_batch_s']:.2f} s)")
        res["failover"] = runs

        log("integrity: flipped bytes")
        res["integrity"] = integrity(store, work, flips=4 if q else 24)
        log(f"  {res['integrity']}")

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

        for replicas in (1, 2):
            files_store = work / f"fuzz-r{replicas}"
            ingest(work / "img2", files_store, nodes=2, replicas=replicas, shard_size=1 << 20)
            cases = 100 if q else 1500
            log(f"fuzzing store files ({replicas} replica(s)): {cases} cases")
            r = fuzz_readers(files_store, cases=cases, seed=3 + replicas)
            res[f"fuzz_files_r{replicas}"] = r
            log(f"  clean {r['clean']}, rejected {r['rejected']}, wrong {r['wrong']}, crashes {r['crashes']}")

        kills = 3 if q else 25
        log(f"ingest kill loop: {kills} kills")
        kill_store = work / "kill"
        ingest(work / "img2", kill_store, nodes=2, replicas=2, shard_size=200_000)
        res["ingest_kills"] = ingest_kill_loop([work / "img", work / "img2"], kill_store, kills=kills, seed=9,
                                               max_delay=3.0)
        log(f"  {res['ingest_kills']}")

        loaders, seconds = (4, 4.0) if q else (8, 30.0)
        log(f"load: {loaders} loaders x {seconds:.0f} s against 2 nodes")
        with LocalCluster(store) as c:
            res["load"] = load_run(c, loaders=loaders, seconds=seconds)
        log(f"  max/min {res['load']['max_over_min']:.2f}, rates {[round(x, 1) for x in res['load']['samples_per_s']]}"
            f", node peak RSS {[x >> 20 for x in res['load']['node_peak_rss_bytes']]} MiB")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    ok = (all(r["lost"] == 0 and r["duplicates"] == 0 and r["bit_identical"] for r in res["failover"])
          and all(v for k, v in res["integrity"].items() if k.endswith("identical"))
          and res["fuzz_tickets"]["crashes"] == 0 and res["fuzz_tickets"]["good_request_after"]
          and all(res[f"fuzz_files_r{r}"]["crashes"] == 0 and res[f"fuzz_files_r{r}"]["wrong"] == 0 for r in (1, 2))
          and res["ingest_kills"]["inconsistent"] == 0 and not res["load"]["errors"])
    print("reliability:", "all guarantees held" if ok else "A GUARANTEE FAILED (see the JSON)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
