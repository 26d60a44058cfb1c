"""`ablate run / worker / status`: whole sweeps as Optuna studies, trained by long-lived workers.

`run`: validate everything (sweep files, profile, options, that every setting builds) before touching
the storage -> create or load one study per (sweep, profile) -> requeue what dead workers left, queue the
grid points that have no trial -> N workers (one runs in this process, more are spawned, each pinned to a
device) -> one progress bar for the sweep plus one per running trial -> each sweep's table when it ends.
Exit status 0 when every grid point is COMPLETE, 1 when one failed, 2 for bad input, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import re
import signal
import statistics
import sys
import threading
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from ablations import resilience, storage_url, studies, worker
from ablations.errors import SpecError
from ablations.paths import check_results_dir
from ablations.spec import MAX_SEEDS, load_profile, load_sweep, run_config
from ablations.studies import Plan, grid_lock

# ---------------------------------------------------------------------------------------------------
# Validation (nothing here touches the storage)


def resolve_devices(spec: str | None) -> list[str]:
    """`cpu`, `cuda`, `cuda:1,cuda:2`, `mps` -> devices that exist here; None -> every GPU, else cpu."""
    if spec is None:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise SpecError("needs at least one device", source="--devices")
    if "cuda" in devices:  # "every GPU here", with or without --nproc-per-node
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise SpecError("unknown device (available here: cpu)", source="--devices", key="cuda")
        devices = [x for d in devices for x in ([f"cuda:{i}" for i in range(n)] if d == "cuda" else [d])]
    for d in devices:
        if d == "cpu":
            continue
        m = re.fullmatch(r"cuda(?::(\d+))?|mps", d)
        import torch

        if m and d == "mps":
            ok = torch.backends.mps.is_available()
        elif m:
            ok = torch.cuda.is_available() and int(m.group(1) or 0) < torch.cuda.device_count()
        else:
            ok = False
        if not ok:
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            have = ", ".join(["cpu", *(f"cuda:{i}" for i in range(n))])
            raise SpecError(f"unknown device (available here: {have})", source="--devices", key=d)
    return devices


def plans_from_args(args: argparse.Namespace) -> list[Plan]:
    """Every sweep x the profile, validated down to building each setting's model (on the meta device)
    and to what its data needs (classes, split, data root): nothing after this fails on bad input."""
    from ablations.datacheck import check_plan_data
    from ablations.patch import check_fits

    if args.seeds is not None and not 0 < args.seeds <= MAX_SEEDS:
        raise SpecError(f"must be a positive integer up to {MAX_SEEDS} (got {args.seeds})", source="--seeds")
    profile = load_profile(args.profile, args.set)
    profile_source = f"{profile.path} (with --set)" if args.set else str(profile.path)
    plans: list[Plan] = []
    for name in args.sweeps:
        sweep = load_sweep(name)
        same = next((p.sweep for p in plans if p.sweep.name == sweep.name), None)
        if same is not None:
            if Path(same.path or "").resolve() == Path(sweep.path or "").resolve():
                continue  # the same file named twice
            raise SpecError(f"sweep name {sweep.name!r} is also the name of {same.path}: one study per name "
                            "(set `name:` in one of them)", source=sweep.path, key="name")
        for i, setting in enumerate(sweep.settings):
            try:
                cfg = run_config(profile, setting, 0, sweep.name)
                check_fits(cfg.backbone, cfg.se)
            except SpecError as e:
                raise SpecError(e.message, source=sweep.path, key=".".join(
                    p for p in (f"settings[{i}]", e.key) if p)) from None
        check_plan_data(sweep, profile, args.data_root, profile_source, getattr(args, "nproc_per_node", 1))
        plans.append(Plan(sweep, profile, args.seeds or sweep.seeds, tuple(args.set), args.data_root))
    return plans


def check_decode_devices(plans: list[Plan], devices: list[str]) -> None:
    """`data.decode: gpu` on a CPU device, refused before any study or trial changes."""
    from ablations.data import check_decode_device

    for plan in plans:
        for device in devices:
            check_decode_device(plan.profile.data, device)


def _check_scale_options(args: argparse.Namespace, workers: int | None = None) -> None:
    if workers is not None and workers <= 0:
        raise SpecError(f"must be a positive integer (got {workers})", source="--workers")
    if args.nproc_per_node < 1:
        raise SpecError(f"must be a positive integer (got {args.nproc_per_node})", source="--nproc-per-node")


# ---------------------------------------------------------------------------------------------------
# Progress


def _short(metrics: dict[str, Any]) -> dict[str, str]:
    keys = ("train_loss", "loss", "val_loss", "val_top1_err", "top1_err")
    return {k: f"{metrics[k]:.3g}" for k in keys if isinstance(metrics.get(k), (int, float))}


def summary(results_dir: Path, url: str, plan: Plan) -> str:
    """The sweep's table, as the analysis renders it (also written under <results>/<profile>/<sweep>/)."""
    from analysis.tables import sweep_summary

    return sweep_summary(Path(results_dir), url, plan.sweep, plan.profile.name)


