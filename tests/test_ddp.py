"""One trial on several processes (torchrun DDP), on CPU with gloo: device groups, per-rank data shards,
batch norm over the global batch, and a 2-process trial against a 1-process one of the same global batch.

Equivalence is tight because the CPU ranks synchronise BN statistics (distributed.CpuSyncBatchNorm, torch's
SyncBatchNorm maths) and augmentation is off: random crops and flips are drawn per rank, so with them on
two ranks see other crops than one process would (statistically the same, not bitwise).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from helpers import ablate, load_study, tiny_cfg, write_sweep

from ablations import ddp, devices
from ablations.data import InMemoryData, load_data
from ablations.distributed import CpuSyncBatchNorm, CpuSyncBatchNormAct, Dist, sync_batchnorm_cpu
from ablations.errors import SpecError, TrialFailed
from ablations.schema import RunConfig
from ablations.train import evaluate, train

# Rounding differences (float sums in another order) must not grow: this tiny model's training amplifies
# them. With SE at timm's init, one process on 1 vs 2 threads drifts ~1e-3 in loss after 24 steps at lr
# 0.05; at 6 steps of lr 0.01, 2 ranks vs 1 process agree to ~2e-5. 1e-4 still catches any real difference
# (per-rank BN statistics alone move the first epoch's loss by ~3%, a wrong shard or a missing all-reduce
# by more).
REL_TOL = 1e-4


def cfg(size: int = 256, **train_kw) -> RunConfig:
    """tiny_cfg on `size` images, unaugmented, 3 deterministic epochs."""
    return tiny_cfg({"synthetic_size": size, "batch_size": 32, "crop_padding": 0, "hflip": False},
                    **{"epochs": 3, "deterministic": True, **train_kw})


def rows(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------------
# Device groups


def test_device_groups_split_devices_per_worker():
    gpus = [f"cuda:{i}" for i in range(4)]
    assert devices.device_groups(gpus, 1) == gpus
    assert devices.device_groups(gpus, 2) == ["cuda:0,cuda:1", "cuda:2,cuda:3"]
    assert devices.device_groups(gpus[:3], 2) == ["cuda:0,cuda:1"]
    assert devices.device_groups(["cpu"], 2) == ["cpu,cpu"]
    with pytest.raises(SpecError, match="--nproc-per-node: 4 processes per trial need 4 distinct GPUs"):
        devices.device_groups(gpus[:2], 4)
    with pytest.raises(SpecError, match="--nproc-per-node: must be a positive integer"):
        devices.device_groups(gpus, 0)
    assert devices.parse_group("cpu,cpu") == ["cpu", "cpu"]
    for bad in ("cpu", "cuda:0,cuda:0", "cpu,cuda:0", "cuda,cuda:1"):
        with pytest.raises(SpecError, match="--device"):
            devices.parse_group(bad)


def test_worker_device_for_nproc():
    def resolve(spec):
        return ["cpu"] if spec in (None, "cpu") else spec.split(",")

    assert devices.worker_device(None, 1, resolve) is None
    assert devices.worker_device("cpu", 2, resolve) == "cpu,cpu"
    assert devices.worker_device(None, 3, resolve) == "cpu,cpu,cpu"
    assert devices.worker_device("cuda:2,cuda:3", 2, resolve) == "cuda:2,cuda:3"
    with pytest.raises(SpecError, match="--device: cuda:1,cuda:2,cuda:3: lists 3 devices"):
        devices.worker_device("cuda:1,cuda:2,cuda:3", 2, resolve)
    with pytest.raises(SpecError, match="one device per worker"):
        devices.worker_device("cuda:0,cuda:1", 1, resolve)


# ---------------------------------------------------------------------------------------------------
# Data shards and batch norm


def test_ranks_take_disjoint_shards_of_each_global_batch_on_the_device_resident_path():
    c = cfg()
    whole = load_data(c)
    ranks = [load_data(c, rank=r, world_size=2) for r in range(2)]
    assert all(r.steps_per_epoch == whole.steps_per_epoch == 8 for r in ranks)
    for epoch in (0, 1):
        for (x, y), (x0, y0), (x1, y1) in zip(whole.train_batches(epoch, 3), *(r.train_batches(epoch, 3)
                                                                              for r in ranks)):
            assert len(y0) == len(y1) == len(y) // 2
            # rank r holds every other image of the global batch: together, exactly that batch
            assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
            assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)
    val = [r.val_indices() for r in ranks]
    assert sorted(torch.cat(val).tolist()) == list(range(len(whole.val_x)))  # a partition of the val set


def test_global_batch_must_split_evenly_over_ranks():
    x, y = torch.zeros(64, 3, 8, 8, dtype=torch.uint8), torch.arange(64) % 4
    with pytest.raises(SpecError, match="data.batch_size: 15 is not divisible by 2 processes"):
        InMemoryData(x, y, x, y, 4, batch_size=15, eval_batch_size=8, world_size=2)


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_cpu_sync_batchnorm_is_batchnorm_on_one_rank(one_rank_group):
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    synced = sync_batchnorm_cpu(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                                        torch.nn.ReLU()))
    synced.load_state_dict(plain.state_dict())
    assert isinstance(synced[1], CpuSyncBatchNorm)
    assert set(synced.state_dict()) == set(plain.state_dict())
    x = torch.randn(6, 3, 9, 9)
    for model in (plain, synced):
        model(x).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), synced.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6), name
    for key, value in plain.state_dict().items():
        assert torch.allclose(value.float(), synced.state_dict()[key].float(), rtol=1e-5, atol=1e-6), key
    synced.eval()
    plain.eval()
    assert torch.allclose(plain(x), synced(x), atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Whole trials under torchrun


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_of_the_same_global_batch(tmp_path):
    c = cfg(size=96, lr=0.01)  # 6 steps: see REL_TOL
    single = train(c, tmp_path / "one", device="cpu", progress=False)
    seen = []
    double = ddp.launch(c, tmp_path / "two", device="cpu,cpu", progress=False, on_epoch=seen.append)

    assert [r["epoch"] for r in seen] == [1, 2, 3]  # the launcher relayed rank 0's epochs as they came
    assert double.device == "cpu x2" and double.epochs == 3
    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    worst = 0.0
    for r1, r2 in zip(a, b, strict=True):
        for key in ("lr", "train_loss", "val_loss", "top1_err", "top5_err"):
            assert r2[key] == pytest.approx(r1[key], rel=REL_TOL, abs=1e-6), (r1["epoch"], key)
            worst = max(worst, abs(r2[key] - r1[key]) / max(abs(r1[key]), 1e-12))
    print(f"2 gloo ranks vs 1 process: worst relative difference {worst:.2e} over {len(a)} epochs")
    for key in ("top1_err", "top5_err", "val_loss", "params", "macs"):
        assert getattr(double, key) == pytest.approx(getattr(single, key), rel=REL_TOL, abs=1e-6), key
    # Only rank 0 wrote: the same files as the single process, nothing per rank.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert json.loads((tmp_path / "two" / "final.json").read_text()) == double.to_json()

    # The reported validation numbers are the all-reduced ones of the model rank 0 checkpointed.
    from ablations.patch import build_model

    model = build_model(cfg().backbone, cfg().se)
    model.load_state_dict(torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["model"])
    loss, top1, top5 = evaluate(model, load_data(c), contextlib.nullcontext, Dist(), 4)
    assert (loss, top1, top5) == pytest.approx((b[-1]["val_loss"], b[-1]["top1_err"], b[-1]["top5_err"]),
                                               rel=1e-6)


@pytest.mark.slow
def test_diverging_ddp_trial_is_trial_failed_with_the_ranks_reason(tmp_path):
    with pytest.raises(TrialFailed, match="training loss is (nan|inf).*diverged"):
        ddp.launch(cfg(lr=1e8, warmup_epochs=0, epochs=1), tmp_path, device="cpu,cpu", progress=False)
    assert not (tmp_path / "final.json").exists()


@pytest.mark.slow
def test_ablate_run_with_nproc_per_node_records_the_ddp_trial_in_optuna(tmp_path):
    sweep = write_sweep(tmp_path, settings=[{"label": "r=16", "reduction": 16}], seeds=1)
    results = tmp_path / "results"
    proc = ablate("run", str(sweep), "--results-dir", str(results), "--devices", "cpu", "--nproc-per-node", "2",
                  "--set", "train.epochs=2", "--set", "backbone.layers=[1,1,1,1]")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    (trial,) = load_study(results).trials
    assert trial.state.name == "COMPLETE" and trial.user_attrs["device"] == "cpu x2"
    assert trial.user_attrs["worker"] == f"{socket.gethostname()}:{proc.pid}"  # the worker, not a rank
    assert sorted(trial.intermediate_values) == [1, 2]
    run_dir = Path(trial.user_attrs["run_dir"])
    assert trial.value == json.loads((run_dir / "final.json").read_text())["top1_err"]
    assert not [p for p in os.listdir(run_dir) if "rank" in p]


def test_cpu_sync_batchnorm_keeps_timms_bn_activation(one_rank_group):
    """timm's BatchNormAct2d (EfficientNet's BN + SiLU) stays BN + SiLU once synchronised, on CPU and
    (timm's converter) for SyncBatchNorm on GPUs."""
    from timm.layers import BatchNormAct2d, convert_sync_batchnorm

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=torch.nn.SiLU))
    synced = sync_batchnorm_cpu(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3),
                                                        BatchNormAct2d(8, act_layer=torch.nn.SiLU)))
    synced.load_state_dict(plain.state_dict())
    assert isinstance(synced[1], CpuSyncBatchNormAct) and set(synced.state_dict()) == set(plain.state_dict())
    x = torch.randn(6, 3, 9, 9)
    torch.testing.assert_close(synced(x), plain(x))  # training mode: batch statistics, then SiLU
    assert (plain(x) < 0).any()  # SiLU, not ReLU or nothing: the comparison sees the activation
    gpu_form = convert_sync_batchnorm(torch.nn.Sequential(BatchNormAct2d(8, act_layer=torch.nn.SiLU)))
    assert isinstance(gpu_form[0].act, torch.nn.SiLU)
