"""Long computations as data: checkpoints that resume exactly, and results computed once.

Edge Pruning's trainings and the distillation baseline's students run for hours; on a machine
whose sessions end, or a cluster job with a time limit, they must survive being killed. Both use:

- `load_checkpoint` / `save_checkpoint`: a training's whole state (weights, optimiser, random
  generators, curve so far) saved atomically every few steps under the settings that made it; a
  training that finds its checkpoint continues from it, and refuses, with one error naming the
  differences, a checkpoint made with other settings.
- `result_lock`: while a process computes a result file it holds <name>.lock, so a second
  process asking for the same result gets `ResultInProgress` instead of computing it twice.
- `computed_once`: the one settings-checked cache. A result file is returned when it was made with
  the settings asked for, refused (one error naming every difference) when it was made with others,
  and otherwise computed under the lock and written atomically. Derived study records, distilled
  students and Edge Pruning results all go through it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from filelock import FileLock, Timeout

from circuitlib.core.io import atomic_write


def tokens_digest(tokens: torch.Tensor) -> str:
    """A short fingerprint of a token tensor: the first 16 hex digits of the SHA-256 of its int64 ids.

    The one fingerprint of prompts in circuitlib: study units are keyed by it (so it must not change:
    every committed unit's key depends on it), saved runs and checkpoints record their prompts by it.
    """
    return hashlib.sha256(tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def parameters_digest(module: torch.nn.Module) -> str:
    """A short fingerprint of a module's parameters: their names, shapes and first 1,000 values each
    (enough to tell two initialisations apart, cheap for a model of any size)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(p.detach().flatten()[:1000].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


def load_checkpoint(path: str | os.PathLike | None, settings: dict) -> dict | None:
    """The state saved at `path` by a training with these `settings`; None if there is no checkpoint.

    A checkpoint of other settings raises one ValueError that names every difference.
    """
    if path is None or not Path(path).exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    differ = [
        f"{k} {saved['settings'].get(k)!r} (checkpoint) vs {v!r} (this training)"
        for k, v in settings.items()
        if saved["settings"].get(k) != v
    ]
    if differ:
        raise ValueError(
            f"the checkpoint {path} belongs to another training: {'; '.join(differ)}; "
            "delete it to start afresh, or train with its settings"
        )
    return saved


def save_checkpoint(path: str | os.PathLike, settings: dict, state: dict) -> None:
    """Write `state` (tensors, numbers, strings, lists and dicts of them) with its `settings`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save({"settings": settings, **state}, tmp))


class ResultInProgress(ValueError):
    """The result asked for is being computed by another process (which holds its lock)."""


@contextlib.contextmanager
def result_lock(path: str | os.PathLike, hint: str):
    """Hold the file lock <path without its suffix>.lock while this process computes the result `path`.

    Another process asking for the same result meanwhile gets `ResultInProgress` (naming the lock,
    then `hint`: what to do instead). The lock file is removed when done (unlinked while held: a
    process that opens the old file after this finds the result there).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path.with_suffix(".lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ResultInProgress(f"another process is computing {path} (it holds {lock.lock_file}); {hint}") from None
    try:
        yield
    finally:
        Path(lock.lock_file).unlink(missing_ok=True)
        lock.release()


Result = TypeVar("Result")


def computed_once(
    path: str | os.PathLike,
    settings: Mapping,
    *,
    compute: Callable[[], Result],
    read: Callable[[Path], Result],
    write: Callable[[Path, Result], None],
    settings_of: Callable[[Result], Mapping],
    busy_hint: str,
    replace: bool = False,
) -> Result:
    """The result stored at `path` if it was made with `settings`; else compute it, write it, return it.

    read(path) loads a stored result and settings_of(result) gives the settings it records; every key
    of `settings` must match, else one ValueError names each difference (a stored result is never
    replaced silently: delete it to recompute). While computing, the process holds `result_lock(path)`
    (a second process gets `ResultInProgress`, with `busy_hint`). replace=True computes anew and writes
    over a stored result of any settings (which stays readable until then). write(path, result) must write
    atomically (`core.io.atomic_write`); a file that appears at `path` during the computation (a copy
    from another machine) is kept and returned, with a warning, and this computation is dropped.
    """
    path = Path(path)

    def stored() -> Result:
        result = read(path)
        recorded = settings_of(result)
        differ = [f"{k}: {recorded.get(k)!r} there, {v!r} asked" for k, v in settings.items() if recorded.get(k) != v]
        if differ:
            raise ValueError(
                f"{path} holds a result of other settings ({'; '.join(differ)}); ask for its settings, "
                "or give another output folder (or delete the file to recompute it)"
            )
        return result

    if path.exists() and not replace:
        return stored()
    with result_lock(path, busy_hint):
        if path.exists() and not replace:  # finished by the process that held the lock a moment ago
            return stored()
        result = compute()
        if path.exists() and not replace:
            warnings.warn(
                f"{path} appeared while this process computed the same settings; the file there is kept "
                "and returned, this computation is dropped",
                stacklevel=2,
            )
            return stored()
        write(path, result)
        return result
