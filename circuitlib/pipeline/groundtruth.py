"""Algorithm 1 on compiled models, with metrics that fit a program's output, and its scores against the truth.

**Metrics** (`divergence`), at every position but BOS (`position="all"`) or at the last one only
(`"last"`, the variant of the paper's language tasks), averaged over inputs of every length:
- categorical output: KL(f || g) over the output values, from softmax of the output columns
  (Edge Pruning's loss for reverse is the same KL at positions 1.., summed over positions where
  this averages them: a constant factor, S - 1, on inputs of one length);
- numerical output: the squared error (g - f)^2 of the output value (MSE).

**Means pooled per position.** Inputs of different lengths never share a batch (no padding), but
mean ablation needs one mean per position: `pooled_means` averages each head's z and each MLP's
output at position p over every input that has a position p, whatever its length.

**The walk** is Algorithm 1's (`extract.traversal`, last layer first, heads then the MLP; remove
c if the metric rises by less than alpha, strictly), evaluated by building the pruned model
(`surgery.prune`) for each candidate: `extract`'s fast path measures last-position KL over prompts
of one length, which these programs do not fit. Compiled models are tiny, so this is quick.

**Why mixed lengths** (`failure_modes` shows both on reverse): with inputs of one length, a
position-wise mean reproduces everything that depends only on position and length, so mean
ablation of reverse's whole length computation changes nothing; and zero ablation of the length
head decodes a missing length as the maximum, right by coincidence at full length.

**Scores**: TPR and FPR of a kept set against the true components (all heads and MLPs of the
model are the negatives' universe), ROC over alphas with its AUC, and the alphas at which the
kept set equals the truth exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from circuitlib.core.ablation import Means, check_ablation
from circuitlib.core.components import head_name, mlp_name
from circuitlib.discovery.greedy import Circuit, Decision, check_alpha, traversal
from circuitlib.core.model import Transformer
from circuitlib.core.surgery import prune
from circuitlib.models.compiled.compile import Compiled
from circuitlib.models.compiled.truth import truth_components

POSITIONS = ("all", "last")


@torch.no_grad()
def pooled_means(model: Transformer, batches: list[torch.Tensor]) -> Means:
    """Per-position means of every head's z and every MLP's output over inputs of several lengths.

    batches: [n_L, S_L] each; position p's mean is over every input with at least p + 1 tokens.
    """
    cfg, S = model.cfg, max(b.shape[1] for b in batches)
    z_sum = torch.zeros(cfg.n_layers, cfg.n_heads, S, cfg.d_head, dtype=torch.float64)
    mlp_sum = torch.zeros(cfg.n_layers, S, cfg.d_model, dtype=torch.float64)
    count = torch.zeros(S, dtype=torch.float64)
    for tokens in batches:
        s = tokens.shape[1]
        x = model.embed(tokens)
        for l, layer in enumerate(model.layers):
            z = layer.z(x)                                          # [B, s, H, E]
            z_sum[l, :, :s] += z.sum(0).transpose(0, 1).double()
            x = x + layer.attn_out(x, z)
            m = layer.mlp_out(x)
            mlp_sum[l, :s] += m.sum(0).double()
            x = x + m
        count[:s] += len(tokens)
    return Means(z=(z_sum / count[None, None, :, None]).float(), mlp=(mlp_sum / count[None, :, None]).float())


def divergence(categorical: bool, full: torch.Tensor, other: torch.Tensor, position: str = "all") -> torch.Tensor:
    """Per input [B]: KL(full || other) over the outputs (categorical) or squared error (numerical).

    full, other: outputs [B, S, V]; averaged over positions 1..S-1 ("all") or the last position ("last").
    """
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; choose 'all' (every position but BOS) or 'last'")
    full, other = (full[:, 1:], other[:, 1:]) if position == "all" else (full[:, -1:], other[:, -1:])
    if categorical:
        p = F.log_softmax(full.double(), -1)
        per_pos = (p.exp() * (p - F.log_softmax(other.double(), -1))).sum(-1)
    else:
        per_pos = (other.double() - full.double()).pow(2).sum(-1)
    return per_pos.mean(-1)


@torch.no_grad()
def metric(compiled: Compiled, model: Transformer, inputs: list[torch.Tensor], full: list[torch.Tensor],
           position: str = "all") -> float:
    """The mean divergence of `model` from the full model's outputs `full` over every input (batches by length)."""
    total = sum(float(divergence(compiled.info.categorical, f, model(t), position).sum()) for f, t in zip(full, inputs))
    return total / sum(len(t) for t in inputs)


