"""The plateau rule against torch's ReduceLROnPlateau, and the LRs it implies.

torch's scheduler is the reference: fed the same validation losses, it must reduce the LR after exactly
the epochs `schedule.plateau` reports as cuts; its (max_cuts + 1)-th reduction is where training stops.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ablations.schedule import Plateau, lr_at, lr_cuts, plateau, plateau_state
from ablations.schema import TrainSpec


def torch_reductions(losses: list[float], patience: int, threshold: float) -> list[int]:
    """1-based epochs after which torch's ReduceLROnPlateau lowered the LR (factor 0.5: no eps floor
    within a few dozen reductions)."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=patience,
                                                       threshold=threshold)
    out = []
    for epoch, loss in enumerate(losses, start=1):
        before = opt.param_groups[0]["lr"]
        sched.step(loss)
        if opt.param_groups[0]["lr"] < before:
            out.append(epoch)
    return out


def expected(losses: list[float], patience: int, threshold: float, max_cuts: int) -> Plateau:
    reductions = torch_reductions(losses, patience, threshold)
    stop = reductions[max_cuts] if len(reductions) > max_cuts else None
    return Plateau(tuple(reductions[:max_cuts]), stop)


def test_cuts_and_stop_on_a_hand_made_history():
    # improves 1..3, flat 4..6 (3 bad > patience 2: cut after 6), improves 7, flat 8..10 (cut after 10),
    # flat 11..13 (the plateau after the 2nd and last cut: stop after 13)
    losses = [3.0, 2.0, 1.0, 1.0, 1.1, 1.0, 0.5, 0.5, 0.6, 0.5, 0.5, 0.5, 0.5, 0.1]
    got = plateau(losses, patience=2, threshold=1e-4, max_cuts=2)
    assert got == Plateau((6, 10), 13)
    assert got == expected(losses, 2, 1e-4, 2)
    assert plateau(losses, patience=2, threshold=1e-4, max_cuts=0) == Plateau((), 6)  # early stopping
    assert plateau(losses[:9], patience=2, threshold=1e-4, max_cuts=3) == Plateau((6,), None)


def test_relative_threshold_and_nan_count_as_no_improvement():
    # 0.99995 is 5e-5 below 1.0: an improvement at threshold 0 and 1e-5, not at 1e-4 (torch: rel)
    losses = [1.0, 0.99995, 0.99990, math.nan, 0.9999]
    for threshold in (0.0, 1e-5, 1e-4, 1e-3):
        assert plateau(losses, 1, threshold, 5) == expected(losses, 1, threshold, 5), threshold


@settings(max_examples=300, deadline=None)
@given(levels=st.lists(st.integers(0, 6), min_size=0, max_size=60),
       patience=st.integers(1, 5), threshold=st.sampled_from([0.0, 1e-4, 0.05, 0.3]),
       max_cuts=st.integers(0, 4))
def test_matches_torch_reduce_lr_on_plateau(levels, patience, threshold, max_cuts):
    losses = [1.0 + 0.25 * v for v in levels]  # few distinct values: ties and plateaus are common
    got = plateau(losses, patience, threshold, max_cuts)
    assert got == expected(losses, patience, threshold, max_cuts)
    assert len(got.cuts) <= max_cuts
    assert got.stop is None or got.stop > (got.cuts[-1] if got.cuts else 0)


def test_plateau_lr_levels_and_warmup():
    spec = TrainSpec(lr=0.1, schedule="plateau", step_gamma=0.1, warmup_epochs=1)
    assert lr_at(0, spec, 10) == pytest.approx(0.01) and lr_at(9, spec, 10) == pytest.approx(0.1)
    assert lr_at(25, spec, 10) == pytest.approx(0.1)
    assert lr_at(25, spec, 10, cuts=2) == pytest.approx(1e-3)
    assert lr_at(4, spec, 10, cuts=1) == pytest.approx(0.01 * 5 / 10)  # warmup ramps to the cut level


def test_lr_cuts_per_schedule():
    losses = [3.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0]
    plateau_spec = TrainSpec(schedule="plateau", patience=1, max_cuts=3)
    assert plateau_state(plateau_spec, losses) == Plateau((4, 7), None)  # 2 bad epochs > patience 1
    assert lr_cuts(plateau_spec, losses) == [4]  # a cut after the last epoch trained never applied
    assert lr_cuts(plateau_spec, [*losses, 0.5]) == [4, 7]
    assert lr_cuts(TrainSpec(schedule="step", step_every=3), losses) == [3, 6]
    assert lr_cuts(TrainSpec(schedule="step", step_every=3), losses[:6]) == [3]
    assert lr_cuts(TrainSpec(schedule="cosine"), losses) == []
    assert plateau_state(TrainSpec(schedule="cosine"), [1.0] * 50) == Plateau()  # never stops early
