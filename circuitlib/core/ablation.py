"""Ablation: what a component writes when it is switched off, and hook-based ablation as reference.

Components are named as in `circuitlib.core.components` ("L.H", "MLP L"). An ablated head's `hook_z`
is replaced by its mean over the patching set at each position (mean ablation) or by zero (zero
ablation); the attention output bias `b_O` stays. An ablated MLP's `hook_mlp_out` is replaced by its
per-position mean, or by zero.

`hooked_last_logits` is the plain reference: a TransformerLens forward pass with hooks, against
which physically pruned models and the fast extraction path are tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitlib.core.components import head_name, parse_component
from circuitlib.core.model import Transformer

ABLATIONS = ("mean", "zero")


def check_ablation(ablation: str) -> str:
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose 'mean' or 'zero'")
    return ablation


@dataclass
class Means:
    """Per-position means over the patching set, computed once on the full model.

    z:   [n_layers, n_heads, S, d_head]  mean of each head's hook_z
    mlp: [n_layers, S, d_model]          mean of each MLP's output (hook_mlp_out)
    """

    z: torch.Tensor
    mlp: torch.Tensor

    def head_output(self, layer: int, W_O: torch.Tensor, heads: list[int]) -> torch.Tensor:
        """Summed mean output of `heads` of `layer` through their W_O slices [len(heads), E, D] -> [S, D]."""
        return torch.einsum("hse,hed->sd", self.z[layer, heads], W_O)


@torch.inference_mode()
def mean_activations(model: Transformer, tokens: torch.Tensor, batch_size: int = 64) -> Means:
    """Means of every head's z and every MLP's output over `tokens` [n, S], per position."""
    cfg = model.cfg
    if model.kept_heads() != [head_name(l, h) for l in range(cfg.n_layers) for h in range(cfg.n_heads)]:
        raise ValueError("means must be computed on the full model, not on a pruned one")
    n, S = tokens.shape
    tokens = tokens.to(model.device)
    z_sum = torch.zeros(cfg.n_layers, cfg.n_heads, S, cfg.d_head, dtype=torch.float64, device=model.device)
    mlp_sum = torch.zeros(cfg.n_layers, S, cfg.d_model, dtype=torch.float64, device=model.device)
    for start in range(0, n, batch_size):
        x = model.embed(tokens[start : start + batch_size])
        for l, layer in enumerate(model.layers):
            z = layer.z(x)  # [B, S, H, E]
            z_sum[l] += z.sum(0).transpose(0, 1).double()
            x = x + layer.attn_out(x, z)
            m = layer.mlp_out(x)
            mlp_sum[l] += m.sum(0).double()
            x = x + m
    return Means(z=(z_sum / n).float(), mlp=(mlp_sum / n).float())


def ablation_hooks(ablated: list[str], ablation: str, means: Means | None) -> list[tuple[str, callable]]:
    """TransformerLens forward hooks that ablate the named components."""
    check_ablation(ablation)
    if ablation == "mean" and means is None:
        raise ValueError("mean ablation needs the means of the patching set (see mean_activations)")
    heads_by_layer: dict[int, list[int]] = {}
    hooks = []
    for name in ablated:
        layer, head = parse_component(name)
        if head is None:

            def mlp_hook(out, hook, layer=layer):  # out: [B, S, D]
                return torch.zeros_like(out) if ablation == "zero" else means.mlp[layer, : out.shape[1]].expand_as(out)

            hooks.append((f"blocks.{layer}.hook_mlp_out", mlp_hook))
        else:
            heads_by_layer.setdefault(layer, []).append(head)
    for layer, heads in heads_by_layer.items():

        def z_hook(z, hook, layer=layer, heads=heads):  # z: [B, S, H, E]
            z = z.clone()
            z[:, :, heads] = 0.0 if ablation == "zero" else means.z[layer, heads, : z.shape[1]].transpose(0, 1)
            return z

        hooks.append((f"blocks.{layer}.attn.hook_z", z_hook))
    return hooks


@torch.inference_mode()
def hooked_last_logits(
    hooked, tokens: torch.Tensor, ablated: list[str], ablation: str, means: Means | None
) -> torch.Tensor:
    """Last-position logits [n, V] of a HookedTransformer with `ablated` components switched off.

    A full forward pass computing logits at every position, as in the authors' code.
    """
    logits = hooked.run_with_hooks(tokens, fwd_hooks=ablation_hooks(ablated, ablation, means))
    return logits[:, -1]
