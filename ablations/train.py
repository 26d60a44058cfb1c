"""Train and evaluate one setting into a run directory; resumable, and bit-repeatable on CPU.

Run directory contract (the scheduler and the analysis read these; keep the names and columns):

    config.yaml      the resolved RunConfig (`cfg.to_yaml()`); a rerun must match it
    metrics.csv      epoch, lr, train_loss, val_loss, top1_err, top5_err, epoch_seconds, images_per_s
    checkpoint.pt    after every epoch: model, optimizer, step, epoch, RNG states, metrics so far
                     (checkpoint.prev.pt: the one before; resuming skips a damaged one: checkpoints.py)
    excitations.npz  the excitation probe (see probe.py)
    final.json       written last: its presence means the trial is complete; `epochs` is the epochs
                     trained (the plateau schedule may stop before train.epochs), `lr_cuts` the epochs
                     after which the LR was divided

Every file is written atomically, so a kill at any instant leaves the previous epoch's state intact,
and a rerun continues from it. The checkpoint holds only tensors and primitive containers so it loads
with `torch.load(weights_only=True)`. Epoch data order and augmentation are functions of
(seed, epoch) (data.py), the LR a function of the step counter and the stored validation losses
(schedule.py), and the model/optimizer state is restored exactly: a resumed deterministic CPU run ends
with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ablations import checkpoints, schedule
from ablations.errors import SpecError
from ablations.runio import save_json_atomic, write_text_atomic
from ablations.spec import ROOT, RunConfig, TrainSpec

METRIC_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "top1_err", "top5_err", "epoch_seconds",
                  "images_per_s")
CHECKPOINT_FORMAT = 1
NAN_CHECK_EVERY = 25  # steps between finiteness checks: each is a device sync on a GPU


class TrialFailed(Exception):
    """The trial cannot succeed as configured (diverged: NaN/inf loss). Not a bad input."""


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a data-parallel job: the one place rank and world size come from.

    Data are sharded by (rank, world_size) and metrics go through `sum`; only the main rank writes.
    The process group itself is set up by ddp.py (torchrun).
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> Dist:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # a torchrun rank (ddp.py set the group up)
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def sync_batchnorm(self, model: nn.Module, dev: torch.device) -> nn.Module:
        """BN statistics over the global batch, as on one device (torch's SyncBatchNorm has no CPU
        kernels: CPU ranks get ddp.py's equivalent). timm's converter keeps the activation of its
        BatchNormAct2d layers (EfficientNet, MobileNetV3, RegNet), which torch's would drop."""
        if self.world_size == 1:
            return model
        if dev.type == "cpu":
            from ablations.ddp import sync_batchnorm_cpu

            return sync_batchnorm_cpu(model)
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)

    def wrap(self, model: nn.Module, dev: torch.device) -> nn.Module:
        """The network the training loop steps: DDP (gradients all-reduced in backward) on several ranks."""
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Every rank gets rank 0's BN running statistics, so all ranks evaluate the model rank 0
        checkpoints (with per-rank BN the last step leaves them slightly apart)."""
        if self.world_size > 1:
            import torch.distributed as dist

            for b in model.buffers():
                dist.broadcast(b, 0)


# --------------------------------------------------------------------------------------------------
# Recipe pieces


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SpecError(f"unknown device {name!r} (cpu, cuda, cuda:1, ...)", key="--device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"{name}: no CUDA device is available here", key="--device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SpecError(f"{name}: only {torch.cuda.device_count()} CUDA device(s)", key="--device")
    return dev


def _flatten(params: list[nn.Parameter]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Move `params` into one flat buffer (the parameters become views of it) and give it a flat
    gradient buffer. Returns the flat parameter and views of its `.grad` shaped like each parameter."""
    first = params[0]
    flat = torch.zeros(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
    flat.grad = torch.zeros_like(flat)
    grad_views = []
    offset = 0
    with torch.no_grad():
        for p in params:
            if not (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)):
                p.data = p.data.contiguous()
            # Same strides as the parameter (channels_last stays channels_last), same n elements.
            view = flat.as_strided(p.shape, p.stride(), offset)
            view.copy_(p)
            p.data = view
            grad_views.append(flat.grad.as_strided(p.shape, p.stride(), offset))
            offset += p.numel()
    return flat, grad_views


