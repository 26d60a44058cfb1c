"""timm families beyond ResNet: EfficientNet, MobileNetV3 and RegNet's attention slot, their stage
mapping, their small forms, and the profile's `families` section."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import assert_same_as_timm
from timm.models._efficientnet_blocks import SqueezeExcite

from ablations.cli import main
from ablations.complexity import complexity
from ablations.errors import SpecError
from ablations.patch import build_model, se_blocks
from ablations.schema import BackboneSpec, SESpec
from ablations.se import SEModule
from ablations.spec import load_profile, load_sweep, run_config
from ablations.stride import input_stride

torch.set_num_threads(1)

ARCHS = ("efficientnet_b0", "mobilenetv3_large_100", "regnety_002")


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(arch: str, se: SESpec | None, **backbone) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(BackboneSpec(arch=arch, **backbone), se)


def timm_se_params(arch: str) -> int:
    """Parameters of the attention modules timm builds into `arch`, counted from timm's model."""
    model = timm.create_model(arch)
    return sum(n_params(m.se) for m in model.modules() if hasattr(m, "se") and not isinstance(
        m.se, torch.nn.Identity))


def test_efficientnet_b0_keeps_timms_se_exactly():
    assert n_params(build("efficientnet_b0", SESpec(attention="timm"))) == 5_288_548


@pytest.mark.parametrize("arch", ARCHS)
def test_timm_keeps_removes_or_replaces_the_models_own_module(arch):
    theirs = n_params(timm.create_model(arch))
    kept = build(arch, SESpec(attention="timm"))
    assert n_params(kept) == theirs
    removed = build(arch, None)
    assert n_params(removed) == theirs - timm_se_params(arch)
    assert se_blocks(removed) == {} and not any(isinstance(m, SqueezeExcite) for m in removed.modules())
    replaced = build(arch, SESpec(attention="eca"))
    kept_blocks, eca_blocks = se_blocks(kept), se_blocks(replaced)
    # the same slots, renamed by module, on the same channels
    assert [n.replace("SE_", "ECA_") for n in kept_blocks] == list(eca_blocks)
    assert [m.attention_channels for m in kept_blocks.values()] == [m.attention_channels for m in
                                                                    eca_blocks.values()]
    assert all(type(m).__name__ == "EcaModule" for m in eca_blocks.values())


def test_eca_in_efficientnets_slot_is_timms_se_layer_eca_model():
    """timm's own EfficientNet-B0 with `se_layer='eca'` puts ECA in the same slot on the same channels
    (its rd_ratio and activation do not reach plain ECA): same parameters, same outputs and gradients."""
    torch.manual_seed(0)
    reference = timm.create_model("efficientnet_b0", se_layer="eca")
    ours = build_model(BackboneSpec(arch="efficientnet_b0"), SESpec(attention="eca"))
    assert_same_as_timm(ours, reference)


def test_efficientnet_stage_names():
    """blocks.0-1 -> stage 2, blocks.2 -> 3, blocks.3-4 -> 4, blocks.5-6 -> 5 (EfficientNet-B0: 1, 2, 2,
    3, 3, 4, 1 blocks)."""
    names = list(se_blocks(build("efficientnet_b0", SESpec(attention="timm"))))
    assert names == [*(f"SE_2_{j}" for j in range(1, 4)), "SE_3_1", "SE_3_2",
                     *(f"SE_4_{j}" for j in range(1, 7)), *(f"SE_5_{j}" for j in range(1, 6))]


def test_mobilenetv3_names_skip_blocks_without_se():
    # mobilenetv3_large_100: SE in blocks.2 (3 blocks), the last two blocks of blocks.4 and all of blocks.5
    names = list(se_blocks(build("mobilenetv3_large_100", SESpec(attention="timm"))))
    assert names == ["SE_3_1", "SE_3_2", "SE_3_3", "SE_4_5", "SE_4_6", "SE_5_1", "SE_5_2", "SE_5_3"]


def test_regnet_stages_are_s1_to_s4():
    model = build("regnety_002", SESpec(attention="timm"))
    depths = [len(list(getattr(model, f"s{i}").children())) for i in range(1, 5)]
    names = list(se_blocks(model))
    assert names == [f"SE_{stage}_{j}" for stage, d in zip(range(2, 6), depths) for j in range(1, d + 1)]


