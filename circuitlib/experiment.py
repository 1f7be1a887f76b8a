"""One extraction end to end: load a model and a task, extract, prune, measure, save, re-evaluate.

This is what the command line (`python -m circuitlib`) and the notebooks call. A saved run is a
folder that a pruned model can be evaluated from on its own (no TransformerLens, no full model):

    circuit.json             settings, every decision, kept heads and MLPs, metrics of full and pruned
    model.safetensors/.json  the pruned model (circuitlib.model.Transformer.save)
    tokenizer files          the tokenizer the prompts were made with
    task.jsonl / task.csv    for a task read from a file: a copy of that file (the prompts come from it)
    reference.safetensors    the full model's final residual stream at the last position for the
                             validation and test prompts ([n, d_model] each); with the pruned model's
                             own (shared) final norm and unembedding this gives the full model's
                             logits exactly, so the KL needs no full model
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .ablation import Means, mean_activations
from .extract import Circuit, check_alpha, extract
from .metrics import accuracy, kl_divergence
from .model import Transformer
from .surgery import prune
from .filetask import FileTask, load_task_file
from .tasks import TaskData, TaskSplit, get_task

SPLITS = ("validation", "test")


def tokens_digest(tokens: torch.Tensor) -> str:
    """A short fingerprint of a token tensor, to check that regenerated prompts are the same."""
    return hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest()[:16]


def prompts_digest(data: TaskData, splits=("patching", "validation", "test")) -> str:
    """The fingerprints of some splits of a task's data, joined: "<patching>-<validation>-<test>" by default."""
    return "-".join(tokens_digest(getattr(data, s).tokens) for s in splits)


@torch.inference_mode()
def full_reference(model: Transformer, data: TaskData) -> dict:
    """The full model's final residual stream at the last position, per split ([n, d_model] each)."""
    return {s: model.residual(getattr(data, s).tokens.to(model.device), last_only=True) for s in SPLITS}


@torch.inference_mode()
def measure(task, data: TaskData, full_resid: dict, model: Transformer) -> dict:
    """Accuracy and KL to the full model of `model` on the validation and test splits."""
    out = {}
    for split in SPLITS:
        s = getattr(data, split)
        logits = model(s.tokens.to(model.device), last_only=True)
        out[split] = {"accuracy": accuracy(task, s, logits),
                      "kl": kl_divergence(model.unembed(full_resid[split]), logits)}
    return out


@dataclass
class Extraction:
    """Everything one extraction made. `metrics` holds full and pruned accuracy, KL and sizes."""

    settings: dict
    circuit: Circuit
    full: Transformer
    pruned: Transformer
    tokenizer: object
    task: object
    data: TaskData
    means: Means | None
    full_resid: dict
    metrics: dict

    def to_dict(self) -> dict:
        return {"circuitlib_version": __version__, "settings": self.settings, "metrics": self.metrics,
                "tokens_digest": {s: tokens_digest(getattr(self.data, s).tokens) for s in SPLITS},
                **self.circuit.to_dict()}

    def save(self, out_dir: str | os.PathLike, force: bool = False) -> Path:
        """Write the run folder atomically (a temporary sibling renamed at the end)."""
        def fill(tmp: Path) -> None:
            self.pruned.save(tmp)
            self.tokenizer.save_pretrained(tmp)
            save_reference(tmp, self.full_resid, self.data)
            if "task_file" in self.settings:
                shutil.copyfile(self.task.path, tmp / self.settings["task_file"])
            (tmp / "circuit.json").write_text(json.dumps(self.to_dict(), indent=2))

        return write_folder(out_dir, force, fill)


def save_reference(folder: Path, full_resid: dict, data: TaskData) -> None:
    """Write `reference.safetensors`: the full model's final residual streams (`full_reference`), with
    the fingerprints of the prompts they were made on in its metadata ("tokens_digest.<split>")."""
    from safetensors.torch import save_file

    save_file({s: r.contiguous().cpu() for s, r in full_resid.items()}, Path(folder) / "reference.safetensors",
              metadata={f"tokens_digest.{s}": tokens_digest(getattr(data, s).tokens) for s in SPLITS})


