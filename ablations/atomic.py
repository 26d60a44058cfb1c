"""Atomic file writes for everything the project writes (run directories, tables, figures, reports).

A trial can be killed at any instant (kill -9, pre-emption, a full disk). Every file is therefore
written to a temporary file in the same directory and moved into place with `os.replace`, which is
atomic on POSIX: readers (the resuming trainer, the scheduler, the analysis) see the old file or the
new one, never a torn one. A write cut short leaves its temporary file behind; the next write of the
same file removes it once it is old enough not to be someone else's write in progress.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

STALE_TMP_S = 600.0  # a temp file this old is a write some killed process never finished


def remove_stale_temps(path: Path, older_than_s: float = STALE_TMP_S) -> None:
    """Remove the temp files an interrupted write of `path` left behind (`.<name>.*.tmp`), leaving young
    ones alone: another process may be writing the same file right now."""
    cutoff = time.time() - older_than_s
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):  # gone already, or not ours to remove
            if tmp.lstat().st_mtime < cutoff:
                tmp.unlink()


@contextlib.contextmanager
def _atomic(path: Path, mode: str, perms: int = 0o666) -> Iterator[IO[Any]]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    # Not mkstemp, which makes 0600 files: os.open applies the process's umask to `perms` itself, and
    # nothing here has to read (which means: change) the umask.
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, perms)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name beside {path}")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            # Without fsync a crash right after the rename can leave an empty file under the new name.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_with(path: str | Path, writer: Callable[[IO[bytes]], None]) -> None:
    """Let `writer` fill a binary file that appears at `path` only once complete."""
    with _atomic(Path(path), "wb", 0o666) as f:
        writer(f)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text or bytes to a temporary file beside `path`, then rename it over `path`."""
    with _atomic(Path(path), "wb", 0o666) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> None:
    with _atomic(Path(path), "w", 0o666) as f:
        f.write(text)


def save_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def torch_save_atomic(path: str | Path, obj: Any) -> None:
    import torch

    write_bytes_with(path, lambda f: torch.save(obj, f))


def savez_atomic(path: str | Path, arrays: dict[str, Any]) -> None:
    import numpy as np

    write_bytes_with(path, lambda f: np.savez(f, **arrays))
