"""SE modules and patching: every position x stage subset x squeeze x gate x block type."""

from __future__ import annotations

import itertools

import pytest
import torch
from pydantic import ValidationError
from timm.models.resnet import BasicBlock, Bottleneck

from ablations.complexity import complexity
from ablations.errors import SpecError
from ablations.patch import build_model, se_blocks
from ablations.schema import BackboneSpec, SESpec
from ablations.se import SEModule

torch.set_num_threads(1)

# Small ResNets of both block types: widths c per stage, 2 blocks in stages 2 and 5, 1 elsewhere.
LAYERS = (2, 1, 1, 2)
CHANNELS = (8, 16, 32, 64)
STEM = 64  # timm's stem width for the default stem
BACKBONES = {
    "bottleneck": BackboneSpec(arch="resnet50", layers=LAYERS, channels=CHANNELS, num_classes=5, small_stem=True),
    "basic": BackboneSpec(arch="resnet18", layers=LAYERS, channels=CHANNELS, num_classes=5, small_stem=True),
}
STAGE_SUBSETS = [(2,), (3,), (4,), (5,), (2, 4), (2, 3, 4, 5)]
POSITIONS = ("standard", "pre", "post", "identity", "3x3")


def expected_se_channels(block: str, position: str) -> list[tuple[str, int]]:
    """(name, C) of every SE block for a full patch, computed from the spec (not the model)."""
    expansion = 4 if block == "bottleneck" else 1
    out, prev = [], STEM
    for stage, (n, c) in enumerate(zip(LAYERS, CHANNELS), start=2):
        for j in range(1, n + 1):
            block_in = prev if j == 1 else c * expansion
            channels = {"standard": c * expansion, "post": c * expansion, "identity": c * expansion,
                        "pre": block_in, "3x3": c}[position]
            out.append((f"SE_{stage}_{j}", channels))
        prev = c * expansion
    return out


def plain_params(block: str) -> int:
    return sum(p.numel() for p in build_model(BACKBONES[block], None).parameters())


@pytest.mark.parametrize("block,position,stages",
                         list(itertools.product(BACKBONES, POSITIONS, STAGE_SUBSETS)))
def test_positions_stages_blocks(block, position, stages):
    r = 4
    model = build_model(BACKBONES[block], SESpec(reduction=r, position=position, stages=stages))
    expected = [(n, c) for n, c in expected_se_channels(block, position) if int(n.split("_")[1]) in stages]
    blocks = se_blocks(model)
    assert [(n, m.channels) for n, m in blocks.items()] == expected
    # the paper's count: (2/r) * sum of C^2 over SE blocks, weights only
    extra = sum(2 * c * (c // r) for _, c in expected)
    assert sum(p.numel() for p in model.parameters()) - plain_params(block) == extra
    calls = []
    for m in blocks.values():
        m.register_forward_hook(lambda mod, i, o: calls.append(mod.name))
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 5)
    assert calls == list(blocks)  # every SE block runs once, in network order
    y.square().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for m in blocks.values():  # and is on the autograd path
        assert m.fc1.weight.grad is not None and m.fc2.weight.grad is not None


@pytest.mark.parametrize("squeeze,gate,position",
                         list(itertools.product(("avg", "max", "none"), ("sigmoid", "tanh", "relu"), POSITIONS)))
def test_squeeze_gate_everywhere(squeeze, gate, position):
    model = build_model(BACKBONES["bottleneck"], SESpec(reduction=8, squeeze=squeeze, gate=gate, position=position))
    seen = {}
    hooks = [m.gate.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o))
             for n, m in se_blocks(model).items()]
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    for h in hooks:
        h.remove()
    assert len(seen) == sum(LAYERS)
    low, high = {"sigmoid": (0, 1), "tanh": (-1, 1), "relu": (0, float("inf"))}[gate]
    for s in seen.values():
        assert low <= s.min().item() and s.max().item() <= high
        assert (s.shape[-2:] != (1, 1)) == (squeeze == "none")  # NoSqueeze gates every position


