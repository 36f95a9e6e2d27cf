"""``nearstore infer`` and ``nearstore query``: jobs and queries over a running cluster, with a progress bar."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from nearstore.core.errors import ConfigError
from nearstore.jobs import JobProgress, filter_samples, infer, nearest
from nearstore.node.cluster import ClusterSpec, LocalCluster
from nearstore.store.derived import load_derived, local_node_dir, outputs_of, read_shard_file
from nearstore.store.ingest import ingest
from nearstore.store.synth import SynthSpec, synth_folder

__all__ = ["run_infer", "run_query", "stored_embedding", "jobs_demo"]


def _node_rates(p: JobProgress) -> str:
    return "  ".join(f"n{n} {r:.1f}/s" + (" (down)" if n in p.down else "") for n, r in p.node_rates().items())


def run_infer(store: Path, console: Console, **kw: object) -> dict:
    """Run ``jobs.infer`` with a progress bar: samples done, samples/s, ETA, per-node rate."""
    spec = ClusterSpec.load(store)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TextColumn("{task.fields[nodes]}"),
                  console=console) as bar:
        task = bar.add_task(f"infer -> {kw['out']}", total=None, rate="", nodes="")

        def show(p: JobProgress) -> None:
            bar.update(task, total=p.total, completed=p.done, rate=f"{p.rate:.1f} samples/s",
                       nodes=_node_rates(p))

        res = infer(store, spec, on_progress=show, **kw)  # type: ignore[arg-type]
    s = res.summary()
    console.print(f"{s['name']}: {s['samples']} samples in {s['shards']} shards ({s['computed']} computed, "
                  f"{s['skipped']} from an earlier run) in {s['seconds']:.1f} s, {s['samples_per_s']:.1f} samples/s; "
                  f"{s['file_bytes'] / 1e6:.2f} MB stored per replica, {s['copies']} replica copies")
    return s


def stored_embedding(store: Path, name: str, sample: int) -> np.ndarray:
    """The stored output of ``sample`` (read from a local node directory), as a query vector."""
    d = load_derived(store, name)
    for sh in d.shards:
        table, _ = read_shard_file(local_node_dir(store, sh.nodes[0]), name, d.generation, sh.shard,
                                   expected_crc=sh.crc32c)
        ids = table.column("sample").to_pylist()
        if sample in ids:
            return outputs_of(table)[ids.index(sample)].astype(np.float64)
    raise ConfigError(f"sample {sample} is not in derived dataset {name!r} (0..{d.num_samples - 1})")


def run_query(store: Path, name: str, console: Console, *, where: str | None, near: int | None,
              vector: Path | None, k: int, metric: str, with_data: bool, show: int = 20) -> dict:
    spec = ClusterSpec.load(store)
    if (where is None) == (near is None and vector is None):
        raise ConfigError("give either --where EXPR (a filter) or --near SAMPLE / --vector FILE.npy (top k)")
    if where is not None:
        res = filter_samples(store, name, where, cluster=spec, with_data=with_data)
        cols = ["sample", "key", "label", "class", "score"]
    else:
        q = stored_embedding(store, name, near) if near is not None else np.load(vector)  # type: ignore[arg-type]
        res = nearest(store, name, q, k, cluster=spec, metric=metric)
        cols = ["sample", "key", "label", "score"]
    table = Table(*cols)
    for r in res.table.select(cols).to_pylist()[:show]:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()])
    Console().print(table)
    s = res.summary()
    console.print(f"{s['rows']} rows; bytes scanned on the nodes {s['bytes_scanned']:,}, returned over the link "
                  f"{s['bytes_returned']:,} ({s['bytes_returned'] / max(s['bytes_scanned'], 1):.2%})")
    return {**s, "samples": res.samples}


def jobs_demo(workdir: Path, *, console: Console, n: int = 48) -> dict:
    """Embed a small dataset on a 2-node cluster, then one filter and one top-k query: bytes scanned vs returned."""
    src, store = workdir / "embed-images", workdir / "embed-store"
    if src.exists():
        shutil.rmtree(src)
    synth_folder(src, SynthSpec(n=n, seed=2, classes=4), workers=1)
    ingest(src, store, nodes=2, replicas=2, shard_size=1 << 20)
    with LocalCluster(store, workers_per_node=1) as cluster:
        with console.status("embedding on the nodes (MobileNetV2 pooled, fp16, 64x64 crops)"):
            job = infer(store, cluster.spec, out="emb", arch="mobilenet_v2", cut="pooled", dtype="float16",
                        size=64, batch_size=8, overwrite=True)
        s = job.summary()
        console.print(f"{s['samples']} samples embedded in {s['seconds']:.1f} s ({s['samples_per_s']:.1f} samples/s, "
                      f"per node {s['by_node']}); {s['file_bytes'] / 1e3:.0f} KB stored per replica")
        filt = filter_samples(store, "emb", "label in {1} and score > 0", cluster=cluster.spec)
        near = nearest(store, "emb", stored_embedding(store, "emb", 0), 5, cluster=cluster.spec)
    t = Table(title="queries on the nodes")
    for col in ("query", "rows", "bytes scanned on the nodes", "bytes returned over the link"):
        t.add_column(col, justify="right")
    for label, r in (("filter: label in {1} and score > 0", filt), ("top 5 nearest sample 0", near)):
        t.add_row(label, str(r.table.num_rows), f"{r.bytes_scanned:,}", f"{r.bytes_returned:,}")
    console.print(t)
    return {"job": s, "filter": filt.summary(), "nearest": {**near.summary(), "samples": near.samples}}
