"""timm backbones with attention blocks patched in: ResNets at any position and stage, other families
(EfficientNet, MobileNetV3, RegNet) in their own attention slot (families.py).

On a ResNet every position uses a hook point timm's blocks already have, so block forwards stay timm's
own and the result trains, scripts and compiles like any timm model:

    position   Bottleneck                                BasicBlock
    standard   block.se: after bn3, before the addition    block.se: after bn2, before the addition
               (SE's fast path: scaling and addition fused, FusedSEBottleneck / FusedSEBasicBlock)
    pre        before conv1: the unit's input, residual      same, before conv1
               branch only (the shortcut sees the input)
    post       after act3: after addition + final ReLU       after act2
    identity   on the shortcut (after downsample, if any)    same
    3x3        after the 3x3 conv's BN + ReLU (block.aa),    after the first 3x3 conv's BN + ReLU
               C = bottleneck width                          (the second 3x3 is where standard sits)

`standard` is timm's own `attn_layer` slot (`block.se`), so any timm module there is the model timm
builds with `block_args={'attn_layer': name}`. Stage i of the paper (conv<i>_x, i = 2..5) is timm's
`layer<i-1>`; the j-th block's module is `<MODULE>_i_j` (SE_2_1, CBAM_5_3, ...).
"""

from __future__ import annotations

from collections import OrderedDict

import timm
import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from ablations import attention, families
from ablations.errors import SpecError
from ablations.schema import PLUGIN, BackboneSpec, SESpec
from ablations.se import SEModule

BLOCK_TYPES = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _stage_layers(model: ResNet) -> list[tuple[int, nn.Sequential]]:
    return [(i + 2, getattr(model, f"layer{i + 1}")) for i in range(4)]


def se_channels(block: nn.Module, position: str) -> int:
    """C of the feature map the SE block at `position` recalibrates in `block`."""
    bottleneck = isinstance(block, Bottleneck)
    if position in ("standard", "post", "identity"):
        return (block.conv3 if bottleneck else block.conv2).out_channels
    if position == "pre":
        return block.conv1.in_channels
    if position == "3x3":
        return (block.conv2 if bottleneck else block.conv1).out_channels
    raise SpecError(f"unknown position {position!r}", key="position")


class FusedSEBottleneck(Bottleneck):
    """timm's Bottleneck with standard SE, scaling and residual addition fused (`SEModule.forward` with a shortcut).

    The fast path of the `standard` position; timm's own forward with `block.se` is the reference
    it is tested against (same outputs and gradients). Used only without drop-path, which would sit
    between the scaling and the addition.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act3(self.se(x, shortcut))


class FusedSEBasicBlock(BasicBlock):
    """timm's BasicBlock with standard SE fused like FusedSEBottleneck."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act2(self.se(x, shortcut))


FUSED = {Bottleneck: FusedSEBottleneck, BasicBlock: FusedSEBasicBlock}


def _after(first: nn.Module, module: nn.Module) -> nn.Module:
    """`first` then `module`, dropping `first` when it is an Identity placeholder."""
    if isinstance(first, nn.Identity):
        return module
    return nn.Sequential(OrderedDict(orig=first, se=module))


def _insert(block: nn.Module, position: str, module: nn.Module, fused: bool) -> None:
    bottleneck = isinstance(block, Bottleneck)
    if position == "standard":
        block.se = module
        fusable = isinstance(module, SEModule) and block.drop_path is None and type(block) in FUSED
        if fused and fusable:
            block.__class__ = FUSED[type(block)]  # same modules and state dict, fused forward
    elif position == "pre":
        block.conv1 = nn.Sequential(OrderedDict(se=module, conv=block.conv1))
    elif position == "post":
        name = "act3" if bottleneck else "act2"
        setattr(block, name, nn.Sequential(OrderedDict(act=getattr(block, name), se=module)))
    elif position == "identity":
        block.downsample = module if block.downsample is None else _after(block.downsample, module)
    elif position == "3x3":
        block.aa = _after(block.aa, module)