@pytest.mark.parametrize("arch", ARCHS)
def test_stages_subset_keeps_only_those_slots(arch):
    model = build(arch, SESpec(attention="cbam", stages=[4, 5]))
    names = list(se_blocks(model))
    assert names and all(n.startswith(("CBAM_4_", "CBAM_5_")) for n in names)
    full = build(arch, SESpec(attention="cbam"))
    assert len(names) == sum(n.startswith(("CBAM_4_", "CBAM_5_")) for n in se_blocks(full))


def test_paper_se_in_the_slot_trains():
    model = build_model(BackboneSpec(arch="efficientnet_b0", small_stem=True, width=0.35, num_classes=5),
                        SESpec(reduction=4))
    blocks = se_blocks(model)
    assert all(isinstance(m, SEModule) and m.fc1.out_channels == m.attention_channels // 4
               for m in blocks.values())
    x = torch.randn(2, 3, 12, 12)
    model(x).square().sum().backward()
    assert all(m.fc1.weight.grad is not None for m in blocks.values())


@pytest.mark.parametrize("arch", [ARCHS[0], *(pytest.param(a, marks=pytest.mark.slow) for a in ARCHS[1:])])
def test_small_stem_makes_the_total_stride_8(arch):
    assert input_stride(BackboneSpec(arch=arch)) == 32
    assert input_stride(BackboneSpec(arch=arch, small_stem=True)) == 8
    # and the stage mapping is the model's, not the modified strides'
    assert list(se_blocks(build(arch, SESpec(attention="timm"), small_stem=True))) == list(
        se_blocks(build(arch, SESpec(attention="timm"))))


@pytest.mark.parametrize("arch", ARCHS)
def test_width_is_timms_channel_multiplier(arch):
    """Width 1 rebuilt through timm's generator is exactly timm's model; a smaller width is smaller."""
    full = n_params(build(arch, SESpec(attention="timm"), width=1.0))
    assert full == n_params(timm.create_model(arch))
    assert n_params(build(arch, SESpec(attention="timm"), width=0.5)) < 0.6 * full


def test_timm_se_complexity_closed_form():
    """EfficientNet-B0's own SE adds, per block, its two 1x1 convs on the pooled vector and the pooling
    and scaling of the C x H x W map it recalibrates."""
    with torch.device("meta"):
        kept = build_model(BackboneSpec(arch="efficientnet_b0"), SESpec(attention="timm"))
        plain = build_model(BackboneSpec(arch="efficientnet_b0"), None)
    shapes = {}
    for name, m in se_blocks(kept).items():
        m.register_forward_pre_hook(lambda mod, i, name=name: shapes.__setitem__(name, i[0].shape))
    macs = complexity(kept, 224).macs - complexity(plain, 224).macs
    expected = 0
    for name, m in se_blocks(kept).items():
        _, c, h, w = shapes[name]
        rd = m.conv_reduce.out_channels
        expected += 2 * c * rd + 2 * c * h * w
    assert macs == expected and len(shapes) == 16


@pytest.mark.parametrize("backbone,se,key,needle", [
    (dict(arch="efficientnet_lite0"), SESpec(attention="eca"), "attention", "no attention slot"),
    (dict(arch="regnetx_002"), SESpec(), "attention", "no attention slot"),
    (dict(arch="vit_tiny_patch16_224"), SESpec(), "attention", "no attention slot"),
    (dict(arch="efficientnet_b0"), SESpec(attention="timm", position="pre"), "position", "one attention slot"),
    (dict(arch="efficientnet_b0", channels=(8, 8, 8, 8)), None, "backbone.channels", "a ResNet option"),
    (dict(arch="efficientnet_b0", stride_in_1x1=True), None, "backbone.stride_in_1x1", "a ResNet option"),
    (dict(arch="efficientnet_b0", zero_init_last=True), None, "backbone.zero_init_last", "no zero-init"),
    (dict(arch="efficientnet_b3", width=0.5), None, "backbone.width", "width works for"),
    (dict(arch="resnet50", width=0.5), None, "backbone.width", "per-stage `channels`"),
])
def test_family_errors(backbone, se, key, needle):
    with pytest.raises(SpecError) as e:
        build(se=se, **backbone)
    assert e.value.key == key and needle in str(e.value), str(e.value)


