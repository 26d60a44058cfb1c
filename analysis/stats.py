"""Per-row statistics over seeds, and each row's test against the table's reference row.

Seeds pair the settings of a sweep: seed k of every setting starts the shared layers from the same
initialisation and sees the data in the same order. The design's natural test is therefore paired
(a one-sample t-test on the per-seed differences row - reference, over the seeds both have); Welch's
unpaired t-test is the alternative, behind the same `paired` flag. Every number comes from scipy or
statsmodels: the t intervals and p-values from `ttest_rel` / `ttest_ind(equal_var=False)`, the Holm
adjustment from `multipletests`, the minimum detectable effect from statsmodels' power solvers.

Undefined is NaN, never zero: with fewer than two pairs (or runs on a side, unpaired) a comparison
has a Δ but no CI, p or MDE; with no spread at all (every per-seed difference equal, or both samples
constant when unpaired) the t model has nothing to scale by, so CI, p and MDE are NaN too -- "no
evidence either way", not "certainly different" (scipy itself would answer p = 0 and a zero-width CI).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

CONFIDENCE = 0.95
ALPHA = 0.05  # two-sided significance level of every test and of the minimum detectable effect
POWER = 0.8  # power at which the minimum detectable effect is stated
PAIRED = True  # default test: paired over shared seeds (False: Welch's unpaired t-test)

# Verdicts, the complete set. `better`/`worse` need a Holm-adjusted p below ALPHA; lower error is better.
REFERENCE = "reference"
BETTER = "better"
WORSE = "worse"
NO_DIFFERENCE = "no detected difference"  # tested (or untestable for lack of spread), not significant
TOO_FEW_SEEDS = "too few seeds"  # fewer than two pairs (paired) or two runs on a side (unpaired)
VERDICTS = (REFERENCE, BETTER, WORSE, NO_DIFFERENCE, TOO_FEW_SEEDS)

# Spreads this small relative to the values are floating-point noise: (k1 - k2)/N*100 computed for two
# seeds with the same image-count difference can differ in the last bits, and scipy would read that
# as an almost infinite t.
_ZERO_SPREAD_RTOL = 1e-9


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


ERROR_RANGE = (0.0, 100.0)  # an error rate in %: a CI bound outside it is no error rate anyone could see


def summarize(x: Iterable[float], confidence: float = CONFIDENCE,
              bounds: tuple[float, float] | None = None) -> Summary:
    """Mean, sample std and Student-t CI of the non-NaN values; std and CI need two of them. `bounds`:
    the values' range (ERROR_RANGE for error rates), to which the CI is clipped."""
    a = _values(x)
    n = a.size
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(a.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(a.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Summary(n, mean, std, low, high)


def mde(n: int, sd: float, paired: bool = True, n_ref: int | None = None, alpha: float = ALPHA,
        power: float = POWER) -> float:
    """Minimum detectable effect (in the units of `sd`) of a two-sided t-test at `alpha` and `power`.

    Paired (n pairs): `sd` is the standard deviation of the per-seed differences (statsmodels'
    one-sample `TTestPower`). Unpaired (n vs `n_ref` runs): `sd` is the pooled standard deviation
    (`TTestIndPower`). NaN where the test is undefined (fewer than two runs on a side, NaN sd) or the
    spread is zero: errors come in steps of one validation image, so two seeds can agree by chance.
    """
    from statsmodels.stats.power import TTestIndPower, TTestPower

    n_ref = n if n_ref is None else n_ref
    if n < 2 or n_ref < 2 or not math.isfinite(sd):
        return math.nan
    if sd == 0:  # no spread to scale by: nothing is known about detectability (see the module docstring)
        return math.nan
    if paired:
        d = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power,
                                     alternative="two-sided")
    else:
        d = TTestIndPower().solve_power(effect_size=None, nobs1=n, ratio=n_ref / n, alpha=alpha,
                                        power=power, alternative="two-sided")
    # For some n (73, 87, 92, ...) statsmodels' fallback root-finder returns the negative root as a
    # 1-element array: the two-sided power is symmetric in the effect size, so its magnitude is the MDE.
    return abs(float(np.ravel(d)[0])) * sd


# ---------------------------------------------------------------------------------------------------
# One row against the reference


@dataclass(frozen=True)
class Comparison:
    """A row vs the reference row on one metric. `delta` is row minus reference (negative: lower error)."""

    paired: bool
    n: int  # pairs (paired) or the row's runs (unpaired)
    n_ref: int  # pairs again (paired) or the reference's runs (unpaired)
    delta: float
    ci_low: float  # 95% CI of delta
    ci_high: float
    p: float  # raw two-sided p
    mde: float  # minimum detectable |delta| at POWER and ALPHA for this n and spread

    @property
    def enough_seeds(self) -> bool:
        return self.n >= 2 and self.n_ref >= 2


def _no_spread(values: np.ndarray, scale: np.ndarray) -> bool:
    return bool(np.ptp(values) <= _ZERO_SPREAD_RTOL * max(1.0, float(np.abs(scale).max())))


def _pooled_sd(a: np.ndarray, b: np.ndarray) -> float:
    return math.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2))


