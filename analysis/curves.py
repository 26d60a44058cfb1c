"""Training curves (the paper's Fig. 4, for every row of a sweep or a chosen subset): train and
validation loss, validation top-1 error and the learning rate per epoch.

Honest on purpose: each seed is a thin line and the mean over seeds a thick one, so nothing is
averaged on one scale and drawn on another (a ±std band on a log axis collapses to the bottom edge
where std > mean); errors stay in [0, 100]; and an outlying first epoch (a validation loss of 10^4
while the rest sit near 1) is left off the loss panels' range and named in their corner instead of
flattening every other epoch. The run dirs record no training error (metrics.csv), so none is drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ablations.schema import Sweep
from analysis import load

PALETTE = "colorblind"
PANELS = (("train_loss", "training loss", "log"), ("val_loss", "validation loss", "log"),
          ("top1_err", "validation top-1 error (%)", "linear"), ("lr", "learning rate", "log"))
OUTLIER_FACTOR = 10.0  # a first epoch this many times above every later one is drawn off-scale


def curve_settings(sweep: Sweep) -> list[str]:
    """Every row of the sweep, in its order: the figure compares them all, as the table does."""
    return [s.label for s in sweep.settings]


def curves_frame(results_dir: str | Path, done: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Long-form per-epoch metrics of the given settings' completed runs (one row per run x epoch)."""
    parts = []
    for _, row in done[done["setting"].isin(labels)].iterrows():
        m = load.read_metrics(load.locate_run_dir(results_dir, row))
        if m is not None and len(m):
            parts.append(m.assign(setting=row["setting"], seed=int(row["seed"])))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _log_limits(values: pd.Series, epochs: pd.Series) -> tuple[tuple[float, float], float | None]:
    """y-limits of a log panel, and the first-epoch value left above them (None when none is)."""
    positive = values[values > 0]
    later = positive[epochs[positive.index] > 1]
    first = positive[epochs[positive.index] == 1]
    off = None
    if len(later) and len(first) and first.max() > OUTLIER_FACTOR * later.max():
        off, positive = float(first.max()), later
    low, high = float(positive.min()), float(positive.max())
    return (low / 1.3, high * 1.3), off


def training_curves(curves: pd.DataFrame, settings: list[str] | None = None, title: str = "") -> Figure:
    """One panel per metric of PANELS; per seed a thin line, the mean over seeds a thick one."""
    order = [s for s in (settings or list(dict.fromkeys(curves["setting"]))) if s in set(curves["setting"])]
    curves = curves[curves["setting"].isin(order)]
    colors = dict(zip(order, sns.color_palette(PALETTE, len(order))))
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(4.0 * len(PANELS), 4.0), layout="constrained")
        axes = fig.subplots(1, len(PANELS))
        for ax, (column, name, scale) in zip(axes, PANELS):
            sns.lineplot(data=curves, x="epoch", y=column, hue="setting", hue_order=order, palette=colors,
                         units="seed", estimator=None, lw=0.7, alpha=0.35, legend=False, ax=ax)
            sns.lineplot(data=curves, x="epoch", y=column, hue="setting", hue_order=order, palette=colors,
                         errorbar=None, lw=2.2, legend=ax is axes[0], ax=ax)
            ax.set_title(name)
            ax.set_ylabel(name)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if scale == "log":
                ax.set_yscale("log")
                limits, off = _log_limits(curves[column], curves["epoch"])
                ax.set_ylim(*limits)
                if off is not None:
                    ax.text(0.98, 0.98, f"epoch 1 off-scale (up to {off:.3g})", transform=ax.transAxes,
                            ha="right", va="top", fontsize="small", color="0.35")
            else:
                high = float(np.nanmax(curves[column])) if len(curves) else 100.0
                ax.set_ylim(0, min(100.0, high * 1.05 + 1))  # an error rate: never below 0 or above 100
        handles, labels = axes[0].get_legend_handles_labels()
        axes[0].get_legend().remove()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), frameon=False)
        n = curves.groupby("setting")["seed"].nunique()
        seeds = f"{n.min()}" if n.min() == n.max() else f"{n.min()}–{n.max()}"
        fig.suptitle(title or f"Training curves: each seed a thin line, their mean a thick one ({seeds} seeds per row)")
    return fig
