"""Batched candidates: a layer's remaining candidates evaluated in one pass, each assuming the
earlier ones removed, re-evaluated after a keep. Same decisions as one candidate at a time."""

import math

import pytest
import torch
from probe_alphas import alphas_between_deltas
from test_prefix import with_prefix

from circuitlib.discovery.greedy import FastPath, sweep


@pytest.mark.parametrize("ablation", ["mean", "zero"])
@pytest.mark.parametrize("include_mlps", [False, True])
def test_batched_candidates_make_the_same_decisions(arch, models, data, ablation, include_mlps):
    model = models[arch]
    prompts = with_prefix(data, 2)
    alphas = alphas_between_deltas(model, prompts, include_mlps=include_mlps, ablation=ablation)
    one_by_one = sweep(
        model, *prompts, alphas, ablation=ablation, include_mlps=include_mlps, progress=False, batch_candidates=False
    )
    batched = sweep(
        model, *prompts, alphas, ablation=ablation, include_mlps=include_mlps, progress=False, batch_candidates=True
    )
    for a, b in zip(one_by_one, batched):
        assert 0 < len(a.pruned) < len(a.decisions)  # the alphas test both outcomes
        assert [(d.component, d.pruned) for d in a.decisions] == [(d.component, d.pruned) for d in b.decisions]
        for x, y in zip(a.decisions, b.decisions):
            assert math.isclose(x.kl_before, y.kl_before, rel_tol=1e-5, abs_tol=1e-8)
            assert math.isclose(x.kl_after, y.kl_after, rel_tol=1e-5, abs_tol=1e-8)


def test_batched_candidates_take_fewer_passes(models, data, monkeypatch):
    """One pass per layer and kept candidate (plus one), instead of one per candidate."""
    model = models["gpt2"]
    [alpha] = alphas_between_deltas(model, data, include_mlps=False, quantiles=[0.5])
    passes = []
    real = FastPath.kl_many
    monkeypatch.setattr(
        FastPath, "kl_many", lambda self, layer, sets, above: passes.append(len(sets)) or real(self, layer, sets, above)
    )
    [circuit] = sweep(model, *data, [alpha], progress=False, batch_candidates=True)
    cfg = model.cfg
    assert sum(passes) >= len(circuit.decisions)  # every candidate evaluated at least once
    # a pass starts each layer, and one more after each kept candidate that is not its layer's last
    last_in_layer = {f"{l}.{cfg.n_heads - 1}" for l in range(cfg.n_layers)}
    kept_not_last = sum(1 for d in circuit.decisions if not d.pruned and d.component not in last_in_layer)
    assert len(passes) == cfg.n_layers + kept_not_last < len(circuit.decisions)


def test_kl_many_equals_kl_one_set_at_a_time(models, data):
    model = models["llama"]
    with torch.inference_mode():
        fast = FastPath(model, data[1], "zero", None)
        layer = model.cfg.n_layers - 1
        fast.enter(layer)
        sets = [[f"{layer}.0"], [f"{layer}.0", f"{layer}.1"], [f"MLP {layer}"]]
        together = fast.kl_many(layer, sets, [])
        assert together == pytest.approx([fast.kl(layer, s, []) for s in sets], rel=1e-5, abs=1e-8)


def test_the_default_is_batched_on_cuda_only(models, data, monkeypatch):
    seen = []
    real = FastPath.kl_many
    monkeypatch.setattr(
        FastPath, "kl_many", lambda self, layer, sets, above: seen.append(len(sets)) or real(self, layer, sets, above)
    )
    sweep(models["gpt2"], *data, [1e-3], progress=False)
    assert set(seen) == {1}, "on the CPU the default evaluates one candidate at a time"
