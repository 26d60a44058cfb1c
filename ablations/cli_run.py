"""`ablate run | worker | status | dashboard | launch`: the commands that work on studies. Each checks
its options, then calls the module that does the work (planning, supervisor, rounds, worker, progress,
launch)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from wsgiref.simple_server import make_server

from ablations import rundir, storage_url
from ablations.devices import device_groups, resolve_devices, worker_device
from ablations.errors import SpecError
from ablations.options import check_port, check_results_dir
from ablations.processes import sigterm_as_interrupt


def cli_run(args: argparse.Namespace) -> int:
    from ablations import worker
    from ablations.planning import check_decode_devices, check_scale_options, plans_from_args

    check_scale_options(args, args.workers)
    if args.workers > 1:  # the workers' imports (seconds) overlap the validation below
        worker.process_context()
    from ablations import rounds, supervisor

    # --nproc-per-node N: each worker trains on N devices (DDP)
    devices = device_groups(resolve_devices(args.devices), args.nproc_per_node)
    url = storage_url.resolve(args.results_dir, args.storage)
    plans = plans_from_args(args)
    check_decode_devices(plans, devices)
    by_precision = rounds.options(args, plans)  # (precision, max seeds), or None for fixed seeds
    sigterm_as_interrupt()  # `kill` requeues trials like Ctrl-C does
    if by_precision is not None:
        return rounds.run(plans, url, Path(args.results_dir), devices, args.workers, *by_precision)
    return supervisor.run(plans, url, Path(args.results_dir), devices, args.workers)


def cli_worker(args: argparse.Namespace) -> int:
    from ablations import worker
    from ablations.grid import plan_from_attrs
    from ablations.planning import check_decode_devices, check_scale_options
    from ablations.progress import Progress, outcome
    from ablations.storage import load_named_study, open_storage

    check_scale_options(args)
    device = worker_device(args.device, args.nproc_per_node)
    url = storage_url.existing(args.results_dir, args.storage)
    if url is None:
        raise SpecError("no such database (start the sweep with `ablate run` first)", source="--storage",
                        key=storage_url.shown(storage_url.resolve(args.results_dir, args.storage)))
    storage = open_storage(url)
    study = load_named_study(storage, args.study)
    plan = plan_from_attrs(args.study, study.user_attrs, args.data_root)
    check_decode_devices([plan], [device or resolve_devices(None)[0]])  # None: the trainer's default
    sigterm_as_interrupt()
    progress = Progress(storage, [(study, plan)], Path(args.results_dir), url)
    worker.work(url, [args.study], results_dir=Path(args.results_dir), device=device, data_root=args.data_root,
                emit=progress.handle)
    return outcome(progress)


def cli_status(args: argparse.Namespace) -> int:
    import optuna

    from ablations.progress import study_status
    from ablations.storage import open_storage

    if args.storage is None:
        check_results_dir(args.results_dir)
    url = storage_url.existing(args.results_dir, args.storage)
    if url is None:  # a SQLite --storage that does not exist: reading must not create it
        raise SpecError("no such database", source="--storage", key=storage_url.shown(args.storage))
    storage = open_storage(url)
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

def cli_dashboard(args: argparse.Namespace) -> int:
    """optuna-dashboard on the storage, bound to 127.0.0.1 unless --host says otherwise."""
    from ablations.storage import open_storage

    check_port(args.port)
    url = storage_url.resolve(args.results_dir, args.storage)
    storage = open_storage(url)
    from optuna_dashboard import wsgi  # seconds: only once the options are known to be good

    try:
        server = make_server(args.host, args.port, wsgi(storage))
    except (OSError, OverflowError) as e:  # the port taken, the host unknown here
        reason = getattr(e, "strerror", None) or e
        raise SpecError(f"cannot listen on {args.host}:{args.port}: {reason}", source="--port") from None
    print(f"optuna-dashboard on {storage_url.shown(url)}: http://{args.host}:{args.port}/ (Ctrl-C to stop)",
          file=sys.stderr, flush=True)

    # Ctrl-C or `kill` stop the server between requests. A KeyboardInterrupt (optuna-dashboard's own
    # run_server) can land inside a request, where wsgiref's handler swallows it and serves on.
    def stop(*_) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with server:
            server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _check_launch(args: argparse.Namespace) -> None:
    if not args.slurm:
        raise SpecError("SLURM is the only launcher: add --slurm (--executor local runs its jobs here)",
                        source="launch")
    for option, value, least in (("--array", args.array, 1), ("--time", args.time, 1),
                                 ("--gpus-per-node", args.gpus_per_node, 0)):
        if value < least:
            raise SpecError(f"must be at least {least} (got {value})", source=option)
    if not args.sweeps and not args.study:
        raise SpecError("name the work: sweep files to queue, or --study NAME of an existing study",
                        source="launch")


def cli_launch(args: argparse.Namespace) -> int:
    from ablations.launch import SlurmWorker, make_executor, prepare, submit, task_device

    _check_launch(args)
    results_dir = Path(args.results_dir).resolve()
    folder = Path(args.logs).resolve() if args.logs else rundir.launch_dir(results_dir)
    # Before touching the storage: no SLURM here is the first thing to know.
    executor = make_executor(args.executor, folder, array=args.array, name="ablate", time_min=args.time,
                             gpus_per_node=args.gpus_per_node, partition=args.partition,
                             cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb)
    url, names = prepare(args)
    executor.update_parameters(name=f"ablate-{names[0]}" if len(names) == 1 else f"ablate-{len(names)}-studies")
    workers = [SlurmWorker(names, str(results_dir), task_device(args.gpus_per_node), args.data_root, i)
               for i in range(args.array)]
    jobs = submit(executor, workers, url)
    print(f"submitted {len(jobs)} worker(s) for {', '.join(names)} ({args.executor}): "
          f"{', '.join(j.job_id for j in jobs)}; logs in {folder}")
    if not args.wait:
        return 0
    status = 0
    for job in jobs:
        try:
            counts = job.result()
        except Exception as e:  # noqa: BLE001 -- submitit re-raises the job's failure; report, don't crash
            print(f"worker job {job.job_id} failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
            status = 1
            continue
        if counts.get("FAIL") or counts.get("MISSING"):
            status = 1
    return status
