"""What a GPU run depends on that a CPU can check: the device binding, packing, the DDP options and
SyncBN choice, and the checkpoint cadence."""

from __future__ import annotations

import pytest
import torch

from ablations import checkpoints, devices
from ablations import train as train_module
from ablations.distributed import SYNC_BN_BELOW, Dist, ddp_options
from ablations.errors import SpecError
from ablations.rundir import read_metrics
from ablations.schema import TrainSpec
from ablations.train import train
from tests.helpers import tiny_cfg

# ---------------------------------------------------------------------------------------------------
# The device binding and packing


def test_bind_sets_the_cuda_device_and_leaves_cpus_alone(monkeypatch):
    bound = []
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    devices.bind(torch.device("cpu"))
    devices.bind(torch.device("cuda"))  # no index: whatever is current stays current
    devices.bind(torch.device("cuda:1"))
    assert bound == [torch.device("cuda:1")]


def test_the_trainer_binds_its_device_before_the_data_touch_it(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(train_module, "resolve_device", lambda name: torch.device("cuda:1"))
    monkeypatch.setattr(train_module, "bind", lambda dev: calls.append(("bind", dev)))

    def load_data(*args, device, **kwargs):
        calls.append(("data", device))
        raise SpecError("stop here")

    monkeypatch.setattr(train_module, "load_data", load_data)
    with pytest.raises(SpecError):
        train(tiny_cfg(), tmp_path, device="cuda:1", progress=False)
    assert calls == [("bind", torch.device("cuda:1")), ("data", torch.device("cuda:1"))]


def test_packing_counts_the_workers_on_each_device(monkeypatch):
    assert devices.packing(["cuda:0", "cuda:1"], 5) == [3, 2, 3, 2, 3]
    assert devices.packing(["cuda:0"], 1) == [1]
    monkeypatch.setenv(devices.TRIALS_PER_DEVICE_ENV, "3")
    assert devices.trials_per_device() == 3
    monkeypatch.setenv(devices.TRIALS_PER_DEVICE_ENV, "x")
    assert devices.trials_per_device() == 1


# ---------------------------------------------------------------------------------------------------
# DDP and batch norm


def test_ddp_views_gradients_in_buckets_and_broadcasts_no_buffers(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        net = torch.nn.parallel.DistributedDataParallel(model, **ddp_options(torch.device("cpu")))
        assert net.gradient_as_bucket_view and not getattr(net, "forward_sync_buffers", net.broadcast_buffers)
        for _ in range(2):  # the views are made in the first step
            model.zero_grad(set_to_none=True)
            net(torch.randn(2, 3, 5, 5)).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("sync_bn", "world", "rank_batch", "expected"), [
    (None, 1, 8, False),  # one process: nothing to synchronise
    (None, 2, SYNC_BN_BELOW - 1, True),  # small per-rank batches: it pays
    (None, 8, SYNC_BN_BELOW, False),
    (True, 2, 256, True),
    (False, 2, 4, False),
])
def test_sync_bn_is_an_option_on_only_for_small_rank_batches_by_default(sync_bn, world, rank_batch, expected):
    assert Dist(0, world).wants_sync_bn(TrainSpec(sync_bn=sync_bn), rank_batch) is expected


def test_compile_with_sync_bn_over_ranks_is_refused_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(Dist, "current", classmethod(lambda cls: Dist(0, 2)))
    with pytest.raises(SpecError) as e:
        train(tiny_cfg(compile=True, sync_bn=True), tmp_path, progress=False)
    assert e.value.key == "train.compile" and "set train.sync_bn: false" in e.value.message
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())  # nothing created


# ---------------------------------------------------------------------------------------------------
# Checkpoint cadence


def test_checkpoint_due_by_epochs_minutes_and_the_last_epoch():
    spec = TrainSpec(epochs=10, checkpoint_every_epochs=3)
    assert [e for e in range(1, 11) if checkpoints.due(spec, e, 3 * ((e - 1) // 3), 0.0)] == [3, 6, 9, 10]
    by_time = TrainSpec(epochs=10, checkpoint_every_epochs=None, checkpoint_every_minutes=2.0)
    assert not checkpoints.due(by_time, 4, 0, 119.0) and checkpoints.due(by_time, 4, 0, 120.0)
    assert checkpoints.due(by_time, 10, 9, 0.0)  # the last epoch always
    with pytest.raises(ValueError, match="both null"):
        TrainSpec(checkpoint_every_epochs=None)


def test_sparse_checkpoints_resume_from_the_last_one_with_the_same_result(tmp_path, monkeypatch):
    monkeypatch.setenv(devices.TRIALS_PER_DEVICE_ENV, "2")
    cfg = tiny_cfg({"synthetic_size": 32}, epochs=4, deterministic=True, checkpoint_every_epochs=2)
    whole = train(cfg, tmp_path / "whole", progress=False)
    assert whole.trials_per_device == 2

    run = tmp_path / "cut"
    saved = []

    def stop_after_3(row):
        ckpt = run / "checkpoint.pt"
        saved.append(torch.load(ckpt, weights_only=True)["epoch"] if ckpt.exists() else None)
        if row["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, progress=False, on_epoch=stop_after_3)
    assert saved == [None, 2, 2] and len(read_metrics(run)) == 3  # metrics every epoch, checkpoints every 2
    resumed = []
    final = train(cfg, run, progress=False, on_epoch=lambda row: resumed.append(row["epoch"]))
    assert resumed == [3, 4]  # from the epoch-2 checkpoint: epoch 3 again
    assert final.top1_err == whole.top1_err and final.val_loss == whole.val_loss


# ---------------------------------------------------------------------------------------------------
# The final record's later fields


def test_final_records_written_before_compile_seconds_and_packing_still_load():
    from ablations.rundir import FinalRecord

    record = FinalRecord(top1_err=10.0, top5_err=1.0, val_loss=0.5, params_m=0.1, gflops=0.01, params=100_000,
                         macs=10**7, train_seconds=5.0, images_per_s=100.0, epochs=2, lr_cuts=(), device="cuda:0",
                         versions={"torch": "x"}, git_commit=None, sweep="s", profile="p", setting="a", seed=0,
                         compile_seconds=61.5, trials_per_device=3)
    assert record.to_attrs()["compile_seconds"] == 61.5 and record.to_attrs()["trials_per_device"] == 3
    old = {k: v for k, v in record.to_json().items() if k not in ("compile_seconds", "trials_per_device")}
    loaded = FinalRecord.from_json(old)
    assert (loaded.compile_seconds, loaded.trials_per_device, loaded.top1_err) == (0.0, 1, 10.0)
