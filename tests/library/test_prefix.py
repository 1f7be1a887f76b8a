"""The shared-prefix shortcut of the fast path: positions that begin every prompt alike are not
recomputed (their keys and values come from f's cache). Same decisions as the plain hook path."""

import math

import pytest
import torch
from probe_alphas import alphas_between_deltas

from circuitlib.discovery.greedy import FastPath, extract, shared_prefix_length, sweep


def with_prefix(data, length: int):
    """The fixture's prompts with their first `length` tokens made the same in every prompt."""
    patching, validation = (t.clone() for t in data)
    start = patching[0, :length].clone()
    patching[:, :length], validation[:, :length] = start, start
    return patching, validation


def test_shared_prefix_length():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 6]])
    assert shared_prefix_length(a) == 2
    assert shared_prefix_length(a, torch.tensor([[1, 9, 3, 4]])) == 1
    assert shared_prefix_length(torch.tensor([[1, 2, 3], [1, 2, 3]])) == 2  # the last position is always computed


def test_a_layer_after_a_prefix_equals_the_full_layer(models, data, arch):
    layer = models[arch].layers[1]
    with torch.no_grad():
        x = models[arch].embed(with_prefix(data, 3)[1])  # [n, S, D]
        full = layer(x)
        torch.testing.assert_close(layer(x[:, 3:], prefix=x[:1, :3]), full[:, 3:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            layer(x[:, 3:], last_only=True, prefix=x[:1, :3]), full[:, -1:], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("include_mlps", [False, True])
def test_the_prefix_shortcut_makes_the_plain_path_decisions(arch, models, data, include_mlps):
    model = models[arch]
    prompts = with_prefix(data, 3)
    [alpha] = alphas_between_deltas(model, prompts, include_mlps=include_mlps, quantiles=[0.5])
    plain = extract(model, *prompts, alpha=alpha, include_mlps=include_mlps, method="plain", progress=False)
    fast = extract(model, *prompts, alpha=alpha, include_mlps=include_mlps, progress=False)
    assert 0 < len(fast.pruned) < len(fast.decisions)
    assert [(d.component, d.pruned) for d in fast.decisions] == [(d.component, d.pruned) for d in plain.decisions]
    for a, b in zip(fast.decisions, plain.decisions):
        assert math.isclose(a.kl_after, b.kl_after, rel_tol=1e-4, abs_tol=1e-6)


def test_the_shortcut_is_used_and_changes_no_kl(models, data, monkeypatch):
    """The same sweep with the shortcut switched off gives the same KLs to float error."""
    model = models["llama"]
    prompts = with_prefix(data, 4)
    used = []
    real_init = FastPath.__init__

    def spy(self, *args, prefix=0, **kw):
        used.append(prefix)
        real_init(self, *args, prefix=prefix, **kw)

    monkeypatch.setattr(FastPath, "__init__", spy)
    alphas = [1e-4, 1e-3, 1e-2]
    with_shortcut = sweep(model, *prompts, alphas, include_mlps=True, progress=False)
    monkeypatch.setattr(FastPath, "__init__", lambda self, *a, prefix=0, **kw: real_init(self, *a, prefix=0, **kw))
    without = sweep(model, *prompts, alphas, include_mlps=True, progress=False)
    assert used == [4]
    for a, b in zip(with_shortcut, without):
        assert a.kept == b.kept
        assert [d.kl_after for d in a.decisions] == pytest.approx([d.kl_after for d in b.decisions], rel=1e-4, abs=1e-7)
    monkeypatch.setattr(FastPath, "__init__", spy)
    sweep(model, *prompts, alphas, ablation="zero", progress=False)  # zero ablation never uses it
    assert used == [4, 0]