def test_se_module_definitions():
    se = SEModule(64, reduction=16, squeeze="max", gate="sigmoid")
    assert se.fc1.out_channels == 4 and se.fc1.bias is None  # exactly C/r, no rounding to 8, no bias
    x = torch.randn(3, 64, 5, 7)
    z = x.amax((2, 3), keepdim=True)  # true global max, not timm's 0.5 avg + 0.5 max
    expected = x * torch.sigmoid(se.fc2(torch.relu(se.fc1(z))))
    torch.testing.assert_close(se(x), expected)
    assert SEModule(6, reduction=4).fc1.out_channels == 1  # floor(C/r), at least 1
    assert SEModule(64, reduction=64).fc1.out_channels == 1


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_avg_squeeze_is_global_average_pooling_with_the_same_gradients(memory_format):
    """The fast squeeze (a sum divided on the pooled vector) vs the definition, through 1x1 convs."""
    torch.manual_seed(0)
    se = SEModule(32, reduction=4, bias=True)
    x = torch.randn(3, 32, 5, 7).to(memory_format=memory_format).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    out = se(x)
    ref = xr * torch.sigmoid(se.fc2(torch.relu(se.fc1(xr.mean((2, 3), keepdim=True)))))
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), [x, *se.parameters()])
    grads_ref = torch.autograd.grad(ref.square().sum(), [xr, *se.parameters()])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_nosqueeze_same_params_spatial_gate_more_macs():
    bb = BACKBONES["bottleneck"]
    se, ns = build_model(bb, SESpec()), build_model(bb, SESpec(squeeze="none", reduction=16))
    assert sum(p.numel() for p in se.parameters()) == sum(p.numel() for p in ns.parameters())
    gate_out = []
    block = se_blocks(ns)["SE_2_1"]
    block.gate.register_forward_hook(lambda m, i, o: gate_out.append(o))
    ns(torch.randn(1, 3, 16, 16))
    assert gate_out[0].shape == (1, block.channels, 16, 16)  # stage 2 keeps the 16x16 input
    assert complexity(ns, 16).macs > complexity(se, 16).macs


def test_se_names_resnet50():
    model = build_model(BackboneSpec(), SESpec())
    names = list(se_blocks(model))
    assert len(names) == 16 and names[0] == "SE_2_1" and names[-1] == "SE_5_3"
    assert {"SE_2_3", "SE_3_4", "SE_4_6", "SE_5_1", "SE_5_2", "SE_5_3"} <= set(names)


def test_stride_in_1x1_and_small_stem():
    model = build_model(BackboneSpec(stride_in_1x1=True, small_stem=True), None)
    down = model.layer2[0]
    assert down.conv1.stride == (2, 2) and down.conv2.stride == (1, 1)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert isinstance(model.layer1[0], Bottleneck)
    assert isinstance(build_model(BackboneSpec(arch="resnet34"), None).layer1[0], BasicBlock)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet101", "resnet152", "resnext50_32x4d",
                                  "wide_resnet50_2"])
def test_timm_family_patches(arch):
    with torch.device("meta"):  # shapes and names only: no memory, no init time
        model = build_model(BackboneSpec(arch=arch), SESpec(position="3x3"))
    n_blocks = sum(len(getattr(model, f"layer{i}")) for i in range(1, 5))
    assert len(se_blocks(model)) == n_blocks


def test_scripts_and_trains_like_timm():
    model = build_model(BACKBONES["bottleneck"], SESpec(position="pre", squeeze="max", gate="tanh"))
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("spec,key", [
    (dict(reduction=0), "reduction"),
    (dict(squeeze="median"), "squeeze"),
    (dict(gate="softmax"), "gate"),
    (dict(position="inside"), "position"),
    (dict(stages=[1]), "stages"),
])
def test_invalid_se_spec(spec, key):
    with pytest.raises(ValidationError) as e:
        SESpec(**spec)
    assert [err["loc"][0] for err in e.value.errors()] == [key]


def test_reduction_larger_than_channels():
    with pytest.raises(SpecError) as e:
        build_model(BACKBONES["bottleneck"], SESpec(reduction=1000))
    assert e.value.key == "reduction" and "C=" in str(e.value)


def test_unknown_or_non_resnet_backbone():
    for arch in ("resnet51", "vit_tiny_patch16_224", "seresnet50"):
        with pytest.raises(SpecError) as e:
            build_model(BackboneSpec(arch=arch), None)
        assert e.value.key == "backbone.arch"


@pytest.mark.parametrize("block", list(BACKBONES))
@pytest.mark.parametrize("squeeze,gate", [("avg", "sigmoid"), ("max", "tanh"), ("none", "relu")])
def test_fused_standard_se_matches_reference(block, squeeze, gate):
    """The fast path (scaling + residual add fused, F.linear FCs) vs timm's own forward with block.se."""
    spec = SESpec(reduction=4, squeeze=squeeze, gate=gate, bias=True)
    torch.manual_seed(0)
    ref = build_model(BACKBONES[block], spec, fused=False)
    fast = build_model(BACKBONES[block], spec, fused=True)
    fast.load_state_dict(ref.state_dict())
    # float64: the two forwards sum in other orders, which float32 shows as ~1e-5 relative noise
    ref, fast = ref.double(), fast.double()
    assert type(fast.layer1[0]).__name__.startswith("Fused") and not type(ref.layer1[0]).__name__.startswith("Fused")
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    # training mode: outputs, input gradients and every parameter gradient agree
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_f = ref(xr), fast(xf)
    torch.testing.assert_close(out_f, out_r)
    out_r.square().sum().backward()
    out_f.square().sum().backward()
    torch.testing.assert_close(xf.grad, xr.grad)
    for (name, pr), pf in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, msg=name)
    # inference: the in-place path
    ref.eval(), fast.eval()
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), ref(x))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x))


