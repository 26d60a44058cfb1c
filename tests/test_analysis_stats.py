"""Statistics against values computed by hand (closed forms written out in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ablations.spec import Setting, Sweep
from analysis import stats
from analysis.load import COLUMNS
from analysis.tables import build_table

# Student t quantile for df=2 in closed form: F(t) = 1/2 + t / (2 sqrt(2 + t^2)) = 0.975
# => t^2 = 0.95^2 * 2 / (1 - 0.95^2) = 18.512820..., t = 4.302653
T_975_DF2 = math.sqrt(0.95**2 * 2 / (1 - 0.95**2))


def test_t_quantile_closed_form():
    assert T_975_DF2 == pytest.approx(4.302653, abs=1e-6)


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


def test_welch_by_hand():
    # a = 21,22,23 (mean 22, var 1); b = 23,24,25 (mean 24, var 1). se^2 = 1/3 + 1/3 = 2/3,
    # t = -2 / sqrt(2/3) = -sqrt(6); Welch df = (2/3)^2 / (2 * (1/3)^2 / 2) = 4.
    # t with 4 df: two-sided p = 1 - sin(th) * (1 + cos^2(th) / 2), tan(th) = |t| / 2:
    # tan^2 = 1.5 -> cos^2 = 0.4, sin = sqrt(0.6) -> p = 1 - sqrt(0.6) * 1.2 = 0.070484
    p_hand = 1 - math.sqrt(0.6) * 1.2
    assert p_hand == pytest.approx(0.070484, abs=1e-6)
    delta, p = stats.welch([21, 22, 23], [23, 24, 25])
    assert delta == pytest.approx(-2.0)
    assert p == pytest.approx(p_hand, abs=1e-9)
    assert stats.welch([23, 24, 25], [21, 22, 23])[1] == pytest.approx(p_hand, abs=1e-9)  # symmetric


def test_welch_undefined_cases():
    d, p = stats.welch([1.0], [2.0, 3.0])
    assert d == pytest.approx(-1.5) and math.isnan(p)  # delta from one seed, p needs two
    d, p = stats.welch([1.0, 1.0], [2.0, 2.0])
    assert d == pytest.approx(-1.0) and math.isnan(p)  # zero variance on both sides
    assert all(math.isnan(v) for v in stats.welch([], [1.0, 2.0]))


def test_class_average_weights_by_images():
    means = np.array([[0.2, 1.0], [0.8, 0.0]])
    counts = np.array([1, 3])  # (0.2*1 + 0.8*3)/4 = 0.65; (1*1 + 0*3)/4 = 0.25
    np.testing.assert_allclose(stats.class_average(means, counts), [0.65, 0.25])


def trials(rows: list[tuple[str, int, float, float]]) -> pd.DataFrame:
    df = pd.DataFrame([{"sweep": "toy", "profile": "p", "setting": s, "seed": k, "state": "COMPLETE",
                        "top1_err": t1, "top5_err": t5, "params_m": 1.5, "gflops": 0.25,
                        "images_per_s": 100.0 + k, "trial_number": i}
                       for i, (s, k, t1, t5) in enumerate(rows)], columns=list(COLUMNS))
    df["seed"] = df["seed"].astype("Int64")
    return df


def test_table_row_statistics_on_a_fixed_frame():
    sweep = Sweep(name="toy", table=None, reference="B", seeds=3,
                  settings=(Setting(label="A"), Setting(label="B", se=None)))
    df = trials([("A", 0, 21, 5), ("A", 1, 22, 6), ("A", 2, 23, 7),
                 ("B", 0, 23, 6), ("B", 1, 24, 6), ("B", 2, 25, 6)])
    t = build_table(df, sweep, "p")
    a = t.rows.set_index("setting").loc["A"]
    half = T_975_DF2 / math.sqrt(3)  # std 1
    assert a["n"] == 3 and a["top1_mean"] == pytest.approx(22) and a["top1_std"] == pytest.approx(1)
    assert (a["top1_ci_low"], a["top1_ci_high"]) == pytest.approx((22 - half, 22 + half))
    assert a["d_top1"] == pytest.approx(-2) and a["p_top1"] == pytest.approx(1 - math.sqrt(0.6) * 1.2)
    # B's top-5 is constant but A's is not: Welch is defined (t = 0, p = 1).
    assert a["d_top5"] == pytest.approx(0) and a["p_top5"] == pytest.approx(1)
    assert a["images_per_s"] == pytest.approx(101) and a["params_m"] == 1.5
    b = t.rows.set_index("setting").loc["B"]
    assert bool(b["reference"]) and math.isnan(b["d_top1"]) and math.isnan(b["p_top1"])
    assert t.missing == []
