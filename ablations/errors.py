"""The project's two families of errors: what a user can fix, and what went wrong while running.

`UserError` is everything a user fixes by changing an input or the machine: a file, a key, an option,
an environment variable, a results directory that is read-only or full, a storage that cannot be
reached. The CLI prints it as one line, `error: <source>: <key>: <message>`, and exits 2. `SpecError`
is the kind that names a file (or option) and a key; `StorageError` and `ResultsDirError` name the
storage and the results directory.

`RunFailure` is the other family: the run itself did not work out (a trial diverged, a claim was lost
to another worker, a run directory is held by a live process). These end a trial, never the CLI with
status 2; anything else (a bug) stays the exception it is, with its traceback.
"""

from __future__ import annotations

import re


def one_line(text: str | None) -> str | None:
    """Line breaks (a key or value quoted from a file, a driver's message) folded into spaces."""
    return None if text is None else re.sub(r"\s*[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+\s*", " ", str(text))


def first_line(exc: BaseException) -> str:
    """A driver's message without SQLAlchemy's (or Optuna's) wrapper and background link."""
    while getattr(exc, "orig", None) is None and (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


class UserError(Exception):
    """Something the user can fix. `source` is a file, option or environment variable, `key` the
    offending key (or the path, URL or name it holds)."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.message, self.source, self.key = one_line(message), one_line(source), one_line(key)
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.key) if p]
        return ": ".join([*parts, self.message])

    def within(self, source: str | None = None, key_prefix: str | None = None) -> UserError:
        """The same error, located inside `source` and under `key_prefix` (for nested checks)."""
        key = ".".join(p for p in (key_prefix, self.key) if p) or None
        return type(self)(self.message, source=self.source or source, key=key)


class SpecError(UserError):
    """A bad sweep or profile file, key, command-line option or environment variable."""


class StorageError(UserError):
    """The Optuna storage cannot be opened, read or reached (named by its URL, password masked)."""


class ResultsDirError(UserError):
    """The results directory cannot take the run's files (read-only, full, over a quota)."""


class RunFailure(Exception):
    """A run that did not work out: ends a trial (or an attempt at it), never the CLI with status 2."""


class TrialFailed(RunFailure):
    """The trial cannot succeed as configured (diverged: NaN/inf loss)."""


class ClaimLost(RunFailure):
    """This worker's trial was declared dead (heartbeat grace period) and handed to another worker."""


class RunDirBusy(RunFailure):
    """Another live process trains in this run directory (a worker presumed dead that is not)."""
