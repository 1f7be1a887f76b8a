"""Results derived from a study's units, computed once into its store and read by every later run.

    head_effects(spec, task, ablation)        {"L.H": KL} of each head ablated alone from the full model,
                                              on one batch (the ROC chapter's proxy reference)
    random_baselines(spec, task, row, k)      the extracted circuit of one store row, rebuilt and checked
                                              against the row, and k random circuits of the same size
    reference_metrics(spec, task, seed, abl)  the task's standard measure (`metrics.standard_metric`) of the
                                              full model, the empty circuit (every head and MLP ablated), the
                                              circuit without heads (every MLP kept) and the best constant
                                              answer, on the held-out test split
    circuit_metrics(spec, rows)               every circuit of one unit rebuilt from its kept heads and MLPs,
                                              checked against its rows and measured the same way
    standard_metrics_table(spec)              both, for every finished unit, one row per circuit with its
                                              normalised faithfulness; `faithfulness_area_table` turns it
                                              into MIB's CPR and CMD per unit
    random_metrics(spec, task, row, k)        the circuit of one store row and the k random circuits of
                                              `random_baselines` (the same draws), measured as `circuit_metrics`
                                              measures, with the normalised faithfulness of each

A chapter that needs such a result calls these functions: the first call computes it (minutes on
the stand-in), every later one reads `<store>/<kind>/<key>.json`, so re-executing the chapter
takes seconds. A record holds its settings, its result, the seconds it took and its provenance;
its key is a hash of everything that determines it (model, task, ablation, the prompts, ...), so
changed settings get a new record, and a record is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch

from circuitlib.pipeline.extraction import prompts_digest
from circuitlib.studies.spec import Spec
from circuitlib.studies.store import Store


def head_effects(
    spec: Spec, task: str, ablation: str, *, seed: int | None = None, device: str | None = None, progress: bool = False
) -> dict[str, float]:
    """KL(f || f without h) for every head h of `spec`'s model, on one task's batch; {"L.H": KL}.

    The batch is the one a unit of `seed` (default: the spec's first) searches with: its patching
    set gives the means, its validation set the KL (`study.single_head_effects`).
    """
    from circuitlib.core.ablation import check_ablation
    from circuitlib.studies.analysis import single_head_effects

    check_ablation(ablation)
    seed = _check_seed(spec, seed)
    the_task, data = _batch(spec, task, seed)
    settings = {
        "model": spec.model,
        "task": the_task.name,
        "ablation": ablation,
        "seed": seed,
        "n": spec.n[task],
        "prompts": prompts_digest(data, ("patching", "validation")),
    }

    def compute(model):
        return single_head_effects(
            model,
            data.patching.tokens.to(model.device),
            data.validation.tokens.to(model.device),
            ablation,
            progress=progress,
        )

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
    from circuitlib.studies.analysis import evaluate_kept

    seed, the_task, data = _row_batch(spec, task, row, n_random)
    ablation, include_mlps = str(row["ablation"]), bool(row["include_mlps"])
    extracted = list(row["kept_heads"]) + [mlp_name(layer) for layer in row["kept_mlps"]]
    settings = {
        "unit": str(row["key"]),
        "alpha": float(row["alpha"]),
        "n_random": n_random,
        "kept": extracted,
        "draws": "study.random_components, seed 1000 * batch + i",
    }

    def compute(model):
        means = mean_activations(model, data.patching.tokens.to(model.device)) if ablation == "mean" else None
        resid = full_reference(model, data)
        circuits = _circuits_to_measure(model.cfg, row, extracted, include_mlps, seed, n_random)
        out = []
        for kind, draw, kept in circuits:
            r = evaluate_kept(model, the_task, data, kept, ablation, means, resid)
            if kind == "extracted" and abs(r["test"]["accuracy"] - float(row["test_accuracy"])) > 1e-12:
                raise RuntimeError(
                    f"the circuit of row {row['key']} (alpha {row['alpha']}) rebuilt here reaches "
                    f"test accuracy {r['test']['accuracy']}, the store says {row['test_accuracy']}"
                )
            out.append(
                {
                    "circuit": kind,
                    "draw": draw,
                    "kept": list(kept),
                    "val_accuracy": r["validation"]["accuracy"],
                    "val_kl": r["validation"]["kl"],
                    "test_accuracy": r["test"]["accuracy"],
                    "test_kl": r["test"]["kl"],
                    "parameter_reduction": r["parameter_reduction"],
                }
            )
        return out

    return _cached(spec, "baselines", settings, compute, device)


def random_metrics(
    spec: Spec, task: str, row, n_random: int, *, split: str = "test", device: str | None = None
) -> list[dict]:
    """The standard measure of store row `row`'s circuit and of `random_baselines`' random circuits of its size.

    The random circuits are the same draws as `random_baselines`' (`study.random_components`, seed
    1000 * batch + i); each is pruned with the unit's batch and ablation and measured on `split`
    with the task's standard measure (`measures.standard_metric`), its accuracy and its KL to the
    full model. The extracted circuit must reproduce the row's accuracy on `split` (else
    RuntimeError). Returns one dict per circuit: circuit ("extracted" / "random"), draw (None /
    i), kept, metric (the mean), accuracy, kl, faithfulness (normalised against the full model
    and the empty circuit of `reference_metrics`, the same batch, ablation and split).
    """
    from circuitlib.core.ablation import mean_activations
    from circuitlib.core.components import mlp_name
    from circuitlib.core.metrics import normalised_faithfulness
    from circuitlib.models.loading import load_tokenizer
    from circuitlib.tasks.measures import standard_metric_name

    seed, the_task, data = _row_batch(spec, task, row, n_random)
    prompts = _split(data, split)
    stored_accuracy = {"test": "test_accuracy", "validation": "val_accuracy"}[split]
    ablation, include_mlps = str(row["ablation"]), bool(row["include_mlps"])
    reference = reference_metrics(spec, task, seed, ablation, split=split, device=device)
    tokenizer = load_tokenizer(spec.model)
    extracted = list(row["kept_heads"]) + [mlp_name(int(layer)) for layer in row["kept_mlps"]]
    settings = {
        "unit": str(row["key"]),
        "alpha": float(row["alpha"]),
        "split": split,
        "metric": standard_metric_name(the_task),
        "n_random": n_random,
        "kept": extracted,
        "draws": "study.random_components, seed 1000 * batch + i",
    }

    def compute(model):
        means = mean_activations(model, data.patching.tokens.to(model.device)) if ablation == "mean" else None
        full_logits = model(prompts.tokens.to(model.device), last_only=True)
        circuits = _circuits_to_measure(model.cfg, row, extracted, include_mlps, seed, n_random)
        out = []
        for kind, draw, kept in circuits:
            m = _measure_kept(model, the_task, tokenizer, prompts, kept, ablation, means, full_logits)
            if kind == "extracted" and abs(m["accuracy"] - float(row[stored_accuracy])) > 1e-12:
                raise RuntimeError(
                    f"the circuit of row {row['key']} (alpha {row['alpha']}) rebuilt here reaches "
                    f"{split} accuracy {m['accuracy']}, the store says {row[stored_accuracy]}"
                )
            out.append(
                {
                    "circuit": kind,
                    "draw": draw,
                    "kept": list(kept),
                    "metric": m["metric"],
                    "accuracy": m["accuracy"],
                    "kl": m["kl"],
                }
            )
        return out

    found = _cached(spec, "random-metrics", settings, compute, device)
    full, empty = reference["full"]["metric"], reference["empty"]["metric"]
    return [{**c, "faithfulness": normalised_faithfulness(c["metric"], full, empty)} for c in found]


def _batch(spec: Spec, task: str, seed: int):
    """The task and the prompts a unit of `spec` with this seed searches and measures with (`task.generate`)."""
    from circuitlib.models.loading import load_tokenizer
    from circuitlib.tasks import get_task

    if task not in spec.tasks:  # a task file's rows name it by its name, the spec by its path
        task = next((t for t in spec.tasks if get_task(t).name == task), task)
    if task not in spec.tasks:
        raise ValueError(f"task {task!r} is not in the spec {spec.name} (its tasks: {', '.join(spec.tasks)})")
    the_task = get_task(task)
    return the_task, the_task.generate(load_tokenizer(spec.model), n=spec.n[task], seed=seed, n_test=spec.n_test[task])


def _row_batch(spec: Spec, task: str, row, n_random: int):
    """(batch seed, task, data) of store row `row`, checked: the row's prompts are the ones the spec makes now."""
    if not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"n_random must be a number of random circuits (0 or more), got {n_random!r}")
    seed = _check_seed(spec, int(row["seed"]))
    the_task, data = _batch(spec, task, seed)
    if prompts_digest(data) != row["prompts_digest"]:
        raise ValueError(
            f"row {row['key']} was made from other prompts than {task!r} seed {seed} of the spec "
            f"{spec.name} generates now: give a row of this spec's own table (runner.study_table)"
        )
    return seed, the_task, data


