"""The learning rate of every step, and the plateau rule that cuts it and ends training.

Every schedule is a pure function of what the checkpoint already holds: the step counter and, for
`plateau`, the per-epoch validation losses (the metrics rows). A resumed run therefore recomputes the
same LRs, the same cut epochs and the same stop epoch as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ablations.schema import TrainSpec


@dataclass(frozen=True)
class Plateau:
    """What the plateau rule decided over a validation-loss history.

    `cuts`: 1-based epochs after whose validation the LR was divided (it applies from the next epoch).
    `stop`: the epoch after which training ends (the first plateau after the last allowed cut), or None.
    """

    cuts: tuple[int, ...] = ()
    stop: int | None = None


def plateau(val_losses: Sequence[float], patience: int, threshold: float, max_cuts: int) -> Plateau:
    """torch's ReduceLROnPlateau (mode min, threshold_mode rel, no cooldown) replayed over a history.

    An epoch improves when its loss is below best * (1 - threshold); otherwise it is a bad epoch (a NaN
    loss included). More than `patience` bad epochs in a row is a plateau: the first `max_cuts`
    plateaus cut the LR and reset the count (the best loss is kept, as torch does); the next one ends
    training. Paper Sec. 6: three cuts by 10, each when the validation loss plateaus.
    """
    best, bad, cuts = math.inf, 0, []
    for epoch, loss in enumerate(val_losses, start=1):
        if loss < best * (1 - threshold):
            best, bad = loss, 0
        else:
            bad += 1
        if bad > patience:
            if len(cuts) == max_cuts:
                return Plateau(tuple(cuts), epoch)
            cuts.append(epoch)
            bad = 0
    return Plateau(tuple(cuts))


def plateau_state(spec: TrainSpec, val_losses: Sequence[float]) -> Plateau:
    """The plateau rule over the epochs trained so far; other schedules neither cut on loss nor stop."""
    if spec.schedule != "plateau":
        return Plateau()
    return plateau(val_losses, spec.patience, spec.plateau_threshold, spec.max_cuts)


def lr_cuts(spec: TrainSpec, val_losses: Sequence[float]) -> list[int]:
    """Epochs after which the LR was divided by `step_gamma`, among the epochs trained (one per loss):
    the plateau rule's cuts, or the step schedule's boundaries; none for cosine and constant."""
    trained = len(val_losses)
    if spec.schedule == "step":
        return list(range(spec.step_every, trained, spec.step_every))
    return [c for c in plateau_state(spec, val_losses).cuts if c < trained]  # a cut after the last
    #                                                                          epoch never applied


def lr_at(step: int, spec: TrainSpec, steps_per_epoch: int, cuts: int = 0) -> float:
    """The LR of optimizer step `step` (0-based): linear per-step warmup, then the schedule.

    `cuts`: for `plateau`, how many cuts the rule made before this step's epoch (`plateau_state`).
    """
    warmup = round(spec.warmup_epochs * steps_per_epoch)
    if spec.schedule == "plateau":  # warmup ramps towards the current plateau level
        level = spec.lr * spec.step_gamma ** cuts
        return level * (step + 1) / warmup if step < warmup else level
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    if spec.schedule == "constant":
        return spec.lr
    if spec.schedule == "step":  # the paper: divide by 10 every 30 epochs, counted from the start
        return spec.lr * spec.step_gamma ** (step // steps_per_epoch // spec.step_every)
    total = spec.epochs * steps_per_epoch
    progress = (step - warmup) / max(1, total - warmup)
    return spec.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
