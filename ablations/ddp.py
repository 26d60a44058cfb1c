"""One trial on several devices: the trainer under torchrun (DistributedDataParallel).

A device group such as `cuda:0,cuda:1` (or `cpu,cpu`: gloo ranks, as the tests use) given to
`train.train` comes here. `launch` runs `torchrun --standalone --nproc-per-node N` with this module as
the rank program: each rank joins the process group (NCCL on GPUs, gloo on CPU) and calls the ordinary
`train.train` on its own device. From there `train.Dist` is the one place rank and world size matter:
data are sharded per rank (data.py, the device-resident sets included), gradients are all-reduced by DDP,
metrics by `Dist.sum`, BN statistics synchronised on GPUs, and only rank 0 writes the run directory.

The launching process (an `ablate worker`, `ablate run` or `ablate train`) stays the only one that talks
to Optuna: it follows rank 0's epochs through metrics.csv and hands each row to `on_epoch`, exactly as
an in-process trainer would, and reads final.json at the end. A rank that fails reports why in a small
result file in the launcher's temp dir (not the run dir), which becomes the same exception an in-process
trainer would raise: TrialFailed for divergence, SpecError for bad input.

Nothing outlives the launcher: torchrun runs in its own session, is terminated with it on Ctrl-C or
SIGTERM, and every process of the tree dies with its parent even on kill -9 (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ablations.errors import SpecError
from ablations.spec import ROOT, RunConfig

POLL_S = 0.5  # how often the launcher looks for a new epoch in metrics.csv
STOP_GRACE_S = 30  # after SIGTERM, how long torchrun gets to stop its ranks before SIGKILL


# ---------------------------------------------------------------------------------------------------
# Device groups


def parse_group(devices: str) -> list[str]:
    """`cuda:0,cuda:1` -> one device per rank. All CPU, or distinct CUDA devices; never a mix."""
    group = [d.strip() for d in devices.split(",") if d.strip()]
    if len(group) < 2:
        raise SpecError(f"a device group needs at least 2 devices (got {devices!r})", key="--device")
    kinds = {d.split(":")[0] for d in group}
    if kinds == {"cpu"}:
        return group
    if kinds != {"cuda"} or len(set(group)) != len(group) or "cuda" in group:
        raise SpecError(f"a device group is N x cpu or N distinct cuda:<i> (got {devices!r})", key="--device")
    return group


def device_groups(devices: list[str], nproc: int) -> list[str]:
    """Split the devices of `ablate run --devices` (or a worker's) into one group per worker, `nproc`
    devices each: ["cuda:0", ..., "cuda:3"], 2 -> ["cuda:0,cuda:1", "cuda:2,cuda:3"]; ["cpu"], 2 ->
    ["cpu,cpu"] (CPU ranks share the machine's cores)."""
    if nproc < 1:
        raise SpecError(f"must be a positive integer (got {nproc})", source="--nproc-per-node")
    if nproc == 1:
        return devices
    if "cuda" in devices:  # "every GPU here", as cuda:0, cuda:1, ...
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if all(d == "cpu" for d in devices):
        return [",".join(["cpu"] * nproc)] * len(devices)
    if "cpu" in devices or len(devices) < nproc:
        raise SpecError(f"{nproc} processes per trial need {nproc} distinct GPUs; have "
                        f"{', '.join(devices)}", source="--nproc-per-node")
    return [",".join(devices[i:i + nproc]) for i in range(0, len(devices) - nproc + 1, nproc)]


def worker_device(device: str | None, nproc: int, resolve: Callable[[str | None], list[str]]) -> str | None:
    """What one `ablate worker` trains on: `--device` (None: the trainer's default) or, with
    `--nproc-per-node N`, a group of N devices: the first N GPUs (or N CPU ranks) unless --device lists
    exactly N. `resolve` checks names against this machine (scheduler.resolve_devices)."""
    if nproc == 1:
        if device is not None and "," in device:
            raise SpecError("one device per worker (start one worker per device, or add --nproc-per-node N "
                            "to train each trial on N of them)", source="--device")
        return resolve(device)[0] if device is not None else None
    devices = resolve(device)
    if device is not None and "," in device and len(devices) != nproc:
        raise SpecError(f"lists {len(devices)} devices but --nproc-per-node is {nproc}", source="--device",
                        key=device)
    return device_groups(devices, nproc)[0]


# ---------------------------------------------------------------------------------------------------
# Batch norm over the global batch on CPU ranks


class _SyncBN(torch.autograd.Function):
    """Training-mode batch norm whose statistics, and the two gradient sums the input gradient needs,
    are all-reduced over the ranks: torch's SyncBatchNorm maths (its kernels are GPU-only) in plain
    tensor ops. Weight and bias gradients stay local; DDP averages them like any other."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum):
        import torch.distributed as dist

        dims, shape, c = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2), x.shape[1]
        sums = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_tensor([x.numel() / c])]).double()
        dist.all_reduce(sums)
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
        import torch.distributed as dist

        xhat, invstd, weight = ctx.saved_tensors
        dims, shape, c = [0, *range(2, dy.dim())], [1, -1] + [1] * (dy.dim() - 2), dy.shape[1]
        sum_dy, sum_dy_xhat = dy.sum(dims), (dy * xhat).sum(dims)
        total = torch.cat([sum_dy, sum_dy_xhat]).double()
        dist.all_reduce(total)
        mean_dy = (total[:c] / ctx.n).to(dy.dtype).view(shape)
        mean_dy_xhat = (total[c:] / ctx.n).to(dy.dtype).view(shape)
        dx = (dy - mean_dy - xhat * mean_dy_xhat) * (invstd * weight).view(shape)
        return dx, sum_dy_xhat, sum_dy, None, None, None, None


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that normalises over every rank's images while training in a process group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and self.affine and self.track_running_stats and self.momentum is not None
                and dist.is_available() and dist.is_initialized()):
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


# ---------------------------------------------------------------------------------------------------
# The launcher (runs in the worker)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        with path.open() as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    return [{k: int(v) if k == "epoch" else float(v) for k, v in r.items()} for r in rows]


def _stop(proc: subprocess.Popen) -> None:
    """Terminate torchrun and its ranks (its whole session), politely first."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _env(nproc: int, cfg: RunConfig) -> dict[str, str]:
    env = dict(os.environ)
    # The ranks import this package even when it is used from a checkout, not installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if "OMP_NUM_THREADS" not in env:  # else torchrun sets 1 and says so on every launch
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(cfg.train.threads or max(1, cores // nproc))
    return env


def launch(cfg: RunConfig, out_dir: Path, *, devices: str, data_root: str | None = None, progress: bool = True,
           on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train `cfg` into `out_dir` on the device group `devices` (same contract as `train.train`)."""
    from ablations.train import TrialFailed

    group = parse_group(devices)
    out_dir = Path(out_dir).resolve()
    with tempfile.TemporaryDirectory(prefix="ablate-ddp-") as tmp:
        request = Path(tmp) / "request.json"
        result = Path(tmp) / "result.json"
        request.write_text(json.dumps({
            "config": cfg.model_dump(mode="json"), "out_dir": str(out_dir), "devices": group,
            "data_root": data_root, "progress": progress, "result": str(result), "parent": os.getpid(),
        }))
        cmd = [sys.executable, "-m", "ablations.ddp", "agent", str(request)]
        # Own session: a terminal's Ctrl-C reaches us alone, and we stop the tree in order.
        proc = subprocess.Popen(cmd, env=_env(len(group), cfg), start_new_session=True)
        seen = len(_read_rows(out_dir / "metrics.csv"))  # a resumed run: earlier epochs are not news
        try:
            while True:
                done = proc.poll() is not None
                rows = _read_rows(out_dir / "metrics.csv")
                for row in rows[seen:]:
                    if on_epoch is not None:
                        on_epoch(dict(row))
                seen = max(seen, len(rows))
                if done:
                    break
                time.sleep(POLL_S)
        finally:
            _stop(proc)
        if proc.returncode == 0 and (out_dir / "final.json").exists():
            return json.loads((out_dir / "final.json").read_text())
        failure = json.loads(result.read_text()) if result.exists() else None
    if failure is None:
        raise RuntimeError(f"the DDP trial on {devices} exited with status {proc.returncode} (see the ranks' "
                           "output above)")
    if failure["kind"] == "TrialFailed":
        raise TrialFailed(failure["message"])
    if failure["kind"] == "SpecError":
        raise SpecError(failure["message"], source=failure["source"], key=failure["key"])
    if failure.get("errno") is not None:
        raise OSError(failure["errno"], f"rank {failure['rank']}: {failure['message']}")
    raise RuntimeError(f"rank {failure['rank']}: {failure['kind']}: {failure['message']}")


# ---------------------------------------------------------------------------------------------------
# Inside torchrun


def _die_with_parent(parent: int) -> None:
    """Exit when `parent` does, even if it is killed with -9 (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def agent(request_path: str) -> int:
    """torchrun's agent, tied to the launching worker's life."""
    from torch.distributed.run import main as torchrun

    request = json.loads(Path(request_path).read_text())
    _die_with_parent(request["parent"])
    # The ranks print their own errors and the launcher turns them into the trial's; torchrun's
    # summary of the same failure (a table per rank) would only bury them.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    argv = ["--standalone", f"--nproc-per-node={len(request['devices'])}", "--monitor-interval=0.5",
            "-m", "ablations.ddp", "rank", request_path, str(os.getpid())]
    try:
        torchrun(argv)
    except SystemExit as e:
        return int(e.code or 0)
    except Exception:  # noqa: BLE001 -- torchrun reports a failed rank as ChildFailedError, printed already
        return 1
    return 0


def rank(request_path: str, agent_pid: str) -> int:
    """One rank: join the group, train on this rank's device, report a failure for the launcher."""
    import torch
    import torch.distributed as dist

    from ablations.train import TrialFailed, train

    _die_with_parent(int(agent_pid))
    request = json.loads(Path(request_path).read_text())
    local = int(os.environ["LOCAL_RANK"])
    device = request["devices"][local]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if cuda else "gloo")
    me = dist.get_rank()
    try:
        train(RunConfig.model_validate(request["config"]), Path(request["out_dir"]), device=device,
              data_root=request["data_root"], progress=request["progress"] and me == 0)
        dist.barrier()  # rank 0 probes excitations and writes final.json after the others are done
        return 0
    except Exception as e:
        if me == 0 or not Path(request["result"]).exists():  # rank 0's reason wins
            from ablations.resilience import unwritable_oserror
            from ablations.runio import save_json_atomic

            disk = unwritable_oserror(e)  # a full or read-only disk reaches the worker as such: it hands back
            save_json_atomic(request["result"], {
                "rank": me, "kind": type(e).__name__, "message": e.message if isinstance(e, SpecError) else str(e),
                "source": getattr(e, "source", None), "key": getattr(e, "key", None),
                "errno": None if disk is None else disk.errno})
        if not isinstance(e, (TrialFailed, SpecError)):
            raise  # a crash: its traceback belongs on this rank's stderr
        # Non-zero all the same: torchrun then stops the other ranks instead of leaving them in a collective.
        return 3
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "agent":
        return agent(argv[1])
    if len(argv) >= 3 and argv[0] == "rank":
        return rank(argv[1], argv[2])
    print("usage: python -m ablations.ddp agent REQUEST | rank REQUEST AGENT_PID (started by launch())",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
