"""Study specs: a small YAML file that declares a study, checked whole and expanded into units.

A study is many extractions. Its spec names the model, the tasks, the configurations and the
scale; it expands into *units*, one `extract.sweep` each (model x task x ablation x include_mlps
x seed, over every alpha), and each unit is keyed by a hash of everything that determines its
rows, so a finished unit is never computed twice and a changed setting never mixes with old rows.

    # studies/example.yml
    name: example                # default: the file's stem
    model: smollm2-135m          # a name circuitlib.models.loading knows, or a local model folder
    tasks: [ioi, greater-than]
    ablations: [mean, zero]      # default [mean]
    include_mlps: [false, true]  # default [false]
    alphas: {from: 1.0e-5, to: 1, points: 12}     # log-spaced; or a list of numbers
    seeds: 3                     # 3 batches: seeds 0, 1, 2 (or a list of seeds)
    n: 64                        # prompts in the patching and in the validation split (the search)
    n_test: 250                  # held-out test prompts (default n): measuring is cheap, searching is not
    order: heads-ascending       # default
    device: cpu                  # default; "cuda" on a GPU (not part of the unit key)
    store: ../results/example    # default: results/<name> beside the spec file

Any of `alphas`, `n` and `n_test` may instead map task names to values, with an optional
`default`: `n: {ioi: 150, default: 250}`. A task may also be a task file (`.jsonl` or `.csv`,
see `circuitlib.tasks`), its path relative to the spec file.

A unit's key hashes the model name, the task, the configuration, the seed, the exact alphas, n,
n_test, the traversal order and a digest of the generated prompts (so a changed task definition
or tokenizer is a new unit too). The device and the thread count are recorded with the rows but
are not part of the key: a study can be resumed on another machine.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from decimal import Decimal, localcontext
from pathlib import Path

from circuitlib.core.ablation import ABLATIONS
from circuitlib.discovery.greedy import ORDERS, check_alpha

FIELDS = (
    "name",
    "model",
    "tasks",
    "ablations",
    "include_mlps",
    "alphas",
    "seeds",
    "n",
    "n_test",
    "order",
    "device",
    "store",
)
REQUIRED = ("model", "tasks", "alphas", "n")


def log_spaced(start: float, stop: float, points: int) -> list[float]:
    """`points` values from `start` to `stop`, evenly spaced in log10 (as `numpy.logspace`), the same
    bits on every machine.

    An alpha is part of a unit's key, so a grid must not depend on the CPU: numpy's vectorized
    `power` differs in the last bit between CPUs (with and without AVX-512), which turned every
    unit of a study into a new one on another machine. The exponents are spaced as
    `numpy.linspace` spaces them (plain float arithmetic, exact everywhere) and each power of ten is
    computed in 40-digit decimal arithmetic and rounded once to the nearest float; the ends are
    `start` and `stop` themselves.
    """
    if points < 1:
        raise ValueError(f"points must be >= 1; got {points}")
    if not 0 < start <= stop or not math.isfinite(stop):
        raise ValueError(f"a log-spaced grid needs 0 < start <= stop; got start={start!r}, stop={stop!r}")
    if points == 1:
        return [float(start)]
    with localcontext() as ctx:
        ctx.prec = 40
        lo, hi = (float(Decimal(v).log10()) for v in (start, stop))
        step = (hi - lo) / (points - 1)
        inner = [float(Decimal(10) ** Decimal(i * step + lo)) for i in range(1, points - 1)]
    return [float(start), *inner, float(stop)]


class SpecError(ValueError):
    """A spec that cannot run; the message names the file and the field."""


@dataclass(frozen=True)
class Unit:
    """One sweep of a study: every alpha for one model, task, configuration and seed."""

    model: str
    task: str
    ablation: str
    include_mlps: bool
    seed: int
    alphas: tuple[float, ...]
    n: int
    n_test: int
    order: str

    def key(self, prompts_digest: str) -> str:
        """The unit's identity: a hash of its settings and of the prompts they generate."""
        fields = {
            **asdict(self),
            "task": Path(self.task).name if is_task_file(self.task) else self.task,
            "alphas": [repr(a) for a in self.alphas],
            "prompts": prompts_digest,
        }
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        mlps = "heads+MLPs" if self.include_mlps else "heads"
        return f"{self.task} · {self.ablation} · {mlps} · seed {self.seed}"


@dataclass
class Spec:
    """A checked study spec (see the module docstring); `units()` expands it."""

    name: str
    model: str
    tasks: tuple[str, ...]
    ablations: tuple[str, ...]
    include_mlps: tuple[bool, ...]
    alphas: dict[str, tuple[float, ...]]  # task -> alphas
    seeds: tuple[int, ...]
    n: dict[str, int]  # task -> n
    n_test: dict[str, int]  # task -> n_test
    order: str
    device: str
    store: Path
    source: Path | None = None

    def units(self) -> list[Unit]:
        """Every unit, seed by seed (so a partial run covers every task and configuration early), then
        tasks in the spec's order, then configuration."""
        return [
            Unit(self.model, t, a, m, s, self.alphas[t], self.n[t], self.n_test[t], self.order)
            for s in self.seeds
            for t in self.tasks
            for a in self.ablations
            for m in self.include_mlps
        ]


