"""Every trial's per-epoch scalars for TensorBoard, in its run dir (runs grouped as
<profile>/<sweep>/<label dir>/seed<k>), and nothing at all where tensorboard is not installed."""

from __future__ import annotations

import pytest
from helpers import FAKE, make_plans, url_of, write_sweep

from ablations import rundir, supervisor, tensorboard_log
from ablations.tensorboard_log import EpochScalars

ROW = {"epoch": 1, "lr": 0.1, "train_loss": 1.0, "val_loss": 2.0, "top1_err": 50.0, "top5_err": 10.0,
       "epoch_seconds": 0.01, "images_per_s": 100.0}


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow  # a sweep in this process: the first one pays for the dashboard's and TensorBoard's imports
@pytest.mark.skipif(not tensorboard_log.available(), reason="tensorboard is not installed: pip install -e '.[tensorboard]'")
def test_a_sweep_writes_each_trials_epochs_grouped_by_sweep_setting_and_seed(tmp_path, fake_trainer):
    results = tmp_path / "results"
    plans = make_plans(write_sweep(tmp_path), seeds=1)
    assert supervisor.run(plans, url_of(results), results, ["cpu"], 1, trainer=FAKE, bars=False) == 0
    runs = sorted(p.parent.relative_to(results).as_posix() for p in results.rglob("events.out.tfevents.*"))
    assert runs == sorted(rundir.run_dir(results, "quick", "mini", label, 0).relative_to(results).as_posix()
                          for label in ("r=16", "r=8", "original"))
    got = scalars(rundir.run_dir(results, "quick", "mini", "r=8", 0))
    assert set(got) == set(tensorboard_log.TAGS)
    assert got["error/top1_val"] == [(e, pytest.approx(50.0 / e)) for e in (1, 2, 3)]  # the fake trainer's rows
    assert got["lr"] == [(e, pytest.approx(0.1)) for e in (1, 2, 3)]


@pytest.mark.skipif(not tensorboard_log.available(), reason="tensorboard is not installed: pip install -e '.[tensorboard]'")
def test_a_resumed_trial_replaces_the_epochs_after_its_checkpoint(tmp_path):
    first = EpochScalars(tmp_path)
    for epoch in (1, 2, 3):
        first({**ROW, "epoch": epoch, "top1_err": 40.0 + epoch})
    first.close()
    again = EpochScalars(tmp_path)  # resumed from the checkpoint of epoch 2: epoch 3 is trained again
    again({**ROW, "epoch": 3, "top1_err": 30.0})
    again.close()
    assert scalars(tmp_path)["error/top1_val"] == [(1, 41.0), (2, 42.0), (3, 30.0)]


def test_without_tensorboard_nothing_is_written_and_nothing_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard_log, "available", lambda: False)
    writer = EpochScalars(tmp_path)
    writer(ROW)
    writer.close()
    assert list(tmp_path.iterdir()) == []
