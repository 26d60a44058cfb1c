"""Running sweeps: studies, exactly-once grid, recovery of dead workers, workers, CLI errors.

Fast tests train with `helpers.fake_train` (the contract of ablations.train.train: resumes from a
checkpoint in its run dir, returns the final record, raises TrialFailed for a NaN loss) so they
exercise the scheduling, not the network. The `slow` tests at the end run the real trainer end to end.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import (
    FAKE,
    ROOT,
    SETTINGS,
    calls,
    completes_per_point,
    create_study,
    env,
    load_study,
    make_plans,
    url_of,
    write_sweep,
)
from optuna.trial import TrialState

from ablations import cli, devices, grid, processes, recovery, resilience, storage_url, supervisor, worker
from ablations.errors import SpecError, StorageError
from ablations.progress import Progress, study_status
from ablations.storage import grid_lock, open_storage
from ablations.trials import MAX_RETRY, fail, grid_point, pop_waiting, requeue, trial_id, trials_in

# ---------------------------------------------------------------------------------------------------
# Helpers

pytestmark = pytest.mark.usefixtures("fake_trainer")  # every FAKE_* knob unset unless a test sets it


def queued_study(tmp_path: Path, results: Path, **plan_kwargs):
    """A mini sweep's study with its whole grid queued (helpers.create_study): plan, storage, study."""
    (plan,) = plans = make_plans(write_sweep(tmp_path), **plan_kwargs)
    study = create_study(url_of(results), plans)
    return plan, open_storage(url_of(results)), study


def run_fake(tmp_path: Path, results: Path, workers: int = 1, **plan_kw) -> int:
    plans = make_plans(write_sweep(tmp_path), **plan_kw)
    return supervisor.run(plans, url_of(results), results, ["cpu"], workers, trainer=FAKE, bars=False)


def claim(results: Path, host: str, pid: int, name: str = "mini-quick"):
    """Queue the grid and claim one trial as a worker `host:pid` would; returns (storage, study, trial)."""
    storage = open_storage(url_of(results))
    study = optuna.load_study(study_name=name, storage=storage)
    with grid_lock(storage):
        trial = pop_waiting(storage, study)
    tid = trial_id(storage, study, trial.number)
    for k, v in {"host": host, "pid": pid, "worker": f"{host}:{pid}", "pid_start": None}.items():
        storage.set_trial_user_attr(tid, k, v)
    return storage, study, trial


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------------------------------------
# Validation: one line, exit 2, no study


def _cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


BAD_SWEEPS = {
    "malformed": ("settings: [ {label: a\n", "malformed YAML"),
    "unknown_key": (yaml.safe_dump({"settings": SETTINGS, "colour": "red"}), "colour: unknown key"),
    "unknown_axis_value": (yaml.safe_dump({"settings": [{"label": "x", "gate": "softmax"}]}), "gate"),
    "duplicate_labels": (yaml.safe_dump({"settings": [{"label": "a"}, {"label": "a"}]}), "duplicate labels"),
    "empty_settings": (yaml.safe_dump({"settings": []}), "settings"),
    "zero_seeds": (yaml.safe_dump({"settings": SETTINGS, "seeds": 0}), "seeds"),
    "does_not_fit": (yaml.safe_dump({"settings": [{"label": "r=512", "reduction": 512}]}), "settings[0]"),
}


@pytest.mark.parametrize("case", sorted(BAD_SWEEPS))
def test_bad_sweep_file_is_one_line_exit_2_and_no_study(case, tmp_path, results, capsys):
    text, expected = BAD_SWEEPS[case]
    sweep = tmp_path / f"{case}.yaml"
    sweep.write_text(text)
    rc, err = _cli(capsys, "run", str(sweep), "--results-dir", str(results))
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert str(sweep) in err and expected in err
    assert not (results / "optuna.db").exists()


