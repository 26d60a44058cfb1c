"""The optimizer (optim.py): torch's SGD, foreach on CPU, with the update rules of the flat-buffer
SGD it replaced. That optimizer is kept below, as it was, as the reference: the same model, batches
and recipe must end with the same parameters and momentum buffers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ablations.optim import load_state, make_optimizer, param_groups
from ablations.patch import build_model
from ablations.schema import SESpec, TrainSpec
from tests.helpers import tiny_cfg

# --------------------------------------------------------------------------------------------------
# The reference: the flat-buffer SGD the trainer used before (its update is torch's SGD on one flat
# buffer per group), with its own group rules.


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


def flat_reference(model: nn.Module, spec: TrainSpec) -> FlatSGD:
    return FlatSGD(param_groups(model, spec), lr=spec.lr, momentum=spec.momentum,
                   nesterov=spec.nesterov and spec.momentum > 0)


# --------------------------------------------------------------------------------------------------


def _train_steps(make, spec: TrainSpec, steps: int = 4) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(tiny_cfg().backbone, SESpec(bias=True)).to(memory_format=torch.channels_last)
    opt = make(model, spec)
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        for g in opt.param_groups:  # a changing LR, as warm-up and the schedule make it
            g["lr"] = spec.lr * (i + 1) / steps
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("spec", [
    TrainSpec(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    TrainSpec(lr=0.05, momentum=0.9, weight_decay=1e-4, wd_skip_bn_bias=False),
    TrainSpec(lr=0.2, momentum=0.0, nesterov=True, weight_decay=1e-3),  # nesterov ignored without momentum
], ids=["nesterov", "decay-everything", "no-momentum"])
def test_torch_sgd_matches_the_flat_sgd_it_replaced(spec):
    ref_model, ref_opt = _train_steps(flat_reference, spec)
    model, opt = _train_steps(make_optimizer, spec)
    assert all(g["foreach"] for g in opt.param_groups)  # one multi-tensor op per group, not a loop
    assert len(opt.param_groups) == (2 if spec.wd_skip_bn_bias else 1)
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert a.abs().sum() > 0  # the steps moved something
    if spec.momentum:  # the momentum buffers agree too: the next step would
        ref_flat = torch.cat([ref_opt.state[g["params"][0]]["momentum_buffer"] for g in ref_opt.param_groups])
        ours = torch.cat([opt.state[p]["momentum_buffer"].permute(
            *((0, 2, 3, 1) if p.ndim == 4 else range(p.ndim))).flatten()
            for g in opt.param_groups for p in g["params"]])
        torch.testing.assert_close(ours, ref_flat, rtol=1e-6, atol=1e-7)


def test_weight_decay_groups():
    model = build_model(tiny_cfg().backbone, SESpec(bias=True))
    params = list(model.parameters())
    opt = make_optimizer(model, TrainSpec(weight_decay=1e-4, nesterov=True))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert decay["nesterov"] is True
    assert sum(p.numel() for p in decay["params"]) == sum(p.numel() for p in params if p.ndim > 1)
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in params if p.ndim == 1}
    assert not make_optimizer(model, TrainSpec(momentum=0.0, nesterov=True)).param_groups[0]["nesterov"]


def test_a_resumed_optimizer_keeps_its_own_implementation():
    model = build_model(tiny_cfg().backbone, None)
    opt = make_optimizer(model, TrainSpec())
    state = opt.state_dict()
    for g in state["param_groups"]:  # as a GPU run saves it
        g["fused"], g["foreach"] = True, None
    load_state(opt, state)
    assert all(g["foreach"] is True and not g["fused"] for g in opt.param_groups)
    F.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([0, 1])).backward()
    opt.step()  # a fused state would step these CPU tensors with the fused kernel
