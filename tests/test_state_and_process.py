"""Resources, state and process hygiene: seed counts that cannot blow up memory, study creation that a
kill cannot leave half done, temp files that do not outlive their write, and no process-wide state
(umask, TF32) changed behind the caller's back."""

from __future__ import annotations

import importlib
import os
import time
import tracemalloc

import optuna
import pytest
import torch
from helpers import FAKE, make_plans, url_of, write_sweep

from ablations import atomic, cli, devices, grid, supervisor
from ablations.errors import SpecError
from ablations.progress import study_status
from ablations.schema import MAX_SEEDS
from ablations.storage import grid_lock, open_storage
from ablations.trials import grid_point

# ---------------------------------------------------------------------------------------------------
# Seeds


def test_status_counts_a_huge_stored_seed_count_without_listing_it(tmp_path):
    """A study created before the limit (or by hand) with 10^12 seeds: status counts, never lists."""
    (plan,) = make_plans(write_sweep(tmp_path))
    storage = open_storage(url_of(tmp_path / "results"))
    study = grid.open_study(storage, plan)
    with grid_lock(storage):
        grid.enqueue_missing(study, plan)  # 3 settings x 2 seeds queued
    study.set_user_attr("seeds", 10**12)
    tracemalloc.start()
    row = study_status(optuna.load_study(study_name=study.study_name, storage=storage))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (row["points"], row["queued"], row["missing"]) == (3 * 10**12, 6, 3 * 10**12 - 6)
    assert peak < 50 * 2**20
    with pytest.raises(SpecError, match=f"holds {10**12} seeds per setting; at most {MAX_SEEDS} can run"):
        grid.plan_from_attrs(study.study_name, study.user_attrs)


def test_the_seed_limit_holds_for_sweep_files_too(tmp_path):
    with pytest.raises(SpecError, match=f"seeds: Input should be less than or equal to {MAX_SEEDS}"):
        make_plans(write_sweep(tmp_path, seeds=MAX_SEEDS + 1))


# ---------------------------------------------------------------------------------------------------
# Study creation


@pytest.mark.parametrize("written", [pytest.param(0, marks=pytest.mark.slow), 5,
                                     pytest.param(len(grid.CREATION_ATTRS) - 1, marks=pytest.mark.slow)])
def test_a_study_whose_creation_was_killed_is_completed_by_the_next_run(written, tmp_path):
    """Optuna writes a study's attrs one at a time; a kill after `written` of them left a study every
    later `ablate run` used to fail on with KeyError."""
    results = tmp_path / "results"
    results.mkdir()
    (plan,) = make_plans(write_sweep(tmp_path))
    study = optuna.create_study(study_name=plan.study_name, storage=url_of(results), direction="minimize")
    for key in grid.CREATION_ATTRS[:written]:
        study.set_user_attr(key, plan.attrs()[key])
    with pytest.raises(SpecError, match="not created by `ablate run`, or its creation was interrupted"):
        grid.plan_from_attrs(plan.study_name, study.user_attrs)  # what `ablate worker` would do
    assert supervisor.run([plan], url_of(results), results, ["cpu"], 1, trainer=FAKE, bars=False) == 0
    done = optuna.load_study(study_name=plan.study_name, storage=url_of(results))
    assert set(grid.CREATION_ATTRS) <= set(done.user_attrs)
    assert grid.plan_from_attrs(plan.study_name, done.user_attrs).grid() == plan.grid()
    assert sorted(grid_point(t) for t in done.trials if t.state.name == "COMPLETE") == sorted(plan.grid())


def test_every_creation_attr_is_written_by_a_plan(tmp_path):
    (plan,) = make_plans(write_sweep(tmp_path))
    assert set(grid.CREATION_ATTRS) <= set(plan.attrs())


# ---------------------------------------------------------------------------------------------------
# Temp files


def test_an_interrupted_write_leaves_no_temp_file_for_good(tmp_path):
    target = tmp_path / "quick" / "ratio" / "table.csv"
    target.parent.mkdir(parents=True)
    orphan = target.parent / ".table.csv.dead1234.tmp"  # what a kill mid-write leaves
    fresh = target.parent / ".table.csv.live5678.tmp"  # another process writing right now
    other = target.parent / ".table.md.dead9999.tmp"  # another file's: its own next write clears it
    for p in (orphan, fresh, other):
        p.write_text("partial")
    old = time.time() - atomic.STALE_TMP_S - 60
    for p in (orphan, other):
        os.utime(p, (old, old))
    atomic.write_atomic(target, "a,b\n1,2\n")
    assert target.read_text() == "a,b\n1,2\n"
    assert not orphan.exists() and fresh.exists() and other.exists()


def test_a_failing_write_removes_its_own_temp_file(tmp_path):
    def explode(f):
        f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic.write_bytes_with(tmp_path / "x.bin", explode)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# Process state


def test_atomic_writes_never_touch_the_umask(tmp_path, monkeypatch):
    umask = os.umask(0o027)  # a distinctive one, read back after the write
    try:
        def forbidden(mask):
            raise AssertionError("os.umask called")

        monkeypatch.setattr(os, "umask", forbidden)
        module = importlib.reload(atomic)  # import time included
        module.write_atomic(tmp_path / "shared.txt", "x")
    finally:
        monkeypatch.undo()
        os.umask(umask)
    assert (tmp_path / "shared.txt").stat().st_mode & 0o777 == 0o640  # 0666 under umask 027


def test_torch_settings_restores_tf32(tmp_path):
    from ablations.schema import TrainSpec
    from ablations.train import torch_settings

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch_settings(TrainSpec(), torch.device("cuda")):  # flags only: nothing runs on the device
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_devices_cuda_means_every_gpu_with_one_process_per_trial_too(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert devices.resolve_devices("cuda") == ["cuda:0", "cuda:1", "cuda:2"]
    assert devices.resolve_devices("cuda:1") == ["cuda:1"]
    assert devices.device_groups(devices.resolve_devices("cuda"), 1) == ["cuda:0", "cuda:1", "cuda:2"]


def test_devices_cuda_without_gpus_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["run", "ratio", "--devices", "cuda", "--results-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == "error: --devices: cuda: unknown device (available here: cpu)"