def _circuits_to_measure(cfg, row, extracted: list[str], include_mlps: bool, seed: int, n_random: int) -> list:
    """(kind, draw, kept) of the row's extracted circuit, then of `n_random` random circuits of its size
    (`analysis.random_components`, seed 1000 * batch + i): the same draws for every baseline."""
    from circuitlib.studies.analysis import random_components

    return [("extracted", None, extracted)] + [
        (
            "random",
            i,
            random_components(
                cfg.n_layers, cfg.n_heads, int(row["heads"]), int(row["mlps"]), include_mlps, seed=1000 * seed + i
            ),
        )
        for i in range(n_random)
    ]


def _check_seed(spec: Spec, seed: int | None) -> int:
    seed = spec.seeds[0] if seed is None else seed
    if seed not in spec.seeds:
        raise ValueError(f"seed {seed!r} is not in the spec {spec.name} (its seeds: {', '.join(map(str, spec.seeds))})")
    return seed


def _cached(spec: Spec, kind: str, settings: dict, compute, device: str | None):
    """The record of `settings` under <store>/<kind>/<key>.json (`core.resumable.computed_once`), or
    compute(model) measured on the spec's model, stored with its provenance and returned."""
    from circuitlib.core.io import atomic_write
    from circuitlib.core.resumable import computed_once
    from circuitlib.models.loading import check_device
    from circuitlib.studies.provenance import provenance
    from circuitlib.studies.runner import cached_model

    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    device = device or spec.device

    def measure() -> dict:
        check_device(device)
        model, _ = cached_model(spec.model, device)
        started = time.perf_counter()
        with torch.inference_mode():
            result = json.loads(json.dumps(compute(model)))  # exactly what a later read returns
        return {
            "settings": settings,
            "result": result,
            "seconds": time.perf_counter() - started,
            **provenance(device, torch.get_num_threads()),
        }

    record = computed_once(
        Store(spec.store).root / kind / f"{key}.json",
        settings,
        compute=measure,
        read=lambda path: json.loads(path.read_text()),
        write=lambda path, rec: atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(rec, indent=1))),
        settings_of=lambda rec: rec["settings"],
        busy_hint=f"another process is measuring this {kind} record; wait for it",
    )
    return record["result"]


