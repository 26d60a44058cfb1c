"""Fault injection: what a sweep survives, and how it says what it cannot.

- kill -9 of a worker mid-epoch (SQLite and PostgreSQL) -> restart -> every point COMPLETE exactly once;
- a worker that stops answering (SIGSTOP: a hung machine) -> its trial retried after the heartbeat grace
  period; if it wakes up, it stops at its next epoch and never writes over the retry;
- truncated or corrupt checkpoints -> resume from the previous good one, or restart, with a warning;
- read-only or full results dir -> one line, exit 2, every point still WAITING or COMPLETE;
- unreachable storage -> retries with backoff, then exit 2 with one line; a database restart mid-run is
  waited out.

The scheduler-level cases use the fake trainer (helpers.fake_train) in spawned worker processes, so a test
takes seconds; the disk-full and PostgreSQL kill -9 cases run the real trainer through `ablate worker`.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    ROOT,
    SMALL_QUICK,
    ablate,
    calls,
    completes_per_point,
    create_study,
    env,
    free_port,
    load_study,
    make_plans,
    tiny_cfg,
    url_of,
    wait_for,
    work_in_process,
    write_sweep,
)
from optuna.trial import TrialState

from ablations import grid, storage_url, worker
from ablations.train import train
from ablations.trials import grid_point

# ---------------------------------------------------------------------------------------------------
# Helpers


pytestmark = pytest.mark.usefixtures("fake_trainer")  # every FAKE_* knob unset unless a test sets it


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return url_of(tmp_path / "results")
    return storage_url.resolve(".", request.getfixturevalue("pg_url"))


def spawn_worker(url: str, results: Path, epoch_s: str) -> mp.process.BaseProcess:
    p = mp.get_context("spawn").Process(target=work_in_process, args=(url, str(results), epoch_s))
    p.start()
    return p


def running_trial_of(pid: int, url: str, past_epoch: int = 1):
    """The trial worker `pid` trains, once its run dir holds a checkpoint of `past_epoch` or later."""
    for t in load_study(url).get_trials(states=(TrialState.RUNNING,)):
        if t.user_attrs.get("pid") == pid and "run_dir" in t.user_attrs:  # attrs arrive one by one
            ckpt = Path(t.user_attrs["run_dir"]) / "checkpoint.json"
            if ckpt.exists() and json.loads(ckpt.read_text())["epoch"] >= past_epoch:
                return t
    return None


def states(url: str) -> set[str]:
    study = load_study(url)
    plan = grid.plan_from_attrs(study.study_name, study.user_attrs)
    return set(grid.point_states(study.get_trials(), plan.grid()).values())


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    return errors[0]


# ---------------------------------------------------------------------------------------------------
# Dead and hung workers


@pytest.mark.slow
def test_kill_9_mid_epoch_then_restart_completes_each_point_once(url, tmp_path):
    results = tmp_path / "results"
    plans = make_plans(write_sweep(tmp_path, seeds=2))
    create_study(url, plans)
    victim_proc = spawn_worker(url, results, "1.0")
    victim = wait_for(lambda: running_trial_of(victim_proc.pid, url), 60, "the worker to finish an epoch")
    time.sleep(0.4)  # into the next epoch (1 s each)
    os.kill(victim_proc.pid, signal.SIGKILL)
    victim_proc.join()
    assert load_study(url).trials[victim.number].state == TrialState.RUNNING  # what kill -9 leaves behind

    restarted = spawn_worker(url, results, "0")
    restarted.join(120)
    assert restarted.exitcode == 0
    study = load_study(url)
    assert completes_per_point(study) == {p: 1 for p in plans[0].grid()}
    dead = study.trials[victim.number]
    assert dead.state == TrialState.FAIL and "died" in dead.user_attrs["fail_reason"]
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_epochs"] >= 1
    starts = [int(start) for _, start, *_ in calls(Path(victim.user_attrs["run_dir"]))]
    assert len(starts) == 2 and starts[1] >= 1  # the restart resumed from the killed run's checkpoint


@pytest.mark.slow
def test_hung_worker_is_retried_after_the_grace_period(url, tmp_path, monkeypatch):
    monkeypatch.setenv("ABLATE_HEARTBEAT_S", "0.3")
    monkeypatch.setenv("ABLATE_GRACE_S", "3")
    results = tmp_path / "results"
    plans = make_plans(write_sweep(tmp_path, seeds=1))
    create_study(url, plans)
    hung = spawn_worker(url, results, "1.0")
    victim = wait_for(lambda: running_trial_of(hung.pid, url), 60, "the worker to finish an epoch")
    os.kill(hung.pid, signal.SIGSTOP)  # alive to the kernel, silent to the study: a hung machine
    stopped_at = time.monotonic()
    rescuer = spawn_worker(url, results, "0.2")
    try:
        def retried():
            tries = [t for t in load_study(url).trials if t.system_attrs.get("failed_trial") == victim.number]
            return tries if tries and tries[0].state != TrialState.WAITING else None

        wait_for(retried, 60, "the stale trial to be retried")
        assert time.monotonic() - stopped_at >= 3 - 0.5  # not before the grace period
    finally:
        os.kill(hung.pid, signal.SIGKILL)  # it never comes back: its run-dir lock goes with it
        hung.join()
    rescuer.join(120)
    assert rescuer.exitcode == 0
    study = load_study(url)
    assert completes_per_point(study) == {p: 1 for p in plans[0].grid()}
    assert study.trials[victim.number].state == TrialState.FAIL
    done = [t for t in study.trials if t.state == TrialState.COMPLETE and grid_point(t) == grid_point(victim)]
    assert len(done) == 1 and done[0].user_attrs["resumed_epochs"] >= 1


@pytest.mark.slow
def test_worker_that_wakes_up_after_its_retry_stops_and_nothing_is_done_twice(tmp_path, monkeypatch):
    monkeypatch.setenv("ABLATE_HEARTBEAT_S", "0.3")
    monkeypatch.setenv("ABLATE_GRACE_S", "3")
    results = tmp_path / "results"
    url = storage_url.resolve(results, None)
    plans = make_plans(write_sweep(tmp_path, seeds=1), "train.epochs=4")
    create_study(url, plans)
    sleeper = spawn_worker(url, results, "1.0")
    victim = wait_for(lambda: running_trial_of(sleeper.pid, url), 60, "the worker to finish an epoch")
    os.kill(sleeper.pid, signal.SIGSTOP)
    run_dir = Path(victim.user_attrs["run_dir"])
    stopped_after = json.loads((run_dir / "checkpoint.json").read_text())["epoch"]
    rescuer = spawn_worker(url, results, "0.2")

    def claimed_by_rescuer():
        return [t for t in load_study(url).trials if t.system_attrs.get("failed_trial") == victim.number
                and t.user_attrs.get("pid") == rescuer.pid]

    wait_for(claimed_by_rescuer, 60, "the rescuer to claim the retry")
    os.kill(sleeper.pid, signal.SIGCONT)  # it wakes up mid-epoch, still holding the run dir
    for p in (sleeper, rescuer):
        p.join(120)
    assert [sleeper.exitcode, rescuer.exitcode] == [0, 0]  # both went on with the rest of the grid
    study = load_study(url)
    assert completes_per_point(study) == {p: 1 for p in plans[0].grid()}
    assert (run_dir / "final.pid").read_text() == str(rescuer.pid)  # the rescuer wrote the final record
    # The rescuer waited for the run dir, then resumed from the one epoch the sleeper finished on waking
    # (and the sleeper stopped there: it would otherwise have held the run dir to the end).
    assert [(int(pid), int(start)) for pid, start, *_ in calls(run_dir)] == [(sleeper.pid, 0),
                                                                        (rescuer.pid, stopped_after + 1)]


# ---------------------------------------------------------------------------------------------------
# Damaged checkpoints


def three_epochs():
    return tiny_cfg(epochs=3, deterministic=True)


class Stop(Exception):
    pass


def stop_after(epoch: int):
    def hook(row):
        if row["epoch"] == epoch:
            raise Stop

    return hook


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every damaged-checkpoint resume must reproduce (deterministic CPU)."""
    return train(three_epochs(), tmp_path_factory.mktemp("whole"), progress=False)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoint_resumes_from_the_previous_one(damage, tmp_path, capfd, reference):
    with pytest.raises(Stop):
        train(three_epochs(), tmp_path, progress=False, on_epoch=stop_after(2))
    ckpt = tmp_path / "checkpoint.pt"
    assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True)["epoch"] == 1
    data = ckpt.read_bytes()
    ckpt.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    capfd.readouterr()
    epochs = []
    final = train(three_epochs(), tmp_path, progress=False, on_epoch=lambda r: epochs.append(r["epoch"]))
    err = capfd.readouterr().err
    assert f"warning: {ckpt}: unreadable checkpoint" in err
    assert "resuming from checkpoint.prev.pt (epoch 1)" in err
    assert epochs == [2, 3]  # epoch 2 again, from epoch 1's state
    for key in ("top1_err", "top5_err", "val_loss"):
        assert getattr(final, key) == getattr(reference, key)  # bit-identical: nothing of the damaged file leaked in
    assert (tmp_path / "checkpoint.pt.damaged").exists()  # kept aside for a post-mortem