def _reference_digests(path: Path) -> dict:
    """The prompt fingerprints `save_reference` put in a reference file's metadata ({} if none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError):
        return {}
    return {s: meta[f"tokens_digest.{s}"] for s in SPLITS if f"tokens_digest.{s}" in meta}


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
        raise ValueError(f"cannot write the run folder {out_dir}: {parent} is not writable ({e.strerror}); "
                         "choose another --out") from None


EXTRACTION_OVERHEAD = 2**29   # bytes the work reserves besides its tensors (allocator arenas, libraries loaded late)


def extraction_memory(cfg, n: int, seq_len: int, method: str = "fast") -> int:
    """Bytes an extraction on n prompts per split of `seq_len` tokens needs besides the model (an estimate).

    Per validation prompt the fast path holds the full model's residual stream before every layer
    ([L, S, D]), one layer's per-head outputs ([H, S, D]) and one forward pass of activations
    (MLP hidden [S, M] x 3, attention scores [H, S, S] x 2, a few [S, D]); per prompt of a split,
    last-position logits and float64 log-probabilities ([V] x ~6 float64). The plain path also forms
    logits at every position ([S, V] x 3). float32 = 4 bytes. Plus EXTRACTION_OVERHEAD, whatever n.
    """
    L, S, D, H, M, V = cfg.n_layers, seq_len, cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.d_vocab
    per_prompt = 4 * (L * S * D + (H + 5) * S * D + 3 * S * M + 2 * H * S * S) + 48 * V
    if method == "plain":
        per_prompt += 12 * S * V
    return EXTRACTION_OVERHEAD + n * per_prompt


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


_NO_LIMIT = 2**60     # cgroup v1 writes "no limit" as a huge number (9223372036854771712)


def cgroup_headroom(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under the memory limits of this process's cgroups (v2 and v1), or None if none applies."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    headroom = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":                                   # v2 (alone, or the unified half of a hybrid)
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            limit_files, usage_file = ("memory.max", "memory.high"), "memory.current"
        elif "memory" in controllers.split(","):               # v1
            base, limit_files, usage_file = root / "memory", ("memory.limit_in_bytes",), "memory.usage_in_bytes"
        else:
            continue
        folder = base / path.lstrip("/")
        while True:                                             # the cgroup and every one above it
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
    return int(text) if text.isdigit() else None                # "max": no limit


def _memory_name(device: torch.device) -> str:
    return str(device) if device.type == "cuda" else f"cpu ({effective_memory_limit()[1]})"


class OutOfMemory(ValueError):
    """The work would not fit in memory, or did not: the message names the largest size that fits."""


ALLOCATION_ERRORS = ("out of memory", "can't allocate", "cannot allocate", "defaultcpuallocator")


def is_allocation_failure(error: BaseException) -> bool:
    """Whether `error` is an allocator's failure (MemoryError, torch's CPU or CUDA out-of-memory error)."""
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError)
                                              and any(s in str(error).lower() for s in ALLOCATION_ERRORS))


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
        fix = (f"lower {knob} to at most {fits}" if fits >= 1 else
               f"even {knob} 1 does not fit: free memory or raise the limit ({free / 2**30:.1f} GiB free)")
        raise OutOfMemory(f"ran out of memory during {what} at {knob} {n} ({reason}); nothing was written; "
                          f"{fix}") from None


def check_fits(device: torch.device, per_item: int, fixed: int, n: int, what: str, knob: str = "--n",
               small_enough: str = "") -> None:
    """Refuse, before the work, an `n` whose estimate (`fixed` + `per_item` bytes each) exceeds the free
    memory, naming the largest `knob` that fits (or, when not even one does, `small_enough` settings)."""
    need, free = fixed + n * per_item, available_memory(device)
    if need > free:
        fits = (free - fixed) // per_item
        fix = (f"lower {knob} to at most {fits}" if fits >= 1 else
               f"not even {knob} 1 fits: " + (f"try {small_enough}, " if small_enough else "")
               + "free memory or raise the limit")
        raise OutOfMemory(f"{knob} {n} would need about {need / 2**30:.1f} GiB for {what} but {free / 2**30:.1f} GiB "
                          f"are free on {_memory_name(device)}; {fix}")


def check_memory(model: Transformer, n: int, seq_len: int, method: str, knob: str = "--n") -> None:
    """Refuse, before making the prompts, an n whose extraction would not fit in memory; name the limit."""
    fixed = extraction_memory(model.cfg, 0, seq_len, method)
    check_fits(model.device, extraction_memory(model.cfg, 1, seq_len, method) - fixed, fixed, n,
               f"this extraction ({model.cfg.name}, {seq_len} tokens per prompt, {method} path)", knob)


def extraction_out_of_memory_as_error(model: Transformer, n: int, seq_len: int, method: str, what: str,
                                      knob: str = "--n"):
    """`out_of_memory_as_error` with an extraction's estimate (`extraction_memory`)."""
    fixed = extraction_memory(model.cfg, 0, seq_len, method)
    return out_of_memory_as_error(model.device, extraction_memory(model.cfg, 1, seq_len, method) - fixed, fixed,
                                  n, what, knob)


