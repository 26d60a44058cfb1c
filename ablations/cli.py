"""`ablate`: the command line. One subcommand per job: this module parses the options and hands them to
the command's handler, imported only when it runs (`ablate --help` stays fast):

    train, complexity, config                  cli_train.py   (a profile, no storage)
    run, worker, status, dashboard, launch     cli_run.py     (studies in a storage)
    table, tables, figures, notebooks, report  analysis/cli.py

What a user can fix (errors.UserError) ends as one line `error: <source>: <key>: <message>` on stderr
and exit status 2; a failed trial is exit status 1, Ctrl-C 130.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
from typing import NoReturn

from ablations.errors import UserError
from ablations.options import check_dir_option
from ablations.resilience import check_environment

FORMATS = ("table", "csv", "json")


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; every option's default stated, unless its help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is None or action.default is False or action.default == []
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: {action.default})"


# What each command's --help ends with: commands that run as written from the repository root.
EXAMPLES = {
    "complexity": ["ablate complexity ratio", "ablate complexity ratio --profile paper --format csv"],
    "config": ["ablate config", "ablate config --profile cifar --set train.epochs=5"],
    "train": ["ablate train --out /tmp/se-r16", "ablate train --sweep ratio --setting r=8 --seed 1 --out /tmp/r8"],
    "run": ["ablate run ratio", "ablate run ratio stages --seeds 5 --workers 2",
            "ablate run ratio --precision 0.5 --max-seeds 10", "ablate run ratio --profile cifar --devices cuda:0,cuda:1"],
    "worker": ["ablate worker --study ratio-quick", "ablate worker --study ratio-cifar --device cuda:1"],
    "launch": ["ablate launch ratio --slurm --array 8 --gpus-per-node 1 --storage postgresql://host/db",
               "ablate launch ratio --slurm --executor local --array 2 --wait"],
    "status": ["ablate status", "ablate status --storage postgresql://host/db"],
    "dashboard": ["ablate dashboard", "ablate dashboard --port 8081"],
    "table": ["ablate table ratio", "ablate table ratio --format latex > table10.tex"],
    "tables": ["ablate tables", "ablate tables --profile cifar"],
    "figures": ["ablate figures", "ablate figures --channels all"],
    "notebooks": ["ablate notebooks"],
    "report": ["ablate report", "ablate report --profile cifar --results-dir /data/results"],
}


def epilog(command: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[command])


def version() -> str:
    """The installed distribution's version, or the source tree's where it is used uninstalled."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from ablations import __version__

    try:
        return installed("se-ablations")
    except PackageNotFoundError:
        return __version__