@torch.no_grad()
def greedy(compiled: Compiled, patching: list[torch.Tensor], validation: list[torch.Tensor], alpha: float, *,
           ablation: str = "mean", order: str = "heads-ascending", position: str = "all") -> Circuit:
    """Algorithm 1 on a compiled model, heads and MLPs, with `divergence` as the metric (see module doc).

    patching:   batches [n_L, S_L] whose pooled per-position means replace ablated components (mean ablation)
    validation: batches on which the metric is measured
    """
    alpha, ablation = check_alpha(alpha), check_ablation(ablation)
    model, cfg = compiled.model, compiled.model.cfg
    means = pooled_means(model, patching) if ablation == "mean" else None
    if means is not None and means.z.shape[2] < max(t.shape[1] for t in validation):
        raise ValueError("the validation inputs are longer than the patching inputs; the means cover too few "
                         "positions: draw both from the same lengths")
    full = [model(t) for t in validation]
    names = traversal(cfg.n_layers, cfg.n_heads, include_mlps=True, order=order)
    every = [head_name(l, h) for l in range(cfg.n_layers) for h in range(cfg.n_heads)] + \
        [mlp_name(l) for l in range(cfg.n_layers)]
    circuit = Circuit(cfg.name, cfg.n_layers, cfg.n_heads, alpha, ablation, True, order)
    removed, current = set(), 0.0
    for name in names:
        kept = [c for c in every if c not in removed and c != name]
        value = metric(compiled, prune(model, kept, ablation, means), validation, full, position)
        pruned = value - current < alpha
        circuit.decisions.append(Decision(name, current, value, pruned))
        if pruned:
            removed.add(name)
            current = value
    return circuit


def components_of(model: Transformer) -> list[str]:
    cfg = model.cfg
    return [head_name(l, h) for l in range(cfg.n_layers) for h in range(cfg.n_heads)] + \
        [mlp_name(l) for l in range(cfg.n_layers)]


def rates(kept: list[str], truth: list[str], universe: list[str]) -> tuple[float, float]:
    """(TPR, FPR) of a kept set: kept true components / true ones, kept others / others."""
    kept, truth = set(kept), set(truth)
    negatives = set(universe) - truth
    tpr = len(kept & truth) / len(truth) if truth else 1.0
    fpr = len(kept & negatives) / len(negatives) if negatives else 0.0
    return tpr, fpr


def edge_scores(found: list[str], truth: list[str]) -> dict:
    """Precision, recall and exact match of a found edge set against the true one ("WRITER -> READER" names)."""
    found, truth = set(found), set(truth)
    hits = len(found & truth)
    return {"precision": hits / len(found) if found else 1.0, "recall": hits / len(truth) if truth else 1.0,
            "exact": found == truth}


def roc(compiled: Compiled, circuits: list[Circuit], truth: list[str] | None = None) -> dict:
    """TPR/FPR per alpha, the ROC curve's AUC (trapezoids through (0, 0) and (1, 1)), and the exact alphas."""
    truth = truth_components(compiled.info) if truth is None else truth
    universe = components_of(compiled.model)
    points = [(c.alpha, *rates(c.kept, truth, universe)) for c in circuits]
    curve = sorted({(0.0, 0.0), (1.0, 1.0)} | {(fpr, tpr) for _, tpr, fpr in points})
    auc = 0.0
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        auc += (x1 - x0) * (y0 + y1) / 2
    exact = [c.alpha for c in circuits if set(c.kept) == set(truth)]
    return {"alphas": [p[0] for p in points], "tpr": [p[1] for p in points], "fpr": [p[2] for p in points],
            "auc": auc, "exact_alphas": exact}


