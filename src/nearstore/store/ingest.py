"""Ingest: an image folder or WebDataset tars into a sharded, replicated store.

Crash safety: every file of a new generation has a fresh name and is written
via temp + fsync + rename; the root manifest is replaced last. A kill at any
point leaves either the previous store (its manifest still names only its own
files) or the complete new one. Files no manifest names are swept by the next
successful ingest.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

from nearstore.core.errors import ConfigError, SampleDecodeError, SourceError
from nearstore.ops.image import npy_shape
from nearstore.ops.jpeg import JpegError, header, to_jpeg
from nearstore.store.format import ShardWriter, atomic_write_bytes, fsync_dir
from nearstore.store.manifest import MANIFEST_NAME, Manifest, ShardEntry, node_dir_name, placement

__all__ = ["IngestReport", "ingest", "scan_source"]

JPEG_SUFFIXES = {".jpg", ".jpeg"}
# other image formats are accepted and converted to JPEG at ingest (``to_jpeg``), so one decoder serves all
OTHER_IMAGE_SUFFIXES = {".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]")


@dataclass
class _Item:
    key: str
    label: int
    read: Callable[[], bytes]
    origin: str
    payload: str = "jpeg"


@dataclass
class IngestReport:
    store: str
    samples: int
    shards: int
    nodes: int
    replicas: int
    bytes: int
    skipped: list[dict]
    seconds: float
    converted: list[dict] = field(default_factory=list)  # non-JPEG images re-encoded as JPEG (source, format)


def _safe_key(text: str) -> str:
    return _KEY_BAD.sub("_", text)


def _scan_folder(src: Path) -> tuple[list[str], list[_Item]]:
    class_dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise SourceError(
            f"{src} has no class subfolders; expected SRC/<class>/<image>.jpg (an ImageNet-style folder) "
            "or WebDataset .tar shards"
        )
    items: list[_Item] = []
    classes = [d.name for d in class_dirs]
    for label, d in enumerate(class_dirs):
        for f in sorted(d.iterdir()):
            if f.is_file() and f.suffix.lower() in JPEG_SUFFIXES | OTHER_IMAGE_SUFFIXES:
                items.append(_Item(_safe_key(f"{d.name}__{f.stem}"), label, f.read_bytes, str(f)))
    return classes, items


def _iter_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group the members of a WebDataset tar by key (path up to the first dot of the basename)."""
    try:
        with tarfile.open(path, "r:*") as tar:
            current, group = None, {}
            for m in tar:
                if not m.isfile():
                    continue
                dirname, _, base = m.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = f"{dirname}/{stem}" if dirname else stem
                if key != current:
                    if current is not None:
                        yield current, group
                    current, group = key, {}
                f = tar.extractfile(m)
                group[ext.lower()] = f.read() if f else b""
            if current is not None:
                yield current, group
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SourceError(f"{path}: not a readable tar ({exc}); check the file is a complete WebDataset shard") from exc


def _scan_tars(tars: list[Path]) -> tuple[list[str], list[_Item]]:
    items: list[_Item] = []
    labels: set[int] = set()
    for t in tars:
        for key, group in _iter_tar(t):
            payload = "jpeg"
            jpeg = next((group[e] for e in ("jpg", "jpeg", *(x[1:] for x in sorted(OTHER_IMAGE_SUFFIXES)))
                         if e in group), None)
            if jpeg is None and "npy" in group:
                payload, jpeg = "npy", group["npy"]
            if jpeg is None:
                continue
            raw = group.get("cls", b"")
            try:
                label = int(raw.decode().strip())
            except ValueError as exc:
                raise SourceError(f"{t}, key {key}: .cls member {raw[:20]!r} is not an integer label") from exc
            labels.add(label)
            items.append(_Item(_safe_key(key), label, lambda data=jpeg: data, f"{t}:{key}", payload))
    n_classes = max(labels) + 1 if labels else 0
    return [str(c) for c in range(n_classes)], items


def scan_source(src: str | os.PathLike) -> tuple[list[str], list]:
    """Classes and items of a source: a class-per-subfolder image folder, a .tar file, or a folder of .tar files."""
    src = Path(src)
    if not src.exists():
        raise SourceError(f"source {src} does not exist")
    if src.is_file():
        if not src.name.endswith(".tar"):
            raise SourceError(f"source {src} is a file but not a .tar; give an image folder or WebDataset .tar shards")
        classes, items = _scan_tars([src])
    else:
        tars = sorted(p for p in src.iterdir() if p.is_file() and p.name.endswith(".tar"))
        classes, items = _scan_tars(tars) if tars else _scan_folder(src)
    if not items:
        raise SourceError(
            f"source {src} holds no images; expected SRC/<class>/<image>.jpg (or .png, .webp, ...) or .tar shards with "
            "KEY.jpg + KEY.cls members (make a test set with `nearstore synth`)"
        )
    kinds = {it.payload for it in items}
    if len(kinds) > 1:
        raise SourceError(f"source {src} mixes payload kinds {sorted(kinds)}; a store holds one kind (jpeg or npy)")
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise SourceError(f"source {src} has duplicate sample keys after sanitizing; rename the files")
    return classes, items


