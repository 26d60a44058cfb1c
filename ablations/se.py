"""The SE block family of the paper's ablations (Sec. 6), one module for every variant.

    z = squeeze(U)                  avg | max global pooling, or none (NoSqueeze: every position)
    s = gate(W2 . relu(W1 . z))     W1: C -> C/r, W2: C/r -> C, gate sigmoid | tanh | relu
    out = U * s                     channel-wise (NoSqueeze: element-wise, s keeps H x W)

Differences from timm's `SEModule`, on purpose: the hidden width is exactly C // r (timm rounds to a
multiple of 8), `max` is true global max pooling (timm's `add_maxpool` is 0.5 avg + 0.5 max), and the
FCs have no bias by default (the paper's parameter counts). The FCs are 1x1 convs, so the state-dict
keys (`fc1`, `fc2`) match timm's `seresnet*` and NoSqueeze is the same module applied unpooled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ablations.errors import SpecError

GATES = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
# fc2's init for the unbounded ReLU gate, as a fraction of timm's: see SEModule.reset_parameters.
RELU_GATE_INIT_SCALE = 0.01
SQUEEZES = ("avg", "max", "none")


def hidden_width(channels: int, reduction: int) -> int:
    """C // r, the paper's bottleneck width; r must be in 1..C."""
    if not 0 < reduction <= channels:
        raise SpecError(f"must be in 1..C for a block with C={channels} channels (got {reduction})",
                        key="reduction")
    return max(1, channels // reduction)


class SEModule(nn.Module):
    """Squeeze-and-Excitation on a [N, C, H, W] map.

    Args:
        channels: C, channels of the map it recalibrates.
        reduction: r; hidden width is exactly C // r.
        squeeze: "avg" (paper default), "max" (Table 11) or "none" (NoSqueeze, Table 16).
        gate: "sigmoid" (default), "tanh" or "relu" (Table 12).
        bias: FC biases (off for the paper's ablations; on to match timm's `seresnet*`).
        name: the paper's name of this block, `SE_<stage>_<block>` (Fig. 6).
    """

    def __init__(self, channels: int, reduction: int = 16, squeeze: str = "avg", gate: str = "sigmoid",
                 bias: bool = False, name: str = ""):
        super().__init__()
        if squeeze not in SQUEEZES:
            raise SpecError(f"unknown squeeze {squeeze!r} (known: {', '.join(SQUEEZES)})", key="squeeze")
        if gate not in GATES:
            raise SpecError(f"unknown gate {gate!r} (known: {', '.join(GATES)})", key="gate")
        hidden = hidden_width(channels, reduction)
        self.channels, self.reduction, self.squeeze, self.name = channels, reduction, squeeze, name
        self.attention_name, self.attention_channels = name, channels  # what attention.attention_blocks reads
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias)
        # A module of its own so the excitation s can be read with a forward hook (probe.py).
        self.gate = GATES[gate]()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's ResNet init for every conv (`ResNet.init_weights`): kaiming normal, fan_out, ReLU gain.

        The blocks are inserted after timm initialised the backbone, so without this they would keep
        PyTorch's default (std ~10x smaller for fc1), and the gates would start and stay near 0.5. Biases,
        when on, keep PyTorch's default, as in timm's `seresnet*`.

        The ReLU gate's fc2 starts at RELU_GATE_INIT_SCALE of that. Unbounded, a ReLU gate at timm's scale
        multiplies some channels of some images by 10-20 at initialisation (on small maps the pooled
        vector is heavy-tailed), gains that grow in training until eval-mode activations overflow; a
        bounded gate cannot do that. The paper gives no init; README "The quick profile" has the range
        that trains.
        """
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
        if isinstance(self.gate, nn.ReLU):
            with torch.no_grad():
                self.fc2.weight.mul_(RELU_GATE_INIT_SCALE)

    def excite(self, x: torch.Tensor) -> torch.Tensor:
        """The excitation s: [N, C, 1, 1] (NoSqueeze: [N, C, H, W]), the output of `self.gate`."""
        if self.squeeze == "none":
            return self.gate(self.fc2(self.act(self.fc1(x))))
        n, c, h, w = x.shape
        # Pooling over one flattened axis is up to 1.5x faster on CPU than over (H, W) for large maps.
        # The average is a sum divided on the pooled vector: the sum's backward hands on an expanded
        # view of the gradient, where mean's writes a full-size map (divided), then adds it.
        z = x.flatten(2).sum(2) / (h * w) if self.squeeze == "avg" else x.flatten(2).amax(2)
        # On a pooled vector the 1x1 convs are matrix products: F.linear skips the convolution
        # machinery (about half the time per FC on CPU), same weights and state-dict keys.
        hidden = F.linear(z, self.fc1.weight.flatten(1), self.fc1.bias).relu_()  # in place on a fresh tensor
        return self.gate(F.linear(hidden, self.fc2.weight.flatten(1), self.fc2.bias).view(n, c, 1, 1))

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        """x * s, or with `shortcut`, x * s + shortcut in one pass (the SENet authors' "Axpy" layer).

        The fused form serves the `standard` position's fast path (patch.FusedSEBottleneck). Under
        autograd it is one addcmul; without (inference) it writes into x, which the caller owns (the
        residual branch's last BN output), so no new map is allocated.
        """
        s = self.excite(x)
        if shortcut is None:
            return x * s
        if torch.is_grad_enabled() and (x.requires_grad or s.requires_grad):
            return torch.addcmul(shortcut, x, s)
        return torch.addcmul(shortcut, x, s, out=x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, C={self.channels}, r={self.reduction}, squeeze={self.squeeze!r}"

    def macs_beyond_convs(self, x_shape: torch.Size) -> int:
        """MACs that FLOP counters miss: the squeeze's pooling and the scaling, C*H*W each per image.

        The FCs are matrix products (or 1x1 convs for NoSqueeze), counted by torch's FlopCounterMode.
        """
        n, c, h, w = x_shape
        pooling = 0 if self.squeeze == "none" else c * h * w
        return n * (pooling + c * h * w)
