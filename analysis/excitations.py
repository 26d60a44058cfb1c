"""The numbers behind the excitation figures (paper Fig. 6/7, Sec. 7.2), and which runs they come from.

Sec. 7.2 claims the gates are nearly class-agnostic early (SE_2_3), increasingly class-specific with
depth (SE_4_6, SE_5_1), and saturated near 1 at SE_5_2. `block_summary` puts one number per block on
each claim, from the per-class mean excitations the probe stores (`load.Excitations`):

- class_spread: per channel, the standard deviation across classes of the per-class mean gate, then
  the mean over channels. Population std (ddof=0) with every class weighted equally: the classes are
  the whole set being compared, and the question is whether classes differ, not how many images each
  had. 0 means every class gets the same gate (class-agnostic).
- departure: the mean over classes and channels of |per-class mean gate - 0.5|. A gate that never
  left its initial 0.5 (or that passes everything through at half strength) has departure 0.
- saturated: the share of (class, channel) mean gates above `SATURATION` (0.9), the paper's
  "most gates near 1".
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ablations.schema import SESpec, Sweep
from analysis import load
from analysis.tables import all_sweeps

FIG6_CHANNELS = 50  # the paper's Fig. 6: "fifty uniformly sampled channels"
CHANNEL_SEED = 0  # fixes the sample, so a figure redrawn from the same results is the same figure
N_CLASSES = 4  # the paper's Fig. 6 shows four classes
SATURATION = 0.9
CHANNELS_EXPECTED = "expected a positive number of channels or 'all'"
SUMMARY_COLUMNS = ["block", "stage", "index", "departure", "class_spread", "saturated"]
_BLOCK = re.compile(r"^(.+)_(\d+)_(\d+)$")  # <MODULE>_<stage>_<index>: SE_2_3, CBAM_5_1, MyGate_4_6


def block_position(block: str) -> tuple[int, int] | None:
    """(stage, index) of a block named <MODULE>_<stage>_<index> (SE_2_3, ECA_4_6, ...); None otherwise."""
    m = _BLOCK.match(block)
    return (int(m.group(2)), int(m.group(3))) if m else None


def select_blocks(blocks: list[str]) -> list[str]:
    """The paper's Fig. 6 blocks for any depth: the last block of stages 2, 3 and 4 and every block of
    stage 5. On ResNet-50 (3-4-6-3) that is exactly SE_2_3, SE_3_4, SE_4_6, SE_5_1, SE_5_2, SE_5_3.
    Stages without blocks (e.g. the per-stage sweep) are skipped; names outside the <MODULE>_i_j scheme
    keep their last six blocks."""
    parsed = [(b, block_position(b)) for b in blocks]
    if not blocks or any(p is None for _, p in parsed):
        return blocks[-6:]
    by_stage: dict[int, list[tuple[int, str]]] = {}
    for b, (stage, index) in parsed:
        by_stage.setdefault(stage, []).append((index, b))
    out = []
    for stage in sorted(by_stage):
        ordered = [b for _, b in sorted(by_stage[stage])]
        out += ordered if stage == max(by_stage) and stage >= 5 else ordered[-1:]
    return out


def default_classes(classes: np.ndarray, k: int = N_CLASSES) -> list[int]:
    """k class ids spread evenly over the classes present (first and last included)."""
    idx = np.unique(np.linspace(0, len(classes) - 1, num=min(k, len(classes))).round().astype(int))
    return [int(classes[i]) for i in idx]


def parse_channels(value: int | str) -> int | None:
    """How many channels a per-channel figure shows: a positive count, or None for "all".

    Raises ValueError (`CHANNELS_EXPECTED`) for anything else."""
    if isinstance(value, str):
        if value.strip().lower() == "all":
            return None
        if not value.strip().isdigit():
            raise ValueError(f"channels={value!r}: {CHANNELS_EXPECTED}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"channels={value!r}: {CHANNELS_EXPECTED}")
    return int(value)


def sample_channels(n_channels: int, channels: int | str = FIG6_CHANNELS, seed: int = CHANNEL_SEED
                    ) -> np.ndarray:
    """Sorted indices of the channels a block's panel shows: all of them when `channels` is "all" or
    not below `n_channels`, else a uniform random sample without replacement drawn from a generator
    seeded with `seed` alone. The sample depends only on (n_channels, channels, seed): every class of
    a block shows the same channels, and redrawing gives the same ones."""
    k = parse_channels(channels)
    if k is None or k >= n_channels:
        return np.arange(n_channels)
    return np.sort(np.random.default_rng(seed).choice(n_channels, size=k, replace=False))


def block_summary(exc: load.Excitations) -> pd.DataFrame:
    """One row per SE block in depth order, columns `SUMMARY_COLUMNS` (see the module docstring).

    stage and index come from the <MODULE>_<stage>_<index> name (nullable, <NA> for other names, which
    keep network order)."""
    rows = []
    for block in exc.blocks:
        m = np.asarray(exc.mean[block], dtype=float)  # [classes x channels]
        stage, index = block_position(block) or (None, None)
        rows.append({"block": block, "stage": stage, "index": index,
                     "departure": float(np.abs(m - 0.5).mean()),
                     "class_spread": float(m.std(axis=0, ddof=0).mean()),
                     "saturated": float((m > SATURATION).mean())})
    out = pd.DataFrame(rows, columns=SUMMARY_COLUMNS).astype({"stage": "Int64", "index": "Int64"})
    if out["stage"].notna().all():
        out = out.sort_values(["stage", "index"], kind="stable")
    return out.reset_index(drop=True)


def class_specificity(runs: dict[int, load.Excitations]) -> pd.DataFrame:
    """`block_summary` of every seed's run, stacked, with a leading "seed" column."""
    parts = [block_summary(exc).assign(seed=seed) for seed, exc in sorted(runs.items())]
    if not parts:
        return pd.DataFrame(columns=["seed", *SUMMARY_COLUMNS])
    out = pd.concat(parts, ignore_index=True)
    return out[["seed", *SUMMARY_COLUMNS]]