def init_like_resnet(module: nn.Module) -> None:
    """What timm's `ResNet.init_weights` does to a module built with the model: kaiming normal (fan_out,
    ReLU gain) for every 2-D conv. The paper's SE does this itself; a plug-in keeps its own init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def patch_se(model: ResNet, spec: SESpec, fused: bool = True) -> ResNet:
    """Insert attention blocks into `model` in place (and return it), named `<MODULE>_<stage>_<block>`.

    `fused=False` keeps timm's block forwards everywhere: the reference SE's fast path is tested
    against.
    """
    if not isinstance(model, ResNet):
        raise SpecError(f"attention patching needs a timm ResNet-family model, got {type(model).__name__}",
                        key="backbone.arch")
    if spec.attention == "timm":
        raise SpecError("a plain ResNet has no attention module of its own to keep (`attention: timm` "
                        "keeps EfficientNet's, MobileNetV3's or RegNetY's)", key="attention")
    for stage, layer in _stage_layers(model):
        if stage not in spec.stages:
            continue
        for j, block in enumerate(layer, start=1):
            channels = se_channels(block, spec.position)
            module = attention.create(spec, channels)
            if spec.attention in attention.TIMM_NAMES:
                init_like_resnet(module)
            _insert(block, spec.position, attention.tag(module, stage, j, channels), fused)
    return model


def se_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The model's attention blocks (SE or another module) by name, in network order (SE_2_1, SE_2_2, ...)."""
    return attention.attention_blocks(model)


def _move_stride_to_1x1(model: ResNet) -> None:
    """Original ResNet: stride in the first 1x1 conv of downsampling bottlenecks (timm: in the 3x3)."""
    for _, layer in _stage_layers(model):
        for block in layer:
            if isinstance(block, Bottleneck) and block.conv2.stride != (1, 1):
                block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


def _small_stem(model: ResNet, in_chans: int) -> None:
    """3x3 stride-1 stem and no max-pool: keeps resolution for 32x32-sized inputs."""
    width = model.bn1.num_features
    model.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as timm's stem
    model.maxpool = nn.Identity()


def build_backbone(spec: BackboneSpec) -> nn.Module:
    """A randomly initialised timm model as `spec` describes it: a plain ResNet, or another family with
    its own attention modules still in place."""
    if not timm.is_model(spec.arch):
        raise SpecError(f"unknown timm model {spec.arch!r}", key="backbone.arch")
    if families.family_of(spec.arch) not in (None, "resnet"):
        return families.build(spec)
    if spec.width is not None:
        raise SpecError("a ResNet takes per-stage `channels`, not `width`", key="backbone.width")
    kwargs: dict = {"num_classes": spec.num_classes, "in_chans": spec.in_chans,
                    "zero_init_last": spec.zero_init_last}
    if spec.layers is not None:
        kwargs["layers"] = spec.layers
    if spec.channels is not None:
        kwargs["channels"] = spec.channels
    if spec.block is not None:
        kwargs["block"] = BLOCK_TYPES[spec.block]
    try:
        model = timm.create_model(spec.arch, pretrained=False, **kwargs)
    except TypeError as e:  # a non-ResNet arch rejects ResNet keyword arguments
        raise SpecError(f"{spec.arch!r} is not a supported timm family (ResNet, {families.SUPPORTED}) "
                        f"({e})", key="backbone.arch") from None
    if not isinstance(model, ResNet):
        raise SpecError(f"{spec.arch!r} is not a supported timm family (ResNet, {families.SUPPORTED})",
                        key="backbone.arch")
    if any(isinstance(m, nn.Module) and m.__class__.__name__ in ("SEModule", "EcaModule")
           for m in model.modules()):
        raise SpecError(f"{spec.arch!r} already has attention blocks; use the plain ResNet",
                        key="backbone.arch")
    if spec.stride_in_1x1:
        _move_stride_to_1x1(model)
    if spec.small_stem:
        _small_stem(model, spec.in_chans)
    return model


def build_model(backbone: BackboneSpec, se: SESpec | None, fused: bool = True) -> nn.Module:
    """Backbone + attention (None: none; on other families, their own modules removed). The one factory
    the trainer, complexity and tests use."""
    if se is not None and timm.is_model(backbone.arch) and families.family_of(backbone.arch) is None:
        raise SpecError(f"{backbone.arch} has no attention slot (attention goes into ResNet, "
                        f"{families.SUPPORTED} models)", key="attention")
    model = build_backbone(backbone)
    if not isinstance(model, ResNet):
        return families.patch_slots(model, se)
    return patch_se(model, se, fused) if se is not None else model


def check_fits(backbone: BackboneSpec, se: SESpec | None) -> None:
    """Raise SpecError if the setting cannot be built (bad arch, r > C, a plug-in that cannot be imported
    or changes the shape, ...); builds on the meta device."""
    from ablations.complexity import count_macs

    with torch.device("meta"):
        model = build_model(backbone, se)
    if se is not None and PLUGIN.fullmatch(se.attention):
        try:  # one shape-only pass: the complexity hooks refuse a module that changes the shape
            count_macs(model, 64, backbone.in_chans)
        except SpecError:
            raise
        except Exception:  # noqa: BLE001 - a plug-in may not run on the meta device; the trial checks it
            pass
