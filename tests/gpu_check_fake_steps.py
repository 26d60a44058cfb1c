"""Stand-in steps for tests/test_gpu_check.py: the GPU check's driver run on a CPU, one step of each
outcome."""

from __future__ import annotations

import os
import time


class Skip(Exception):
    pass


def ok(gpus: int) -> dict:
    return {"gpus": gpus, "pid": os.getpid()}


def fails(gpus: int) -> dict:
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def skipped(gpus: int) -> dict:
    raise Skip(f"needs 2 GPUs; this machine has {gpus}")


def hangs(gpus: int) -> dict:
    time.sleep(60)
    return {}


def crashes(gpus: int) -> dict:
    os._exit(9)  # a segfault's worth of exit: no result file


STEPS = {"ok": (ok, 30), "fails": (fails, 30), "skipped": (skipped, 30), "hangs": (hangs, 2),
         "crashes": (crashes, 30), "after": (ok, 30)}
