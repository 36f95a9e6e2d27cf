"""Multi-host figures (issue 13): `python bench/multihost.py [--quick] --json PATH`.

On a two-node Ray cluster started on this machine (``ray start`` nodes, each
standing for a storage host):

- **ray_vs_local**: a loader streaming an epoch (every op on the nodes) from
  Ray-placed node actors vs from locally started node processes serving the
  same store, in interleaved rounds; the ratio of medians.
- **actor_kill**: node 0's actor SIGKILLed after the first batch of an epoch:
  the epoch's bits against an undisturbed one, and the seconds from the kill
  until the restarted actor answers ``health`` at its new endpoint.
- **metrics_cost**: uncapped streaming from nodes with Prometheus endpoints
  (scraped every second, with the loader's endpoint) vs nodes without, in
  interleaved rounds; the median of the per-round ratios. Also the CPU one
  scrape costs (the only work the metrics add: collectors read counters at
  scrape time), measured over 200 scrapes: at one scrape per second, the
  fraction of a core the endpoint takes.

Each measurement streams ``--epochs`` epochs; ratios are taken per round (the
two runs of a round are back to back, in alternating order) and their median
reported, which cancels the slow drifts of a shared machine.

``--quick`` (CI) runs each once on a small store to check the code, not the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from nearstore import Loader, standard_train
from nearstore.bench.localray import LocalRay
from nearstore.loader.metrics import serve_metrics
from nearstore.node import LocalCluster
from nearstore.node.client import NodeClient
from nearstore.node.ray import RayCluster
from nearstore.store.ingest import ingest
from nearstore.store.synth import SynthSpec, synth_folder

PIPE = standard_train(64)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


EPOCHS = 1  # epochs per measurement (--epochs)


def epoch(cluster, seed: int, batch_size: int = 32, epochs: int | None = None) -> tuple[float, str]:  # noqa: ANN001
    """(samples/s, digest) of ``epochs`` epochs with every op on the nodes."""
    h = hashlib.sha256()
    with Loader(cluster=cluster, pipeline=PIPE, split="node", batch_size=batch_size, seed=seed, workers=1) as ld:
        t0 = time.perf_counter()
        n = 0
        for b in ld.epochs(epochs or EPOCHS):
            h.update(b.data.tobytes())
            h.update(b.labels.tobytes())
            n += len(b)
        return n / (time.perf_counter() - t0), h.hexdigest()


def paired(base: list[float], other: list[float]) -> float:
    """Median over rounds of other/base (each round's two runs were back to back)."""
    return statistics.median(o / b for b, o in zip(base, other))


def ray_vs_local(store: Path, address: str, rounds: int) -> dict:
    local_s, ray_s = [], []
    with LocalCluster(store, workers_per_node=1) as lc, RayCluster(store, address, workers_per_node=1) as rc:
        epoch(lc, 0, epochs=1)  # warm both (worker imports, page cache)
        epoch(rc, 0, epochs=1)
        for r in range(rounds):
            order = [("local", lc, local_s), ("ray", rc, ray_s)]
            for name, c, out in order if r % 2 == 0 else order[::-1]:
                sps, _ = epoch(c, r)
                out.append(sps)
                log(f"round {r}: {name} {sps:.0f} samples/s")
    ratio = paired(local_s, ray_s)
    return {"local_samples_per_s": local_s, "ray_samples_per_s": ray_s, "ratio_ray_over_local": ratio,
            "ratio_of_medians": statistics.median(ray_s) / statistics.median(local_s),
            "within_10_percent": ratio >= 0.9}


def actor_kill(store: Path, address: str) -> dict:
    with RayCluster(store, address, workers_per_node=1, slowdown=3.0) as rc:
        _, want = epoch(rc, 7, batch_size=8, epochs=1)
        h = hashlib.sha256()
        restart = {}
        with Loader(cluster=rc, pipeline=PIPE, split="node", batch_size=8, seed=7, workers=1) as ld:
            ld.source.retry_after = 0.2
            t0 = time.perf_counter()
            for i, b in enumerate(ld):
                h.update(b.data.tobytes())
                h.update(b.labels.tobytes())
                if i == 0:
                    victim = rc.actor_info(0)
                    os.kill(victim["pid"], signal.SIGKILL)
                    killed = time.monotonic()

                    def watch(killed: float = killed, victim: dict = victim) -> None:
                        """How long until the restarted actor serves at its new endpoint."""
                        info = rc.actor_info(0)
                        NodeClient(info["uri"], node=0, timeout=30).health()
                        restart["seconds"] = time.monotonic() - killed
                        restart["new_uri"] = info["uri"] != victim["uri"]

                    watcher = threading.Thread(target=watch)
                    watcher.start()
            wall = time.perf_counter() - t0
            watcher.join(60)
            failovers = len(ld.source.stats()["failovers"])
    return {"identical": h.hexdigest() == want, "failovers": failovers, "restart_serving_s": restart.get("seconds"),
            "new_endpoint": restart.get("new_uri"), "disturbed_epoch_s": wall,
            "within_10_s": restart.get("seconds", 1e9) < 10}


def metrics_cost(store: Path, rounds: int) -> dict:
    plain_s, metered_s = [], []
    stop = threading.Event()
    with LocalCluster(store, workers_per_node=1) as plain, LocalCluster(store, workers_per_node=1,
                                                                        metrics_port=0) as metered:
        urls = [ep.metrics for ep in metered.spec.nodes]

        def scrape() -> None:  # as Prometheus would, but every second
            while not stop.wait(1.0):
                for u in list(urls):
                    urllib.request.urlopen(u, timeout=5).read()

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        epoch(plain, 0, epochs=1)
        epoch(metered, 0, epochs=1)
        scrape_s = []
        for _ in range(200):  # what one scrape costs: HTTP plus reading every counter
            t0 = time.perf_counter()
            urllib.request.urlopen(urls[0], timeout=5).read()
            scrape_s.append(time.perf_counter() - t0)
        try:
            for r in range(rounds):
                for name in (("plain", "metered") if r % 2 == 0 else ("metered", "plain")):
                    if name == "plain":
                        sps, _ = epoch(plain, r)
                        plain_s.append(sps)
                    else:
                        with Loader(cluster=metered, pipeline=PIPE, split="node", batch_size=32, seed=r,
                                    workers=1) as ld, serve_metrics(ld) as m:
                            urls.append(m.url)
                            t0 = time.perf_counter()
                            n = sum(len(b) for b in ld.epochs(EPOCHS))
                            sps = n / (time.perf_counter() - t0)
                            urls.remove(m.url)
                        metered_s.append(sps)
                    log(f"round {r}: {name} {sps:.0f} samples/s")
        finally:
            stop.set()
            scraper.join(10)
    ratio = paired(plain_s, metered_s)
    per_scrape = statistics.median(scrape_s)
    return {"plain_samples_per_s": plain_s, "metered_samples_per_s": metered_s, "ratio_metered_over_plain": ratio,
            "ratio_of_medians": statistics.median(metered_s) / statistics.median(plain_s),
            "cost": 1 - ratio, "within_3_percent": ratio >= 0.97, "scrape_seconds_median": per_scrape,
            "core_fraction_at_1_scrape_per_s": per_scrape}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None, help="epochs per measurement (default 3; 1 with --quick)")
    args = ap.parse_args(argv)
    global EPOCHS
    EPOCHS = args.epochs or (1 if args.quick else 3)
    n_images = 96 if args.quick else 480
    rounds = args.rounds or (1 if args.quick else 9)
    out: dict = {"quick": args.quick, "images": n_images, "rounds": rounds, "epochs": EPOCHS,
                 "cpus": os.cpu_count(),
                 "python": platform.python_version(), "note": "2-core machine shared with other work"}
    with tempfile.TemporaryDirectory(prefix="ns-multihost-") as tmp:
        work = Path(tmp)
        log(f"synth {n_images} images, ingest on 2 nodes x2")
        synth_folder(work / "src", SynthSpec(n=n_images, seed=5), workers=2)
        ingest(work / "src", work / "store", nodes=2, replicas=2, shard_size=4 << 20)
        log("metrics cost")
        out["metrics_cost"] = metrics_cost(work / "store", rounds)
        log("starting a two-node Ray cluster")
        ray_cluster = LocalRay([[0], [1]])
        try:
            out["ray_vs_local"] = ray_vs_local(work / "store", ray_cluster.address, rounds)
            out["actor_kill"] = actor_kill(work / "store", ray_cluster.address)
        finally:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            ray_cluster.stop()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    log(f"wrote {args.json}")
    summary = {"ray/local": out["ray_vs_local"]["ratio_ray_over_local"],
               "kill identical": out["actor_kill"]["identical"],
               "restart serving s": out["actor_kill"]["restart_serving_s"],
               "metrics cost": out["metrics_cost"]["cost"]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
