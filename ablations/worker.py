"""A worker: claims grid trials from its studies and trains them in this process, one after another.

Long-lived on purpose: the interpreter, torch, timm and the data load once per worker, not once per
trial. A worker reports what it does as small dict events through `emit` (a queue to the `ablate run`
process that draws the progress bars, or the bars themselves when it runs in-process).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import multiprocessing as mp
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ablations import resilience, rundir
from ablations.devices import TRIALS_PER_DEVICE_ENV, bind, is_group
from ablations.errors import ClaimLost, RunDirBusy, SpecError, TrialFailed, UserError, first_line
from ablations.grid import Plan, plan_from_attrs
from ablations.processes import die_with_multiprocessing_parent, sigterm_as_interrupt, worker_identity
from ablations.recovery import recover
from ablations.storage import grid_lock, load_named_study, open_storage
from ablations.tensorboard_log import EpochScalars
from ablations.trials import fail, grid_point, pop_waiting, requeue, trial_id, trials_in

POLL_S = 0.2  # idle workers look for requeued trials this often while others still run (a cheap query)
TRAINER = "ablations.train:train"
Emit = Callable[[dict[str, Any]], None]


# The failures that explain themselves in one line and end the trial FAILED: a diverged trial, and a
# bad input only a trial meets (e.g. a data root this machine lacks).
EXPECTED_FAILURES = (TrialFailed, SpecError)


def load_trainer(path: str = TRAINER) -> Callable[..., rundir.FinalRecord]:
    """`module:function` -> the train function (the contract of `train.train`)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def trainer_for(path: str, device: str | None) -> Callable[..., rundir.FinalRecord]:
    """The train function for `device`: a device group is one trial on all its devices (ddp.launch,
    which runs the trainer under torchrun), a single device the trainer itself, in this process."""
    if is_group(device):
        from ablations.ddp import launch

        return launch
    return load_trainer(path)


