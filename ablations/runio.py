"""Atomic file writes for run directories.

A trial can be killed at any instant (kill -9, pre-emption, a full disk). Every file a run directory
holds is therefore written to a temporary file in the same directory and moved into place with
`os.replace`, which is atomic on POSIX: readers (the resuming trainer, the scheduler, the analysis)
see the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

# mkstemp creates 0600 files; results are meant to be shared, so apply the usual umask instead.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def _atomic(path: Path, mode: str) -> Iterator[IO[Any]]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            # Without fsync a crash right after the rename can leave an empty file under the new name.
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_with(path: str | Path, writer: Callable[[IO[bytes]], None]) -> None:
    """Let `writer` fill a binary file that appears at `path` only once complete."""
    with _atomic(Path(path), "wb") as f:
        writer(f)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text or bytes to a temporary file beside `path`, then rename it over `path`."""
    with _atomic(Path(path), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> None:
    with _atomic(Path(path), "w") as f:
        f.write(text)


def save_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def torch_save_atomic(path: str | Path, obj: Any) -> None:
    import torch

    write_bytes_with(path, lambda f: torch.save(obj, f))


def savez_atomic(path: str | Path, arrays: dict[str, Any]) -> None:
    import numpy as np

    write_bytes_with(path, lambda f: np.savez(f, **arrays))