# --------------------------------------------------------------------------------------------------
# entry point


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="ablate", description="SE ablation runner (SENet Tables 10-16, Fig. 6/7).",
               formatter_class=HelpFormatter,
               epilog="examples:\n  ablate run ratio\n  ablate table ratio\n  ablate report\n"
                      "`ablate COMMAND --help` for each command's options and examples.")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND",
                           title="commands")
    _add_parser = sub.add_parser

    def add_parser(name: str, **kw) -> argparse.ArgumentParser:
        return _add_parser(name, formatter_class=HelpFormatter, epilog=epilog(name),
                           description=kw.get("help"), **kw)

    sub.add_parser = add_parser

    c = sub.add_parser("complexity", help="params and GFLOPs (MACs) per setting, beside the paper's")
    c.add_argument("sweep", help="sweep name (ratio, stages, ...) or YAML path")
    c.add_argument("--profile", default="quick", help="profile name or YAML path (default: quick)")
    c.add_argument("--format", choices=FORMATS, default="table", help="output format")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile key, e.g. data.input_size=160 (repeatable)")

    cf = sub.add_parser("config", help="the effective profile as YAML, each key with its description")
    cf.add_argument("--profile", default="quick", help="profile name or YAML path (default: quick)")
    cf.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a profile key, e.g. train.epochs=5 (repeatable)")

    def common(q: argparse.ArgumentParser, profile: str | None = "quick") -> None:
        if profile is not None:
            q.add_argument("--profile", default=profile, help=f"profile name or YAML path (default: {profile})")
        q.add_argument("--results-dir", default="results", help="results directory (default: results/)")
        q.add_argument("--storage", default=None,
                       help="Optuna storage URL (default: sqlite:///<results-dir>/optuna.db)")

    def overrides(q: argparse.ArgumentParser) -> None:
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a profile key, e.g. train.epochs=5 (repeatable)")
        q.add_argument("--data-root", default=None, help="data root for cifar10/cifar100/imagefolder (default: the profile's data.root)")

    t = sub.add_parser("train", help="train one setting into a run directory")
    t.add_argument("--profile", default="quick", help="profile name or YAML path (default: quick)")
    t.add_argument("--out", required=True, help="run directory (resumes if it holds a checkpoint)")
    t.add_argument("--sweep", default=None, help="take the SE setting from this sweep (with --setting; default: none, standard SE r=16)")
    t.add_argument("--setting", default=None, help="row label in --sweep (default: standard SE, r=16)")
    t.add_argument("--seed", type=int, default=0, help="the trial's seed")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    overrides(t)

    r = sub.add_parser("run", help="run whole sweeps (one Optuna study per sweep and profile)")
    r.add_argument("sweeps", nargs="+", help="sweep names or YAML paths")
    common(r)
    r.add_argument("--seeds", type=int, default=None, help="seeds per setting (default: the sweep's)")
    r.add_argument("--precision", default=None, metavar="POINTS",
                   help="add seeds in rounds until every row's minimum detectable effect (top-1 points, "
                        "80%% power, alpha 0.05) is at most this; the rule reads the spread, never the deltas (default: off, the fixed --seeds)")
    r.add_argument("--max-seeds", default=None, metavar="N",
                   help="with --precision: stop adding seeds here (default: 20)")
    r.add_argument("--workers", type=int, default=1, help="trials trained at once on this machine")
    r.add_argument("--devices", default=None, help="cpu or cuda:0,cuda:1,... (workers pinned round-robin; default: every GPU, else cpu)")
    r.add_argument("--nproc-per-node", type=int, default=1, help="GPUs per trial (torchrun DDP)")
    overrides(r)

    w = sub.add_parser("worker", help="join an existing study and train its pending trials")
    w.add_argument("--study", required=True, help="study name, <sweep>-<profile>")
    common(w, profile=None)
    w.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    w.add_argument("--nproc-per-node", type=int, default=1, help="GPUs per trial (torchrun DDP)")
    w.add_argument("--data-root", default=None, help="data root for cifar10/cifar100/imagefolder (default: the profile's data.root)")

    la = sub.add_parser("launch", help="queue sweeps and submit workers as a SLURM job array (submitit)")
    la.add_argument("sweeps", nargs="*", help="sweep names or YAML paths to queue (or --study)")
    common(la)
    la.add_argument("--slurm", action="store_true", help="submit to SLURM (required: the only launcher)")
    la.add_argument("--study", action="append", default=[], help="an existing study to work on (repeatable)")
    la.add_argument("--seeds", type=int, default=None, help="seeds per setting (default: the sweep's)")
    la.add_argument("--array", type=int, default=1, help="worker jobs (array tasks)")
    la.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default partition)")
    la.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per job; a trial uses all of them (DDP)")
    la.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per job (default: SLURM's)")
    la.add_argument("--mem-gb", type=float, default=None, help="memory per job in GB (default: SLURM's)")
    la.add_argument("--time", type=int, default=1440, help="minutes per job; then it is requeued (default 1440)")
    la.add_argument("--executor", choices=("slurm", "local"), default="slurm",
                    help="local: the same jobs as processes on this machine")
    la.add_argument("--logs", default=None, help="submitit folder (default: <results-dir>/launch)")
    la.add_argument("--wait", action="store_true", help="wait for the jobs; exit 1 if a point did not complete")
    overrides(la)

    st = sub.add_parser("status", help="every study's trial counts and ETA")
    common(st, profile=None)

    d = sub.add_parser("dashboard", help="optuna-dashboard on the storage, bound to 127.0.0.1")
    common(d, profile=None)
    d.add_argument("--host", default="127.0.0.1", help="address to listen on")
    d.add_argument("--port", type=int, default=8080, help="port to listen on")

    tb = sub.add_parser("table", help="print one paper table (mean +- std; delta vs the reference with CI, "
                                      "Holm p, MDE, verdict; paper numbers)")
    tb.add_argument("sweep", help="sweep name or YAML path")
    common(tb)
    tb.add_argument("--format", choices=("md", "csv", "latex", "html"), default="md", help="output format")

    for name, help_ in (("tables", "write every table that has results"),
                        ("figures", "draw Fig. 6/7, training curves and per-table plots"),
                        ("notebooks", "execute the analysis notebooks headless"),
                        ("report", "one self-contained HTML report")):
        q = sub.add_parser(name, help=help_)
        common(q)
        if name == "figures":
            q.add_argument("--channels", default="50", metavar="N|all",
                           help="channels per block in Fig. 6/7: a seeded uniform sample of N "
                                "(default 50, as in the paper) or all")
    return p


def dispatch(args: argparse.Namespace) -> int:
    """Run the command's handler, `cli_<command>` in the module that holds it."""
    if args.command in ("train", "complexity", "config"):
        from ablations import cli_train as handlers
    elif args.command in ("run", "worker", "status", "dashboard", "launch"):
        from ablations import cli_run as handlers
    else:
        from analysis import cli as handlers
    return getattr(handlers, f"cli_{args.command}")(args)


DIR_OPTIONS = {"results_dir": "--results-dir", "out": "--out", "logs": "--logs"}


def check_dir_options(args: argparse.Namespace) -> None:
    """Directory options that cannot be directories (a file, or a path under one): one line now, not a
    traceback at the first write."""
    for attr, option in DIR_OPTIONS.items():
        if getattr(args, attr, None) is not None:
            check_dir_option(getattr(args, attr), option)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # a bare `ablate`: what it can do, not a usage error
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        check_environment()
        check_dir_options(args)
        return dispatch(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `ablate` console script and `python -m ablations`."""
    exit_fast(main())


def exit_fast(code: int) -> NoReturn:
    """Exit without the interpreter's teardown, which takes ~1 s with torch and timm loaded (collecting
    their modules) after the last line is out. What a normal exit does that matters still happens: the
    atexit hooks run (multiprocessing's clean-up; weakref finalizers, such as the one that closes each
    storage and so folds SQLite's log into the .db) and the output is flushed. While a thread of ours
    still runs, it exits the normal way."""
    if any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # stdout closed early (`ablate ... | head`): nothing left to tell
        pass
    os._exit(code)


if __name__ == "__main__":
    entry()