def compare(row: pd.Series, reference: pd.Series, paired: bool = PAIRED) -> Comparison:
    """Test `row` against `reference`, both per-seed values indexed by seed (NaN values are dropped).

    Paired: the seeds present (non-NaN) in both; a seed missing on either side drops the pair. Δ is the
    mean difference, CI and p from `scipy.stats.ttest_rel`, MDE from the sd of the differences.
    Unpaired: every non-NaN run on each side; Δ = mean(row) - mean(reference), CI and p from Welch's
    `ttest_ind(equal_var=False)`, MDE from the pooled sd. See the module docstring for n < 2 and no spread.
    """
    row, reference = row.astype(float), reference.astype(float)
    if paired:
        both = pd.concat([row.rename("row"), reference.rename("ref")], axis=1, join="inner").dropna()
        a, b = both["row"].to_numpy(), both["ref"].to_numpy()
        spread_is_zero = a.size > 0 and _no_spread(a - b, np.concatenate([a, b]))
    else:
        a, b = _values(row), _values(reference)
        spread_is_zero = a.size > 0 and b.size > 0 and _no_spread(a, a) and _no_spread(b, b)
    if a.size == 0 or b.size == 0:
        return Comparison(paired, a.size, b.size, math.nan, math.nan, math.nan, math.nan, math.nan)
    delta = float(np.mean(a - b)) if paired else float(a.mean() - b.mean())
    if min(a.size, b.size) < 2 or spread_is_zero:
        return Comparison(paired, a.size, b.size, delta, math.nan, math.nan, math.nan, math.nan)
    with warnings.catch_warnings():
        # scipy warns about precision loss when one side is constant (unpaired); the result is exact.
        warnings.simplefilter("ignore", RuntimeWarning)
        if paired:
            test = sps.ttest_rel(a, b)
            detectable = mde(a.size, float(np.std(a - b, ddof=1)), paired=True)
        else:
            test = sps.ttest_ind(a, b, equal_var=False)
            detectable = mde(a.size, _pooled_sd(a, b), paired=False, n_ref=b.size)
        ci = test.confidence_interval(CONFIDENCE)
    return Comparison(paired, a.size, b.size, delta, float(ci.low), float(ci.high), float(test.pvalue),
                      detectable)


def holm(pvalues: Iterable[float]) -> np.ndarray:
    """Holm-adjusted p-values, same order; NaN p's stay NaN and are not counted in the family."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(list(pvalues), dtype=float)
    out = np.full(p.shape, math.nan)
    tested = ~np.isnan(p)
    if tested.any():
        out[tested] = multipletests(p[tested], alpha=ALPHA, method="holm")[1]
    return out


def verdict(comparison: Comparison | None, p_adjusted: float) -> str:
    """One of VERDICTS. None stands for the reference row itself."""
    if comparison is None:
        return REFERENCE
    if not comparison.enough_seeds:
        return TOO_FEW_SEEDS
    if not p_adjusted < ALPHA:  # NaN (no spread) lands here too
        return NO_DIFFERENCE
    return BETTER if comparison.delta < 0 else WORSE


# ---------------------------------------------------------------------------------------------------
# Evidence for the choice between the paired and the unpaired test


@dataclass(frozen=True)
class SeedCorrelation:
    """Pearson correlations across seeds between each setting and the reference.

    Positive correlation is what makes the paired test the more powerful one: the variance of a
    difference is var(a) + var(b) - 2 cov(a, b).
    """

    reference: str
    correlations: dict[str, float]  # setting -> r over the seeds both have (NaN: < 3 seeds or no spread)
    mean: float  # mean of the finite correlations (NaN if none)


def seed_correlation(frame: pd.DataFrame, reference: str | None = None) -> SeedCorrelation:
    """Correlations of per-seed errors (a seeds x settings frame) with the `reference` column (default:
    the first). Each uses the seeds both columns have; three at least, since two always give r = ±1."""
    reference = frame.columns[0] if reference is None else reference
    ref = frame[reference].astype(float)
    out: dict[str, float] = {}
    for setting in frame.columns:
        if setting == reference:
            continue
        both = pd.concat([frame[setting].astype(float), ref], axis=1).dropna()
        a, b = both.iloc[:, 0].to_numpy(), both.iloc[:, 1].to_numpy()
        if len(both) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
            out[str(setting)] = math.nan
        else:
            out[str(setting)] = float(sps.pearsonr(a, b).statistic)
    finite = [r for r in out.values() if math.isfinite(r)]
    return SeedCorrelation(str(reference), out, float(np.mean(finite)) if finite else math.nan)


def class_average(means: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The all-class mean excitation per channel from per-class means ([classes x channels]).

    Weighted by images per class, so it equals the mean over all images even when classes are unequal.
    """
    w = np.asarray(counts, dtype=float)
    return (np.asarray(means, dtype=float) * w[:, None]).sum(axis=0) / w.sum()
