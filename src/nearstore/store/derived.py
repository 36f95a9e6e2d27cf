"""Derived datasets: a network's outputs for every sample, stored next to the samples they came from.

Layout (``NAME`` a derived dataset, ``GEN`` one run that produced it)::

    STORE/derived/NAME.json                        the derived manifest: the commit point
    STORE/derived/NAME.job.json                    an unfinished run's progress (resume), gone once it commits
    STORE/node-XXX/derived/NAME/GEN/SHARD.arrow    one file per shard, on every node that holds the shard

A shard's file is an Arrow IPC file (pyarrow alone reads it) with one row per
sample of the shard, in sample order, keyed by ``sample`` (global id) and
``key``: ``label``, ``output`` (the activation, flattened to a fixed-size list
of the output dtype; its shape is in the schema metadata), ``class`` and
``score`` (argmax and softmax maximum of a 1-D output, for filters), ``crc32c``
(of the output's bytes, computed by the worker that produced it) and ``error``
(why a sample has no output: a corrupt image is a row, not a failed job). The
derived manifest records every file's crc32c and size, the nodes holding it,
and the fingerprint of what produced the outputs (architecture, cut, weights
digest, engine, dtype, the pipeline before the network).

Crash safety follows the store's contract: files are written under a temp name,
fsynced and renamed; a run writes a fresh ``GEN`` directory, and the derived
manifest is replaced last, atomically. A run killed at any moment leaves the
previous derived dataset (its manifest names only its own generation's files)
or the new one, never a mix. Files of generations no manifest names are swept
by the next run that commits.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nearstore.core.checksum import crc32c
from nearstore.core.errors import ChecksumError, ConfigError, StoreError, StoreFormatError
from nearstore.store.format import atomic_write_bytes, fsync_dir
from nearstore.store.manifest import node_dir_name

__all__ = ["Fingerprint", "DerivedShard", "DerivedManifest", "DerivedExistsError", "DerivedMismatchError",
           "DERIVED_DIR", "derived_schema", "build_table", "encode_table", "decode_table", "shard_path",
           "write_shard_file", "read_shard_file", "load_derived", "commit_derived", "list_derived", "JobState",
           "outputs_of", "check_name", "BASE_COLUMNS"]

DERIVED_DIR = "derived"
FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")

#: the columns of every derived file (``output`` is the activation itself)
BASE_COLUMNS = ("sample", "key", "label", "class", "score", "output", "crc32c", "error")


class DerivedExistsError(StoreError, FileExistsError):
    """A derived dataset of that name exists and overwriting was not asked for."""


class DerivedMismatchError(ConfigError):
    """A derived dataset was made by something else than what is asked for; the message says what differs."""


def check_name(name: str) -> str:
    if ".." in name or not _NAME_RE.match(name) or name.endswith(".json"):
        raise ConfigError(f"derived dataset name {name[:40]!r} must match {_NAME_RE.pattern} (letters, digits, "
                          "'_', '.', '-'; no '/', no '..')")
    return name


class Fingerprint(BaseModel):
    """What produced a derived dataset's outputs: equal fingerprints give equal outputs (within the engine's
    tolerance)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    arch: str
    cut: str
    weights: str = Field(description="digest of the weights: a file's sha256, or seed-N")
    engine: str
    dtype: str
    pipeline: list[Any] = Field(description="the ops before the network, as JSON")
    # a manifest written before this field existed reads as "none": right for float outputs, and an int8
    # dataset of unknown recipe is refused rather than trusted
    quant: str = Field("none", description="the int8 recipes the outputs depend on, versioned (nets.quant.recipe)")

    def differences(self, other: "Fingerprint") -> list[str]:
        """``field: stored -> requested`` for every field that differs."""
        mine, theirs = self.model_dump(), other.model_dump()
        return [f"{k}: stored {mine[k]!r}, requested {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


class DerivedShard(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(ge=0, description="the store shard's position in the store manifest")
    shard: str
    samples: int = Field(ge=0)
    errors: int = Field(0, ge=0, description="samples without an output (their row says why)")
    file_bytes: int = Field(ge=0)
    crc32c: int = Field(ge=0)
    nodes: list[int] = Field(description="nodes holding this file (the shard's replicas that were up)")
    node: int = Field(description="the node that computed it")
    seconds: float = Field(0.0, ge=0)


class DerivedManifest(BaseModel):
    """A committed derived dataset."""

    model_config = ConfigDict(extra="forbid")
    format: int = FORMAT_VERSION
    name: str
    dataset: str
    dataset_fingerprint: str = Field(description="the store manifest's fingerprint when the outputs were made")
    generation: str
    fingerprint: Fingerprint
    kind: str
    dtype: str
    shape: list[int] = Field(description="one sample's activation shape (before int8 encoding)")
    num_samples: int = Field(ge=0)
    shards: list[DerivedShard]
    checksum: int | None = None

    def body_crc32c(self) -> int:
        return crc32c(self.model_dump_json(exclude={"checksum"}).encode())

    def dumps(self) -> str:
        return self.model_copy(update={"checksum": self.body_crc32c()}).model_dump_json(indent=1)

    def check(self, fingerprint: Fingerprint) -> None:
        """Refuse (``DerivedMismatchError``) when ``fingerprint`` is not what made this dataset."""
        diff = self.fingerprint.differences(fingerprint)
        if diff:
            raise DerivedMismatchError(f"derived dataset {self.name!r} was made by something else: "
                                       + "; ".join(diff) + f". Recompute it (`nearstore infer ... --out {self.name} "
                                       "--overwrite`) or ask for what it holds")

    @property
    def file_bytes(self) -> int:
        return sum(s.file_bytes for s in self.shards)


def _derived_root(store: Path) -> Path:
    return Path(store) / DERIVED_DIR


def manifest_path(store: Path, name: str) -> Path:
    return _derived_root(store) / f"{check_name(name)}.json"


def state_path(store: Path, name: str) -> Path:
    return _derived_root(store) / f"{check_name(name)}.job.json"


def shard_path(node_dir: Path, name: str, generation: str, shard: str) -> Path:
    """Where a node directory keeps a derived shard file."""
    return Path(node_dir) / DERIVED_DIR / check_name(name) / generation / f"{shard}.arrow"


def list_derived(store: str | Path) -> list[str]:
    root = _derived_root(Path(store))
    return sorted(p.name[:-5] for p in root.glob("*.json") if not p.name.endswith(".job.json")) \
        if root.is_dir() else []


def load_derived(store: str | Path, name: str) -> DerivedManifest:
    """The committed derived dataset ``name`` of ``store``; an unknown name lists the ones there are."""
    path = manifest_path(Path(store), name)
    if not path.exists():
        have = list_derived(store)
        raise StoreError(f"no derived dataset {name!r} in {store} (derived datasets: {', '.join(have) or 'none'}); "
                         f"make it with `nearstore infer --cluster {store} ... --out {name}`")
    try:
        man = DerivedManifest.model_validate_json(path.read_bytes())
    except (ValidationError, ValueError) as exc:
        raise StoreFormatError(f"derived manifest {path} is malformed: {exc}") from None
    if man.checksum is not None and man.checksum != man.body_crc32c():
        raise ChecksumError(f"derived manifest {path}: its crc32c does not match its contents; the file is corrupt. "
                            f"Recompute it with `nearstore infer ... --out {name} --overwrite`")
    return man


def commit_derived(store: str | Path, man: DerivedManifest) -> None:
    """Make ``man`` the derived dataset ``man.name``: one atomic rename (the commit point)."""
    root = _derived_root(Path(store))
    root.mkdir(exist_ok=True)
    atomic_write_bytes(manifest_path(Path(store), man.name), man.dumps().encode())


class JobState(BaseModel):
    """An unfinished run's progress: written (atomically) after every completed shard, read on restart."""

    model_config = ConfigDict(extra="forbid")
    name: str
    generation: str
    fingerprint: Fingerprint
    dataset_fingerprint: str
    overwrite: bool = False
    done: dict[int, DerivedShard] = Field(default_factory=dict)

    @classmethod
    def load(cls, store: Path, name: str) -> "JobState | None":
        path = state_path(store, name)
        if not path.exists():
            return None
        try:
            return cls.model_validate_json(path.read_bytes())
        except (ValidationError, ValueError):
            return None  # a state we cannot read only costs recomputation

    def save(self, store: Path) -> None:
        self.write(store, self.name, self.model_dump_json().encode())

    @staticmethod
    def write(store: Path, name: str, body: bytes) -> None:
        """Write a state serialized earlier (``model_dump_json``), atomically."""
        root = _derived_root(store)
        root.mkdir(exist_ok=True)
        atomic_write_bytes(state_path(store, name), body)

    @staticmethod
    def clear(store: Path, name: str) -> None:
        path = state_path(store, name)
        if path.exists():
            path.unlink()
            fsync_dir(path.parent)


# -- the file format -------------------------------------------------------------------------------------
def derived_schema(dtype: str, width: int, meta: dict[str, str]) -> pa.Schema:
    return pa.schema([
        ("sample", pa.int64()), ("key", pa.string()), ("label", pa.int32()), ("class", pa.int32()),
        ("score", pa.float32()), ("output", pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), width)),
        ("crc32c", pa.uint32()), ("error", pa.string()),
    ], metadata=meta)


