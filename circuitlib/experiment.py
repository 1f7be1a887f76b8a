"""One extraction end to end: load a model and a task, extract, prune, measure, save, re-evaluate.

This is what the command line (`python -m circuitlib`) and the notebooks call. A saved run is a
folder that a pruned model can be evaluated from on its own (no TransformerLens, no full model):

    circuit.json             settings, every decision, kept heads and MLPs, metrics of full and pruned
    model.safetensors/.json  the pruned model (circuitlib.model.Transformer.save)
    tokenizer files          the tokenizer the prompts were made with
    reference.safetensors    the full model's final residual stream at the last position for the
                             validation and test prompts ([n, d_model] each); with the pruned model's
                             own (shared) final norm and unembedding this gives the full model's
                             logits exactly, so the KL needs no full model
"""

from __future__ import annotations

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
from .tasks import TaskData, get_task

SPLITS = ("validation", "test")


def tokens_digest(tokens: torch.Tensor) -> str:
    """A short fingerprint of a token tensor, to check that regenerated prompts are the same."""
    return hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest()[:16]


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
        out_dir = Path(out_dir)
        check_out_dir(out_dir, force)
        from safetensors.torch import save_file

        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
        tmp.chmod(0o755)  # mkdtemp makes it private; the run folder is an ordinary folder
        try:
            self.pruned.save(tmp)
            self.tokenizer.save_pretrained(tmp)
            save_file({s: r.contiguous() for s, r in self.full_resid.items()}, tmp / "reference.safetensors")
            (tmp / "circuit.json").write_text(json.dumps(self.to_dict(), indent=2))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out_dir


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse a non-empty output folder unless `force` (checked before any work is done)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} is not empty; choose a new --out folder, or pass --force to replace it")


def run_extraction(model_name: str, task_name: str, *, alpha: float, ablation: str = "mean",
                   include_mlps: bool = False, seed: int = 0, n: int | None = None,
                   order: str = "heads-ascending", method: str = "fast", progress: bool = True,
                   loaded=None) -> Extraction:
    """Load `model_name`, make `task_name`'s prompts (n per split, seeded), extract and prune.

    `loaded`: an already loaded (model, tokenizer) pair, to skip loading in notebooks and tests.
    """
    from .loading import load_model

    alpha = check_alpha(alpha)
    task = get_task(task_name)
    model, tokenizer = loaded if loaded is not None else load_model(model_name)
    n = n or task.default_n
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
                "include_mlps": include_mlps, "seed": seed, "n": n, "order": order, "method": method}
    return Extraction(settings, circuit, model, pruned, tokenizer, task, data, means, full_resid, metrics)


@torch.inference_mode()
def evaluate_saved(run_dir: str | os.PathLike, split: str = "validation") -> dict:
    """Evaluate a saved run's pruned model on its own: accuracy, KL to the full model, size."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'validation' or 'test'")
    run_dir = Path(run_dir)
    if not (run_dir / "circuit.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no circuit.json: not a run folder written by "
                                "`python -m circuitlib extract`")
    record = json.loads((run_dir / "circuit.json").read_text())
    pruned = Transformer.load(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    settings = record["settings"]
    task = get_task(settings["task"])
    data = task.generate(tokenizer, n=settings["n"], seed=settings["seed"])
    s = getattr(data, split)
    if tokens_digest(s.tokens) != record["tokens_digest"][split]:
        raise ValueError(f"the {split} prompts regenerated for {run_dir} differ from those of the extraction "
                         "(another circuitlib version or tokenizer?); re-run the extraction")
    logits = pruned(s.tokens, last_only=True)
    full_logits = pruned.unembed(load_file(str(run_dir / "reference.safetensors"))[split])
    return {"model": settings["model"], "task": settings["task"], "split": split, "n": len(s.tokens),
            "accuracy": accuracy(task, s, logits), "kl": kl_divergence(full_logits, logits),
            "n_params": pruned.count_parameters(), "kept_heads": pruned.kept_heads(),
            "kept_mlps": pruned.kept_mlps()}
