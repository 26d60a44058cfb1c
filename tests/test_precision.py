"""Seeds by precision: the stopping rule on hand-made trial frames, then `ablate run --precision` with
the fake trainer (helpers.fake_train): rounds until the rule stops, the cap, and kill -9 mid-loop."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
from helpers import FAKE, SETTINGS, completes_per_point, load_study, make_plans, url_of, wait_for, write_sweep
from optuna.trial import TrialState
from scipy.stats import ttest_rel
from statsmodels.stats.power import TTestPower

from ablations import cli, rounds, worker
from ablations.schema import Setting, Sweep
from ablations.spec import load_sweep
from analysis.load import COLUMNS, load_trials
from analysis.precision import decide, row_mdes

SWEEP = Sweep(name="mini", reference="original",
              settings=(Setting(label="a"), Setting(label="b"), Setting(label="original", se=None)))


def frame(errors: dict[str, list[float]], sweep: str = "mini") -> pd.DataFrame:
    """A load_trials-shaped frame of COMPLETE trials: errors[setting][seed] (NaN: no result)."""
    rows = [{"sweep": sweep, "profile": "quick", "setting": label, "seed": seed, "state": "COMPLETE",
             "top1_err": err, "datetime_complete": None, "trial_number": i}
            for i, (label, errs) in enumerate(errors.items()) for seed, err in enumerate(errs)
            if not math.isnan(err)]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def mde_by_hand(n: int, sd: float) -> float:
    return TTestPower().solve_power(effect_size=None, nobs=n, alpha=0.05, power=0.8) * sd


REF = [20.0, 21.0, 19.5, 20.5]
DIFF_A = [1.0, -0.5, 0.5, 2.0]  # per-seed differences from the reference
DIFF_B = [0.2, 0.1, 0.3, 0.0]
TRIALS = frame({"a": [r + d for r, d in zip(REF, DIFF_A)], "b": [r + d for r, d in zip(REF, DIFF_B)],
                "original": REF})
SD_A = pd.Series(DIFF_A).std(ddof=1)


# ---------------------------------------------------------------------------------------------------
# The rule


def test_row_mdes_are_paired_on_the_differences():
    a, b = row_mdes(TRIALS, SWEEP)
    assert (a.setting, a.n, b.setting, b.n) == ("a", 4, "b", 4)
    assert a.sd == pytest.approx(SD_A) and b.sd == pytest.approx(pd.Series(DIFF_B).std(ddof=1))
    assert a.mde == pytest.approx(mde_by_hand(4, SD_A), rel=1e-6)


def test_stops_when_every_mde_is_within_the_precision():
    worst = mde_by_hand(4, SD_A)
    done = decide(TRIALS, SWEEP, precision=worst * 1.01, max_seeds=20, seeds=4)
    assert done.done and done.reached and done.next_seeds == 4 and done.worst.setting == "a"
    more = decide(TRIALS, SWEEP, precision=worst * 0.99, max_seeds=20, seeds=4)
    assert not more.done and not more.reached and more.next_seeds > 4


@pytest.mark.parametrize("precision", [0.8, 1.2, 2.1])  # all below the MDE at 4 seeds (2.21)
def test_projects_the_smallest_n_for_the_widest_spread(precision):
    expected = next(n for n in range(5, 20) if mde_by_hand(n, SD_A) <= precision)  # at least seeds + 1
    assert decide(TRIALS, SWEEP, precision, max_seeds=40, seeds=4).next_seeds == expected


def test_caps_at_max_seeds():
    assert decide(TRIALS, SWEEP, precision=0.01, max_seeds=7, seeds=4).next_seeds == 7
    capped = decide(TRIALS, SWEEP, precision=0.01, max_seeds=4, seeds=4)
    assert capped.done and not capped.reached


def test_never_looks_at_the_observed_differences():
    """Same spreads, other means (one row 5 points worse, one better: p-values far apart): same decision."""
    shifted = TRIALS.copy()
    shifted.loc[shifted["setting"] == "a", "top1_err"] += 5.0
    shifted.loc[shifted["setting"] == "b", "top1_err"] -= 3.0
    for precision in (0.5, 1.0, 2.0, 5.0):
        one, other = (decide(t, SWEEP, precision, 20, 4) for t in (TRIALS, shifted))
        assert (one.next_seeds, one.reached) == (other.next_seeds, other.reached)
        assert [r.n for r in one.rows] == [r.n for r in other.rows]
        assert [r.mde for r in one.rows] == pytest.approx([r.mde for r in other.rows])

    def p_value(trials, label):
        by = trials.pivot(index="seed", columns="setting", values="top1_err")
        return ttest_rel(by[label], by["original"]).pvalue

    assert p_value(TRIALS, "a") > 0.2 and p_value(shifted, "a") < 0.01  # what the rule must not see


def test_a_row_with_fewer_than_two_pairs_needs_more_seeds():
    nan = math.nan
    trials = frame({"a": [20.0, nan, nan], "b": [21.0, 20.0, 22.0], "original": [20.0, 20.5, nan]})
    a, b = row_mdes(trials, SWEEP)
    assert a.n == 1 and math.isnan(a.mde) and b.n == 2  # pairs only where both have a result
    d = decide(trials, SWEEP, precision=100.0, max_seeds=20, seeds=3)
    assert not d.reached and d.next_seeds == 4 and d.worst.setting == "a"
    empty = decide(frame({}), SWEEP, precision=1.0, max_seeds=20, seeds=2)
    assert empty.next_seeds == 3 and not empty.reached


def test_without_a_reference_each_row_uses_its_own_spread():
    sweep = Sweep(name="mini", settings=(Setting(label="a"), Setting(label="b")))
    trials = frame({"a": [20.0, 21.0, 23.0], "b": [20.0, 20.0, 20.0]})
    a, b = row_mdes(trials, sweep)
    sd = pd.Series([20.0, 21.0, 23.0]).std(ddof=1)
    assert (a.n, a.sd) == (3, pytest.approx(sd)) and a.mde == pytest.approx(mde_by_hand(3, sd), rel=1e-6)
    assert b.n == 3 and b.sd == 0 and math.isnan(b.mde)  # zero spread: nothing known yet
    d = decide(trials, sweep, precision=100.0, max_seeds=20, seeds=3)
    assert not d.reached and d.next_seeds == 4 and d.worst.setting == "b"  # one more seed, not the cap
    other_sweep = frame({"a": [0.0, 50.0]}, sweep="other")  # another sweep's trials are ignored
    assert row_mdes(pd.concat([trials, other_sweep]), sweep) == (a, b)


# ---------------------------------------------------------------------------------------------------
# ablate run --precision (fake trainer)


@pytest.fixture
def fake(monkeypatch, fake_trainer):
    """`ablate run` trains with the fake trainer; per-seed errors have a spread of FAKE_NOISE."""
    monkeypatch.setattr(worker, "TRAINER", fake_trainer)  # what the rounds train with when not told otherwise
    monkeypatch.setenv("FAKE_NOISE", "1.0")


def rule_holds(results: Path, sweep: Path, precision: float, max_seeds: int) -> tuple[int, list[int]]:
    """The study's final seed count and rounds, after checking each round followed the rule."""
    study = load_study(results)
    seeds, record = study.user_attrs["seeds"], study.user_attrs["precision"]
    trials = load_trials(results, sweep="mini", profile="quick").astype({"seed": int})
    for now, after in zip(record["rounds"], [*record["rounds"][1:], None]):
        d = decide(trials[trials["seed"] < now], load_sweep(sweep), precision, max_seeds, now)
        assert d.next_seeds == (after or now)  # each round's count is what the rule asked for
    assert record["rounds"][-1] == seeds and (record["target"], record["max_seeds"]) == (precision, max_seeds)
    assert completes_per_point(study) == {(s["label"], k): 1 for k in range(seeds) for s in SETTINGS}
    assert (results / "quick" / "mini" / "r=8" / "seed0" / "calls.log").is_file()  # the fake trained them
    return seeds, record["rounds"]


