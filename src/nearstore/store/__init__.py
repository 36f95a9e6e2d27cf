"""Datasets on disk: synthetic data, WebDataset tar shards with Arrow indexes, manifests, ingest."""

from nearstore.store.format import INDEX_SCHEMA, ShardIndex, ShardReader, ShardWriter
from nearstore.store.ingest import IngestReport, ingest, scan_source
from nearstore.store.manifest import MANIFEST_NAME, Manifest, ShardEntry, node_dir_name, placement
from nearstore.store.store import SampleRef, Store
from nearstore.store.synth import SynthSpec, synth_folder, synth_image

__all__ = [
    "INDEX_SCHEMA", "ShardIndex", "ShardReader", "ShardWriter",
    "IngestReport", "ingest", "scan_source",
    "MANIFEST_NAME", "Manifest", "ShardEntry", "node_dir_name", "placement",
    "SampleRef", "Store",
    "SynthSpec", "synth_folder", "synth_image",
]
