"""timm families beyond ResNet that have an attention slot: EfficientNet, MobileNetV3 and RegNet.

Each of their blocks has one place for channel attention, `block.se`: after the depthwise conv on the
expanded channels (EfficientNet's and MobileNetV3's inverted residuals), after the 3x3 group conv
(RegNetY). A setting works that slot:

    attention: timm     keeps the model's own module where timm put one (parameters = timm's model)
    se: false           empties every slot (nn.Identity)
    any other module    replaces the model's own, in the blocks that have one, on the same channels

Only `position: standard` (the slot) exists here. Stages map by resolution, as the paper's stages do
on ResNet (stage i = conv<i>_x, output stride 2^i): a timm stage whose output stride is 2^i is stage
i, the stride-2 stages before it (EfficientNet's and MobileNetV3's `blocks.0`) count with stage 2.

    family        timm stages -> paper stages 2, 3, 4, 5
    EfficientNet  blocks.0, blocks.1 -> 2; blocks.2 -> 3; blocks.3, blocks.4 -> 4; blocks.5, blocks.6 -> 5
    MobileNetV3   same as EfficientNet (blocks.6 is a 1x1 conv without a slot)
    RegNet        s1 -> 2; s2 -> 3; s3 -> 4; s4 -> 5

Block j of a stage is its j-th block in network order, slot or not (MobileNetV3's names skip the
blocks timm gave no SE). Two backbone keys make them small for CPU and 32x32 inputs: `small_stem`
(the stem and stage 2 keep the input size: total stride 8, as a ResNet's small stem) and `width` (a
channel multiplier: timm's `channel_multiplier` for EfficientNet-B0 and MobileNetV3, RegNet's w0, wa
and stem width).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import timm
from timm.models import efficientnet, mobilenetv3, regnet
from timm.models._efficientnet_builder import efficientnet_init_weights
from timm.models._manipulate import named_apply
from torch import nn

from ablations import attention
from ablations.errors import SpecError
from ablations.schema import BackboneSpec, Profile, SESpec, Setting
from ablations.se import SEModule

SUPPORTED = "EfficientNet, MobileNetV3, RegNet"
MODULE_FAMILIES = {"resnet": "resnet", "efficientnet": "efficientnet", "mobilenetv3": "mobilenetv3",
                   "regnet": "regnet"}  # timm model module -> family
MODEL_CLASSES = {"efficientnet": efficientnet.EfficientNet, "mobilenetv3": mobilenetv3.MobileNetV3,
                 "regnet": regnet.RegNet}
# timm's entry points fix the channel multiplier, so a narrower model comes from the generator they call.
WIDTH_BUILDERS = {
    "efficientnet_b0": partial(efficientnet._gen_efficientnet, "efficientnet_b0", depth_multiplier=1.0),
    "mobilenetv3_large_100": partial(mobilenetv3._gen_mobilenet_v3, "mobilenetv3_large_100"),
    "mobilenetv3_small_100": partial(mobilenetv3._gen_mobilenet_v3, "mobilenetv3_small_100"),
}


def family_of(arch: str) -> str | None:
    """resnet, efficientnet, mobilenetv3 or regnet: the family of a timm model name (None: another)."""
    if not timm.is_model(arch):
        return None
    return MODULE_FAMILIES.get(timm.models.model_entrypoint(arch).__module__.rsplit(".", 1)[-1])


RESNET_ONLY = ("layers", "channels", "block", "stride_in_1x1")  # backbone keys only ResNets have


def family_backbone(profile: Profile, setting: Setting, keys: dict[str, Any]) -> dict[str, Any]:
    """A row's backbone keys (`keys`: the profile's with the row's overrides) once its family is known.

    A row whose arch is of another family keeps the profile's generic keys (classes, input channels,
    small_stem), not its ResNet ones, and takes that family's keys from the profile's `families`
    section before its own.
    """
    family = family_of(keys["arch"]) if isinstance(keys["arch"], str) else None
    if family in (None, "resnet"):
        return keys
    base = {k: v for k, v in profile.backbone.model_dump().items() if k not in RESNET_ONLY}
    return {**base, **profile.families.get(family, {}), **setting.backbone}


def _multiple_of_8(x: float) -> int:
    """RegNet's widths are quantised to multiples of 8, its initial width included."""
    return max(8, 8 * round(x / 8))


