"""The client side: global order, rank shares, batching, resume, stats, and the PyTorch adapter.

Import ``nearstore.loader.torch`` for the PyTorch adapter (it imports torch).
"""

from nearstore.loader.loader import Batch, Loader, LoaderStats, SampleError
from nearstore.loader.order import batch_bounds, epoch_order, num_batches, rank_share
from nearstore.store.sources import Fetched, LocalSource, SampleSource

__all__ = [
    "Batch", "Loader", "LoaderStats", "SampleError",
    "batch_bounds", "epoch_order", "num_batches", "rank_share",
    "Fetched", "LocalSource", "SampleSource",
]
