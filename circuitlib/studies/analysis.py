"""Studies built on many extractions: alpha sweeps evaluated as pruned models, ROC points, baselines.

`circuitlib.discovery.greedy.sweep` returns one `Circuit` per alpha in one walk; the functions here turn
circuits into the numbers the paper plots and tabulates, by physically pruning each circuit
(`circuitlib.core.surgery.prune`, with the patching-set means of `circuitlib.core.ablation`) and measuring
the pruned model (`circuitlib.pipeline.extraction.measure`: accuracy and KL to the full model on the
validation and the held-out test split, and its size).

    paper_alphas(task)                     the paper's grid: 30 log-spaced alphas
    evaluate_kept / evaluate_circuits      prune and measure one component list / many circuits
    alpha_study                            sweep x {ablation} x {include_mlps} x seeds -> a table
    tpr_fpr_by_alpha                       mean TPR/FPR per alpha over repeated batches (ROC points)
    single_head_effects, top_heads         KL increase of ablating each head alone in the full model
    random_kept, random_components         a random circuit of the same size (a baseline)
    time_pair                              honest inference times of a full and a pruned model
    choose_alpha                           the largest alpha within a tolerance of the full accuracy
    spread_over_batches                    per alpha: mean, sd, min, max of sizes and scores across batches
    kept_overlap, jaccard                  how alike the circuits of different batches are (kept heads)
    interval_over_batches, intervals       intervals that name what they resample: batches or prompts
    compare_orders                         the same units run with two head orders, side by side
    prompt_flips                           prompts a circuit gets right that the full model gets wrong (and
                                           back), and which removed component, put back alone, undoes each gain
    attention_targets, attention_mass      where heads look from the last position: the first token, the
                                           current token, and the task's named positions (names, years, letters)
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from circuitlib.core.ablation import Means, check_ablation, mean_activations
from circuitlib.core.components import head_name, mlp_name, parse_component
from circuitlib.core.metrics import time_forward, tpr_fpr
from circuitlib.core.model import Transformer
from circuitlib.core.surgery import prune, prune_layer
from circuitlib.discovery.greedy import Circuit, FastPath, sweep
from circuitlib.pipeline.extraction import full_reference, measure
from circuitlib.studies.spec import log_spaced
from circuitlib.tasks import TaskData, TaskSplit, ioi_subject_tokens, letter_tokens

__all__ = [
    "bootstrap_interval",
    "with_intervals",
    "spread_over_batches",
    "jaccard",
    "kept_overlap",
    "interval_over_batches",
    "intervals",
    "compare_orders",
    "prompt_flips",
    "attention_targets",
    "attention_mass",
    "paper_alphas",
    "evaluate_kept",
    "evaluate_circuits",
    "alpha_study",
    "tpr_fpr_by_alpha",
    "single_head_effects",
    "top_heads",
    "random_kept",
    "random_components",
    "time_pair",
    "choose_alpha",
    "full_reference",
    "config_label",
]


def paper_alphas(task_name: str, n_points: int = 30) -> list[float]:
    """The paper's alpha grid: `n_points` log-spaced values from 1e-5 to 1 (acronyms, IOI) or to 10
    (greater-than)."""
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1; got {n_points}")
    top = 10.0 if task_name == "greater-than" else 1.0
    return log_spaced(1e-5, top, n_points)


def evaluate_kept(
    model: Transformer,
    task,
    data: TaskData,
    kept: Iterable[str],
    ablation: str,
    means: Means | None = None,
    full_resid: dict | None = None,
) -> dict:
    """Prune `model` to the components `kept` and measure it.

    Returns {"kept_heads", "kept_mlps", "validation": {"accuracy", "kl"}, "test": {...},
    "n_params" (count_parameters of the pruned model), "parameter_reduction"} where the reduction
    is 1 - pruned / full parameters (embeddings and ablation biases not counted, as in the paper).
    """
    ablation = check_ablation(ablation)
    if ablation == "mean" and means is None:
        means = mean_activations(model, data.patching.tokens)
    full_resid = full_resid if full_resid is not None else full_reference(model, data)
    pruned = prune(model, list(kept), ablation, means if ablation == "mean" else None)
    size = pruned.count_parameters()
    return {
        "kept_heads": pruned.kept_heads(),
        "kept_mlps": pruned.kept_mlps(),
        **measure(task, data, full_resid, pruned),
        "n_params": size,
        "parameter_reduction": 1 - size["parameters"] / model.count_parameters()["parameters"],
    }


def evaluate_circuits(
    model: Transformer,
    task,
    data: TaskData,
    circuits: Sequence[Circuit],
    means: Means | None = None,
    full_resid: dict | None = None,
    progress: bool = False,
) -> list[dict]:
    """`evaluate_kept` for each circuit (circuits that keep the same components are pruned once).

    Returns one flat row per circuit: alpha, ablation, include_mlps, heads, mlps, circuit_kl (the
    extraction's own final KL on the validation set), val_accuracy, val_kl, test_accuracy, test_kl,
    parameters, ablation_bias, parameter_reduction.
    """
    if not circuits:
        return []
    schemes = {c.ablation for c in circuits}
    if "mean" in schemes and means is None:
        means = mean_activations(model, data.patching.tokens)
    full_resid = full_resid if full_resid is not None else full_reference(model, data)
    cache: dict[tuple, dict] = {}
    rows = []
    for c in tqdm(circuits, desc="prune and evaluate", disable=not progress):
        key = (c.ablation, tuple(c.kept))
        if key not in cache:
            cache[key] = evaluate_kept(model, task, data, c.kept, c.ablation, means, full_resid)
        r = cache[key]
        rows.append(
            {
                "alpha": c.alpha,
                "ablation": c.ablation,
                "include_mlps": c.include_mlps,
                "heads": len(r["kept_heads"]),
                "mlps": len(r["kept_mlps"]),
                "circuit_kl": c.final_kl,
                "val_accuracy": r["validation"]["accuracy"],
                "val_kl": r["validation"]["kl"],
                "test_accuracy": r["test"]["accuracy"],
                "test_kl": r["test"]["kl"],
                "parameters": r["n_params"]["parameters"],
                "ablation_bias": r["n_params"]["ablation_bias"],
                "parameter_reduction": r["parameter_reduction"],
            }
        )
    return rows


def alpha_study(
    model: Transformer,
    tokenizer,
    task,
    alphas: Sequence[float],
    *,
    n: int,
    seeds: Sequence[int] = (0,),
    ablations: Sequence[str] = ("mean", "zero"),
    include_mlps: Sequence[bool] = (False, True),
    order: str = "heads-ascending",
    progress: bool = True,
    keep_circuits: bool = False,
):
    """The paper's hyperparameter study (RQ1) at a chosen scale.

    For each seed (one batch of n prompts per split, `task.generate(tokenizer, n, seed)`) and each
    configuration (ablation x include_mlps), one `sweep` over all `alphas`, then every circuit is
    pruned and measured (with `progress`, one line is printed per sweep). Returns a pandas DataFrame
    with one row per (seed, ablation, include_mlps, alpha) and the columns of `evaluate_circuits`
    plus "seed" and "full_val_accuracy" / "full_test_accuracy"; with `keep_circuits`, also a dict
    {(seed, ablation, include_mlps): list of Circuit}.
    """
    import pandas as pd

    configs = [(a, m) for a in ablations for m in include_mlps]
    rows, kept = [], {}
    for seed in seeds:
        data = task.generate(tokenizer, n=n, seed=seed)
        full_resid = full_reference(model, data)
        full = measure(task, data, full_resid, model)
        means = mean_activations(model, data.patching.tokens) if "mean" in ablations else None
        for ablation, mlps in configs:
            started = time.perf_counter()
            circuits = sweep(
                model,
                data.patching.tokens,
                data.validation.tokens,
                list(alphas),
                ablation=ablation,
                include_mlps=mlps,
                order=order,
                progress=False,
                means=means,
            )
            for row in evaluate_circuits(model, task, data, circuits, means, full_resid):
                rows.append(
                    {
                        "seed": seed,
                        **row,
                        "full_val_accuracy": full["validation"]["accuracy"],
                        "full_test_accuracy": full["test"]["accuracy"],
                    }
                )
            if keep_circuits:
                kept[(seed, ablation, mlps)] = circuits
            if progress:
                print(
                    f"seed {seed}, {config_label(ablation, mlps)}: {len(alphas)} alphas swept, pruned and measured "
                    f"in {time.perf_counter() - started:.0f} s",
                    flush=True,
                )
    table = pd.DataFrame(rows)
    return (table, kept) if keep_circuits else table


def bootstrap_interval(
    groups: Sequence[Sequence[float]], *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean over groups of each group's mean, with a percentile bootstrap interval.

    groups: one sequence of per-prompt values per batch (e.g. a row's `test_correct` for each
            seed), resampled with replacement within each batch, `n_boot` times (seeded).
    With one group this is the usual interval over prompts; with several, the interval of the
    mean over batches that the prompts' sampling alone allows.
    """
    arrays = [np.asarray(g, dtype=float) for g in groups]
    if not arrays or any(a.ndim != 1 or len(a) == 0 for a in arrays):
        raise ValueError("give one non-empty sequence of per-prompt values per batch")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    boot = np.mean([a[rng.integers(0, len(a), size=(n_boot, len(a)))].mean(1) for a in arrays], axis=0)
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(np.mean([a.mean() for a in arrays])), float(low), float(high)


def with_intervals(table, values: str, by: Sequence[str], **kw):
    """Per group of `by`, the mean of the per-prompt lists in column `values` over the rows (batches)
    with its bootstrap interval (`bootstrap_interval`): a DataFrame with `by`, mean, low, high, batches."""
    import pandas as pd

    rows = []
    for key, g in table.groupby(list(by), sort=True):
        mean, low, high = bootstrap_interval(list(g[values]), **kw)
        rows.append(
            {
                **dict(zip(by, key if isinstance(key, tuple) else (key,))),
                "mean": mean,
                "low": low,
                "high": high,
                "batches": len(g),
            }
        )
    return pd.DataFrame(rows)


def tpr_fpr_by_alpha(
    circuits_per_batch: Sequence[Sequence[Circuit]], reference: Iterable[str], n_heads_total: int | None = None
) -> tuple[list[float], list[float]]:
    """Mean (TPR, FPR) per alpha over repeated batches, heads only (the paper's ROC points).

    circuits_per_batch: one list of circuits per batch, the same alphas in the same order
    reference:          the reference heads ("L.H"), e.g. a manually identified circuit
    Returns (tprs, fprs), one value per alpha.
    """
    reference = list(reference)
    batches = [list(b) for b in circuits_per_batch]
    if not batches or any(len(b) != len(batches[0]) for b in batches):
        raise ValueError("give one list of circuits per batch, all for the same alphas")
    first = batches[0][0]
    total = n_heads_total or first.n_layers * first.n_heads
    tprs, fprs = [], []
    for i in range(len(batches[0])):
        alphas = {b[i].alpha for b in batches}
        if len(alphas) != 1:
            raise ValueError(f"batches disagree on the alpha at position {i}: {sorted(alphas)}")
        points = [tpr_fpr(b[i].kept_heads, reference, total) for b in batches]
        tprs.append(float(np.mean([p[0] for p in points])))
        fprs.append(float(np.mean([p[1] for p in points])))
    return tprs, fprs


@torch.inference_mode()
def single_head_effects(
    model: Transformer, patching: torch.Tensor, validation: torch.Tensor, ablation: str = "mean", progress: bool = True
) -> dict[str, float]:
    """KL(f || f without head h) for every head h ablated alone in the full model f.

    The same exact computation as the first step of Algorithm 1 for each head (only the layers
    from the head's upward are re-run). Returns {"L.H": KL}.
    """
    ablation = check_ablation(ablation)
    means = mean_activations(model, patching) if ablation == "mean" else None
    fast = FastPath(model, validation, ablation, means)
    cfg = model.cfg
    effects = {}
    bar = tqdm(total=cfg.n_layers * cfg.n_heads, desc="single-head ablations", disable=not progress)
    for layer in range(cfg.n_layers - 1, -1, -1):
        fast.enter(layer)
        above = list(model.layers[layer + 1 :])
        for h in range(cfg.n_heads):
            effects[head_name(layer, h)] = fast.kl(layer, [head_name(layer, h)], above)
            bar.update(1)
    bar.close()
    return effects


def top_heads(effects: dict[str, float], k: int) -> list[str]:
    """The k heads with the largest effect (ties broken by name order)."""
    if not 0 < k <= len(effects):
        raise ValueError(f"k must be in 1..{len(effects)}; got {k}")
    return [h for h, _ in sorted(effects.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def random_kept(circuit: Circuit, seed: int) -> list[str]:
    """A random circuit of the same size as `circuit`: as many heads (and MLPs) drawn uniformly.

    MLPs outside the search (include_mlps=False) are kept, as in the extracted circuit.
    """
    return random_components(
        circuit.n_layers, circuit.n_heads, len(circuit.kept_heads), len(circuit.kept_mlps), circuit.include_mlps, seed
    )


def random_components(n_layers: int, n_heads: int, heads: int, mlps: int, include_mlps: bool, seed: int) -> list[str]:
    """`heads` heads drawn uniformly (seeded), and `mlps` MLPs if they were candidates, else all MLPs."""
    rng = random.Random(seed)
    kept = rng.sample([head_name(l, h) for l in range(n_layers) for h in range(n_heads)], heads)
    all_mlps = [mlp_name(l) for l in range(n_layers)]
    return kept + (rng.sample(all_mlps, mlps) if include_mlps else all_mlps)


def time_pair(
    full: Transformer,
    pruned: Transformer,
    tokens: torch.Tensor,
    *,
    warmup: int = 3,
    repeats: int = 20,
    rounds: int = 4,
    device=None,
) -> dict:
    """Median forward time of both models on the same `tokens` (last position only, as used).

    Both are timed with `metrics.time_forward` (warm-up, inference mode, synchronised on CUDA),
    in `rounds` alternating rounds (full, pruned, full, ...) so that a change of machine load
    hits both; `warmup` untimed calls before each model's first round, one before the others.
    Returns {"full_s", "pruned_s" (medians of `repeats` calls each), "time_ratio" (pruned /
    full), "flop_ratio"}.
    """
    per_round = max(1, repeats // rounds)
    times = {"full": [], "pruned": []}
    for r in range(rounds):
        for name, model in (("full", full), ("pruned", pruned)):
            t = time_forward(
                lambda m=model: m(tokens, last_only=True),
                warmup=warmup if r == 0 else 1,
                repeats=per_round,
                device=device,
            )
            times[name] += t["times_s"]
    full_s, pruned_s = float(np.median(times["full"])), float(np.median(times["pruned"]))
    S = tokens.shape[1]
    return {
        "full_s": full_s,
        "pruned_s": pruned_s,
        "time_ratio": pruned_s / full_s,
        "flop_ratio": pruned.flops(S) / full.flops(S),
    }


def choose_alpha(table, tolerance: float = 0.05) -> dict[tuple, float | None]:
    """The chapters' selection rule, per (task, ablation, include_mlps) of a study table.

    The largest alpha whose circuits keep the validation accuracy (mean over the batches) within
    `tolerance` of the full model's (mean over the same batches); None where no alpha does.
    """
    chosen = {}
    for (task, ablation, mlps), g in table.groupby(["task", "ablation", "include_mlps"], sort=True):
        full_val = g["full_val_accuracy"].mean()
        acc = g.groupby("alpha")["val_accuracy"].mean()
        ok = acc[acc >= full_val - tolerance]
        chosen[(task, ablation, bool(mlps))] = float(ok.index.max()) if len(ok) else None
    return chosen


# ------------------------------------------------------------------------------------------
# uncertainty over batches: what varies from one batch of prompts (seed) to the next

STUDY_GROUP = ("task", "ablation", "include_mlps", "alpha")


def spread_over_batches(table, columns: Sequence[str], by: Sequence[str] = STUDY_GROUP):
    """Per group of `by` (one row per batch in each), the spread of each column across the batches.

    Returns a DataFrame with `by`, "batches" and, for each column c, c_mean, c_sd (sample
    standard deviation, NaN for one batch), c_min and c_max. A group holding two rows of one
    seed (two units of the same batch: another order, say) is refused: split the table first.
    """
    import pandas as pd

    _one_row_per_batch(table, by)
    rows = []
    for key, g in table.groupby(list(by), sort=True):
        row = {**dict(zip(by, key if isinstance(key, tuple) else (key,))), "batches": len(g)}
        for c in columns:
            values = g[c].astype(float)
            row |= {
                f"{c}_mean": values.mean(),
                f"{c}_sd": values.std(ddof=1) if len(g) > 1 else float("nan"),
                f"{c}_min": values.min(),
                f"{c}_max": values.max(),
            }
        rows.append(row)
    return pd.DataFrame(rows)


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    """|a ∩ b| / |a ∪ b| of two sets of components; 1.0 when both are empty (the same circuit)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def kept_overlap(table, by: Sequence[str] = STUDY_GROUP, components: str = "heads"):
    """Per group of `by`, how alike the circuits of different batches are: Jaccard of what they keep.

    components: "heads" (kept_heads) or "all" (kept heads and MLPs). Returns a DataFrame with
    `by`, batches, pairs, jaccard_mean (the mean over every pair of batches), jaccard_min; with
    one batch there is no pair (NaN).
    """
    import pandas as pd

    if components not in ("heads", "all"):
        raise ValueError(f"components must be 'heads' or 'all'; got {components!r}")
    _one_row_per_batch(table, by)
    rows = []
    for key, g in table.groupby(list(by), sort=True):
        kept = [_kept(r, components) for _, r in g.iterrows()]
        pairs = [jaccard(a, b) for i, a in enumerate(kept) for b in kept[i + 1 :]]
        rows.append(
            {
                **dict(zip(by, key if isinstance(key, tuple) else (key,))),
                "batches": len(g),
                "pairs": len(pairs),
                "jaccard_mean": float(np.mean(pairs)) if pairs else float("nan"),
                "jaccard_min": float(min(pairs)) if pairs else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def interval_over_batches(values: Sequence[float], level: float = 0.95) -> dict:
    """The mean of one value per batch with a Student-t interval: what another batch of prompts could give.

    Returns {"mean", "low", "high", "batches", "resamples": "batches"}; the interval is NaN with
    one batch. With few batches (3) it is wide, as it should be: it is the uncertainty of a mean
    over that many independently drawn batches.
    """
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("give one value per batch")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    mean = float(x.mean())
    if len(x) == 1:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "batches": 1, "resamples": "batches"}
    half = float(stats.t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "batches": len(x), "resamples": "batches"}


def intervals(table, column: str, by: Sequence[str] = STUDY_GROUP, *, over: str, level: float = 0.95, **kw):
    """Per group of `by`, the mean of `column` with an interval, and a "resamples" column saying over what.

    over="batches": `column` holds one value per row (batch); `interval_over_batches`.
    over="prompts": `column` holds each row's per-prompt values (e.g. "test_correct");
                    `bootstrap_interval`, which resamples prompts within each batch and holds the
                    batches fixed (`kw`: its n_boot and seed).
    """
    import pandas as pd

    if over not in ("batches", "prompts"):
        raise ValueError(f"over must be 'batches' or 'prompts'; got {over!r}")
    _one_row_per_batch(table, by)
    rows = []
    for key, g in table.groupby(list(by), sort=True):
        if over == "batches":
            found = interval_over_batches(list(g[column]), level)
        else:
            mean, low, high = bootstrap_interval(list(g[column]), level=level, **kw)
            found = {"mean": mean, "low": low, "high": high, "batches": len(g), "resamples": "prompts within batches"}
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), **found})
    return pd.DataFrame(rows)


def compare_orders(first, second, columns: Sequence[str] = ("heads", "test_accuracy"), by: Sequence[str] = STUDY_GROUP):
    """The same units searched in two head orders, side by side per group of `by`.

    first, second: study tables (`runner.study_table`) of one order each (column "order"), for
    the same batches. Rows are paired by batch (seed) within each group, so that a difference is
    the order's alone. Returns a DataFrame with `by`, batches (paired), for each column c
    c_<first order> and c_<second order> (means over the paired batches), and jaccard_mean: the
    mean over batches of the Jaccard overlap of the heads the two orders keep.
    """
    import pandas as pd

    names = []
    for t in (first, second):
        orders = set(t["order"]) if len(t) else set()
        if len(orders) != 1:
            raise ValueError(f"each table must hold the units of one order; got orders {sorted(orders)}")
        names.append(orders.pop())
    if names[0] == names[1]:
        raise ValueError(f"both tables hold units of the order {names[0]!r}; give one table per order")
    keys = [*by, "seed"]
    for t in (first, second):
        _one_row_per_batch(t, by)
    paired = first.merge(second, on=keys, suffixes=("@1", "@2"))
    if not len(paired):
        raise ValueError(
            "the two tables share no (task, configuration, alpha, seed): run the same units in both orders"
        )
    rows = []
    for key, g in paired.groupby(list(by), sort=True):
        row = {**dict(zip(by, key if isinstance(key, tuple) else (key,))), "batches": len(g)}
        for c in columns:
            for name, suffix in zip(names, ("@1", "@2")):
                row[f"{c}_{name}"] = g[f"{c}{suffix}"].astype(float).mean()
        row["jaccard_mean"] = float(np.mean([jaccard(a, b) for a, b in zip(g["kept_heads@1"], g["kept_heads@2"])]))
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------
# why a circuit can beat the full model, and what heads attend to


@torch.inference_mode()
def prompt_flips(
    model: Transformer, task, split: TaskSplit, kept: Iterable[str], ablation: str, means: Means | None = None
) -> dict:
    """Which prompts the circuit `kept` answers differently from the full model, and what undoes each gain.

    Returns {"full_accuracy", "circuit_accuracy", "gained": prompts (indices into `split`) the
    full model gets wrong and the circuit right, "lost": the reverse, "undone_by": {component:
    the gained prompts it makes wrong again}}. "undone_by" puts each removed component (head or
    MLP) back into the circuit alone (circuit + c, pruned for real layer by layer, exactly
    `surgery.prune(model, kept + [c])`) and lists the gained prompts that are then wrong again:
    the components whose removal the gains come from. Components that undo none are left out.
    """
    ablation = check_ablation(ablation)
    kept = list(kept)
    if ablation == "mean" and means is None:
        raise ValueError("mean ablation needs the patching-set means (ablation.mean_activations)")
    tokens = split.tokens.to(model.device)
    full_correct = task.correct(split, model(tokens, last_only=True)).cpu()  # [n]
    pruned = prune(model, kept, ablation, means)
    circuit_correct = task.correct(split, pruned(tokens, last_only=True)).cpu()  # [n]
    gained = torch.nonzero(circuit_correct & ~full_correct).flatten()
    lost = torch.nonzero(full_correct & ~circuit_correct).flatten()
    undone = {}
    if len(gained):
        cfg, sub = model.cfg, _rows(split, gained)
        everything = [head_name(l, h) for l in range(cfg.n_layers) for h in range(cfg.n_heads)] + [
            mlp_name(l) for l in range(cfg.n_layers)
        ]
        kept_set = {parse_component(k) for k in kept}
        for c in [c for c in everything if parse_component(c) not in kept_set]:
            layer = parse_component(c)[0]
            original = pruned.layers[layer]
            pruned.layers[layer] = prune_layer(model, layer, kept + [c], ablation, means)
            try:
                still = task.correct(sub, pruned(sub.tokens.to(model.device), last_only=True)).cpu()
            finally:
                pruned.layers[layer] = original
            if not still.all():
                undone[c] = gained[~still].tolist()
    return {
        "full_accuracy": float(full_correct.double().mean()),
        "circuit_accuracy": float(circuit_correct.double().mean()),
        "gained": gained.tolist(),
        "lost": lost.tolist(),
        "undone_by": dict(sorted(undone.items(), key=lambda kv: (-len(kv[1]), kv[0]))),
    }


def _rows(split: TaskSplit, rows: torch.Tensor) -> TaskSplit:
    """The prompts `rows` (indices) of `split`, as a split of their own."""
    index = rows.tolist()
    return TaskSplit(
        [split.prompts[i] for i in index],
        split.tokens[rows],
        split.answers[rows],
        split.candidates,
        None if split.accepted is None else split.accepted[rows],
    )


def attention_targets(task, tokenizer, split: TaskSplit) -> dict[str, torch.Tensor]:
    """The positions of each prompt that a task's heads may look at: {name: BoolTensor [n, S]}.

    Every task: "first token" (position 0) and "current token" (the last position, which the
    prediction is made from). IOI: "indirect object" and "subject" (both its mentions).
    Greater-than: "start year" (the tokens of its last two digits, before " to"). Acronyms:
    "capital letters" (the words' initials " X" and the acronym's letters so far).
    """
    n, S = split.tokens.shape
    positions = torch.arange(S)
    out = {"first token": (positions == 0).expand(n, S), "current token": (positions == S - 1).expand(n, S)}
    tokens = split.tokens
    if task.name == "ioi":
        out["indirect object"] = tokens == split.answers[:, None]
        out["subject"] = tokens == ioi_subject_tokens(tokenizer, split)[:, None]
    elif task.name == "greater-than":
        to = tokens == tokenizer.encode(" to", add_special_tokens=False)[0]
        if not bool((to.sum(1) == 1).all()):
            raise ValueError("greater-than prompts must hold ' to' once (\"... from the year 1739 to 17\")")
        width = 1 if len(split.candidates) == 100 else 2  # "39" is one token, or the digits "3", "9"
        to_at = to.int().argmax(1)[:, None]  # [n, 1]
        out["start year"] = (positions[None, :] >= to_at - width) & (positions[None, :] < to_at)
    elif task.name == "acronyms":
        out["capital letters"] = torch.isin(tokens, letter_tokens(tokenizer, ("", " ")))
    return out


@torch.inference_mode()
def attention_mass(model: Transformer, tokens: torch.Tensor, heads: Sequence[str], targets: dict[str, torch.Tensor]):
    """For each head, its mean attention from the last position to each group of `targets`, a DataFrame.

    tokens: [n, S]; targets: {name: BoolTensor [n, S]} (e.g. `attention_targets`). One row per
    head: "head" and, per target, the attention weight on those positions summed per prompt
    and averaged over the prompts (groups may overlap; each row of weights sums to 1).
    """
    import pandas as pd

    for name, mask in targets.items():
        if tuple(mask.shape) != tuple(tokens.shape):
            raise ValueError(
                f"target {name!r} must be a [n, S] mask like the tokens {list(tokens.shape)}; got {list(mask.shape)}"
            )
    pattern = model.attention_patterns(tokens.to(model.device), list(heads))[:, :, -1].cpu().double()  # [n, k, S]
    rows = []
    for i, head in enumerate(heads):
        rows.append(
            {
                "head": head,
                **{name: float((pattern[:, i] * mask.double()).sum(-1).mean()) for name, mask in targets.items()},
            }
        )
    return pd.DataFrame(rows)


def _one_row_per_batch(table, by: Sequence[str]) -> None:
    missing = [c for c in [*by, "seed"] if c not in table]
    if missing:
        raise ValueError(f"the table lacks the columns {missing}; give a study table (runner.study_table)")
    repeated = table.duplicated([*by, "seed"])
    if repeated.any():
        r = table[repeated].iloc[0]
        raise ValueError(
            f"the table holds two rows of seed {r['seed']} for {dict((c, r[c]) for c in by)} (units of "
            f"another order or study?); keep one row per batch in each group"
        )


def _kept(row, components: str) -> set[str]:
    heads = set(row["kept_heads"])
    return heads if components == "heads" else heads | {mlp_name(int(l)) for l in row["kept_mlps"]}


def config_label(ablation: str, include_mlps: bool) -> str:
    return f"{ablation} ablation, {'heads and MLPs' if include_mlps else 'heads only'}"
