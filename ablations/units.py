"""Counts in units that scale, for people: 25.6 M and 430 k parameters, 3.86 G and 5.18 M MACs, so a
tiny model's complexity reads as well as ResNet-50's (0.00546 GFLOPs does not). Files keep the raw
numbers; a missing value is a dash."""

from __future__ import annotations

import math

DASH = "—"
PREFIXES = ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""))


def scaled(value: float | None, digits: int = 3) -> str:
    """`value` to `digits` significant digits with an SI prefix: 25557032 -> '25.6 M'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    rounded = float(f"{value:.{digits}g}")  # round first: 999,950 is '1.00 M', not '1e+03 k'
    factor, prefix = next(((f, p) for f, p in PREFIXES if abs(rounded) >= f), (1.0, ""))
    return f"{rounded / factor:#.{digits}g}".rstrip(".") + (f" {prefix}" if prefix else "")


def params_text(params_m: float | None) -> str:
    """Parameters given in millions (the paper's unit): 0.43 -> '430 k'."""
    return scaled(None if params_m is None else params_m * 1e6)


def macs_text(gflops: float | None) -> str:
    """MACs given in the paper's "GFLOPs" (= GMACs): 0.00546 -> '5.46 M'."""
    return scaled(None if gflops is None else gflops * 1e9)