@pytest.mark.parametrize("options, expected", [
    (["--seeds", "0"], "--seeds"),
    (["--devices", "cuda:7"], "--devices: cuda:7"),
    (["--devices", "tpu"], "--devices: tpu"),
    (["--storage", "mysql://u@localhost/x"], "unsupported backend"),
    (["--storage", "not a url"], "--storage"),
    (["--storage", "sqlite:///:memory:"], "in-memory"),
    (["--workers", "0"], "--workers"),
    (["--set", "train.nope=1"], "train.nope"),
    (["--profile", "nosuchprofile"], "nosuchprofile"),
    (["--precision", "0"], "--precision: must be a positive number of top-1 points (got '0')"),
    (["--precision", "-0.5"], "--precision: must be a positive number"),
    (["--precision", "half"], "--precision: must be a positive number of top-1 points (got 'half')"),
    (["--precision", "nan"], "--precision: must be a positive number"),
    (["--max-seeds", "5"], "--max-seeds: needs --precision"),
    (["--precision", "0.5", "--max-seeds", "1"], "--max-seeds: 1 is below the 2 seeds the run starts with "
                                                 "(mini's seeds)"),
    (["--precision", "0.5", "--seeds", "6", "--max-seeds", "5"], "--max-seeds: 5 is below the 6 seeds the run "
                                                                 "starts with (--seeds)"),
    (["--precision", "0.5", "--seeds", "21"], "--max-seeds: 20 is below the 21 seeds"),  # the default cap
    (["--precision", "0.5", "--max-seeds", "many"], "--max-seeds"),
])
def test_bad_options_are_one_line_exit_2_and_no_study(options, expected, tmp_path, results, capsys):
    rc, err = _cli(capsys, "run", str(write_sweep(tmp_path)), "--results-dir", str(results), *options)
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err
    assert not (results / "optuna.db").exists()


def test_unknown_sweep_name_is_exit_2(results, capsys):
    rc, err = _cli(capsys, "run", "nosuchsweep", "--results-dir", str(results))
    assert rc == 2 and "nosuchsweep" in err and "unknown sweep" in err


def test_storage_url_default_and_postgres_accepted(tmp_path):
    assert storage_url.resolve(tmp_path, None) == f"sqlite:///{tmp_path}/optuna.db"
    assert storage_url.resolve(tmp_path, "postgresql://u:pw@db:5432/x").startswith("postgresql+psycopg")
    assert storage_url.resolve(tmp_path, "postgresql://u:pw@db:5432/x").endswith("://u:pw@db:5432/x")


def test_unreachable_storage_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ABLATE_STORAGE_ATTEMPTS", "1")  # the backoff has tests of its own
    with pytest.raises(StorageError, match="cannot open storage"):
        open_storage(storage_url.resolve(".", "postgresql://nobody@127.0.0.1:1/none"))


def test_devices_default_to_cpu_without_gpus():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    assert devices.resolve_devices(None) == ["cpu"]
    assert devices.resolve_devices("cpu,cpu") == ["cpu", "cpu"]


# ---------------------------------------------------------------------------------------------------
# Studies and the grid


def test_study_contract_and_grid_enqueued_once(tmp_path, results):
    (plan,) = make_plans(write_sweep(tmp_path), data_root="/data/x")
    storage = open_storage(url_of(results))
    study = grid.open_study(storage, plan)
    assert study.study_name == "mini-quick" and study.direction == optuna.study.StudyDirection.MINIMIZE
    a = study.user_attrs
    assert (a["sweep"], a["profile"], a["table"], a["seeds"]) == ("mini", "quick", 10, 2)
    assert a["settings"] == ["r=16", "r=8", "original"] and a["description"] == "a tiny test sweep"
    assert a["overrides"] == ["train.epochs=3"] and a["data_root"] == "/data/x"
    with grid_lock(storage):
        assert grid.enqueue_missing(study, plan) == 6
        assert grid.enqueue_missing(study, plan) == 0  # a second run queues nothing
    trials = study.get_trials()
    assert all(t.state == TrialState.WAITING for t in trials)
    assert sorted(grid_point(t) for t in trials) == sorted(plan.grid())
    assert isinstance(trials[0].distributions["setting"], optuna.distributions.CategoricalDistribution)


