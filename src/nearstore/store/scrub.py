"""Scrub and repair: check every copy of every shard, index and manifest; restore damaged copies.

A shard copy is checked whole: its index against the crc32c the manifest
records, every sample against the index's crc32c, and the tar's remaining
bytes (headers, padding) against the tar rebuilt from the index and the
verified samples (shards are written deterministically: USTAR, mtime 0, so
any good set of samples rebuilds the exact file). Node copies of the manifest
must equal the root manifest.

Repair rebuilds a damaged copy sample by sample from whichever copies hold a
good version of each sample (so two copies damaged in different samples
still repair each other), and replaces the file with the store's crash-safety
contract: temp file, fsync, rename, fsync of the directory. A kill at any
moment leaves the old file or the new one; readers that mapped the old file
keep reading it (a rename never changes a mapped inode), and readers notice a
replaced file on their next checksum error and reopen it (``Store.read``).

The same per-copy functions run on a node for ``nearstore scrub --cluster``
(``check_copy``, ``rebuild_copy``): there the good samples come over the wire
from a replica node.
"""

from __future__ import annotations

import base64
import io
import logging
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.ipc as ipc

from nearstore.core.checksum import crc32c
from nearstore.core.errors import StoreError, StoreFormatError
from nearstore.store.format import INDEX_SCHEMA, ShardIndex, atomic_write_bytes
from nearstore.store.manifest import MANIFEST_NAME, Manifest, ShardEntry, node_dir_name
from nearstore.store.store import Store, contained

__all__ = ["CopyState", "Damage", "ScrubReport", "check_copy", "rebuild_copy", "tar_bytes", "scrub", "index_of",
           "node_scrub", "node_shard_index", "node_repair"]

log = logging.getLogger(__name__)


@dataclass
class CopyState:
    """What is wrong with one node's copy of one shard (nothing: ``ok``)."""

    node: int
    shard: str
    missing: list[str] = field(default_factory=list)  # file names absent
    index_ok: bool = True
    size_ok: bool = True
    bad_samples: list[int] = field(default_factory=list)  # local indices whose bytes fail their crc32c
    tar_ok: bool = True  # the whole tar equals the rebuilt one (headers and padding too); None-like when unknown
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not self.missing and self.index_ok and self.size_ok and not self.bad_samples and self.tar_ok


@dataclass
class Damage:
    """One damaged or missing file, as a scrub reports it."""

    node: int
    file: str  # path inside the store
    kind: str  # missing | index | samples | tar | manifest
    detail: str
    samples: list[int] = field(default_factory=list)
    repaired: bool = False


@dataclass
class ScrubReport:
    store: str
    shards: int
    copies: int
    samples_checked: int
    bytes_read: int
    damage: list[Damage]
    unrepairable: list[str]
    repaired: int
    seconds: float

    @property
    def clean(self) -> bool:
        return not self.damage

    def to_dict(self) -> dict:
        return {**asdict(self), "clean": self.clean}


def _paths(node_dir: Path, entry: ShardEntry) -> tuple[Path, Path]:
    tar, idx = node_dir / f"{entry.name}.tar", node_dir / f"{entry.name}.idx.arrow"
    contained(node_dir, tar, idx)
    return tar, idx


def index_of(raw: bytes, where: str) -> ShardIndex:
    """Parse index bytes already checked against the manifest's crc32c."""
    try:
        table = ipc.open_file(pa.BufferReader(raw)).read_all()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise StoreFormatError(f"unreadable shard index {where}: {exc}") from None
    if not table.schema.equals(INDEX_SCHEMA):
        raise StoreFormatError(f"shard index {where} has schema {table.schema}, expected {INDEX_SCHEMA}")
    return ShardIndex(keys=table.column("key").to_pylist(), label=table.column("label").to_numpy(),
                      offset=table.column("offset").to_numpy(), size=table.column("size").to_numpy(),
                      crc=table.column("crc32c").to_numpy(), width=table.column("width").to_numpy(),
                      height=table.column("height").to_numpy())


