"""Parameters and MACs in the paper's convention.

The paper's "GFLOPs" are multiply-accumulates of one image at the profile's input size, counting SE's
pooling and scaling. torch's FlopCounterMode counts convolutions and matrix products (2 FLOPs per
MAC); what it misses in an attention block (pooling, channel-wise or spatial scaling) is added per
block from `attention.extra_macs`: the module's own `macs_beyond_convs` (the paper's SE, a plug-in that
declares it) or the closed form of a timm module. BN, ReLU, softmax, the residual addition and the
stem/head pooling are not counted, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ablations.attention import attention_blocks, check_shape, extra_macs


@dataclass(frozen=True)
class Complexity:
    params: int  # trainable parameters
    macs: int  # multiply-accumulates for one image

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gflops(self) -> float:
        """The paper's "GFLOPs" (= GMACs)."""
        return self.macs / 1e9


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: int, in_chans: int = 3) -> int:
    """MACs of one forward pass on a 1 x in_chans x input_size x input_size image.

    Raises SpecError when an attention block changes the shape of its input."""
    missed = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal missed
        check_shape(module, inputs, output)
        missed += extra_macs(module, inputs[0].shape)

    handles = [m.register_forward_hook(hook) for m in attention_blocks(model).values()]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, in_chans, input_size, input_size, device=param.device, dtype=param.dtype)
        with FlopCounterMode(display=False) as counter:
            model(x)
        return counter.get_total_flops() // 2 + missed
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def complexity(model: nn.Module, input_size: int, in_chans: int = 3) -> Complexity:
    return Complexity(params=count_params(model), macs=count_macs(model, input_size, in_chans))
