"""`ablate launch --slurm`: workers as a SLURM job array through submitit, requeued on preemption.

The launcher does what `ablate run` does before training (validate, create or load the studies, requeue
what dead workers left, queue the grid) and then submits `--array N` jobs, each one ordinary worker
(worker.work) on the study's storage: workers on any number of nodes share the study exactly as workers
on one machine do, through the grid lock of the storage (PostgreSQL for a real cluster).

Preemption and time limits: SLURM signals the job (USR2, `signal_delay_s` before the kill); submitit
calls `SlurmWorker.checkpoint`, which resubmits the same worker, and requeues the job. The signal arrives
as SystemExit in the worker, which hands its trial back to the queue (worker.run_trial), so whichever
worker claims it next, here or on another node, resumes it from the last checkpoint in its run dir.
`--executor local` runs the same jobs as local processes (submitit's LocalExecutor, which requeues the
same way): for a single box, and for the tests.

The storage URL may hold a database password, and submitit pickles each job's function into its folder
(0644). So the URL is not part of the job: it travels in the environment (STORAGE_ENV), which sbatch
passes on (`--export=ALL`) and the local executor inherits, and is read back when the job starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablations import storage_url
from ablations.bundled import ROOT
from ablations.errors import SpecError
from ablations.storage_url import shown

SIGNAL_DELAY_S = 120  # SLURM's warning before a preemption/time-limit kill: an epoch boundary is not needed
DEFAULT_TIME_MIN = 24 * 60
STORAGE_ENV = "ABLATE_STORAGE_URL"  # the jobs' storage URL: in their environment, never in a file


try:
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError:  # the `scale` extra is not installed: say so when someone launches, not on import
    Checkpointable, DelayedSubmission = object, None


@dataclass
class SlurmWorker(Checkpointable):
    """One array task: a worker on `studies` until nothing is queued or running. Picklable by design:
    submitit ships it to the node and, on preemption, pickles it again as its own requeued job."""

    studies: list[str]
    results_dir: str
    device: str | None
    data_root: str | None = None
    index: int = 0

    def __call__(self) -> dict[str, int]:
        from ablations import worker
        from ablations.grid import plan_from_attrs, point_states
        from ablations.storage import load_named_study, open_storage

        started = time.monotonic()
        url = os.environ.get(STORAGE_ENV)
        if not url:
            raise SpecError("not set: this job did not inherit the environment of `ablate launch` "
                            "(sbatch --export=ALL passes it on)", source="environment", key=STORAGE_ENV)

        def emit(ev: dict[str, Any]) -> None:  # one line per finished trial in the job's log
            if ev["kind"] == "end":
                print(f"[worker {self.index}] {ev['study']} {ev['setting']} seed{ev['seed']}: {ev['state']} "
                      f"{ev.get('value') if ev['state'] == 'COMPLETE' else ev.get('reason') or ''} "
                      f"({ev['seconds']:.0f} s)", flush=True)
            elif ev["kind"] == "log":
                print(ev["text"].rstrip(), file=sys.stderr, flush=True)

        print(f"[worker {self.index}] on {self.device or 'the default device'}: {', '.join(self.studies)} "
              f"in {shown(url)}", flush=True)
        worker.work(url, self.studies, results_dir=self.results_dir, device=self.device,
                    data_root=self.data_root, emit=emit)
        storage = open_storage(url)
        counts: dict[str, int] = {}
        for name in self.studies:
            study = load_named_study(storage, name)
            plan = plan_from_attrs(name, study.user_attrs)
            for state in point_states(study.get_trials(deepcopy=False), plan.grid()).values():
                counts[state] = counts.get(state, 0) + 1
        print(f"[worker {self.index}] done after {time.monotonic() - started:.0f} s: {counts}", flush=True)
        return counts

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        # The trial's own state is its run dir's checkpoint; the worker's state is its arguments.
        return DelayedSubmission(self, *args, **kwargs)


def task_device(gpus_per_node: int) -> str:
    """What each array task trains on: its node's GPUs as one DDP group (SLURM numbers the ones it
    granted from cuda:0), one GPU, or the CPU."""
    if gpus_per_node <= 0:
        return "cpu"
    return ",".join(f"cuda:{i}" for i in range(gpus_per_node))


def make_executor(kind: str, folder: Path, *, array: int, name: str, time_min: int, gpus_per_node: int,
                  partition: str | None = None, cpus_per_task: int | None = None,
                  mem_gb: float | None = None) -> Any:
    try:
        import submitit
    except ImportError:
        raise SpecError("needs submitit (pip install -e '.[scale]')", source="--slurm") from None
    try:
        executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=kind)
    except RuntimeError as e:  # SlurmExecutor: "Could not detect srun"
        raise SpecError(f"no SLURM on this machine ({e}); --executor local runs the workers here",
                        source="--executor", key=kind) from None
    # The jobs import this checkout (shared file system), installed or not.
    setup = [f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"]
    params: dict[str, Any] = {
        "name": name, "timeout_min": time_min, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": gpus_per_node,
        "slurm_array_parallelism": array, "slurm_signal_delay_s": SIGNAL_DELAY_S,
        # Preemption requeues through `scontrol requeue`, which SLURM allows only for requeueable jobs.
        # The jobs read the storage URL from the environment they inherit (STORAGE_ENV).
        "slurm_additional_parameters": {"requeue": True, "export": "ALL"}, "slurm_setup": setup,
        "local_setup": setup,
    }
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    if mem_gb:
        params["mem_gb"] = mem_gb
    if partition:
        params["slurm_partition"] = partition
    executor.update_parameters(**params)
    return executor


def submit(executor: Any, workers: list[SlurmWorker], url: str) -> list[Any]:
    """Submit the workers together (on SLURM one job array), with the storage URL in the environment
    they inherit."""
    os.environ[STORAGE_ENV] = url
    with executor.batch():
        jobs = [executor.submit(w) for w in workers]
    return jobs


def prepare(args: argparse.Namespace) -> tuple[str, list[str]]:
    """Open the storage, create/load the studies, recover and queue their grids (as `ablate run` does).
    Returns (storage URL, study names)."""
    from ablations import grid
    from ablations.planning import check_decode_devices, plans_from_args
    from ablations.recovery import recover
    from ablations.storage import grid_lock, load_named_study, open_storage
    from ablations.study_notes import save_study_note

    results_dir = Path(args.results_dir).resolve()  # jobs may start elsewhere
    url = storage_url.resolve(results_dir, args.storage)
    if storage_url.sqlite_path(url) is not None and args.executor == "slurm":
        raise SpecError("SQLite cannot be shared by workers on several nodes (its locks do not hold on "
                        "network file systems); use postgresql://user@host/db", source="--storage",
                        key=shown(url))
    plans = plans_from_args(args) if args.sweeps else []
    check_decode_devices(plans, [task_device(args.gpus_per_node)])
    storage = open_storage(url)
    loaded = [(grid.open_study(storage, plan), plan) for plan in plans]
    for study, plan in loaded:
        save_study_note(storage, study, plan)
    for name in args.study:
        if any(s.study_name == name for s, _ in loaded):
            continue
        study = load_named_study(storage, name)
        loaded.append((study, grid.plan_from_attrs(name, study.user_attrs, args.data_root)))
    with grid_lock(storage):
        for study, plan in loaded:
            recover(storage, study)
            grid.enqueue_missing(study, plan)
    return url, [study.study_name for study, _ in loaded]
