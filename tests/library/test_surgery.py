"""True pruning equals hook-based ablation (TransformerLens) to float error."""

import random

import pytest
import torch

from circuitlib.core.ablation import hooked_last_logits, mean_activations
from circuitlib.core.convert import to_hooked
from circuitlib.core.surgery import prune


def components(model):
    cfg = model.cfg
    return [f"{l}.{h}" for l in range(cfg.n_layers) for h in range(cfg.n_heads)] + [
        f"MLP {l}" for l in range(cfg.n_layers)
    ]


@pytest.mark.parametrize("ablation", ["mean", "zero"])
@pytest.mark.parametrize("seed", range(4))
def test_pruned_model_equals_hook_ablation(arch, models, data, ablation, seed):
    model, (patching, validation) = models[arch], data
    rng = random.Random(seed)
    kept = [c for c in components(model) if rng.random() < 0.5]
    ablated = [c for c in components(model) if c not in kept]
    means = mean_activations(model, patching)
    pruned = prune(model, kept, ablation, means)
    with torch.no_grad():
        ours = pruned(validation)[:, -1]
    reference = hooked_last_logits(to_hooked(model), validation, ablated, ablation, means)
    assert torch.allclose(ours, reference, atol=1e-4)
    assert sorted(pruned.kept_heads()) == sorted(c for c in kept if not c.startswith("MLP"))


def test_pruning_nothing_gives_the_full_model(arch, models, data):
    model, (patching, validation) = models[arch], data
    for ablation in ("mean", "zero"):
        same = prune(model, components(model), ablation, mean_activations(model, patching))
        assert same.count_parameters() == model.count_parameters()
        with torch.no_grad():
            assert torch.allclose(same(validation), model(validation), atol=1e-6)


def test_grouped_kv_head_goes_only_with_all_its_query_heads(models, data):
    model = models["llama"]  # 6 query heads share 2 K/V heads: heads 0-2 read K/V 0, heads 3-5 read K/V 1
    keep = [f"0.{h}" for h in (0, 1, 2, 5)] + [f"1.{h}" for h in (3, 4, 5)]
    pruned = prune(model, keep, "zero")
    assert pruned.layers[0].W_Q.shape[0] == 4 and pruned.layers[0].W_K.shape[0] == 2
    assert pruned.layers[1].W_Q.shape[0] == 3 and pruned.layers[1].W_K.shape[0] == 1
    assert pruned.layers[2].heads == [] and not hasattr(pruned.layers[2], "W_K")


def test_mean_pruning_needs_means(models):
    with pytest.raises(ValueError, match="needs the patching-set means"):
        prune(models["gpt2"], [], "mean")


@pytest.mark.parametrize("bad", ["12.0", "0.9", "MLP x", "head"])
def test_unknown_components_are_refused(models, bad):
    with pytest.raises(ValueError, match="does not exist|bad component name"):
        prune(models["gpt2"], [bad], "zero")


def test_unknown_scheme_is_refused(models):
    with pytest.raises(ValueError, match="unknown ablation 'resample'"):
        prune(models["gpt2"], [], "resample")


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_a_layer_without_heads_runs_on_the_last_position_alone(arch, models, data, ablation):
    model, (patching, validation) = models[arch], data
    kept = [c for c in components(model) if not c.startswith("1.") and c != "MLP 2"]
    pruned = prune(model, kept, ablation, mean_activations(model, patching))
    S = validation.shape[1]
    with torch.no_grad():
        x = pruned.embed(validation)
        x = pruned.layers[0](x)
        whole = pruned.layers[1](x)[:, -1:]
        alone = pruned.layers[1].forward_positionwise(x[:, -1:], slice(S - 1, S))
        assert torch.allclose(alone, whole, atol=1e-5)
        with pytest.raises(ValueError, match="needs every position"):
            pruned.layers[0].forward_positionwise(x, slice(0, S))


@pytest.mark.parametrize(
    "kept, message",
    [
        (["0.1", "1.2", "0.1"], "name '0.1' twice"),
        (["1.2", "1.02"], "name '1.02' twice \\(as '1.2'\\)"),
        (["MLP 1", "MLP 1"], "name 'MLP 1' twice"),
        ("0.1", "not one string"),
        ([3], "must be strings"),
    ],
)
def test_repeated_or_malformed_kept_lists_are_refused(models, data, kept, message):
    # a repeated head used to be built twice, and its layer's mean-ablation bias silently dropped
    model, (patching, _) = models["gpt2"], data
    with pytest.raises(ValueError, match=message):
        prune(model, kept, "mean", mean_activations(model, patching))
