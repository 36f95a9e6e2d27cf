"""Transfer learning: a frozen backbone's features (from the nodes or the host) train a head on the host.

``HeadTrainer`` is a real PyTorch training step: a linear or one-hidden-layer
MLP classifier (features are standardized by a batch norm first; spatial
activations are average-pooled), cross-entropy loss, Adam. ``train_head``
drives it from a ``Loader`` whose pipeline ends in a network op, and reports
what the accelerator-side benchmark reports (samples/s, accelerator
utilization AU = time in the training step / wall time, bytes per sample on
the link, where time went) plus the loss curve and accuracy.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from nearstore.core.errors import ConfigError

__all__ = ["Head", "HeadTrainer"]


class Head(nn.Module):
    """BatchNorm1d -> Linear (``hidden=0``) or Linear -> ReLU -> Linear, on pooled features."""

    def __init__(self, features: int, classes: int, hidden: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(features)]
        if hidden:
            layers += [nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes)]
        else:
            layers.append(nn.Linear(features, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # a spatial activation (a cut before pooling): pool it here, on the host
            x = x.mean(dim=(2, 3))
        return self.net(x.flatten(1))


class HeadTrainer:
    """One head, its optimizer and loss; ``step`` trains on a batch and returns the loss before the update."""

    def __init__(self, features: int, classes: int, *, hidden: int = 0, lr: float = 1e-2, seed: int = 0) -> None:
        if features < 1 or classes < 2:
            raise ConfigError(f"a head needs features >= 1 and classes >= 2 (got {features}, {classes})")
        if not lr > 0:
            raise ConfigError(f"lr must be > 0 (got {lr})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = Head(features, classes, hidden)
        self.classes = classes
        self.losses: list[float] = []
        self.opt = torch.optim.Adam(self.head.parameters(), lr=lr)
        self.loss_fn = nn.CrossEntropyLoss()

    @staticmethod
    def tensor(features: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(features)).float()

    def step(self, features: Any, labels: Any) -> float:
        x, y = self.tensor(features), torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if int(y.min()) < 0 or int(y.max()) >= self.classes:
            raise ConfigError(f"labels must lie in 0..{self.classes - 1} (got {int(y.min())}..{int(y.max())})")
        self.head.train()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.head(x), y)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def accuracy(self, batches: Iterable[tuple[Any, Any]]) -> float:
        self.head.eval()
        right = total = 0
        for features, labels in batches:
            pred = self.head(self.tensor(features)).argmax(1)
            right += int((pred == torch.as_tensor(np.asarray(labels))).sum())
            total += len(pred)
        return right / total if total else math.nan

    def __call__(self, batch: Any) -> None:
        """Train on a loader ``Batch`` (its ``data`` and ``labels``) and record the loss in ``losses``."""
        self.losses.append(self.step(batch.data, batch.labels))

    def loss_fell(self, window: int = 3) -> tuple[float, float]:
        """Mean loss of the first and of the last ``window`` steps."""
        if len(self.losses) < 2 * window:
            raise ConfigError(f"need at least {2 * window} steps to compare (got {len(self.losses)})")
        return float(np.mean(self.losses[:window])), float(np.mean(self.losses[-window:]))
