"""circuitlib.studies.analysis: sweeps evaluated as pruned models, ROC points, single-head effects, baselines."""

import math

import pytest
import torch

from circuitlib.core.ablation import mean_activations
from circuitlib.core.metrics import kl_divergence
from circuitlib.core.surgery import prune
from circuitlib.discovery.greedy import Circuit, Decision, sweep
from circuitlib.models.loading import load_model
from circuitlib.pipeline.extraction import ExtractionConfig, run_extraction
from circuitlib.studies.analysis import (
    alpha_study,
    evaluate_circuits,
    evaluate_kept,
    paper_alphas,
    random_kept,
    single_head_effects,
    time_pair,
    top_heads,
    tpr_fpr_by_alpha,
)
from circuitlib.tasks import TaskData, TaskSplit, get_task


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-gpt2")


def _data(model, patching, validation):
    """TaskData on random tokens whose answers are the full model's own argmax."""

    def split(tokens):
        with torch.inference_mode():
            answers = model(tokens, last_only=True).argmax(-1)
        return TaskSplit([str(i) for i in range(len(tokens))], tokens, answers)

    return TaskData(split(patching), split(validation), split(validation.flip(0)))


def test_paper_alphas():
    ioi, gt = paper_alphas("ioi"), paper_alphas("greater-than")
    assert len(ioi) == len(gt) == 30
    assert ioi[0] == pytest.approx(1e-5) and ioi[-1] == pytest.approx(1.0) and gt[-1] == pytest.approx(10.0)
    assert min(abs(a / 8.53e-3 - 1) for a in ioi) < 0.01  # Table 1's IOI alpha is a grid point
    assert min(abs(a / 8.53e-2 - 1) for a in gt) < 0.01  # and greater-than's
    assert ioi == sorted(ioi)


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_evaluated_circuit_matches_its_own_kl(models, data, arch, ablation):
    model = models[arch]
    d = _data(model, *data)
    circuits = sweep(
        model,
        d.patching.tokens,
        d.validation.tokens,
        [0.0, 0.05, 0.5, 100.0],
        ablation=ablation,
        include_mlps=True,
        progress=False,
    )
    rows = evaluate_circuits(model, get_task("ioi"), d, circuits)
    assert [r["alpha"] for r in rows] == [0.0, 0.05, 0.5, 100.0]
    full = model.count_parameters()["parameters"]
    for c, r in zip(circuits, rows):
        # the physically pruned model reproduces the KL the extraction computed for the circuit
        assert r["val_kl"] == pytest.approx(c.final_kl, abs=1e-4, rel=1e-3)
        assert r["heads"] == len(c.kept_heads) and r["mlps"] == len(c.kept_mlps)
        assert r["parameter_reduction"] == pytest.approx(1 - r["parameters"] / full)
        assert 0 <= r["val_accuracy"] <= 1
    assert rows[-1]["parameter_reduction"] > rows[0]["parameter_reduction"]
    assert [r["parameters"] for r in rows] == sorted((r["parameters"] for r in rows), reverse=True)


def test_evaluate_kept_full_model_is_lossless(models, data):
    model = models["llama"]
    d = _data(model, *data)
    everything = model.kept_heads() + [f"MLP {l}" for l in range(model.cfg.n_layers)]
    r = evaluate_kept(model, get_task("ioi"), d, everything, "mean")
    assert r["validation"]["kl"] == pytest.approx(0.0, abs=1e-6) and r["validation"]["accuracy"] == 1.0
    assert r["parameter_reduction"] == 0.0


def test_alpha_study_matches_separate_extractions(tiny):
    model, tok = tiny
    task = get_task("ioi")
    alphas = [1e-3, 3e-2]
    table, circuits = alpha_study(
        model,
        tok,
        task,
        alphas,
        n=8,
        seeds=(0, 1),
        ablations=("mean", "zero"),
        include_mlps=(False, True),
        progress=False,
        keep_circuits=True,
    )
    assert len(table) == 2 * 4 * len(alphas)
    assert set(circuits) == {(s, a, m) for s in (0, 1) for a in ("mean", "zero") for m in (False, True)}
    for seed, ablation, mlps, alpha in [(0, "mean", False, 3e-2), (1, "zero", True, 1e-3)]:
        config = ExtractionConfig("tiny-gpt2", "ioi", alpha=alpha, ablation=ablation, include_mlps=mlps, n=8, seed=seed)
        e = run_extraction(config, progress=False, loaded=(model, tok))
        row = table[
            (table.seed == seed) & (table.ablation == ablation) & (table.include_mlps == mlps) & (table.alpha == alpha)
        ].iloc[0]
        assert row.heads == len(e.circuit.kept_heads)
        assert row.val_accuracy == pytest.approx(e.metrics["pruned"]["validation"]["accuracy"])
        assert row.test_kl == pytest.approx(e.metrics["pruned"]["test"]["kl"], abs=1e-6)
        assert row.parameter_reduction == pytest.approx(e.metrics["parameter_reduction"])
        assert row.full_val_accuracy == pytest.approx(e.metrics["full"]["validation"]["accuracy"])


