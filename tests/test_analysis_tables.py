"""Loading results (storage + run dirs) and the paper tables built from them, on a fixture results dir."""

from __future__ import annotations

import html
import io
import math
import shutil

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from helpers import PROFILE, RATIO, make_results, top1, top5
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from ablations.cli import main
from ablations.paper import published_row
from ablations.spec import load_sweep
from analysis import load, stats
from analysis.render import render
from analysis.table_files import sweep_summary, write_all_tables, write_table
from analysis.tables import build_table, load_table, profile_facts

# The seeds each Table 10 setting completed in the fixture (r=8 seed 2 runs, r=32 seed 2 failed).
RATIO_SEEDS = {label: [0, 1] if label in ("r=8", "r=32") else [0, 1, 2] for label in RATIO}
TOP1_COLUMNS = ["d_top1", "d_top1_ci_low", "d_top1_ci_high", "p_top1", "p_top1_adj", "mde_top1", "verdict"]


def fixture_errors(label: str, metric=top1) -> dict[int, float]:
    return {k: metric(RATIO[label], k) for k in RATIO_SEEDS[label]}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return make_results(tmp_path_factory.mktemp("results"))


def test_one_row_per_trial_from_storage_and_run_dirs(results):
    df = load.load_trials(results)
    ratio = df[df["sweep"] == "ratio"]
    assert (ratio["source"] == "storage").all()
    assert len(ratio) == 6 * 3 + 1  # r=4 seed 1 has a FAIL and its COMPLETE retry; r=32 seed 2 only a FAIL
    assert ratio["state"].value_counts().to_dict() == {"COMPLETE": 16, "FAIL": 2, "RUNNING": 1}
    squeeze = df[df["sweep"] == "squeeze"]  # no study: the run dirs alone
    assert (squeeze["source"] == "run_dir").all() and len(squeeze) == 5
    row = df[(df["setting"] == "r=16") & (df["seed"] == 1)].iloc[0]
    assert row["top1_err"] == pytest.approx(top1(RATIO["r=16"], 1)) and row["params_m"] == 0.38
    assert row["gflops"] == 0.0123 and row["images_per_s"] == 1010 and row["run_dir"].endswith("seed1")


def test_completed_counts_the_retry_once(results):
    done = load.completed(load.load_trials(results, sweep="ratio"))
    assert len(done) == 16
    assert done.duplicated(list(load.KEY)).sum() == 0
    r4 = done[(done["setting"] == "r=4") & (done["seed"] == 1)]
    assert len(r4) == 1 and r4["state"].iloc[0] == "COMPLETE"


def test_missing_sqlite_storage_is_not_created(tmp_path):
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    assert load.load_trials(tmp_path, url).empty
    assert not (tmp_path / "elsewhere.db").exists()