def test_no_readable_checkpoint_restarts_the_trial_with_a_warning(tmp_path, capfd, reference):
    with pytest.raises(Stop):
        train(three_epochs(), tmp_path, progress=False, on_epoch=stop_after(2))
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (tmp_path / name).write_bytes(b"PK\x03\x04 not really a zip")
    capfd.readouterr()
    epochs = []
    final = train(three_epochs(), tmp_path, progress=False, on_epoch=lambda r: epochs.append(r["epoch"]))
    assert "no readable checkpoint; restarting the trial from epoch 1" in capfd.readouterr().err
    assert epochs == [1, 2, 3]
    assert final.top1_err == reference.top1_err and final.val_loss == reference.val_loss


@pytest.mark.slow
def test_sweep_with_a_corrupt_checkpoint_completes_instead_of_failing(tmp_path, capfd):
    results = tmp_path / "results"
    url = storage_url.resolve(results, None)
    plans = make_plans(write_sweep(tmp_path, settings=[{"label": "r=16", "reduction": 16}], seeds=1),
                       *SMALL_QUICK, "train.epochs=2")
    create_study(url, plans)
    (plan,) = plans
    run_dir = plan.run_dir(results, "r=16", 0)
    with pytest.raises(Stop):  # an earlier attempt left epoch 1 behind ...
        train(plan.config("r=16", 0), run_dir, progress=False, on_epoch=stop_after(1))
    (run_dir / "checkpoint.pt").write_bytes(b"\x00" * 100)  # ... which a disk then damaged
    worker.work(url, ["mini-quick"], results_dir=results, device="cpu", data_root=None, emit=lambda ev: None)
    (trial,) = load_study(url).trials
    assert trial.state == TrialState.COMPLETE
    assert "no readable checkpoint; restarting the trial from epoch 1" in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------------
