"""A run directory's last two checkpoints, and resuming from the newest one that loads.

Writes are atomic (atomic.py), so a kill never tears a checkpoint; a disk, a copy or a sync tool still can.
So the trainer keeps the previous epoch's checkpoint beside the newest one:

    checkpoint.pt        the last epoch's state
    checkpoint.prev.pt   the epoch before (rotated by rename, so it costs no extra write)

and resumes from the newest readable one, warning about any it skips; with none readable it warns and
starts the trial over. A damaged file therefore costs at most a checkpoint interval or two, never the
sweep.

How often: after every epoch by default. A ResNet-50 checkpoint is ~190 MB written with fsync, while a
CIFAR epoch on a fast GPU takes seconds (and DDP ranks wait for rank 0's write), so
`train.checkpoint_every_epochs` / `checkpoint_every_minutes` space them out (`due`); the last epoch is always
saved. A resume still starts from the newest checkpoint: the epochs after it are trained again.

A readable checkpoint of another format (another version of this program) is still an error: silently
retraining over someone's run would be worse than asking.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ablations.atomic import torch_save_atomic
from ablations.errors import SpecError
from ablations.rundir import CHECKPOINT as NAME
from ablations.rundir import PREVIOUS_CHECKPOINT as PREVIOUS
from ablations.schema import TrainSpec

REQUIRED = ("epoch", "step", "model", "optimizer", "rng", "metrics", "train_seconds")


def due(spec: TrainSpec, epoch: int, last_saved: int, seconds_since_saved: float) -> bool:
    """Whether to checkpoint after (1-based) `epoch`, the last one saved being `last_saved` (0: none)
    `seconds_since_saved` ago (or since the trial started)."""
    every, minutes = spec.checkpoint_every_epochs, spec.checkpoint_every_minutes
    return (epoch >= spec.epochs or (every is not None and epoch - last_saved >= every)
            or (minutes is not None and seconds_since_saved >= 60 * minutes))


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def save(out_dir: Path, state: dict[str, Any]) -> None:
    """Make the current checkpoint the previous one, then write `state` as the current one."""
    current = Path(out_dir) / NAME
    if current.exists():
        os.replace(current, Path(out_dir) / PREVIOUS)  # atomic: a kill here leaves PREVIOUS, loadable
    torch_save_atomic(current, state)


def _read(path: Path, fmt: int) -> dict[str, Any]:
    """The checkpoint at `path`; ValueError if it is damaged, SpecError if it is another format's."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, flipped bytes, not a torch file: all damage to us
        raise ValueError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"holds a {type(ckpt).__name__}, not a checkpoint")
    if ckpt.get("format") != fmt:
        raise SpecError("checkpoint of another format; delete it to start over", source=str(path))
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise ValueError(f"incomplete (no {', '.join(missing)})")
    return ckpt


def load_latest(out_dir: Path, fmt: int, *, main: bool = True) -> dict[str, Any] | None:
    """The newest loadable checkpoint in `out_dir`, or None to start from scratch.

    `main`: this process owns the run dir (not a non-zero DDP rank): it prints the warnings and moves
    damaged files aside (`*.damaged`), so the next rotation cannot push the good previous one out.
    """
    warn = _stderr if main else (lambda text: None)
    skipped: list[str] = []
    for name in (NAME, PREVIOUS):
        path = Path(out_dir) / name
        if not path.exists():
            continue
        try:
            ckpt = _read(path, fmt)
        except ValueError as e:
            warn(f"warning: {path}: unreadable checkpoint ({e}); kept as {name}.damaged")
            skipped.append(name)
            if main:
                os.replace(path, path.with_name(f"{name}.damaged"))
            continue
        if skipped:
            warn(f"warning: {out_dir}: resuming from {name} (epoch {ckpt['epoch']}) instead of the damaged "
                 f"{', '.join(skipped)}")
        return ckpt
    if skipped:
        warn(f"warning: {out_dir}: no readable checkpoint; restarting the trial from epoch 1")
    return None
