"""Where and with what a result was computed: commit, machine, device, threads, library versions.

Every stored unit, derived record, distillation student and timing carries this record, so a
number can be traced to the code and the machine that made it. The commit is read with git from
the package's own folder; a copy without git gets it from `CIRCUITLIB_COMMIT`, else "unknown".
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from circuitlib.version import __version__


def provenance(device: str, threads: int) -> dict:
    """Where and with what a unit ran: commit, machine, device, threads, library versions."""
    import numpy
    import transformers

    package = Path(__file__).resolve().parents[1]  # circuitlib/, inside a git checkout or not
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
            cwd=package,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        commit = (commit + ("+local-changes" if dirty else "")) if commit else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    # a copy without .git (e.g. a GPU machine the tree was sent to): the commit its sender gave
    commit = commit or os.environ.get("CIRCUITLIB_COMMIT", "") or "unknown"
    dev = torch.device(device)
    return {
        "commit": commit,
        "host": platform.node(),
        "cpu": cpu_name(),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "torch_threads": threads,
        "circuitlib_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "numpy_version": numpy.__version__,
    }


def machine() -> str:
    """CPU model, logical cores, PyTorch threads and GPU of this machine (to label timings)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU used"
    return f"{cpu_name()}, {os.cpu_count()} logical cores, torch threads: {torch.get_num_threads()}, {gpu}"


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
