"""Inference jobs: every node runs the network over the shards it holds, in parallel; outputs stay on the nodes.

``infer(store, cluster, arch=..., cut=..., dtype=..., out=NAME)`` computes a
derived dataset (``store.derived``). Each shard is computed exactly once, by
its first live replica (the node's ``derive`` action runs the image pipeline
and the network op on the node's workers, in batches, and writes the file
there); the job then copies the file to the shard's other live replicas. A
node that dies mid-job loses only its shards in flight: they go to the next
replica. Progress is recorded after every shard (``JobState``), so a job
killed and started again with the same request skips the shards already done;
the derived manifest is committed last, atomically.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nearstore.core.errors import ConfigError, NearstoreError
from nearstore.nets import ARCHS, CUTS, DTYPES, ENGINES, describe
from nearstore.loader.derived import pipeline_fingerprint
from nearstore.node.client import NodeClient, NodeRequestError, NodeUnavailableError, node_client
from nearstore.node.cluster import ClusterSpec
from nearstore.node.derive import frame
from nearstore.ops.base import registry
from nearstore.ops.network import network_ops
from nearstore.ops.pipeline import Pipeline, input_spec_of
from nearstore.store.derived import (DerivedExistsError, DerivedManifest, DerivedShard, Fingerprint, JobState,
                                     check_name, commit_derived, load_derived, manifest_path)
from nearstore.store.manifest import Manifest

__all__ = ["JobProgress", "JobResult", "JobError", "infer", "inference_pipeline", "job_ops", "node_clients"]

log = logging.getLogger(__name__)


class JobError(NearstoreError, RuntimeError):
    """A job could not finish (no live replica for a shard, a node refused the work); its progress is kept."""


def inference_pipeline(size: int = 224) -> list[dict | str]:
    """The ops before the network, as for ImageNet evaluation: decode, resize the shorter side to 8/7 of
    ``size``, center crop ``size`` x ``size``, 3xHxW uint8."""
    return ["decode_jpeg", {"op": "resize", "size": round(size * 8 / 7)}, {"op": "center_crop", "size": size},
            "to_uint8_chw"]


def job_ops(arch: str, cut: str, *, dtype: str = "float16", engine: str = "pytorch", weights: str | None = None,
            seed: int = 0, size: int = 224) -> list[dict]:
    """The op chain a job runs on the nodes: ``inference_pipeline(size)`` then the network op."""
    net = network_ops(arch, cut, dtype=dtype, engine=engine, weights=weights, seed=seed, hw=(size, size))[0]
    return [*Pipeline(inference_pipeline(size)).to_json(), net]


def node_clients(cluster: ClusterSpec, timeout: float) -> dict[int, NodeClient]:
    return {ep.node: node_client(cluster, ep.node, timeout=timeout) for ep in cluster.nodes}


@dataclass
class JobProgress:
    """What a progress bar shows: samples done of total, rate, ETA, per node."""

    total: int
    done: int = 0
    skipped: int = 0  # samples of shards a previous run completed
    shards_total: int = 0
    shards_done: int = 0
    started: float = field(default_factory=time.monotonic)
    by_node: dict[int, int] = field(default_factory=dict)
    down: list[int] = field(default_factory=list)

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    @property
    def rate(self) -> float:
        return (self.done - self.skipped) / self.elapsed

    @property
    def eta(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    def node_rates(self) -> dict[int, float]:
        return {n: s / self.elapsed for n, s in sorted(self.by_node.items())}


@dataclass
class JobResult:
    manifest: DerivedManifest
    seconds: float
    computed: list[int]  # shard indices computed by this run
    skipped: list[int]  # shard indices a previous run had completed
    samples_per_s: float
    by_node: dict[int, int]
    copies: int  # replica copies written
    link_bytes: int  # bytes that came back to the job (files to copy to the replicas)
    failovers: list[dict]

    def summary(self) -> dict[str, Any]:
        return {"name": self.manifest.name, "generation": self.manifest.generation, "samples": self.manifest.num_samples,
                "shards": len(self.manifest.shards), "computed": len(self.computed), "skipped": len(self.skipped),
                "seconds": self.seconds, "samples_per_s": self.samples_per_s, "by_node": self.by_node,
                "copies": self.copies, "link_bytes": self.link_bytes, "failovers": self.failovers,
                "file_bytes": self.manifest.file_bytes, "fingerprint": self.manifest.fingerprint.model_dump()}


def _check_nodes(clients: dict[int, NodeClient], pre: list, net: dict) -> None:
    """Refuse before any work when a node lacks an op of the chain or the engine, or has another version of an
    op than this process (its outputs would not be what the fingerprint says), naming every such node."""
    ops = [o if isinstance(o, str) else o["op"] for o in pre] + ["network"]
    here = registry()
    problems = []
    for node, client in clients.items():
        try:
            caps = client.action("capabilities")
        except NodeUnavailableError:
            continue  # a dead node owns nothing; its shards go to replicas
        except NodeRequestError as exc:
            if "unknown action" in str(exc):  # an older node: it validates the ops on the first shard
                continue
            raise
        have = caps.get("ops", {})
        missing = [o for o in ops if o not in have]
        if missing:
            errs = caps.get("import_errors") or {}
            problems.append(f"node {node} lacks op(s) {', '.join(repr(o) for o in missing)}"
                            + (f" (op modules that failed to import there: {errs})" if errs else ""))
        other = [f"{o!r} version {have[o].get('version')} (here {here[o].version})" for o in dict.fromkeys(ops)
                 if o in have and o in here and str(have[o].get("version")) != str(here[o].version)]
        if other:
            problems.append(f"node {node} has {', '.join(other)}")
        engines = caps.get("engines")
        if net["engine"] != "auto" and engines is not None and net["engine"] not in engines:
            problems.append(f"node {node} cannot run engine {net['engine']!r} (it has {', '.join(engines) or 'none'}"
                            "; choose one it has, or engine='auto')")
    if problems:
        raise ConfigError("the job cannot run on every node, nothing was started: " + "; ".join(problems)
                          + ". Install the ops on those nodes (`nearstore node serve --ops-module`, or the "
                          "package providing them) or leave the nodes out of the cluster")


def infer(store: str | Path, cluster: ClusterSpec, *, out: str, arch: str = "resnet50", cut: str = "pooled",
          dtype: str = "float16", engine: str = "pytorch", weights: str | None = None, seed: int = 0,
          size: int = 224, overwrite: bool = False, batch_size: int = 32, per_node: int = 2, timeout: float = 600.0,
          on_progress: Callable[[JobProgress], None] | None = None, progress_every: float = 0.5) -> JobResult:
    """Compute derived dataset ``out`` of ``store`` on the nodes of ``cluster`` (see the module doc)."""
    store = Path(store)
    check_name(out)
    if arch not in ARCHS:
        raise ConfigError(f"arch must be one of {', '.join(ARCHS)} (got {arch!r})")
    if cut not in CUTS:
        raise ConfigError(f"cut must be one of {', '.join(CUTS)} (got {cut!r})")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if engine != "auto" and engine not in ENGINES:
        raise ConfigError(f"engine must be auto or one of {', '.join(ENGINES)} (got {engine!r})")
    if per_node < 1 or batch_size < 1:
        raise ConfigError(f"per_node and batch_size must be >= 1 (got {per_node}, {batch_size})")
    man = Manifest.load(store)
    if cluster.dataset != man.name:
        raise ConfigError(f"the cluster serves dataset {cluster.dataset!r}, the store at {store} is {man.name!r}")
    ops = job_ops(arch, cut, dtype=dtype, engine=engine, weights=weights, seed=seed, size=size)
    pre, net = ops[:-1], ops[-1]
    specs = Pipeline(ops).declare(input_spec_of(man))  # refuses a bad chain here, before any node is asked
    fp = pipeline_fingerprint(ops)
    existing = manifest_path(store, out).exists()
    if existing and not overwrite:
        raise DerivedExistsError(f"derived dataset {out!r} exists in {store}; pass overwrite=True (--overwrite) to "
                                 "replace it (atomically: the old one stays until the new one is complete)")
    clients = node_clients(cluster, timeout)
    try:
        _check_nodes(clients, pre, net)  # before anything is written, here or on a node
        state = JobState.load(store, out)
        if (state is None or state.fingerprint != fp or state.dataset_fingerprint != man.fingerprint
                or (existing and load_derived(store, out).generation == state.generation)):
            state = JobState(name=out, generation=secrets.token_hex(6), fingerprint=fp,
                             dataset_fingerprint=man.fingerprint, overwrite=overwrite)
            state.save(store)
        else:
            log.info("resuming job %s (generation %s): %d of %d shards already done", out, state.generation,
                     len(state.done), len(man.shards))
        run = _Run(store, man, clients, state, ops, fp, batch_size=batch_size, seed=seed)
        run.go(per_node, on_progress, progress_every)
        spec = specs[-1]
        act = describe(arch, cut, (size, size)).shape  # the activation's shape (int8 rows add their scale)
        derived = DerivedManifest(name=out, dataset=man.name, dataset_fingerprint=man.fingerprint,
                                  generation=state.generation, fingerprint=fp, kind=spec.kind, dtype=spec.dtype,
                                  shape=[int(d) for d in act], num_samples=man.num_samples,
                                  shards=[state.done[i] for i in range(len(man.shards))])
        commit_derived(store, derived)  # the commit point
        JobState.clear(store, out)
        for node, client in clients.items():  # older generations of NAME: invisible now, and removed
            if node not in run.down:
                try:
                    client.action("derived_sweep", {"name": out, "keep": state.generation})
                except NearstoreError as exc:
                    log.warning("node %d: could not remove old derived files of %s: %s", node, out, exc)
        seconds = run.progress.elapsed
        return JobResult(derived, seconds, run.computed, run.skipped,
                         (run.progress.done - run.progress.skipped) / seconds, dict(run.progress.by_node),
                         run.copies, run.link_bytes, run.failovers)
    finally:
        for c in clients.values():
            c.close()


class _Run:
    """The scheduling of one job: per node, ``per_node`` threads take the shards that node owns now."""

    def __init__(self, store: Path, man: Manifest, clients: dict[int, NodeClient], state: JobState, ops: list,
                 fp: Fingerprint, *, batch_size: int, seed: int) -> None:
        self.store, self.man, self.clients, self.state, self.ops = store, man, clients, state, ops
        self.fp_digest = fp.model_dump_json()
        self.batch_size, self.seed = batch_size, seed
        self.cond = threading.Condition()
        self.todo = {i for i in range(len(man.shards)) if i not in state.done}
        self.skipped = sorted(state.done)
        self.computed: list[int] = []
        self.inflight: dict[int, int] = {}
        self.excluded: dict[int, set[int]] = {}
        self.down: set[int] = set()
        self.failure: BaseException | None = None
        self.copies = 0
        self.link_bytes = 0
        self.failovers: list[dict] = []
        # the state file is written outside ``cond`` (an fsync under it stalled every thread's next request),
        # newest version only: a slower writer of an older state never overwrites a newer one
        self._saving = threading.Lock()
        self._version = self._saved = 0
        skipped = sum(man.shards[i].samples for i in state.done)
        self.progress = JobProgress(total=man.num_samples, done=skipped, skipped=skipped,
                                    shards_total=len(man.shards), shards_done=len(state.done),
                                    by_node={n: 0 for n in clients})

    def owner(self, shard: int) -> int | None:
        """The first live replica of ``shard`` that has not failed it."""
        bad = self.excluded.get(shard, set())
        return next((n for n in self.man.shards[shard].nodes if n in self.clients and n not in self.down
                     and n not in bad), None)

    def go(self, per_node: int, on_progress: Callable[[JobProgress], None] | None, every: float) -> None:
        threads = [threading.Thread(target=self._worker, args=(n,), name=f"nearstore-job-{n}-{k}")
                   for n in self.clients for k in range(per_node)]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                with self.cond:
                    self.cond.wait(every)
                if on_progress is not None:
                    on_progress(self.progress)
        finally:
            with self.cond:
                if self.failure is None and (self.todo or self.inflight):
                    self.failure = JobError("interrupted")
                self.cond.notify_all()
            for t in threads:
                t.join()
        if on_progress is not None:
            on_progress(self.progress)
        if self.failure is not None:
            raise self.failure
        if self.todo:
            raise JobError(f"shards {sorted(self.todo)} were not computed")

    def _next(self, node: int) -> int | None:
        """The next shard for ``node``; None when it should stop. Holds ``cond``."""
        while True:
            if self.failure is not None or node in self.down:
                return None
            orphans = [s for s in self.todo if self.owner(s) is None]
            if orphans:
                s = orphans[0]
                self.failure = JobError(
                    f"shard {self.man.shards[s].name} has no live replica: it lives on nodes "
                    f"{self.man.shards[s].nodes} (down: {sorted(self.down)}, failed it: "
                    f"{sorted(self.excluded.get(s, set()))}). Restart the nodes and run the job again: the "
                    f"{len(self.state.done)} shards done are kept")
                self.cond.notify_all()
                return None
            mine = sorted(s for s in self.todo if self.owner(s) == node)
            if mine:
                s = mine[0]
                self.todo.discard(s)
                self.inflight[s] = node
                return s
            if not self.todo and not self.inflight:
                return None
            self.cond.wait(0.2)  # a shard may come to this node when another node dies

    def _worker(self, node: int) -> None:
        while True:
            with self.cond:
                shard = self._next(node)
            if shard is None:
                return
            try:
                self._one(node, shard)
            except NodeUnavailableError as exc:
                with self.cond:
                    if node not in self.down:
                        self.down.add(node)
                        self.progress.down = sorted(self.down)
                        self.failovers.append({"node": node, "shard": shard, "error": str(exc), "at": time.time()})
                        log.warning("node %d is down; its shards go to their replicas: %s", node, exc)
                    self.inflight.pop(shard, None)
                    self.todo.add(shard)
                    self.cond.notify_all()
                return
            except NodeRequestError as exc:
                with self.cond:
                    self.inflight.pop(shard, None)
                    self.todo.add(shard)
                    if "on a replica" in str(exc):  # this node's copy of the shard is bad: another replica runs it
                        self.excluded.setdefault(shard, set()).add(node)
                    else:
                        self.failure = JobError(f"node {node} refused shard {self.man.shards[shard].name}: {exc}")
                    self.cond.notify_all()
            except BaseException as exc:  # noqa: BLE001  # ends the job; the main thread re-raises it
                with self.cond:
                    self.inflight.pop(shard, None)
                    self.todo.add(shard)
                    self.failure = exc
                    self.cond.notify_all()
                return

    def _one(self, node: int, shard: int) -> None:
        entry = self.man.shards[shard]
        with self.cond:
            others = [n for n in entry.nodes if n != node and n in self.clients and n not in self.down]
        req = {"name": self.state.name, "generation": self.state.generation, "shard": shard, "ops": self.ops,
               "seed": self.seed, "batch_size": self.batch_size, "fingerprint": self.fp_digest,
               "send_file": bool(others)}  # the file crosses the link only to be copied to a replica
        res = self.clients[node].action_raw("derive", json.dumps(req).encode())
        info, raw = json.loads(res[0]), res[1]
        holders = [node]
        for other in others:
            with self.cond:
                if other in self.down:
                    continue
            header = {"name": self.state.name, "generation": self.state.generation, "shard": shard,
                      "crc32c": info["crc32c"]}
            try:
                self.clients[other].action_raw("derived_put", frame(header, raw))
                holders.append(other)
            except NodeUnavailableError as exc:
                with self.cond:
                    if other not in self.down:
                        self.down.add(other)
                        self.failovers.append({"node": other, "shard": shard, "error": str(exc), "at": time.time()})
                    self.cond.notify_all()
        done = DerivedShard(index=shard, shard=entry.name, samples=info["samples"], errors=info["errors"],
                            file_bytes=info["file_bytes"], crc32c=info["crc32c"], nodes=[n for n in entry.nodes if n in holders], node=node,
                            seconds=info["seconds"])
        with self.cond:
            self.inflight.pop(shard, None)
            if self.failure is not None and not isinstance(self.failure, JobError):
                return
            self.state.done[shard] = done
            self._version += 1
            version, body = self._version, self.state.model_dump_json().encode()
            self.computed.append(shard)
            self.copies += len(holders) - 1
            self.link_bytes += len(raw)
            self.progress.done += entry.samples
            self.progress.shards_done += 1
            self.progress.by_node[node] = self.progress.by_node.get(node, 0) + entry.samples
            self.cond.notify_all()
        with self._saving:  # progress survives a kill of this process once this is written
            if version > self._saved:
                JobState.write(self.store, self.state.name, body)
                self._saved = version
