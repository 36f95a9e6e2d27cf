"""The wire protocol between loaders and storage nodes (Arrow Flight), shared by both sides.

- A **ticket** is a small JSON document (validated by ``Ticket``): dataset
  name, the sample ids in order (or ranges), the ops to run on the node,
  optionally how many of them each sample gets (``prefixes``, one per
  sample: a split can differ per sample; absent, every sample gets all),
  seed, epoch, and rows per record batch. Sizes are bounded.
- The **response** is a stream of record batches with columns ``sample``,
  ``key``, ``label``, ``data`` (the bytes of each output: the stored payload
  when no op ran, else the C-order array), ``shape`` and ``crc32c`` (of
  ``data``, computed by the node: end-to-end integrity of what it computed),
  and ``error``/``error_kind`` (null, or why this one sample could not be
  produced: ``checksum`` when the node's copy failed its crc32c, so the
  loader fetches it from a replica; ``decode`` when the sample itself is bad,
  so every replica would fail the same way), and ``prefix`` (how many ops the
  node ran on this sample). Schema metadata carries the output kind and dtype
  after all of the ticket's ops, and ``dtypes``: a JSON object from every
  valid prefix to its output dtype ("bytes" for none).
- Bytes on the wire are counted on both sides as the Arrow IPC message size
  of each record batch (``pyarrow.ipc.get_record_batch_size``).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Callable, NamedTuple

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nearstore.core.checksum import crc32c
from nearstore.core.errors import ConfigError

__all__ = [
    "MAX_TICKET_BYTES", "MAX_SAMPLES", "Ticket", "parse_ticket", "response_schema", "encode_rows",
    "pack_rows", "assemble_rows", "Packed",
    "decode_rows", "wire_bytes", "NAME_RE", "Row", "ERROR_KINDS",
]

MAX_TICKET_BYTES = 256 * 1024
MAX_SAMPLES = 16384
MAX_OPS = 32
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


class Ticket(BaseModel):
    """What a DoGet asks a node for."""

    model_config = ConfigDict(extra="forbid")

    v: int = 1
    dataset: str
    samples: list[Annotated[int, Field(ge=0)]] | None = None
    ranges: list[tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]] | None = None
    ops: list[dict[str, Any] | str] = Field(default_factory=list, max_length=MAX_OPS)
    prefixes: list[Annotated[int, Field(ge=0, le=MAX_OPS)]] | None = None
    seed: int = 0
    epoch: int = Field(0, ge=0)
    batch_size: int = Field(64, ge=1, le=4096)

    @field_validator("dataset")
    @classmethod
    def _name(cls, v: str) -> str:
        if ".." in v or "/" in v or "\\" in v or not NAME_RE.match(v):
            raise ValueError(f"dataset name {v[:40]!r} must match {NAME_RE.pattern} (no '..', '/' or '\\\\')")
        return v

    @model_validator(mode="after")
    def _one_selector(self) -> "Ticket":
        if (self.samples is None) == (self.ranges is None):
            raise ValueError("give exactly one of 'samples' (ids in order) or 'ranges' ([start, stop) pairs)")
        if self.v != 1:
            raise ValueError(f"unsupported ticket version {self.v}; this node speaks version 1")
        n = len(self.ids())
        if n > MAX_SAMPLES:
            raise ValueError(f"a ticket may ask for at most {MAX_SAMPLES} samples")
        if self.prefixes is not None:
            if len(self.prefixes) != n:
                raise ValueError(f"'prefixes' has {len(self.prefixes)} entries for {n} samples: give one per sample")
            if max(self.prefixes, default=0) > len(self.ops):
                raise ValueError(f"a prefix of {max(self.prefixes)} ops is longer than the ticket's "
                                 f"{len(self.ops)} ops")
        return self

    def prefix_of(self) -> list[int]:
        """How many ops each sample gets on the node."""
        return list(self.prefixes) if self.prefixes is not None else [len(self.ops)] * len(self.ids())

    def ids(self) -> list[int]:
        if self.samples is not None:
            return self.samples
        out: list[int] = []
        for a, b in self.ranges or []:
            if b < a:
                raise ValueError(f"range [{a}, {b}) has stop < start")
            if len(out) + (b - a) > MAX_SAMPLES:
                raise ValueError(f"a ticket may ask for at most {MAX_SAMPLES} samples")
            out.extend(range(a, b))
        return out

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def parse_ticket(raw: bytes) -> Ticket:
    """Validate a ticket; every problem is a ConfigError with a precise message."""
    if len(raw) > MAX_TICKET_BYTES:
        raise ConfigError(f"ticket is {len(raw)} bytes; the limit is {MAX_TICKET_BYTES}")
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"ticket is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"ticket must be a JSON object, got {type(doc).__name__}")
    try:
        return Ticket.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'ticket'}: {e['msg']}" for e in exc.errors()[:5])
        raise ConfigError(f"bad ticket: {problems}") from None


def response_schema(kind: str, dtype: str, dtypes: dict[int, str] | None = None) -> pa.Schema:
    """Columns of a response; ``dtypes``: output dtype after each valid prefix (default: ``dtype`` for all)."""
    return pa.schema(
        [
            ("sample", pa.int64()),
            ("key", pa.string()),
            ("label", pa.int32()),
            ("data", pa.binary()),
            ("shape", pa.list_(pa.int32())),
            ("crc32c", pa.uint32()),
            ("error_kind", pa.string()),
            ("error", pa.string()),
            ("prefix", pa.int16()),
        ],
        metadata={"kind": kind, "dtype": dtype, "dtypes": json.dumps(dtypes or {})},
    )


ERROR_KINDS = ("checksum", "decode", "read")


class Packed(NamedTuple):
    """Every column of a response batch but the payload, which ``pack_rows`` copied elsewhere."""

    samples: list[int]
    keys: list[str]
    labels: list[int]
    shapes: list[list[int]]
    crcs: list[int]
    kinds: list[str | None]
    errors: list[str | None]
    offsets: np.ndarray  # int32, len(rows) + 1
    prefixes: list[int | None]

    @property
    def payload_bytes(self) -> int:
        return int(self.offsets[-1])


def pack_rows(rows: list[tuple], payload: Callable[[int], Any]) -> Packed:
    """Copy the outputs of rows (sample, key, label, output[, error_kind, error[, prefix]]) back to back into
    ``payload(total_bytes)`` (any writable buffer of at least that size) and describe them.

    Outputs are bytes or numpy arrays (None for a row that carries an error);
    each row's crc32c is computed here, over exactly the bytes sent: over the
    row's copy in ``payload``, right after the copy, while it is still in cache
    (one read of the row from memory, not two).
    """
    views, shapes = [], []
    kinds: list[str | None] = []
    errors: list[str | None] = []
    for row in rows:
        out = row[3]
        kinds.append(row[4] if len(row) > 4 else None)
        errors.append(row[5] if len(row) > 5 else None)
        if out is None:
            out = b""
        if isinstance(out, np.ndarray):
            arr = np.ascontiguousarray(out)
            view = arr.reshape(-1).view(np.uint8)
            shapes.append(list(arr.shape))
        else:
            view = np.frombuffer(out, np.uint8)
            shapes.append([])
        views.append(view)
    offsets = np.zeros(len(views) + 1, np.int32)
    np.cumsum([v.nbytes for v in views], out=offsets[1:])
    total = int(offsets[-1])
    dst = np.frombuffer(payload(total), np.uint8, count=total)
    crcs = []
    for v, a, b in zip(views, offsets[:-1].tolist(), offsets[1:].tolist()):
        piece = dst[a:b]
        piece[...] = v
        crcs.append(crc32c(piece))
    return Packed([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], shapes, crcs, kinds, errors,
                  offsets, [r[6] if len(r) > 6 else None for r in rows])


def assemble_rows(schema: pa.Schema, packed: Packed, payload: pa.Buffer) -> pa.RecordBatch:
    """The record batch of ``packed`` rows whose outputs lie in ``payload`` (used as is: no copy)."""
    n = len(packed.samples)
    data = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(packed.offsets), payload])
    return pa.RecordBatch.from_arrays(
        [
            pa.array(packed.samples, pa.int64()),
            pa.array(packed.keys, pa.string()),
            pa.array(packed.labels, pa.int32()),
            data,
            pa.array(packed.shapes, pa.list_(pa.int32())),
            pa.array(packed.crcs, pa.uint32()),
            pa.array(packed.kinds, pa.string()),
            pa.array(packed.errors, pa.string()),
            pa.array(packed.prefixes, pa.int16()),
        ],
        schema=schema,
    )


def encode_rows(schema: pa.Schema, rows: list[tuple]) -> pa.RecordBatch:
    """Rows -> a record batch; the outputs are copied once, into one buffer from Arrow's pool."""
    box: list[pa.Buffer] = []

    def alloc(n: int) -> pa.Buffer:
        box.append(pa.allocate_buffer(n))  # Arrow's pool reuses memory: no fresh pages per batch
        return box[0]

    packed = pack_rows(rows, alloc)
    return assemble_rows(schema, packed, box[0])


