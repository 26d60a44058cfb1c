"""Excitation probe (paper Fig. 6 and 7): what each SE block's gate outputs, per class.

After training, in eval mode, the first `limit` (50, as in the paper) validation images of every
class go through the network; a forward hook on every SE block's `gate` records the excitation s
per channel (NoSqueeze's s keeps H x W: it is averaged over space per image). Per class and block
the mean and the standard deviation over images (population std, ddof=0, so a class with one image
has std 0, not NaN) are kept, not the raw excitations: ImageNet's would be 50k images x 15k channels.

`excitations.npz` keys: "blocks" (names in network order), "classes" (class ids with at least one
image), "counts" (images per listed class), and per block B "B.mean", "B.std" (float32,
[classes x channels]). A model without SE has an empty "blocks".
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from ablations.atomic import savez_atomic
from ablations.patch import se_blocks

IMAGES_PER_CLASS = 50  # the paper's Fig. 6/7 sample


class ValidationData(Protocol):
    def val_labels(self) -> torch.Tensor: ...
    def val_batches(self, indices: torch.Tensor | None = None): ...


def first_per_class(labels: torch.Tensor, num_classes: int, limit: int) -> torch.Tensor:
    """Indices of the first `limit` images of each class, in validation order."""
    picked = [torch.nonzero(labels == c).flatten()[:limit] for c in range(num_classes)]
    return torch.sort(torch.cat(picked)).values


@torch.no_grad()
def probe_excitations(model: nn.Module, data: ValidationData, num_classes: int,
                      limit: int = IMAGES_PER_CLASS) -> dict[str, np.ndarray]:
    """Per-class mean and std of every SE block's excitation, as the arrays `excitations.npz` holds."""
    labels = data.val_labels().cpu()
    indices = first_per_class(labels, num_classes, limit)
    counts = torch.bincount(labels[indices], minlength=num_classes)
    classes = torch.nonzero(counts).flatten()
    out: dict[str, np.ndarray] = {"classes": classes.numpy().astype(np.int64),
                                  "counts": counts[classes].numpy().astype(np.int64)}
    blocks = se_blocks(model)
    out["blocks"] = np.array(list(blocks), dtype=np.str_)
    if not blocks:
        return out

    device = next(model.parameters()).device
    sums = {name: torch.zeros(num_classes, m.channels, dtype=torch.float64, device=device)
            for name, m in blocks.items()}
    squares = {name: torch.zeros_like(s) for name, s in sums.items()}
    batch_labels: list[torch.Tensor] = []

    def hook_for(name: str):
        def hook(_module: nn.Module, _inputs: tuple, s: torch.Tensor) -> None:
            s = s.double().mean((2, 3))  # [N, C, 1, 1] -> [N, C]; NoSqueeze: average over space
            y = batch_labels[-1]
            sums[name].index_add_(0, y, s)
            squares[name].index_add_(0, y, s * s)
        return hook

    handles = [m.gate.register_forward_hook(hook_for(name)) for name, m in blocks.items()]
    was_training = model.training
    model.eval()
    try:
        for x, y in data.val_batches(indices):
            batch_labels.append(y.to(device))
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    n = counts[classes].to(device, torch.float64)[:, None]
    for name in blocks:
        mean = sums[name][classes] / n
        var = (squares[name][classes] / n - mean * mean).clamp_min(0.0)  # rounding can dip below 0
        out[f"{name}.mean"] = mean.float().cpu().numpy()
        out[f"{name}.std"] = var.sqrt().float().cpu().numpy()
    return out


def save_excitations(path: str | Path, stats: dict[str, np.ndarray]) -> None:
    savez_atomic(path, stats)


def load_excitations(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
