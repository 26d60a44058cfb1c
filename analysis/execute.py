"""Run the analysis notebooks headless with nbclient, one kernel per notebook.

Each notebook's first code cell (tagged `parameters`) reads RESULTS_DIR / PROFILE / STORAGE from the
environment. We pass them both ways: in the kernel's environment, and as an injected cell right after
the parameters cell (papermill's convention), so an executed copy records the values it ran with.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

from ablations.atomic import write_atomic
from ablations.bundled import ROOT
from ablations.rundir import analysis_dir
from ablations.storage_url import shown

NOTEBOOKS_DIR = Path(__file__).with_name("notebooks")
INJECTED_TAG = "injected-parameters"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Executed:
    source: Path
    output: Path
    error: str | None  # None when every cell ran


def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def table_sweep(path: Path) -> str | None:
    """The sweep a table notebook shows (`table10_ratio.ipynb` -> ratio); None for the others."""
    match = re.fullmatch(r"table\d+_(\w+)\.ipynb", path.name)
    return match.group(1) if match else None


def with_results(results_dir: str | Path, profile: str, storage: str | None) -> tuple[list[Path], list[Path]]:
    """The notebooks worth executing (every non-table one, and each table whose sweep has a completed
    trial on `profile`) and the table notebooks skipped: an empty Table 11 reported "ok" helps no one."""
    from analysis import load

    trials = load.completed(load.load_trials(results_dir, storage, profile=profile))
    done = set(trials["sweep"])
    run, skipped = [], []
    for path in notebooks():
        sweep = table_sweep(path)
        (skipped if sweep is not None and sweep not in done else run).append(path)
    return run, skipped


def notebooks_dir(results_dir: str | Path, profile: str) -> Path:
    return analysis_dir(results_dir, profile, "notebooks")


def inject_parameters(nb: nbformat.NotebookNode, params: dict[str, str | None]) -> nbformat.NotebookNode:
    """Insert (or replace) the injected cell after the `parameters` cell; values become literals, except
    STORAGE: a URL may hold a password, so the cell reads it from the kernel's environment and records
    only the masked form, in a comment."""
    cells = [c for c in nb.cells if INJECTED_TAG not in c.get("metadata", {}).get("tags", [])]
    at = next((i + 1 for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])), 0)
    lines = ["# Parameters this copy was executed with (injected by `ablate notebooks`).",
             "from pathlib import Path"]
    for name, value in params.items():
        if name == "STORAGE":
            lines += ["import os", f"STORAGE = os.environ.get('STORAGE') or None  # {shown(value)}"]
        elif name == "RESULTS_DIR":
            lines.append(f"RESULTS_DIR = Path({value!r})")
        else:
            lines.append(f"{name} = {value!r}")
    cell = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": [INJECTED_TAG]})
    nb.cells = [*cells[:at], cell, *cells[at:]]
    return nb


def _client(path: Path, results_dir: Path, profile: str, storage: str | None, timeout: int):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, {"RESULTS_DIR": str(results_dir), "PROFILE": profile, "STORAGE": storage})
    # --log-level=ERROR: the kernel's start-up chatter (e.g. its TCP transport notice) is not ours to show;
    # real failures still arrive as cell errors.
    return NotebookClient(nb, timeout=timeout, kernel_name="python3", extra_arguments=["--log-level=ERROR"],
                          resources={"metadata": {"path": str(ROOT)}})


def _env(results_dir: Path, profile: str, storage: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RESULTS_DIR=str(results_dir), PROFILE=profile,
               MPLBACKEND="module://matplotlib_inline.backend_inline")
    if storage:
        env["STORAGE"] = storage
    else:
        env.pop("STORAGE", None)
    # The kernel must import this checkout's `ablations`/`analysis` even when it is not pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


async def _execute(path: Path, results_dir: Path, profile: str, storage: str | None, out_dir: Path,
                   timeout: int, slots: asyncio.Semaphore) -> Executed:
    from nbclient.exceptions import CellExecutionError

    async with slots:
        client = _client(path, results_dir, profile, storage, timeout)
        error = None
        try:
            await client.async_execute(env=_env(results_dir, profile, storage))
        except CellExecutionError as e:
            text = _ANSI.sub("", str(e)).strip()  # tracebacks come coloured for a terminal
            error = text.splitlines()[-1] if text else repr(e)
        # Written also when a cell failed: the executed copy holds the traceback.
        output = write_atomic(out_dir / path.name, nbformat.writes(client.nb))
        return Executed(path, output, error)


def execute_all(results_dir: str | Path, profile: str, storage: str | None, paths: list[Path] | None = None,
                timeout: int = 600, jobs: int | None = None) -> list[Executed]:
    """Execute notebooks (default: all), `jobs` kernels at a time; results in the order given.

    Kernels spend most of their life starting up and importing, so a few run well side by side even on
    two cores. Each notebook writes different files, so they cannot clash.
    """
    results_dir = Path(results_dir).resolve()
    out_dir = notebooks_dir(results_dir, profile)
    paths = paths or notebooks()
    jobs = jobs or min(4, max(2, os.cpu_count() or 1))

    async def run() -> list[Executed]:
        slots = asyncio.Semaphore(jobs)
        return await asyncio.gather(*(_execute(p, results_dir, profile, storage, out_dir, timeout, slots)
                                      for p in paths))

    return asyncio.run(run())