def _circuit(alpha, kept_heads, n_layers=2, n_heads=4):
    all_heads = [f"{l}.{h}" for l in range(n_layers) for h in range(n_heads)]
    decisions = [Decision(h, 0.0, 0.0, h not in kept_heads) for h in all_heads]
    return Circuit("m", n_layers, n_heads, alpha, "mean", False, "heads-ascending", decisions)


def test_tpr_fpr_by_alpha_averages_batches():
    ref = ["1.0", "1.1"]
    b1 = [_circuit(0.1, ["1.0", "1.1", "0.0"]), _circuit(1.0, ["1.0"])]
    b2 = [_circuit(0.1, ["1.0", "0.0", "0.1"]), _circuit(1.0, [])]
    tprs, fprs = tpr_fpr_by_alpha([b1, b2], ref)
    assert tprs == pytest.approx([(1.0 + 0.5) / 2, (0.5 + 0.0) / 2])
    assert fprs == pytest.approx([(1 / 6 + 2 / 6) / 2, 0.0])
    with pytest.raises(ValueError, match="same alphas|disagree"):
        tpr_fpr_by_alpha([b1, [b2[1], b2[0]]], ref)


def test_single_head_effects_are_exact(models, data, arch):
    model = models[arch]
    patching, validation = data
    effects = single_head_effects(model, patching, validation, "mean", progress=False)
    assert len(effects) == model.cfg.n_layers * model.cfg.n_heads
    means = mean_activations(model, patching)
    with torch.inference_mode():
        full = model(validation, last_only=True)
        everything = model.kept_heads() + [f"MLP {l}" for l in range(model.cfg.n_layers)]
        for head in ("0.1", f"{model.cfg.n_layers - 1}.2"):
            pruned = prune(model, [c for c in everything if c != head], "mean", means)
            assert effects[head] == pytest.approx(
                kl_divergence(full, pruned(validation, last_only=True)), rel=1e-3, abs=1e-6
            )
    top = top_heads(effects, 3)
    assert len(top) == 3 and effects[top[0]] == max(effects.values())


def test_random_kept_same_size_and_seeded():
    c = _circuit(0.1, ["1.0", "1.1", "0.0"])
    a, b, other = random_kept(c, 0), random_kept(c, 0), random_kept(c, 5)
    assert a == b
    heads = [x for x in a if not x.startswith("MLP")]
    assert len(heads) == 3 and len(set(heads)) == 3 and [x for x in a if x.startswith("MLP")] == ["MLP 0", "MLP 1"]
    assert any(random_kept(c, s) != a for s in range(1, 6)) and other is not None


def test_time_pair(models, data):
    model = models["gpt2"]
    means = mean_activations(model, data[0])
    pruned = prune(model, model.kept_heads()[:2], "mean", means)
    t = time_pair(model, pruned, data[1], warmup=1, repeats=4)
    assert t["full_s"] > 0 and t["pruned_s"] > 0
    assert math.isclose(t["time_ratio"], t["pruned_s"] / t["full_s"])
    assert 0 < t["flop_ratio"] < 1


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_prompts():
    from circuitlib.studies.analysis import bootstrap_interval

    few = [1.0] * 6 + [0.0] * 4
    mean, low, high = bootstrap_interval([few])
    assert mean == pytest.approx(0.6) and low < 0.6 < high and 0.0 <= low and high <= 1.0
    _, low_many, high_many = bootstrap_interval([few * 25])
    assert high_many - low_many < (high - low) / 3
    assert bootstrap_interval([few], seed=3) == bootstrap_interval([few], seed=3)
    assert bootstrap_interval([[1.0] * 5]) == (1.0, 1.0, 1.0)
    two = bootstrap_interval([[1.0] * 10, [0.0] * 10])
    assert two == (0.5, 0.5, 0.5)  # no prompt-level spread inside either batch
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval([[]])


def test_with_intervals_groups_rows():
    import pandas as pd

    from circuitlib.studies.analysis import with_intervals

    table = pd.DataFrame({"alpha": [0.1, 0.1, 1.0], "correct": [[1, 1, 0, 1], [1, 0, 1, 1], [0, 0, 0, 1]]})
    out = with_intervals(table, "correct", ["alpha"])
    assert list(out["alpha"]) == [0.1, 1.0] and list(out["batches"]) == [2, 1]
    assert out["mean"].tolist() == pytest.approx([0.75, 0.25])
    assert (out["low"] <= out["mean"]).all() and (out["mean"] <= out["high"]).all()