@torch.no_grad()
def failure_modes(compiled: Compiled) -> dict:
    """What one-length data hides on a program: KL/MSE after removing its true components, per data choice.

    For each true component c, the metric (every position but BOS) of the model without c:
    {"mean, full length only": {...}, "zero, full length only": {...}, "mean, mixed lengths": {...},
     "zero, mixed lengths": {...}}. A value of 0 means that data cannot see c.
    """
    from circuitlib.tasks.compiled import CompiledTask

    task = CompiledTask(compiled)
    L = compiled.info.max_seq_len
    datasets = {"full length only": task.inputs([L]), "mixed lengths": task.inputs()}
    model, every, out = compiled.model, components_of(compiled.model), {}
    for data_name, inputs in datasets.items():
        full = [model(t) for t in inputs]
        for ablation in ("mean", "zero"):
            means = pooled_means(model, inputs) if ablation == "mean" else None
            out[f"{ablation}, {data_name}"] = {
                c: metric(compiled, prune(model, [x for x in every if x != c], ablation, means), inputs, full)
                for c in truth_components(compiled.info)}
    return out


GREEDY_ALPHA = 1e-3    # the CLI's default threshold (KL or squared error, every position but BOS)
INPUTS_PER_LENGTH = 100


def groundtruth_report(program: str, method: str = "greedy", seed: int = 0, alpha: float = GREEDY_ALPHA,
                       ablation: str = "mean") -> dict:
    """Compile (or load) `program`, run a method on mixed-length data, and score it against the compiler's truth.

    Data: up to INPUTS_PER_LENGTH inputs of every length, drawn with `seed`, for both the means and
    the metric. Truth edges are the functional ones without BOS plumbing (see `truth`); the edges
    a node method finds are the structural edges (without BOS plumbing) among its kept components.
    """
    from circuitlib.models.compiled import truth
    from circuitlib.models.compiled.compile import load_compiled
    from circuitlib.tasks.compiled import CompiledTask, accuracy

    if method not in ("greedy", "edges"):
        raise ValueError(f"unknown method {method!r}; choose 'greedy' or 'edges'")
    alpha, ablation = check_alpha(alpha), check_ablation(ablation)
    compiled = load_compiled(program)
    if method == "edges":
        raise ValueError("Edge Pruning on compiled models is not available yet: circuitlib.discovery.edges.graph assumes causal "
                         "attention, layer norms and last-position logits; use --method greedy")
    task = CompiledTask(compiled)
    inputs = task.inputs(cap=INPUTS_PER_LENGTH, seed=seed)
    circuit = greedy(compiled, inputs, inputs, alpha, ablation=ablation)
    model, info = compiled.model, compiled.info
    true_components = truth.truth_components(info)
    structural = truth.structural_edges(info, model)
    found = set(circuit.kept)
    ends = ("embed", "pos", "logits")     # always there: a node method keeps or removes heads and MLPs only
    found_edges = [e for e in truth.structural_edges(info, model, bos_plumbing=False)
                   if all(end in ends or end in found
                          for end in (e.split(" -> ")[0], truth.node_of(e.split(" -> ")[1])))]
    truth_edges = truth.functional_edges(info, model, task.inputs(), bos_plumbing=False)
    every = task.inputs()
    means = pooled_means(model, every) if ablation == "mean" else None
    pruned = prune(model, circuit.kept, ablation, means)
    acc = sum(accuracy(compiled, model(t), pruned(t)) * len(t) for t in every) / sum(len(t) for t in every)
    tpr, fpr = rates(circuit.kept, true_components, components_of(model))
    return {"program": compiled.name, "method": method, "seed": seed, "alpha": alpha, "ablation": ablation,
            "truth_components": true_components, "found_components": circuit.kept,
            "truth_edges": truth_edges, "found_edges": found_edges, "structural_edges": structural,
            "exact": set(circuit.kept) == set(true_components), "tpr": tpr, "fpr": fpr,
            "edge_scores": edge_scores(found_edges, truth_edges), "accuracy": acc}
