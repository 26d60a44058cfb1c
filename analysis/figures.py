"""Figures: paper Fig. 6 and 7 (excitations per channel), class specificity by depth (Sec. 7.2),
Fig. 4-style training curves, one plot per table.

Every builder returns a matplotlib `Figure` made without pyplot (nothing global to close, nothing shown
twice in a notebook); `save` writes it as PNG and PDF; `write_figures` draws everything a results dir
supports into <results>/<profile>/figures/.
"""

from __future__ import annotations

import io
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ablations import rundir
from ablations.atomic import write_atomic
from analysis import curves, excitations, load, stats
from analysis.tables import Table, all_sweeps, build_table

DPI = 150  # PNG pixels = figsize (inches) x DPI; saved without a tight bbox so the size is exact
PALETTE = "colorblind"


@contextmanager
def _style():
    """seaborn's look for the figures we draw, without changing the caller's global rcParams."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        yield


def save(fig: Figure, stem: str | Path) -> list[Path]:
    """<stem>.png and <stem>.pdf, each written atomically.

    The constrained layout is solved once and then frozen: it is most of the drawing time, and both
    formats share the same inch geometry, so the second file would only solve it again.
    """
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    out = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        # No creation date in the PDF: re-drawing the same results gives the same bytes.
        meta = {"CreationDate": None} if ext == "pdf" else {}
        fig.savefig(buf, format=ext, dpi=DPI, metadata=meta)
        out.append(write_atomic(Path(f"{stem}.{ext}"), buf.getvalue()))
    return out


def figures_dir(results_dir: str | Path, profile: str) -> Path:
    return rundir.analysis_dir(results_dir, profile, "figures")


# --------------------------------------------------------------------------------------------------
# Fig. 6 / 7: excitations per channel; class specificity by depth (Sec. 7.2)


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return math.ceil(n / cols), cols


def _row(exc: load.Excitations, cls: int) -> int:
    hits = np.flatnonzero(exc.classes == cls)
    if hits.size == 0:
        raise ValueError(f"class {cls} not in {exc.run_dir / 'excitations.npz'}")
    return int(hits[0])


def fig6(exc: load.Excitations, classes: list[int] | None = None, blocks: list[str] | None = None,
         title: str | None = None, channels: int | str = excitations.FIG6_CHANNELS) -> Figure:
    """Mean excitation per channel for a few classes and the all-class average, one panel per block.

    As in the paper, each panel shows `channels` (50) channels sampled by `excitations.sample_channels`
    (the same for every class; "all" shows every channel), plotted at their channel indices."""
    classes = classes if classes is not None else excitations.default_classes(exc.classes)
    blocks = blocks if blocks is not None else excitations.select_blocks(exc.blocks)
    rows, cols = _grid(len(blocks))
    with _style():
        fig = Figure(figsize=(4.2 * cols, 3.0 * rows + 0.6), layout="constrained")
        # Shared y: the gate's range is comparable across depths, which is what the figure is about.
        axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
        for ax, block in zip(axes, blocks):
            shown = excitations.sample_channels(exc.mean[block].shape[1], channels)
            for (color, style, marker), cls in zip(class_styles(len(classes)), classes):
                ax.plot(shown, exc.mean[block][_row(exc, cls), shown], lw=0.9, alpha=0.85, color=color,
                        ls=style, marker=marker, ms=2.6, label=f"class {cls}")
            avg = stats.class_average(exc.mean[block], exc.counts)[shown]
            # White halo: the reference line must stay readable on top of the class lines.
            ax.plot(shown, avg, lw=1.4, color="black", ls="--", label="all classes",
                    path_effects=[patheffects.Stroke(linewidth=3, foreground="white"), patheffects.Normal()])
            _channel_axes(ax, block, exc.mean[block].shape[1], shown.size)
        _hide_spare_and_legend(fig, axes, len(blocks))
        fig.suptitle(title or f"Mean excitation per channel ({_run_name(exc)})")
    return fig


# Fig. 6's classes: hues of the colour-blind palette that stay apart under deuteranopia and protanopia
# (its green and vermilion do not), and a line style and marker each, so colour is never the only cue.
CLASS_HUES = (0, 1, 4, 2, 9, 5, 6, 8)
CLASS_LINES = ("-", "--", "-.", ":")
CLASS_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def class_styles(n: int) -> list[tuple[tuple[float, float, float], str, str]]:
    palette = sns.color_palette(PALETTE, 10)
    return [(palette[CLASS_HUES[i % len(CLASS_HUES)]], CLASS_LINES[i % len(CLASS_LINES)],
             CLASS_MARKERS[i % len(CLASS_MARKERS)]) for i in range(n)]


def _channel_axes(ax, block: str, n_channels: int, n_shown: int) -> None:
    ax.set_title(f"{block} ({n_channels} channels)")
    ax.set_xlim(0, max(n_channels - 1, 1))
    shown = f"all {n_channels}" if n_shown == n_channels else f"{n_shown} of {n_channels}, sampled"
    ax.set_xlabel(f"channel index ({shown})")
    ax.set_ylabel("activation")


def _hide_spare_and_legend(fig: Figure, axes, n_used: int) -> None:
    """Blank the grid's unused panels; one legend for all panels, below them."""
    for ax in axes[n_used:]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)


