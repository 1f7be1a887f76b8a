"""Atomic writes (a file or a folder appears complete under its name, or not at all), and the cache folder.

Everything circuitlib saves goes through these: the content is written under a temporary name in
the same folder and renamed into place, so a killed process leaves no half-written result. An
output folder is checked before any work (`check_out_dir`): it must be writable, and a non-empty
one is replaced only when the caller says so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write(path: Path, write) -> Path:
    """Call `write(tmp_path)` then rename tmp_path to `path` (same folder, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a saved model is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_folder(out_dir: str | os.PathLike, force: bool, fill) -> Path:
    """Make the folder `out_dir` atomically: `fill(tmp)` writes into a temporary sibling that is then
    renamed into place (replacing a non-empty `out_dir` only with `force`, see `check_out_dir`)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; a run folder is an ordinary folder
    try:
        fill(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse, before any work is done, an output folder that cannot be written or is not empty.

    The run folder is written next to itself and renamed into place, so the nearest existing
    folder above it must be a folder we can create files in (tried, and nothing left behind).
    A non-empty `out_dir` is refused unless `force`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} is not empty; choose a new --out folder, or pass --force to replace it")
    parent = out_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot create {out_dir}: {parent} is a file, not a folder; choose another --out")
    try:
        tempfile.TemporaryDirectory(dir=parent, prefix=".circuitlib-write-test-").cleanup()
    except OSError as e:
        raise ValueError(
            f"cannot write the run folder {out_dir}: {parent} is not writable ({e.strerror}); choose another --out"
        ) from None


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """circuitlib's cache folder: ``cache_dir``, else ``$CIRCUITLIB_CACHE``, else
    ``$XDG_CACHE_HOME/circuitlib``, else ``~/.cache/circuitlib``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("CIRCUITLIB_CACHE"):
        return Path(os.environ["CIRCUITLIB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "circuitlib"


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
