"""The one error type users see: a bad input, named by file and key.

The CLI prints `error: <file>: <key>: <message>` on one line and exits 2; everything else that
validates input raises this (never a bare ValueError that would end in a traceback).
"""

from __future__ import annotations

import re


def one_line(text: str | None) -> str | None:
    """Line breaks (a key or value quoted from a file, a driver's message) folded into spaces."""
    return None if text is None else re.sub(r"\s*[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+\s*", " ", str(text))


class SpecError(ValueError):
    """Invalid user input. `source` is a file (or option) and `key` the offending key."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.message, self.source, self.key = one_line(message), one_line(source), one_line(key)
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.key) if p]
        return ": ".join([*parts, self.message])

    def within(self, source: str | None = None, key_prefix: str | None = None) -> SpecError:
        """The same error, located inside `source` and under `key_prefix` (for nested checks)."""
        key = ".".join(p for p in (key_prefix, self.key) if p) or None
        return SpecError(self.message, source=self.source or source, key=key)