def test_plain_backbone_of_a_family_without_slot_builds():
    assert se_blocks(build("efficientnet_lite0", None)) == {}


# --------------------------------------------------------------------------------------------------
# The sweep and the profiles


def test_families_sweep_resolves_per_profile():
    sweep = load_sweep("families")
    quick, cifar = load_profile("quick"), load_profile("cifar")
    by_label = {s.label: s for s in sweep.settings}
    eff = run_config(quick, by_label["EfficientNet-B0"], 0).backbone
    assert (eff.arch, eff.width, eff.small_stem, eff.channels, eff.num_classes) == (
        "efficientnet_b0", quick.families["efficientnet"]["width"], True, None, 10)
    mnv3 = run_config(quick, by_label["MobileNetV3"], 0).backbone
    assert mnv3.width == quick.families["mobilenetv3"]["width"]
    resnext = run_config(quick, by_label["SE-ResNeXt-50"], 0).backbone
    assert resnext.arch == "resnext50_32x4d" and resnext.channels == quick.backbone.channels
    assert run_config(cifar, by_label["EfficientNet-B0"], 0).backbone.width is None  # full width on cifar
    assert run_config(load_profile("paper"), by_label["EfficientNet-B0"], 0).backbone.stride_in_1x1 is False


def test_families_quick_rows_fit_the_quick_input():
    quick = load_profile("quick")
    for setting in load_sweep("families").settings:
        backbone = run_config(quick, setting, 0).backbone
        assert input_stride(backbone) <= quick.data.input_size, setting.label


def test_attention_sweep_rows_equal_timms_models():
    paper = load_profile("paper")
    for setting in load_sweep("attention").settings:
        if setting.se is None or setting.se.attention == "se":
            continue
        cfg = run_config(paper, setting, 0)
        with torch.device("meta"):
            ours = build_model(cfg.backbone.model_copy(update={"stride_in_1x1": False}), cfg.se)
            theirs = timm.create_model("resnet50", block_args={"attn_layer": setting.se.attention})
        assert n_params(ours) == n_params(theirs), setting.label


@pytest.mark.slow
def test_a_family_row_trains_and_is_probed(tmp_path, capsys):
    """MobileNetV3 with its own (hard-sigmoid) SE, one epoch on the quick profile: trained, counted,
    and its gates probed under the paper's block names."""
    code = main(["train", "--sweep", "families", "--setting", "MobileNetV3", "--out", str(tmp_path),
                 "--set", "train.epochs=1", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    final = json.loads((tmp_path / "final.json").read_text())
    cfg = run_config(load_profile("quick"), {s.label: s for s in load_sweep("families").settings}["MobileNetV3"], 0)
    with torch.device("meta"):
        assert final["params"] == n_params(build_model(cfg.backbone, cfg.se))
    with np.load(tmp_path / "excitations.npz") as z:
        assert z["blocks"].tolist() == ["SE_3_1", "SE_3_2", "SE_3_3", "SE_4_5", "SE_4_6", "SE_5_1", "SE_5_2",
                                        "SE_5_3"]
        gates = z["SE_5_3.mean"]
        assert gates.shape[0] == 10 and ((gates >= 0) & (gates <= 1)).all()


def test_make_targets_beyond_the_paper():
    root = Path(__file__).resolve().parent.parent
    for sweep in ("attention", "families"):
        out = subprocess.run(["make", "-n", f"ablation-{sweep}", "PYTHON=python3"], cwd=root, capture_output=True,
                             text=True, check=True).stdout
        assert f" run {sweep} --profile quick" in out
    out = subprocess.run(["make", "-n", "ablations", "PYTHON=python3"], cwd=root, capture_output=True, text=True,
                         check=True).stdout
    assert "attention" not in out and "families" not in out  # `make ablations` stays the paper's seven
