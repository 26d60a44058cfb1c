"""The machine a benchmark ran on, in one line for BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe(gpu: bool = True) -> str:
    """CPU cores and model, the GPU (or that there is none) where `gpu`, torch and Python versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = (f", {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}" if gpu else "")
    return f"{os.cpu_count()} CPU cores ({cpu}){device}; torch {torch.__version__}, Python {platform.python_version()}"
