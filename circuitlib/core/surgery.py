"""True pruning: build a physically smaller model that holds only the kept heads and MLPs.

A removed head loses its rows of W_Q, W_K, W_V (and biases) and its slice of W_O; a removed MLP
loses W_in, W_out (W_gate) and its norm; a layer without heads loses its first norm. For grouped
K/V heads (Llama), a K/V head goes only when every query head that reads it is gone. Under mean
ablation, what the removed parts wrote on average is added back as a per-position bias:

    attn_ablation[l] = sum over removed heads h of  mean_z[l, h] @ W_O[l, h]    # [S, D]
    mlp_ablation[l]  = mean MLP output of layer l (if removed)                   # [S, D]

so the pruned model gives the same logits as hook-based ablation of the same components.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from circuitlib.core.ablation import Means, check_ablation
from circuitlib.core.components import parse_component
from circuitlib.core.model import Layer, LayerPlan, Transformer


def plan_for(model: Transformer, kept: Iterable[str], ablation: str, seq_len: int) -> list[LayerPlan]:
    """Layer plans keeping the components named in `kept` ('L.H' heads, 'MLP L').

    Refuses, before building anything, names that are not components of this model and names
    that repeat one (a repeated head would be built twice and its layer's ablation bias lost).
    """
    cfg = model.cfg
    heads = {l: [] for l in range(cfg.n_layers)}
    mlps = set()
    seen: dict[tuple[int, int | None], str] = {}
    for name in kept:
        if not isinstance(name, str):
            raise ValueError(f"component names must be strings ('L.H' for a head, 'MLP L' for an MLP); got {name!r}")
        layer, head = parse_component(name)
        if not (0 <= layer < cfg.n_layers) or (head is not None and not 0 <= head < cfg.n_heads):
            raise ValueError(
                f"component {name!r} does not exist in a model with {cfg.n_layers} layers "
                f"and {cfg.n_heads} heads per layer"
            )
        if (layer, head) in seen:
            same = "" if seen[layer, head] == name else f" (as {seen[layer, head]!r})"
            raise ValueError(f"the kept components name {name!r} twice{same}; list each component once")
        seen[layer, head] = name
        if head is None:
            mlps.add(layer)
        else:
            heads[layer].append(head)
    mean = ablation == "mean"
    return [
        LayerPlan(
            heads=sorted(heads[l]),
            has_mlp=l in mlps,
            attn_ablation=mean and len(heads[l]) < cfg.n_heads,
            mlp_ablation=mean and l not in mlps,
            ablation_len=seq_len if mean else 0,
        )
        for l in range(cfg.n_layers)
    ]


@torch.no_grad()
def prune(model: Transformer, kept: Iterable[str], ablation: str, means: Means | None = None) -> Transformer:
    """A new, smaller `Transformer` keeping only `kept` components of the full `model`.

    kept:   component names, heads 'L.H' and MLPs 'MLP L' (everything else is removed)
    ablation: 'mean' (removed parts replaced by their per-position mean, needs `means`) or 'zero'
    """
    pruned = Transformer(model.cfg, _plans(model, kept, ablation, means), ablation=ablation).to(model.W_E.device)
    pruned.W_E.copy_(model.W_E)
    if model.W_pos is not None:
        pruned.W_pos.copy_(model.W_pos)
    pruned.ln_final.load_state_dict(model.ln_final.state_dict())
    if model.W_U is not None:
        pruned.W_U.copy_(model.W_U)
    for l, (new, old) in enumerate(zip(pruned.layers, model.layers)):
        _copy_layer(new, old, l, means)
    return pruned.eval()


@torch.no_grad()
def prune_layer(model: Transformer, layer: int, kept: Iterable[str], ablation: str, means: Means | None) -> Layer:
    """Layer `layer` of the full `model`, keeping only those of its components named in `kept`."""
    plan = _plans(model, kept, ablation, means)[layer]
    new, old = Layer(model.cfg, plan).to(model.W_E.device), model.layers[layer]
    _copy_layer(new, old, layer, means)
    return new.eval()


def _plans(model: Transformer, kept: Iterable[str], ablation: str, means: Means | None) -> list[LayerPlan]:
    check_ablation(ablation)
    if isinstance(kept, str):
        raise ValueError(f"kept must be a list of component names, not one string ({kept!r}); e.g. ['9.6', 'MLP 0']")
    if ablation == "mean" and means is None:
        raise ValueError(
            "mean-ablation pruning needs the patching-set means (circuitlib.core.ablation.mean_activations)"
        )
    return plan_for(model, kept, ablation, means.z.shape[2] if means is not None else 0)


def _copy_layer(new, old, layer: int, means: Means | None) -> None:
    """Copy the kept weights of full layer `old` into pruned layer `new`, and fill its ablation biases."""
    cfg, heads = new.cfg, new.plan.heads
    removed = [h for h in range(cfg.n_heads) if h not in heads]
    if heads:
        kv = new.plan.kv_heads(cfg)
        new.ln1.load_state_dict(old.ln1.state_dict())
        for name, rows in (
            ("W_Q", heads),
            ("b_Q", heads),
            ("W_O", heads),
            ("W_K", kv),
            ("b_K", kv),
            ("W_V", kv),
            ("b_V", kv),
        ):
            if getattr(new, name) is not None:
                getattr(new, name).copy_(getattr(old, name)[rows])
    if new.b_O is not None:
        new.b_O.copy_(old.b_O)
    if new.plan.has_mlp:
        new.ln2.load_state_dict(old.ln2.state_dict())
        for name in ("W_in", "b_in", "W_out", "b_out", "W_gate"):
            if getattr(new, name) is not None:
                getattr(new, name).copy_(getattr(old, name))
    if new.attn_ablation is not None:
        new.attn_ablation.copy_(means.head_output(layer, old.W_O[removed], removed))
    if new.mlp_ablation is not None:
        new.mlp_ablation.copy_(means.mlp[layer])