@pytest.mark.slow
@pytest.mark.timeout(120)  # fake trials take milliseconds
def test_run_adds_rounds_until_the_precision_is_met(tmp_path, fake, capsys):
    results, sweep = tmp_path / "results", write_sweep(tmp_path, seeds=2)
    argv = ["run", str(sweep), "--results-dir", str(results), "--set", "train.epochs=1", "--precision", "3"]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    seeds, rounds_run = rule_holds(results, sweep, 3.0, 20)
    assert len(rounds_run) >= 2 and rounds_run[0] == 2 and 2 < seeds < 20
    assert "mini-quick: 2 seeds: worst MDE" in out.err and f"next round {rounds_run[1]} seeds" in out.err
    assert out.out.count("Table 10") == 1  # the last round's table only: no peeking at earlier ones
    last = out.out.strip().splitlines()[-1]
    assert last.startswith(f"mini-quick: {seeds} seeds; precision 3 reached (worst MDE ")
    assert load_study(results).user_attrs["precision"]["reached"] is True

    assert cli.main(argv) == 0  # again: nothing to train, the same verdict
    assert rule_holds(results, sweep, 3.0, 20) == (seeds, rounds_run)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"mini-quick: {seeds} seeds; precision 3 reached")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_run_stops_at_max_seeds(tmp_path, fake, capsys):
    results, sweep = tmp_path / "results", write_sweep(tmp_path, seeds=2)
    assert cli.main(["run", str(sweep), "--results-dir", str(results), "--set", "train.epochs=1",
                     "--precision", "0.01", "--max-seeds", "4"]) == 0
    seeds, rounds_run = rule_holds(results, sweep, 0.01, 4)
    assert seeds == 4 and rounds_run == [2, 4]  # the projection is beyond the cap: straight to it
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("mini-quick: 4 seeds (the cap); precision 0.01 not reached")


