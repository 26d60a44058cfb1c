"""Numbers people read: counts in units that scale (tables, `ablate complexity`, `ablate train`), a
dash where a value is missing, and CIs of an error rate inside [0, 100]."""

from __future__ import annotations

import math

import pytest

from ablations.cli import main
from ablations.cli_train import complexity_text
from ablations.units import DASH, macs_text, params_text, scaled
from analysis import stats


@pytest.mark.parametrize(("value", "text"), [
    (25_557_032, "25.6 M"), (430_346, "430 k"), (5_175_808, "5.18 M"), (3.866e9, "3.87 G"),
    (999_950, "1.00 M"), (410_122, "410 k"), (12, "12.0"), (None, DASH), (math.nan, DASH),
])
def test_scaled(value, text):
    assert scaled(value) == text


def test_paper_units_convert():
    assert params_text(28.1) == "28.1 M" and params_text(0.43) == "430 k" and params_text(None) == DASH
    assert macs_text(3.87) == "3.87 G" and macs_text(0.00546) == "5.46 M"


def test_quick_complexity_tells_rows_apart_and_dashes_missing_paper_values(capsys):
    assert main(["complexity", "ratio"]) == 0  # the quick profile, as every other command
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["setting", "params", "FLOPs", "(MACs)", "paper", "params", "paper", "FLOPs"]
    cells = [line.split() for line in lines[1:]]
    params = [f"{c[1]} {c[2]}" for c in cells]
    macs = [f"{c[3]} {c[4]}" for c in cells]
    assert len(set(params)) == len(cells) == 6 and len(set(macs)) == 6  # 0.4 and 0.01 on every row before
    assert all(p.endswith(" k") for p in params) and all(m.endswith(" M") for m in macs)
    assert [f"{c[5]} {c[6]}" for c in cells][-1] == "25.6 M"  # the paper's ResNet-50
    assert all(c[-1] == DASH for c in cells) and "None" not in "\n".join(lines)  # Table 10 gives no GFLOPs


def test_complexity_text_formats_exact_counts():
    rows = [{"setting": "a", "params": 430_346, "macs": 5_175_808, "paper_params_m": None, "paper_gflops": 3.87}]
    assert complexity_text(rows).splitlines()[1].split() == ["a", "430", "k", "5.18", "M", DASH, "3.87", "G"]


def test_error_ci_is_clipped_to_the_range_of_an_error_rate():
    loose = stats.summarize([0.0, 0.5, 3.0])
    assert loose.ci_low < 0
    clipped = stats.summarize([0.0, 0.5, 3.0], bounds=stats.ERROR_RANGE)
    assert clipped.ci_low == 0.0 and clipped.ci_high == loose.ci_high and clipped.mean == loose.mean
    top = stats.summarize([99.0, 100.0, 97.0], bounds=stats.ERROR_RANGE)
    assert top.ci_high == 100.0 and top.ci_low > 90
