"""A study's results store: one Parquet file per finished unit, written atomically.

    <store>/units/<key>.parquet     the rows of one finished unit (one row per circuit)
    <store>/failed/<key>.json       the error of a unit's last failed attempt (retried next run)
    <store>/running/<key>.json      the unit's claim while in flight, and its progress: one run
                                    computes a unit, others skip it (see `claim`)
    <store>/partial/<key>.json      the sweep of an unfinished unit after its last complete layer:
                                    a unit cut off (by a session's end, say) resumes from it
    <store>/quarantine/<key>.<time>-<id>.parquet  a unit file that could not be read (truncated, empty,
    <store>/quarantine/<key>.<time>-<id>.json     foreign bytes), moved aside by `study run`, with the reason;
                                    its unit is pending again and is computed anew
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
import math
import os
import tempfile
import time
import uuid
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

    def quarantined(self) -> set[str]:
        """Keys of the units whose files were moved to quarantine/ as unreadable (see `quarantine`)."""
        return {p.name.split(".")[0] for p in (self.root / "quarantine").glob("*.parquet")}

    def unreadable(self, keys) -> dict[str, str]:
        """The finished units among `keys` whose files cannot be read, each with the reason."""
        damaged = {}
        for key in sorted(set(keys) & self.done()):
            try:
                _read_unit(self.unit_path(key))
            except UnreadableUnit as e:
                damaged[key] = str(e)
        return damaged

    def quarantine(self, key: str, reason: str) -> Path:
        """Move unit `key`'s unreadable file to quarantine/ beside a JSON file with the reason; the unit
        is pending again. Returns the file's new path."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
        folder = self.root / "quarantine"
        target = folder / f"{key}.{stamp}.parquet"
        record = {"unit": key, "reason": reason, "from": str(self.unit_path(key)), "at": stamp}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(target.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
            os.replace(self.unit_path(key), target)
        except OSError as e:
            raise ValueError(
                f"unit file {self.unit_path(key)} cannot be read ({reason}) nor moved aside "
                f"({e.strerror or e}); delete it by hand to recompute the unit"
            ) from None
        return target

    def failures(self) -> dict[str, dict]:
        return {p.stem: _read_json(p) for p in (self.root / "failed").glob("*.json")}

    def running(self) -> dict[str, dict]:
        return {p.stem: _marker(_read_json(p)) for p in (self.root / "running").glob("*.json")}

    def check_writable(self) -> None:
        """Create the store's folders, or one clear error if they cannot be written (before any work)."""
        try:
            for sub in ("units", "failed", "running"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.root / "units", prefix=".probe-", delete=True)
            probe.close()
        except OSError as e:
            raise ValueError(
                f"cannot write the results store {self.root}: {e.strerror or e}; "
                "give the spec a writable 'store' folder"
            ) from None

    def write_unit(self, key: str, rows: list[dict]) -> Path:
        """Write a finished unit's rows atomically; an existing unit is never replaced."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.unit_path(key)
        if path.exists():
            raise FileExistsError(
                f"unit {key} is already in {self.root}; a finished unit is never overwritten "
                "(delete its file by hand to recompute it)"
            )
        table = pa.Table.from_pylist(rows)
        atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
        (self.root / "failed" / f"{key}.json").unlink(missing_ok=True)
        self.clear_partial(key)
        self.clear_running(key)
        return path

    def write_failure(self, key: str, record: dict) -> None:
        atomic_write(
            self.root / "failed" / f"{key}.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1))
        )
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
                other = _marker(_read_json(path))
                if other and owned_elsewhere(other):
                    return other
                os.replace(tmp, path)
                return None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def write_running(self, key: str, record: dict) -> None:
        atomic_write(
            self.root / "running" / f"{key}.json",
            lambda tmp: Path(tmp).write_text(json.dumps({**record, "updated": time.time()})),
        )

    def clear_running(self, key: str) -> None:
        (self.root / "running" / f"{key}.json").unlink(missing_ok=True)

    def read_partial(self, key: str) -> dict | None:
        """The saved progress of an unfinished unit ({"snapshot", "seconds"}), or None (none, or damaged)."""
        return _partial_or_none(_read_json(self.root / "partial" / f"{key}.json"))

    def write_partial(self, key: str, record: dict) -> None:
        (self.root / "partial").mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / "partial" / f"{key}.json", lambda tmp: Path(tmp).write_text(json.dumps(record)))

    def clear_partial(self, key: str) -> None:
        (self.root / "partial" / f"{key}.json").unlink(missing_ok=True)

    def read(self, keys=None, *, damaged: dict | None = None):
        """The rows of the finished units (all, or those in `keys`) as one pandas DataFrame.

        A unit file that cannot be read raises a ValueError naming it, unless `damaged` is a dict:
        then the unit is left out and `damaged[key]` says why.
        """
        import pandas as pd

        keys = sorted(self.done() if keys is None else set(keys) & self.done())
        tables = []
        for k in keys:
            try:
                tables.append(_read_unit(self.unit_path(k)).to_pandas())
            except UnreadableUnit as e:
                if damaged is None:
                    raise ValueError(
                        f"{e}; `python -m circuitlib study run SPEC` moves it to quarantine/ and "
                        "computes the unit again"
                    ) from None
                damaged[k] = str(e)
        return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


class UnreadableUnit(ValueError):
    """A unit's Parquet file exists but cannot be read."""


def _read_unit(path: Path):
    """A unit file as a pyarrow Table, or `UnreadableUnit` saying why not."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        size = path.stat().st_size if path.exists() else 0
        raise UnreadableUnit(f"unit file {path} cannot be read ({size} bytes; {str(e).splitlines()[0]})") from None


def _read_json(path: Path) -> dict:
    """A JSON object from `path`; {} if the file is missing, damaged or holds anything but an object."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


_MARKER_TYPES = {
    "updated": (int, float),
    "pid": int,
    "done": int,
    "total": int,
    "states": int,
    "host": str,
    "run": str,
    "unit": str,
}


def _marker(record: dict) -> dict:
    """A running/ marker without the fields of the wrong type (a damaged one): no "updated" time, say,
    makes a claim of another host count as long dead."""
    return {
        k: v
        for k, v in record.items()
        if k not in _MARKER_TYPES
        or (isinstance(v, _MARKER_TYPES[k]) and not isinstance(v, bool) and (k != "updated" or math.isfinite(v)))
    }


def _partial_or_none(record: dict) -> dict | None:
    """A partial/ record if it has what `study_status` reads (seconds, CPU seconds, the first state's
    decisions), else None; the sweep checks the rest of the snapshot when it resumes from it."""
    try:
        float(record["seconds"])
        if record.get("cpu_seconds") is not None:
            float(record["cpu_seconds"])
        len(record["snapshot"]["states"][0]["decisions"])
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return record
