"""Algorithm 1: the fast path decides exactly as the plain hook path; sweeps equal separate runs."""

import math

import pytest
import torch
from probe_alphas import alphas_between_deltas

from circuitlib.core.ablation import mean_activations
from circuitlib.core.metrics import kl_divergence
from circuitlib.core.surgery import prune
from circuitlib.discovery.greedy import Circuit, extract, sweep, traversal


def alpha_at(model, data, q, *, include_mlps, ablation="mean"):
    """An alpha at the q-quantile of an alpha = 0 run's KL increases (prunes some, keeps others), never a tie."""
    return alphas_between_deltas(model, data, include_mlps=include_mlps, ablation=ablation, quantiles=[q])[0]


def test_traversal_order():
    assert traversal(2, 3, include_mlps=True) == ["1.0", "1.1", "1.2", "MLP 1", "0.0", "0.1", "0.2", "MLP 0"]
    assert traversal(2, 2, include_mlps=False, order="heads-descending") == ["1.1", "1.0", "0.1", "0.0"]
    with pytest.raises(ValueError, match="unknown traversal order"):
        traversal(2, 2, False, order="random")


def test_kl_of_the_full_model_is_zero(models, data):
    with torch.no_grad():
        logits = models["gpt2"](data[1], last_only=True)
    assert kl_divergence(logits, logits) == 0.0


@pytest.mark.parametrize("ablation", ["mean", "zero"])
@pytest.mark.parametrize("include_mlps", [False, True])
def test_fast_path_makes_the_plain_path_decisions(arch, models, data, ablation, include_mlps):
    model = models[arch]
    alpha = alpha_at(model, data, 0.5, ablation=ablation, include_mlps=include_mlps)
    plain = extract(
        model, *data, alpha=alpha, ablation=ablation, include_mlps=include_mlps, method="plain", progress=False
    )
    fast = extract(model, *data, alpha=alpha, ablation=ablation, include_mlps=include_mlps, progress=False)
    assert 0 < len(fast.pruned) < len(fast.decisions)  # the test exercises both outcomes
    assert [(d.component, d.pruned) for d in fast.decisions] == [(d.component, d.pruned) for d in plain.decisions]
    for a, b in zip(fast.decisions, plain.decisions):
        assert math.isclose(a.kl_after, b.kl_after, rel_tol=1e-4, abs_tol=1e-6)


@pytest.mark.parametrize("include_mlps", [False, True])
def test_fast_path_decides_alike_when_whole_layers_lose_their_heads(arch, models, data, include_mlps):
    """A high alpha empties upper layers of heads; the fast path then computes the last position only."""
    model = models[arch]
    alpha = alpha_at(model, data, 0.9, include_mlps=include_mlps)
    plain = extract(model, *data, alpha=alpha, include_mlps=include_mlps, method="plain", progress=False)
    fast = extract(model, *data, alpha=alpha, include_mlps=include_mlps, progress=False)
    assert any(not any(h.startswith(f"{l}.") for h in fast.kept_heads) for l in range(1, model.cfg.n_layers))
    assert [(d.component, d.pruned) for d in fast.decisions] == [(d.component, d.pruned) for d in plain.decisions]
    for a, b in zip(fast.decisions, plain.decisions):
        assert math.isclose(a.kl_after, b.kl_after, rel_tol=1e-4, abs_tol=1e-6)


def test_final_kl_is_the_pruned_models_kl(arch, models, data):
    model, (patching, validation) = models[arch], data
    alpha = alpha_at(model, data, 0.6, include_mlps=True)
    circuit = extract(model, patching, validation, alpha=alpha, include_mlps=True, progress=False)
    pruned = prune(model, circuit.kept, "mean", mean_activations(model, patching))
    with torch.no_grad():
        kl = kl_divergence(model(validation, last_only=True), pruned(validation, last_only=True))
    assert math.isclose(kl, circuit.final_kl, rel_tol=1e-4, abs_tol=1e-6)


def test_sweep_equals_separate_runs(arch, models, data):
    model = models[arch]
    alphas = [0.0] + [alpha_at(model, data, q, include_mlps=True) for q in (0.2, 0.5, 0.8)] + [1e3]
    together = sweep(model, *data, alphas, include_mlps=True, progress=False)
    for alpha, circuit in zip(alphas, together):
        alone = extract(model, *data, alpha=alpha, include_mlps=True, progress=False)
        assert circuit.to_dict() == alone.to_dict()
    assert together[-1].kept == [] and len({len(c.kept) for c in together}) > 2


def test_same_inputs_same_circuit(models, data):
    a = extract(models["gpt2"], *data, alpha=1e-3, progress=False)
    b = extract(models["gpt2"], *data, alpha=1e-3, progress=False)
    assert a.to_dict() == b.to_dict()


def test_circuit_round_trips_through_a_dict(models, data):
    circuit = extract(models["llama"], *data, alpha=1e-2, include_mlps=True, progress=False)
    again = Circuit.from_dict(circuit.to_dict())
    assert again.to_dict() == circuit.to_dict()


@pytest.mark.parametrize("alpha", [-0.1, float("nan"), "abc"])
def test_bad_alpha_is_refused(models, data, alpha):
    with pytest.raises(ValueError, match="alpha must be"):
        extract(models["gpt2"], *data, alpha=alpha, progress=False)


def test_bad_settings_are_refused(models, data):
    with pytest.raises(ValueError, match="unknown ablation"):
        extract(models["gpt2"], *data, alpha=0.1, ablation="resample", progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        extract(models["gpt2"], *data, alpha=0.1, method="slow", progress=False)
    with pytest.raises(ValueError, match="LongTensor"):
        extract(models["gpt2"], [[1, 2], [3]], data[1], alpha=0.1, progress=False)


def test_an_extraction_config_is_checked_when_made_and_is_what_the_run_records():
    import dataclasses

    from circuitlib.pipeline.extraction import ExtractionConfig, run_extraction

    for bad, message in [
        (dict(alpha=-1), "alpha"),
        (dict(alpha=0.1, ablation="resample"), "unknown ablation"),
        (dict(alpha=0.1, n=0), "n must be a positive number"),
        (dict(alpha=0.1, order="random"), "unknown order"),
        (dict(alpha=0.1, method="slow"), "unknown method"),
    ]:
        with pytest.raises(ValueError, match=message):
            ExtractionConfig("tiny-gpt2", "ioi", **bad)
    with pytest.raises(ValueError, match="groundtruth"):
        ExtractionConfig("tracr-reverse", "tracr-reverse", alpha=0.1)
    config = ExtractionConfig("tiny-gpt2", "ioi", alpha=0.05, n=4, seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.alpha = 0.1
    run = run_extraction(config, progress=False)
    recorded = {k: run.settings[k] for k in dataclasses.asdict(config)}
    assert recorded == dataclasses.asdict(config) and run.settings["torch_threads"] >= 1