def test_choose_alpha_takes_the_largest_alpha_within_the_tolerance():
    import pandas as pd

    from circuitlib.studies.analysis import choose_alpha

    rows = []
    for seed, accs in ((0, [0.95, 0.93, 0.80]), (1, [0.97, 0.89, 0.70])):  # mean 0.96, 0.91, 0.75
        for alpha, acc in zip([0.001, 0.01, 0.1], accs):
            rows.append(
                {
                    "task": "ioi",
                    "ablation": "mean",
                    "include_mlps": False,
                    "seed": seed,
                    "alpha": alpha,
                    "val_accuracy": acc,
                    "full_val_accuracy": 0.96,
                }
            )
            rows.append(
                {
                    "task": "ioi",
                    "ablation": "zero",
                    "include_mlps": True,
                    "seed": seed,
                    "alpha": alpha,
                    "val_accuracy": 0.5,
                    "full_val_accuracy": 0.96,
                }
            )
    chosen = choose_alpha(pd.DataFrame(rows))
    assert chosen == {("ioi", "mean", False): 0.01, ("ioi", "zero", True): None}
    assert choose_alpha(pd.DataFrame(rows), tolerance=0.01) == {
        ("ioi", "mean", False): 0.001,
        ("ioi", "zero", True): None,
    }


# ---------------------------------------------------------------------------------------------
# uncertainty over batches and the head order, on hand-made study tables


def _table(order="heads-ascending", kept=None):
    import pandas as pd

    kept = kept or {0: ["0.0", "0.1"], 1: ["0.0"], 2: []}
    return pd.DataFrame(
        [
            {
                "task": "ioi",
                "ablation": "mean",
                "include_mlps": False,
                "alpha": 0.1,
                "seed": s,
                "order": order,
                "heads": len(h),
                "test_accuracy": [0.5, 0.7, 0.9][s],
                "kept_heads": h,
                "kept_mlps": [0, 1][:s],
                "test_correct": [[1, 0], [1, 1], [0, 0, 0, 1]][s],
            }
            for s, h in kept.items()
        ]
    )


def test_spread_over_batches_and_kept_overlap():
    from circuitlib.studies.analysis import jaccard, kept_overlap, spread_over_batches

    spread = spread_over_batches(_table(), ["heads", "test_accuracy"]).iloc[0]
    assert spread["batches"] == 3 and spread["heads_mean"] == 1.0 and spread["heads_sd"] == 1.0
    assert (spread["heads_min"], spread["heads_max"]) == (0, 2)
    assert spread["test_accuracy_mean"] == pytest.approx(0.7) and spread["test_accuracy_sd"] == pytest.approx(0.2)
    assert jaccard(["0.0", "0.1"], ["0.0"]) == 0.5 and jaccard([], []) == 1.0 and jaccard(["1.1"], []) == 0.0
    overlap = kept_overlap(_table()).iloc[0]
    assert overlap["pairs"] == 3 and overlap["jaccard_mean"] == pytest.approx((0.5 + 0.0 + 0.0) / 3)
    assert overlap["jaccard_min"] == 0.0
    with_mlps = kept_overlap(_table(), components="all").iloc[0]  # {0.0, 0.1}, {0.0, MLP 0}, {MLP 0, MLP 1}
    assert with_mlps["jaccard_mean"] == pytest.approx((1 / 3 + 0 + 1 / 3) / 3)
    import pandas as pd

    with pytest.raises(ValueError, match="two rows of seed 0"):
        spread_over_batches(pd.concat([_table(), _table("heads-descending")]), ["heads"])


def test_intervals_say_what_they_resample():
    from scipy import stats

    from circuitlib.studies.analysis import interval_over_batches, intervals

    found = interval_over_batches([0.5, 0.7, 0.9])
    half = stats.t.ppf(0.975, 2) * 0.2 / math.sqrt(3)
    assert found["mean"] == pytest.approx(0.7) and found["resamples"] == "batches"
    assert (found["low"], found["high"]) == (pytest.approx(0.7 - half), pytest.approx(0.7 + half))
    assert math.isnan(interval_over_batches([0.4])["low"])
    by_batches = intervals(_table(), "test_accuracy", over="batches").iloc[0]
    assert by_batches["resamples"] == "batches" and by_batches["high"] == pytest.approx(0.7 + half)
    by_prompts = intervals(_table(), "test_correct", over="prompts", n_boot=200).iloc[0]
    assert by_prompts["resamples"] == "prompts within batches"
    assert by_prompts["mean"] == pytest.approx((0.5 + 1.0 + 0.25) / 3)
    assert by_prompts["low"] <= by_prompts["mean"] <= by_prompts["high"]
    with pytest.raises(ValueError, match="over must be"):
        intervals(_table(), "test_accuracy", over="seeds")