def test_waiting_trial_keeps_its_grid_point(tmp_path):
    study = optuna.create_study(study_name="ratio-quick", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study.set_user_attr("sweep", "ratio")
    study.set_user_attr("profile", "quick")
    study.enqueue_trial({"setting": "r=2", "seed": 1})
    df = load.load_trials(tmp_path)
    assert df[["setting", "seed", "state"]].values.tolist() == [["r=2", 1, "WAITING"]]
    table = load_table(tmp_path, None, load_sweep("ratio"), "quick")
    assert any(m.setting == "r=2" and m.seed == 1 and m.why == "WAITING" for m in table.missing)


def test_table10_rows_in_paper_order_with_stats_and_paper_numbers(results):
    table = load_table(results, None, load_sweep("ratio"), PROFILE)
    rows = table.rows.set_index("setting")
    assert list(table.rows["setting"]) == ["r=2", "r=4", "r=8", "r=16", "r=32", "original"]
    assert list(table.rows["n"]) == [3, 3, 2, 3, 2, 3]
    r16 = list(fixture_errors("r=16").values())
    assert rows.loc["r=16", "top1_mean"] == pytest.approx(np.mean(r16))
    assert rows.loc["r=16", "top1_std"] == pytest.approx(np.std(r16, ddof=1))
    original = list(fixture_errors("original").values())
    assert rows.loc["r=16", "d_top1"] == pytest.approx(np.mean(r16) - np.mean(original))
    assert bool(rows.loc["original", "reference"]) and math.isnan(rows.loc["original", "d_top1"])
    assert rows.loc["original", "verdict"] == "reference"
    for label in RATIO:
        paper = published_row(10, label)
        assert rows.loc[label, "paper_top1"] == paper["top1_err"]
        assert rows.loc[label, "paper_params_m"] == paper["params_m"]


def test_table10_csv_reproduced_with_scipy_and_statsmodels(results):
    trials = load.load_trials(results)
    attrs = load.load_studies(results)[("ratio", PROFILE)]
    table = build_table(trials, load_sweep("ratio"), PROFILE, attrs)
    csv = pd.read_csv(io.StringIO(render(table, "csv"))).set_index("setting")
    ref = fixture_errors("original")
    labels = [label for label in RATIO if label != "original"]
    expected = {}
    for label in labels:
        row = fixture_errors(label)
        a = np.array([row[k] for k in row if k in ref])  # pairs: the seeds both completed
        b = np.array([ref[k] for k in row if k in ref])
        test = sps.ttest_rel(a, b)
        ci = test.confidence_interval(0.95)
        power = TTestPower().solve_power(nobs=len(a), alpha=0.05, power=0.8, alternative="two-sided")
        expected[label] = {"d_top1": np.mean(a - b), "d_top1_ci_low": ci.low, "d_top1_ci_high": ci.high,
                           "p_top1": test.pvalue, "mde_top1": power * np.std(a - b, ddof=1)}
    adjusted = multipletests([expected[label]["p_top1"] for label in labels], method="holm")[1]
    for label, p_adj in zip(labels, adjusted):
        for col, value in {**expected[label], "p_top1_adj": p_adj}.items():
            assert csv.loc[label, col] == pytest.approx(value, rel=1e-5), (label, col)
        d = expected[label]["d_top1"]
        want = "no detected difference" if p_adj >= 0.05 else ("better" if d < 0 else "worse")
        assert csv.loc[label, "verdict"] == want, label
    assert csv.loc["original", "verdict"] == "reference" and csv.loc["original", TOP1_COLUMNS[:-1]].isna().all()
    # The fixture is built to exercise both sides of the rule, and Holm's part in it.
    assert set(csv["verdict"]) == {"better", "no detected difference", "reference"}
    assert ((csv["p_top1"] < 0.05) & (csv["p_top1_adj"] >= 0.05)).any()


def test_unpaired_flag_gives_welch_over_all_runs(results):
    trials = load.load_trials(results)
    table = build_table(trials, load_sweep("ratio"), PROFILE, paired=False)
    rows = table.rows.set_index("setting")
    ref = list(fixture_errors("original").values())
    for label in ("r=2", "r=8"):
        welch = sps.ttest_ind(list(fixture_errors(label).values()), ref, equal_var=False)
        assert rows.loc[label, "p_top1"] == pytest.approx(welch.pvalue, rel=1e-9)
        assert rows.loc[label, "d_top1_ci_low"] == pytest.approx(welch.confidence_interval().low, rel=1e-9)
    assert "Welch's unpaired t-test (n = 2–3 runs vs 3)" in render(table, "md")
    assert "paired t-test on the per-seed differences" in render(build_table(trials, load_sweep("ratio"), PROFILE),
                                                                  "md")


def test_top5_columns_only_above_ten_classes(results):
    trials = load.load_trials(results)
    sweep = load_sweep("ratio")
    ten = build_table(trials, sweep, PROFILE)  # the quick profile file: 10 classes
    assert ten.facts.num_classes == 10
    assert list(ten.rows.columns) == [
        "setting", "reference", "n", "seeds", "top1_mean", "top1_std", "top1_ci_low", "top1_ci_high",
        *TOP1_COLUMNS, "params_m", "gflops", "images_per_s", "paper_top1", "paper_params_m", "paper_gflops",
        "missing_seeds"]
    for fmt in ("md", "csv", "latex", "html", "text"):
        assert "top5" not in render(ten, fmt) and "top-5" not in render(ten, fmt), fmt

    wide = build_table(trials, sweep, PROFILE, {"profile_spec": {"backbone": {"num_classes": 1000}}})
    cols = list(wide.rows.columns)
    top5_cols = ["top5_mean", "top5_std", "top5_ci_low", "top5_ci_high", "d_top5", "d_top5_ci_low",
                 "d_top5_ci_high", "p_top5", "p_top5_adj", "mde_top5", "paper_top5"]
    assert set(top5_cols) <= set(cols) and cols.index("verdict") < cols.index("d_top5")
    rows = wide.rows.set_index("setting")
    labels = [label for label in RATIO if label != "original"]
    ref = fixture_errors("original", top5)
    raw = []
    for label in labels:
        row = fixture_errors(label, top5)
        raw.append(sps.ttest_rel([row[k] for k in row], [ref[k] for k in row]).pvalue)
    # Top-5 is its own Holm family: adjusted over the table's top-5 p's, not mixed with top-1's.
    np.testing.assert_allclose(rows.loc[labels, "p_top5"], raw, rtol=1e-9)
    np.testing.assert_allclose(rows.loc[labels, "p_top5_adj"], multipletests(raw, method="holm")[1], rtol=1e-9)
    np.testing.assert_allclose(rows.loc[labels, "p_top1_adj"], ten.rows.set_index("setting").loc[labels, "p_top1_adj"])
    assert rows.loc["r=16", "paper_top5"] == published_row(10, "r=16")["top5_err"]
    md = render(wide, "md")
    assert "Δ top-5 [95% CI]" in md and "p top-5 (Holm)" in md and "paper top-5" in md
    assert "top-5: its own family, k = 5" in md


def test_number_of_classes_sources_in_order(tmp_path):
    runs = pd.DataFrame({"run_dir": [None, str(tmp_path)]})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"backbone": {"num_classes": 100}}))
    attrs = {"profile_spec": {"backbone": {"num_classes": 7}, "comparable_tables": [10]}}
    assert profile_facts("paper", attrs, runs) == profile_facts("nosuch", attrs, runs)  # the study first
    assert profile_facts("paper", attrs, runs).num_classes == 7
    assert profile_facts("paper", attrs, runs).comparable_tables == (10,)
    paper = profile_facts("paper", None, runs)  # then the profile file
    assert paper.num_classes == 1000 and paper.comparable_tables == tuple(range(10, 17))
    assert profile_facts("quick", None, runs).num_classes == 10
    # A study from before comparable_tables existed: classes from the study, comparable from the file.
    old = profile_facts("paper", {"profile_spec": {"backbone": {"num_classes": 1000}}}, runs)
    assert old.comparable_tables == tuple(range(10, 17))
    unknown = profile_facts("nosuch", None, runs)  # then a run dir's config.yaml
    assert unknown.num_classes == 100 and unknown.comparable_tables == ()
    nothing = profile_facts("nosuch", None, runs.iloc[:1])
    assert nothing.num_classes is None and nothing.shows_top5  # unknown: top-5 is kept, not guessed away