class FlatSGD(torch.optim.SGD):
    """torch's SGD on one flat buffer per parameter group instead of one tensor per parameter.

    A ResNet-50-topology model has ~160 parameter tensors; on a CPU SGD's per-tensor update loop
    costs ~4% of a small model's forward+backward. Here the parameters are views of one flat buffer
    per group; `step` copies the gradients backward left in each `.grad` into the flat gradient
    buffer (one cheap copy each) and updates the flat buffers with a few element-wise ops: results
    are bit-identical to per-tensor SGD. Gradients are not accumulated into the flat buffer directly:
    autograd's in-place accumulation into existing `.grad`s costs more than it saves.
    """

    def __init__(self, groups: list[dict[str, Any]], **kwargs: Any):
        self._members: list[tuple[list[nn.Parameter], list[torch.Tensor]]] = []
        flat_groups = []
        for g in groups:
            params = list(g["params"])
            if params:
                flat, views = _flatten(params)
                self._members.append((params, views))
                flat_groups.append({**g, "params": [flat]})
        super().__init__(flat_groups, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # the closure computes the gradients: before they are gathered
            with torch.enable_grad():
                loss = closure()
        for params, views in self._members:
            for p, view in zip(params, views):
                if p.grad is None:  # unused in this step's graph. (torch's SGD would skip it; here
                    view.zero_()    # decay and momentum still apply. ResNets use every parameter.)
                else:
                    view.copy_(p.grad)
        super().step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for params, _ in self._members:
            for p in params:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()


def make_optimizer(model: nn.Module, spec: TrainSpec) -> FlatSGD:
    """SGD with weight decay on the weights (and, unless wd_skip_bn_bias is off, not on BN
    parameters and biases: the 1-D ones). Call after moving the model to its device and format."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if spec.wd_skip_bn_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return FlatSGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov and spec.momentum > 0)


@contextlib.contextmanager
def torch_settings(spec: TrainSpec, device: torch.device) -> Iterator[None]:
    """Threads, determinism and kernel choices for this trial; the process's own are restored after
    (tests and in-process workers run several trials in one interpreter)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        if spec.deterministic:
            import os

            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to repeat
            torch.use_deterministic_algorithms(True)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = not spec.deterministic
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG, as tensors and primitives (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss": py_state[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))


# --------------------------------------------------------------------------------------------------
# Run directory


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


def check_run_dir(cfg: RunConfig, out_dir: Path) -> None:
    """A run directory belongs to one config: refuse to mix two trials' states."""
    path = out_dir / "config.yaml"
    if not path.exists():
        return
    from ablations.spec import load_run_config

    old = load_run_config(path)
    if old == cfg:
        return
    a, b = _flat(old.model_dump(mode="json")), _flat(cfg.model_dump(mode="json"))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:3])
    raise SpecError(f"holds a run with a different config ({shown}); use another --out or delete it",
                    source=str(path))


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


@functools.cache  # per process: a long-lived worker runs one code version
def versions() -> dict[str, str]:
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}


@functools.cache  # the code a worker runs is fixed at import; no git subprocess per trial
def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


# --------------------------------------------------------------------------------------------------
# Epochs


@torch.no_grad()
def evaluate(model: nn.Module, data, amp: Callable[[], Any], dist: Dist, num_classes: int
             ) -> tuple[float, float, float]:
    """Validation loss (plain cross-entropy, no smoothing) and top-1 / top-5 error in %."""
    model.eval()
    k = min(5, num_classes)
    sums = None
    for x, y in data.val_batches():
        with amp():
            logits = model(x)
        logits = logits.float()
        hits = logits.topk(k, dim=1).indices == y[:, None]
        batch = torch.stack([F.cross_entropy(logits, y, reduction="sum"), hits[:, 0].sum(),
                             hits.any(1).sum(), torch.tensor(len(y), device=y.device)]).double()
        sums = batch if sums is None else sums + batch
    loss, top1, top5, n = dist.sum(sums).tolist()
    return loss / n, 100.0 * (1 - top1 / n), 100.0 * (1 - top5 / n)


