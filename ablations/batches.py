"""What every data set of a trial gives the trainer, whatever its kind (data.py's in-memory sets,
folder_data.py's image folders), and how an epoch's randomness is seeded.

Everything random about an epoch (order and augmentation) is drawn from generators seeded by
(seed, epoch[, rank]), never from a generator carried across epochs: an epoch looks the same whether
the run was interrupted before it or not, which is what makes resumed runs bit-identical on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]  # normalised float images on the training device, labels


def seed_for(*parts: int) -> int:
    """A well-mixed 63-bit seed from small integers (seed, epoch, rank): neighbouring epochs or
    seeds must not give correlated streams, which `seed + epoch` would."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class TrialData(Protocol):
    """One rank's view of a trial's data set."""

    num_classes: int
    steps_per_epoch: int  # optimizer steps per epoch (the global batch divides the training set)
    images_per_epoch: int  # training images this rank sees per epoch

    def train_batches(self, epoch: int, seed: int) -> Iterator[Batch]:
        """This rank's batches of epoch `epoch` (0-based); a function of (seed, epoch, rank) only."""

    def val_batches(self, indices: torch.Tensor | None = None) -> Iterator[Batch]:
        """Validation images in order (this rank's share, or exactly `indices`), unaugmented."""

    def val_labels(self) -> torch.Tensor:
        """Every validation label, in order."""

    def close(self) -> None:
        """Release what the data set holds beyond memory (DataLoader workers)."""
