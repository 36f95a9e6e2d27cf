"""Training on what the loader delivers: a trainable head on a frozen backbone's features (transfer learning)."""

from nearstore.train.head import Head, HeadTrainer

__all__ = ["Head", "HeadTrainer"]