def outputs_of(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The ``output`` column as an (N, width) array (rows with an error hold zeros)."""
    col = table.column("output")
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    width = col.type.list_size
    dtype = col.type.value_type.to_pandas_dtype()
    parts = []
    for ch in chunks:
        flat = ch.values.slice(ch.offset * width, len(ch) * width)  # null rows keep their (zero) slots
        parts.append(np.asarray(flat.to_numpy(zero_copy_only=False), dtype).reshape(len(ch), width))
    return np.concatenate(parts) if parts else np.zeros((0, width), dtype)


def _class_score(values: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """argmax and softmax maximum per row (float64, so the scores do not depend on the output dtype's sums)."""
    x = values.astype(np.float64)
    cls = x.argmax(axis=1).astype(np.int32) if x.shape[1] else np.zeros(len(x), np.int32)
    z = x - x.max(axis=1, keepdims=True)
    score = (1.0 / np.exp(z).sum(axis=1)).astype(np.float32)
    return np.where(ok, cls, 0), np.where(ok, score, 0)


def build_table(rows: list[tuple], *, dtype: str, shape: tuple[int, ...], encoded: tuple[int, ...],
                decode: Any, meta: dict[str, str]) -> pa.Table:
    """A derived file's table from rows (sample, key, label, output array or None, crc32c, error).

    ``encoded`` is the per-sample array shape as the network op emits it (int8 rows carry their scale);
    ``decode`` turns (N, *encoded) outputs into float (N, *shape) for ``class``/``score`` (1-D outputs only).
    """
    width = math.prod(encoded)
    n = len(rows)
    values = np.zeros((n, width), np.dtype(dtype))
    ok = np.zeros(n, bool)
    for i, r in enumerate(rows):
        if r[3] is not None:
            values[i] = np.asarray(r[3]).reshape(-1)
            ok[i] = True
    if len(shape) == 1 and n:
        cls, score = _class_score(decode(values.reshape(n, *encoded)).reshape(n, -1), ok)
        cls_arr = pa.array(cls, pa.int32(), mask=~ok)
        score_arr = pa.array(score, pa.float32(), mask=~ok)
    else:
        cls_arr, score_arr = pa.nulls(n, pa.int32()), pa.nulls(n, pa.float32())
    flat = pa.array(values.reshape(-1))
    output = pa.FixedSizeListArray.from_arrays(flat, width, mask=pa.array(~ok))
    schema = derived_schema(dtype, width, meta)
    return pa.Table.from_arrays([
        pa.array([r[0] for r in rows], pa.int64()), pa.array([r[1] for r in rows], pa.string()),
        pa.array([r[2] for r in rows], pa.int32()), cls_arr, score_arr, output,
        pa.array([r[4] for r in rows], pa.uint32()), pa.array([r[5] for r in rows], pa.string()),
    ], schema=schema)


def encode_table(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def decode_table(raw: bytes, *, what: str, expected_crc: int | None = None) -> pa.Table:
    if expected_crc is not None and crc32c(raw) != expected_crc:
        raise ChecksumError(f"{what}: crc32c {crc32c(raw):08x} does not match the derived manifest's "
                            f"{expected_crc:08x}; the file is corrupt. Recompute the derived dataset "
                            "(`nearstore infer ... --overwrite`) or copy the file from a replica")
    try:
        table = ipc.open_file(pa.BufferReader(raw)).read_all()
        table.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise StoreFormatError(f"{what}: unreadable derived file: {exc}") from None
    missing = [c for c in BASE_COLUMNS if c not in table.column_names]
    if missing:
        raise StoreFormatError(f"{what}: derived file lacks columns {missing}")
    return table


def write_shard_file(node_dir: Path, name: str, generation: str, shard: str, raw: bytes) -> Path:
    """Write a derived shard file (temp + fsync + rename); returns its path."""
    path = shard_path(node_dir, name, generation, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, raw)
    return path


def read_shard_file(node_dir: Path, name: str, generation: str, shard: str, *,
                    expected_crc: int | None = None) -> tuple[pa.Table, int]:
    """A derived shard file's table, checked against its crc32c, and its size in bytes."""
    path = shard_path(node_dir, name, generation, shard)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StoreFormatError(f"derived shard {path} is missing: the derived dataset {name!r} is incomplete on "
                               f"{Path(node_dir).name}; recompute it with `nearstore infer ... --overwrite`") from None
    return decode_table(raw, what=str(path), expected_crc=expected_crc), len(raw)


def sweep_generations(node_dir: Path, name: str, keep: str | None) -> int:
    """Remove this node's files of derived dataset ``name`` except generation ``keep``; returns dirs removed."""
    root = Path(node_dir) / DERIVED_DIR / check_name(name)
    removed = 0
    if not root.is_dir():
        return 0
    for gen in root.iterdir():
        if gen.name != keep:
            for f in gen.iterdir():
                f.unlink(missing_ok=True)
            gen.rmdir()
            removed += 1
    if not any(root.iterdir()):
        root.rmdir()
    return removed


def local_node_dir(store: Path, node: int) -> Path:
    return Path(store) / node_dir_name(node)


def parse_meta(table: pa.Table) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}


def meta_json(**kw: Any) -> dict[str, str]:
    return {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in kw.items()}

