"""Figures: paper Fig. 6 and 7 (excitations per channel), Fig. 4-style training curves, one plot per table.

Every builder returns a matplotlib `Figure` made without pyplot (nothing global to close, nothing shown
twice in a notebook); `save` writes it as PNG and PDF; `write_figures` draws everything a results dir
supports into <results>/<profile>/figures/.
"""

from __future__ import annotations

import io
import math
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ablations import paths
from ablations.runio import write_atomic
from ablations.spec import SESpec, Sweep
from analysis import load, stats
from analysis.tables import Table, all_sweeps, build_table

DPI = 150  # PNG pixels = figsize (inches) x DPI; saved without a tight bbox so the size is exact
PALETTE = "colorblind"
N_CLASSES = 4  # the paper's Fig. 6 shows four classes
_BLOCK = re.compile(r"^SE_(\d+)_(\d+)$")


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
    return paths.analysis_dir(results_dir, profile, "figures")


# --------------------------------------------------------------------------------------------------
# Fig. 6 / 7: excitations


def select_blocks(blocks: list[str]) -> list[str]:
    """The paper's Fig. 6 blocks for any depth: the last block of stages 2, 3 and 4 and every block of
    stage 5. On ResNet-50 (3-4-6-3) that is exactly SE_2_3, SE_3_4, SE_4_6, SE_5_1, SE_5_2, SE_5_3.
    Stages without SE (e.g. the per-stage sweep) are skipped; names outside the SE_i_j scheme keep
    their last six blocks."""
    parsed = [(b, _BLOCK.match(b)) for b in blocks]
    if not blocks or any(m is None for _, m in parsed):
        return blocks[-6:]
    by_stage: dict[int, list[tuple[int, str]]] = {}
    for b, m in parsed:
        by_stage.setdefault(int(m.group(1)), []).append((int(m.group(2)), b))
    out = []
    for stage in sorted(by_stage):
        ordered = [b for _, b in sorted(by_stage[stage])]
        out += ordered if stage == max(by_stage) and stage >= 5 else ordered[-1:]
    return out


def default_classes(classes: np.ndarray, k: int = N_CLASSES) -> list[int]:
    """k class ids spread evenly over the classes present (first and last included)."""
    idx = np.unique(np.linspace(0, len(classes) - 1, num=min(k, len(classes))).round().astype(int))
    return [int(classes[i]) for i in idx]


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return math.ceil(n / cols), cols


def _row(exc: load.Excitations, cls: int) -> int:
    hits = np.flatnonzero(exc.classes == cls)
    if hits.size == 0:
        raise ValueError(f"class {cls} not in {exc.run_dir / 'excitations.npz'}")
    return int(hits[0])


def fig6(exc: load.Excitations, classes: list[int] | None = None, blocks: list[str] | None = None,
         title: str | None = None) -> Figure:
    """Mean excitation per channel index for a few classes and the all-class average, one panel per block."""
    classes = classes if classes is not None else default_classes(exc.classes)
    blocks = blocks if blocks is not None else select_blocks(exc.blocks)
    rows, cols = _grid(len(blocks))
    with _style():
        fig = Figure(figsize=(4.2 * cols, 3.0 * rows + 0.6), layout="constrained")
        # Shared y: the gate's range is comparable across depths, which is what the figure is about.
        axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
        colors = sns.color_palette(PALETTE, len(classes))
        for ax, block in zip(axes, blocks):
            channels = np.arange(exc.mean[block].shape[1])
            for color, cls in zip(colors, classes):
                ax.plot(channels, exc.mean[block][_row(exc, cls)], lw=0.8, alpha=0.8, color=color,
                        label=f"class {cls}")
            avg = stats.class_average(exc.mean[block], exc.counts)
            # White halo: the reference line must stay readable on top of hundreds of class channels.
            ax.plot(channels, avg, lw=1.4, color="black", ls="--", label="all classes",
                    path_effects=[patheffects.Stroke(linewidth=3, foreground="white"), patheffects.Normal()])
            _channel_axes(ax, block, channels.size)
        _hide_spare_and_legend(fig, axes, len(blocks))
        fig.suptitle(title or f"Mean excitation per channel ({_run_name(exc)})")
    return fig