def fig7(exc: load.Excitations, cls: int | None = None, blocks: list[str] | None = None,
         title: str | None = None, channels: int | str = excitations.FIG6_CHANNELS) -> Figure:
    """Mean excitation +- one std over the images of one class, one panel per block, on the same
    channels as `fig6` so the two figures can be read side by side."""
    cls = cls if cls is not None else int(exc.classes[0])
    blocks = blocks if blocks is not None else excitations.select_blocks(exc.blocks)
    rows, cols = _grid(len(blocks))
    r = _row(exc, cls)
    with _style():
        fig = Figure(figsize=(4.2 * cols, 3.0 * rows + 0.4), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
        color = sns.color_palette(PALETTE, 1)[0]
        for ax, block in zip(axes, blocks):
            shown = excitations.sample_channels(exc.mean[block].shape[1], channels)
            mean, std = exc.mean[block][r, shown], exc.std[block][r, shown]
            ax.plot(shown, mean, lw=0.9, color=color, label="mean")
            ax.fill_between(shown, mean - std, mean + std, color=color, alpha=0.3, lw=0,
                            label="± 1 std over images")
            _channel_axes(ax, block, exc.mean[block].shape[1], shown.size)
        _hide_spare_and_legend(fig, axes, len(blocks))
        n = int(exc.counts[r])
        fig.suptitle(title or f"Excitation over the {n} images of class {cls} ({_run_name(exc)})")
    return fig


def _run_name(exc: load.Excitations) -> str:
    d = exc.run_dir
    return f"{d.parent.parent.name} / {d.parent.name} / {d.name}"


SPECIFICITY_PANELS = (
    ("class_spread", "spread across classes", "std over classes of the class-mean gate\n(mean over channels)"),
    ("departure", "departure from 0.5", "|class-mean gate − 0.5|\n(mean over classes, channels)"),
)


def fig_class_specificity(summary: pd.DataFrame, title: str | None = None) -> Figure:
    """Sec. 7.2 in one plot: per SE block in depth order, how much the class-mean gate differs between
    classes (top) and how far it is from 0.5 (bottom); one thin line per seed, the mean over seeds
    thick. `summary` is `excitations.class_specificity`'s frame (a "seed" column over block_summary)."""
    order = summary.drop_duplicates("block")
    if order["stage"].notna().all():
        order = order.sort_values(["stage", "index"], kind="stable")
    blocks = order["block"].tolist()
    pos = {b: i for i, b in enumerate(blocks)}
    seeds = sorted(summary["seed"].unique())
    with _style():
        fig = Figure(figsize=(max(6.5, 0.45 * len(blocks) + 2.5), 6.4), layout="constrained")
        axes = fig.subplots(2, 1, sharex=True)
        colors = sns.color_palette(PALETTE, len(seeds))
        for ax, (column, name, ylabel) in zip(axes, SPECIFICITY_PANELS):
            for color, seed in zip(colors, seeds):
                mine = summary[summary["seed"] == seed].sort_values("block", key=lambda s: s.map(pos))
                ax.plot(mine["block"].map(pos), mine[column], lw=0.9, alpha=0.7, color=color,
                        marker=".", ms=4, label=f"seed {seed}")
            mean = summary.groupby("block")[column].mean().reindex(blocks)
            ax.plot(np.arange(len(blocks)), mean.to_numpy(), lw=2.6, color="black", marker="o", ms=5,
                    label=f"mean over {len(seeds)} seed{'s' if len(seeds) != 1 else ''}")
            _stage_boundaries(ax, order)
            ax.set_title(name, loc="left", pad=16)  # above the stage names
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
        axes[-1].set_xticks(np.arange(len(blocks)), blocks, rotation=90)
        axes[-1].set_xlim(-0.5, len(blocks) - 0.5)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", frameon=False)
        fig.suptitle(title or "Class specificity of the excitation by depth")
    return fig


def _stage_boundaries(ax, order: pd.DataFrame) -> None:
    """A dotted line between stages and the stage's name above its blocks (names outside <MODULE>_i_j: none)."""
    stages = order["stage"].tolist()
    if any(pd.isna(s) for s in stages):
        return
    starts = [i for i, s in enumerate(stages) if i == 0 or s != stages[i - 1]]
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(stages)
        if start:
            ax.axvline(start - 0.5, color="0.5", ls=":", lw=1, label="_stage boundary")
        ax.text((start + end - 1) / 2, 1.0, f"stage {stages[start]}", transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize="small", color="0.35")


# --------------------------------------------------------------------------------------------------
# One plot per table


def table_plot(table: Table) -> Figure:
    """Top-1 error per setting: this run's mean +- std (and each seed) beside the paper's number."""
    r, seeds = table.rows, table.runs
    x = np.arange(len(r))
    paper = r["paper_top1"].notna().any()
    with _style():
        fig = Figure(figsize=(max(6.0, 1.25 * len(r)) * (2 if paper else 1) * 0.75 + 1, 4.2),
                     layout="constrained")
        axes = fig.subplots(1, 2 if paper else 1, squeeze=False).ravel()
        ax = axes[0]
        color, ref_color, paper_color = sns.color_palette(PALETTE, 3)
        colors = [ref_color if is_ref else color for is_ref in r["reference"]]
        if len(seeds):
            pos = {label: i for i, label in enumerate(r["setting"])}
            sx = seeds["setting"].map(pos)
            jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(seeds))  # fixed: same image each time
            ax.scatter(sx + jitter, seeds["top1_err"], s=14, color="0.55", zorder=2)
        ax.errorbar(x, r["top1_mean"], yerr=r["top1_std"].fillna(0), fmt="none", ecolor="black",
                    capsize=4, lw=1.2, zorder=3)
        ax.scatter(x, r["top1_mean"], s=46, c=colors, zorder=4)
        ref = r[r["reference"]]
        if len(ref) and not np.isnan(ref["top1_mean"].iloc[0]):  # the line every delta is measured from
            ax.axhline(ref["top1_mean"].iloc[0], ls=":", lw=1, color=ref_color, zorder=1)
        if paper and len(ref) and not np.isnan(ref["paper_top1"].iloc[0]):
            axes[1].axhline(ref["paper_top1"].iloc[0], ls=":", lw=1, color=ref_color, zorder=1)
        ax.set_title(f"this run ({table.profile}, n = {_n_text(r['n'])})")
        ax.set_ylabel("top-1 error (%)")
        if paper:
            axes[1].scatter(x, r["paper_top1"], s=46, c=colors, marker="D", zorder=3)
            axes[1].set_title("published (ImageNet, each row's source)" if table.sweep.has_own_sources
                              else "paper (ImageNet, SE-ResNet-50)")
            axes[1].set_ylabel("top-1 error (%)")
        for a in axes:
            a.set_xticks(x, [f"{s}\n(ref)" if ref else s for s, ref in zip(r["setting"], r["reference"])])
            a.tick_params(axis="x", labelrotation=0 if len(r) <= 4 else 25)
            a.set_xlim(-0.6, len(r) - 0.4)
        # Proxy handles: the mean markers mix two colours, and the legend must explain both.
        handles = [Line2D([], [], ls="", marker="o", ms=4, color="0.55", label="seed")] if len(seeds) else []
        handles += [Line2D([], [], ls="-", marker="o", color="black", mec=color, mfc=color, lw=1.2,
                           label="mean ± std"),
                    Line2D([], [], ls="", marker="o", color=ref_color, label="reference row")]
        ax.legend(handles=handles, loc="best", frameon=True, fontsize="small")
        fig.suptitle(table.title)
    return fig


