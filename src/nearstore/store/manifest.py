"""The manifest: the single commit point of a store.

``STORE/manifest.json`` lists the classes, every shard (sample count, sizes,
index checksum, global sample range) and where each shard lives: a list of node
directories ``node-XXX`` (R replicas on distinct nodes). A store is visible only
through its manifest, which is written last and atomically; shard files of a
generation that never got a manifest are invisible and removed by the next
ingest. Every node directory also gets a copy so a node can serve on its own.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nearstore.core.checksum import crc32c
from nearstore.core.errors import StoreError, StoreFormatError

__all__ = ["MANIFEST_NAME", "ShardEntry", "Manifest", "node_dir_name", "placement"]

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
# a shard name becomes a file name inside a node directory: no separators, no leading dot (so no '..')
SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


def node_dir_name(node: int) -> str:
    return f"node-{node:03d}"


def placement(shard: int, *, nodes: int, replicas: int) -> list[int]:
    """Nodes holding ``shard``: a pure function, replicas on distinct nodes."""
    if not 1 <= replicas <= nodes:
        raise StoreError(f"replicas must be in 1..nodes ({nodes}), got {replicas}")
    return [(shard + r) % nodes for r in range(replicas)]


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=SHARD_NAME_RE.pattern)
    samples: int = Field(ge=0)
    first: int = Field(ge=0, description="global id of the shard's first sample")
    tar_bytes: int = Field(ge=0)
    payload_bytes: int = Field(ge=0)
    index_crc32c: int = Field(ge=0)
    nodes: list[int]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int = FORMAT_VERSION
    name: str
    generation: str
    payload: Literal["jpeg", "npy"] = "jpeg"
    classes: list[str]
    num_samples: int = Field(ge=0)
    nodes: int = Field(ge=1)
    replicas: int = Field(ge=1)
    mean_width: float
    mean_height: float
    mean_payload_bytes: float
    shards: list[ShardEntry]
    placement_epoch: int = Field(0, ge=0, description="counts placement changes (rebalance); newest wins")
    checksum: int | None = Field(None, description="crc32c of the manifest's JSON without this field")

    def body_crc32c(self) -> int:
        # placement_epoch 0 is left out: manifests sealed before the field existed still verify
        skip = {"checksum"} | ({"placement_epoch"} if self.placement_epoch == 0 else set())
        return crc32c(self.model_dump_json(exclude=skip).encode())

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if self.checksum is not None and self.checksum != self.body_crc32c():
            raise ValueError("its crc32c does not match its contents: the file is corrupt")
        total = 0
        for s in self.shards:
            if s.first != total:
                raise ValueError(f"shard {s.name} starts at sample {s.first}, expected {total}")
            total += s.samples
            if len(set(s.nodes)) != len(s.nodes) or any(not 0 <= n < self.nodes for n in s.nodes):
                raise ValueError(f"shard {s.name} has invalid placement {s.nodes} for {self.nodes} nodes")
        if total != self.num_samples:
            raise ValueError(f"shards hold {total} samples but num_samples is {self.num_samples}")
        return self

    @property
    def fingerprint(self) -> str:
        """Identity of the dataset's contents: feeds the global shuffle."""
        h = hashlib.blake2b(digest_size=8)
        for s in self.shards:
            h.update(f"{s.name}:{s.samples}:{s.index_crc32c};".encode())
        return h.hexdigest()

    @classmethod
    def load(cls, store: Path) -> "Manifest":
        path = Path(store) / MANIFEST_NAME
        if not path.exists():
            hint = (
                "the directory exists but has no manifest: an ingest never finished there"
                if Path(store).is_dir()
                else "no such directory"
            )
            raise StoreError(f"no store at {store} ({hint}); create one with `nearstore ingest SRC {store}`")
        try:
            return cls.model_validate(json.loads(path.read_bytes().decode("utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, ValidationError, RecursionError) as exc:
            raise StoreFormatError(f"manifest {path} is malformed: {exc}; restore it from a node directory's "
                                   "copy (STORE/node-XXX/manifest.json) or re-run `nearstore ingest`") from None

    def dumps(self) -> str:
        """The JSON written to disk, sealed with its checksum."""
        return self.model_copy(update={"checksum": self.body_crc32c()}).model_dump_json(indent=1)
