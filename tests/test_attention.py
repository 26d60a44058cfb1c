"""Beyond SE on ResNets: timm's ECA, CBAM, GC (and GE) and plug-ins at every position and stage, equal
to timm's own models, counted in closed form, probed through their gates."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from helpers import assert_same_as_timm
from test_se_patch import BACKBONES, expected_se_channels

from ablations.complexity import complexity
from ablations.data import InMemoryData
from ablations.errors import SpecError
from ablations.grid import _what_trains
from ablations.patch import build_model, check_fits, se_blocks
from ablations.probe import first_per_class, probe_excitations
from ablations.schema import BackboneSpec, SESpec
from ablations.spec import load_profile, load_run_config, load_sweep, run_config
from analysis import load
from analysis.render import render
from analysis.tables import build_table

torch.set_num_threads(1)

TIMM_MODULES = ("eca", "cbam", "gc")
PREFIX = {"eca": "ECA", "cbam": "CBAM", "gc": "GC", "plugin_modules:ChannelScale": "ChannelScale"}
RESNET50_MAPS = [(3, 256, 56), (4, 512, 28), (6, 1024, 14), (3, 2048, 7)]  # blocks, C, H = W at 224


def eca_kernel(c: int) -> int:
    """ECA-Net's adaptive kernel size: |log2(C)/gamma + b/gamma| rounded to odd, gamma=2, b=1, at least 3."""
    t = int(abs(math.log2(c) + 1) / 2)
    return max(t if t % 2 else t + 1, 3)


def rounded(c: int, ratio: float) -> int:
    """timm's make_divisible(c * ratio, 1, round_limit=0): nearest integer, at least 1."""
    return max(1, int(c * ratio + 0.5))


def module_params(name: str, c: int) -> int:
    """Parameters of one module on a C-channel map, from each module's definition."""
    if name == "eca":
        return eca_kernel(c)  # one 1-D conv, no bias
    if name == "cbam":
        return 2 * c * rounded(c, 1 / 16) + 2 * 7 * 7 + 2  # shared MLP (no bias), 7x7 conv 2->1, its BN
    if name == "gc":
        rd = rounded(c, 1 / 8)  # attention 1x1 conv C->1 (bias); MLP C->rd (bias), LayerNorm, rd->C (bias)
        return (c + 1) + (c * rd + rd) + 2 * rd + (rd * c + c)
    return 2 * c  # ChannelScale: a scale and a shift per channel


def plain_params(block: str) -> int:
    return sum(p.numel() for p in build_model(BACKBONES[block], None).parameters())


# --------------------------------------------------------------------------------------------------
# Equal to timm's own models


@pytest.mark.parametrize("name", TIMM_MODULES)
def test_params_equal_timm_block_args_model(name):
    with torch.device("meta"):
        ours = build_model(BackboneSpec(), SESpec(attention=name))
        theirs = timm.create_model("resnet50", block_args={"attn_layer": name})
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    plain = 25_557_032
    assert count - plain == sum(n * module_params(name, c) for n, c, _ in RESNET50_MAPS)


@pytest.mark.parametrize("name", [TIMM_MODULES[0], *(pytest.param(n, marks=pytest.mark.slow) for n in TIMM_MODULES[1:])])
def test_patched_model_is_numerically_timms(name):
    """resnet50 + <module> at the standard position == timm's resnet50(block_args={'attn_layer': ...}),
    same weights, in eval mode and in train mode (batch statistics, gradients)."""
    torch.manual_seed(0)
    reference = timm.create_model("resnet50", block_args={"attn_layer": name})
    ours = build_model(BackboneSpec(), SESpec(attention=name))
    assert_same_as_timm(ours, reference)


def test_ge_is_timms_where_timm_builds_it_else_refused():
    try:
        reference = timm.create_model("resnet50", block_args={"attn_layer": "ge"})
    except TypeError:  # timm 1.0.31's GatherExcite cannot be built with its defaults
        reference = None
    if reference is None:
        with pytest.raises(SpecError) as e:
            build_model(BackboneSpec(), SESpec(attention="ge"))
        assert e.value.key == "attention" and "cannot build its GatherExcite" in str(e.value)
        assert "\n" not in str(e.value)
    else:
        ours = build_model(BackboneSpec(), SESpec(attention="ge"))
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


