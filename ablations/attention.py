"""Channel-attention modules by name: the one factory behind a setting's `attention:` key.

    attention        module                                        its options
    se (default)     ablations.se.SEModule, the paper's SE         reduction, squeeze, gate, bias (flat keys)
    eca              timm EcaModule                                attention_args: kernel_size, gamma, beta, ...
    cbam             timm CbamModule                               attention_args: rd_ratio, spatial_kernel_size, ...
    gc               timm GlobalContext                            attention_args: rd_ratio, fuse_add, fuse_scale, ...
    ge               timm GatherExcite, where this timm builds it  attention_args: extent, extra_params, ...
    timm             the model's own module (EfficientNet, MobileNetV3, RegNetY), kept as timm built it
    pkg.mod:Class    a researcher's module: Class(channels, **attention_args), [N,C,H,W] -> [N,C,H,W]

A timm module is built as timm's `create_attn(name, channels, **attention_args)` builds it, with timm's
defaults, so `attention: cbam` at the standard position of resnet50 has exactly the parameters of
`timm.create_model('resnet50', block_args={'attn_layer': 'cbam'})`.

Every module placed in a model is tagged with its block name `<MODULE>_<stage>_<block>` (SE_2_1,
CBAM_5_3, MyGate_4_6, ...) and the channels it sees; `attention_blocks` finds them again. Two more
things are read from a module, so that a plug-in can take part in them:
- the excitation probe hooks its first submodule named `gate` (SE, ECA, GC, GE, timm's SE; CBAM's
  channel gate), whose output must hold one value per channel ([N,C,1,1], [N,C,H,W] or ECA's [N,1,C]);
- complexity adds `module.macs_beyond_convs(input_shape)` when the module defines it (the pooling and
  scaling FlopCounterMode misses); for timm's modules the same numbers come from `TIMM_EXTRA_MACS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import timm
import torch
from timm.layers import EcaModule, GatherExcite, GlobalContext, get_attn
from timm.layers.cbam import CbamModule
from timm.layers.squeeze_excite import SEModule as TimmSEModule
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn

from ablations.errors import SpecError
from ablations.schema import SESpec
from ablations.se import SEModule

TIMM_NAMES = ("eca", "cbam", "gc", "ge")  # timm's create_attn names this factory offers
PREFIXES = {SEModule: "SE", TimmSEModule: "SE", SqueezeExcite: "SE", EcaModule: "ECA", CbamModule: "CBAM",
            GlobalContext: "GC", GatherExcite: "GE"}


def _pool_and_scale(shape: torch.Size) -> int:
    n, c, h, w = shape
    return 2 * n * c * h * w


def _cbam(shape: torch.Size) -> int:
    """Channel attention: avg and max pooling and the scaling; spatial: mean and max over channels and
    the scaling. The shared MLP and the 7x7 conv are counted by FlopCounterMode."""
    n, c, h, w = shape
    return 6 * n * c * h * w


def _gc(shape: torch.Size) -> int:
    """The scaling only: the attention pooling is a 1x1 conv and a matrix product, both counted."""
    n, c, h, w = shape
    return n * c * h * w


TIMM_EXTRA_MACS: dict[type, Callable[[torch.Size], int]] = {
    EcaModule: _pool_and_scale, GatherExcite: _pool_and_scale, TimmSEModule: _pool_and_scale,
    SqueezeExcite: _pool_and_scale, CbamModule: _cbam, GlobalContext: _gc,
}


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def module_class(attention: str) -> Callable[..., nn.Module]:
    """The constructor `attention` names (not `se` or `timm`, which the callers handle)."""
    if attention in TIMM_NAMES:
        return get_attn(attention)
    module_name, _, class_name = attention.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a plug-in's import can fail in any way; the user needs the reason
        raise SpecError(f"cannot import {module_name!r} ({_one_line(e)})", key="attention") from None
    cls = getattr(module, class_name, None)
    if not callable(cls):
        raise SpecError(f"{module_name!r} has no class {class_name!r}", key="attention")
    return cls


def create(spec: SESpec, channels: int) -> nn.Module:
    """The module `spec` names for a C-channel map (the paper's SE for `attention: se`)."""
    if spec.attention == "se":
        return SEModule(channels, spec.reduction, spec.squeeze, spec.gate, spec.bias)
    cls = module_class(spec.attention)
    args = spec.attention_args
    try:
        module = cls(channels, **args)
    except SpecError:
        raise
    except Exception as e:  # timm's and a plug-in's constructors raise anything on bad arguments
        if not args and spec.attention in TIMM_NAMES:
            raise SpecError(f"timm {timm.__version__} cannot build its {getattr(cls, '__name__', cls)} "
                            f"with its defaults ({_one_line(e)})", key="attention") from None
        call = ", ".join([str(channels), *(f"{k}={v!r}" for k, v in args.items())])
        raise SpecError(f"{spec.attention}({call}) failed: {_one_line(e)}",
                        key="attention_args" if args else "attention") from None
    if not isinstance(module, nn.Module):
        raise SpecError(f"{spec.attention} must build a torch.nn.Module (got {type(module).__name__})",
                        key="attention")
    return module


def prefix(module: nn.Module) -> str:
    """The <MODULE> of a block name: SE, ECA, CBAM, GC, GE, or a plug-in's class name."""
    return PREFIXES.get(type(module), type(module).__name__)


def tag(module: nn.Module, stage: int, index: int, channels: int) -> nn.Module:
    """Name the module `<MODULE>_<stage>_<index>` and record its channels (read by the probe)."""
    module.attention_name = f"{prefix(module)}_{stage}_{index}"
    module.attention_channels = channels
    if isinstance(module, SEModule):
        module.name = module.attention_name
    return module


def attention_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The model's attention blocks by name, in network order (SE_2_1, SE_2_2, ...)."""
    return {m.attention_name: m for m in model.modules() if getattr(m, "attention_name", None)}


def gate_of(module: nn.Module) -> nn.Module | None:
    """The submodule whose output is the excitation: the first one named `gate` (CBAM: the channel gate)."""
    for name, sub in module.named_modules():
        if name.rsplit(".", 1)[-1] == "gate":
            return sub
    return None


def extra_macs(module: nn.Module, shape: torch.Size) -> int:
    """MACs FlopCounterMode misses in one call of `module` on an input of `shape` (pooling, scaling)."""
    declared = getattr(module, "macs_beyond_convs", None)
    if callable(declared):
        return int(declared(shape))
    count = TIMM_EXTRA_MACS.get(type(module))
    return count(shape) if count is not None else 0


def check_shape(module: nn.Module, inputs: tuple, output: object) -> None:
    """A forward hook's check that an attention block kept its input's shape."""
    x = inputs[0] if inputs else None
    if not (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and output.shape == x.shape):
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise SpecError(f"{getattr(module, 'attention_name', type(module).__name__)}: forward maps "
                        f"{tuple(x.shape) if isinstance(x, torch.Tensor) else x} to {got}; an attention "
                        "module must keep [N, C, H, W]", key="attention")
