"""One trial on several devices: the trainer under torchrun (DistributedDataParallel).

A caller with a device group such as `cuda:0,cuda:1` (or `cpu,cpu`: gloo ranks, as the tests use) calls
`launch` instead of `train.train` (devices.is_group tells). `launch` runs `torchrun --standalone
--nproc-per-node N` with this module as the rank program: each rank joins the process group (NCCL on
GPUs, gloo on CPU) and calls the ordinary `train.train` on its own device. From there
`distributed.Dist` is the one place rank and world size matter:
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

from ablations import errors, rundir
from ablations.atomic import save_json_atomic
from ablations.bundled import ROOT
from ablations.devices import parse_group
from ablations.errors import TrialFailed
from ablations.processes import die_with_parent, usable_cores
from ablations.schema import RunConfig

POLL_S = 0.5  # how often the launcher looks for a new epoch in metrics.csv
STOP_GRACE_S = 30  # after SIGTERM, how long torchrun gets to stop its ranks before SIGKILL


# ---------------------------------------------------------------------------------------------------
# The launcher (runs in the worker)


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
        env["OMP_NUM_THREADS"] = str(cfg.train.threads or max(1, usable_cores() // nproc))
    return env


def launch(cfg: RunConfig, out_dir: Path, *, device: str, data_root: str | None = None, progress: bool = True,
           on_epoch: Callable[[dict], None] | None = None) -> rundir.FinalRecord:
    """Train `cfg` into `out_dir` on the device group `device` (the contract of `train.train`)."""
    group = parse_group(device)
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
        seen = len(rundir.read_metrics(out_dir))  # a resumed run: earlier epochs are not news
        try:
            while True:
                done = proc.poll() is not None
                rows = rundir.read_metrics(out_dir)
                for row in rows[seen:]:
                    if on_epoch is not None:
                        on_epoch(dict(row))
                seen = max(seen, len(rows))
                if done:
                    break
                time.sleep(POLL_S)
        finally:
            _stop(proc)
        final = rundir.read_final(out_dir)
        if proc.returncode == 0 and final is not None:
            return final
        failure = json.loads(result.read_text()) if result.exists() else None
    if failure is None:
        raise RuntimeError(f"the DDP trial on {device} exited with status {proc.returncode} (see the ranks' "
                           "output above)")
    kind = getattr(errors, failure["kind"], None)  # a rank's error is raised here as the same type
    if kind is TrialFailed:
        raise TrialFailed(failure["message"])
    if isinstance(kind, type) and issubclass(kind, errors.UserError):
        raise kind(failure["message"], source=failure["source"], key=failure["key"])
    if failure.get("errno") is not None:
        raise OSError(failure["errno"], f"rank {failure['rank']}: {failure['message']}")
    raise RuntimeError(f"rank {failure['rank']}: {failure['kind']}: {failure['message']}")


# ---------------------------------------------------------------------------------------------------
# Inside torchrun


def agent(request_path: str) -> int:
    """torchrun's agent, tied to the launching worker's life."""
    from torch.distributed.run import main as torchrun

    request = json.loads(Path(request_path).read_text())
    die_with_parent(request["parent"])
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

    from ablations.resilience import unwritable_oserror
    from ablations.train import train

    die_with_parent(int(agent_pid))
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
            disk = unwritable_oserror(e)  # a full or read-only disk reaches the worker as such: it hands back
            save_json_atomic(request["result"], {
                "rank": me, "kind": type(e).__name__, "message": e.message if isinstance(e, errors.UserError) else str(e),
                "source": getattr(e, "source", None), "key": getattr(e, "key", None),
                "errno": None if disk is None else disk.errno})
        if not isinstance(e, (TrialFailed, errors.UserError)):
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