def test_timm_modules_start_as_timm_initialises_them():
    """Inserted after the backbone's init, a timm module still gets the ResNet init (kaiming fan_out)
    that timm's own block_args model gives it; here GC's attention conv (fan_out = 1: std sqrt(2))."""
    torch.manual_seed(0)
    model = build_model(BackboneSpec(), SESpec(attention="gc"))
    weights = torch.cat([m.conv_attn.weight.flatten() for m in se_blocks(model).values()])
    assert abs(weights.std().item() / math.sqrt(2.0) - 1) < 0.05


# --------------------------------------------------------------------------------------------------
# Every position and stage, every module


@pytest.mark.parametrize("block,position,stages,name", list(itertools.product(
    BACKBONES, ("standard", "pre", "post", "identity", "3x3"), [(2,), (3, 5), (2, 3, 4, 5)],
    [*TIMM_MODULES, "plugin_modules:ChannelScale"])))
def test_every_module_at_every_position_and_stage(block, position, stages, name):
    model = build_model(BACKBONES[block], SESpec(attention=name, position=position, stages=stages))
    expected = [(n.replace("SE", PREFIX[name], 1), c) for n, c in expected_se_channels(block, position)
                if int(n.split("_")[1]) in stages]
    blocks = se_blocks(model)
    assert [(n, m.attention_channels) for n, m in blocks.items()] == expected
    extra = sum(module_params(name, c) for _, c in expected)
    assert sum(p.numel() for p in model.parameters()) - plain_params(block) == extra
    calls = []
    for n, m in blocks.items():
        m.register_forward_hook(lambda mod, i, o, n=n: calls.append(n))
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    model(x).square().sum().backward()
    assert calls == list(blocks)  # each block runs once, in network order
    for n, m in blocks.items():  # and is on the autograd path
        assert all(p.grad is not None for p in m.parameters()), n


# --------------------------------------------------------------------------------------------------
# Complexity in closed form (resnet50 at 224, standard position, all stages)


def added_macs(spec: SESpec) -> int:
    with torch.device("meta"):
        plain = complexity(build_model(BackboneSpec(), None), 224).macs
        return complexity(build_model(BackboneSpec(), spec), 224).macs - plain


def test_eca_macs():
    # 1-D conv of k taps per channel, global average pooling and the scaling (C*H*W each)
    assert added_macs(SESpec(attention="eca")) == sum(
        n * (eca_kernel(c) * c + 2 * c * h * h) for n, c, h in RESNET50_MAPS)


