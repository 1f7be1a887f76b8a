"""Memory: how much this process may still allocate, and a size that does not fit refused before the work.

`effective_memory_limit` is the smallest of the free RAM, the address-space limit (RLIMIT_AS, `ulimit
-v`) less what the process already uses, and the cgroup's `memory.max`/`memory.high` (v2) or
`limit_in_bytes` (v1) less its usage, for the process's cgroup and every one above it (a container, a
Slurm job). `check_fits` refuses a size whose estimate exceeds it, naming the largest size that fits;
`out_of_memory_as_error` turns an allocation failure that still happens into the same one-line error.
The estimates themselves belong to the work they describe (an extraction, an Edge Pruning run, a
distillation).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: free GPU memory, or `effective_memory_limit()` on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return effective_memory_limit()[0]


def effective_memory_limit() -> tuple[int, str]:
    """Bytes this process can still allocate on the CPU, and which limit that is: the smallest of

    free RAM                      the system's available memory (MemAvailable)
    the address-space limit       RLIMIT_AS (`ulimit -v`, Slurm, ...) less the process's address space now
    the cgroup's memory limit     memory.max / memory.high (v2) or memory.limit_in_bytes (v1) of the
                                  process's cgroup and of every cgroup above it, less its usage now
                                  (a container's or a job's limit)
    """
    import resource

    import psutil

    limits = {"free RAM": psutil.virtual_memory().available}
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits["the address-space limit (ulimit -v)"] = max(0, soft - psutil.Process().memory_info().vms)
    cgroup = cgroup_headroom()
    if cgroup is not None:
        limits["the cgroup's memory limit"] = cgroup
    which = min(limits, key=limits.get)
    return limits[which], which


_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a huge number (9223372036854771712)


def cgroup_headroom(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under the memory limits of this process's cgroups (v2 and v1), or None if none applies."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    headroom = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 (alone, or the unified half of a hybrid)
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            limit_files, usage_file = ("memory.max", "memory.high"), "memory.current"
        elif "memory" in controllers.split(","):  # v1
            base, limit_files, usage_file = root / "memory", ("memory.limit_in_bytes",), "memory.usage_in_bytes"
        else:
            continue
        folder = base / path.lstrip("/")
        while True:  # the cgroup and every one above it
            usage = _read_bytes(folder / usage_file)
            for name in limit_files:
                limit = _read_bytes(folder / name)
                if limit is not None and limit < _NO_LIMIT:
                    headroom.append(max(0, limit - (usage or 0)))
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(headroom) if headroom else None


def _read_bytes(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _memory_name(device: torch.device) -> str:
    return str(device) if device.type == "cuda" else f"cpu ({effective_memory_limit()[1]})"


class OutOfMemory(ValueError):
    """The work would not fit in memory, or did not: the message names the largest size that fits."""


ALLOCATION_ERRORS = ("out of memory", "can't allocate", "cannot allocate", "defaultcpuallocator")


def is_allocation_failure(error: BaseException) -> bool:
    """Whether `error` is an allocator's failure (MemoryError, torch's CPU or CUDA out-of-memory error)."""
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and any(s in str(error).lower() for s in ALLOCATION_ERRORS)
    )


def allocation_failure_reason(error: BaseException) -> str:
    """The allocator's own words, short: "can't allocate memory: you tried to allocate 2147483648 bytes"."""
    text = (str(error).splitlines() or [type(error).__name__])[0]
    text = text.split("DefaultCPUAllocator: ", 1)[-1].split(". Error code", 1)[0]
    return text[:200]


@contextlib.contextmanager
def out_of_memory_as_error(device: torch.device, per_item: int, fixed: int, n: int, what: str, knob: str = "--n"):
    """Turn an allocation failure inside the block into one `OutOfMemory` naming a `knob` that should fit.

    The estimate (`fixed` + `per_item` bytes per unit of `knob`) let `n` through and proved too low,
    so the suggestion is the smaller of what the estimate allows in the memory free now (after the
    failed work let go of its tensors) and half of `n`.
    """
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not is_allocation_failure(e):
            raise
        reason = allocation_failure_reason(e)
        del e
        free = available_memory(device)
        fits = min((free - fixed) // per_item, n // 2)
        fix = (
            f"lower {knob} to at most {fits}"
            if fits >= 1
            else f"even {knob} 1 does not fit: free memory or raise the limit ({free / 2**30:.1f} GiB free)"
        )
        raise OutOfMemory(
            f"ran out of memory during {what} at {knob} {n} ({reason}); nothing was written; {fix}"
        ) from None


def check_fits(
    device: torch.device, per_item: int, fixed: int, n: int, what: str, knob: str = "--n", small_enough: str = ""
) -> None:
    """Refuse, before the work, an `n` whose estimate (`fixed` + `per_item` bytes each) exceeds the free
    memory, naming the largest `knob` that fits (or, when not even one does, `small_enough` settings)."""
    need, free = fixed + n * per_item, available_memory(device)
    if need > free:
        fits = (free - fixed) // per_item
        fix = (
            f"lower {knob} to at most {fits}"
            if fits >= 1
            else f"not even {knob} 1 fits: "
            + (f"try {small_enough}, " if small_enough else "")
            + "free memory or raise the limit"
        )
        raise OutOfMemory(
            f"{knob} {n} would need about {need / 2**30:.1f} GiB for {what} but {free / 2**30:.1f} GiB "
            f"are free on {_memory_name(device)}; {fix}"
        )
