"""Fixtures every test file may use; the plain helpers behind them are in helpers.py (importable by
spawned processes too), the PostgreSQL server in pg_server.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import FAKE, FAKE_ENV, make_results, tiny_cfg, write_sweep
from helpers import free_port as _free_port
from pg_server import PgServer, running_server


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A results directory that does not exist yet."""
    return tmp_path / "results"


@pytest.fixture
def fake_trainer(monkeypatch) -> str:
    """The fake trainer's `module:function`, with none of its FAKE_* knobs set."""
    for name in FAKE_ENV:
        monkeypatch.delenv(name, raising=False)
    return FAKE


@pytest.fixture
def mini_sweep(tmp_path: Path) -> Path:
    """helpers.write_sweep's mini sweep (3 settings x 2 seeds, `original` the reference) in tmp_path."""
    return write_sweep(tmp_path)


@pytest.fixture
def tiny():
    """helpers.tiny_cfg: a RunConfig that trains in about a second (keyword arguments change train.*)."""
    return tiny_cfg


@pytest.fixture
def free_port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def analysis_results(tmp_path_factory) -> Path:
    """helpers.make_results: a results directory in the run-directory contract, trained by no one."""
    return make_results(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="session")
def built_report(tmp_path_factory) -> tuple[Path, str]:
    """helpers.make_results with `ablate report` run on it (half a minute: every table and figure):
    the results dir and the report's HTML, shared by the report's tests and the browser's."""
    from helpers import PROFILE

    from ablations.cli import main

    results = make_results(tmp_path_factory.mktemp("report"))
    assert main(["report", "--results-dir", str(results)]) == 0
    return results, (results / PROFILE / "report.html").read_text()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    with running_server() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A fresh, empty database on the session's server."""
    return pg_server.create_database()