def test_recipe_note_for_quick_not_for_paper(results):
    trials = load.load_trials(results)
    sweep = load_sweep("ratio")
    note = "The published column is ImageNet with the paper's Sec. 6 recipe; profile quick compares ranks"
    quick = build_table(trials, sweep, PROFILE)
    for fmt in ("md", "html", "latex", "text"):
        assert note in html.unescape(render(quick, fmt)), fmt
    paper = build_table(trials.assign(profile="paper"), sweep, "paper")
    assert paper.has_results and paper.recipe_note is None
    for fmt in ("md", "html", "latex", "text"):
        assert "published column is ImageNet" not in render(paper, fmt), fmt


def test_sweep_without_reference_has_no_tests(results):
    sweep = load_sweep("ratio").model_copy(update={"reference": None})
    table = build_table(load.load_trials(results), sweep, PROFILE)
    assert table.rows["d_top1"].isna().all() and table.rows["p_top1_adj"].isna().all()
    assert (table.rows["verdict"] == "").all() and table.seed_correlation() is None
    md = render(table, "md")
    assert "t-test" not in md and "| r=16 | 3 |" in md


def test_rendered_delta_ci_p_and_verdict(results):
    table = load_table(results, None, load_sweep("ratio"), PROFILE)
    r = table.rows.set_index("setting").loc["r=4"]
    cell = f"{r['d_top1']:+.2f} [{r['d_top1_ci_low']:+.2f}, {r['d_top1_ci_high']:+.2f}]"
    md = render(table, "md")
    line = next(x for x in md.splitlines() if x.startswith("| r=4 |"))
    assert cell in line and f"| {r['mde_top1']:.2f} |" in line and line.endswith(
        f"| {r['verdict']} | 480 k | 12.3 M | 1,010 | 22.25 | 35.7 M | — |")
    head = md.splitlines()[2]
    assert "| Δ top-1 [95% CI] | p | p (Holm) | MDE | verdict |" in head
    assert "paired t-test on the per-seed differences" in md and "(n = 2–3 pairs)" in md
    assert "Holm over k = 5 top-1 comparisons" in md and "80% power" in md and "alpha = 0.05" in md
    corr = stats.seed_correlation(table.per_seed(), "original")
    assert f"mean r = {corr.mean:.2f}" in md
    assert r["d_top1_ci_high"] < 0  # so every number in the cell is negative
    assert cell.replace("-", "$-$") in render(table, "latex")  # minus signs, not hyphens