def _loop_in_process(plans, results: str, epoch_s: str) -> None:
    os.environ.update(FAKE_EPOCH_S=epoch_s, FAKE_NOISE="1.0")
    url = url_of(Path(results))
    raise SystemExit(rounds.run(plans, url, Path(results), ["cpu"], 1, 2.5, 20, trainer=FAKE, bars=False))


@pytest.mark.slow  # three interpreters: ~45 s on 2 busy cores
@pytest.mark.timeout(300)
def test_kill_9_mid_loop_then_rerun_completes_each_point_once_at_the_same_seeds(tmp_path, fake):
    sweep = write_sweep(tmp_path, seeds=3)
    plans = make_plans(sweep, "train.epochs=2")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_loop_in_process, args=(plans, str(whole), "0"))
    p.start()
    p.join(120)
    assert p.exitcode == 0
    expected = rule_holds(whole, sweep, 2.5, 20)

    p = ctx.Process(target=_loop_in_process, args=(plans, str(cut), "1.0"))
    p.start()
    url = url_of(cut)

    def second_round_training():
        study = load_study(url)
        if study.user_attrs["seeds"] <= 3:
            return None
        running = study.get_trials(states=(TrialState.RUNNING,))
        return [t for t in running if t.params["seed"] >= 3 and "run_dir" in t.user_attrs
                and (Path(t.user_attrs["run_dir"]) / "checkpoint.json").exists()]

    wait_for(second_round_training, 120, "a trial of the second round to be mid-way")
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert load_study(url).user_attrs["seeds"] == expected[1][1]  # the grown count is in the study

    p = ctx.Process(target=_loop_in_process, args=(plans, str(cut), "0"))
    p.start()
    p.join(120)
    assert p.exitcode == 0
    assert rule_holds(cut, sweep, 2.5, 20) == expected  # every point COMPLETE once, same rounds and seeds
    killed = [t for t in load_study(url).trials if t.state == TrialState.FAIL]
    assert killed and all("died" in t.user_attrs["fail_reason"] for t in killed)