class Row(NamedTuple):
    """One decoded response row; ``value`` is a zero-copy view (None when the node sent an error)."""

    sample: int
    key: str
    label: int
    value: Any
    nbytes: int
    crc_ok: bool | None  # None: not checked yet (``decode_rows(verify=False)``): the caller checks ``crc``
    error_kind: str | None = None
    error: str | None = None
    prefix: int | None = None  # how many ops the node ran on this sample
    crc: int | None = None  # the crc32c the node computed over ``value``'s bytes


def decode_rows(batch: pa.RecordBatch, *, verify: bool = True) -> list[Row]:
    """A record batch -> ``Row``s; arrays are zero-copy views into the received buffers.

    ``verify=False`` leaves each row's crc32c check to the caller (``Row.crc``), who may check it over its
    own copy of the row, once, while that copy is in cache (the loader does, into the batch it builds)."""
    meta = batch.schema.metadata or {}
    dtype = (meta.get(b"dtype") or b"bytes").decode()
    dtypes = {int(k): v for k, v in json.loads(meta.get(b"dtypes") or b"{}").items()}
    prefixes = batch.column("prefix").to_pylist() if "prefix" in batch.schema.names else [None] * len(batch)
    col = batch.column("data")
    offsets = np.frombuffer(col.buffers()[1], np.int32, count=len(col) + 1, offset=col.offset * 4)
    payload = col.buffers()[2]
    raw = np.frombuffer(payload, np.uint8) if payload is not None else np.zeros(0, np.uint8)
    shapes = batch.column("shape").to_pylist()
    crcs = batch.column("crc32c").to_numpy()
    kinds = batch.column("error_kind").to_pylist()
    errors = batch.column("error").to_pylist()
    out = []
    for i, (sample, key, label) in enumerate(
        zip(batch.column("sample").to_pylist(), batch.column("key").to_pylist(), batch.column("label").to_pylist())
    ):
        if kinds[i] is not None:
            out.append(Row(sample, key, label, None, 0, True, kinds[i], errors[i], prefixes[i]))
            continue
        piece = raw[offsets[i] : offsets[i + 1]]
        crc = int(crcs[i])
        ok = crc32c(piece) == crc if verify else None
        dt = dtypes.get(prefixes[i], dtype) if prefixes[i] is not None else dtype
        value: Any = piece.tobytes() if dt == "bytes" else piece.view(dt).reshape(shapes[i])
        out.append(Row(sample, key, label, value, len(piece), ok, None, None, prefixes[i], crc))
    return out


def wire_bytes(batch: pa.RecordBatch) -> int:
    """Bytes of the Arrow IPC message that carries ``batch`` (metadata + body)."""
    return pa.ipc.get_record_batch_size(batch)
