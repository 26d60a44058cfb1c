"""Every trial's per-epoch scalars for TensorBoard, written into its run directory, so that
`tensorboard --logdir <results>` lists runs as <profile>/<sweep>/<label dir>/seed<k>: grouped by sweep,
setting and seed, and curves can be watched while a sweep trains.

Optional: torch.utils.tensorboard needs the `tensorboard` package (`pip install -e '.[tensorboard]'`).
Without it nothing is written and nothing is said; a write that fails turns the writer off for the
trial, never the trial itself.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

# Tag -> metric column (rundir.METRIC_COLUMNS): TensorBoard groups tags by the part before the slash.
TAGS = {"error/top1_val": "top1_err", "error/top5_val": "top5_err", "loss/train": "train_loss",
        "loss/val": "val_loss", "lr": "lr", "speed/images_per_s": "images_per_s"}


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class EpochScalars:
    """An `on_epoch` callback: one point per tag per epoch. A resumed trial starts its event file at
    the epoch it resumes from (purge_step), so TensorBoard drops what the interrupted attempt wrote
    after its last checkpoint instead of drawing the epoch twice."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.on = available()
        self.writer: Any = None

    def __call__(self, row: dict[str, float]) -> None:
        if not self.on:
            return
        epoch = int(row["epoch"])
        try:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=epoch)
            for tag, key in TAGS.items():
                value = row.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(tag, float(value), epoch)
            self.writer.flush()  # visible in TensorBoard now, not when the trial ends
        except Exception:  # noqa: BLE001 -- a full disk for event files is no reason to lose the trial
            self.on = False

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