def reference_metrics(
    spec: Spec, task: str, seed: int, ablation: str, *, split: str = "test", device: str | None = None
) -> dict:
    """The baselines of one batch and ablation, measured on `split` with the task's standard measure.

    Returns {"metric": its name, "n_layers", "n_heads", "split", and for each of "full" (the
    full model), "empty" (every head and MLP ablated: the zero of normalised faithfulness) and
    "no_heads" (every head ablated, every MLP kept: the smallest circuit of a heads-only search)
    a dict {"metric" (mean over prompts), "metric_per_prompt", "accuracy", "kl" (to the full
    model)}, and "constant": the best constant answer {"token", "answer" (its text), "accuracy",
    "metric" (`metrics.constant_answer_metric`: None for a measure in logits)}}.
    """
    from circuitlib.core.ablation import check_ablation, mean_activations
    from circuitlib.core.components import mlp_name
    from circuitlib.models.loading import load_tokenizer
    from circuitlib.tasks.measures import best_constant_answer, constant_answer_metric, standard_metric_name

    check_ablation(ablation)
    seed = _check_seed(spec, seed)
    the_task, data = _batch(spec, task, seed)
    prompts = _split(data, split)
    tokenizer = load_tokenizer(spec.model)
    settings = {
        "model": spec.model,
        "task": the_task.name,
        "ablation": ablation,
        "seed": seed,
        "split": split,
        "metric": standard_metric_name(the_task),
        "prompts": prompts_digest(data, ("patching", split)),
    }

    def compute(model):
        cfg = model.cfg
        means = mean_activations(model, data.patching.tokens.to(model.device)) if ablation == "mean" else None
        full_logits = model(prompts.tokens.to(model.device), last_only=True)
        out = {"metric": settings["metric"], "split": split, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads}
        for name, kept in (("full", None), ("empty", []), ("no_heads", [mlp_name(l) for l in range(cfg.n_layers)])):
            out[name] = _measure_kept(model, the_task, tokenizer, prompts, kept, ablation, means, full_logits)
        constant = best_constant_answer(prompts)
        out["constant"] = {
            **constant,
            "answer": tokenizer.decode([constant["token"]]),
            "metric": constant_answer_metric(the_task, tokenizer, prompts, constant["token"]),
        }
        return out

    return _cached(spec, "reference-metrics", settings, compute, device)


