"""Statistics against values computed independently: closed forms by hand, or scipy/statsmodels called
here directly on the same hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower

from analysis import stats

# Student t quantile for df=2 in closed form: F(t) = 1/2 + t / (2 sqrt(2 + t^2)) = 0.975
# => t^2 = 0.95^2 * 2 / (1 - 0.95^2) = 18.512820..., t = 4.302653
T_975_DF2 = math.sqrt(0.95**2 * 2 / (1 - 0.95**2))
NAN = math.nan


def by_seed(values, seeds=None) -> pd.Series:
    return pd.Series(values, index=range(len(values)) if seeds is None else seeds, dtype=float)


def test_ci_of_three_values_uses_the_t_quantile_with_two_degrees_of_freedom():
    """The 95% CI of n = 3 is mean +- t(0.975, df=2) * sd / sqrt(3), the quantile in closed form above."""
    s = stats.summarize([0.0, 1.0, 2.0])  # mean 1, sd 1
    assert T_975_DF2 == pytest.approx(4.302653, abs=1e-6)
    assert s.ci_high - s.mean == pytest.approx(T_975_DF2 / math.sqrt(3), abs=1e-9)
    assert s.mean - s.ci_low == pytest.approx(T_975_DF2 / math.sqrt(3), abs=1e-9)


def test_summary_by_hand():
    # x = 22.1, 22.3, 22.8: mean 67.2/3 = 22.4; squared deviations .09 + .01 + .16 = .26; var .26/2 = .13
    s = stats.summarize([22.1, 22.3, 22.8])
    assert s.n == 3
    assert s.mean == pytest.approx(22.4, abs=1e-12)
    assert s.std == pytest.approx(math.sqrt(0.13), abs=1e-12)
    half = T_975_DF2 * math.sqrt(0.13) / math.sqrt(3)  # = 0.895669
    assert half == pytest.approx(0.895669, abs=1e-6)
    assert (s.ci_low, s.ci_high) == pytest.approx((22.4 - half, 22.4 + half), abs=1e-9)


def test_summary_degenerate_cases_are_nan_not_zero():
    one = stats.summarize([3.0])
    assert (one.n, one.mean) == (1, 3.0)
    assert math.isnan(one.std) and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    assert stats.summarize([]).n == 0 and math.isnan(stats.summarize([]).mean)
    assert stats.summarize([1.0, float("nan"), 3.0]).n == 2  # NaN metrics are absent values


# --------------------------------------------------------------------------------------------------
# One row against the reference

ROW = [2.0, 3.1, 4.0]
REF = [1.0, 2.0, 2.5]  # differences 1.0, 1.1, 1.5: mean 1.2, sd sqrt(0.07)


def test_paired_by_hand_and_against_scipy():
    c = stats.compare(by_seed(ROW), by_seed(REF), paired=True)
    d = np.subtract(ROW, REF)
    assert (c.paired, c.n, c.n_ref) == (True, 3, 3)
    assert c.delta == pytest.approx(1.2, abs=1e-12)
    sd = math.sqrt(((1.0 - 1.2) ** 2 + (1.1 - 1.2) ** 2 + (1.5 - 1.2) ** 2) / 2)  # = sqrt(0.07)
    half = T_975_DF2 * sd / math.sqrt(3)  # df = 2 pairs - ... = n - 1 = 2
    assert (c.ci_low, c.ci_high) == pytest.approx((1.2 - half, 1.2 + half), abs=1e-9)
    ref = sps.ttest_rel(ROW, REF)
    assert c.p == pytest.approx(ref.pvalue, rel=1e-12)
    # the same p from the one-sample t-test on the differences: t = mean / (sd / sqrt(n)), df 2
    assert c.p == pytest.approx(2 * sps.t.sf(1.2 / (sd / math.sqrt(3)), 2), rel=1e-9)
    effect = TTestPower().solve_power(nobs=3, alpha=0.05, power=0.8, alternative="two-sided")
    assert c.mde == pytest.approx(effect * float(np.std(d, ddof=1)), rel=1e-9)


def test_unpaired_welch_against_scipy_and_statsmodels():
    c = stats.compare(by_seed(ROW), by_seed(REF), paired=False)
    welch = sps.ttest_ind(ROW, REF, equal_var=False)
    ci = welch.confidence_interval(0.95)
    assert (c.paired, c.n, c.n_ref) == (False, 3, 3)
    assert c.delta == pytest.approx(np.mean(ROW) - np.mean(REF))
    assert (c.ci_low, c.ci_high, c.p) == pytest.approx((ci.low, ci.high, welch.pvalue), rel=1e-12)
    pooled = math.sqrt((np.var(ROW, ddof=1) * 2 + np.var(REF, ddof=1) * 2) / 4)
    effect = TTestIndPower().solve_power(nobs1=3, ratio=1.0, alpha=0.05, power=0.8, alternative="two-sided")
    assert c.mde == pytest.approx(effect * pooled, rel=1e-9)


def test_paired_is_the_stronger_test_when_seeds_correlate():
    # Large seed-to-seed swings shared by both settings: Welch drowns in them, the paired test does not.
    ref = [20.0, 25.0, 30.0, 22.0]
    row = [r + 0.5 + e for r, e in zip(ref, (0.05, -0.05, 0.1, -0.1))]
    paired = stats.compare(by_seed(row), by_seed(ref), paired=True)
    welch = stats.compare(by_seed(row), by_seed(ref), paired=False)
    assert paired.delta == pytest.approx(welch.delta)
    assert paired.p < 0.01 < 0.5 < welch.p
    assert paired.mde < 0.5 < welch.mde


def test_pairs_are_matched_by_seed_not_position():
    row = by_seed([4.0, 2.0, 3.1], seeds=[2, 0, 1])
    c = stats.compare(row, by_seed(REF), paired=True)
    assert c.delta == pytest.approx(np.mean([2.0 - 1.0, 3.1 - 2.0, 4.0 - 2.5]))
    assert c.p == pytest.approx(sps.ttest_rel([2.0, 3.1, 4.0], REF).pvalue)


def test_nan_values_are_dropped_and_paired_drops_the_pair():
    row = by_seed([2.0, NAN, 3.1, 4.0, 5.0])
    ref = by_seed([1.0, 7.0, 2.0, NAN, 3.2])
    paired = stats.compare(row, ref, paired=True)  # pairs: seeds 0, 2, 4
    assert (paired.n, paired.n_ref) == (3, 3)
    assert paired.delta == pytest.approx(np.mean([1.0, 1.1, 1.8]))
    assert paired.p == pytest.approx(sps.ttest_rel([2.0, 3.1, 5.0], [1.0, 2.0, 3.2]).pvalue)
    welch = stats.compare(row, ref, paired=False)  # each side keeps its own four runs
    assert (welch.n, welch.n_ref) == (4, 4)
    assert welch.p == pytest.approx(sps.ttest_ind([2.0, 3.1, 4.0, 5.0], [1.0, 7.0, 2.0, 3.2],
                                                  equal_var=False).pvalue)
    # A seed only the reference has does not count as a pair (seed 3 here).
    assert stats.compare(by_seed([1.0, 2.0, 3.0]), by_seed([1.5, 2.0, 2.0, 9.0]), paired=True).n == 3


@pytest.mark.parametrize("paired", [True, False])
def test_no_runs_is_all_nan(paired):
    for row, ref in ((by_seed([]), by_seed(REF)), (by_seed([NAN, NAN]), by_seed(REF)),
                     (by_seed(ROW), by_seed([NAN, NAN, NAN]))):
        c = stats.compare(row, ref, paired=paired)
        assert min(c.n, c.n_ref) == 0 and not c.enough_seeds
        assert all(math.isnan(v) for v in (c.delta, c.ci_low, c.ci_high, c.p, c.mde))
        assert stats.verdict(c, NAN) == stats.TOO_FEW_SEEDS


@pytest.mark.parametrize("paired", [True, False])
def test_one_seed_gives_delta_only(paired):
    c = stats.compare(by_seed([3.0]), by_seed([2.5]), paired=paired)
    assert c.n == 1 and c.delta == pytest.approx(0.5)
    assert all(math.isnan(v) for v in (c.ci_low, c.ci_high, c.p, c.mde))
    assert stats.verdict(c, stats.holm([c.p])[0]) == stats.TOO_FEW_SEEDS
    # Unpaired: one run on either side is too few, however many the other has.
    lone = stats.compare(by_seed([3.0]), by_seed(REF), paired=False)
    assert lone.delta == pytest.approx(3.0 - np.mean(REF)) and math.isnan(lone.p) and not lone.enough_seeds


def test_two_seeds_use_one_degree_of_freedom():
    row, ref = [2.0, 3.5], [1.0, 2.0]  # differences 1.0, 1.5
    c = stats.compare(by_seed(row), by_seed(ref), paired=True)
    t = sps.ttest_rel(row, ref)
    ci = t.confidence_interval(0.95)
    assert t.df == 1
    assert (c.delta, c.ci_low, c.ci_high, c.p) == pytest.approx((1.25, ci.low, ci.high, t.pvalue), rel=1e-12)
    # By hand: sd of (1.0, 1.5) = sqrt(0.125); t_{0.975,1} = tan(0.475 pi) = 12.7062
    half = math.tan(0.475 * math.pi) * math.sqrt(0.125) / math.sqrt(2)
    assert (c.ci_low, c.ci_high) == pytest.approx((1.25 - half, 1.25 + half), abs=1e-9)
    effect = TTestPower().solve_power(nobs=2, alpha=0.05, power=0.8, alternative="two-sided")
    assert c.mde == pytest.approx(effect * math.sqrt(0.125), rel=1e-9)
    assert c.enough_seeds


@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")  # scipy's, on the reference calls
def test_zero_spread_is_no_evidence_not_certainty():
    # Every seed differs by exactly 1: scipy answers t = inf, p = 0 and a zero-width CI.
    row, ref = [3.0, 4.0, 5.0], [2.0, 3.0, 4.0]
    assert sps.ttest_rel(row, ref).pvalue == 0.0
    c = stats.compare(by_seed(row), by_seed(ref), paired=True)
    assert c.delta == pytest.approx(1.0) and c.enough_seeds
    assert all(math.isnan(v) for v in (c.ci_low, c.ci_high, c.p, c.mde))
    assert stats.verdict(c, stats.holm([c.p])[0]) == stats.NO_DIFFERENCE
    # 360 validation images, 5 vs 3 wrong on seed 0 and 7 vs 5 on seed 1: the same two images each
    # time, but the errors in % differ from each other by float rounding only. Still no spread.
    row, ref = [5 / 360 * 100, 7 / 360 * 100], [3 / 360 * 100, 5 / 360 * 100]
    assert np.ptp(np.subtract(row, ref)) > 0  # the rounding is really there
    with pytest.warns(RuntimeWarning):  # and scipy would call it significant
        assert sps.ttest_rel(row, ref).pvalue < 1e-6
    near = stats.compare(by_seed(row), by_seed(ref), paired=True)
    assert math.isnan(near.p) and near.delta == pytest.approx(200 / 360)
    # Welch: both sides constant is no spread; one side constant is an ordinary test.
    flat = stats.compare(by_seed([3.0, 3.0, 3.0]), by_seed([2.0, 2.0, 2.0]), paired=False)
    assert flat.delta == pytest.approx(1.0) and math.isnan(flat.p) and math.isnan(flat.mde)
    half = stats.compare(by_seed([3.0, 3.0, 3.0]), by_seed(REF), paired=False)
    assert half.p == pytest.approx(sps.ttest_ind([3.0] * 3, REF, equal_var=False).pvalue)


# --------------------------------------------------------------------------------------------------
# Holm and verdicts


def test_holm_textbook_example():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone: 0.06 for the last.
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])


def test_holm_ignores_nan_in_the_family():
    out = stats.holm([0.01, NAN, 0.04, 0.03, 0.005, NAN])
    np.testing.assert_allclose(out[[0, 2, 3, 4]], [0.03, 0.06, 0.06, 0.02])
    assert math.isnan(out[1]) and math.isnan(out[5])
    assert np.isnan(stats.holm([NAN, NAN])).all() and stats.holm([]).size == 0
    np.testing.assert_allclose(stats.holm([0.2, 0.9]), multipletests([0.2, 0.9], method="holm")[1])


def comparison(delta: float, p: float, n: int = 3) -> stats.Comparison:
    return stats.Comparison(True, n, n, delta, NAN, NAN, p, NAN)


def test_verdict_needs_the_adjusted_p():
    raw = [0.03, 0.04, 0.045]  # all below 0.05 raw; Holm: 0.09, 0.09, 0.09
    adjusted = stats.holm(raw)
    assert (adjusted >= 0.05).all()
    for p, p_adj in zip(raw, adjusted):
        assert stats.verdict(comparison(-1.0, p), p_adj) == stats.NO_DIFFERENCE
        assert stats.verdict(comparison(+1.0, p), p_adj) == stats.NO_DIFFERENCE
    assert stats.verdict(comparison(-1.0, 0.001), 0.003) == stats.BETTER  # lower error
    assert stats.verdict(comparison(+1.0, 0.001), 0.003) == stats.WORSE
    assert stats.verdict(comparison(-1.0, 0.001), 0.05) == stats.NO_DIFFERENCE  # 0.05 is not below 0.05
    assert stats.verdict(comparison(-1.0, 0.001, n=1), 0.003) == stats.TOO_FEW_SEEDS
    assert stats.verdict(None, NAN) == stats.REFERENCE
    assert set(stats.VERDICTS) == {"reference", "better", "worse", "no detected difference", "too few seeds"}


errors = st.lists(st.floats(0, 100, allow_nan=False), min_size=0, max_size=6)


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(errors, errors), min_size=1, max_size=5), paired=st.booleans())
def test_verdict_is_never_better_or_worse_without_a_significant_adjusted_p(rows, paired):
    comps = [stats.compare(by_seed(a), by_seed(b), paired=paired) for a, b in rows]
    adjusted = stats.holm([c.p for c in comps])
    for c, p_adj in zip(comps, adjusted):
        v = stats.verdict(c, p_adj)
        assert v in stats.VERDICTS
        if v in (stats.BETTER, stats.WORSE):
            assert p_adj < 0.05 and c.p <= p_adj and (c.delta < 0) == (v == stats.BETTER)


# --------------------------------------------------------------------------------------------------
# Seed correlation


def test_seed_correlation_against_numpy():
    frame = pd.DataFrame({
        "ref": [1.0, 2.0, 3.0, 5.0],
        "same": [1.5, 2.4, 3.6, 5.1],
        "opposite": [5.0, 3.0, 2.0, 1.0],
        "two_seeds": [1.0, 2.0, NAN, NAN],
        "flat": [2.0, 2.0, 2.0, 2.0],
    })
    corr = stats.seed_correlation(frame, "ref")
    assert corr.reference == "ref" and list(corr.correlations) == ["same", "opposite", "two_seeds", "flat"]
    same = np.corrcoef(frame["ref"], frame["same"])[0, 1]
    opposite = np.corrcoef(frame["ref"], frame["opposite"])[0, 1]
    assert corr.correlations["same"] == pytest.approx(same)
    assert corr.correlations["opposite"] == pytest.approx(opposite)
    assert math.isnan(corr.correlations["two_seeds"]) and math.isnan(corr.correlations["flat"])
    assert corr.mean == pytest.approx((same + opposite) / 2)
    assert stats.seed_correlation(frame).reference == "ref"  # default: the first column
    assert math.isnan(stats.seed_correlation(frame[["ref", "flat"]]).mean)


def test_class_average_weights_by_images():
    means = np.array([[0.2, 1.0], [0.8, 0.0]])
    counts = np.array([1, 3])  # (0.2*1 + 0.8*3)/4 = 0.65; (1*1 + 0*3)/4 = 0.25
    np.testing.assert_allclose(stats.class_average(means, counts), [0.65, 0.25])


def test_mde_is_the_positive_effect_at_80_percent_power_for_every_seed_count_the_runner_allows():
    """statsmodels' solver returns the negative root (as a 1-element array) for some n, e.g. 73: the MDE
    is its magnitude, and it falls as n grows, which the precision loop's bisection relies on."""
    sizes = [*range(2, 130, 3), 73, 87, 92, 109, 117, 120]
    mdes = [stats.mde(n, 1.0) for n in sorted(set(sizes))]
    assert all(isinstance(m, float) and m > 0 for m in mdes)
    assert all(a > b for a, b in zip(mdes, mdes[1:]))
    for n in (73, 87):  # where the solver found the negative root
        power = TTestPower().power(effect_size=stats.mde(n, 1.0), nobs=n, alpha=0.05, alternative="two-sided")
        assert power == pytest.approx(0.8, abs=1e-6)