@torch.no_grad()
def precise_bn(model: nn.Module, data, epoch: int, seed: int, batches: int, amp: Callable[[], Any]) -> None:
    """Recompute every BN layer's running statistics as a plain average over the first `batches`
    training batches of `epoch`, with the weights as they are now (pycls's precise BN).

    The running averages (momentum 0.1) trail weights that moved fast: a small model early in
    training then evaluates with statistics of a network it no longer is (validation loss 10^3-10^4
    after epoch 1 on the quick profile, while the training loss is ~2). Training is unchanged.
    """
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if batches <= 0 or not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    try:
        for _, (x, _y) in zip(range(batches), data.train_batches(epoch, seed)):
            with amp():
                model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def autocast(spec: TrainSpec, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The training step's autocast context: bf16 on CUDA when the profile asks for it, else none."""
    bf16 = device.type == "cuda" and spec.bf16
    return lambda: torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_epoch(net: nn.Module, data, opt: torch.optim.Optimizer, cfg: RunConfig, epoch: int, step: int,
                amp: Callable[[], Any], bar: Any = None, dist: Dist | None = None, cuts: int = 0
                ) -> tuple[int, float, float, float]:
    """One pass over this rank's shard, updating `bar` (if any) per step; `cuts`: the plateau rule's
    LR cuts so far. Returns (next step, mean train loss over all ranks, last LR, loop seconds)."""
    dist = dist or Dist()
    spec = cfg.train
    net.train()
    loss_sum = None
    lr = None
    steps = 0
    t0 = time.perf_counter()
    for x, y in data.train_batches(epoch, cfg.seed):
        new_lr = schedule.lr_at(step, spec, data.steps_per_epoch, cuts)
        if new_lr != lr:
            lr = new_lr
            for g in opt.param_groups:
                g["lr"] = lr
        with amp():
            loss = F.cross_entropy(net(x), y, label_smoothing=spec.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # Accumulated on the device; read back only every NAN_CHECK_EVERY steps.
        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
        step += 1
        steps += 1
        if steps % NAN_CHECK_EVERY == 0:  # all-reduced: a rank that stopped alone would hang the others
            _check_finite(dist.sum(loss_sum.clone()), epoch, step, lr)
        if bar is not None:
            bar.update(1)
    loss_sum = dist.sum(loss_sum) / dist.world_size
    _check_finite(loss_sum, epoch, step, lr)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return step, loss_sum.item() / steps, lr, time.perf_counter() - t0


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int, lr: float) -> None:
    if not torch.isfinite(loss_sum).item():
        raise TrialFailed(f"training loss is {loss_sum.item()} in epoch {epoch + 1} (by step {step}, "
                          f"lr {lr:.4g}): diverged; lower train.lr or lengthen train.warmup_epochs")


# --------------------------------------------------------------------------------------------------
# One trial


def train(cfg: RunConfig, out_dir: Path, *, device: str | None = None, data_root: str | None = None,
          progress: bool = True, on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train `cfg` into `out_dir` (resuming from its checkpoint), probe excitations, return final.json.

    `on_epoch(row)` is called after each epoch's checkpoint is on disk (an exception it raises, e.g.
    a pruning signal, leaves a resumable run). Raises SpecError on bad input, TrialFailed on
    divergence.
    """
    out_dir = Path(out_dir)
    dist = Dist.current()
    check_run_dir(cfg, out_dir)
    final_path = out_dir / "final.json"
    if final_path.exists():
        return json.loads(final_path.read_text())
    if device is not None and "," in device:  # one trial on several devices: torchrun DDP (ddp.py)
        from ablations.ddp import launch

        return launch(cfg, out_dir, devices=device, data_root=data_root, progress=progress, on_epoch=on_epoch)
    dev = resolve_device(device)
    if dist.is_main:
        for stale in out_dir.glob(".*.tmp"):  # a write that a kill cut short (runio's temp files)
            stale.unlink(missing_ok=True)
    from ablations.data import load_data

    mf = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    with torch_settings(cfg.train, dev):
        data = load_data(cfg, device=dev, root=data_root, memory_format=mf, rank=dist.rank,
                         world_size=dist.world_size)
        try:
            return _train(cfg, out_dir, dev, dist, data, mf, progress, on_epoch)
        finally:
            data.close()  # a long-lived worker's next trial must not inherit this one's loader workers


def _train(cfg: RunConfig, out_dir: Path, dev: torch.device, dist: Dist, data, mf: torch.memory_format,
           progress: bool, on_epoch: Callable[[dict], None] | None) -> dict:
    from ablations.complexity import complexity
    from ablations.patch import build_model
    from ablations.probe import probe_excitations, save_excitations

    spec = cfg.train
    seed_all(cfg.seed)
    model = build_model(cfg.backbone, cfg.se)
    cx = complexity(model, cfg.data.input_size, cfg.backbone.in_chans)  # before any training step
    model = dist.sync_batchnorm(model, dev).to(dev, memory_format=mf)
    opt = make_optimizer(model, spec)
    net = dist.wrap(model, dev)
    net = torch.compile(net) if spec.compile else net
    # DDP's forward may talk to the other ranks, and validation shards can differ by one batch.
    eval_net = net if dist.world_size == 1 else torch.compile(model) if spec.compile else model

    amp = autocast(spec, dev)
    # Claimed only now that data and model are known to work: a run that failed on bad input leaves
    # no config behind to clash with the corrected rerun.
    if dist.is_main and not (out_dir / "config.yaml").exists():
        write_text_atomic(out_dir / "config.yaml", cfg.to_yaml())
    ckpt_path = out_dir / "checkpoint.pt"
    rows: list[dict[str, Any]] = []
    start, step, train_seconds = 0, 0, 0.0
    ckpt = checkpoints.load_latest(out_dir, CHECKPOINT_FORMAT, main=dist.is_main)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start, step, train_seconds = ckpt["epoch"], ckpt["step"], ckpt["train_seconds"]
        rows = list(ckpt["metrics"])
        set_rng_state(ckpt["rng"])
        del ckpt

    for epoch in range(start, spec.epochs):  # `epochs` is the cap; the plateau rule may end sooner
        plateau = schedule.plateau_state(spec, [r["val_loss"] for r in rows])
        if plateau.stop is not None:
            break
        t0 = time.perf_counter()
        with _progress(data.steps_per_epoch, f"epoch {epoch + 1}/{spec.epochs}", progress) as bar:
            step, train_loss, lr, loop_s = train_epoch(net, data, opt, cfg, epoch, step, amp, bar, dist,
                                                       cuts=len(plateau.cuts))
        precise_bn(model, data, epoch, cfg.seed, spec.precise_bn, amp)
        dist.broadcast_buffers(model)
        val_loss, top1, top5 = evaluate(eval_net, data, amp, dist, cfg.backbone.num_classes)
        if not math.isfinite(val_loss):  # an error rate from overflowing logits is no result
            raise TrialFailed(f"validation loss is {val_loss} after epoch {epoch + 1} (training loss "
                              f"{train_loss:.4g}): eval-mode activations overflowed, diverged")
        epoch_s = time.perf_counter() - t0
        train_seconds += epoch_s
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "val_loss": val_loss,
               "top1_err": top1, "top5_err": top5, "epoch_seconds": epoch_s,
               "images_per_s": data.images_per_epoch * dist.world_size / loop_s}
        rows.append(row)
        if dist.is_main:
            checkpoints.save(out_dir, {  # keeps the previous one too: checkpoints.py
                "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "step": step,
                "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(),
                "metrics": rows, "train_seconds": train_seconds,
            })
            write_metrics_csv(out_dir / "metrics.csv", rows)
        if progress:
            from tqdm.auto import tqdm

            tqdm.write(f"epoch {epoch + 1}/{spec.epochs}  train_loss {train_loss:.4f}  val_loss "
                       f"{val_loss:.4f}  top1_err {top1:.2f}%  top5_err {top5:.2f}%  {epoch_s:.1f}s  "
                       f"{row['images_per_s']:.0f} img/s", file=sys.stderr)
        if on_epoch is not None:
            on_epoch(dict(row))

    if not rows:  # cannot happen with epochs > 0; guards a hand-edited checkpoint
        raise SpecError("checkpoint holds no epochs; delete it to start over", source=str(ckpt_path))
    if dist.is_main:
        save_excitations(out_dir / "excitations.npz",
                         probe_excitations(model, data, cfg.backbone.num_classes))
    last = rows[-1]
    steady = rows[1:] or rows  # the first epoch pays warm-up (allocator, compile, cudnn autotune)
    final = {
        "top1_err": last["top1_err"], "top5_err": last["top5_err"], "val_loss": last["val_loss"],
        "params_m": cx.params_m, "gflops": cx.gflops, "params": cx.params, "macs": cx.macs,
        "train_seconds": train_seconds,
        "images_per_s": len(steady) / sum(1.0 / r["images_per_s"] for r in steady),
        "epochs": len(rows), "lr_cuts": schedule.lr_cuts(spec, [r["val_loss"] for r in rows]),
        "device": str(dev) if dist.world_size == 1 else f"{dev.type} x{dist.world_size}",
        "versions": dict(versions()), "git_commit": git_commit(),
        "sweep": cfg.sweep, "profile": cfg.profile, "setting": cfg.setting, "seed": cfg.seed,
    }
    if dist.is_main:
        save_json_atomic(out_dir / "final.json", final)
    return final


# --------------------------------------------------------------------------------------------------
# ablate train


DEFAULT_LABEL = "SE r=16"


def cli_train(args) -> int:
    """`ablate train`: one setting (standard SE r=16, or --sweep/--setting's row) into --out."""
    from ablations.spec import SESpec, Setting, load_profile, load_sweep, run_config

    profile = load_profile(args.profile, args.set)
    if args.sweep is None:
        if args.setting is not None:
            raise SpecError("needs --sweep (the file the label comes from)", key="--setting")
        setting, sweep_name = Setting(label=DEFAULT_LABEL, se=SESpec()), ""
    else:
        sweep = load_sweep(args.sweep)
        labels = [s.label for s in sweep.settings]
        if args.setting not in labels:
            what = "required with --sweep" if args.setting is None else f"unknown label {args.setting!r}"
            raise SpecError(f"{what} (one of: {', '.join(labels)})", source=sweep.path, key="--setting")
        setting, sweep_name = sweep.settings[labels.index(args.setting)], sweep.name
    if not 0 <= args.seed < 2**31:
        raise SpecError(f"must be in 0..{2**31 - 1} (got {args.seed})", key="--seed")
    cfg = run_config(profile, setting, args.seed, sweep=sweep_name)
    try:
        final = train(cfg, Path(args.out), device=args.device, data_root=args.data_root)
    except TrialFailed as e:
        print(f"error: trial failed: {e}", file=sys.stderr)
        return 1
    print(f"{cfg.setting} (profile {cfg.profile}, seed {cfg.seed}): top-1 error {final['top1_err']:.2f}%  "
          f"top-5 error {final['top5_err']:.2f}%  val loss {final['val_loss']:.4f}")
    print(f"{final['params_m']:.3f} M params  {final['gflops']:.4f} GFLOPs  {final['epochs']} epochs  "
          f"{final['train_seconds']:.1f} s training  {final['images_per_s']:.0f} images/s on "
          f"{final['device']}  -> {args.out}")
    return 0
