"""Where a process sits in a data-parallel trial, and batch norm over the global batch on CPU ranks.

`Dist` is the one place rank and world size matter to the trainer: data are sharded by (rank,
world_size), gradients all-reduced by DDP, metrics summed by `Dist.sum`, and only the main rank writes
the run directory. A single process is `Dist()` (rank 0 of 1), where every method is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from ablations.errors import SpecError
from ablations.schema import TrainSpec

SYNC_BN_BELOW = 32  # images per rank: below this, `train.sync_bn: null` synchronises BN


def ddp_options(dev: torch.device) -> dict[str, Any]:
    """DDP's keyword arguments. Gradients are views of the all-reduce buckets (no copy from bucket to
    `.grad` after each all-reduce). No buffer broadcast before every forward: rank 0's BN statistics
    reach the others once per epoch, before evaluation (`Dist.broadcast_buffers`), which is all the
    per-step broadcast achieved for the checkpointed model, and with SyncBN the ranks' statistics
    are equal anyway. (newer torch names the option forward_sync_buffers; broadcast_buffers=False
    there also skips the start's sync, which the ranks' identical seeding makes moot.)"""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return {"device_ids": [dev.index] if dev.type == "cuda" else None, sync: False, "gradient_as_bucket_view": True}


def check_compile_sync_bn(spec: TrainSpec, world_size: int, rank_batch: int) -> None:
    """Refuse torch.compile with SyncBN over several ranks: SyncBatchNorm breaks the compiled graph at
    every BN layer (and has failed outright in some torch versions). Compile + DDP without it works."""
    if spec.compile and Dist(0, world_size).wants_sync_bn(spec, rank_batch):
        raise SpecError(f"with batch norm synchronised over {world_size} ranks ({rank_batch} images "
                        "per rank): SyncBatchNorm breaks the compiled graph; set train.sync_bn: false (or "
                        "train.compile: false)", key="train.compile")


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a data-parallel job: the one place rank and world size come from.

    Data are sharded by (rank, world_size) and metrics go through `sum`; only the main rank writes.
    The process group itself is set up by ddp.py's ranks (torchrun).
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> Dist:
        if tdist.is_available() and tdist.is_initialized():  # a torchrun rank (ddp.py set the group up)
            return cls(tdist.get_rank(), tdist.get_world_size())
        return cls()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            tdist.all_reduce(t)
        return t

    def wants_sync_bn(self, spec: TrainSpec, rank_batch: int) -> bool:
        """`train.sync_bn`, or when unset: on when a rank's batch is under SYNC_BN_BELOW images.

        SyncBN makes the statistics those of one device with the global batch (results then do not
        depend on the number of ranks) at the cost of an all-gather and an all-reduce per BN layer per
        step (53 each for a ResNet-50) and graph breaks under torch.compile. Per-rank statistics are
        as good once a rank's batch is 32 or more (the GroupNorm paper's Fig. 1: BN's error grows
        below 32 per batch), the usual case on ImageNet; below that, as for cifar's 128 on 8 GPUs,
        it pays."""
        if self.world_size == 1:
            return False
        return spec.sync_bn if spec.sync_bn is not None else rank_batch < SYNC_BN_BELOW

    def sync_batchnorm(self, model: nn.Module, dev: torch.device) -> nn.Module:
        """BN statistics over the global batch, as on one device (torch's SyncBatchNorm has no CPU
        kernels: CPU ranks get CpuSyncBatchNorm below). timm's converter keeps the activation of its
        BatchNormAct2d layers (EfficientNet, MobileNetV3, RegNet), which torch's would drop."""
        if self.world_size == 1:
            return model
        if dev.type == "cpu":
            return sync_batchnorm_cpu(model)
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)

    def wrap(self, model: nn.Module, dev: torch.device) -> nn.Module:
        """The network the training loop steps: DDP (gradients all-reduced in backward) on several ranks."""
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, **ddp_options(dev))

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Every rank gets rank 0's BN running statistics, so all ranks evaluate the model rank 0
        checkpoints (with per-rank BN the last step leaves them slightly apart)."""
        if self.world_size > 1:
            for b in model.buffers():
                tdist.broadcast(b, 0)


# ---------------------------------------------------------------------------------------------------
# Batch norm over the global batch on CPU ranks


class _SyncBN(torch.autograd.Function):
    """Training-mode batch norm whose statistics, and the two gradient sums the input gradient needs,
    are all-reduced over the ranks: torch's SyncBatchNorm maths (its kernels are GPU-only) in plain
    tensor ops. Weight and bias gradients stay local; DDP averages them like any other."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum):
        dims, shape, c = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2), x.shape[1]
        sums = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_tensor([x.numel() / c])]).double()
        tdist.all_reduce(sums)
        n = sums[-1]
        mean = sums[:c] / n
        var = (sums[c:2 * c] / n - mean * mean).clamp_min(0)  # biased, as BN normalises with
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
            running_var.mul_(1 - momentum).add_(momentum * (var * n / (n - 1)).to(running_var.dtype))
        invstd = (var + eps).rsqrt().to(x.dtype)
        xhat = (x - mean.to(x.dtype).view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.n = n
        return xhat * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, dy):
        xhat, invstd, weight = ctx.saved_tensors
        dims, shape, c = [0, *range(2, dy.dim())], [1, -1] + [1] * (dy.dim() - 2), dy.shape[1]
        sum_dy, sum_dy_xhat = dy.sum(dims), (dy * xhat).sum(dims)
        total = torch.cat([sum_dy, sum_dy_xhat]).double()
        tdist.all_reduce(total)
        mean_dy = (total[:c] / ctx.n).to(dy.dtype).view(shape)
        mean_dy_xhat = (total[c:] / ctx.n).to(dy.dtype).view(shape)
        dx = (dy - mean_dy - xhat * mean_dy_xhat) * (invstd * weight).view(shape)
        return dx, sum_dy_xhat, sum_dy, None, None, None, None


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that normalises over every rank's images while training in a process group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.affine and self.track_running_stats and self.momentum is not None
                and tdist.is_available() and tdist.is_initialized()):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        return _SyncBN.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                             self.momentum)


class CpuSyncBatchNormAct(CpuSyncBatchNorm):
    """timm's BatchNormAct2d (EfficientNet, MobileNetV3, RegNet, CBAM): the synchronised BN, then its own
    drop and activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def sync_batchnorm_cpu(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm2d made a CpuSyncBatchNorm sharing its parameters and buffers (same
    state-dict keys, so checkpoints move freely between one process and several)."""
    from timm.layers import BatchNormAct2d

    if isinstance(module, nn.BatchNorm2d):
        norm_act = isinstance(module, BatchNormAct2d)
        new = (CpuSyncBatchNormAct if norm_act else CpuSyncBatchNorm)(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if norm_act:
            new.drop, new.act = module.drop, module.act
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        return new.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, sync_batchnorm_cpu(child))
    return module