def test_fused_model_scripts():
    model = build_model(BACKBONES["bottleneck"], SESpec()).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))


@pytest.mark.slow
def test_fused_block_compiles_and_trains():
    """torch.compile (inductor on CPU) of a fused SE block: same outputs as eager, a training step.

    One block, not the whole network, keeps the compile time of this test in seconds.
    """
    torch.manual_seed(0)
    block = build_model(BACKBONES["bottleneck"], SESpec(reduction=4, squeeze="max")).layer2[0]
    assert type(block).__name__ == "FusedSEBottleneck"
    compiled = torch.compile(block)
    x = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-4)
    before = block.se.fc1.weight.detach().clone()
    compiled(x).square().mean().backward()
    torch.optim.SGD(block.parameters(), lr=0.1).step()
    assert not torch.equal(before, block.se.fc1.weight)


def test_se_init_matches_timms_seresnet50():
    """A freshly built standard SE ResNet-50 is initialised like timm's `seresnet50`, SE layers
    included (kaiming normal, fan_out): same per-layer weight spread, block by block."""
    import timm

    torch.manual_seed(0)
    ours = build_model(BackboneSpec(arch="resnet50"), SESpec(reduction=16, bias=True))
    theirs = timm.create_model("seresnet50", pretrained=False)
    ours_se = [m for m in ours.modules() if isinstance(m, SEModule)]
    theirs_se = [m for n, m in theirs.named_modules() if n.endswith(".se")]
    assert len(ours_se) == len(theirs_se) == 16
    for a, b in zip(ours_se, theirs_se):
        for fc in ("fc1", "fc2"):
            wa, wb = getattr(a, fc).weight, getattr(b, fc).weight
            assert wa.shape == wb.shape
            expected = (2.0 / (wa.shape[0] * wa.shape[2] * wa.shape[3])) ** 0.5  # kaiming, fan_out
            for w in (wa, wb):
                assert abs(w.std().item() / expected - 1) < 0.1, (a.name, fc, w.std().item(), expected)
                assert abs(w.mean().item()) < 0.1 * expected
            ba, bb = getattr(a, fc).bias, getattr(b, fc).bias  # PyTorch's default in both
            bound = 1 / wa.shape[1] ** 0.5
            assert ba.abs().max() <= bound and bb.abs().max() <= bound
    # The paper's bias-free FCs get the same weight init, and the gates start spread around 0.5
    plain = build_model(BackboneSpec(arch="resnet50"), SESpec())
    fc1 = se_blocks(plain)["SE_2_1"].fc1.weight
    assert abs(fc1.std().item() / (2.0 / 16) ** 0.5 - 1) < 0.1


def test_relu_gate_starts_at_a_fraction_of_timms_scale():
    """Only the unbounded ReLU gate's fc2 starts smaller; fc1, and the bounded gates, keep timm's init."""
    from ablations.se import RELU_GATE_INIT_SCALE

    modules = {}
    for gate in ("sigmoid", "tanh", "relu"):
        torch.manual_seed(0)
        modules[gate] = SEModule(256, reduction=16, gate=gate)
    sig, tanh, relu = modules["sigmoid"], modules["tanh"], modules["relu"]
    assert 0 < RELU_GATE_INIT_SCALE < 1
    torch.testing.assert_close(relu.fc1.weight, sig.fc1.weight)
    torch.testing.assert_close(tanh.fc2.weight, sig.fc2.weight)
    torch.testing.assert_close(relu.fc2.weight, sig.fc2.weight * RELU_GATE_INIT_SCALE)
    # On unit-variance 2x2 maps a ReLU gate at timm's scale already amplifies some channels (gain > 1,
    # which no sigmoid gate can); at the init it gets, no gain reaches 1
    x = torch.randn(64, 256, 2, 2)
    at_timm_scale = SEModule(256, reduction=16, gate="relu")
    with torch.no_grad():
        at_timm_scale.fc2.weight.copy_(sig.fc2.weight)
    assert relu.excite(x).max() < 1.0 < at_timm_scale.excite(x).max()
