"""Run the analysis notebooks headless with nbclient, one kernel per notebook.

Each notebook's first code cell (tagged `parameters`) reads RESULTS_DIR / PROFILE / STORAGE from the
environment. We pass them both ways: in the kernel's environment, and as an injected cell right after
the parameters cell (papermill's convention), so an executed copy records the values it ran with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nbformat

from ablations.spec import ROOT
from analysis._io import write_atomic

NOTEBOOKS_DIR = Path(__file__).with_name("notebooks")
INJECTED_TAG = "injected-parameters"


@dataclass(frozen=True)
class Executed:
    source: Path
    output: Path
    error: str | None  # None when every cell ran


def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def notebooks_dir(results_dir: str | Path, profile: str) -> Path:
    return Path(results_dir) / profile / "notebooks"


def inject_parameters(nb: nbformat.NotebookNode, params: dict[str, str | None]) -> nbformat.NotebookNode:
    """Insert (or replace) the injected cell after the `parameters` cell; values become literals."""
    cells = [c for c in nb.cells if INJECTED_TAG not in c.get("metadata", {}).get("tags", [])]
    at = next((i + 1 for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])), 0)
    lines = ["# Parameters this copy was executed with (injected by `ablate notebooks`)."]
    for name, value in params.items():
        lines.append(f"{name} = {value!r}" if name != "RESULTS_DIR" else f"RESULTS_DIR = Path({value!r})")
    cell = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": [INJECTED_TAG]})
    nb.cells = [*cells[:at], cell, *cells[at:]]
    return nb


def execute(path: Path, results_dir: str | Path, profile: str, storage: str | None,
            out_dir: Path | None = None, timeout: int = 600) -> Executed:
    """Execute one notebook; write the executed copy (also when a cell fails, for the traceback)."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    results_dir = Path(results_dir).resolve()
    out_dir = out_dir or notebooks_dir(results_dir, profile)
    nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, {"RESULTS_DIR": str(results_dir), "PROFILE": profile, "STORAGE": storage})
    env = dict(os.environ)
    env.update(RESULTS_DIR=str(results_dir), PROFILE=profile, MPLBACKEND="module://matplotlib_inline.backend_inline")
    if storage:
        env["STORAGE"] = storage
    # The kernel must import this checkout's `ablations`/`analysis` even when it is not pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    error = None
    try:
        client.execute(env=env)
    except CellExecutionError as e:
        error = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    output = write_atomic(out_dir / path.name, nbformat.writes(nb))
    return Executed(path, output, error)


def execute_all(results_dir: str | Path, profile: str, storage: str | None,
                paths: list[Path] | None = None, timeout: int = 600) -> list[Executed]:
    return [execute(p, results_dir, profile, storage, timeout=timeout) for p in (paths or notebooks())]
