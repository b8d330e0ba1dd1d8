"""Where a number was measured: one description of the machine for every benchmark and study.

Imports no torch itself: torch's version, threads and device are added when torch is already loaded
(a benchmark that trains has imported it; the store's benchmarks have not, and stay light).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import psutil


def describe(device: Any = None) -> dict[str, Any]:
    """``{"platform", "processor", "cpus", "memory_gb", "python"}`` plus, when torch is loaded, ``"torch"``,
    ``"threads"`` and ``"device"`` (the CUDA device's name when ``device`` is a CUDA device, or when it is
    None and CUDA is available; else ``"cpu"``)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        on_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        name = torch.cuda.get_device_name(torch.device(device) if device is not None else 0) if on_cuda else "cpu"
        info.update(torch=torch.__version__, threads=torch.get_num_threads(), device=name)
    return info