def test_remote_worker_rebuilds_identical_configs_from_study_attrs(tmp_path, results):
    (plan,) = make_plans(write_sweep(tmp_path), "data.batch_size=32")
    study = grid.open_study(open_storage(url_of(results)), plan)
    rebuilt = grid.plan_from_attrs(study.study_name, load_study(results).user_attrs)
    for label, seed in plan.grid():
        assert rebuilt.config(label, seed) == plan.config(label, seed)
    assert rebuilt.config("r=8", 1).data.batch_size == 32


def test_study_with_a_different_recipe_is_refused(tmp_path, results):
    storage = open_storage(url_of(results))
    (plan,) = make_plans(write_sweep(tmp_path))
    grid.open_study(storage, plan)
    (other,) = make_plans(write_sweep(tmp_path), "train.lr=0.5")
    with pytest.raises(SpecError, match="different settings or profile"):
        grid.open_study(storage, other)


def test_study_stored_before_a_recipe_key_existed_is_the_same_recipe(tmp_path, results):
    storage = open_storage(url_of(results))
    (plan,) = make_plans(write_sweep(tmp_path))
    study = grid.open_study(storage, plan)
    old = study.user_attrs["profile_spec"]
    for key in ("patience", "max_cuts", "plateau_threshold"):  # as a version without them stored it
        del old["train"][key]
    study.set_user_attr("profile_spec", old)
    grid.open_study(storage, plan)  # not refused
    (other,) = make_plans(write_sweep(tmp_path), "train.patience=3")
    with pytest.raises(SpecError, match="different settings or profile"):
        grid.open_study(storage, other)


def test_pop_never_hands_out_a_trial_twice(tmp_path, results):
    plan, storage, study = queued_study(tmp_path, results)
    popped = []
    while (t := pop_waiting(storage, study)) is not None:
        popped.append(grid_point(t))
    assert sorted(popped) == sorted(plan.grid())
    assert len(study.get_trials()) == 6  # and no phantom trial was created when the queue ran dry


def test_trials_in_reads_what_the_study_holds_in_those_states(tmp_path, results):
    """The workers' database-filtered reads (trials.trials_in) see exactly what Optuna's study does."""
    plan, storage, study = queued_study(tmp_path, results)
    first, second = pop_waiting(storage, study), pop_waiting(storage, study)
    storage.set_trial_state_values(trial_id(storage, study, first.number), TrialState.COMPLETE, [1.0])
    fail(storage, trial_id(storage, study, second.number), "diverged")
    third = pop_waiting(storage, study)
    for states in [(TrialState.WAITING,), (TrialState.RUNNING,), (TrialState.FAIL,), (TrialState.COMPLETE,),
                   (TrialState.WAITING, TrialState.RUNNING)]:
        got = trials_in(storage, study, states)
        assert [t.number for t in got] == [t.number for t in study.get_trials(states=states)], states
    assert [t.number for t in trials_in(storage, study, (TrialState.RUNNING,))] == [third.number]
    assert [t.params for t in trials_in(storage, study, (TrialState.FAIL,))] == [second.params]
    assert len(trials_in(storage, study, (TrialState.WAITING,))) == len(plan.grid()) - 3


def test_workers_run_starts_open_the_storage_without_waiting_for_its_lock(tmp_path, results):
    """`ablate run` has created and checked the tables: its workers skip both, and the lock guarding them."""
    import threading

    plan, storage, study = queued_study(tmp_path, results)
    opened = []
    with grid_lock(storage):  # held, as while another process claims a trial
        t = threading.Thread(target=lambda: opened.append(open_storage(url_of(results), tables_ready=True)))
        t.start()
        t.join(timeout=30)
        assert not t.is_alive() and len(opened) == 1
    assert len(trials_in(opened[0], study, (TrialState.WAITING,))) == len(plan.grid())


def test_process_alive_tells_dead_and_reused_pids():
    me = os.getpid()
    assert processes.process_alive(me, processes.process_start(me))
    assert not processes.process_alive(dead_pid(), None)
    assert not processes.process_alive(me, "12345")  # same pid, another process start time: reused


# ---------------------------------------------------------------------------------------------------
# Running sweeps (fake trainer)


