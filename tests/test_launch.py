"""`ablate launch --slurm`: the job array SLURM would get (a stand-in sbatch records it), a real tiny study run
to completion by submitit's local executor, and a preempted worker requeued with its trial resumed."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest
from helpers import (
    SMALL_QUICK,
    ablate,
    completes_per_point,
    create_study,
    load_study,
    make_plans,
    set_options,
    url_of,
    wait_for,
    write_sweep,
)
from optuna.trial import TrialState

from ablations import cli, launch, storage_url
from ablations.errors import SpecError

ONE_SETTING = [{"label": "r=16", "reduction": 16}]


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err.strip()


@pytest.fixture(autouse=True)
def _storage_env_restored(monkeypatch):
    """`launch.submit` puts the storage URL in this process's environment for the jobs to inherit."""
    monkeypatch.setenv(launch.STORAGE_ENV, "")


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """`srun` and `sbatch` stand-ins on PATH: sbatch keeps each submitted script and answers as SLURM does."""
    bindir = tmp_path / "slurm-bin"
    bindir.mkdir()
    scripts = tmp_path / "submitted"
    scripts.mkdir()
    (bindir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {scripts}/$(date +%s%N).sh\necho "Submitted batch job 4242"\n')
    (bindir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bindir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return scripts


def test_slurm_job_array_has_the_requested_resources_and_requeues(tmp_path, fake_slurm, pg_url, capsys):
    from submitit.core.utils import DelayedSubmission

    sweep = write_sweep(tmp_path, settings=ONE_SETTING, seeds=3)
    logs = tmp_path / "logs"
    rc, out, err = _cli(capsys, "launch", "--slurm", str(sweep), "--storage", pg_url, "--array", "3",
                        "--partition", "gpu", "--gpus-per-node", "2", "--time", "90", "--cpus-per-task", "8",
                        "--results-dir", str(tmp_path / "results"), "--logs", str(logs))
    assert rc == 0, err
    assert "submitted 3 worker(s) for mini-quick (slurm): 4242_0, 4242_1, 4242_2" in out
    (script,) = list(fake_slurm.iterdir())  # one sbatch call: an array, not three jobs
    text = script.read_text()
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --time=90", "#SBATCH --cpus-per-task=8", "#SBATCH --requeue",
                 f"#SBATCH --signal=USR2@{launch.SIGNAL_DELAY_S}", "#SBATCH --job-name=ablate-mini-quick",
                 f"export PYTHONPATH={launch.ROOT}"):
        assert line in text, line
    workers = [DelayedSubmission.load(logs / f"4242_{i}" / f"4242_{i}_submitted.pkl").function for i in range(3)]
    assert [w.index for w in workers] == [0, 1, 2]
    assert all(w.device == "cuda:0,cuda:1" and w.studies == ["mini-quick"] for w in workers)
    # The URL (a password, on a real cluster) is not in the 0644 job pickles: the jobs inherit it.
    assert os.environ[launch.STORAGE_ENV] == storage_url.resolve(".", pg_url)
    assert "#SBATCH --export=ALL" in text
    assert not any(pg_url.split("@")[1] in p.read_bytes().decode("latin-1") for p in logs.rglob("*.pkl"))
    # The grid was queued before submission: the jobs only have to claim it.
    study = load_study(storage_url.resolve(".", pg_url))
    assert sorted(t.state.name for t in study.trials) == ["WAITING"] * 3


@pytest.mark.parametrize(("argv", "expected"), [
    (["launch", "mini"], "launch: SLURM is the only launcher: add --slurm"),
    (["launch", "--slurm"], "launch: name the work"),
    (["launch", "--slurm", "mini", "--array", "0"], "--array: must be at least 1 (got 0)"),
    (["launch", "--slurm", "mini", "--time", "0"], "--time: must be at least 1 (got 0)"),
    (["launch", "--slurm", "mini"], "SQLite cannot be shared by workers on several nodes"),
    (["launch", "--slurm", "--executor", "local", "--study", "nope-quick"], "--study: nope-quick: no such study"),
])
def test_bad_launches_are_one_line_exit_2(argv, expected, tmp_path, capsys, monkeypatch, fake_slurm):
    monkeypatch.chdir(tmp_path)
    write_sweep(tmp_path, settings=ONE_SETTING)
    argv = [str(tmp_path / "mini.yaml") if a == "mini" else a for a in argv]
    rc, _, err = _cli(capsys, *argv, "--results-dir", str(tmp_path / "results"))
    assert rc == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and expected in err, err


def test_no_slurm_here_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    with pytest.raises(SpecError, match=r"--executor: slurm: no SLURM on this machine .*--executor local"):
        launch.make_executor("slurm", tmp_path, array=1, name="x", time_min=5, gpus_per_node=0)


@pytest.mark.slow
def test_local_executor_runs_a_real_tiny_study_to_completion(tmp_path):
    sweep = write_sweep(tmp_path, settings=[*ONE_SETTING, {"label": "original", "se": False}], seeds=1)
    results = tmp_path / "results"
    proc = ablate("launch", "--slurm", "--executor", "local", str(sweep), "--array", "2", "--wait",
                  "--results-dir", str(results), *set_options([*SMALL_QUICK, "train.epochs=1"]))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out, err[-3000:])
    assert "submitted 2 worker(s) for mini-quick (local)" in out
    study = load_study(results)
    assert completes_per_point(study) == {("r=16", 0): 1, ("original", 0): 1}
    assert len(study.trials) == 2
    logs = list((results / "launch").glob("*/*_log.out"))
    assert len(logs) == 2 and any("COMPLETE" in p.read_text() for p in logs)


@pytest.mark.slow
def test_preempted_worker_is_requeued_and_its_trial_resumes_from_the_checkpoint(tmp_path):
    results = tmp_path / "results"
    url = url_of(results)
    plans = make_plans(write_sweep(tmp_path, settings=ONE_SETTING, seeds=1), *SMALL_QUICK, "train.epochs=3")
    create_study(url, plans)
    executor = launch.make_executor("local", tmp_path / "logs", array=1, name="t", time_min=30, gpus_per_node=0)
    (job,) = launch.submit(executor, [launch.SlurmWorker(["mini-quick"], str(results), "cpu")], url)
    run_dir = results / "quick" / "mini" / "r=16" / "seed0"

    def first_attempt_past_epoch_1():
        (t,) = load_study(url).trials
        return t if t.state == TrialState.RUNNING and (run_dir / "checkpoint.pt").exists() else None

    victim = wait_for(first_attempt_past_epoch_1, 300, "the worker to finish epoch 1")
    os.kill(victim.user_attrs["pid"], signal.SIGUSR2)  # what SLURM sends before preempting the job
    assert job.result() == {"COMPLETE": 1}  # the requeued job carried on and finished the study

    study = load_study(url)
    first, retry = study.trials
    assert first.state == TrialState.FAIL and first.user_attrs["fail_reason"] == "interrupted"  # handed back
    assert retry.state == TrialState.COMPLETE and retry.system_attrs["failed_trial"] == first.number
    assert retry.user_attrs["pid"] != first.user_attrs["pid"]  # a new process: the requeued job
    assert retry.user_attrs["resumed_epochs"] >= 1  # from the run dir's checkpoint, not from scratch
    epochs = [line.split(",")[0] for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3"]
    log = (job.stdout() or "") + (job.stderr() or "")
    assert "this job is preempted" in log and "Requeued job" in log, log[-2000:]
