"""The optimizer: SGD with momentum, weight decay on the weights only, stepped on flat buffers.

A ResNet-50-topology model has ~160 parameter tensors; on a CPU, SGD's per-tensor update loop costs
~4% of a small model's forward+backward. `FlatSGD` keeps each parameter group in one flat buffer (the
parameters become views of it) and updates it with a few element-wise ops, bit-identical to per-tensor
SGD.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ablations.schema import TrainSpec


def _flatten(params: list[nn.Parameter]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Move `params` into one flat buffer (the parameters become views of it) and give it a flat
    gradient buffer. Returns the flat parameter and views of its `.grad` shaped like each parameter."""
    first = params[0]
    flat = torch.zeros(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
    flat.grad = torch.zeros_like(flat)
    grad_views = []
    offset = 0
    with torch.no_grad():
        for p in params:
            if not (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)):
                p.data = p.data.contiguous()
            # Same strides as the parameter (channels_last stays channels_last), same n elements.
            view = flat.as_strided(p.shape, p.stride(), offset)
            view.copy_(p)
            p.data = view
            grad_views.append(flat.grad.as_strided(p.shape, p.stride(), offset))
            offset += p.numel()
    return flat, grad_views


class FlatSGD(torch.optim.SGD):
    """torch's SGD on one flat buffer per parameter group instead of one tensor per parameter.

    A ResNet-50-topology model has ~160 parameter tensors; on a CPU SGD's per-tensor update loop
    costs ~4% of a small model's forward+backward. Here the parameters are views of one flat buffer
    per group; `step` copies the gradients backward left in each `.grad` into the flat gradient
    buffer (one cheap copy each) and updates the flat buffers with a few element-wise ops: results
    are bit-identical to per-tensor SGD. Gradients are not accumulated into the flat buffer directly:
    autograd's in-place accumulation into existing `.grad`s costs more than it saves.
    """

    def __init__(self, groups: list[dict[str, Any]], **kwargs: Any):
        self._members: list[tuple[list[nn.Parameter], list[torch.Tensor]]] = []
        flat_groups = []
        for g in groups:
            params = list(g["params"])
            if params:
                flat, views = _flatten(params)
                self._members.append((params, views))
                flat_groups.append({**g, "params": [flat]})
        super().__init__(flat_groups, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # the closure computes the gradients: before they are gathered
            with torch.enable_grad():
                loss = closure()
        for params, views in self._members:
            for p, view in zip(params, views):
                if p.grad is None:  # unused in this step's graph. (torch's SGD would skip it; here
                    view.zero_()    # decay and momentum still apply. ResNets use every parameter.)
                else:
                    view.copy_(p.grad)
        super().step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for params, _ in self._members:
            for p in params:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()


def make_optimizer(model: nn.Module, spec: TrainSpec) -> FlatSGD:
    """SGD with weight decay on the weights (and, unless wd_skip_bn_bias is off, not on BN
    parameters and biases: the 1-D ones). Call after moving the model to its device and format."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if spec.wd_skip_bn_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return FlatSGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov and spec.momentum > 0)
