"""Results derived from a study's units, computed once into its store and read by every later run.

    head_effects(spec, task, ablation)        {"L.H": KL} of each head ablated alone from the full model,
                                              on one batch (the ROC chapter's proxy reference)
    random_baselines(spec, task, row, k)      the extracted circuit of one store row, rebuilt and checked
                                              against the row, and k random circuits of the same size

A chapter that needs such a result calls these functions: the first call computes it (minutes on
the stand-in), every later one reads `<store>/<kind>/<key>.json`, so re-executing the chapter
takes seconds. A record holds its settings, its result, the seconds it took and its provenance;
its key is a hash of everything that determines it (model, task, ablation, the prompts, ...), so
changed settings get a new record, and a record is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import time

import torch

from circuitlib.pipeline.extraction import prompts_digest
from circuitlib.studies.spec import Spec
from circuitlib.studies.store import Store


def head_effects(spec: Spec, task: str, ablation: str, *, seed: int | None = None, device: str | None = None,
                 progress: bool = False) -> dict[str, float]:
    """KL(f || f without h) for every head h of `spec`'s model, on one task's batch; {"L.H": KL}.

    The batch is the one a unit of `seed` (default: the spec's first) searches with: its patching
    set gives the means, its validation set the KL (`study.single_head_effects`).
    """
    from circuitlib.core.ablation import check_scheme
    from circuitlib.studies.analysis import single_head_effects

    check_scheme(ablation)
    seed = _check_seed(spec, seed)
    the_task, data = _batch(spec, task, seed)
    settings = {"model": spec.model, "task": the_task.name, "ablation": ablation, "seed": seed, "n": spec.n[task],
                "prompts": prompts_digest(data, ("patching", "validation"))}

    def compute(model):
        return single_head_effects(model, data.patching.tokens.to(model.device),
                                   data.validation.tokens.to(model.device), ablation, progress=progress)

    return _cached(spec, "effects", settings, compute, device)


def random_baselines(spec: Spec, task: str, row, n_random: int, *, device: str | None = None) -> list[dict]:
    """The circuit of store row `row` and `n_random` random circuits of its size, each pruned and measured.

    row: one row of `runner.study_table(spec)` (a unit's circuit at one alpha). The extracted
    circuit is rebuilt from its kept components with the unit's batch and ablation and must
    reproduce the row's test accuracy; random circuit i keeps as many heads (and MLPs, when they
    were candidates; otherwise every MLP) drawn with seed 1000 * batch + i (`study.random_components`).
    Returns one dict per circuit: circuit ("extracted" / "random"), draw (None / i), kept,
    val_accuracy, val_kl, test_accuracy, test_kl, parameter_reduction.
    """
    from circuitlib.core.ablation import mean_activations
    from circuitlib.core.components import mlp_name
    from circuitlib.pipeline.extraction import full_reference
    from circuitlib.studies.analysis import evaluate_kept, random_components

    if not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"n_random must be a number of random circuits (0 or more), got {n_random!r}")
    seed = _check_seed(spec, int(row["seed"]))
    the_task, data = _batch(spec, task, seed)
    if prompts_digest(data) != row["prompts_digest"]:
        raise ValueError(f"row {row['key']} was made from other prompts than {task!r} seed {seed} of the spec "
                         f"{spec.name} generates now: give a row of this spec's own table (runner.study_table)")
    ablation, include_mlps = str(row["ablation"]), bool(row["include_mlps"])
    extracted = list(row["kept_heads"]) + [mlp_name(layer) for layer in row["kept_mlps"]]
    settings = {"unit": str(row["key"]), "alpha": float(row["alpha"]), "n_random": n_random,
                "kept": extracted, "draws": "study.random_components, seed 1000 * batch + i"}

    def compute(model):
        cfg = model.cfg
        means = mean_activations(model, data.patching.tokens.to(model.device)) if ablation == "mean" else None
        resid = full_reference(model, data)
        circuits = [("extracted", None, extracted)] + [
            ("random", i, random_components(cfg.n_layers, cfg.n_heads, int(row["heads"]), int(row["mlps"]),
                                            include_mlps, seed=1000 * seed + i)) for i in range(n_random)]
        out = []
        for kind, draw, kept in circuits:
            r = evaluate_kept(model, the_task, data, kept, ablation, means, resid)
            if kind == "extracted" and abs(r["test"]["accuracy"] - float(row["test_accuracy"])) > 1e-12:
                raise RuntimeError(f"the circuit of row {row['key']} (alpha {row['alpha']}) rebuilt here reaches "
                                   f"test accuracy {r['test']['accuracy']}, the store says {row['test_accuracy']}")
            out.append({"circuit": kind, "draw": draw, "kept": list(kept),
                        "val_accuracy": r["validation"]["accuracy"], "val_kl": r["validation"]["kl"],
                        "test_accuracy": r["test"]["accuracy"], "test_kl": r["test"]["kl"],
                        "parameter_reduction": r["parameter_reduction"]})
        return out

    return _cached(spec, "baselines", settings, compute, device)


def _batch(spec: Spec, task: str, seed: int):
    """The task and the prompts a unit of `spec` with this seed searches and measures with (`task.generate`)."""
    from circuitlib.models.loading import load_tokenizer
    from circuitlib.tasks import get_task

    if task not in spec.tasks:
        raise ValueError(f"task {task!r} is not in the spec {spec.name} (its tasks: {', '.join(spec.tasks)})")
    the_task = get_task(task)
    return the_task, the_task.generate(load_tokenizer(spec.model), n=spec.n[task], seed=seed, n_test=spec.n_test[task])


def _check_seed(spec: Spec, seed: int | None) -> int:
    seed = spec.seeds[0] if seed is None else seed
    if seed not in spec.seeds:
        raise ValueError(f"seed {seed!r} is not in the spec {spec.name} (its seeds: "
                         f"{', '.join(map(str, spec.seeds))})")
    return seed


def _cached(spec: Spec, kind: str, settings: dict, compute, device: str | None):
    """The stored result of `settings` under <store>/<kind>/, or compute(model), store it and return it."""
    from circuitlib.models.loading import check_device
    from circuitlib.studies.provenance import provenance
    from circuitlib.studies.runner import cached_model

    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    store = Store(spec.store)
    found = store.read_record(kind, key)
    if found and found.get("settings") == settings:
        return found["result"]
    device = device or spec.device
    check_device(device)
    model, _ = cached_model(spec.model, device)
    started = time.perf_counter()
    with torch.inference_mode():
        result = json.loads(json.dumps(compute(model)))        # exactly what a later read returns
    store.write_record(kind, key, {"settings": settings, "result": result, "seconds": time.perf_counter() - started,
                                   **provenance(device, torch.get_num_threads())})
    return result