@pytest.mark.slow
def test_cbam_macs():
    # shared MLP on the avg- and max-pooled vectors (2 x 2 FCs of C*C/16), 7x7 conv on 2 maps, and
    # avg + max pooling + scaling (channel) and mean + max over channels + scaling (spatial): 6*C*H*W
    assert added_macs(SESpec(attention="cbam")) == sum(
        n * (4 * c * (c // 16) + 2 * 49 * h * h + 6 * c * h * h) for n, c, h in RESNET50_MAPS)


@pytest.mark.slow
def test_gc_macs():
    # attention logits (1x1 conv C->1), attention pooling (C*H*W), MLP C->C/8->C, scaling
    assert added_macs(SESpec(attention="gc")) == sum(
        n * (c * h * h + c * h * h + 2 * c * (c // 8) + c * h * h) for n, c, h in RESNET50_MAPS)


def test_plugin_declares_its_macs():
    # ChannelScale declares 2*C*H*W + 7 per call; its forward has no conv or matrix product to count
    assert added_macs(SESpec(attention="plugin_modules:ChannelScale")) == sum(
        n * (2 * c * h * h + 7) for n, c, h in RESNET50_MAPS)


# --------------------------------------------------------------------------------------------------
# The excitation probe


def random_data(n: int = 24, classes: int = 3, size: int = 16) -> InMemoryData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % classes
    return InMemoryData(x, y, x, y, classes, batch_size=8, eval_batch_size=8, mean=[127.0] * 3,
                        std=[64.0] * 3)


def expected_gate(name: str, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's per-channel excitation of input x, [N, C], from its definition."""
    if name == "eca":
        z = x.mean((2, 3))[:, None, :]
        return torch.sigmoid(module.conv(z))[:, 0, :]
    if name == "cbam":  # the channel attention's gate
        ch = module.channel
        mlp = [ch.fc2(ch.act(ch.fc1(p))) for p in (x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True))]
        return torch.sigmoid(mlp[0] + mlp[1]).flatten(1)
    if name == "gc":
        attn = torch.softmax(module.conv_attn(x).flatten(2), dim=-1)  # [N, 1, HW]
        context = (x.flatten(2) * attn).sum(-1)[:, :, None, None]
        return torch.sigmoid(module.mlp_scale(context)).flatten(1)
    return torch.sigmoid(module.scale * x.mean((2, 3), keepdim=True) + module.shift).flatten(1)


@pytest.mark.parametrize("name", [*TIMM_MODULES, "plugin_modules:ChannelScale"])
def test_probe_reads_each_modules_channel_gate(name):
    torch.manual_seed(0)
    bb = BACKBONES["bottleneck"].model_copy(update={"num_classes": 3})
    model = build_model(bb, SESpec(attention=name)).eval()
    data = random_data()
    stats = probe_excitations(model, data, num_classes=3)
    blocks = se_blocks(model)
    assert stats["blocks"].tolist() == list(blocks)
    target = list(blocks)[-1]
    module = blocks[target]
    seen = []
    handle = module.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach()))
    labels = data.val_labels()
    indices = first_per_class(labels, 3, 50)
    with torch.no_grad():
        for x, _ in data.val_batches(indices):
            model(x)
    handle.remove()
    with torch.no_grad():
        gates = torch.cat([expected_gate(name, module, x) for x in seen]).double()
    y = labels[indices]
    expected = torch.stack([gates[y == c].mean(0) for c in range(3)]).float().numpy()
    assert stats[f"{target}.mean"].shape == (3, module.attention_channels)
    np.testing.assert_allclose(stats[f"{target}.mean"], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["plugin_modules:Ungated", "plugin_modules:SpatialOnly"])
def test_probe_leaves_out_modules_without_a_channel_gate(name):
    bb = BACKBONES["bottleneck"].model_copy(update={"num_classes": 3})
    model = build_model(bb, SESpec(attention=name))
    assert len(se_blocks(model)) == sum((2, 1, 1, 2))  # the blocks exist and train...
    stats = probe_excitations(model, random_data(), num_classes=3)
    assert stats["blocks"].tolist() == []  # ...but have no per-channel excitation to show
    assert not any(k.endswith(".mean") for k in stats)


# --------------------------------------------------------------------------------------------------
# Specs and bad input in Python (the file-and-key forms are in test_spec_errors.py)


def test_se_stays_the_default():
    assert SESpec().attention == "se" and SESpec().attention_args == {}
    assert SESpec(attention="se", reduction=16) == SESpec()
    model = build_model(BACKBONES["bottleneck"], SESpec())
    assert all(n.startswith("SE_") for n in se_blocks(model))


@pytest.mark.parametrize("spec,key,needle", [
    (dict(attention="cbam", reduction=8), "reduction", "SE-only"),
    (dict(attention="eca", squeeze="max"), "squeeze", "SE-only"),
    (dict(attention="gc", bias=True), "bias", "SE-only"),
    (dict(attention="sk"), "attention", "unknown attention module"),
    (dict(attention="not a path:x"), "attention", "unknown attention module"),
    (dict(attention_args={"k": 3}), "attention_args", "the paper's SE takes"),
    (dict(attention="timm", attention_args={"k": 3}), "attention_args", "keeps the model's own"),
])
def test_invalid_attention_spec(spec, key, needle):
    with pytest.raises(ValueError) as e:
        SESpec(**spec)
    assert key in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("spec,key,needle", [
    (SESpec(attention="no_such_package.gates:Gate"), "attention", "cannot import 'no_such_package.gates'"),
    (SESpec(attention="plugin_modules:Missing"), "attention", "has no class 'Missing'"),
    (SESpec(attention="plugin_modules:NOT_A_CLASS"), "attention", "has no class 'NOT_A_CLASS'"),
    (SESpec(attention="plugin_modules:NeedsWidth"), "attention", "required keyword-only argument: 'width'"),
    (SESpec(attention="plugin_modules:NeedsWidth", attention_args={"depth": 1}), "attention_args",
     "unexpected keyword argument 'depth'"),
    (SESpec(attention="cbam", attention_args={"rd_ratio": "x"}), "attention_args", "cbam(32, rd_ratio='x')"),
    (SESpec(attention="plugin_modules:Halves"), "attention", "Halves_2_1: forward maps (1, 32, 64, 64) to (1, 16, 64, 64)"),
    (SESpec(attention="timm"), "attention", "no attention module of its own"),
])
def test_bad_attention_is_one_line_naming_the_key(spec, key, needle):
    with pytest.raises(SpecError) as e:
        check_fits(BACKBONES["bottleneck"], spec)
    assert e.value.key == key and needle in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_a_plugin_that_cannot_run_on_meta_is_counted_on_the_cpu(tmp_path):
    from ablations.cli_train import complexity_rows

    path = tmp_path / "host.yaml"
    path.write_text("settings:\n  - {label: plain, se: false}\n"
                    "  - {label: host, attention: 'plugin_modules:HostScaled', stages: [5]}\n")
    with pytest.raises(RuntimeError, match="meta"), torch.device("meta"):  # why the CPU fallback exists
        build_model(BackboneSpec(), SESpec(attention="plugin_modules:HostScaled"))(torch.zeros(1, 3, 64, 64))
    rows = {r["setting"]: r for r in complexity_rows(str(path), "paper", [])}
    assert rows["host"]["params"] - rows["plain"]["params"] == 3  # one scalar per stage-5 block
    assert rows["host"]["macs"] == rows["plain"]["macs"]  # an elementwise product: nothing counted
    check_fits(BackboneSpec(), SESpec(attention="plugin_modules:HostScaled"))  # the meta pass lets it be


def test_shape_check_names_the_block():
    model = build_model(BACKBONES["bottleneck"], SESpec(attention="plugin_modules:Halves", stages=[4]))
    with pytest.raises(SpecError) as e:
        complexity(model, 16)
    assert str(e.value).startswith("attention: Halves_4_1: forward maps")


# --------------------------------------------------------------------------------------------------
# Existing configs and studies keep loading; sweeps carry their own published numbers


def test_config_written_before_the_attention_keys_loads_as_se(tmp_path):
    cfg = run_config(load_profile("quick"), load_sweep("ratio").settings[3], 0, "ratio")
    old = cfg.model_dump(mode="json")
    for section, key in (("se", "attention"), ("se", "attention_args"), ("backbone", "width")):
        old[section].pop(key)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    loaded = load_run_config(path)
    assert loaded == cfg and loaded.se == SESpec(reduction=16)


def test_studies_stored_before_the_new_keys_train_the_same():
    """A study's stored sweep and profile (from before `attention`, `published`, `width`, `families`)
    compare equal to today's; a profile's `families` section matters only to rows of those families."""
    quick = load_profile("quick")
    profile = quick.model_dump(mode="json", exclude={"path"})
    old_profile = {k: v for k, v in profile.items() if k != "families"}
    old_profile["backbone"] = {k: v for k, v in profile["backbone"].items() if k != "width"}
    for name in ("ratio", "stages"):
        sweep = load_sweep(name).model_dump(mode="json", exclude={"path"})
        old = {**sweep, "settings": [
            {"label": s["label"], "backbone": s["backbone"],
             "se": None if s["se"] is None else {k: v for k, v in s["se"].items()
                                                 if k not in ("attention", "attention_args")}}
            for s in sweep["settings"]]}
        assert _what_trains(old, old_profile) == _what_trains(sweep, profile), name
        wider = {**profile, "families": {"efficientnet": {"width": 0.9}}}
        assert _what_trains(sweep, wider) == _what_trains(sweep, profile)
    families = load_sweep("families").model_dump(mode="json", exclude={"path"})
    wider = {**profile, "families": {**profile["families"], "efficientnet": {"width": 0.9}}}
    assert _what_trains(families, wider) != _what_trains(families, profile)
    unpublished = {**families, "settings": [{**s, "published": None} for s in families["settings"]]}
    assert _what_trains(unpublished, profile) == _what_trains(families, profile)  # prose, not training


def test_table_shows_each_rows_own_published_numbers_and_source_note():
    sweep = load_sweep("attention")
    table = build_table(pd.DataFrame(columns=list(load.COLUMNS)), sweep, "quick")
    rows = table.rows.set_index("setting")
    by_label = {s.label: s.published for s in sweep.settings}
    assert rows.loc["ECA", "paper_top1"] == by_label["ECA"].top1_err == 22.52
    assert rows.loc["ECA", "paper_params_m"] == 24.37
    assert rows.loc["SE", "paper_top1"] == 22.28 and math.isnan(rows.loc["GC", "paper_top1"])
    assert "each row's source in the sweep file" in render(table, "md")