def _dims(data: bytes, payload: str) -> tuple[int, int]:
    if payload == "jpeg":
        return header(data)
    shape = npy_shape(data)
    return shape[1], shape[0]


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def _sweep(store: Path, manifest: Manifest) -> None:
    """Remove files no manifest names (older generations, temp files of killed runs)."""
    keep: set[tuple[str, str]] = set()
    for s in manifest.shards:
        for n in s.nodes:
            keep.add((node_dir_name(n), f"{s.name}.tar"))
            keep.add((node_dir_name(n), f"{s.name}.idx.arrow"))
    for d in store.glob("node-*"):
        if not d.is_dir():
            continue
        for f in d.iterdir():
            if f.name == MANIFEST_NAME and int(d.name[5:]) < manifest.nodes:
                continue
            if f.is_dir():  # derived datasets (store.derived): refused by their dataset fingerprint, not swept
                continue
            if (d.name, f.name) not in keep:
                f.unlink(missing_ok=True)
        if not any(d.iterdir()):
            d.rmdir()
    for f in store.glob("*.tmp"):
        f.unlink(missing_ok=True)


def ingest(
    src: str | os.PathLike,
    store: str | os.PathLike,
    *,
    nodes: int = 1,
    replicas: int = 1,
    shard_size: int = 64 << 20,
    shard_samples: int | None = None,
    name: str | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    progress: Callable[[int, int], None] | None = None,
) -> IngestReport:
    """Ingest ``src`` into ``store``; see the module docstring for the crash-safety contract.

    A shard is closed at ``shard_size`` bytes or, when given, at ``shard_samples`` samples, whichever comes
    first (equal sample counts per shard spread work evenly over nodes). ``progress(done, total)`` is called as
    samples are written.
    """
    if nodes < 1:
        raise ConfigError(f"nodes must be >= 1 (got {nodes})")
    if not 1 <= replicas <= nodes:
        raise ConfigError(f"replicas must be in 1..nodes={nodes} (got {replicas}): each replica needs its own node")
    if shard_size < 4096:
        raise ConfigError(f"shard_size must be >= 4096 bytes (got {shard_size})")
    if shard_samples is not None and shard_samples < 1:
        raise ConfigError(f"shard_samples must be >= 1 or None (no limit) (got {shard_samples})")
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip' (got {on_error!r})")
    t0 = time.perf_counter()
    store = Path(store)
    classes, items = scan_source(src)
    store.mkdir(parents=True, exist_ok=True)
    for n in range(nodes):
        (store / node_dir_name(n)).mkdir(exist_ok=True)
    generation = time.strftime("%Y%m%d%H%M%S") + secrets.token_hex(3)
    shards: list[ShardEntry] = []
    skipped: list[dict] = []
    converted: list[dict] = []
    widths = heights = payload = 0
    written = 0
    writer: ShardWriter | None = None

    def close_shard() -> None:
        nonlocal writer
        if writer is None or len(writer) == 0:
            return
        idx = len(shards)
        where = placement(idx, nodes=nodes, replicas=replicas)
        entry = writer.commit()
        shard_name = writer.tar_path.name[: -len(".tar")]
        for n in where[1:]:
            for f in (writer.tar_path, writer.idx_path):
                _copy_atomic(f, store / node_dir_name(n) / f.name)
        shards.append(ShardEntry(name=shard_name, first=written - entry["samples"], nodes=where, **entry))
        writer = None

    try:
        for i, item in enumerate(items):
            data = item.read()
            try:
                try:
                    w, h = _dims(data, item.payload)
                except JpegError:
                    if item.payload != "jpeg":
                        raise
                    data, fmt = to_jpeg(data)  # another image format (a PNG named .JPEG, a WebP, ...)
                    w, h = _dims(data, item.payload)
                    converted.append({"source": item.origin, "format": fmt})
            except (JpegError, SampleDecodeError) as exc:
                if on_error == "skip":
                    skipped.append({"source": item.origin, "reason": str(exc)})
                    continue
                raise SampleDecodeError(
                    f"{item.origin}: {exc}; remove or replace the file, or pass --on-error skip"
                ) from exc
            if writer is None:
                first_node = placement(len(shards), nodes=nodes, replicas=replicas)[0]
                path = store / node_dir_name(first_node) / f"{generation}-{len(shards):05d}.tar"
                writer = ShardWriter(path)
            writer.add(item.key, data, item.label, w, h, ext="jpg" if item.payload == "jpeg" else "npy")
            written += 1
            widths += w
            heights += h
            payload += len(data)
            if writer.bytes_written >= shard_size or (shard_samples is not None and len(writer) >= shard_samples):
                close_shard()
            if progress:
                progress(i + 1, len(items))
        close_shard()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if written == 0:
        raise SourceError(f"source {src}: every image was skipped as unreadable; nothing ingested")
    manifest = Manifest(
        name=name or Path(store).resolve().name,
        generation=generation,
        payload=items[0].payload,
        classes=classes,
        num_samples=written,
        nodes=nodes,
        replicas=replicas,
        mean_width=widths / written,
        mean_height=heights / written,
        mean_payload_bytes=payload / written,
        shards=shards,
    )
    text = manifest.dumps().encode()
    for n in range(nodes):
        atomic_write_bytes(store / node_dir_name(n) / MANIFEST_NAME, text)
    atomic_write_bytes(store / MANIFEST_NAME, text)  # the commit point
    fsync_dir(store)
    _sweep(store, manifest)
    return IngestReport(
        store=str(store),
        samples=written,
        shards=len(shards),
        nodes=nodes,
        replicas=replicas,
        bytes=sum(s.tar_bytes for s in shards) * replicas,
        skipped=skipped,
        seconds=time.perf_counter() - t0,
        converted=converted,
    )
