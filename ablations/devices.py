"""Device names, checked against this machine: one trial's device, the devices of `ablate run
--devices`, and the groups of N devices that one DDP trial spans (`cuda:0,cuda:1`, or `cpu,cpu` for
gloo ranks). torch is imported only when a name has to be checked against the hardware.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ablations.errors import SpecError


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def is_group(device: str | None) -> bool:
    """Whether `device` names several devices: one trial trained by torchrun over all of them (ddp.py)."""
    return device is not None and "," in device


def resolve_device(name: str | None) -> Any:
    """The torch.device one process trains on: `name`, or CUDA when present, else the CPU."""
    import torch

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


def resolve_devices(spec: str | None) -> list[str]:
    """`cpu`, `cuda`, `cuda:1,cuda:2`, `mps` -> devices that exist here; None -> every GPU, else cpu."""
    if spec is None:
        return [f"cuda:{i}" for i in range(_cuda_count())] or ["cpu"]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise SpecError("needs at least one device", source="--devices")
    if "cuda" in devices:  # "every GPU here", with or without --nproc-per-node
        n = _cuda_count()
        if n == 0:
            raise SpecError("unknown device (available here: cpu)", source="--devices", key="cuda")
        devices = [x for d in devices for x in ([f"cuda:{i}" for i in range(n)] if d == "cuda" else [d])]
    for d in devices:
        if d == "cpu":
            continue
        m = re.fullmatch(r"cuda(?::(\d+))?|mps", d)
        if m and d == "mps":
            import torch

            ok = torch.backends.mps.is_available()
        else:
            ok = m is not None and int(m.group(1) or 0) < _cuda_count()
        if not ok:
            have = ", ".join(["cpu", *(f"cuda:{i}" for i in range(_cuda_count()))])
            raise SpecError(f"unknown device (available here: {have})", source="--devices", key=d)
    return devices


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
        devices = [f"cuda:{i}" for i in range(_cuda_count())]
    if all(d == "cpu" for d in devices):
        return [",".join(["cpu"] * nproc)] * len(devices)
    if "cpu" in devices or len(devices) < nproc:
        raise SpecError(f"{nproc} processes per trial need {nproc} distinct GPUs; have "
                        f"{', '.join(devices)}", source="--nproc-per-node")
    return [",".join(devices[i:i + nproc]) for i in range(0, len(devices) - nproc + 1, nproc)]


def worker_device(device: str | None, nproc: int,
                  resolve: Callable[[str | None], list[str]] = resolve_devices) -> str | None:
    """What one `ablate worker` trains on: `--device` (None: the trainer's default) or, with
    `--nproc-per-node N`, a group of N devices: the first N GPUs (or N CPU ranks) unless --device lists
    exactly N. `resolve` checks names against this machine."""
    if nproc == 1:
        if is_group(device):
            raise SpecError("one device per worker (start one worker per device, or add --nproc-per-node N "
                            "to train each trial on N of them)", source="--device")
        return resolve(device)[0] if device is not None else None
    devices = resolve(device)
    if is_group(device) and len(devices) != nproc:
        raise SpecError(f"lists {len(devices)} devices but --nproc-per-node is {nproc}", source="--device",
                        key=device)
    return device_groups(devices, nproc)[0]


# ---------------------------------------------------------------------------------------------------
# The process on its device


TRIALS_PER_DEVICE_ENV = "ABLATE_TRIALS_PER_DEVICE"  # set by `ablate run` in each worker it packs


def bind(dev: Any) -> None:
    """Make `dev` this process's current CUDA device, before anything touches CUDA: what runs on "the
    current device" (the DataLoader's pin-memory thread, cuDNN handles, a bare `.cuda()`) would
    otherwise open a context on GPU 0 in a worker pinned to cuda:k."""
    if dev.type == "cuda" and dev.index is not None:
        import torch

        torch.cuda.set_device(dev)


def release(dev: Any) -> None:
    """Hand the trial's cached device memory back, so a long-lived worker's next trial (or a packed
    neighbour) does not find it held by an allocator cache of models that no longer exist."""
    if dev.type == "cuda":
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def trials_per_device() -> int:
    """How many trials share this process's device (TRIALS_PER_DEVICE_ENV; 1 when unset)."""
    import os

    try:
        return max(1, int(os.environ.get(TRIALS_PER_DEVICE_ENV, "1")))
    except ValueError:
        return 1


def packing(devices: list[str], workers: int) -> list[int]:
    """For workers pinned round-robin to `devices` (`ablate run --workers N --devices ...`), how many
    workers share each one's device."""
    mine = [devices[w % len(devices)] for w in range(workers)]
    return [mine.count(d) for d in mine]