def print_table(results_dir: Path, url: str, plan: Plan) -> None:
    """The sweep's table on stdout (and written beside its results), or a warning if it cannot be built."""
    try:
        text = summary(results_dir, url, plan)
    except Exception as e:  # noqa: BLE001 -- a table bug must not hide the sweep's outcome
        tqdm.write(f"warning: could not build the table of {plan.study_name}: {type(e).__name__}: {e}",
                   file=sys.stderr)
        return
    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


class Progress:
    """Consumes worker events: a bar over every grid point of the run (done / running / failed), one
    epoch bar per busy worker, and each sweep's table the moment its last point finishes. Without a
    terminal (make in CI, a log file) bars are off and each finished trial is one line instead."""

    def __init__(self, storage: optuna.storages.RDBStorage, loaded: list[tuple[optuna.Study, Plan]],
                 results_dir: Path, url: str, bars: bool | None = None, tables: bool = True):
        self.storage, self.loaded, self.results_dir, self.url = storage, loaded, results_dir, url
        self.tables = tables  # off for a round of `--precision`: only the last round's table is shown
        self.bars = sys.stderr.isatty() if bars is None else bars
        self.total = sum(len(p.grid()) for _, p in loaded)
        desc = loaded[0][0].study_name if len(loaded) == 1 else f"{len(loaded)} sweeps"
        self.bar = tqdm(total=self.total, desc=desc, unit="trial", position=0, disable=not self.bars,
                        dynamic_ncols=True, file=sys.stderr)
        self.trial_bars: dict[int, tqdm] = {}
        self.printed: set[str] = set()
        self.counts: Counter[str] = Counter()
        self.refresh()
        self.shown = self.bar.n  # finished points when the run started: the next line says one more

    def log(self, text: str) -> None:
        tqdm.write(text, file=sys.stderr)

    def refresh(self) -> None:
        """Recount from the storage (other processes finish points too) and print finished sweeps."""
        counts: Counter[str] = Counter()
        for study, plan in self.loaded:
            states = studies.point_states(study.get_trials(deepcopy=False), plan.grid())
            counts.update(states.values())
            if (self.tables and study.study_name not in self.printed
                    and all(s in ("COMPLETE", "FAIL") for s in states.values())):
                self.printed.add(study.study_name)
                self.print_table(plan)
        self.counts = counts
        self.bar.n = counts["COMPLETE"] + counts["FAIL"]
        self.bar.set_postfix_str(f"done={counts['COMPLETE']} running={counts['RUNNING']} failed={counts['FAIL']}")

    def print_table(self, plan: Plan) -> None:
        print_table(self.results_dir, self.url, plan)

    def handle(self, ev: dict[str, Any]) -> None:
        kind, w = ev["kind"], ev.get("worker", 0)
        label = f"{ev.get('setting')} seed{ev.get('seed')}"
        if kind == "start" and self.bars:
            bar = self.trial_bars.get(w)
            if bar is None:
                bar = self.trial_bars[w] = tqdm(total=ev["epochs"], position=w + 1, unit="ep", leave=False,
                                                dynamic_ncols=True, file=sys.stderr)
            bar.reset(total=ev["epochs"])
            bar.set_description(f"  {label}")
        elif kind == "epoch" and w in self.trial_bars:
            bar = self.trial_bars[w]
            bar.n = min(ev["epoch"], bar.total or ev["epoch"])
            bar.set_postfix(_short(ev["metrics"]))
        elif kind == "end":
            self.refresh()
            # Two workers that finish together both find 2 more points done: one number each.
            done = self.shown = min(self.counts["COMPLETE"] + self.counts["FAIL"], self.shown + 1)
            if ev["state"] == "COMPLETE" and not self.bars:
                self.log(f"[{done}/{self.total}] {ev['study']} {label}: top1_err {ev['value']:.2f}% "
                         f"({ev['seconds']:.0f} s)")
            elif ev["state"] == "FAIL":
                self.log(f"[{done}/{self.total}] {ev['study']} {label}: FAILED: {ev['reason']}")
        elif kind == "log":
            self.log(ev["text"].rstrip())
        elif kind == "exit" and w in self.trial_bars:
            self.trial_bars.pop(w).close()

    def close(self) -> None:
        for bar in self.trial_bars.values():
            bar.close()
        self.bar.close()


