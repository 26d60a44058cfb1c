"""Optuna storage URLs: the one resolver (runner and analysis alike) and the one form people see.

A URL can carry a database password. Only `shown` turns a URL into text for a message, a banner, a
log line or a file; everything else handles the URL itself and never prints it. `resolve` turns
`--results-dir` / `--storage` into the URL every part of the project opens, so a bare `postgresql://`
means the same driver to `ablate run` as to `ablate table`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

from ablations import rundir
from ablations.errors import SpecError, StorageError, first_line

BACKENDS = ("sqlite", "postgresql")
MASK = "***"
# Query parameters libpq and SQLAlchemy accept a password in.
_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|passwd|pass|sslpassword)=)[^&]*")


def default_url(results_dir: str | Path) -> str:
    return f"sqlite:///{rundir.storage_file(results_dir)}"


def shown(url: str | None) -> str:
    """The URL as people may see it: the password masked, in the user part and in the query, also when
    the URL cannot be parsed."""
    if url is None:
        return "(none)"
    from sqlalchemy.engine import make_url

    try:
        text = make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 -- unparseable: mask by hand what would be a password
        text = url
        scheme, sep, rest = url.partition("://")
        user, at, host = rest.rpartition("@")
        if sep and at and ":" in user:
            text = f"{scheme}://{user.split(':', 1)[0]}:{MASK}@{host}"
    return _SECRET_QUERY.sub(rf"\g<1>{MASK}", text)


def resolve(results_dir: str | Path, storage: str | None) -> str:
    """The storage URL to open, validated (not opened): default sqlite:///<results-dir>/optuna.db."""
    if storage is None:
        return default_url(results_dir)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    def bad(message: str) -> SpecError:
        return SpecError(message, source="--storage", key=shown(storage))

    try:
        url = make_url(storage)
    except ArgumentError:
        raise bad("not a storage URL (sqlite:///path.db or postgresql://user@host/db)") from None
    except ValueError:  # SQLAlchemy reads the port as an int
        raise bad("the port must be a number in 1..65535") from None
    backend = url.get_backend_name()
    if backend not in BACKENDS:
        raise bad(f"unsupported backend {backend!r} (use {' or '.join(BACKENDS)})")
    if url.port is not None and not 1 <= url.port <= 65535:
        raise bad(f"the port must be a number in 1..65535 (got {url.port})")
    if backend == "sqlite" and url.database in (None, "", ":memory:"):
        raise bad("an in-memory SQLite database cannot be shared by workers; give a file path")
    if backend == "postgresql" and url.drivername == "postgresql":
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the `scale` extra installs psycopg2.
        for driver in ("psycopg", "psycopg2"):
            if importlib.util.find_spec(driver) is not None:
                return url.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)
    return storage


def sqlite_path(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return Path(u.database) if u.get_backend_name() == "sqlite" else None


def existing(results_dir: str | Path, storage: str | None) -> str | None:
    """The URL to read, or None when it is a SQLite file that does not exist: opening it would create
    an empty database as a side effect of reading."""
    url = resolve(results_dir, storage)
    path = sqlite_path(url)
    return None if path is not None and not path.is_file() else url


def scrub(text: str, url: str) -> str:
    """`text` (a driver's error, say) with the URL's password masked wherever it appears."""
    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception:  # noqa: BLE001 -- an unparseable URL: shown() masks what it can
        password = None
    text = text.replace(url, shown(url))
    return text.replace(str(password), MASK) if password else text


def storage_error(message: str, url: str, exc: BaseException | None = None, after: str = "") -> StorageError:
    """A one-line error about the storage at `url`: the driver's first line and `after` appended,
    password masked."""
    text = (f"{message}: {first_line(exc)}" if exc is not None else message) + after
    return StorageError(scrub(text, url), source="--storage", key=shown(url))


@contextlib.contextmanager
def reading(url: str) -> Iterator[None]:
    """Database failures while reading a storage (a garbage or truncated SQLite file, a missing driver)
    as one line naming the storage."""
    import sqlite3

    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except ImportError as e:
        raise storage_error("no database driver", url, e) from None
    except (SQLAlchemyError, sqlite3.DatabaseError, StorageInternalError) as e:
        raise storage_error("cannot read the storage", url, e) from None
