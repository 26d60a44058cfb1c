"""Excitation probe (paper Fig. 6 and 7): what each attention block's gate outputs, per class.

After training, in eval mode, the first `limit` (50, as in the paper) validation images of every
class go through the network; a forward hook on every block's gate (`attention.gate_of`: SE, ECA, GC,
GE, timm's SE, CBAM's channel gate, a plug-in's submodule named `gate`) records the excitation s per
channel (NoSqueeze's s keeps H x W: it is averaged over space per image; ECA's [N, 1, C] is read as
[N, C]). Blocks without a gate, or whose gate does not give one value per channel, are left out. Per
class and block the mean and the standard deviation over images (population std, ddof=0, so a class
with one image has std 0, not NaN) are kept, not the raw excitations: ImageNet's would be 50k images
x 15k channels.

`excitations.npz` keys: "blocks" (names in network order), "classes" (class ids with at least one
image), "counts" (images per listed class), and per block B "B.mean", "B.std" (float32,
[classes x channels]). A model without attention blocks has an empty "blocks".
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from ablations.atomic import savez_atomic
from ablations.attention import attention_blocks, gate_of

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
    """Per-class mean and std of every gated attention block's excitation, as `excitations.npz` holds them."""
    labels = data.val_labels().cpu()
    indices = first_per_class(labels, num_classes, limit)
    counts = torch.bincount(labels[indices], minlength=num_classes)
    classes = torch.nonzero(counts).flatten()
    out: dict[str, np.ndarray] = {"classes": classes.numpy().astype(np.int64),
                                  "counts": counts[classes].numpy().astype(np.int64),
                                  "blocks": np.array([], dtype=np.str_)}
    gates = {name: (m.attention_channels, gate) for name, m in attention_blocks(model).items()
             if (gate := gate_of(m)) is not None}
    if not gates:
        return out
    device = next(model.parameters()).device
    sums = {name: torch.zeros(num_classes, c, dtype=torch.float64, device=device)
            for name, (c, _) in gates.items()}
    squares = {name: torch.zeros_like(s) for name, s in sums.items()}
    batch_labels: list[torch.Tensor] = []
    unreadable: set[str] = set()

    def hook_for(name: str, channels: int):
        def hook(_module: nn.Module, _inputs: tuple, s: torch.Tensor) -> None:
            per_channel = s.ndim >= 2 and (s.shape[1] == channels or s.shape[1:] == (1, channels))
            if not per_channel:
                unreadable.add(name)
                return
            # [N, C, 1, 1] -> [N, C]; NoSqueeze's [N, C, H, W]: average over space; ECA's [N, 1, C]
            s = s.double().reshape(s.shape[0], channels, -1).mean(2)
            y = batch_labels[-1]
            sums[name].index_add_(0, y, s)
            squares[name].index_add_(0, y, s * s)
        return hook

    handles = [gate.register_forward_hook(hook_for(name, c)) for name, (c, gate) in gates.items()]
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

    blocks = [name for name in gates if name not in unreadable]
    out["blocks"] = np.array(blocks, dtype=np.str_)
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
