"""A real PostgreSQL server for the shared-storage tests: initdb in a temp dir, 127.0.0.1, a free port.

`running_server` starts one and always stops it (conftest.py's `pg_server` fixture holds one per session;
`pg_url` hands each test a fresh database on it). initdb refuses to run as root, so under root (CI, containers) the server runs as the
`postgres` system user from a directory owned by it; otherwise as the current user. Tests are skipped,
saying why, only when no server binaries exist (.ci/run installs them with apt-get).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import free_port

BIN_NAMES = ("initdb", "pg_ctl", "postgres")


def find_bindir() -> Path | None:
    """A directory holding initdb, pg_ctl and postgres: PATH first, then Debian's versioned layout."""
    on_path = [shutil.which(n) for n in BIN_NAMES]
    if all(on_path):
        return Path(os.path.realpath(on_path[0])).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):  # newest version first
        if all(Path(d, n).exists() for n in BIN_NAMES):
            return Path(d)
    return None


@dataclass
class PgServer:
    bindir: Path
    root: Path
    port: int
    user: str | None  # system user the server runs as (None: this process's user)
    _ids: itertools.count = field(default_factory=itertools.count)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _cmd(self, *argv: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *argv] if self.user else list(argv)

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self._cmd(*argv), capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg2

        name = f"t{os.getpid()}_{next(self._ids)}"
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def start(self) -> None:
        log = self.root / "server.log"
        # Unix socket in our own directory: /var/run/postgresql may not exist or be writable.
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off"
        r = self.run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(log), "-o", opts, "-w",
                     "-t", "60", "start")
        if r.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {r.stderr or r.stdout}\n{tail}")

    def stop(self, mode: str = "fast") -> None:
        self.run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")


def _server_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user for the server (initdb refuses root)")
    return "postgres"


@contextlib.contextmanager
def running_server() -> Iterator[PgServer]:
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or in "
                    "/usr/lib/postgresql/*/bin; .ci/run installs them")
    pytest.importorskip("psycopg2", reason="the psycopg2 driver (the `scale` extra) is not installed")
    user = _server_user()
    # Not under pytest's tmp dirs: those are 0700 root-owned, which the postgres user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="ablate-pg-"))
    server = PgServer(bindir, root, free_port(), user)
    try:
        if user:
            entry = pwd.getpwnam(user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        r = server.run(str(bindir / "initdb"), "-D", str(server.data), "-U", "postgres", "-A", "trust",
                       "-E", "UTF8", "--no-sync", timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stderr or r.stdout}")
        server.start()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