def tar_bytes(index: ShardIndex, payload: Callable[[int], bytes], ext: str) -> bytes:
    """The shard tar ``ShardWriter`` writes for these samples (USTAR, mtime 0: deterministic)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, key in enumerate(index.keys):
            data = payload(i)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
            cls = str(int(index.label[i])).encode()
            cinfo = tarfile.TarInfo(f"{key}.cls")
            cinfo.size, cinfo.mtime = len(cls), 0
            tar.addfile(cinfo, io.BytesIO(cls))
    return buf.getvalue()


def _sample(raw: bytes | memoryview, index: ShardIndex, i: int) -> memoryview | None:
    """Sample ``i`` of a tar's bytes if it verifies, else None."""
    off, size = int(index.offset[i]), int(index.size[i])
    piece = memoryview(raw)[off : off + size]
    if len(piece) != size or crc32c(piece) != int(index.crc[i]):
        return None
    return piece


def check_copy(node_dir: Path, node: int, entry: ShardEntry, ext: str,
               good_index: bytes | None = None) -> tuple[CopyState, bytes | None, bytes | None]:
    """Check one copy; returns (state, its index bytes if good, its tar bytes if readable).

    ``good_index`` (a verified index from another copy) lets the samples of a copy whose own index is
    damaged be checked anyway.
    """
    st = CopyState(node, entry.name)
    tar_path, idx_path = _paths(node_dir, entry)
    idx_raw = tar_raw = None
    try:
        idx_raw = idx_path.read_bytes()
    except FileNotFoundError:
        st.missing.append(idx_path.name)
    if idx_raw is not None and crc32c(idx_raw) != entry.index_crc32c:
        st.index_ok, st.detail = False, f"index crc32c {crc32c(idx_raw):08x} != manifest's {entry.index_crc32c:08x}"
        idx_raw = None
    try:
        tar_raw = tar_path.read_bytes()
    except FileNotFoundError:
        st.missing.append(tar_path.name)
    if tar_raw is not None and len(tar_raw) != entry.tar_bytes:
        st.size_ok = False
        st.detail += f" tar is {len(tar_raw)} bytes, manifest says {entry.tar_bytes}"
    index_raw = idx_raw or good_index
    if tar_raw is not None and index_raw is not None:
        index = index_of(index_raw, str(idx_path))
        st.bad_samples = [i for i in range(len(index)) if _sample(tar_raw, index, i) is None]
        if not st.bad_samples and st.size_ok:  # every sample good: rebuilding from them must give this file
            expected = tar_bytes(index, lambda i: _sample(tar_raw, index, i), ext)  # type: ignore[arg-type, return-value]
            st.tar_ok = expected == tar_raw
            if not st.tar_ok:
                st.detail += " tar headers or padding differ from the rebuilt shard"
    return st, idx_raw, tar_raw


def rebuild_copy(node_dir: Path, entry: ShardEntry, ext: str, index_raw: bytes,
                 payload: Callable[[int], bytes | memoryview | None]) -> int:
    """Write this copy's tar (and index) anew from verified samples: temp, fsync, rename. Returns bytes written.

    ``payload(i)`` gives a good version of sample ``i`` (or None: no good copy anywhere, and nothing is
    written). Every sample is checked against the index before a byte is written.
    """
    if crc32c(index_raw) != entry.index_crc32c:
        raise StoreError(f"shard {entry.name}: the index given for repair does not match the manifest's crc32c")
    tar_path, idx_path = _paths(node_dir, entry)
    index = index_of(index_raw, str(idx_path))
    pieces: list[bytes] = []
    for i in range(len(index)):
        data = payload(i)
        if data is None or crc32c(data) != int(index.crc[i]) or len(data) != int(index.size[i]):
            raise StoreError(f"shard {entry.name}, key {index.keys[i]}: no good copy of this sample; "
                             "cannot repair (re-ingest the source)")
        pieces.append(bytes(data))
    raw = tar_bytes(index, lambda i: pieces[i], ext)
    if len(raw) != entry.tar_bytes or any(_sample(raw, index, i) is None for i in range(len(index))):
        raise StoreError(f"shard {entry.name}: the rebuilt tar does not match the manifest's layout; not written")
    atomic_write_bytes(tar_path, raw)
    if not idx_path.exists() or crc32c(idx_path.read_bytes()) != entry.index_crc32c:
        atomic_write_bytes(idx_path, index_raw)
    return len(raw)


