"""Where result numbers come from: the machine, the package versions, the load average (used by
``fleetloop demo llm``'s report and by the benchmarks)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    """Where the numbers come from: CPUs, platform, Python and the versions of the packages that matter."""
    versions = {}
    for pkg in ("grpcio", "protobuf", "torch", "numpy", "safetensors", "fleetloop"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    mem_gb = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_gb = round(int(line.split()[1]) / 1e6, 1)
                    break
    except OSError:
        pass
    commit = None
    try:
        repo = Path(__file__).resolve().parents[2]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu_count": os.cpu_count(), "cpus_usable": usable, "memory_gb": mem_gb, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "packages": versions, "git_commit": commit, "loadavg_1m_at_start": load_average(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def load_average() -> float | None:
    """1-minute load average (None where unavailable): a shared machine makes absolute numbers noisy."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None

