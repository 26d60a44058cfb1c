"""Figures plot exactly the stored data, and their files decode as images of the expected size."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import seaborn as sns  # noqa: E402
from helpers import PROFILE, RATIO, make_results  # noqa: E402
from PIL import Image  # noqa: E402

from ablations.cli import main  # noqa: E402
from ablations.spec import load_sweep  # noqa: E402
from analysis import excitations, figures, load  # noqa: E402
from analysis.tables import build_table, load_table  # noqa: E402

PAPER_BLOCKS = ["SE_2_3", "SE_3_4", "SE_4_6", "SE_5_1", "SE_5_2", "SE_5_3"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return make_results(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def exc(results):
    return load.read_excitations(results / PROFILE / "ratio" / "r=16" / "seed0")


def _panels(fig):
    return {ax.get_title().split()[0]: ax for ax in fig.axes if ax.get_visible() and ax.get_title()}


def test_block_rule_gives_the_papers_blocks_on_resnet50():
    resnet50 = [f"SE_{s}_{j}" for s, n in {2: 3, 3: 4, 4: 6, 5: 3}.items() for j in range(1, n + 1)]
    assert excitations.select_blocks(resnet50) == PAPER_BLOCKS
    resnet18 = [f"SE_{s}_{j}" for s in (2, 3, 4, 5) for j in (1, 2)]
    assert excitations.select_blocks(resnet18) == ["SE_2_2", "SE_3_2", "SE_4_2", "SE_5_1", "SE_5_2"]
    assert excitations.select_blocks(["SE_3_1", "SE_3_2", "SE_3_3"]) == ["SE_3_3"]  # SE in one stage only
    assert excitations.select_blocks([]) == []


def test_fig6_plots_the_stored_class_means_and_the_weighted_average(exc):
    assert exc.blocks[0] == "SE_2_1" and len(exc.blocks) == 16
    fig = figures.fig6(exc, classes=[0, 3, 9], channels="all")
    panels = _panels(fig)
    assert list(panels) == PAPER_BLOCKS
    for block, ax in panels.items():
        lines = {line.get_label(): line for line in ax.lines}
        assert list(lines) == ["class 0", "class 3", "class 9", "all classes"]
        for cls in (0, 3, 9):
            np.testing.assert_array_equal(lines[f"class {cls}"].get_ydata(), exc.mean[block][cls])
            np.testing.assert_array_equal(lines[f"class {cls}"].get_xdata(), np.arange(exc.mean[block].shape[1]))
        by_hand = (exc.mean[block] * exc.counts[:, None]).sum(0) / exc.counts.sum()
        np.testing.assert_allclose(lines["all classes"].get_ydata(), by_hand, rtol=1e-12)
    # The unweighted mean is different (unequal class counts), so the test above can tell them apart.
    assert not np.allclose(exc.mean["SE_5_3"].mean(0), lines["all classes"].get_ydata())


def test_fig7_band_is_mean_plus_minus_std_of_one_class_on_fig6s_channels(exc):
    fig = figures.fig7(exc, cls=4)
    fig6_x = {b: ax.lines[0].get_xdata() for b, ax in _panels(figures.fig6(exc)).items()}
    for block, ax in _panels(fig).items():
        (line,) = ax.lines
        shown = line.get_xdata()
        np.testing.assert_array_equal(shown, fig6_x[block])
        np.testing.assert_array_equal(line.get_ydata(), exc.mean[block][4, shown])
        band = ax.collections[0].get_paths()[0].vertices
        # The band polygon visits every channel twice (both edges); its extremes there are the edges.
        for ch in shown:
            ys = band[band[:, 0] == ch, 1]
            assert ys.max() == pytest.approx(exc.mean[block][4, ch] + exc.std[block][4, ch], rel=1e-6)
            assert ys.min() == pytest.approx(exc.mean[block][4, ch] - exc.std[block][4, ch], rel=1e-6)
    assert "class 4" in fig.get_suptitle()


def test_excitation_run_prefers_the_standard_se_setting(results):
    done = load.completed(load.load_trials(results, profile=PROFILE))
    chosen = excitations.excitation_run(results, done)
    assert chosen.run_dir.parts[-2:] == ("r=16", "seed0")
    runs = excitations.excitation_runs(results, done)
    assert sorted(runs) == [0, 1, 2]  # every seed of that setting, for the class-specificity figure
    assert all(e.run_dir.parts[-2:] == ("r=16", f"seed{k}") for k, e in runs.items())
    assert sorted(excitations.excitation_runs(results, done, setting="r=32")) == [0, 1]  # seed 2 failed
    without_se = done[done["setting"] == "original"]
    assert excitations.excitation_run(results, without_se) is None  # empty "blocks": nothing to draw
    assert excitations.excitation_runs(results, done, sweep="squeeze") == {}  # no excitations.npz


def test_table_plot_shows_table_means_and_paper_values(results):
    table = load_table(results, None, load_sweep("ratio"), PROFILE)
    fig = figures.table_plot(table)
    ours, paper = fig.axes
    means = ours.collections[-1].get_offsets()[:, 1]  # the mean markers are drawn last
    np.testing.assert_allclose(means, table.rows["top1_mean"])
    seeds = ours.collections[0].get_offsets()[:, 1]
    assert sorted(seeds) == pytest.approx(sorted(table.runs["top1_err"]))
    np.testing.assert_allclose(paper.collections[0].get_offsets()[:, 1], table.rows["paper_top1"])
    assert [t.get_text().split("\n")[0] for t in ours.get_xticklabels()] == list(RATIO)


def test_table_plot_of_a_sweep_with_its_own_sources_says_so():
    table = build_table(pd.DataFrame(columns=list(load.COLUMNS)), load_sweep("attention"), PROFILE)
    _, published = figures.table_plot(table).axes
    assert published.get_title() == "published (ImageNet, each row's source)"
    np.testing.assert_allclose(published.collections[0].get_offsets()[:, 1],
                               table.rows["paper_top1"], equal_nan=True)  # ECA-Net's 22.52 among them


def test_training_curves_show_every_row_each_seed_and_their_mean_in_valid_ranges(results):
    from matplotlib.colors import to_rgb

    from analysis import curves

    done = load.completed(load.load_trials(results, profile=PROFILE))
    rows = curves.curve_settings(load_sweep("ratio"))
    assert rows == list(RATIO)  # every row, not only r=16 vs original
    frame = curves.curves_frame(results, done, rows)
    fig = curves.training_curves(frame, rows)
    loss_ax, val_ax, err_ax, lr_ax = fig.axes[:4]
    assert [a.get_title() for a in (loss_ax, val_ax, err_ax, lr_ax)] == [
        "training loss", "validation loss", "validation top-1 error (%)", "learning rate"]
    drawn = [ln for ln in err_ax.lines if len(ln.get_xdata())]
    runs = done[done["setting"].isin(rows)]
    assert len(drawn) == len(runs) + len(rows)  # a thin line per seed, a thick mean per row
    se_color = sns.color_palette(curves.PALETTE, len(rows))[rows.index("r=16")]
    thick = [ln for ln in drawn if ln.get_linewidth() > 2 and np.allclose(to_rgb(ln.get_color()), se_color)]
    expected = frame[frame["setting"] == "r=16"].groupby("epoch")["top1_err"].mean()
    np.testing.assert_allclose(thick[0].get_ydata(), expected.to_numpy())
    low, high = err_ax.get_ylim()
    assert low == 0 and high <= 100


def test_an_outlying_first_epoch_is_named_not_drawn_on_the_loss_scale():
    from analysis import curves

    rows = [{"setting": "a", "seed": s, "epoch": e, "train_loss": 2.0 / e, "lr": 0.1, "top1_err": 90.0 / e,
             "val_loss": 1e4 if e == 1 else 1.0 / e} for s in (0, 1) for e in (1, 2, 3, 4)]
    fig = curves.training_curves(pd.DataFrame(rows))
    val_ax = fig.axes[1]
    assert val_ax.get_ylim()[1] < 10  # epoch 1's 10^4 would flatten the rest
    assert any("epoch 1 off-scale" in t.get_text() for t in val_ax.texts)


def test_table_edf_steps_through_each_rows_seeds(results):
    table = load_table(results, None, load_sweep("ratio"), PROFILE)
    ax = figures.table_edf(table).axes[0]
    assert len([ln for ln in ax.lines if len(ln.get_xdata())]) == len(table.rows)
    assert ax.get_xlabel() == "top-1 error (%)"


def test_fig6_class_colours_stay_apart_for_colour_blind_readers():
    styles = figures.class_styles(4)
    assert len({c for c, _, _ in styles}) == 4 and len({ls for _, ls, _ in styles}) == 4
    palette = sns.color_palette(figures.PALETTE, 10)
    assert not ({palette[2], palette[3]} <= {c for c, _, _ in styles})  # green with vermilion: the hard pair


@pytest.mark.slow
def test_written_files_decode_at_the_expected_size(results, tmp_path, capsys):
    import shutil

    shutil.copytree(results, tmp_path / "r")
    assert main(["figures", "--results-dir", str(tmp_path / "r"), "--profile", PROFILE, "--channels", "8"]) == 0
    written = [Path(line) for line in capsys.readouterr().out.splitlines()]
    names = sorted(p.name for p in written)
    assert {"fig6_excitations.png", "fig7_excitation_spread.pdf", "fig_class_specificity.png",
            "fig_class_specificity.pdf", "table10_top1.png", "table11_top1.png",
            "fig4_training_ratio.png"} <= set(names)
    assert not any(n.startswith("table13") for n in names)  # no results, no plot
    # --channels reached Fig. 6: the file is exactly the figure drawn with 8 channels, not with 50.
    exc = load.read_excitations(tmp_path / "r" / PROFILE / "ratio" / "r=16" / "seed0")
    png = (tmp_path / "r" / PROFILE / "figures" / "fig6_excitations.png").read_bytes()
    figures.save(figures.fig6(exc, channels=8), tmp_path / "eight")
    figures.save(figures.fig6(exc), tmp_path / "fifty")
    assert png == (tmp_path / "eight.png").read_bytes() != (tmp_path / "fifty.png").read_bytes()
    fig = figures.fig6(exc, channels=8)
    w, h = (fig.get_size_inches() * figures.DPI).round().astype(int)
    with Image.open(tmp_path / "r" / PROFILE / "figures" / "fig6_excitations.png") as img:
        img.load()
        assert img.format == "PNG" and img.size == (w, h)
        assert np.asarray(img.convert("L")).std() > 10  # not a blank canvas
    for p in written:
        if p.suffix == ".pdf":
            assert p.read_bytes()[:5] == b"%PDF-"
        else:
            with Image.open(p) as img:
                assert img.size[0] > 600 and img.size[1] > 300


@pytest.mark.parametrize("value", ["0", "-3", "many", "1.5"])
def test_bad_channels_option_is_one_line_and_creates_nothing(results, tmp_path, capsys, value):
    import shutil

    shutil.copytree(results, tmp_path / "r")
    code = main(["figures", "--results-dir", str(tmp_path / "r"), "--profile", PROFILE, f"--channels={value}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"error: --channels: {value}: expected a positive number of channels or 'all'"
    assert not (tmp_path / "r" / PROFILE / "figures").exists()


# --------------------------------------------------------------------------------------------------
# Fig. 6's channel sample


def _exc(blocks: dict[str, np.ndarray], counts=None) -> load.Excitations:
    """Excitations built by hand: {block: [classes x channels] class means}; std is irrelevant here."""
    n_classes = next(iter(blocks.values())).shape[0]
    return load.Excitations(run_dir=Path("hand") / "made" / "seed0", blocks=list(blocks),
                            classes=np.arange(n_classes),
                            counts=np.asarray(counts if counts is not None else [1] * n_classes),
                            mean={b: np.asarray(m, dtype=float) for b, m in blocks.items()},
                            std={b: np.zeros_like(m, dtype=float) for b, m in blocks.items()})


def test_channel_sample_is_50_distinct_sorted_seeded_indices():
    a = excitations.sample_channels(256)
    assert a.size == 50 and np.unique(a).size == 50 and (np.diff(a) > 0).all()
    assert a.min() >= 0 and a.max() < 256
    np.testing.assert_array_equal(a, excitations.sample_channels(256))  # deterministic
    assert not np.array_equal(a, excitations.sample_channels(256, seed=1))  # the seed decides it
    assert not np.array_equal(a, np.arange(50))  # sampled over the block, not its first 50
    np.testing.assert_array_equal(excitations.sample_channels(256, "all"), np.arange(256))
    np.testing.assert_array_equal(excitations.sample_channels(16), np.arange(16))
    assert excitations.sample_channels(256, "12").size == 12
    for bad in (0, -1, "abc", "1.5", True, 2.0):
        with pytest.raises(ValueError, match="positive number of channels or 'all'"):
            excitations.sample_channels(256, bad)


def test_fig6_shows_the_same_50_sampled_channels_for_every_class(exc):
    fig = figures.fig6(exc, classes=[0, 3, 9])
    again = _panels(figures.fig6(exc, classes=[0, 3, 9]))
    for block, ax in _panels(fig).items():
        n = exc.mean[block].shape[1]
        xs = [line.get_xdata() for line in ax.lines]
        assert len(xs) == 4 and all(np.array_equal(x, xs[0]) for x in xs)  # 3 classes + average
        shown = np.asarray(xs[0])
        assert shown.size == min(50, n) and np.unique(shown).size == shown.size and (np.diff(shown) > 0).all()
        np.testing.assert_array_equal(shown, again[block].lines[0].get_xdata())
        for cls, line in zip((0, 3, 9), ax.lines):
            np.testing.assert_array_equal(line.get_ydata(), exc.mean[block][cls, shown])
        by_hand = (exc.mean[block] * exc.counts[:, None]).sum(0) / exc.counts.sum()
        np.testing.assert_allclose(ax.lines[-1].get_ydata(), by_hand[shown], rtol=1e-12)
        expected = f"all {n}" if n <= 50 else f"50 of {n}, sampled"
        assert ax.get_xlabel() == f"channel index ({expected})"
    assert _panels(fig)["SE_5_1"].get_xlabel() == "channel index (50 of 256, sampled)"
    assert _panels(fig)["SE_2_3"].get_xlabel() == "channel index (all 32)"


def test_fig6_on_a_16_channel_block_shows_all_16():
    means = np.random.default_rng(3).uniform(size=(3, 16))
    fig = figures.fig6(_exc({"SE_2_1": means}))
    (ax,) = _panels(fig).values()
    for line in ax.lines:
        np.testing.assert_array_equal(line.get_xdata(), np.arange(16))
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), means[0])
    assert ax.get_xlabel() == "channel index (all 16)"


# --------------------------------------------------------------------------------------------------
# Class specificity by depth


def test_block_summary_on_hand_made_gates():
    flat = np.full((2, 4), 0.5)  # every class, every channel at 0.5: no spread, no departure
    # channel 0: classes at 1.0 and 0.0 (std 0.5); channel 1: both 0.2 (std 0); channels 2-3: both 0.95.
    specific = np.array([[1.0, 0.2, 0.95, 0.95],
                         [0.0, 0.2, 0.95, 0.95]])
    other = np.array([[0.7, 0.7, 0.7, 0.7],
                      [0.3, 0.3, 0.3, 0.3]])  # std 0.2 on every channel, |s - 0.5| = 0.2 everywhere
    summary = excitations.block_summary(_exc({"SE_3_1": specific, "SE_2_2": flat, "SE_2_1": other}))
    assert summary.columns.tolist() == ["block", "stage", "index", "departure", "class_spread", "saturated"]
    assert summary["block"].tolist() == ["SE_2_1", "SE_2_2", "SE_3_1"]  # depth order, not file order
    assert summary["stage"].tolist() == [2, 2, 3] and summary["index"].tolist() == [1, 2, 1]
    row = summary.set_index("block")
    assert row.loc["SE_2_2", ["departure", "class_spread", "saturated"]].tolist() == [0, 0, 0]
    assert row.loc["SE_3_1", "class_spread"] == pytest.approx((0.5 + 0 + 0 + 0) / 4)
    assert row.loc["SE_3_1", "departure"] == pytest.approx((0.5 + 0.3 + 0.45 + 0.45) * 2 / 8)
    assert row.loc["SE_3_1", "saturated"] == pytest.approx(5 / 8)  # 1.0 and four 0.95s of 8 gates
    assert row.loc["SE_2_1", "class_spread"] == pytest.approx(0.2)
    assert row.loc["SE_2_1", "departure"] == pytest.approx(0.2)
    assert row.loc["SE_2_1", "saturated"] == 0

    stages = excitations.stage_means(summary)
    assert stages["stage"].tolist() == [2, 3] and stages["blocks"].tolist() == [2, 1]
    assert stages.loc[0, "class_spread"] == pytest.approx((0.2 + 0) / 2)
    assert stages.loc[1, "departure"] == pytest.approx(row.loc["SE_3_1", "departure"])


def test_block_summary_keeps_network_order_for_other_names():
    m = np.array([[0.9, 0.1], [0.1, 0.9]])
    summary = excitations.block_summary(_exc({"head": m, "SE_2_1": m}))
    assert summary["block"].tolist() == ["head", "SE_2_1"]
    assert summary["stage"].isna().tolist() == [True, False]
    assert excitations.stage_means(summary)["stage"].tolist() == [2]


def _by_numpy(runs):
    """The class-specificity numbers straight from the arrays: {seed: (blocks, spread, departure)}."""
    out = {}
    for seed, e in runs.items():
        spread = [np.std(e.mean[b], axis=0).mean() for b in e.blocks]
        departure = [np.abs(e.mean[b] - 0.5).mean() for b in e.blocks]
        out[seed] = (e.blocks, np.array(spread), np.array(departure))
    return out


@pytest.mark.parametrize("seeds", [(0, 1, 2), (0, 2)])
def test_class_specificity_figure_one_line_per_seed_equal_to_numpy(results, seeds):
    done = load.completed(load.load_trials(results, profile=PROFILE))
    runs = {k: e for k, e in excitations.excitation_runs(results, done).items() if k in seeds}
    expected = _by_numpy(runs)
    fig = figures.fig_class_specificity(excitations.class_specificity(runs))
    spread_ax, departure_ax = fig.axes
    blocks = expected[seeds[0]][0]
    assert [t.get_text() for t in departure_ax.get_xticklabels()] == blocks  # SE_2_1 ... SE_5_3
    for ax, k in ((spread_ax, 1), (departure_ax, 2)):
        lines = {ln.get_label(): ln for ln in ax.lines}
        seed_lines = sorted(label for label in lines if label.startswith("seed "))
        assert seed_lines == [f"seed {s}" for s in seeds]
        for s in seeds:
            np.testing.assert_array_equal(lines[f"seed {s}"].get_xdata(), np.arange(len(blocks)))
            np.testing.assert_allclose(lines[f"seed {s}"].get_ydata(), expected[s][k], rtol=1e-12)
        mean = lines[f"mean over {len(seeds)} seeds"]
        np.testing.assert_allclose(mean.get_ydata(), np.mean([expected[s][k] for s in seeds], axis=0),
                                   rtol=1e-12)
        assert mean.get_linewidth() > 2 * lines[f"seed {seeds[0]}"].get_linewidth()  # thick vs thin
        # Stage boundaries between SE_2_3|SE_3_1, SE_3_4|SE_4_1, SE_4_6|SE_5_1 (3-4-6-3 blocks).
        bounds = [ln.get_xdata()[0] for ln in ax.lines if ln.get_label() == "_stage boundary"]
        assert bounds == [2.5, 6.5, 12.5]
    # The fixture's gates are built class-agnostic early and class-specific late, as the paper says.
    spread = np.mean([expected[s][1] for s in seeds], axis=0)
    assert spread[blocks.index("SE_2_3")] < spread[blocks.index("SE_4_6")] < spread[blocks.index("SE_5_1")]