def test_per_seed_frame_feeds_seed_correlation(results):
    table = load_table(results, None, load_sweep("ratio"), PROFILE)
    wide = table.per_seed()
    assert list(wide.columns) == list(RATIO) and list(wide.index) == [0, 1, 2]
    assert wide.loc[1, "r=16"] == pytest.approx(top1(RATIO["r=16"], 1)) and math.isnan(wide.loc[2, "r=8"])
    corr = table.seed_correlation()
    assert corr.reference == "original" and math.isnan(corr.correlations["r=8"])  # two seeds: no r
    expect = np.corrcoef(list(fixture_errors("r=16").values()), list(fixture_errors("original").values()))[0, 1]
    assert corr.correlations["r=16"] == pytest.approx(expect)


def test_missing_results_are_listed_not_fatal(results):
    table = load_table(results, None, load_sweep("ratio"), PROFILE)
    missing = {(m.setting, m.seed): m.why for m in table.missing}
    assert missing == {("r=8", 2): "RUNNING", ("r=32", 2): "FAIL: RuntimeError: out of memory"}
    md = render(table, "md")
    assert "missing: r=8: seed 2 (RUNNING)" in md
    assert "missing: r=32: seed 2 (FAIL: RuntimeError: out of memory)" in md
    assert table.rows.set_index("setting").loc["r=32", "missing_seeds"] == "2"


def test_table_without_any_results_lists_every_seed(results):
    table = load_table(results, None, load_sweep("stages"), PROFILE)
    assert not table.has_results and list(table.rows["n"]) == [0] * 5
    assert len(table.missing) == 5 * 3 and {m.why for m in table.missing} == {"not started"}
    for fmt in ("md", "csv", "html", "text"):
        assert "SE_Stage_3" in render(table, fmt)
    assert r"SE\_Stage\_3" in render(table, "latex")
    assert "missing: SE_All: seeds 0, 1, 2 (not started)" in render(table, "md")


