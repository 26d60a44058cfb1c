"""A PostgreSQL sweep, a local launch, the status, the dashboard, the analysis and the storage errors, all
with a known password in the storage URL: it must appear in nothing printed and in no file written."""

from __future__ import annotations

import select
import time
from pathlib import Path

import pytest
from helpers import TINY_SET, ablate, free_port, set_options, write_sweep

from ablations.storage_url import MASK

PASSWORD = "Leak-Check-7f3a9c"
SETS = set_options([*TINY_SET, "backbone.small_stem=true", "train.epochs=1"])  # seconds per trial


def with_password(url: str) -> str:
    user, _, rest = url.partition("postgres@")
    return f"{user}postgres:{PASSWORD}@{rest}"


def run(*argv: str, expect: int, **env: str) -> str:
    proc = ablate(*argv, **env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == expect, (argv, out[-2000:], err[-3000:])
    return out + err


def dashboard_banner(url: str, results: Path) -> str:
    proc = ablate("dashboard", "--storage", url, "--results-dir", str(results), "--port", str(free_port()))
    text, deadline = "", time.monotonic() + 120
    try:
        while "optuna-dashboard on" not in text and time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stderr], [], [], 1)
            if ready:
                text += proc.stderr.readline()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    return text + out + err


def every_file_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_the_storage_password_is_in_no_output_and_no_file(tmp_path, pg_server):
    url, empty = with_password(pg_server.create_database()), with_password(pg_server.create_database())
    results = tmp_path / "results"
    one = [{"label": "r=16", "reduction": 16}]
    sweep = write_sweep(tmp_path, settings=one, seeds=1, name="mini")
    launched = write_sweep(tmp_path, settings=one, seeds=1, name="launched")
    common = ["--storage", url, "--results-dir", str(results)]
    seen = [
        run("run", str(sweep), *common, *SETS, expect=0),
        run("run", str(sweep), *common, *SETS, "--set", "train.lr=0.5", expect=2),  # created differently
        run("worker", "--study", "nope-quick", *common, expect=2),
        run("status", *common, expect=0),
        run("status", "--storage", empty, expect=0),  # "no studies in ..."
        dashboard_banner(url, results),
        run("launch", "--slurm", "--executor", "local", str(launched), *common, "--array", "1", "--wait", *SETS,
            expect=0),
        run("table", str(sweep), *common, expect=0),
        run("tables", *common, expect=0),
        run("report", *common, expect=0),
        run("worker", "--study", "mini-quick", "--results-dir", str(results),
            "--storage", f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/none", expect=2,
            ABLATE_STORAGE_ATTEMPTS="1"),
        run("run", str(sweep), "--storage", f"mysql://u:{PASSWORD}@localhost/x", expect=2),
        run("status", "--storage", f"postgresql://u:{PASSWORD}@db:port/x", expect=2),
    ]
    printed = "\n".join(seen)
    assert PASSWORD not in printed
    for needle in ("was created from different settings", "no such study in", "storage: ", "no studies in",
                   "optuna-dashboard on", "submitted 1 worker(s)", "Table 10", "cannot open storage",
                   "unsupported backend", "the port must be a number"):
        assert needle in printed, needle
    assert printed.count(f":{MASK}@") >= 8  # the URL was shown, masked, in the messages above

    files = every_file_under(tmp_path)
    assert any(p.name == "report.html" for p in files) and any(p.suffix == ".pkl" for p in files)
    assert any("launch" in p.parts for p in files) and any(p.name == "final.json" for p in files)
    leaked = [p for p in files if PASSWORD.encode() in p.read_bytes()]
    assert leaked == []
