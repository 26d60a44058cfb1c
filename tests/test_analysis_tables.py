"""Loading results (storage + run dirs) and the paper tables built from them, on a fixture results dir."""

from __future__ import annotations

import io
import math
import shutil

import optuna
import pandas as pd
import pytest
from analysis_fixtures import PROFILE, RATIO, make_results, top1, top5

from ablations.cli import main
from ablations.paper import published_row
from ablations.spec import load_sweep
from analysis import load
from analysis.render import render
from analysis.tables import load_table, sweep_summary, write_all_tables, write_table


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
    assert load.resolve_storage(tmp_path, None) is None
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
    base = RATIO["r=16"]
    assert rows.loc["r=16", "top1_mean"] == pytest.approx(top1(base, 1))  # seeds +0, +0.1, +0.2
    assert rows.loc["r=16", "top1_std"] == pytest.approx(0.1)
    assert rows.loc["r=16", "top5_mean"] == pytest.approx(top5(base, 1))
    assert rows.loc["r=16", "d_top1"] == pytest.approx(base - RATIO["original"])
    assert 0 < rows.loc["r=16", "p_top1"] < 0.01
    assert bool(rows.loc["original", "reference"]) and math.isnan(rows.loc["original", "d_top1"])
    for label in RATIO:
        paper = published_row(10, label)
        assert rows.loc[label, "paper_top1"] == paper["top1_err"]
        assert rows.loc[label, "paper_params_m"] == paper["params_m"]


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
    cols = ["setting", "n", "top1_mean", "top1_std", "p_top1", "top5_mean", "params_m", "gflops"]
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
    assert "2.40 ± 0.10" in row and "22.28" in row and "28.1" in row and "0.38" in row
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
    study.set_user_attr("sweep", "ratio")
    study.set_user_attr("profile", "quick")
    return study


def _dist():
    return {"setting": optuna.distributions.CategoricalDistribution(list(RATIO)),
            "seed": optuna.distributions.IntDistribution(0, 2)}


def test_storage_trial_with_only_the_objective_takes_metrics_from_final_json(results, tmp_path):
    """A storage that recorded only the objective still gives full rows from the run dirs."""
    copy = tmp_path / "r"
    shutil.copytree(results / PROFILE, copy / PROFILE)
    _study(copy).add_trial(optuna.trial.create_trial(
        value=99.0, params={"setting": "r=2", "seed": 0}, distributions=_dist()))
    row = load.load_trials(copy, sweep="ratio").query("setting == 'r=2' and seed == 0").iloc[0]
    assert row["source"] == "storage" and row["top1_err"] == 99.0  # the storage's objective stands
    assert row["top5_err"] == pytest.approx(top5(RATIO["r=2"], 0)) and row["params_m"] == 0.61


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