def test_run_trains_every_point_once_and_records_results(tmp_path, results, capsys):
    assert run_fake(tmp_path, results) == 0
    study = load_study(results)
    assert completes_per_point(study) == {p: 1 for p in make_plans(write_sweep(tmp_path))[0].grid()}
    t = next(t for t in study.trials if t.params == {"setting": "r=8", "seed": 1})
    assert t.value == pytest.approx(10.0 + 1 + 0.3)
    run_dir = results / "quick" / "mini" / "r=8" / "seed1"
    assert t.user_attrs["run_dir"] == str(run_dir.resolve())
    for key in ("top1_err", "top5_err", "val_loss", "params_m", "gflops", "params", "macs", "train_seconds",
                "images_per_s", "epochs", "device", "git_commit", "sweep", "profile"):
        assert key in t.user_attrs, key
    assert "setting" not in t.user_attrs and "seed" not in t.user_attrs  # the trial's params already say
    assert t.intermediate_values == {1: 50.0, 2: 25.0, 3: pytest.approx(50 / 3)}
    assert len(calls(run_dir)) == 1
    out = capsys.readouterr().out
    assert "r=8" in out and "original" in out  # the sweep's table was printed
    assert (results / "quick" / "mini" / "table.md").is_file()
    assert (results / "quick" / "mini" / "table.csv").is_file()


def test_progress_lines_number_points_that_finish_together_one_each(tmp_path, results, capsys):
    plan, storage, study = queued_study(tmp_path, results)
    first = pop_waiting(storage, study)
    study.tell(first.number, 1.0)  # done before this run started
    progress = Progress(storage, [(study, plan)], results, url_of(results), bars=False)
    pair = [pop_waiting(storage, study) for _ in range(2)]
    for t in pair:  # both finish before the first one's event is handled
        study.tell(t.number, 2.0)
    for t in pair:
        progress.handle({"kind": "end", "state": "COMPLETE", "study": study.study_name, "value": 2.0,
                         "seconds": 1.0, "setting": t.params["setting"], "seed": t.params["seed"]})
    lines = capsys.readouterr().err.splitlines()
    total = len(plan.grid())
    assert [line.split()[0] for line in lines] == [f"[2/{total}]", f"[3/{total}]"]


def test_rerun_trains_nothing_complete_and_more_seeds_extend_the_grid(tmp_path, results):
    assert run_fake(tmp_path, results) == 0
    assert run_fake(tmp_path, results) == 0
    study = load_study(results)
    assert len(study.trials) == 6
    assert all(len(calls(d)) == 1 for d in (results / "quick" / "mini").glob("*/seed*"))
    assert run_fake(tmp_path, results, seeds=3) == 0
    study = load_study(results)
    assert len(study.trials) == 9 and set(completes_per_point(study).values()) == {1}
    assert study.user_attrs["seeds"] == 3