def run_extraction(model_name: str, task_name: str, *, alpha: float, ablation: str = "mean",
                   include_mlps: bool = False, seed: int = 0, n: int | None = None,
                   order: str = "heads-ascending", method: str = "fast", progress: bool = True,
                   loaded=None, device: str = "cpu") -> Extraction:
    """Load `model_name`, make `task_name`'s prompts (n per split, seeded), extract and prune.

    `task_name`: a built-in task or a .jsonl/.csv task file (`circuitlib.filetask`).
    `loaded`: an already loaded (model, tokenizer) pair, to skip loading in notebooks and tests.
    `device`: where the model runs ("cpu", "cuda", "cuda:N"); a `loaded` model stays where it is.
    Everything that can be checked is checked before the work it guards: the settings and the
    task's prompts under the tokenizer before the model is loaded, the memory n needs before
    the prompts are made.
    """
    from .loading import check_device, load_model, load_tokenizer

    alpha = check_alpha(alpha)
    device = check_device(device)
    task = get_task(task_name)
    n = task.default_n if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive number of prompts per split, got {n!r}")
    seq_len = task.check(loaded[1] if loaded is not None else load_tokenizer(model_name), 3 * n)
    model, tokenizer = loaded if loaded is not None else load_model(model_name, device=device)
    check_memory(model, n, seq_len, method)
    with extraction_out_of_memory_as_error(model, n, seq_len, method, "the extraction"):
        data = task.generate(tokenizer, n=n, seed=seed)
        means = mean_activations(model, data.patching.tokens) if ablation == "mean" else None
        started = time.perf_counter()
        circuit = extract(model, data.patching.tokens, data.validation.tokens, alpha=alpha, ablation=ablation,
                          include_mlps=include_mlps, order=order, method=method, progress=progress, means=means)
        seconds = time.perf_counter() - started
        pruned = prune(model, circuit.kept, ablation, means)
        full_resid = full_reference(model, data)
        full_size, pruned_size = model.count_parameters(), pruned.count_parameters()
        metrics = {
            "full": {**measure(task, data, full_resid, model), "n_params": full_size},
            "pruned": {**measure(task, data, full_resid, pruned), "n_params": pruned_size},
            "parameter_reduction": 1 - pruned_size["parameters"] / full_size["parameters"],
            "extraction_seconds": seconds,
        }
    settings = {"model": model.cfg.name, "task": task.name, "alpha": alpha, "ablation": ablation,
                "include_mlps": include_mlps, "seed": seed, "n": n, "order": order, "method": method,
                "device": str(model.device), "torch_threads": torch.get_num_threads()}
    if isinstance(task, FileTask):
        settings["task_file"] = "task" + task.path.suffix
    return Extraction(settings, circuit, model, pruned, tokenizer, task, data, means, full_resid, metrics)


@dataclass
class SavedRun:
    """A run folder read back: its record (circuit.json), pruned model, tokenizer, task and one split."""

    run_dir: Path
    record: dict
    pruned: Transformer
    tokenizer: object
    task: object
    split: str
    prompts: TaskSplit


