"""Figures plot exactly the stored data, and their files decode as images of the expected size."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from analysis_fixtures import PROFILE, RATIO, make_results  # noqa: E402
from PIL import Image  # noqa: E402

from ablations.spec import load_sweep  # noqa: E402
from analysis import figures, load  # noqa: E402
from analysis.tables import load_table  # noqa: E402

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
    assert figures.select_blocks(resnet50) == PAPER_BLOCKS
    resnet18 = [f"SE_{s}_{j}" for s in (2, 3, 4, 5) for j in (1, 2)]
    assert figures.select_blocks(resnet18) == ["SE_2_2", "SE_3_2", "SE_4_2", "SE_5_1", "SE_5_2"]
    assert figures.select_blocks(["SE_3_1", "SE_3_2", "SE_3_3"]) == ["SE_3_3"]  # SE in one stage only
    assert figures.select_blocks([]) == []


def test_fig6_plots_the_stored_class_means_and_the_weighted_average(exc):
    assert exc.blocks[0] == "SE_2_1" and len(exc.blocks) == 16
    fig = figures.fig6(exc, classes=[0, 3, 9])
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


def test_fig7_band_is_mean_plus_minus_std_of_one_class(exc):
    fig = figures.fig7(exc, cls=4)
    for block, ax in _panels(fig).items():
        (line,) = ax.lines
        np.testing.assert_array_equal(line.get_ydata(), exc.mean[block][4])
        band = ax.collections[0].get_paths()[0].vertices
        # The band polygon visits every channel twice (both edges); its extremes there are the edges.
        for ch in range(exc.mean[block].shape[1]):
            ys = band[band[:, 0] == ch, 1]
            assert ys.max() == pytest.approx(exc.mean[block][4, ch] + exc.std[block][4, ch], rel=1e-6)
            assert ys.min() == pytest.approx(exc.mean[block][4, ch] - exc.std[block][4, ch], rel=1e-6)
    assert "class 4" in fig.get_suptitle()


def test_excitation_run_prefers_the_standard_se_setting(results):
    done = load.completed(load.load_trials(results, profile=PROFILE))
    chosen = figures.excitation_run(results, done)
    assert chosen.run_dir.parts[-2:] == ("r=16", "seed0")
    without_se = done[done["setting"] == "original"]
    assert figures.excitation_run(results, without_se) is None  # empty "blocks": nothing to draw


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


def test_training_curves_average_the_seeds(results):
    done = load.completed(load.load_trials(results, profile=PROFILE))
    pair = figures.curve_pair(load_sweep("ratio"))
    assert pair == ("original", "r=16")
    curves = figures.curves_frame(results, done, list(pair))
    fig = figures.training_curves(curves, *pair)
    err_ax = fig.axes[1]
    import seaborn as sns
    from matplotlib.colors import to_rgb

    se_color = sns.color_palette(figures.PALETTE, 2)[1]  # hue order: baseline, SE
    drawn = [ln for ln in err_ax.lines if len(ln.get_xdata())]  # seaborn's legend proxies are empty
    assert len(drawn) == 2
    line = next(ln for ln in drawn if np.allclose(to_rgb(ln.get_color()), se_color))
    expected = curves[curves["setting"] == "r=16"].groupby("epoch")["top1_err"].mean()
    np.testing.assert_allclose(line.get_ydata(), expected.to_numpy())


def test_written_files_decode_at_the_expected_size(results, tmp_path):
    import shutil

    shutil.copytree(results, tmp_path / "r")
    written = figures.write_figures(tmp_path / "r", None, PROFILE)
    names = sorted(p.name for p in written)
    assert {"fig6_excitations.png", "fig7_excitation_spread.pdf", "table10_top1.png", "table11_top1.png",
            "fig4_training_ratio.png"} <= set(names)
    assert not any(n.startswith("table13") for n in names)  # no results, no plot
    fig = figures.fig6(load.read_excitations(tmp_path / "r" / PROFILE / "ratio" / "r=16" / "seed0"))
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
