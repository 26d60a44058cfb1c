"""Complexity in the paper's convention, and equivalence with timm's own SE-ResNet-50."""

from __future__ import annotations

import pytest
import timm
import torch

from ablations.cli_train import complexity_rows
from ablations.complexity import complexity
from ablations.patch import build_model
from ablations.schema import BackboneSpec, SESpec
from ablations.se import SEModule

torch.set_num_threads(1)


@pytest.mark.slow
def test_paper_tables_match_published():
    """Every published params/GFLOPs of Tables 10, 13, 15, 16 at the paper's precision.

    Table 10's r=4, r=8 and r=32 rows print 0.1 M more than the weights there are (exact counts
    35.617, 30.587, 26.815 M vs 35.7, 30.7, 26.9): at the paper's precision (0.1 M) we land one
    digit below, i.e. within the 0.1 M the acceptance allows.
    """
    checked = 0
    for sweep in ("ratio", "stages", "se3x3", "nosqueeze"):
        for row in complexity_rows(sweep, "paper", []):
            if row["paper_params_m"] is not None:
                assert abs(row["params_m"] - row["paper_params_m"]) <= 0.1 + 1e-9, (sweep, row)
                checked += 1
            if row["paper_gflops"] is not None:
                assert abs(row["gflops"] - row["paper_gflops"]) <= 0.01 + 1e-9, (sweep, row)
                checked += 1
    assert checked == 6 + 10 + 4 + 6


def test_exact_counts_resnet50():
    rows = {r["setting"]: r for r in complexity_rows("nosqueeze", "paper", [])}
    assert rows["ResNet-50"]["params"] == 25_557_032
    # SE at r=16 on ResNet-50: (2/16) * sum N_s C_s^2 = 2,514,944 weights
    assert rows["SE"]["params"] - rows["ResNet-50"]["params"] == 2_514_944
    assert rows["NoSqueeze"]["params"] == rows["SE"]["params"]
    # timm's default resnet50 (stride in the 3x3) is 4.09 GMACs; the original (stride in 1x1) 3.86
    with torch.device("meta"):
        timm_default = complexity(build_model(BackboneSpec(), None), 224)
    assert round(timm_default.gflops, 2) == 4.09
    assert round(rows["ResNet-50"]["macs"] / 1e9, 2) == 3.86


def test_se_pooling_and_scaling_are_counted():
    with torch.device("meta"):
        plain = complexity(build_model(BackboneSpec(), None), 224)
        se = complexity(build_model(BackboneSpec(), SESpec()), 224)
    fc = 2_514_944  # one MAC per FC weight at 1x1
    # pooling + scaling: 2 * sum over blocks of C*H*W
    maps = [(3, 256, 56), (4, 512, 28), (6, 1024, 14), (3, 2048, 7)]
    pool_scale = 2 * sum(n * c * s * s for n, c, s in maps)
    assert se.macs - plain.macs == fc + pool_scale


def test_patched_standard_se_equals_timm_seresnet50():
    """Standard SE with bias at r=16 in timm resnet50 == timm seresnet50 with the same weights."""
    torch.manual_seed(0)
    reference = timm.create_model("seresnet50", pretrained=False).eval()
    ours = build_model(BackboneSpec(), SESpec(reduction=16, bias=True)).eval()
    ref_state = reference.state_dict()
    # Same module tree: layerX.Y.se.fc1/fc2 in both; map key by key to prove it.
    mapped = {k: ref_state[k] for k in ours.state_dict()}
    assert set(mapped) == set(ref_state)
    ours.load_state_dict(mapped, strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (ours(x) - reference(x)).abs().max().item()
    assert diff <= 1e-5
    assert all(isinstance(m, SEModule) for n, m in ours.named_modules() if n.endswith(".se"))