def load_run(run_dir: str | os.PathLike, split: str = "validation") -> SavedRun:
    """Read a run folder written by `Extraction.save` (or by `edges_train.EdgeRun.save`: its record is
    edges.json, its prompts' fingerprints are in reference.safetensors) and regenerate the prompts of `split`.

    Every way a folder can be damaged ends in one ValueError naming the file and what to do.
    """
    from transformers import AutoTokenizer

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'validation' or 'test'")
    run_dir = Path(run_dir)
    redo = "re-run the extraction (python -m circuitlib extract ... --out NEW_FOLDER)"
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} does not exist or is not a folder; give the folder that "
                         "`python -m circuitlib extract --out` wrote")
    path = run_dir / "circuit.json"
    edges = not path.is_file() and (run_dir / "edges.json").is_file()      # a folder `edges` wrote
    if edges:
        path, redo = run_dir / "edges.json", "re-run Edge Pruning (python -m circuitlib edges ... --out NEW_FOLDER)"
        if not (run_dir / "reference.safetensors").is_file():
            raise ValueError(f"{run_dir} has no reference.safetensors (an `edges` run folder of an older circuitlib, "
                             f"or a damaged one); {redo}")
    if not path.is_file():
        raise ValueError(f"{run_dir} has no circuit.json: not a run folder written by `python -m circuitlib extract` "
                         "(nor edges.json, by `python -m circuitlib edges`)")
    try:
        record = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} cannot be read as JSON ({e}); the run folder is damaged: {redo}") from None
    record = record if isinstance(record, dict) else {}
    if edges:
        record = {**record, "tokens_digest": _reference_digests(run_dir / "reference.safetensors")}
    settings, digest = record.get("settings"), record.get("tokens_digest")
    missing = [f"settings.{k}" for k in ("model", "task", "n", "seed")
               if not (isinstance(settings, dict) and k in settings)]
    missing += [f"tokens_digest.{s}" for s in SPLITS if not (isinstance(digest, dict) and s in digest)]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; the run folder is damaged or from another program: "
                         f"{redo}")
    try:
        pruned = Transformer.load(run_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{e}; {redo}") from None
    missing = [f for f in ("tokenizer.json", "tokenizer_config.json") if not (run_dir / f).is_file()]
    try:
        if missing:
            raise OSError(f"{', '.join(missing)} missing")
        tokenizer = AutoTokenizer.from_pretrained(run_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a damaged file
        raise ValueError(f"the tokenizer files in {run_dir} are missing or damaged ({str(e).splitlines()[0]}); "
                         f"{redo}") from None
    if "task_file" in settings:
        task_path = run_dir / settings["task_file"]
        if not task_path.is_file():
            raise ValueError(f"{task_path} is missing: this run's prompts came from that task file; copy the task "
                             f"file back there, or {redo}")
        task = load_task_file(task_path, name=settings["task"])
    else:
        task = get_task(settings["task"])
    data = task.generate(tokenizer, n=settings["n"], seed=settings["seed"])
    prompts = getattr(data, split)
    if tokens_digest(prompts.tokens) != record["tokens_digest"][split]:
        raise ValueError(f"the {split} prompts regenerated for {run_dir} differ from those of the extraction "
                         "(another circuitlib version, tokenizer or task file?); re-run the extraction")
    return SavedRun(run_dir, record, pruned, tokenizer, task, split, prompts)


@torch.inference_mode()
def evaluate_saved(run_dir: str | os.PathLike, split: str = "validation") -> dict:
    """Evaluate a saved run's pruned model on its own: accuracy, KL to the full model, size."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run = load_run(run_dir, split)
    reference = run.run_dir / "reference.safetensors"
    try:
        full_resid = load_file(str(reference))[split]
    except (OSError, KeyError, SafetensorError) as e:
        raise ValueError(f"{reference} is missing or damaged ({e}); re-run the extraction") from None
    s, pruned, settings = run.prompts, run.pruned, run.record["settings"]
    logits = pruned(s.tokens, last_only=True)
    full_logits = pruned.unembed(full_resid)
    return {"model": settings["model"], "task": settings["task"], "split": split, "n": len(s.tokens),
            "accuracy": accuracy(run.task, s, logits), "kl": kl_divergence(full_logits, logits),
            "n_params": pruned.count_parameters(), "kept_heads": pruned.kept_heads(),
            "kept_mlps": pruned.kept_mlps()}