def _create(spec: BackboneSpec, family: str) -> nn.Module:
    kwargs: dict = {"num_classes": spec.num_classes, "in_chans": spec.in_chans}
    if family == "regnet":
        kwargs["zero_init_last"] = spec.zero_init_last
        if spec.width is not None:
            cfg = regnet.model_cfgs[spec.arch]
            kwargs.update(w0=_multiple_of_8(cfg.w0 * spec.width), wa=cfg.wa * spec.width,
                          stem_width=_multiple_of_8(cfg.stem_width * spec.width))
    elif spec.zero_init_last:
        raise SpecError(f"{spec.arch} has no zero-init of a last BN", key="backbone.zero_init_last")
    if spec.width is not None and family != "regnet":
        if spec.arch not in WIDTH_BUILDERS:
            raise SpecError(f"{spec.arch}: width works for {', '.join(WIDTH_BUILDERS)} and RegNets",
                            key="backbone.width")
        return WIDTH_BUILDERS[spec.arch](channel_multiplier=spec.width, **kwargs)
    return timm.create_model(spec.arch, pretrained=False, **kwargs)


def build(spec: BackboneSpec) -> nn.Module:
    """A randomly initialised EfficientNet / MobileNetV3 / RegNet, its own attention modules in place."""
    family = family_of(spec.arch)
    for key in ("layers", "channels", "block"):
        if getattr(spec, key) is not None:
            raise SpecError(f"a ResNet option; {spec.arch} is {family}", key=f"backbone.{key}")
    if spec.stride_in_1x1:
        raise SpecError(f"a ResNet option; {spec.arch} is {family}", key="backbone.stride_in_1x1")
    model = _create(spec, family)
    if spec.small_stem:
        _small_stem(model)
    return model


def stages(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(paper stage, timm stage) in network order, stages from the output stride timm records."""
    if isinstance(model, regnet.RegNet):
        timm_stages = [(name, getattr(model, name)) for name in ("s1", "s2", "s3", "s4")]
    else:
        timm_stages = [(f"blocks.{i}", s) for i, s in enumerate(model.blocks)]
    # feature_info lists the stage that ends each resolution; the stages before it share its stride
    ends = {f["module"]: f["reduction"] for f in model.feature_info}
    out, pending = [], []
    for name, stage in timm_stages:
        pending.append(stage)
        if name in ends:
            paper_stage = min(5, max(2, round(math.log2(ends[name]))))
            out += [(paper_stage, s) for s in pending]
            pending = []
    return out + [(5, s) for s in pending]


def _small_stem(model: nn.Module) -> None:
    """Stride 1 in the stem conv and in stage 2 (shortcuts included): total stride 8, as ResNet's."""
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    stem.stride = (1, 1)
    for paper_stage, stage in stages(model):
        if paper_stage == 2:
            for m in stage.modules():
                if isinstance(m, nn.Conv2d) and m.stride != (1, 1):
                    m.stride = (1, 1)


def slots(model: nn.Module) -> list[tuple[int, int, nn.Module]]:
    """(stage, block index within the stage, block) of every block with timm's own attention module."""
    out, index = [], {}
    for paper_stage, stage in stages(model):
        for block in stage.children():
            index[paper_stage] = index.get(paper_stage, 0) + 1
            if not isinstance(getattr(block, "se", nn.Identity()), nn.Identity):
                out.append((paper_stage, index[paper_stage], block))
    return out


def _init_like_host(model: nn.Module, module: nn.Module) -> None:
    """The init timm gives a module built with the model (the paper's SE and plug-ins keep their own)."""
    if isinstance(model, regnet.RegNet):
        named_apply(regnet._init_weights, module)
    else:
        efficientnet_init_weights(module)


def patch_slots(model: nn.Module, spec: SESpec | None) -> nn.Module:
    """Keep, empty or replace the model's attention modules in place (and return the model)."""
    found = slots(model)
    if spec is not None and not found:
        raise SpecError(f"{type(model).__name__} model has no attention slot: timm built it without "
                        "attention modules", key="attention")
    if spec is not None and spec.position != "standard":
        raise SpecError(f"{type(model).__name__} has one attention slot per block (position: standard)",
                        key="position")
    for stage, j, block in found:
        if spec is None or stage not in spec.stages:
            block.se = nn.Identity()
            continue
        channels = next(m for m in block.se.modules() if isinstance(m, nn.Conv2d)).in_channels
        if spec.attention != "timm":
            block.se = attention.create(spec, channels)
            if not isinstance(block.se, SEModule) and spec.attention in attention.TIMM_NAMES:
                _init_like_host(model, block.se)
        attention.tag(block.se, stage, j, channels)
    return model
