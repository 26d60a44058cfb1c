"""The optimizer: torch's SGD with momentum, weight decay on the weights only.

One update step is a handful of multi-tensor kernels, not one small kernel per parameter tensor: on a
GPU the fused implementation (one kernel per group), elsewhere the foreach one (torch's `_foreach_*`
ops). A ResNet-50 has ~160 parameter tensors, and a per-tensor loop is launch-bound on a fast GPU at
the cifar profile's batch. The parameters stay where the model put them, so DDP's
`gradient_as_bucket_view` can make each `.grad` a view of its all-reduce bucket (no copy either way).
"""

from __future__ import annotations

import torch
from torch import nn

from ablations.schema import TrainSpec


def param_groups(model: nn.Module, spec: TrainSpec) -> list[dict]:
    """The weights, with `spec.weight_decay`; and (unless wd_skip_bn_bias is off) the BN parameters and
    biases, the 1-D ones, without: decaying a BN scale only fights the next layer's weights."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if spec.wd_skip_bn_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.SGD:
    """SGD over `param_groups`; fused on CUDA, foreach elsewhere. Call after moving the model to its
    device and memory format."""
    cuda = all(p.device.type == "cuda" for p in model.parameters())
    return torch.optim.SGD(param_groups(model, spec), lr=spec.lr, momentum=spec.momentum,
                           nesterov=spec.nesterov and spec.momentum > 0,
                           fused=True if cuda else None, foreach=None if cuda else True)


def load_state(opt: torch.optim.SGD, state: dict) -> None:
    """Restore a checkpoint's optimizer state, keeping this process's implementation (fused or foreach):
    torch would take it from the checkpoint, and a fused state from a GPU cannot step CPU tensors."""
    flags = [(g["fused"], g["foreach"]) for g in opt.param_groups]
    opt.load_state_dict(state)
    for g, (fused, foreach) in zip(opt.param_groups, flags):
        g["fused"], g["foreach"] = fused, foreach
