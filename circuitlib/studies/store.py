"""A study's results store: one Parquet file per finished unit, written atomically.

    <store>/units/<key>.parquet     the rows of one finished unit (one row per circuit)
    <store>/failed/<key>.json       the error of a unit's last failed attempt (retried next run)
    <store>/running/<key>.json      the unit's claim while in flight, and its progress: one run
                                    computes a unit, others skip it (see `claim`)
    <store>/partial/<key>.json      the sweep of an unfinished unit after its last complete layer:
                                    a unit cut off (by a session's end, say) resumes from it
    <store>/effects/<key>.json      results derived from the units, computed once and read by every
    <store>/baselines/<key>.json    later run (`circuitlib.studies.derived`): single-head effects, random circuits,
    <store>/circuit-metrics/...     each circuit's standard measure and its baselines (full model, empty
    <store>/reference-metrics/...   circuit, best constant answer)

Why Parquet files, one per unit (pyarrow), rather than one database file (DuckDB): a unit is
written once and never changed, so a file per unit makes every write atomic (a temporary file
renamed into place) and lets any number of workers on any number of machines write at the same
time without a lock; a rerun only has to list the folder to know what is done; committing new
units to git adds small files instead of rewriting one binary database; and the columns keep
their types, lists included (kept heads, per-prompt correctness). pandas or DuckDB read the
folder as one table.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from circuitlib.core.io import atomic_write


class RunningElsewhere(RuntimeError):
    """Another live run is computing a unit that this run was asked to compute."""


class Store:
    """The results folder of one study."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def unit_path(self, key: str) -> Path:
        return self.root / "units" / f"{key}.parquet"

    def done(self) -> set[str]:
        """Keys of every finished unit in the store (of this spec or of earlier settings)."""
        return {p.stem for p in (self.root / "units").glob("*.parquet")}

    def failures(self) -> dict[str, dict]:
        return {p.stem: _read_json(p) for p in (self.root / "failed").glob("*.json")}

    def running(self) -> dict[str, dict]:
        return {p.stem: _read_json(p) for p in (self.root / "running").glob("*.json")}

    def check_writable(self) -> None:
        """Create the store's folders, or one clear error if they cannot be written (before any work)."""
        try:
            for sub in ("units", "failed", "running"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.root / "units", prefix=".probe-", delete=True)
            probe.close()
        except OSError as e:
            raise ValueError(f"cannot write the results store {self.root}: {e.strerror or e}; "
                             "give the spec a writable 'store' folder") from None

    def write_unit(self, key: str, rows: list[dict]) -> Path:
        """Write a finished unit's rows atomically; an existing unit is never replaced."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.unit_path(key)
        if path.exists():
            raise FileExistsError(f"unit {key} is already in {self.root}; a finished unit is never overwritten "
                                  "(delete its file by hand to recompute it)")
        table = pa.Table.from_pylist(rows)
        atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
        (self.root / "failed" / f"{key}.json").unlink(missing_ok=True)
        self.clear_partial(key)
        self.clear_running(key)
        return path

    def write_failure(self, key: str, record: dict) -> None:
        atomic_write(self.root / "failed" / f"{key}.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
        self.clear_running(key)

    def claim(self, key: str, record: dict, owned_elsewhere) -> dict | None:
        """Mark unit `key` as in flight with `record` (its run's "run" id among its fields), unless
        another run holds it: returns that run's marker if `owned_elsewhere(marker)` says it is live
        and not ours, else None (claimed; a dead run's marker is taken over). The marker appears
        whole or not at all: written aside, then linked into place, which fails if one exists."""
        path = self.root / "running" / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({**record, "updated": time.time()}, f)
            try:
                os.link(tmp, path)
                return None
            except FileExistsError:
                other = _read_json(path)
                if other and owned_elsewhere(other):
                    return other
                os.replace(tmp, path)
                return None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def write_running(self, key: str, record: dict) -> None:
        atomic_write(self.root / "running" / f"{key}.json",
                lambda tmp: Path(tmp).write_text(json.dumps({**record, "updated": time.time()})))

    def clear_running(self, key: str) -> None:
        (self.root / "running" / f"{key}.json").unlink(missing_ok=True)

    def read_partial(self, key: str) -> dict | None:
        """The saved progress of an unfinished unit ({"snapshot", "seconds"}), or None."""
        return _read_json(self.root / "partial" / f"{key}.json") or None

    def write_partial(self, key: str, record: dict) -> None:
        (self.root / "partial").mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / "partial" / f"{key}.json", lambda tmp: Path(tmp).write_text(json.dumps(record)))

    def clear_partial(self, key: str) -> None:
        (self.root / "partial" / f"{key}.json").unlink(missing_ok=True)

    def read_record(self, kind: str, key: str) -> dict | None:
        """A derived result stored under `<store>/<kind>/<key>.json` (see `circuitlib.studies.derived`), or None."""
        return _read_json(self.root / kind / f"{key}.json") or None

    def write_record(self, kind: str, key: str, record: dict) -> None:
        """Write a derived result atomically; an existing one is never replaced."""
        path = self.root / kind / f"{key}.json"
        if path.exists():
            raise FileExistsError(f"{kind}/{key}.json is already in {self.root}; delete it by hand to recompute it")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))

    def read(self, keys=None):
        """The rows of the finished units (all, or those in `keys`) as one pandas DataFrame."""
        import pandas as pd
        import pyarrow.parquet as pq

        keys = sorted(self.done() if keys is None else set(keys) & self.done())
        if not keys:
            return pd.DataFrame()
        return pd.concat([pq.read_table(self.unit_path(k)).to_pandas() for k in keys], ignore_index=True)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