def test_compare_orders_pairs_the_same_batches():
    from circuitlib.studies.analysis import compare_orders

    descending = _table("heads-descending", kept={0: ["0.1"], 1: ["0.0"], 2: ["3.3"]})
    got = compare_orders(_table(), descending).iloc[0]
    assert got["batches"] == 3 and got["heads_heads-ascending"] == 1.0 and got["heads_heads-descending"] == 1.0
    assert got["jaccard_mean"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError, match="one table per order"):
        compare_orders(_table(), _table())


# ---------------------------------------------------------------------------------------------
# why a circuit beats the full model; what heads attend to


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_prompt_flips_are_exactly_the_pruned_models(models, data, arch, ablation):
    from circuitlib.studies.analysis import prompt_flips

    model, (patching, validation) = models[arch], data
    means = mean_activations(model, patching) if ablation == "mean" else None
    kept = ["0.1", "2.0", "MLP 1"]
    circuit = prune(model, kept, ablation, means)
    with torch.inference_mode():
        answers = circuit(validation, last_only=True).argmax(-1)  # the circuit is right on every prompt
        full = model(validation, last_only=True).argmax(-1)
    split = TaskSplit([str(i) for i in range(len(validation))], validation, answers)
    task = get_task("ioi")  # only its argmax rule is used
    flips = prompt_flips(model, task, split, kept, ablation, means)
    assert flips["circuit_accuracy"] == 1.0 and flips["lost"] == []
    assert flips["gained"] == torch.nonzero(full != answers).flatten().tolist() and flips["gained"]
    assert flips["full_accuracy"] == (len(validation) - len(flips["gained"])) / len(validation)
    cfg = model.cfg
    removed = [f"{l}.{h}" for l in range(cfg.n_layers) for h in range(cfg.n_heads)] + [
        f"MLP {l}" for l in range(cfg.n_layers)
    ]
    brute = {}
    for c in [c for c in removed if c not in kept]:
        with torch.inference_mode():
            right = prune(model, kept + [c], ablation, means)(validation, last_only=True).argmax(-1) == answers
        wrong_again = [i for i in flips["gained"] if not right[i]]
        if wrong_again:
            brute[c] = wrong_again
    assert flips["undone_by"] == brute


def test_attention_targets_find_the_tasks_positions():
    from circuitlib.models.loading import gpt2_tokenizer
    from circuitlib.studies.analysis import attention_targets

    tok = gpt2_tokenizer()
    for name, target, want in [
        ("ioi", "indirect object", lambda p: [" " + p.split()[3]]),
        ("ioi", "subject", lambda p: [" " + p.split()[1].rstrip(",")] * 2),
        ("greater-than", "start year", lambda p: [p.split()[-3][2:]]),
        ("acronyms", "capital letters", lambda p: [" " + w[0] for w in p.split()[1:4]] + list(p.split("(")[1])),
    ]:
        split = get_task(name).generate(tok, 4, seed=0).test
        masks = attention_targets(get_task(name), tok, split)
        assert masks["first token"][:, 0].all() and masks["current token"][:, -1].all()
        for prompt, row, mask in zip(split.prompts, split.tokens, masks[target]):
            assert [tok.decode([t]) for t in row[mask].tolist()] == want(prompt), (name, target, prompt)


def test_attention_mass_sums_the_pattern_from_the_last_position(models, data):
    from circuitlib.studies.analysis import attention_mass

    model, tokens = models["gpt2"], data[1]
    n, S = tokens.shape
    targets = {"first token": torch.zeros(n, S, dtype=torch.bool), "everything": torch.ones(n, S, dtype=torch.bool)}
    targets["first token"][:, 0] = True
    table = attention_mass(model, tokens, ["0.0", "2.3"], targets)
    pattern = model.attention_patterns(tokens, ["0.0", "2.3"])  # [n, 2, S, S]
    assert table["head"].tolist() == ["0.0", "2.3"]
    assert table["first token"].tolist() == pytest.approx(pattern[:, :, -1, 0].double().mean(0).tolist(), rel=1e-12)
    assert table["everything"].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    with pytest.raises(ValueError, match="mask like the tokens"):
        attention_mass(model, tokens, ["0.0"], {"bad": torch.ones(n, S + 1, dtype=torch.bool)})