def _outcome(progress: Progress) -> int:
    """Print what did not complete and return the exit status (0 all COMPLETE, 1 otherwise)."""
    progress.refresh()
    problems = []
    for study, plan in progress.loaded:
        trials = study.get_trials(deepcopy=False)
        for (label, seed), state in studies.point_states(trials, plan.grid()).items():
            if state == "COMPLETE":
                continue
            reasons = [t.user_attrs.get("fail_reason") for t in trials
                       if studies.grid_point(t) == (label, seed) and t.state == TrialState.FAIL]
            why = f": {reasons[-1]}" if state == "FAIL" and reasons and reasons[-1] else ""
            problems.append(f"  {study.study_name} {label} seed{seed}: {state}{why}")
    progress.close()
    if problems:
        print(f"{len(problems)} grid point(s) did not complete:", file=sys.stderr)
        print("\n".join(problems), file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------
# Running


def _cpu_threads(plans: list[Plan], devices: list[str], workers: int) -> int | None:
    """Torch threads per worker when several CPU workers share the machine and the profile leaves it
    open (None: leave it to the trainer, which applies train.threads)."""
    if workers <= 1 or any(d != "cpu" for d in devices) or all(p.profile.train.threads for p in plans):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


def _spawn(url: str, names: list[str], results_dir: Path, devices: list[str], workers: int,
           progress: Progress, trainer: str, threads: int | None) -> None:
    """Run `workers` worker processes and feed their events to `progress` until all have exited.

    A worker that dies (OOM killer, segfault) leaves its trial RUNNING with a dead pid: requeue it at
    once and start a replacement, a bounded number of times.
    """
    ctx = worker.process_context(trainer)
    events = ctx.Queue()
    storage = progress.storage

    def start(w: int) -> mp.process.BaseProcess:
        p = ctx.Process(target=worker.process_main, name=f"ablate-worker-{w}",
                        args=(url, names, str(results_dir), devices[w % len(devices)], None, events, w,
                              trainer, threads))
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
                    requeued = [n for s, _ in progress.loaded for n in studies.recover(storage, s)]
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
    storage = studies.open_storage(url)
    loaded = [(studies.open_study(storage, plan, note=False), plan) for plan in plans]
    with grid_lock(storage):
        for study, plan in loaded:
            studies.recover(storage, study)
            studies.enqueue_missing(study, plan)
    notes = threading.Thread(target=_save_notes, args=(storage, loaded), name="study-notes", daemon=True)
    notes.start()  # beside the first trials rather than before them
    queued = sum(1 for study, plan in loaded
                 for s in studies.point_states(study.get_trials(deepcopy=False), plan.grid()).values()
                 if s == "WAITING")
    progress = Progress(storage, loaded, results_dir, url, bars=bars, tables=tables)
    names = [study.study_name for study, _ in loaded]
    workers = max(1, min(workers, queued))
    if workers == 1:  # in-process: no interpreter start-up, and Ctrl-C / kill -9 need no plumbing
        worker.work(url, names, results_dir=results_dir, device=devices[0], data_root=None,
                    emit=progress.handle, trainer=trainer)
    else:
        _spawn(url, names, results_dir, devices, workers, progress, trainer,
               _cpu_threads(plans, devices, workers))
    notes.join()
    return _outcome(progress)


def _save_notes(storage: optuna.storages.RDBStorage, loaded: list[tuple[optuna.Study, Plan]]) -> None:
    from ablations.dashboard import save_study_note

    for study, plan in loaded:
        try:
            resilience.storage_call(lambda study=study, plan=plan: save_study_note(storage, study, plan),
                                    storage.url)
        except Exception as e:  # noqa: BLE001 -- a missing note must not cost the sweep
            tqdm.write(f"warning: could not save the dashboard note of {study.study_name}: {e}", file=sys.stderr)


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cli_run(args: argparse.Namespace) -> int:
    _check_scale_options(args, args.workers)
    if args.workers > 1:  # the workers' imports (seconds) overlap the validation below
        worker.process_context()
    from ablations.ddp import device_groups  # --nproc-per-node N: each worker trains on N devices (DDP)

    devices = device_groups(resolve_devices(args.devices), args.nproc_per_node)
    url = studies.storage_url(args.results_dir, args.storage)
    plans = plans_from_args(args)
    check_decode_devices(plans, devices)
    from ablations import rounds

    by_precision = rounds.options(args, plans)  # (precision, max seeds), or None for fixed seeds
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # `kill` requeues trials like Ctrl-C does
    if by_precision is not None:
        return rounds.run(plans, url, Path(args.results_dir), devices, args.workers, *by_precision)
    return run(plans, url, Path(args.results_dir), devices, args.workers)


def cli_worker(args: argparse.Namespace) -> int:
    _check_scale_options(args)
    from ablations.ddp import worker_device

    device = worker_device(args.device, args.nproc_per_node, resolve_devices)
    url = storage_url.existing(args.results_dir, args.storage)
    if url is None:
        raise SpecError("no such database (start the sweep with `ablate run` first)", source="--storage",
                        key=storage_url.shown(storage_url.resolve(args.results_dir, args.storage)))
    storage = studies.open_storage(url)
    study = load_named_study(storage, args.study)
    plan = studies.plan_from_attrs(args.study, study.user_attrs, args.data_root)
    check_decode_devices([plan], [device or resolve_devices(None)[0]])  # None: the trainer's default
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    progress = Progress(storage, [(study, plan)], Path(args.results_dir), url)
    worker.work(url, [args.study], results_dir=Path(args.results_dir), device=device, data_root=args.data_root,
                emit=progress.handle)
    return _outcome(progress)


# ---------------------------------------------------------------------------------------------------
# Status


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def study_status(study: optuna.Study, now: datetime | None = None) -> dict[str, Any]:
    """Counts per grid point (or per trial for a study `ablate run` did not create) and an ETA.

    ETA: the median wall time of a completed trial, times the queued points, plus what the running ones
    still need, spread over as many workers as are running now.
    """
    now = now or datetime.now()
    trials = study.get_trials(deepcopy=False)
    attrs = study.user_attrs
    try:
        counts = Counter(studies.point_counts(trials, [str(x) for x in attrs["settings"]], int(attrs["seeds"])))
    except (KeyError, TypeError, ValueError):  # not a grid study (or not a whole one): count its trials
        counts = Counter(t.state.name for t in trials)
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                 if t.state == TrialState.COMPLETE and t.datetime_start and t.datetime_complete]
    typical = statistics.median(durations) if durations else None
    running = [t for t in trials if t.state == TrialState.RUNNING]
    eta: float | None = 0.0
    if counts["WAITING"] or counts["RUNNING"]:
        if typical is None:
            eta = None
        else:
            left = sum(max(0.0, typical - (now - t.datetime_start).total_seconds()) for t in running
                       if t.datetime_start)
            eta = (counts["WAITING"] * typical + left) / max(1, len(running))
    return {
        "study": study.study_name,
        "points": sum(counts.values()),
        "done": counts["COMPLETE"],
        "running": counts["RUNNING"],
        "queued": counts["WAITING"],
        "failed": counts["FAIL"],
        "missing": counts["MISSING"],
        "eta": "-" if eta == 0.0 else _fmt_duration(eta),
    }


def load_named_study(storage: optuna.storages.RDBStorage, name: str) -> optuna.Study:
    """The study called `name`, or one line naming the studies the storage does have."""
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        have = ", ".join(s.study_name for s in storage.get_all_studies()) or "none"
        raise SpecError(f"no such study in {storage_url.shown(storage.url)} (have: {have})", source="--study",
                        key=name) from None


def cli_status(args: argparse.Namespace) -> int:
    if args.storage is None:
        check_results_dir(args.results_dir)
    url = storage_url.existing(args.results_dir, args.storage)
    if url is None:  # a SQLite --storage that does not exist: reading must not create it
        raise SpecError("no such database", source="--storage", key=storage_url.shown(args.storage))
    storage = studies.open_storage(url)
    with storage_url.reading(url):
        rows = [study_status(optuna.load_study(study_name=s.study_name, storage=storage))
                for s in storage.get_all_studies()]
    if not rows:
        print(f"no studies in {storage_url.shown(url)}")
        return 0
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print(f"storage: {storage_url.shown(url)}")
    print("  ".join(c.ljust(width[c]) if c == "study" else c.rjust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(width[c]) if c == "study" else str(r[c]).rjust(width[c]) for c in cols))
    return 0