def _channel_axes(ax, block: str, n_channels: int) -> None:
    ax.set_title(f"{block} ({n_channels} channels)")
    ax.set_xlim(0, n_channels - 1)
    ax.set_xlabel("channel index")
    ax.set_ylabel("activation")


def _hide_spare_and_legend(fig: Figure, axes, n_used: int) -> None:
    """Blank the grid's unused panels; one legend for all panels, below them."""
    for ax in axes[n_used:]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)


def fig7(exc: load.Excitations, cls: int | None = None, blocks: list[str] | None = None,
         title: str | None = None) -> Figure:
    """Mean excitation +- one std over the images of one class, one panel per block."""
    cls = cls if cls is not None else int(exc.classes[0])
    blocks = blocks if blocks is not None else select_blocks(exc.blocks)
    rows, cols = _grid(len(blocks))
    r = _row(exc, cls)
    with _style():
        fig = Figure(figsize=(4.2 * cols, 3.0 * rows + 0.4), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
        color = sns.color_palette(PALETTE, 1)[0]
        for ax, block in zip(axes, blocks):
            mean, std = exc.mean[block][r], exc.std[block][r]
            channels = np.arange(mean.size)
            ax.plot(channels, mean, lw=0.9, color=color, label="mean")
            ax.fill_between(channels, mean - std, mean + std, color=color, alpha=0.3, lw=0,
                            label="± 1 std over images")
            _channel_axes(ax, block, channels.size)
        _hide_spare_and_legend(fig, axes, len(blocks))
        n = int(exc.counts[r])
        fig.suptitle(title or f"Excitation over the {n} images of class {cls} ({_run_name(exc)})")
    return fig


def _run_name(exc: load.Excitations) -> str:
    d = exc.run_dir
    return f"{d.parent.parent.name} / {d.parent.name} / {d.name}"


def excitation_run(results_dir: str | Path, done: pd.DataFrame,
                   sweeps: list[Sweep] | None = None) -> load.Excitations | None:
    """The run Fig. 6/7 show: the paper's standard SE block (r=16, avg squeeze, sigmoid, standard
    position, all stages) from the lowest-numbered table that has one with excitations, lowest seed;
    failing that, any completed run with SE blocks."""
    sweeps = sweeps if sweeps is not None else all_sweeps()
    standard = [(s.name, x.label) for s in sweeps for x in s.settings if x.se == SESpec()]
    rank = {key: i for i, key in enumerate(standard)}
    order = done.assign(_rank=[rank.get((a, b), len(rank)) for a, b in zip(done["sweep"], done["setting"])])
    for _, row in order.sort_values(["_rank", "sweep", "setting", "seed"], kind="stable").iterrows():
        exc = load.read_excitations(load.locate_run_dir(results_dir, row))
        if exc is not None and exc.blocks:
            return exc
    return None


# --------------------------------------------------------------------------------------------------
# Training curves (paper Fig. 4 style)


def curve_pair(sweep: Sweep) -> tuple[str, str] | None:
    """(baseline label, standard-SE label) when the sweep has both a no-SE row and the standard SE row."""
    base = next((s.label for s in sweep.settings if s.se is None), None)
    se = next((s.label for s in sweep.settings if s.se == SESpec()), None)
    return (base, se) if base and se else None


def curves_frame(results_dir: str | Path, done: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Long-form per-epoch metrics of the given settings' completed runs (one row per run x epoch)."""
    parts = []
    for _, row in done[done["setting"].isin(labels)].iterrows():
        m = load.read_metrics(load.locate_run_dir(results_dir, row))
        if m is not None and len(m):
            parts.append(m.assign(setting=row["setting"], seed=int(row["seed"])))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def training_curves(curves: pd.DataFrame, baseline: str, se: str, title: str = "") -> Figure:
    """Loss (train dashed, validation solid) and validation top-1 error per epoch, mean +- std over seeds."""
    order = [baseline, se]
    colors = dict(zip(order, sns.color_palette(PALETTE, 2)))
    with _style():
        fig = Figure(figsize=(11, 4.2), layout="constrained")
        ax_loss, ax_err = fig.subplots(1, 2)
        loss = curves.melt(id_vars=["setting", "seed", "epoch"], value_vars=["train_loss", "val_loss"],
                           var_name="split", value_name="loss")
        loss["split"] = loss["split"].map({"train_loss": "train", "val_loss": "validation"})
        sns.lineplot(data=loss, x="epoch", y="loss", hue="setting", hue_order=order, palette=colors,
                     style="split", style_order=["validation", "train"], errorbar="sd", ax=ax_loss)
        sns.lineplot(data=curves, x="epoch", y="top1_err", hue="setting", hue_order=order, palette=colors,
                     errorbar="sd", marker="o", markersize=4, ax=ax_err)
        for a in (ax_loss, ax_err):
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
        # Log scale: an unstable first epoch (validation loss in the hundreds) must not flatten the rest.
        ax_loss.set_yscale("log")
        ax_loss.set_title("loss")
        ax_err.set_title("validation top-1 error")
        ax_err.set_ylabel("top-1 error (%)")
        n = curves.groupby("setting")["seed"].nunique()
        fig.suptitle(title or "Training curves, mean ± std over seeds "
                     f"({baseline}: {n.get(baseline, 0)} seeds, {se}: {n.get(se, 0)} seeds)")
    return fig


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
            axes[1].set_title("paper (ImageNet, SE-ResNet-50)")
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


def _n_text(n: pd.Series) -> str:
    lo, hi = int(n.min()), int(n.max())
    return str(lo) if lo == hi else f"{lo}–{hi}"


# --------------------------------------------------------------------------------------------------
# Everything


def write_excitation_figures(results_dir: str | Path, storage: str | None, profile: str,
                             classes: list[int] | None = None, fig7_class: int | None = None,
                             ) -> dict[str, Figure]:
    """Draw and save Fig. 6 and 7 from the run `excitation_run` picks; {} when no run has excitations."""
    done = load.completed(load.load_trials(results_dir, storage, profile=profile))
    exc = excitation_run(results_dir, done)
    if exc is None:
        return {}
    out_dir = figures_dir(results_dir, profile)
    figs = {"fig6_excitations": fig6(exc, classes), "fig7_excitation_spread": fig7(exc, fig7_class)}
    for name, fig in figs.items():
        save(fig, out_dir / name)
    return figs


def write_figures(results_dir: str | Path, storage: str | None, profile: str) -> list[Path]:
    """Draw every figure the results support; return the files written (PNG and PDF)."""
    trials = load.load_trials(results_dir, storage, profile=profile)
    studies = load.load_studies(results_dir, storage, profile=profile)
    done = load.completed(trials)
    out_dir = figures_dir(results_dir, profile)
    written: list[Path] = []

    for name in write_excitation_figures(results_dir, storage, profile):
        written += [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for sweep in all_sweeps():
        mine = done[done["sweep"] == sweep.name]
        if mine.empty:
            continue
        table = build_table(trials, sweep, profile, studies.get((sweep.name, profile)))
        written += save(table_plot(table), out_dir / f"{table.stem}_top1")
        pair = curve_pair(sweep)
        curves = curves_frame(results_dir, mine, list(pair)) if pair else pd.DataFrame()
        if pair and not curves.empty:
            written += save(training_curves(curves, *pair), out_dir / f"fig4_training_{sweep.name}")
    return written