def circuit_metrics(spec: Spec, rows, *, split: str = "test", device: str | None = None) -> list[dict]:
    """Every circuit of one unit rebuilt from its kept heads and MLPs and measured on `split`.

    rows: the rows of one unit in `runner.study_table(spec)` (one per alpha, the same "key").
    Each circuit is pruned with the unit's batch and ablation (`surgery.prune`) and must
    reproduce its row's accuracy on `split` (else RuntimeError). Returns one dict per row, in
    alpha order: alpha, heads, mlps, metric, metric_per_prompt, accuracy, kl.
    """
    from circuitlib.core.ablation import mean_activations
    from circuitlib.core.components import mlp_name
    from circuitlib.models.loading import load_tokenizer
    from circuitlib.tasks.measures import standard_metric_name

    rows = _unit_rows(rows)
    first = rows[0]
    task, seed, ablation = str(first["task"]), _check_seed(spec, int(first["seed"])), str(first["ablation"])
    the_task, data = _batch(spec, task, seed)
    if prompts_digest(data) != first["prompts_digest"]:
        raise ValueError(
            f"unit {first['key']} was made from other prompts than {task!r} seed {seed} of the spec "
            f"{spec.name} generates now: give rows of this spec's own table (runner.study_table)"
        )
    prompts = _split(data, split)
    stored_accuracy = {"test": "test_accuracy", "validation": "val_accuracy"}[split]
    tokenizer = load_tokenizer(spec.model)
    kept = [list(r["kept_heads"]) + [mlp_name(int(l)) for l in r["kept_mlps"]] for r in rows]
    settings = {
        "unit": str(first["key"]),
        "split": split,
        "metric": standard_metric_name(the_task),
        "alphas": [float(r["alpha"]) for r in rows],
        "kept": kept,
    }

    def compute(model):
        means = mean_activations(model, data.patching.tokens.to(model.device)) if ablation == "mean" else None
        full_logits = model(prompts.tokens.to(model.device), last_only=True)
        measured: dict[tuple, dict] = {}
        out = []
        for r, components in zip(rows, kept):
            if tuple(components) not in measured:
                measured[tuple(components)] = _measure_kept(
                    model, the_task, tokenizer, prompts, components, ablation, means, full_logits
                )
            m = measured[tuple(components)]
            if abs(m["accuracy"] - float(r[stored_accuracy])) > 1e-12:
                raise RuntimeError(
                    f"the circuit of unit {r['key']} at alpha {r['alpha']} rebuilt here reaches "
                    f"{split} accuracy {m['accuracy']}, the store says {r[stored_accuracy]}"
                )
            out.append({"alpha": float(r["alpha"]), "heads": int(r["heads"]), "mlps": int(r["mlps"]), **m})
        return out

    return _cached(spec, "circuit-metrics", settings, compute, device)