def _check_manifests(store: Path, man: Manifest, text: bytes, damage: list[Damage], repair: bool) -> None:
    for n in range(man.nodes):
        path = store / node_dir_name(n) / MANIFEST_NAME
        try:
            ok = path.read_bytes() == text
            why = "differs from the root manifest"
        except FileNotFoundError:
            ok, why = False, "missing"
        if not ok:
            d = Damage(n, str(path.relative_to(store)), "manifest", why)
            if repair:
                atomic_write_bytes(path, text)
                d.repaired = True
            damage.append(d)


def _root_manifest(store: Path, damage: list[Damage], repair: bool) -> tuple[Manifest, bytes]:
    """The root manifest; when it is damaged, the node copy that verifies (restored with ``repair``)."""
    try:
        man = Manifest.load(store)
        return man, man.dumps().encode()
    except StoreFormatError as exc:
        for d in sorted(store.glob("node-*")):
            try:
                man = Manifest.load(d)
            except StoreError:
                continue
            text = man.dumps().encode()
            dmg = Damage(-1, MANIFEST_NAME, "manifest", f"root manifest damaged ({exc}); {d.name}'s copy verifies")
            if repair:
                atomic_write_bytes(store / MANIFEST_NAME, text)
                dmg.repaired = True
            damage.append(dmg)
            return man, text
        raise


def scrub(store: str | Path, *, repair: bool = False, progress: Callable[[int, int], None] | None = None) -> ScrubReport:
    """Check every copy of every shard and index and every manifest of ``store``; with ``repair``, restore
    damaged copies from good ones. Safe while loaders read and nodes serve (see the module docstring)."""
    t0 = time.perf_counter()
    store = Path(store)
    damage: list[Damage] = []
    unrepairable: list[str] = []
    man, text = _root_manifest(store, damage, repair)
    _check_manifests(store, man, text, damage, repair)
    ext = "jpg" if man.payload == "jpeg" else "npy"
    copies = samples = nbytes = repaired = 0
    for k, entry in enumerate(man.shards):
        states: dict[int, tuple[CopyState, bytes | None, bytes | None]] = {}
        for n in entry.nodes:
            states[n] = check_copy(store / node_dir_name(n), n, entry, ext)
        good_index = next((s[1] for s in states.values() if s[1] is not None), None)
        for n, (st, idx_raw, tar_raw) in list(states.items()):
            if idx_raw is None and good_index is not None and tar_raw is not None:
                states[n] = (check_copy(store / node_dir_name(n), n, entry, ext, good_index)[0], None, tar_raw)
        copies += len(entry.nodes)
        samples += entry.samples * len(entry.nodes)
        nbytes += sum(len(s[2] or b"") for s in states.values())
        index = index_of(good_index, entry.name) if good_index is not None else None

        def good(i: int, states: dict = states, index: ShardIndex | None = index) -> memoryview | None:
            """A verified version of sample ``i`` from any copy."""
            for _, _, raw in states.values():
                if raw is not None and (piece := _sample(raw, index, i)) is not None:  # type: ignore[arg-type]
                    return piece
            return None

        expected = None
        if index is not None and all(good(i) is not None for i in range(len(index))):
            expected = tar_bytes(index, good, ext)  # type: ignore[arg-type]
        bad: list[int] = []
        for n, (st, _, raw) in states.items():
            tar_name = f"{node_dir_name(n)}/{entry.name}.tar"
            idx_name = f"{node_dir_name(n)}/{entry.name}.idx.arrow"
            found: list[Damage] = []
            for f in st.missing:
                found.append(Damage(n, f"{node_dir_name(n)}/{f}", "missing", f"missing {f}"))
            if not st.index_ok:
                found.append(Damage(n, idx_name, "index", st.detail.strip()))
            if raw is not None and (st.bad_samples or not st.size_ok or (expected is not None and raw != expected)):
                what = (f"{len(st.bad_samples)} sample(s) fail their crc32c" if st.bad_samples
                        else "size differs from the manifest's" if not st.size_ok
                        else "tar headers or padding differ from the rebuilt shard")
                found.append(Damage(n, tar_name, "samples" if st.bad_samples else "tar", what,
                                    [entry.first + i for i in st.bad_samples]))
            if found:
                bad.append(n)
                damage.extend(found)
        if not bad or not repair:
            continue
        if index is None:
            unrepairable.append(f"shard {entry.name}: no copy of its index matches the manifest; re-ingest")
            continue
        for n in bad:
            try:
                rebuild_copy(store / node_dir_name(n), entry, ext, good_index, good)  # type: ignore[arg-type]
            except StoreError as exc:
                unrepairable.append(str(exc))
                continue
            repaired += 1
            for d in damage:
                if d.node == n and d.file.startswith(f"{node_dir_name(n)}/{entry.name}."):
                    d.repaired = True
            log.info("repaired %s on %s", entry.name, node_dir_name(n))
        if progress:
            progress(k + 1, len(man.shards))
    return ScrubReport(str(store), len(man.shards), copies, samples, nbytes, damage, unrepairable, repaired,
                       time.perf_counter() - t0)