def test_nan_trial_fails_with_reason_rest_completes_exit_1(tmp_path, results, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_NAN_SETTING", "r=8")
    assert run_fake(tmp_path, results) == 1
    study = load_study(results)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert sorted(t.params["seed"] for t in failed) == [0, 1]
    assert all(t.params["setting"] == "r=8" and "nan" in t.user_attrs["fail_reason"] for t in failed)
    assert len(completes_per_point(study)) == 4
    assert "r=8 seed0: FAIL: loss became nan" in capsys.readouterr().err


def test_unexpected_trainer_error_fails_the_trial_with_traceback_and_the_sweep_goes_on(
        tmp_path, results, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_CRASH_SETTING", "original")
    monkeypatch.setenv("FAKE_NAN_SETTING", "r=8")
    assert run_fake(tmp_path, results) == 1
    study = load_study(results)
    reasons = {t.params["setting"]: t.user_attrs["fail_reason"] for t in study.trials if t.state == TrialState.FAIL}
    assert reasons == {"original": "RuntimeError: a bug in the trainer", "r=8": "loss became nan at epoch 1"}
    err = capsys.readouterr().err
    assert err.count("Traceback") == 2  # one per crashed trial; none for the expected NaN failures
    assert len(completes_per_point(study)) == 2


def test_dead_local_worker_is_requeued_at_once_and_resumes_its_checkpoint(tmp_path, results):
    plan, storage, study = queued_study(tmp_path, results)
    _, _, trial = claim(results, socket.gethostname(), dead_pid())
    label, seed = grid_point(trial)
    run_dir = plan.run_dir(results, label, seed)
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.json").write_text(json.dumps({"epoch": 2}))  # it died after epoch 2
    started = time.monotonic()
    assert run_fake(tmp_path, results) == 0
    assert time.monotonic() - started < resilience.grace_s()  # no waiting for the heartbeat grace period
    study = load_study(results)
    dead = study.trials[trial.number]
    assert dead.state == TrialState.FAIL and "died" in dead.user_attrs["fail_reason"]
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == trial.number]
    assert retry.state == TrialState.COMPLETE and retry.params == trial.params
    assert retry.user_attrs["resumed_epochs"] == 2
    assert [c[1] for c in calls(run_dir)] == ["2"]  # trained once, from the checkpoint
    assert set(completes_per_point(study).values()) == {1} and len(completes_per_point(study)) == 6


def test_stale_heartbeat_and_silent_claims_are_requeued_after_grace(tmp_path, results, monkeypatch):
    monkeypatch.setenv("ABLATE_GRACE_S", "1")
    plan, storage, study = queued_study(tmp_path, results)
    _, _, remote = claim(results, "another-host", 4242)  # a live-looking worker on another machine
    storage.record_heartbeat(trial_id(storage, study, remote.number))
    with grid_lock(storage):
        silent = pop_waiting(storage, study)  # claimed, then died before any attr or heartbeat
        assert recovery.recover(storage, study) == []  # both still within the grace period
    time.sleep(2.5)
    with grid_lock(storage):
        assert recovery.recover(storage, study) == sorted([remote.number, silent.number])
    retries = {t.system_attrs["failed_trial"]: t for t in study.get_trials()
               if "failed_trial" in t.system_attrs}
    assert set(retries) == {remote.number, silent.number}
    assert all(t.state == TrialState.WAITING for t in retries.values())
    assert retries[remote.number].params == remote.params
    assert "worker" not in retries[remote.number].user_attrs  # the dead worker's identity is not copied


def test_requeue_gives_up_after_max_retry(tmp_path, results):
    (plan,) = make_plans(write_sweep(tmp_path))
    study = grid.open_study(open_storage(url_of(results)), plan)
    trial = optuna.trial.create_trial(state=TrialState.FAIL, params={"setting": "r=8", "seed": 0},
                                      distributions=plan.distributions(),
                                      system_attrs={"retry_history": list(range(MAX_RETRY))})
    assert not requeue(study, trial)
    assert requeue(study, optuna.trial.create_trial(
        state=TrialState.FAIL, params={"setting": "r=8", "seed": 0}, distributions=plan.distributions()))


def test_worker_joins_existing_study_with_its_stored_options(tmp_path, results):
    plan, storage, study = queued_study(tmp_path, results, data_root="/stored/root")
    events = []
    worker.work(url_of(results), ["mini-quick"], results_dir=results, device="cpu", data_root=None,
                emit=events.append, trainer=FAKE)
    assert len(completes_per_point(load_study(results))) == 6
    pid, start, data_root, epochs = calls(plan.run_dir(results, "original", 1))[0]
    assert (data_root, epochs) == ("/stored/root", "3")  # --data-root and --set came from the study
    assert [e["kind"] for e in events].count("end") == 6


def test_worker_cli_errors(tmp_path, results, capsys):
    rc, err = _cli(capsys, "worker", "--study", "mini-quick", "--results-dir", str(results))
    assert rc == 2 and "no such database" in err and not (results / "optuna.db").exists()
    (plan,) = make_plans(write_sweep(tmp_path))
    grid.open_study(open_storage(url_of(results)), plan)
    rc, err = _cli(capsys, "worker", "--study", "nope-quick", "--results-dir", str(results))
    assert rc == 2 and "nope-quick" in err and "mini-quick" in err


def test_status_prints_counts_and_eta(tmp_path, results, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_NAN_SETTING", "original")
    run_fake(tmp_path, results)
    capsys.readouterr()
    assert cli.main(["status", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out[1].split()
    row = dict(zip(header, out[2].split()))
    assert row == {"study": "mini-quick", "points": "6", "done": "4", "running": "0", "queued": "0",
                   "failed": "2", "missing": "0", "eta": "-"}


def test_status_eta_from_median_trial_time(tmp_path, results):
    from datetime import datetime, timedelta

    (plan,) = make_plans(write_sweep(tmp_path))
    storage = open_storage(url_of(results))
    study = grid.open_study(storage, plan)
    now = datetime.now()

    def add(state, label, started_s_ago, took_s=None):
        study.add_trial(optuna.trial.FrozenTrial(
            number=0, trial_id=0, state=state, value=1.0 if took_s else None, values=None,
            datetime_start=now - timedelta(seconds=started_s_ago),
            datetime_complete=now - timedelta(seconds=started_s_ago - took_s) if took_s else None,
            params={"setting": label, "seed": 0}, distributions=plan.distributions(),
            user_attrs={}, system_attrs={}, intermediate_values={}))

    add(TrialState.COMPLETE, "r=16", 500, took_s=60)
    add(TrialState.COMPLETE, "r=8", 400, took_s=60)
    add(TrialState.RUNNING, "original", 20)
    with grid_lock(storage):
        assert grid.enqueue_missing(study, plan) == 3
    row = study_status(study, now=now)
    # 3 queued x 60 s + the running one's last 40 s, over the one worker running now
    assert (row["done"], row["running"], row["queued"], row["eta"]) == (2, 1, 3, "3m40s")


def test_status_without_a_results_dir_is_an_error(results, capsys):
    rc, err = _cli(capsys, "status", "--results-dir", str(results))
    assert rc == 2 and err == (f"error: --results-dir: {results}: no such results directory (start a sweep "
                               "with `ablate run`, or name another with --results-dir)")
    assert not results.exists()  # reading created nothing


# ---------------------------------------------------------------------------------------------------
# Several processes


def _modules_at_start(queue) -> None:
    queue.put({name: name in sys.modules for name in ("timm", "ablations.data", "ablations.train")})


@pytest.mark.slow
@pytest.mark.skipif("forkserver" not in mp.get_all_start_methods(), reason="no fork server on this platform")
def test_workers_start_with_torch_timm_and_the_trainer_imported():
    """Workers are forked from a server that imported them once (seconds each), not spawned bare."""
    seen = {}
    for name, ctx in (("server", worker.process_context(worker.TRAINER)), ("spawn", mp.get_context("spawn"))):
        queue = ctx.Queue()
        p = ctx.Process(target=_modules_at_start, args=(queue,))
        p.start()
        seen[name] = queue.get(timeout=120)
        p.join(30)
    assert seen["server"] == {"timm": True, "ablations.data": True, "ablations.train": True}
    assert seen["spawn"]["timm"] is False  # this module alone does not import it: the server did


def _run_in_process(plans, results: str, workers: int, epoch_s: str) -> None:
    os.environ["FAKE_EPOCH_S"] = epoch_s
    sys.exit(supervisor.run(plans, url_of(Path(results)), Path(results), ["cpu"], workers, trainer=FAKE,
                           bars=False))


@pytest.mark.slow
def test_two_runs_at_once_complete_every_point_exactly_once(tmp_path, results):
    ctx = mp.get_context("spawn")
    plans = make_plans(write_sweep(tmp_path), seeds=4)  # validated once here: children skip torch
    procs = [ctx.Process(target=_run_in_process, args=(plans, str(results), 2, "0.05")) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    study = load_study(results)
    assert completes_per_point(study) == {(label, s): 1 for s in range(4) for label in ("r=16", "r=8", "original")}
    assert len(study.trials) == 12  # nothing queued twice, nothing failed
    assert all(len(calls(d)) == 1 for d in (results / "quick" / "mini").glob("*/seed*"))


@pytest.mark.slow
def test_kill_9_of_a_multi_worker_run_kills_its_workers_and_rerun_resumes(tmp_path, results):
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_run_in_process, args=(make_plans(write_sweep(tmp_path), seeds=4), str(results), 2,
                                                  "1.0"))
    p.start()
    deadline = time.monotonic() + 60
    running = []
    while time.monotonic() < deadline:
        time.sleep(0.3)
        try:
            trials = load_study(results).get_trials(states=(TrialState.RUNNING,))
        except (KeyError, Exception):  # no database or no study yet
            continue
        # a claim's attrs arrive one by one: poll until pid and run_dir are both there
        running = [t for t in trials if "pid" in t.user_attrs and "run_dir" in t.user_attrs
                   and (Path(t.user_attrs["run_dir"]) / "checkpoint.json").exists()]
        if len(running) == 2:
            break
    assert len(running) == 2, "two workers never got going"
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    pids = [t.user_attrs["pid"] for t in running]
    deadline = time.monotonic() + 10
    while any(processes.process_alive(pid, None) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(processes.process_alive(pid, None) for pid in pids), "workers outlived their run"
    # A trial can finish between the poll above and the kill (a loaded machine is slow to poll): the
    # kill interrupted those still RUNNING in the storage, and only those need a retry.
    left = {t.number: t.state for t in load_study(results).trials}
    killed = [t for t in running if left[t.number] == TrialState.RUNNING]
    assert killed, "the kill interrupted no trial"

    os.environ["FAKE_EPOCH_S"] = "0"
    try:
        assert run_fake(tmp_path, results, seeds=4) == 0
    finally:
        del os.environ["FAKE_EPOCH_S"]
    study = load_study(results)
    assert set(completes_per_point(study).values()) == {1} and len(completes_per_point(study)) == 12
    for t in killed:
        (retry,) = [r for r in study.trials if r.system_attrs.get("failed_trial") == t.number]
        assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_epochs"] >= 1
        assert len(calls(Path(t.user_attrs["run_dir"]))) == 2  # the killed start + one resume


# ---------------------------------------------------------------------------------------------------
# Exit: `ablate` skips the interpreter's teardown (cli.exit_fast), not what a normal exit does


@pytest.mark.slow
def test_cli_exit_leaves_every_write_in_the_db_file_and_prints_everything(tmp_path, results):
    """SQLite's write-ahead log must be folded into optuna.db at exit: the .db alone, copied without
    optuna.db-wal, holds everything written. Reading (`ablate status`) must not leave the log either."""
    sweep = write_sweep(tmp_path)
    queue_grid = (f"from pathlib import Path\nfrom helpers import create_study, make_plans, url_of\n"
                  f"from ablations import cli\n"
                  f"create_study(url_of(Path({str(results)!r})), make_plans(Path({str(sweep)!r})))\n"
                  f"cli.exit_fast(3)\n")
    proc = subprocess.run([sys.executable, "-c", queue_grid], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr  # the code it was given
    assert sorted(p.name for p in results.iterdir()) == ["optuna.db", "optuna.db.lock"]
    copy = tmp_path / "copy" / "optuna.db"
    copy.parent.mkdir()
    copy.write_bytes((results / "optuna.db").read_bytes())
    copied = optuna.load_study(study_name="mini-quick", storage=f"sqlite:///{copy}")
    (plan,) = make_plans(sweep)
    assert len(copied.get_trials(states=(TrialState.WAITING,))) == len(plan.grid())

    status = subprocess.run([sys.executable, "-m", "ablations", "status", "--results-dir", str(results)],
                            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    row = status.stdout.strip().splitlines()[-1].split()  # the last line printed is there
    assert row[:2] == ["mini-quick", str(len(plan.grid()))]
    assert sorted(p.name for p in results.iterdir()) == ["optuna.db", "optuna.db.lock"]

    bad = subprocess.run([sys.executable, "-m", "ablations", "status", "--storage", "nosuch://x"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nosuch://x" in bad.stderr


# ---------------------------------------------------------------------------------------------------
# End to end: the real trainer through the `ablate` command (small grid, few epochs)

E2E_SETTINGS = [{"label": "r=16", "reduction": 16}, {"label": "original", "se": False}]


def ablate(*argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ablations", *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def e2e_args(tmp_path: Path, results: Path, *extra: str) -> list[str]:
    sweep = write_sweep(tmp_path, settings=E2E_SETTINGS)
    return ["run", str(sweep), "--results-dir", str(results), *extra]


@pytest.mark.slow
def test_e2e_kill_9_then_rerun_resumes_and_completes_each_point_once(tmp_path, results):
    args = e2e_args(tmp_path, results, "--workers", "2", "--set", "train.epochs=3")
    proc = ablate(*args)
    victim = None
    deadline = time.monotonic() + 400
    while victim is None:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no trial got to a checkpoint with another one completed"
        time.sleep(0.5)
        try:
            trials = load_study(results).get_trials()
        except Exception:  # noqa: BLE001 -- no database or study yet
            continue
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        running = [t for t in trials if t.state == TrialState.RUNNING and "run_dir" in t.user_attrs
                   and (Path(t.user_attrs["run_dir"]) / "checkpoint.pt").exists()]
        if done and running:
            victim = running[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    finished = {grid_point(t): (t.number, os.stat(Path(t.user_attrs["run_dir"]) / "final.json").st_mtime_ns)
                for t in load_study(results).get_trials(states=(TrialState.COMPLETE,))}
    rerun = ablate(*args)
    out, err = rerun.communicate(timeout=500)
    assert rerun.returncode == 0, err
    assert "Table 10" in out and "original (ref)" in out

    study = load_study(results)
    assert set(completes_per_point(study).values()) == {1} and len(completes_per_point(study)) == 4
    for number, mtime in finished.values():  # nothing completed earlier was trained again
        t = study.trials[number]
        assert t.state == TrialState.COMPLETE
        assert os.stat(Path(t.user_attrs["run_dir"]) / "final.json").st_mtime_ns == mtime
    assert study.trials[victim.number].state == TrialState.FAIL
    assert "died" in study.trials[victim.number].user_attrs["fail_reason"]
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_epochs"] >= 1  # from its checkpoint
    metrics = (Path(retry.user_attrs["run_dir"]) / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in metrics[1:]] == ["1", "2", "3"]  # no epoch trained twice


@pytest.mark.slow
def test_e2e_two_runs_started_together_complete_each_point_once(tmp_path, results):
    args = e2e_args(tmp_path, results, "--set", "train.epochs=1")
    procs = [ablate(*args), ablate(*args)]
    outs = [p.communicate(timeout=500) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    study = load_study(results)
    assert completes_per_point(study) == {(label, s): 1 for s in range(2) for label in ("r=16", "original")}
    assert len(study.trials) == 4


@pytest.mark.slow
def test_e2e_diverging_trial_fails_with_reason_and_exit_1(tmp_path, results):
    sweep = write_sweep(tmp_path, settings=[{"label": "r=16", "reduction": 16}], seeds=1, reference=None)
    proc = ablate("run", str(sweep), "--results-dir", str(results), "--set", "train.epochs=1",
                  "--set", "train.lr=1.0e+8", "--set", "train.warmup_epochs=0")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    (trial,) = load_study(results).trials
    assert trial.state == TrialState.FAIL and "loss" in trial.user_attrs["fail_reason"]
    assert "Traceback" not in err  # an expected failure is one line, not a stack


def test_make_target_runs_the_sweep_with_its_variables():
    out = subprocess.run(["make", "-n", "ablation-ratio", "PYTHON=python3", "SEEDS=2", "WORKERS=3",
                          "DEVICES=cpu", "RESULTS=/tmp/r", "STORAGE=sqlite:////tmp/r/x.db"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if " run ratio " in x)
    for part in ("--profile quick", "--seeds 2", "--workers 3", "--results-dir /tmp/r", "--devices cpu",
                 "--storage sqlite:////tmp/r/x.db"):
        assert part in line
    assert "--precision" not in line and "--max-seeds" not in line
    targets = subprocess.run(["make", "-n", "ablations", "PYTHON=python3"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    assert "run ratio squeeze excitation stages integration se3x3 nosqueeze" in targets
    by_precision = subprocess.run(["make", "-n", "ablation-stages", "PYTHON=python3", "PRECISION=0.5",
                                   "MAX_SEEDS=12"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    line = next(x for x in by_precision.splitlines() if " run stages " in x)
    assert "--precision 0.5" in line and "--max-seeds 12" in line and "--seeds 3" in line