def standard_metrics_table(
    spec: Spec, *, split: str = "test", device: str | None = None, progress: bool = False, table=None
):
    """The standard measure of every stored circuit of `spec`, beside its baselines: a DataFrame.

    One row per circuit (unit x alpha): key, task, ablation, include_mlps, seed, alpha, heads,
    mlps, size (the fraction of the search's candidates kept: heads, or heads and MLPs), metric
    (its name), value (the circuit's mean), faithfulness (normalised: empty circuit 0, full model
    1), accuracy, kl, and the baselines full_value, empty_value, no_heads_value, full_accuracy,
    empty_accuracy, constant_answer, constant_accuracy, constant_value (None for measures in
    logits), and value_per_prompt. `table`: the spec's study table, if already read.
    Computes what is not yet in the store (`circuit_metrics`, `reference_metrics`), reads the rest.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from circuitlib.core.metrics import normalised_faithfulness
    from circuitlib.studies.runner import study_table

    table = study_table(spec) if table is None else table
    out = []
    groups = list(table.groupby("key", sort=True)) if len(table) else []
    for key, unit in tqdm(groups, desc="standard metrics", unit="unit", disable=not progress):
        first = unit.iloc[0]
        ref = reference_metrics(
            spec, str(first["task"]), int(first["seed"]), str(first["ablation"]), split=split, device=device
        )
        mlps = bool(first["include_mlps"])
        candidates = ref["n_layers"] * ref["n_heads"] + (ref["n_layers"] if mlps else 0)
        for c in circuit_metrics(spec, unit, split=split, device=device):
            out.append(
                {
                    "key": key,
                    "task": first["task"],
                    "ablation": first["ablation"],
                    "include_mlps": mlps,
                    "seed": int(first["seed"]),
                    "alpha": c["alpha"],
                    "heads": c["heads"],
                    "mlps": c["mlps"],
                    "size": (c["heads"] + (c["mlps"] if mlps else 0)) / candidates,
                    "metric": ref["metric"],
                    "value": c["metric"],
                    "faithfulness": normalised_faithfulness(c["metric"], ref["full"]["metric"], ref["empty"]["metric"]),
                    "accuracy": c["accuracy"],
                    "kl": c["kl"],
                    "full_value": ref["full"]["metric"],
                    "empty_value": ref["empty"]["metric"],
                    "no_heads_value": ref["no_heads"]["metric"],
                    "full_accuracy": ref["full"]["accuracy"],
                    "empty_accuracy": ref["empty"]["accuracy"],
                    "constant_answer": ref["constant"]["answer"],
                    "constant_accuracy": ref["constant"]["accuracy"],
                    "constant_value": ref["constant"]["metric"],
                    "value_per_prompt": c["metric_per_prompt"],
                }
            )
    return pd.DataFrame(out)


def faithfulness_area_table(table):
    """MIB's CPR and CMD of each unit's faithfulness curve (`metrics.faithfulness_areas`), a DataFrame.

    table: `standard_metrics_table`. The curve of a unit is its circuits (size, faithfulness),
    the full model at (1, 1) and the search's smallest circuit at size 0: the empty circuit
    (faithfulness 0) when MLPs were candidates, else the circuit without heads (its measured
    faithfulness). Circuits of the same size at several alphas all enter the curve. A unit whose
    full model and empty circuit measure the same has no faithfulness, and NaN areas.
    """
    import pandas as pd

    from circuitlib.core.metrics import faithfulness_areas, normalised_faithfulness

    out = []
    for key, unit in table.groupby("key", sort=True):
        first = unit.iloc[0]
        floor = (
            0.0
            if first["include_mlps"]
            else normalised_faithfulness(first["no_heads_value"], first["full_value"], first["empty_value"])
        )
        ys = [floor, *unit["faithfulness"], 1.0]
        areas = (
            faithfulness_areas([0.0, *unit["size"], 1.0], ys)
            if not any(math.isnan(y) for y in ys)
            else {"cpr": float("nan"), "cmd": float("nan")}
        )  # full == empty: no faithfulness
        out.append(
            {
                "key": key,
                "task": first["task"],
                "ablation": first["ablation"],
                "include_mlps": bool(first["include_mlps"]),
                "seed": int(first["seed"]),
                "metric": first["metric"],
                "circuits": len(unit),
                **areas,
            }
        )
    return pd.DataFrame(out)


@torch.inference_mode()
def _measure_kept(model, task, tokenizer, prompts, kept, ablation: str, means, full_logits) -> dict:
    """The standard measure, accuracy and KL to the full model of `model` pruned to `kept` (None: the full model)."""
    from circuitlib.core.metrics import accuracy, kl_divergence
    from circuitlib.core.surgery import prune
    from circuitlib.tasks.measures import standard_metric

    pruned = model if kept is None else prune(model, list(kept), ablation, means)
    logits = pruned(prompts.tokens.to(model.device), last_only=True)
    values = standard_metric(task, tokenizer, prompts, logits)
    return {
        "metric": float(values.mean()),
        "metric_per_prompt": values.cpu().tolist(),
        "accuracy": accuracy(task, prompts, logits),
        "kl": kl_divergence(full_logits, logits),
    }


def _split(data, split: str):
    if split not in ("validation", "test"):
        raise ValueError(f"split must be 'validation' or 'test' (the patching split gives the means); got {split!r}")
    return getattr(data, split)


def _unit_rows(rows) -> list:
    """The rows of one unit as a list of row mappings in alpha order; one clear error for anything else."""
    records = rows.sort_values("alpha").to_dict("records") if hasattr(rows, "to_dict") else list(rows)
    keys = {r.get("key") for r in records}
    if not records or len(keys) != 1:
        raise ValueError(
            f"give the rows of exactly one unit (one 'key' of runner.study_table); got keys "
            f"{sorted(map(str, keys))[:3]}"
        )
    return records