# -- the node side of a scrub through the nodes ----------------------------------------------------------


def _ext(store: Store) -> str:
    return "jpg" if store.manifest.payload == "jpeg" else "npy"


def node_scrub(store: Store) -> list[dict]:
    """Check every copy a node-local ``Store`` holds; one dict per damaged copy (global sample ids)."""
    out = []
    for k, entry in enumerate(store.manifest.shards):
        if not store.holds(k):
            continue
        st, _, _ = check_copy(store.path, store.node_id or 0, entry, _ext(store))
        if not st.ok:
            out.append({"shard": entry.name, "missing": st.missing, "index_ok": st.index_ok, "size_ok": st.size_ok,
                        "tar_ok": st.tar_ok, "bad_samples": [entry.first + i for i in st.bad_samples],
                        "detail": st.detail.strip()})
    return out


def node_shard_index(store: Store, entry: ShardEntry) -> str:
    """This node's index of ``entry``, base64, if it verifies."""
    _, idx_path = _paths(store.path, entry)
    raw = idx_path.read_bytes() if idx_path.exists() else b""
    if crc32c(raw) != entry.index_crc32c:
        raise StoreError(f"node's index of shard {entry.name} is damaged or missing too")
    return base64.b64encode(raw).decode()


def node_repair(store: Store, entry: ShardEntry, req: dict) -> dict:
    """Rebuild this node's copy of ``entry`` from its own good samples and ``req["samples"]`` ({global id:
    base64}); ``req["index"]`` (base64) replaces a damaged index. Every byte is verified before it is written."""
    st, idx_raw, tar_raw = check_copy(store.path, store.node_id or 0, entry, _ext(store))
    if idx_raw is None:
        if not req.get("index"):
            raise StoreError(f"shard {entry.name}: this node's index is damaged; send a good one ('index')")
        idx_raw = base64.b64decode(req["index"])
    index = index_of(idx_raw, entry.name)
    sent = {int(k) - entry.first: base64.b64decode(v) for k, v in (req.get("samples") or {}).items()}

    def payload(i: int) -> bytes | memoryview | None:
        if i in sent:
            return sent[i]
        return _sample(tar_raw, index, i) if tar_raw is not None else None

    if st.ok:
        return {"repaired": False, "shard": entry.name, "need": []}
    need = [entry.first + i for i in range(len(index)) if payload(i) is None or crc32c(payload(i)) != int(index.crc[i])]
    if need:  # the caller fetches these from a replica and asks again
        return {"repaired": False, "shard": entry.name, "need": need}
    written = rebuild_copy(store.path, entry, _ext(store), idx_raw, payload)
    return {"repaired": True, "shard": entry.name, "bytes": written, "need": []}