def stage_means(summary: pd.DataFrame) -> pd.DataFrame:
    """Per stage: the number of blocks and the mean of departure, class_spread and saturated over its
    blocks (and over seeds, when `summary` stacks several): the per-stage numbers to quote."""
    numbers = ["departure", "class_spread", "saturated"]
    grouped = summary.dropna(subset=["stage"]).groupby("stage", sort=True)
    out = grouped[numbers].mean()
    out.insert(0, "blocks", grouped["block"].nunique())
    return out.reset_index()


# --------------------------------------------------------------------------------------------------
# Which runs the excitation figures show


def excitation_runs(results_dir: str | Path, done: pd.DataFrame, sweeps: list[Sweep] | None = None,
                    sweep: str | None = None, setting: str | None = None) -> dict[int, load.Excitations]:
    """{seed: excitations} of every completed seed of one setting, the setting the figures show.

    Default: the paper's standard SE block (r=16, avg squeeze, sigmoid, standard position, all stages)
    from the lowest-numbered table that has one with excitations (Table 10's r=16 when present);
    failing that, the first setting whose runs have SE blocks. `sweep` / `setting` restrict the choice.
    Empty when no run qualifies."""
    if sweep is not None:
        done = done[done["sweep"] == sweep]
    if setting is not None:
        done = done[done["setting"] == setting]
    sweeps = sweeps if sweeps is not None else all_sweeps()
    standard = [(s.name, x.label) for s in sweeps for x in s.settings if x.se == SESpec()]
    rank = {key: i for i, key in enumerate(standard)}
    order = done.assign(_rank=[rank.get((a, b), len(rank)) for a, b in zip(done["sweep"], done["setting"])])
    order = order.sort_values(["_rank", "sweep", "setting", "profile", "seed"], kind="stable")
    chosen: tuple | None = None
    runs: dict[int, load.Excitations] = {}
    for _, row in order.iterrows():
        key = (row["sweep"], row["setting"], row["profile"])
        if chosen is not None and key != chosen:
            break  # rows are grouped by setting: the chosen one is complete
        exc = load.read_excitations(load.locate_run_dir(results_dir, row))
        if exc is not None and exc.blocks:
            chosen = key
            runs[int(row["seed"])] = exc
    return runs


def excitation_run(results_dir: str | Path, done: pd.DataFrame,
                   sweeps: list[Sweep] | None = None) -> load.Excitations | None:
    """The run Fig. 6/7 show: the lowest seed of the setting `excitation_runs` picks; None if none."""
    runs = excitation_runs(results_dir, done, sweeps)
    return runs[min(runs)] if runs else None


def chosen_runs(results_dir: str | Path, storage: str | None, profile: str, sweep: str | None = None,
                setting: str | None = None) -> dict[int, load.Excitations]:
    """`excitation_runs` over the profile's completed trials, read from the results dir / storage."""
    done = load.completed(load.load_trials(results_dir, storage, profile=profile))
    return excitation_runs(results_dir, done, sweep=sweep, setting=setting)
