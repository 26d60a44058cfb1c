"""Seeds by precision: whether a sweep has enough seeds, and how many the next round should have.

Precision here is the minimum detectable effect (MDE, `stats.mde`: top-1 points at 80 % power, two-sided
alpha 0.05) of each non-reference row's comparison with the reference row. Seeds pair the settings, so
the comparison is paired: n = the seeds present for both the row and the reference, sd = the sample
standard deviation of the per-seed differences (row error minus reference error). A sweep without a
reference row measures each row's mean alone: n = its seeds, sd = its own sample sd.

The rule reads only n and sd, never the observed differences or p-values. Adding seeds until a
difference looks significant (optional stopping) inflates the false-positive rate far beyond alpha;
adding them until the spread says the test can resolve X points is sample-size re-estimation from a
nuisance parameter, which leaves the test's error rates essentially as planned: two sweeps with the same
spreads get the same seed counts whatever their means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from analysis import stats
from analysis.load import completed

DEFAULT_MAX_SEEDS = 20  # cap of `ablate run --precision` without --max-seeds: 20 seeds resolve ~0.66 sd


@dataclass(frozen=True)
class RowMDE:
    """One comparison's precision."""

    setting: str
    n: int  # pairs with the reference (without a reference: the row's runs)
    sd: float  # sample sd of the per-seed differences (without a reference: of the row's errors)
    mde: float  # top-1 points; NaN with fewer than 2, or with zero spread (stats.mde)


@dataclass(frozen=True)
class Decision:
    """The rule's verdict on a sweep at `seeds` seeds per setting."""

    rows: tuple[RowMDE, ...]
    seeds: int  # seeds per setting the decision was made at
    next_seeds: int  # seeds for the next round; == seeds: stop
    reached: bool  # every row's MDE <= the precision asked for

    @property
    def done(self) -> bool:
        return self.next_seeds == self.seeds

    @property
    def worst(self) -> RowMDE | None:
        """The least precise row (an undefined MDE counts as the least precise)."""
        return max(self.rows, key=lambda r: math.inf if math.isnan(r.mde) else r.mde, default=None)


def row_mdes(trials: pd.DataFrame, sweep) -> tuple[RowMDE, ...]:
    """Per non-reference row of `sweep` (in the sweep's order): n, sd and MDE of top-1 error, from the
    completed trials of one profile (`analysis.load.load_trials` rows)."""
    done = completed(trials)
    done = done[(done["sweep"] == sweep.name) & done["top1_err"].notna()]
    errors = done.pivot(index="seed", columns="setting", values="top1_err")  # seeds x settings
    labels = [s.label for s in sweep.settings]
    ref = errors[sweep.reference] if sweep.reference in errors else None
    out = []
    for label in labels:
        if label == sweep.reference:
            continue
        x = errors[label] if label in errors else pd.Series(dtype=float)
        if sweep.reference is not None:
            x = (x - ref) if ref is not None else pd.Series(dtype=float)  # pairs: seeds in both
        x = x.dropna()
        sd = float(x.std(ddof=1)) if len(x) >= 2 else math.nan
        out.append(RowMDE(label, len(x), sd, stats.mde(len(x), sd, paired=True)))
    return tuple(out)


def seeds_for(sd: float, precision: float, lo: int, hi: int) -> int:
    """The smallest n in [lo, hi] whose MDE at this sd is <= precision; hi when none is (bisection:
    the MDE falls with n)."""
    if stats.mde(hi, sd) > precision:
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if stats.mde(mid, sd) <= precision:
            hi = mid
        else:
            lo = mid + 1
    return lo


def decide(trials: pd.DataFrame, sweep, precision: float, max_seeds: int, seeds: int) -> Decision:
    """Stop, or the seed count of the next round: the smallest n whose MDE at the observed sd of the
    least precise row is <= `precision`, at least `seeds` + 1 and at most `max_seeds`. A row whose MDE
    is undefined (fewer than 2 pairs, or a zero spread, which with errors in steps of one validation
    image can be chance) asks for one more seed. Stops when every row is precise enough or at
    `max_seeds`. `trials`: one profile's trials (`analysis.load.load_trials`)."""
    rows = row_mdes(trials, sweep)
    reached = all(math.isfinite(r.mde) and r.mde <= precision for r in rows)
    if reached or seeds >= max_seeds:
        return Decision(rows, seeds, seeds, reached)
    lo = seeds + 1
    # The MDE is linear in sd: the widest defined spread needs the most seeds.
    spreads = [r.sd for r in rows if math.isfinite(r.mde)]
    target = seeds_for(max(spreads), precision, lo, max_seeds) if spreads else lo
    return Decision(rows, seeds, target, reached)