# The results directory


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A real small or read-only file system at `path`; None where this process may not mount one."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_read_only_results_dir_is_one_line_and_claims_nothing(tmp_path):
    url = storage_url.resolve(tmp_path / "db", None)
    plans = make_plans(write_sweep(tmp_path, seeds=1))
    create_study(url, plans)
    results = tmp_path / "results"
    with tmpfs(results, "ro,size=1m") as mounted:
        if mounted is None:  # no mount rights: permissions make it read-only, unless root ignores them
            if os.geteuid() == 0:
                pytest.skip("root without mount rights: neither a read-only tmpfs nor permissions bind it")
            results.chmod(0o555)
        proc = ablate("worker", "--study", "mini-quick", "--storage", url, "--results-dir", str(results))
        _, err = proc.communicate(timeout=300)
    why = "read-only file system" if mounted else "permission denied"
    assert proc.returncode == 2
    assert one_error_line(err) == (f"error: --results-dir: {results}: cannot write files there: {why}; no "
                                   "trial was claimed (free space or fix permissions, then start again)")
    assert states(url) == {"WAITING"} and len(load_study(url).trials) == 3  # untouched


def _limit_file_size(limit: int):
    def preexec() -> None:  # a full disk's twin: writes past `limit` bytes fail (EFBIG); CPython ignores SIGXFSZ
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.slow
def test_full_results_dir_mid_trial_hands_the_trial_back_and_a_rerun_completes(tmp_path, request):
    results = tmp_path / "results"
    with tmpfs(results, "size=256k") as mounted:  # room for config.yaml and the lock, not a checkpoint (1.2 MB)
        if mounted is not None:
            url, popen, why = storage_url.resolve(tmp_path / "db", None), {}, "no space left on device"
        else:  # no mount rights: a file-size limit instead, with the storage off this machine's files
            url = storage_url.resolve(".", request.getfixturevalue("pg_server").create_database())
            popen, why = {"preexec_fn": _limit_file_size(768 * 1024)}, "file size limit exceeded"
        plans = make_plans(write_sweep(tmp_path, settings=[{"label": "r=16", "reduction": 16}], seeds=2),
                           *SMALL_QUICK, "train.epochs=1")
        create_study(url, plans)
        proc = subprocess.Popen([sys.executable, "-m", "ablations", "worker", "--study", "mini-quick", "--storage",
                                 url, "--results-dir", str(results)], cwd=ROOT, env=env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    line = one_error_line(err)
    assert line.startswith(f"error: --results-dir: {results}: cannot write files there: {why}; "
                           "the trial was queued again")
    study = load_study(url)
    assert states(url) == {"WAITING"}  # the point handed back, the other never claimed
    (first,) = [t for t in study.trials if t.state == TrialState.FAIL]
    assert first.user_attrs["fail_reason"] == f"results dir not writable: {why}"
    # Space again (the tmpfs is gone): a worker finishes the study, each point once.
    worker.work(url, ["mini-quick"], results_dir=results, device="cpu", data_root=None, emit=lambda ev: None)
    assert completes_per_point(load_study(url)) == {("r=16", 0): 1, ("r=16", 1): 1}


# ---------------------------------------------------------------------------------------------------
# The storage


def test_unreachable_storage_retries_with_backoff_then_one_line_exit_2():
    url = f"postgresql://ablate:secret@127.0.0.1:{free_port()}/sweeps"  # nothing listens there
    started = time.monotonic()
    proc = ablate("worker", "--study", "ratio-quick", "--storage", url,
                  ABLATE_STORAGE_ATTEMPTS="3", ABLATE_STORAGE_BACKOFF_S="0.5")
    _, err = proc.communicate(timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2
    line = one_error_line(err)
    assert line.startswith(f"error: --storage: postgresql+psycopg2://ablate:***@{url.split('@')[1]}: cannot open "
                           "storage: connection to server at \"127.0.0.1\"")
    assert "Connection refused" in line and "secret" not in err
    retries = [x for x in err.splitlines() if x.startswith("warning: storage")]
    assert [r.rsplit("retry ", 1)[1] for r in retries] == ["1/2 in 0.5 s", "2/2 in 1 s"]  # doubling backoff
    assert elapsed >= 1.5


@pytest.mark.slow
def test_worker_rides_out_a_database_restart(tmp_path, pg_server, monkeypatch):
    monkeypatch.setenv("ABLATE_STORAGE_ATTEMPTS", "8")
    monkeypatch.setenv("ABLATE_STORAGE_BACKOFF_S", "0.5")
    # A write cut by the stop between its commit and the reply may leave a claim without its owner's
    # name: any worker retries that one after the grace period, kept short here.
    monkeypatch.setenv("ABLATE_GRACE_S", "10")
    url = storage_url.resolve(".", pg_server.create_database())
    results = tmp_path / "results"
    plans = make_plans(write_sweep(tmp_path, seeds=2), "train.epochs=2")
    create_study(url, plans)
    w = spawn_worker(url, results, "0.5")
    wait_for(lambda: load_study(url).get_trials(states=(TrialState.COMPLETE,)), 60, "a first trial to complete")
    pg_server.stop("fast")  # every connection dropped, mid-trial
    try:
        time.sleep(3)
        assert w.is_alive()  # waiting, not dead
    finally:
        pg_server.start()
    w.join(120)
    assert w.exitcode == 0
    assert completes_per_point(load_study(url)) == {p: 1 for p in plans[0].grid()}


def test_bad_knob_in_the_environment_is_one_line():
    proc = ablate("status", ABLATE_GRACE_S="soon")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert one_error_line(err) == "error: environment: ABLATE_GRACE_S: must be a positive number (got 'soon')"


@pytest.mark.slow
def test_kill_9_of_an_ablate_worker_on_postgresql_then_restart(tmp_path, pg_server):
    """The real trainer, the real command: kill -9 mid-epoch, then a worker again."""
    url = pg_server.create_database()
    plans = make_plans(write_sweep(tmp_path, settings=[{"label": "r=16", "reduction": 16}], seeds=1),
                       *SMALL_QUICK, "train.epochs=3")
    create_study(storage_url.resolve(".", url), plans)
    results = tmp_path / "results"
    cmd = ("worker", "--study", "mini-quick", "--storage", url, "--results-dir", str(results), "--device", "cpu")
    first = ablate(*cmd)
    run_dir = results / "quick" / "mini" / "r=16" / "seed0"
    wait_for(lambda: (run_dir / "checkpoint.pt").exists(), 300, "epoch 1's checkpoint")
    time.sleep(0.5)  # into epoch 2
    first.kill()
    first.communicate()
    # Restarted in this process (torch is imported already): the same worker loop `ablate worker` runs.
    worker.work(storage_url.resolve(".", url), ["mini-quick"], results_dir=results, device="cpu", data_root=None,
                emit=lambda ev: None)
    study = load_study(storage_url.resolve(".", url))
    assert completes_per_point(study) == {("r=16", 0): 1}
    dead, retry = study.trials
    assert dead.state == TrialState.FAIL and "died" in dead.user_attrs["fail_reason"]
    assert retry.user_attrs["resumed_epochs"] >= 1
    epochs = [line.split(",")[0] for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3"]
