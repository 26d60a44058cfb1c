"""Whether progress bars may be drawn: only on a terminal that reports a width. A log file, a pipe
(`make ... > log 2>&1`, SLURM) and a pseudo-terminal without a size get plain lines and no carriage
returns; the trainer's batch bars and the run's trial bars both ask here."""

from __future__ import annotations

import os
import sys
from typing import Any


def real_terminal(stream: Any = None) -> bool:
    """Whether bars can be drawn on `stream` (default stderr)."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False
