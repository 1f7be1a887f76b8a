"""One extraction end to end: load a model and a task, extract, prune, measure, save, re-evaluate.

This is what the command line (`python -m circuitlib`) and the notebooks call. A saved run is a
folder that a pruned model can be evaluated from on its own (no TransformerLens, no full model):

    circuit.json             settings, every decision, kept heads and MLPs, metrics of full and pruned
    model.safetensors/.json  the pruned model (circuitlib.core.model.Transformer.save)
    tokenizer files          the tokenizer the prompts were made with
    task.jsonl / task.csv    for a task read from a file: a copy of that file (the prompts come from it)
    reference.safetensors    the full model's final residual stream at the last position for the
                             validation and test prompts ([n, d_model] each); with the pruned model's
                             own (shared) final norm and unembedding this gives the full model's
                             logits exactly, so the KL needs no full model
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from circuitlib.core.ablation import Means, check_ablation, mean_activations
from circuitlib.core.io import write_folder
from circuitlib.core.memory import check_fits, out_of_memory_as_error
from circuitlib.core.metrics import accuracy, kl_divergence
from circuitlib.core.model import Transformer
from circuitlib.core.resumable import tokens_digest
from circuitlib.core.surgery import prune
from circuitlib.discovery.greedy import METHODS, ORDERS, Circuit, check_alpha, extract
from circuitlib.tasks import SPLITS, TaskData, TaskSplit, get_task
from circuitlib.tasks.files import FileTask, load_task_file
from circuitlib.version import __version__


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
        out[split] = {
            "accuracy": accuracy(task, s, logits),
            "kl": kl_divergence(model.unembed(full_resid[split]), logits),
        }
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
        return {
            "circuitlib_version": __version__,
            "settings": self.settings,
            "metrics": self.metrics,
            "tokens_digest": {s: tokens_digest(getattr(self.data, s).tokens) for s in SPLITS},
            **self.circuit.to_dict(),
        }

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

    save_file(
        {s: r.contiguous().cpu() for s, r in full_resid.items()},
        Path(folder) / "reference.safetensors",
        metadata={f"tokens_digest.{s}": tokens_digest(getattr(data, s).tokens) for s in SPLITS},
    )


def _reference_digests(path: Path) -> dict:
    """The prompt fingerprints `save_reference` put in a reference file's metadata ({} if none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError):
        return {}
    return {s: meta[f"tokens_digest.{s}"] for s in SPLITS if f"tokens_digest.{s}" in meta}


EXTRACTION_OVERHEAD = 2**29  # bytes the work reserves besides its tensors (allocator arenas, libraries loaded late)


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


def check_memory(model: Transformer, n: int, seq_len: int, method: str, knob: str = "--n") -> None:
    """Refuse, before making the prompts, an n whose extraction would not fit in memory; name the limit."""
    fixed = extraction_memory(model.cfg, 0, seq_len, method)
    check_fits(
        model.device,
        extraction_memory(model.cfg, 1, seq_len, method) - fixed,
        fixed,
        n,
        f"this extraction ({model.cfg.name}, {seq_len} tokens per prompt, {method} path)",
        knob,
    )


def extraction_out_of_memory_as_error(
    model: Transformer, n: int, seq_len: int, method: str, what: str, knob: str = "--n"
):
    """`out_of_memory_as_error` with an extraction's estimate (`extraction_memory`)."""
    fixed = extraction_memory(model.cfg, 0, seq_len, method)
    return out_of_memory_as_error(
        model.device, extraction_memory(model.cfg, 1, seq_len, method) - fixed, fixed, n, what, knob
    )