def load_spec(path: str | Path) -> Spec:
    """Read and check a spec file; a `SpecError` names the first bad field and how to fix it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"no study spec at {path}; give the path of a YAML file such as studies/book.yml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path} must hold a mapping of fields ({', '.join(FIELDS)})")
    return parse_spec(raw, default_name=path.stem, base=path.parent, source=path)


def parse_spec(raw: dict, *, default_name: str = "study", base: Path = Path("."), source: Path | None = None) -> Spec:
    """Check the fields of a spec given as a dict (what `load_spec` reads from YAML)."""
    where = str(source) if source is not None else "the spec"

    def fail(field: str, problem: str):
        raise SpecError(f"{where}: field '{field}' {problem}")

    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        fail(unknown[0], f"is not a spec field; the fields are {', '.join(FIELDS)}")
    for field in REQUIRED:
        if raw.get(field) is None:
            fail(field, "is missing")

    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        fail("name", f"must be a plain folder name, got {name!r}")
    model = raw["model"]
    if not isinstance(model, str) or not model:
        fail("model", f"must be a model name (e.g. smollm2-135m) or a model folder, got {model!r}")
    tasks = [str((base / t).resolve()) if is_task_file(t) else t for t in _string_list(raw["tasks"], "tasks", fail)]
    from circuitlib.tasks import get_task

    for t in tasks:
        try:
            get_task(t)
        except (ValueError, KeyError, FileNotFoundError) as e:
            fail("tasks", f"names a task that does not exist: {e}")
    ablations = _string_list(raw.get("ablations", ["mean"]), "ablations", fail)
    for a in ablations:
        if a not in ABLATIONS:
            fail("ablations", f"has {a!r}; choose from {', '.join(ABLATIONS)}")
    mlps = raw.get("include_mlps", [False])
    mlps = mlps if isinstance(mlps, list) else [mlps]
    if not mlps or any(not isinstance(m, bool) for m in mlps) or len(set(mlps)) != len(mlps):
        fail("include_mlps", f"must be true, false or a list of distinct booleans, got {raw.get('include_mlps')!r}")
    seeds = raw.get("seeds", 1)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            fail("seeds", f"as a count must be >= 1, got {seeds}")
        seeds = list(range(seeds))
    if (
        not isinstance(seeds, list)
        or not seeds
        or len(set(seeds)) != len(seeds)
        or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds)
    ):
        fail("seeds", f"must be a count or a list of distinct integers >= 0, got {raw.get('seeds')!r}")
    alphas = _per_task(raw["alphas"], tasks, "alphas", lambda v: _alphas(v, fail), fail)
    n = _per_task(raw["n"], tasks, "n", lambda v: _positive_int(v, "n", fail), fail)
    n_test = (
        _per_task(raw["n_test"], tasks, "n_test", lambda v: _positive_int(v, "n_test", fail), fail)
        if raw.get("n_test") is not None
        else dict(n)
    )
    order = raw.get("order", "heads-ascending")
    if order not in ORDERS:
        fail("order", f"is {order!r}; choose {' or '.join(ORDERS)}")
    device = raw.get("device", "cpu")
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda"):
        fail("device", f"must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    store = raw.get("store", f"results/{name}")
    if not isinstance(store, str) or not store:
        fail("store", f"must be a folder path, got {store!r}")
    return Spec(
        name,
        model,
        tuple(tasks),
        tuple(ablations),
        tuple(mlps),
        alphas,
        tuple(seeds),
        n,
        n_test,
        order,
        device,
        (base / store).resolve(),
        source,
    )


def is_task_file(task: str) -> bool:
    """Whether a task entry is a task file (JSONL or CSV, resolved beside the spec) rather than a name."""
    return task.endswith((".jsonl", ".csv"))


def _string_list(value, field, fail) -> list[str]:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value or any(not isinstance(v, str) for v in value):
        fail(field, f"must be a name or a non-empty list of names, got {value!r}")
    if len(set(value)) != len(value):
        fail(field, f"repeats an entry: {value}")
    return value


def _positive_int(value, field, fail) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        fail(field, f"must be a positive whole number of prompts, got {value!r}")
    return value


def _alphas(value, fail) -> tuple[float, ...]:
    """A list of alphas, or {from, to, points}: `points` log-spaced values from `from` to `to`."""
    if isinstance(value, dict):
        if set(value) != {"from", "to", "points"}:
            fail("alphas", f"as a range needs exactly the keys from, to, points; got {sorted(value)}")
        lo, hi, points = value["from"], value["to"], value["points"]
        if (
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi))
            or not 0 < lo <= hi
            or not math.isfinite(hi)
        ):
            fail("alphas", f"range needs 0 < from <= to (log-spaced), got from={lo!r} to={hi!r}")
        if not isinstance(points, int) or isinstance(points, bool) or points < 1:
            fail("alphas", f"range needs points >= 1, got {points!r}")
        value = log_spaced(lo, hi, points)
    if not isinstance(value, list) or not value:
        fail("alphas", f"must be a list of numbers or a range {{from, to, points}}, got {value!r}")
    out = []
    for a in value:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            fail("alphas", f"has {a!r}; every alpha must be a finite number >= 0")
        try:
            out.append(check_alpha(a) + 0.0)  # + 0.0 turns -0.0 into 0.0
        except ValueError as e:
            fail("alphas", str(e))
    if len(set(out)) != len(out):
        fail("alphas", "repeats a value")
    return tuple(sorted(out))


def _per_task(value, tasks, field, parse, fail) -> dict:
    """`value` for every task, or a mapping task -> value with an optional `default`."""
    if isinstance(value, dict) and not (field == "alphas" and set(value) <= {"from", "to", "points"}):
        unknown = sorted(set(value) - set(tasks) - {"default"})
        if unknown:
            fail(field, f"maps {unknown[0]!r}, which is not among the tasks ({', '.join(tasks)}) nor 'default'")
        missing = [t for t in tasks if t not in value and "default" not in value]
        if missing:
            fail(field, f"gives no value for {missing[0]!r}; add it or a 'default'")
        return {t: parse(value.get(t, value.get("default"))) for t in tasks}
    parsed = parse(value)
    return {t: parsed for t in tasks}
