"""torch.compile for one trial (`train.compile: true`): compiled before the clock starts, from a clean
compiler state.

Two things go wrong with compile in a long-lived worker otherwise. Dynamo keeps every compiled version
of a module's forward across trials (each new model fails the old guards and compiles again, train
and eval), and after `recompile_limit` (8) versions it silently runs the rest eagerly: later settings
of a sweep would then be timed eager against compiled ones. And the first steps of a trial pay for
compilation (minutes with inductor), which would land in its images/s and train time.

So each compiled trial starts with `torch.compiler.reset()`, and `warm_up` compiles the training and
evaluation graphs on stand-in batches of the trial's shapes before the first epoch; its time is the
final record's `compile_seconds`. Evaluation pads its last, shorter batch to the full one
(train.evaluate), so no other shape ever compiles in an epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ablations.rng import rng_state, set_rng_state

BACKEND = "inductor"  # torch.compile's default; the tests use dynamo's "eager" (inductor takes minutes on 2 cores)


def compile_nets(model: nn.Module, net: nn.Module, world_size: int) -> tuple[nn.Module, nn.Module]:
    """(training network, evaluation network), compiled after a compiler reset. `net` is `model` or
    its DDP wrapper; evaluation runs `model` itself on several ranks (DDP's forward may talk to the
    others, and validation shards can differ by one batch)."""
    torch.compiler.reset()  # this process's earlier trials' graphs: see the module docstring
    train_net = torch.compile(net, backend=BACKEND)
    return train_net, (train_net if world_size == 1 else torch.compile(model, backend=BACKEND))


def warm_up(model: nn.Module, train_net: nn.Module, eval_net: nn.Module, *, train_batch: int, eval_batch: int,
            image: tuple[int, int, int], device: torch.device, memory_format: torch.memory_format,
            amp: Callable[[], Any]) -> float:
    """Compile the training step (forward and backward) and the evaluation forward on zero images of
    the trial's shapes; returns the seconds it took. Leaves the trial as it found it: the weights get
    no step, the gradients are dropped, and the BN statistics and RNG states are put back."""
    t0 = time.perf_counter()
    buffers = {k: v.clone() for k, v in model.state_dict().items() if k not in dict(model.named_parameters())}
    rng = rng_state()
    try:
        x = torch.zeros(train_batch, *image, device=device).contiguous(memory_format=memory_format)
        y = torch.zeros(train_batch, dtype=torch.long, device=device)
        train_net.train()
        with amp():
            loss = F.cross_entropy(train_net(x), y)
        loss.backward()  # under DDP an all-reduce too: every rank warms up the same way
        eval_net.eval()
        with torch.no_grad(), amp():
            eval_net(torch.zeros(eval_batch, *image, device=device).contiguous(memory_format=memory_format))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        for p in model.parameters():
            p.grad = None
        model.load_state_dict(buffers, strict=False)
        set_rng_state(rng)
        model.train()
    return time.perf_counter() - t0


def dynamo_counts() -> dict[str, int]:
    """What dynamo has done in this process so far (its counters outlive `torch.compiler.reset()`; take
    differences): graphs compiled, graph breaks, frames seen and frames compiled."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "frames_ok": int(counters["frames"]["ok"]), "frames_total": int(counters["frames"]["total"])}