def test_results_dir_alone_gives_the_same_numbers(results, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(results, copy)
    (copy / "optuna.db").unlink()
    with_db = load_table(results, None, load_sweep("ratio"), PROFILE).rows
    without = load_table(copy, None, load_sweep("ratio"), PROFILE)
    cols = ["setting", "n", "top1_mean", "top1_std", "p_top1", "p_top1_adj", "verdict", "params_m", "gflops"]
    pd.testing.assert_frame_equal(with_db[cols], without.rows[cols])
    # Without the storage nothing knows that r=8 seed 2 is running: it has not started as far as we know.
    assert {(m.setting, m.seed, m.why) for m in without.missing} == {("r=8", 2, "not started"),
                                                                    ("r=32", 2, "not started")}


def test_write_table_formats(results, tmp_path):
    table = load_table(results, None, load_sweep("ratio"), PROFILE)
    paths = write_table(table, tmp_path)
    assert sorted(p.name for p in paths) == ["table10.csv", "table10.html", "table10.md", "table10.tex"]
    assert all(p.parent == tmp_path / PROFILE / "tables" for p in paths)
    csv = pd.read_csv(tmp_path / PROFILE / "tables" / "table10.csv")
    assert list(csv["setting"]) == list(RATIO) and list(csv["n"]) == [3, 3, 2, 3, 2, 3]
    assert csv["paper_top1"].tolist() == [published_row(10, s)["top1_err"] for s in RATIO]
    tex = (tmp_path / PROFILE / "tables" / "table10.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and "r=16" in tex and "±" not in tex
    html = (tmp_path / PROFILE / "tables" / "table10.html").read_text()
    assert html.count("<tr") == 7 and "r=32" in html and "RuntimeError" in html
    md = (tmp_path / PROFILE / "tables" / "table10.md").read_text()
    assert md.count("\n| ") == 7  # header + six rows
    assert not list((tmp_path / PROFILE / "tables").glob(".*.tmp"))  # atomic writes left no temp files


def test_write_all_tables_skips_tables_without_results(results, tmp_path):
    shutil.copytree(results, tmp_path / "r")
    written = write_all_tables(tmp_path / "r", None, PROFILE)
    assert [t.stem for t in written] == ["table10", "table11"]
    assert sorted(p.name for p in (tmp_path / "r" / PROFILE / "tables").glob("*.csv")) == [
        "table10.csv", "table11.csv"]


def test_sweep_summary_prints_and_writes(results, tmp_path):
    shutil.copytree(results, tmp_path / "r")
    text = sweep_summary(tmp_path / "r", None, load_sweep("ratio"), PROFILE)
    lines = text.splitlines()
    assert lines[0] == "Table 10 (ratio, profile quick)"
    row = next(x for x in lines if x.split()[:1] == ["r=16"])
    r16 = list(fixture_errors("r=16").values())
    assert f"{np.mean(r16):.2f} ± {np.std(r16, ddof=1):.2f}" in row and "22.28" in row and "28.1" in row
    assert "380 k" in row and row.split()[-1] == "—" and "no detected difference" not in row
    assert "missing: r=32: seed 2" in text
    out = tmp_path / "r" / PROFILE / "ratio"
    assert (out / "table.md").read_text() == render(load_table(results, None, load_sweep("ratio"), PROFILE), "md")
    assert list(pd.read_csv(out / "table.csv")["setting"]) == list(RATIO)


def test_cli_table_prints_each_format(results, capsys):
    for fmt, marker in (("md", "| r=16 | 3 |"), ("csv", "r=16,False,3"), ("latex", r"\toprule"),
                        ("html", "<table")):
        assert main(["table", "ratio", "--results-dir", str(results), "--format", fmt]) == 0
        assert marker in capsys.readouterr().out


def test_cli_bad_input_is_a_spec_error(results, tmp_path, capsys):
    assert main(["table", "no-such-sweep", "--results-dir", str(results)]) == 2
    assert "unknown sweep" in capsys.readouterr().err
    assert main(["tables", "--results-dir", str(tmp_path / "nope")]) == 2
    assert "no such results directory" in capsys.readouterr().err
    assert main(["tables", "--results-dir", str(tmp_path)]) == 2  # exists, but nothing ran
    assert "not a results directory (no optuna.db and no run directories" in capsys.readouterr().err


def test_cli_tables_writes_files(results, tmp_path, capsys):
    shutil.copytree(results, tmp_path / "r")
    assert main(["tables", "--results-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "table10" in out and "(2 seeds missing)" in out and "(1 seed missing)" in out
    assert (tmp_path / "r" / PROFILE / "tables" / "table11.tex").is_file()


def test_csv_round_trips_numbers(results):
    table = load_table(results, None, load_sweep("ratio"), PROFILE)
    back = pd.read_csv(io.StringIO(render(table, "csv")))
    assert back["top1_ci_low"].tolist() == pytest.approx(table.rows["top1_ci_low"].tolist(), rel=1e-5)


def _study(path, name="ratio-quick"):
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{path / 'optuna.db'}")
    study.set_user_attr("sweep", name.split("-")[0])
    study.set_user_attr("profile", "quick")
    return study


def _dist(labels=tuple(RATIO), seeds: int = 2):
    return {"setting": optuna.distributions.CategoricalDistribution(list(labels)),
            "seed": optuna.distributions.IntDistribution(0, seeds)}


def test_storage_trial_with_only_the_objective_takes_its_record_from_final_json(results, tmp_path):
    """A storage that recorded only the objective still gives full rows: the run dir's record, whole."""
    copy = tmp_path / "r"
    shutil.copytree(results / PROFILE, copy / PROFILE)
    _study(copy).add_trial(optuna.trial.create_trial(
        value=99.0, params={"setting": "r=2", "seed": 0}, distributions=_dist()))
    _study(copy, "squeeze-quick").add_trial(optuna.trial.create_trial(  # and one without a run dir
        value=42.0, params={"setting": "avg", "seed": 7}, distributions=_dist(["avg", "max"], 7)))
    rows = load.load_trials(copy)
    row = rows.query("setting == 'r=2' and seed == 0").iloc[0]
    assert row["source"] == "storage" and row["top1_err"] == pytest.approx(top1(RATIO["r=2"], 0))
    assert row["top5_err"] == pytest.approx(top5(RATIO["r=2"], 0)) and row["params_m"] == 0.61
    alone = rows.query("setting == 'avg' and seed == 7").iloc[0]
    assert alone["top1_err"] == 42.0 and math.isnan(alone["top5_err"])  # the objective is all there is


def test_finished_run_whose_trial_was_declared_lost_still_counts(results, tmp_path):
    """final.json exists but the storage says FAIL (the worker was declared dead as it finished)."""
    copy = tmp_path / "r"
    shutil.copytree(results / PROFILE, copy / PROFILE)
    _study(copy).add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL, params={"setting": "r=2", "seed": 0}, distributions=_dist(),
        user_attrs={"fail_reason": "heartbeat lost"}))
    df = load.load_trials(copy, sweep="ratio")
    r2 = df.query("setting == 'r=2' and seed == 0")
    assert sorted(zip(r2["state"], r2["source"])) == [("COMPLETE", "run_dir"), ("FAIL", "storage")]
    table = load_table(copy, None, load_sweep("ratio"), PROFILE)
    assert table.rows.set_index("setting").loc["r=2", "n"] == 3