def table_edf(table: Table) -> Figure:
    """The empirical distribution of per-seed top-1 errors, one step curve per row (pycls' sweep
    analysis): a row whose curve lies left of another's is lower at every quantile, not just on average."""
    runs = table.runs
    order = [s for s in table.rows["setting"] if s in set(runs["setting"])]
    with _style():
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.subplots()
        if order:
            sns.ecdfplot(data=runs, x="top1_err", hue="setting", hue_order=order,
                         palette=sns.color_palette(PALETTE, len(order)), lw=1.8, ax=ax)
        ax.set(xlabel="top-1 error (%)", ylabel="fraction of seeds with error ≤ x",
               title=f"{table.title}: per-seed error distribution")
    return fig


def _n_text(n: pd.Series) -> str:
    lo, hi = int(n.min()), int(n.max())
    return str(lo) if lo == hi else f"{lo}–{hi}"


# --------------------------------------------------------------------------------------------------
# Everything


def write_excitation_figures(results_dir: str | Path, storage: str | None, profile: str,
                             classes: list[int] | None = None, fig7_class: int | None = None,
                             channels: int | str = excitations.FIG6_CHANNELS, sweep: str | None = None,
                             setting: str | None = None) -> dict[str, Figure]:
    """Draw and save Fig. 6 and 7 (lowest seed) and the class-specificity figure (every seed) of the
    setting `excitations.excitation_runs` picks; {} when no run has excitations."""
    excitations.parse_channels(channels)  # a bad count fails before anything is read or drawn
    runs = excitations.chosen_runs(results_dir, storage, profile, sweep=sweep, setting=setting)
    if not runs:
        return {}
    exc = runs[min(runs)]
    d = exc.run_dir
    specificity_title = (f"Class specificity of the excitation by depth ({d.parent.parent.name} / "
                         f"{d.parent.name}, {len(runs)} seed{'s' if len(runs) != 1 else ''})")
    figs = {"fig6_excitations": fig6(exc, classes, channels=channels),
            "fig7_excitation_spread": fig7(exc, fig7_class, channels=channels),
            "fig_class_specificity": fig_class_specificity(excitations.class_specificity(runs),
                                                           specificity_title)}
    out_dir = figures_dir(results_dir, profile)
    for name, fig in figs.items():
        save(fig, out_dir / name)
    return figs


def write_figures(results_dir: str | Path, storage: str | None, profile: str,
                  channels: int | str = excitations.FIG6_CHANNELS) -> list[Path]:
    """Draw every figure the results support; return the files written (PNG and PDF). `channels`:
    how many channels Fig. 6/7 show per block (a count or "all")."""
    trials = load.load_trials(results_dir, storage, profile=profile)
    studies = load.load_studies(results_dir, storage, profile=profile)
    done = load.completed(trials)
    out_dir = figures_dir(results_dir, profile)
    written: list[Path] = []

    for name in write_excitation_figures(results_dir, storage, profile, channels=channels):
        written += [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for sweep in all_sweeps():
        mine = done[done["sweep"] == sweep.name]
        if mine.empty:
            continue
        table = build_table(trials, sweep, profile, studies.get((sweep.name, profile)))
        written += save(table_plot(table), out_dir / f"{table.stem}_top1")
        written += save(table_edf(table), out_dir / f"{table.stem}_edf")
        rows = curves.curve_settings(sweep)
        frame = curves.curves_frame(results_dir, mine, rows)
        if not frame.empty:
            written += save(curves.training_curves(frame, rows), out_dir / f"fig4_training_{sweep.name}")
    return written
