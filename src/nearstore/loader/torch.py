"""PyTorch adapter: a Loader as a drop-in for ``DataLoader`` loops, rank-aware for DDP.

Yields ``(images, labels)``: uint8 NCHW tensors (or float32 when the pipeline
ends with normalize) shared zero-copy with the loader's batch arrays, and
int64 labels. ``state_dict``/``load_state_dict`` pass through for exact resume.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import torch

from nearstore.core.errors import ConfigError
from nearstore.loader.loader import Batch, Loader

__all__ = ["TorchLoader", "dist_rank"]

log = logging.getLogger(__name__)


def dist_rank() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialized, else from torchrun's RANK and WORLD_SIZE,
    else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        try:
            return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except ValueError:
            raise ConfigError(f"RANK={os.environ['RANK']!r} and WORLD_SIZE={os.environ['WORLD_SIZE']!r} must be "
                              "integers (torchrun sets them)") from None
    return 0, 1


class TorchLoader:
    """Wrap a :class:`Loader` (or build one: ``TorchLoader(store, pipeline=..., ...)``)."""

    def __init__(self, loader: Loader | Any = None, /, **kwargs: Any) -> None:
        if isinstance(loader, Loader):
            if kwargs:
                raise ConfigError("pass either a Loader or Loader arguments, not both")
            self.loader = loader
        else:
            if "rank" not in kwargs and "world_size" not in kwargs:
                kwargs["rank"], kwargs["world_size"] = dist_rank()
            self.loader = Loader(loader, **kwargs)
        rank, world = dist_rank()
        if world > 1 and (self.loader.rank, self.loader.world_size) != (rank, world):
            log.warning("loader rank %d of %d differs from torch.distributed's rank %d of %d: ranks may read "
                        "overlapping samples", self.loader.rank, self.loader.world_size, rank, world)
        self.last_batch: Batch | None = None  # the Batch behind the last tensors yielded (ids, epoch, index)
        if not self.loader.output_spec.fixed:
            raise ConfigError(
                f"the pipeline's output shape {self.loader.output_spec.shape} varies per sample; end it with a "
                "fixed-size op (random_resized_crop, center_crop) to batch it as tensors"
            )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            self.last_batch = batch
            yield torch.from_numpy(batch.data), torch.from_numpy(batch.labels)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    @property
    def stats(self):  # noqa: ANN201 - LoaderStats
        return self.loader.stats

    def close(self) -> None:
        self.loader.close()
