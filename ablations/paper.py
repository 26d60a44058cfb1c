"""The paper's published numbers (TPAMI version, Tables 2-5 and 10-16), copied verbatim from the paper.

Rows are keyed by (table, setting label) where the label is the sweep file's row label. A sweep that
reproduces no table of the paper (sweeps/attention.yaml: other papers' modules) carries its rows'
numbers itself, each with its source (`published:` on a setting); `schema.Sweep.published_numbers`
reads either.
"""

from __future__ import annotations

import csv
from functools import cache

from ablations.bundled import published_csv

CSV = published_csv()
FIELDS = ("top1_err", "top5_err", "gflops", "params_m")


@cache
def published() -> dict[tuple[int, str], dict[str, float | None]]:
    """{(table, setting): {top1_err, top5_err, gflops, params_m}}; None where the paper gives none."""
    out = {}
    with CSV.open() as f:
        for row in csv.DictReader(f):
            values = {k: (float(row[k]) if row[k] else None) for k in FIELDS}
            out[(int(row["table"]), row["setting"])] = values
    return out


def tables() -> frozenset[int]:
    """The paper's table numbers with published rows (a sweep's `table:` must be one of them)."""
    return frozenset(table for table, _ in published())


def published_row(table: int | None, setting: str) -> dict[str, float | None]:
    """The paper's numbers for one row; all None when the paper has no such row."""
    if table is None:
        return dict.fromkeys(FIELDS)
    return published().get((table, setting), dict.fromkeys(FIELDS))
