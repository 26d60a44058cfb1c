"""Per-row statistics over seeds: mean, sample std, Student-t 95% CI, Welch's t-test against a reference.

Every number is the textbook formula so it can be checked by hand:
  mean = sum(x)/n;  std = sqrt(sum((x-mean)^2)/(n-1));  CI = mean -+ t_{0.975, n-1} * std/sqrt(n);
  Welch: t = (mean_a - mean_b)/sqrt(s_a^2/n_a + s_b^2/n_b), Welch-Satterthwaite degrees of freedom,
  two-sided p. With fewer than two seeds, std, CI and p are undefined (NaN), never zero.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1)
    ci_low: float
    ci_high: float


def _values(x: Iterable[float]) -> np.ndarray:
    a = np.asarray(list(x), dtype=float)
    return a[~np.isnan(a)]


def summarize(x: Iterable[float], confidence: float = CONFIDENCE) -> Summary:
    a = _values(x)
    n = a.size
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(a.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(a.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def welch(x: Iterable[float], reference: Iterable[float]) -> tuple[float, float]:
    """(mean(x) - mean(reference), two-sided Welch p). Delta is defined from one seed each; p needs two.

    When both samples have zero variance (e.g. bitwise-deterministic training), the Welch-Satterthwaite
    degrees of freedom are 0/0; scipy would still answer p = 0 or NaN, we answer NaN: "no evidence
    either way", not "certainly different".
    """
    a, b = _values(x), _values(reference)
    if a.size == 0 or b.size == 0:
        return math.nan, math.nan
    delta = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return delta, math.nan
    if a.var(ddof=1) == 0 and b.var(ddof=1) == 0:
        return delta, math.nan
    with warnings.catch_warnings():
        # scipy warns about precision loss when one side is constant; the result is still exact here.
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(sps.ttest_ind(a, b, equal_var=False).pvalue)
    return delta, p


ALPHA = 0.05  # two-sided significance level of every test and of the minimum detectable effect
POWER = 0.8  # power at which the minimum detectable effect is stated


def mde(n: int, sd: float, paired: bool = True, n_ref: int | None = None, alpha: float = ALPHA,
        power: float = POWER) -> float:
    """Minimum detectable effect (in the units of `sd`) of a two-sided t-test at `alpha` and `power`.

    Paired (n pairs): `sd` is the standard deviation of the per-seed differences (statsmodels'
    one-sample `TTestPower`). Unpaired (n vs `n_ref` runs): `sd` is the pooled standard deviation
    (`TTestIndPower`). NaN where the test is undefined (fewer than two runs on a side, or NaN sd).
    """
    from statsmodels.stats.power import TTestIndPower, TTestPower

    n_ref = n if n_ref is None else n_ref
    if n < 2 or n_ref < 2 or not math.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    if paired:
        d = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power,
                                     alternative="two-sided")
    else:
        d = TTestIndPower().solve_power(effect_size=None, nobs1=n, ratio=n_ref / n, alpha=alpha,
                                        power=power, alternative="two-sided")
    return float(d) * sd


def class_average(means: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The all-class mean excitation per channel from per-class means ([classes x channels]).

    Weighted by images per class, so it equals the mean over all images even when classes are unequal.
    """
    w = np.asarray(counts, dtype=float)
    return (np.asarray(means, dtype=float) * w[:, None]).sum(axis=0) / w.sum()
