"""Training a run's studies with worker processes: open the studies, requeue what dead workers left,
queue the grid points that have no trial, then N workers (one in this process, or N spawned ones pinned
round-robin to the devices) until nothing is queued or running; a worker that dies is replaced.

Exit status: 0 when every grid point is COMPLETE, 1 when one is not.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import sys
import threading
from pathlib import Path

import optuna
from tqdm import tqdm

from ablations import resilience, storage_url, worker
from ablations.devices import packing
from ablations.grid import Plan, enqueue_missing, open_study, point_states
from ablations.processes import usable_cores
from ablations.progress import Progress, outcome, start_summary
from ablations.recovery import recover
from ablations.storage import grid_lock, open_storage
from ablations.study_notes import save_study_note


def _cpu_threads(plans: list[Plan], devices: list[str], workers: int) -> int | None:
    """Torch threads per worker when several CPU workers share the machine and the profile leaves it
    open (None: leave it to the trainer, which applies train.threads)."""
    if workers <= 1 or any(d != "cpu" for d in devices) or all(p.profile.train.threads for p in plans):
        return None
    return max(1, usable_cores() // workers)


def _spawn(url: str, names: list[str], results_dir: Path, devices: list[str], workers: int,
           progress: Progress, trainer: str, threads: int | None) -> None:
    """Run `workers` worker processes and feed their events to `progress` until all have exited.

    A worker that dies (OOM killer, segfault) leaves its trial RUNNING with a dead pid: requeue it at
    once and start a replacement, a bounded number of times.
    """
    ctx = worker.process_context(trainer)
    events = ctx.Queue()
    storage = progress.storage

    packed = packing(devices, workers)

    def start(w: int) -> mp.process.BaseProcess:
        p = ctx.Process(target=worker.process_main, name=f"ablate-worker-{w}",
                        args=(url, names, str(results_dir), devices[w % len(devices)], None, events, w,
                              trainer, threads, packed[w]))
        p.start()
        return p

    procs = {w: start(w) for w in range(workers)}
    respawns = 0

    def drain(timeout: float) -> set[int]:
        """Handle the queued events (waiting up to `timeout` for the first); the workers that said "exit"."""
        exiting = set()
        try:
            ev = events.get(timeout=timeout)
            while True:
                progress.handle(ev)
                if ev["kind"] == "exit":
                    exiting.add(ev["worker"])
                ev = events.get_nowait()
        except queue.Empty:
            pass
        return exiting

    try:
        while procs:
            exiting = drain(0.1)  # also how soon a dead worker is noticed
            for w, p in list(procs.items()):
                if w in exiting:
                    p.join(timeout=5)  # its last event is out: it is ending now
                if p.is_alive():
                    continue
                p.join()
                del procs[w]
                if p.exitcode == 0:
                    continue
                progress.log(f"worker {w} ({devices[w % len(devices)]}) died (exit code {p.exitcode})")
                with grid_lock(storage):
                    requeued = [n for s, _ in progress.loaded for n in recover(storage, s)]
                # Exit status 2: it stopped on a machine problem it reported; a new one would stop too.
                if requeued and respawns < 2 * workers and p.exitcode != 2:
                    respawns += 1
                    procs[w] = start(w)
        drain(0)  # a worker's queued events are all readable once it has exited
    except KeyboardInterrupt:
        # Ctrl-C reached the workers too (same process group); a lone SIGTERM to us did not.
        for p in procs.values():
            p.join(timeout=15)
            if p.is_alive():
                p.terminate()  # SIGTERM: the worker requeues its trial and exits
                p.join(timeout=15)
            if p.is_alive():
                p.kill()
        raise


def run(plans: list[Plan], url: str, results_dir: Path, devices: list[str], workers: int, *,
        trainer: str = worker.TRAINER, bars: bool | None = None, tables: bool = True) -> int:
    """Open the studies, queue their grids, train with `workers` workers, print tables (unless
    `tables` is off); exit status."""
    resilience.check_writable(Path(results_dir))  # a read-only or full results dir: one line, before any study changes
    storage = open_storage(url)
    loaded = [(open_study(storage, plan), plan) for plan in plans]
    with grid_lock(storage):
        for study, plan in loaded:
            recover(storage, study)
            enqueue_missing(study, plan)
    notes = threading.Thread(target=_save_notes, args=(storage, loaded), name="study-notes", daemon=True)
    notes.start()  # beside the first trials rather than before them
    queued = sum(1 for study, plan in loaded
                 for s in point_states(study.get_trials(deepcopy=False), plan.grid()).values()
                 if s == "WAITING")
    progress = Progress(storage, loaded, results_dir, url, bars=bars, tables=tables)
    names = [study.study_name for study, _ in loaded]
    workers = max(1, min(workers, queued))
    if queued:
        progress.log(start_summary(loaded, queued, workers, devices, storage_url.shown(url), results_dir))
    if workers == 1:  # in-process: no interpreter start-up, and Ctrl-C / kill -9 need no plumbing
        worker.work(url, names, results_dir=results_dir, device=devices[0], data_root=None,
                    emit=progress.handle, trainer=trainer)
    else:
        _spawn(url, names, results_dir, devices, workers, progress, trainer,
               _cpu_threads(plans, devices, workers))
    notes.join()
    return outcome(progress)


def _save_notes(storage: optuna.storages.RDBStorage, loaded: list[tuple[optuna.Study, Plan]]) -> None:
    for study, plan in loaded:
        try:
            resilience.storage_call(lambda study=study, plan=plan: save_study_note(storage, study, plan),
                                    storage.url)
        except Exception as e:  # noqa: BLE001 -- a missing note must not cost the sweep
            tqdm.write(f"warning: could not save the dashboard note of {study.study_name}: {e}", file=sys.stderr)