@dataclass(frozen=True)
class ExtractionConfig:
    """The settings of one extraction; with the device and thread count that ran it, they are what
    `circuit.json` records as "settings" (the model and the task by the names they resolved to).

    model: "gpt2", "smollm2-135m", "tiny-gpt2" or a local model folder; task: a built-in task or a
    .jsonl/.csv task file; alpha: the KL threshold (>= 0); ablation: "mean" or "zero"; n: prompts per
    split (None: the task's default); order and method as in `circuitlib.discovery.greedy.extract`.
    Checked when made, so a config that exists is one that can run.
    """

    model: str
    task: str
    alpha: float
    ablation: str = "mean"
    include_mlps: bool = False
    seed: int = 0
    n: int | None = None
    order: str = "heads-ascending"
    method: str = "fast"

    def __post_init__(self):
        object.__setattr__(self, "model", os.fspath(self.model))
        object.__setattr__(self, "task", os.fspath(self.task))
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        check_ablation(self.ablation)
        if self.n is not None and (not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1):
            raise ValueError(f"n must be a positive number of prompts per split, got {self.n!r}")
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}; choose one of {', '.join(ORDERS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.model.startswith("tracr-") or self.task.startswith("tracr-"):
            raise ValueError(
                "Tracr-compiled programs have inputs of several lengths and outputs at every position, "
                "which this text-task pipeline does not take; use `python -m circuitlib groundtruth PROGRAM` "
                "(or circuitlib.pipeline.groundtruth in code)"
            )


def run_extraction(config: ExtractionConfig, *, progress: bool = True, loaded=None, device: str = "cpu") -> Extraction:
    """Load the model, make the task's prompts (n per split, seeded), extract and prune, as `config` says.

    `loaded`: an already loaded (model, tokenizer) pair, to skip loading in notebooks and tests.
    `device`: where the model runs ("cpu", "cuda", "cuda:N"); a `loaded` model stays where it is.
    Everything that can be checked is checked before the work it guards: the settings when the
    config is made, the task's prompts under the tokenizer before the model is loaded, the memory n
    needs before the prompts are made.
    """
    from circuitlib.models.loading import check_device, load_model, load_tokenizer

    device = check_device(device)
    c = config
    task = get_task(c.task)
    n = task.default_n if c.n is None else c.n
    seq_len = task.check(loaded[1] if loaded is not None else load_tokenizer(c.model), 3 * n)
    model, tokenizer = loaded if loaded is not None else load_model(c.model, device=device)
    check_memory(model, n, seq_len, c.method)
    with extraction_out_of_memory_as_error(model, n, seq_len, c.method, "the extraction"):
        data = task.generate(tokenizer, n=n, seed=c.seed)
        means = mean_activations(model, data.patching.tokens) if c.ablation == "mean" else None
        started = time.perf_counter()
        circuit = extract(
            model,
            data.patching.tokens,
            data.validation.tokens,
            alpha=c.alpha,
            ablation=c.ablation,
            include_mlps=c.include_mlps,
            order=c.order,
            method=c.method,
            progress=progress,
            means=means,
        )
        seconds = time.perf_counter() - started
        pruned = prune(model, circuit.kept, c.ablation, means)
        full_resid = full_reference(model, data)
        full_size, pruned_size = model.count_parameters(), pruned.count_parameters()
        metrics = {
            "full": {**measure(task, data, full_resid, model), "n_params": full_size},
            "pruned": {**measure(task, data, full_resid, pruned), "n_params": pruned_size},
            "parameter_reduction": 1 - pruned_size["parameters"] / full_size["parameters"],
            "extraction_seconds": seconds,
        }
    # the config's fields, with the names the model and the task resolved to, and what ran it
    settings = {
        **asdict(c),
        "model": model.cfg.name,
        "task": task.name,
        "n": n,
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
    }
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
    """Read a run folder written by `Extraction.save` (or by `circuitlib.pipeline.edges.EdgeRun.save`: its record is
    edges.json, its prompts' fingerprints are in reference.safetensors) and regenerate the prompts of `split`.

    Every way a folder can be damaged ends in one ValueError naming the file and what to do.
    """
    from transformers import AutoTokenizer

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'validation' or 'test'")
    run_dir = Path(run_dir)
    redo = "re-run the extraction (python -m circuitlib extract ... --out NEW_FOLDER)"
    if not run_dir.is_dir():
        raise ValueError(
            f"{run_dir} does not exist or is not a folder; give the folder that "
            "`python -m circuitlib extract --out` wrote"
        )
    path = run_dir / "circuit.json"
    edges = not path.is_file() and (run_dir / "edges.json").is_file()  # a folder `edges` wrote
    if edges:
        path, redo = run_dir / "edges.json", "re-run Edge Pruning (python -m circuitlib edges ... --out NEW_FOLDER)"
        if not (run_dir / "reference.safetensors").is_file():
            raise ValueError(
                f"{run_dir} has no reference.safetensors (an `edges` run folder of an older circuitlib, "
                f"or a damaged one); {redo}"
            )
    if not path.is_file():
        raise ValueError(
            f"{run_dir} has no circuit.json: not a run folder written by `python -m circuitlib extract` "
            "(nor edges.json, by `python -m circuitlib edges`)"
        )
    try:
        record = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} cannot be read as JSON ({e}); the run folder is damaged: {redo}") from None
    record = record if isinstance(record, dict) else {}
    if edges:
        record = {**record, "tokens_digest": _reference_digests(run_dir / "reference.safetensors")}
    settings, digest = record.get("settings"), record.get("tokens_digest")
    missing = [
        f"settings.{k}" for k in ("model", "task", "n", "seed") if not (isinstance(settings, dict) and k in settings)
    ]
    missing += [f"tokens_digest.{s}" for s in SPLITS if not (isinstance(digest, dict) and s in digest)]
    if missing:
        raise ValueError(
            f"{path} lacks {', '.join(missing)}; the run folder is damaged or from another program: {redo}"
        )
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
        raise ValueError(
            f"the tokenizer files in {run_dir} are missing or damaged ({str(e).splitlines()[0]}); {redo}"
        ) from None
    if "task_file" in settings:
        task_path = run_dir / settings["task_file"]
        if not task_path.is_file():
            raise ValueError(
                f"{task_path} is missing: this run's prompts came from that task file; copy the task "
                f"file back there, or {redo}"
            )
        task = load_task_file(task_path, name=settings["task"])
    else:
        task = get_task(settings["task"])
    data = task.generate(tokenizer, n=settings["n"], seed=settings["seed"])
    prompts = getattr(data, split)
    if tokens_digest(prompts.tokens) != record["tokens_digest"][split]:
        raise ValueError(
            f"the {split} prompts regenerated for {run_dir} differ from those of the extraction "
            "(another circuitlib version, tokenizer or task file?); re-run the extraction"
        )
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
    return {
        "model": settings["model"],
        "task": settings["task"],
        "split": split,
        "n": len(s.tokens),
        "accuracy": accuracy(run.task, s, logits),
        "kl": kl_divergence(full_logits, logits),
        "n_params": pruned.count_parameters(),
        "kept_heads": pruned.kept_heads(),
        "kept_mlps": pruned.kept_mlps(),
    }