class Heartbeat:
    """Records the trial's heartbeat every HEARTBEAT_S from a thread, so an epoch longer than the grace
    period (ImageNet) never looks like a dead worker. Optuna's own heartbeat thread only runs inside
    study.optimize, which a grid of fixed trials does not use."""

    def __init__(self, storage: optuna.storages.RDBStorage, tid: int):
        self.storage, self.tid = storage, tid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{tid}", daemon=True)

    def _run(self) -> None:
        interval = resilience.heartbeat_s()
        while not self._stop.wait(interval):
            try:
                self.storage.record_heartbeat(self.tid)
            except Exception:  # noqa: BLE001 -- a locked database for a moment is no reason to stop training
                pass

    def __enter__(self) -> Heartbeat:
        self.storage.record_heartbeat(self.tid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_trial(storage: optuna.storages.RDBStorage, study: optuna.Study, plan: Plan, trial: FrozenTrial, *,
              results_dir: Path, device: str | None, data_root: str | None, emit: Emit,
              trainer: str, worker: int) -> str:
    """Train one claimed (RUNNING) trial into its run dir and finish it. Returns COMPLETE or FAIL."""
    train = trainer_for(trainer, device)
    label, seed = grid_point(trial)
    tid = trial_id(storage, study, trial.number)
    cfg = plan.config(label, seed)
    run_dir = plan.run_dir(results_dir, label, seed).resolve()
    base = {"worker": worker, "study": study.study_name, "number": trial.number, "setting": label, "seed": seed}
    started = time.monotonic()
    epochs_seen: list[int] = []
    scalars = EpochScalars(run_dir)  # TensorBoard, where it is installed

    def on_epoch(row: dict[str, float]) -> None:  # one metric row (rundir.METRIC_COLUMNS)
        epoch = int(row["epoch"])
        try:  # nothing here is worth stopping the training for while the storage is away a moment
            lost = storage.get_trial(tid).state != TrialState.RUNNING
            if not epochs_seen and epoch > 1:  # the trainer picked up a checkpoint: a retry resumed
                storage.set_trial_user_attr(tid, "resumed_epochs", epoch - 1)
            if math.isfinite(row["top1_err"]):
                storage.set_trial_intermediate_value(tid, epoch, float(row["top1_err"]))  # the dashboard's curves
        except Exception as e:
            if not resilience.transient(e):
                raise
            lost = False  # checked again next epoch
            emit({**base, "kind": "log", "text": f"warning: storage unreachable after epoch {epoch} "
                                                 f"({first_line(e)}); training on"})
        if lost:  # a retry owns the point now: stop before writing anything more
            raise ClaimLost(f"trial {trial.number} was declared dead and retried elsewhere")
        epochs_seen.append(epoch)
        scalars(row)
        emit({**base, "kind": "epoch", "epoch": epoch, "metrics": dict(row)})

    def hand_back(reason: str) -> None:
        """End this attempt without burning the point: FAIL it and queue the point again, so the next
        worker resumes from the checkpoint."""
        def give_back() -> None:
            with grid_lock(storage):
                if fail(storage, tid, reason):
                    requeue(study, storage.get_trial(tid))

        resilience.storage_call(give_back, storage.url)

    def end(state: str, reason: str) -> None:
        emit({**base, "kind": "end", "state": state, "value": None, "reason": reason,
              "seconds": time.monotonic() - started})

    def finish(state: str, value: float | None = None, reason: str | None = None) -> str:
        def tell() -> str:
            with grid_lock(storage):
                if state == "COMPLETE":
                    try:
                        storage.set_trial_state_values(tid, TrialState.COMPLETE, [value])
                    except optuna.exceptions.UpdateFinishedTrialError:
                        return "LOST"  # declared dead meanwhile; its retry finds final.json and finishes at once
                elif not fail(storage, tid, reason or "unknown"):
                    return "LOST"
            return state

        state = resilience.storage_call(tell, storage.url)  # a trained trial waits out a database restart
        emit({**base, "kind": "end", "state": state, "value": value, "reason": reason,
              "seconds": time.monotonic() - started})
        return state

    # What the storage holds for this trial (the claim wrote who we are: `recover` keys on it); each write
    # below is a transaction, so what is there already is not written again.
    stored = {**trial.user_attrs, "setting": label, "seed": seed}  # the grid point is the trial's params

    def store(attrs: dict[str, Any]) -> None:
        for key, value in attrs.items():
            if key not in stored or stored[key] != value:
                storage.set_trial_user_attr(tid, key, value)
                stored[key] = value

    def identify() -> None:  # where the trial trains
        with grid_lock(storage):
            store({"device": device or "auto", "run_dir": str(run_dir), "sweep": plan.sweep.name,
                   "profile": plan.profile.name})

    resilience.storage_call(identify, storage.url)
    emit({**base, "kind": "start", "epochs": cfg.train.epochs, "run_dir": str(run_dir)})
    with Heartbeat(storage, tid):
        try:
            # Waits out a worker that was declared dead but still holds the run dir (resilience.py).
            with resilience.run_dir_lock(run_dir, wait_s=resilience.grace_s()):
                final = train(cfg, run_dir, device=device, data_root=data_root, progress=False,
                              on_epoch=on_epoch)
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM, or SLURM preemption via submitit
            with contextlib.suppress(Exception):  # the exit must go on even with the storage gone
                hand_back("interrupted")
            end("INTERRUPTED", "interrupted")
            raise
        except ClaimLost as e:
            end("LOST", str(e))
            return "LOST"
        except RunDirBusy as e:
            hand_back(f"run dir busy: {e}")
            end("FAIL", str(e))
            return "FAIL"
        except EXPECTED_FAILURES as e:
            return finish("FAIL", reason=str(e))
        except Exception as e:  # noqa: BLE001 -- one broken trial must not stop the sweep
            if resilience.unwritable(e) is not None:  # ... but a read-only or full disk stops the worker
                hand_back(f"results dir not writable: {resilience.unwritable(e)}")
                end("INTERRUPTED", "results dir not writable")
                raise resilience.results_dir_error(Path(results_dir), e, "the trial was queued again") from None
            emit({**base, "kind": "log", "text": traceback.format_exc()})
            return finish("FAIL", reason=f"{type(e).__name__}: {e}".splitlines()[0])
        finally:
            scalars.close()
    resilience.storage_call(lambda: store(final.to_attrs()), storage.url)
    if not math.isfinite(final.top1_err):
        return finish("FAIL", reason=f"final top1_err is {final.top1_err!r}")
    return finish("COMPLETE", value=float(final.top1_err))


def _has_work(storage: optuna.storages.RDBStorage, loaded: list[tuple[optuna.Study, Plan]]) -> bool:
    """Whether any grid point is still queued or running (so a requeue may yet come our way)."""
    for study, _ in loaded:
        live = trials_in(storage, study, (TrialState.WAITING, TrialState.RUNNING))
        if any(grid_point(t) is not None for t in live):
            return True
    return False


def work(url: str, study_names: list[str], *, results_dir: str | Path, device: str | None,
         data_root: str | None, emit: Emit, trainer: str = TRAINER, worker: int = 0,
         tables_ready: bool = False) -> None:
    """Train queued trials of `study_names` (in that order) until none is queued or running anywhere.

    Waiting for trials other processes run is deliberate: if one of them dies, its trial is requeued
    (dead pid on this host at once, heartbeat grace period elsewhere) and one of us resumes it.
    `tables_ready`: started by `ablate run`, which has just opened the storage (storage.open_storage).
    """
    resilience.check_writable(Path(results_dir))  # before claiming anything
    if device is not None and not is_group(device):
        import torch

        bind(torch.device(device))  # this process's CUDA device from the start (devices.bind)
    storage = open_storage(url, tables_ready)
    loaded = []
    for name in study_names:
        study = load_named_study(storage, name)
        loaded.append((study, plan_from_attrs(name, study.user_attrs, data_root)))
    results_dir = Path(results_dir)
    while True:
        claimed = None
        for study, plan in loaded:
            def claim(study: optuna.Study = study) -> FrozenTrial | None:
                me = worker_identity()
                with grid_lock(storage):
                    # Retried after an outage, a claim may have gone through with its reply lost: the
                    # trial then carries our identity, and is ours (we train nothing while claiming).
                    running = trials_in(storage, study, (TrialState.RUNNING,))
                    for t in running:
                        if t.user_attrs.get("worker") == me["worker"]:
                            return t
                    recover(storage, study, running)
                    trial = pop_waiting(storage, study)
                    if trial is not None:  # in the lock: a claim and its owner are never apart for long
                        tid = trial_id(storage, study, trial.number)
                        for key, value in me.items():
                            storage.set_trial_user_attr(tid, key, value)
                    return trial

            trial = resilience.storage_call(claim, url)
            if trial is not None:
                claimed = (study, plan, trial)
                break
        if claimed is not None:
            study, plan, trial = claimed
            run_trial(storage, study, plan, trial, results_dir=results_dir, device=device,
                      data_root=plan.data_root, emit=emit, trainer=trainer, worker=worker)
        elif resilience.storage_call(lambda: _has_work(storage, loaded), url):
            time.sleep(POLL_S)
        else:
            return


# ---------------------------------------------------------------------------------------------------
# Worker processes of `ablate run --workers N`


# Imported once by the fork server the worker processes are forked from, while `ablate run` validates the
# sweep: each worker then starts with torch, timm and the trainer already loaded (~4 s on 2 cores),
# instead of paying for them in its first trial. Not scikit-learn: the digits are read without it.
# The last ones are what Optuna's RDB storage imports when a process opens its first one (0.5 s per
# worker, serialised by the storage lock); the fork server ignores a name that does not import.
PRELOAD = ("ablations.worker", "ablations.train", "ablations.data", "ablations.complexity", "ablations.probe",
           "ablations.patch", "timm", "torch.utils.tensorboard",
           "optuna.storages._rdb.models", "sqlalchemy.dialects.sqlite", "alembic.command", "alembic.config",
           "alembic.migration", "alembic.script")


def process_context(trainer: str = TRAINER) -> mp.context.BaseContext:
    """Where worker processes come from: a fork server (started now, if it is not running) that has
    imported PRELOAD and the trainer's module once; spawn where no fork server exists.

    Never plain fork: `ablate run` may hold CUDA or SQLite handles, the fork server holds neither.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([*PRELOAD, trainer.partition(":")[0]])  # no effect once it runs
    forkserver.ensure_running()
    return ctx


def process_main(url: str, study_names: list[str], results_dir: str, device: str | None,
                 data_root: str | None, queue: Any, worker: int, trainer: str, threads: int | None,
                 packed: int = 1) -> None:
    """Entry point of one worker process (see process_context). A worker whose `ablate run` is killed
    (even with -9) is killed too, instead of training on as an orphan; its trial stays RUNNING with a
    dead pid, which the next run on this host requeues at once. `packed`: workers on this one's device
    (the final records' trials_per_device; the trainer and DDP ranks read it from the environment)."""
    die_with_multiprocessing_parent()
    sigterm_as_interrupt()
    os.environ[TRIALS_PER_DEVICE_ENV] = str(packed)
    if threads is not None:  # N CPU workers share the cores; a profile's train.threads still wins
        import torch

        torch.set_num_threads(threads)
    try:
        work(url, study_names, results_dir=results_dir, device=device, data_root=data_root,
             emit=queue.put, trainer=trainer, worker=worker, tables_ready=True)
    except KeyboardInterrupt:
        pass
    except UserError as e:  # the machine, not a trial (results dir full, storage gone): one line, exit 2
        queue.put({"kind": "log", "text": f"error: {e}", "worker": worker})
        sys.exit(2)
    finally:
        queue.put({"kind": "exit", "worker": worker})
