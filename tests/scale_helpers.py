"""Shared pieces of the scale-out and fault tests: a tiny sweep, a study on any storage, counting results,
and a fake trainer with the real one's contract (importable by spawned workers, no torch import).

The fake trainer resumes from `checkpoint.json` in its run dir, sleeps FAKE_EPOCH_S per epoch (so a test
can kill it mid-epoch), appends one line per (re)start to calls.log (pid, start epoch, data root, epochs), fails on
FAKE_NAN_SETTING / crashes on FAKE_CRASH_SETTING, and writes final.json last. Its top-1 error is a fixed
function of (setting, seed), plus FAKE_NOISE times a standard normal draw seeded by (setting, seed): a spread
that is the same on every rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from ablations import scheduler, studies
from ablations.studies import grid_lock

ROOT = Path(__file__).resolve().parent.parent
FAKE = "scale_helpers:fake_train"
SETTINGS = [{"label": "r=16", "reduction": 16}, {"label": "r=8", "reduction": 8},
            {"label": "original", "se": False}]
# The quick profile shrunk to seconds per trial on one CPU thread (digits, 1 block per stage).
TINY = ["train.epochs=2", "backbone.layers=[1,1,1,1]"]


class TrialFailed(Exception):
    pass


def fake_train(cfg, out_dir, *, device=None, data_root=None, progress=True, on_epoch=None):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "final.json").exists():
        return json.loads((out / "final.json").read_text())
    ckpt = out / "checkpoint.json"
    start = json.loads(ckpt.read_text())["epoch"] if ckpt.exists() else 0
    with open(out / "calls.log", "a") as f:  # one line per time this run was (re)started
        f.write(f"{os.getpid()} {start} {data_root} {cfg.train.epochs}\n")
    for epoch in range(start + 1, cfg.train.epochs + 1):
        time.sleep(float(os.environ.get("FAKE_EPOCH_S", "0")))
        if cfg.setting == os.environ.get("FAKE_NAN_SETTING"):
            raise TrialFailed(f"loss became nan at epoch {epoch}")
        if cfg.setting == os.environ.get("FAKE_CRASH_SETTING"):
            raise RuntimeError("a bug in the trainer")
        ckpt.write_text(json.dumps({"epoch": epoch}))
        if on_epoch is not None:
            on_epoch({"epoch": epoch, "train_loss": 1.0 / epoch, "val_top1_err": 50.0 / epoch})
    noise = float(os.environ.get("FAKE_NOISE", "0")) * random.Random(f"{cfg.setting}|{cfg.seed}").gauss(0, 1)
    final = {"top1_err": 10.0 + cfg.seed + len(cfg.setting) / 10 + noise, "top5_err": 1.5, "val_loss": 0.5,
             "params_m": 0.4, "gflops": 0.01, "params": 400000, "macs": 10_000_000, "train_seconds": 0.1,
             "images_per_s": 100.0, "epochs": cfg.train.epochs, "device": device or "cpu",
             "versions": {"torch": "x"}, "git_commit": "abc", "sweep": cfg.sweep, "profile": cfg.profile,
             "setting": cfg.setting, "seed": cfg.seed, "worker_pid": os.getpid()}
    (out / "final.json").write_text(json.dumps(final))
    return final


def write_sweep(directory: Path, settings=None, seeds: int = 2, name: str = "mini") -> Path:
    settings = SETTINGS if settings is None else settings
    data = {"description": "scale-out test sweep", "table": 10, "seeds": seeds, "settings": settings}
    if any(s["label"] == "original" for s in settings):
        data["reference"] = "original"
    path = Path(directory) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def make_plans(sweep: Path, overrides=("train.epochs=3",), seeds: int | None = None):
    args = argparse.Namespace(sweeps=[str(sweep)], profile="quick", set=list(overrides), seeds=seeds,
                              data_root=None)
    return scheduler.plans_from_args(args)


def create_study(url: str, plans) -> optuna.Study:
    """What `ablate run` does before training: the study, its attrs and its queued grid."""
    storage = studies.open_storage(url)
    (plan,) = plans
    study = studies.open_study(storage, plan)
    with grid_lock(storage):
        studies.enqueue_missing(study, plan)
    return study


def load(url: str, name: str = "mini-quick") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=studies.open_storage(url))


def completes_per_point(study: optuna.Study) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        p = studies.grid_point(t)
        out[p] = out.get(p, 0) + 1
    return out


def calls(run_dir: Path) -> list[list[str]]:
    log = Path(run_dir) / "calls.log"
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def ablate(*argv: str, **extra_env: str) -> subprocess.Popen:
    """`ablate ...` as its own process (stdout and stderr captured)."""
    return subprocess.Popen([sys.executable, "-m", "ablations", *argv], cwd=ROOT, env=env(**extra_env),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    """Poll until `predicate()` returns something truthy (returned); fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 -- no database / study / file yet
            value = None
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def run_sweep_in_process(plans, url: str, results: str, epoch_s: str = "0") -> None:
    """Spawn target: one `ablate run` (one in-process worker, fake trainer) on `url`."""
    os.environ["FAKE_EPOCH_S"] = epoch_s
    sys.exit(scheduler.run(plans, url, Path(results), ["cpu"], 1, trainer=FAKE, bars=False))


def hold_grid_lock(url: str, seconds: float, stamps) -> None:
    """Spawn target: take the storage-wide grid lock, note when, keep it `seconds`, note the release."""
    storage = studies.open_storage(url)
    with grid_lock(storage):
        stamps.put(("held", time.time()))
        time.sleep(seconds)
        stamps.put(("released", time.time()))


def work_in_process(url: str, results: str, epoch_s: str = "0") -> None:
    """Spawn target: one worker (fake trainer) on every study in `url`, until nothing is left to do.
    ABLATE_* knobs must be in the parent's environment before the start: studies.py reads them on import."""
    os.environ["FAKE_EPOCH_S"] = epoch_s
    from ablations import worker

    names = [s.study_name for s in optuna.get_all_study_summaries(url)]
    worker.work(url, names, results_dir=results, device="cpu", data_root=None, emit=lambda ev: None,
                trainer=FAKE)
