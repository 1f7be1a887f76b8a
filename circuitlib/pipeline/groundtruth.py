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

**Edge Pruning as its authors run it on Tracr** (`edge_pruning`; princeton-nlp/Edge-Pruning
`run_scripts/tracr_reverse.sh`, `tracr_xproportion.sh`, `src/prune/erazr_reverse.py`,
`erazr_xproportion.py`, `src/modeling/modeling_erazr.py`; `AUTHORS_SETTINGS`):
- zero ablation (`--zero_ablation`), token and position embeddings as two writers, batch 16;
- data: every input of one length, train = evaluation set (their `seq_length` 4 and 5 with BOS:
  3 tokens for reverse, 4 for xproportion; of max_seq_len 5, so a zero-ablated length is visible);
- reverse: edge target 1.02, learning rates 0.03 (gates) and 0.001 (multipliers), 6000 steps,
  target ramp 5900, LR warm-up 1500; loss `kl_over_outputs`, their KL over the output vocabulary
  at positions 1.., summed over positions, mean over inputs; node loss off (no node gates here);
- xproportion: edge target 0.92, node target 0.4, learning rates 1 and 0.0001, 720 steps, ramp
  640, warm-up 96; loss `kl_over_positions`, their quirk kept as it is: the log-softmax is taken
  over the *positions* of the output column (BOS included), so the loss sees the output sequence
  as a distribution over positions and is blind to a shift of every position's value by one
  constant; accuracy (every value within 0.05, their criterion) is what catches such a shift;
- read-off, their evaluation's: the deterministic gates (`deterministic_mask`, per parameter
  tensor) above a fixed threshold 0.005, and, with node gates, the edges of writers whose node
  gate is closed by the same rule dropped (their `get_edges`). No dead-edge removal.
Other programs (no published settings) get reverse's recipe (categorical outputs) or
xproportion's (numerical), on inputs one token shorter than max_seq_len.
Deviations that remain: their gate tensors also hold never-read padding entries (see
`edges.train`), their embeddings carry node gates and their reverse run trains node gates by the
KL alone (node loss off: they stay open); the node target here counts heads and MLPs only; the
batches are drawn at random per step (theirs: epochs of a shuffled set); the target ramps from
step 1 (theirs: step 0).

The truth an edge set is scored against (`edge_truths`, each exact match reported): *objective*
(the default: the structural edges whose single zero-removal moves an output the loss reads, on
the training inputs; `objective_edges`), *functional* (decoded output at positions 1.., the whole
input space, without BOS plumbing), *structural* with and without BOS plumbing. The objective
truth is ACDC's published list for both programs: reverse's loss skips BOS, and its BOS plumbing
moves only BOS's logits (= functional); xproportion's loss reads BOS, whose output the BOS
plumbing moves (= structural). The paper's claim for a run: the read-off edge set equals the
objective truth and accuracy is 100 % (`edge_recovery_table`'s "recovered").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from circuitlib.core.ablation import Means, check_ablation
from circuitlib.core.components import head_name, mlp_name
from circuitlib.core.model import Transformer
from circuitlib.core.surgery import prune
from circuitlib.discovery.edges.graph import (
    EdgeGraph,
    deterministic_mask,
    gates_from_edges,
    graph_for,
    make_replacement,
    masked_logits,
    remove_dead,
)
from circuitlib.discovery.edges.train import node_groups, train_edges
from circuitlib.discovery.greedy import Circuit, Decision, check_alpha, traversal
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
            z = layer.z(x)  # [B, s, H, E]
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
def metric(
    compiled: Compiled, model: Transformer, inputs: list[torch.Tensor], full: list[torch.Tensor], position: str = "all"
) -> float:
    """The mean divergence of `model` from the full model's outputs `full` over every input (batches by length)."""
    total = sum(float(divergence(compiled.info.categorical, f, model(t), position).sum()) for f, t in zip(full, inputs))
    return total / sum(len(t) for t in inputs)


@torch.no_grad()
def greedy(
    compiled: Compiled,
    patching: list[torch.Tensor],
    validation: list[torch.Tensor],
    alpha: float,
    *,
    ablation: str = "mean",
    order: str = "heads-ascending",
    position: str = "all",
) -> Circuit:
    """Algorithm 1 on a compiled model, heads and MLPs, with `divergence` as the metric (see module doc).

    patching:   batches [n_L, S_L] whose pooled per-position means replace ablated components (mean ablation)
    validation: batches on which the metric is measured
    """
    alpha, ablation = check_alpha(alpha), check_ablation(ablation)
    model, cfg = compiled.model, compiled.model.cfg
    means = pooled_means(model, patching) if ablation == "mean" else None
    if means is not None and means.z.shape[2] < max(t.shape[1] for t in validation):
        raise ValueError(
            "the validation inputs are longer than the patching inputs; the means cover too few "
            "positions: draw both from the same lengths"
        )
    full = [model(t) for t in validation]
    names = traversal(cfg.n_layers, cfg.n_heads, include_mlps=True, order=order)
    every = [head_name(l, h) for l in range(cfg.n_layers) for h in range(cfg.n_heads)] + [
        mlp_name(l) for l in range(cfg.n_layers)
    ]
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
    return [head_name(l, h) for l in range(cfg.n_layers) for h in range(cfg.n_heads)] + [
        mlp_name(l) for l in range(cfg.n_layers)
    ]


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
    return {
        "precision": hits / len(found) if found else 1.0,
        "recall": hits / len(truth) if truth else 1.0,
        "exact": found == truth,
    }


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
    return {
        "alphas": [p[0] for p in points],
        "tpr": [p[1] for p in points],
        "fpr": [p[2] for p in points],
        "auc": auc,
        "exact_alphas": exact,
    }


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
                for c in truth_components(compiled.info)
            }
    return out


# ---- Edge Pruning on compiled models -------------------------------------------------------------


def kl_over_outputs(full: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The authors' reverse loss: KL(full || out) over the output vocabulary at positions 1..,
    summed over positions, mean over inputs (outputs [B, S, V]; differentiable in `out`)."""
    return F.kl_div(
        F.log_softmax(out[:, 1:].float(), -1),
        F.log_softmax(full[:, 1:].float(), -1),
        log_target=True,
        reduction="batchmean",
    )


def kl_over_positions(full: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The authors' xproportion loss, quirk included: KL between log-softmaxes taken over the
    *positions* (BOS included) of the numerical output column, mean over inputs (outputs [B, S, 1])."""
    return F.kl_div(
        F.log_softmax(out[..., 0].float(), -1),
        F.log_softmax(full[..., 0].float(), -1),
        log_target=True,
        reduction="batchmean",
    )


EDGE_LOSSES = {"kl-outputs": kl_over_outputs, "kl-positions": kl_over_positions}
FIRST_POSITION_READ = {"kl-outputs": 1, "kl-positions": 0}  # the first output position each loss reads
EDGE_THRESHOLD = 0.005  # the authors' deterministic threshold (erazr_*.py: set_edge_threshold_for_deterministic)
EMBED_NAMES = {"tok_embed": "embed", "pos_embed": "pos"}  # graph writers -> the truth's names


@dataclass(frozen=True)
class EdgeSettings:
    """Edge Pruning settings for one compiled program (see the module docstring).

    Not `circuitlib.pipeline.edges.EdgeConfig`, which configures a training on a text task: a Tracr
    program's training reads every output position of every input of one length (`length`, `loss`),
    is read off at the authors' fixed deterministic threshold (`threshold`) rather than at the
    training's own sparsity, and follows the authors' per-program Tracr schedules; the knobs both
    share (target, lr, reg_lr, steps, warmups, batch size, ablation) are `train_edges`' own. Its
    fields name the saved runs (`edge_run_path`)."""

    length: int  # input tokens (without BOS); every input of this length is the data
    target: float  # edge target sparsity
    node_target: float | None  # node target sparsity (None: no node gates)
    lr: float  # gates' learning rate
    reg_lr: float  # the Lagrange multipliers'
    steps: int
    warmup: int  # steps over which the target ramps up
    lr_warmup: int
    loss: str  # a key of EDGE_LOSSES
    batch_size: int = 16
    threshold: float = EDGE_THRESHOLD
    ablation: str = "zero"


AUTHORS_SETTINGS = {
    "reverse": EdgeSettings(
        length=3,
        target=1.02,
        node_target=None,
        lr=0.03,
        reg_lr=0.001,
        steps=6000,
        warmup=5900,
        lr_warmup=1500,
        loss="kl-outputs",
    ),
    "xproportion": EdgeSettings(
        length=4,
        target=0.92,
        node_target=0.4,
        lr=1.0,
        reg_lr=1e-4,
        steps=720,
        warmup=640,
        lr_warmup=96,
        loss="kl-positions",
    ),
}


def edge_settings(compiled: Compiled) -> EdgeSettings:
    """The authors' settings for reverse and xproportion; for another program, reverse's recipe
    (categorical output) or xproportion's (numerical) on inputs one token shorter than max_seq_len."""
    if compiled.info.program in AUTHORS_SETTINGS:  # the built-in program's name ("reverse")
        return AUTHORS_SETTINGS[compiled.info.program]
    recipe = AUTHORS_SETTINGS["reverse" if compiled.info.categorical else "xproportion"]
    return EdgeSettings(**(asdict(recipe) | {"length": max(1, compiled.info.max_seq_len - 1)}))


def truth_edge_name(graph: EdgeGraph, e: int) -> str:
    """Edge e of `graph` named as the truth names it ("embed", "pos" for the two embedding writers)."""
    w, r = graph.edges[e]
    return f"{EMBED_NAMES.get(graph.writers[w], graph.writers[w])} -> {graph.readers[r]}"


def threshold_readoff(
    graph: EdgeGraph,
    gate_logits: torch.Tensor,
    node_gate_logits: torch.Tensor | None = None,
    threshold: float = EDGE_THRESHOLD,
) -> tuple[list[int], list[str]]:
    """The authors' Tracr read-off: (kept edges, closed nodes). An edge is kept if its deterministic
    gate (per parameter tensor, `deterministic_mask`) exceeds `threshold` and its writer's node gate
    (if any) does too (their `get_edges`); nothing else is removed."""
    kept = (deterministic_mask(gate_logits.cpu(), graph.groups) > threshold).nonzero().flatten().tolist()
    closed = []
    if node_gate_logits is not None:
        node_mask = deterministic_mask(node_gate_logits.cpu(), node_groups(graph))
        closed = [n for n, m in zip(graph.nodes, node_mask.tolist()) if not m > threshold]
    return [e for e in kept if graph.writers[graph.edges[e][0]] not in closed], closed


@torch.no_grad()
def objective_edges(compiled: Compiled, settings: EdgeSettings, atol: float = 1e-5) -> list[str]:
    """The structural edges whose single zero-removal moves an output that the settings' loss reads
    (positions from `FIRST_POSITION_READ` on) by more than `atol`, on some training input: what
    the training objective can see. The BOS position counts where the loss reads it."""
    from circuitlib.models.compiled import truth
    from circuitlib.tasks.compiled import CompiledTask

    info, model = compiled.info, compiled.model
    tokens = CompiledTask(compiled).inputs([settings.length])[0]
    first, full = FIRST_POSITION_READ[settings.loss], model(tokens)
    return [
        e
        for e in truth.structural_edges(info, model)
        if (truth.edge_forward(model, tokens, {e})[:, first:] - full[:, first:]).abs().max() > atol
    ]


def edge_truths(compiled: Compiled, settings: EdgeSettings | None = None) -> dict[str, list[str]]:
    """The true edge sets an edge circuit is scored against, by definition (see the module docstring)."""
    from circuitlib.models.compiled import truth
    from circuitlib.tasks.compiled import CompiledTask

    info, model = compiled.info, compiled.model
    return {
        "objective": objective_edges(compiled, settings or edge_settings(compiled)),
        "functional": truth.functional_edges(info, model, CompiledTask(compiled).inputs(), bos_plumbing=False),
        "structural": truth.structural_edges(info, model),
        "structural_without_bos": truth.structural_edges(info, model, bos_plumbing=False),
    }


def edge_pruning(compiled: Compiled, seed: int = 0, settings: EdgeSettings | None = None) -> dict:
    """Edge Pruning on a compiled program at `settings` (default `edge_settings`), read off and scored.

    -> {"settings", "seed", "found_edges" (truth's names), "closed_nodes", "found_components" (the
    heads and MLPs that reach the logits), "n_edges", "truth" and "scores" per truth definition
    (`edge_truths`, `edge_scores`), "accuracy" (on the training inputs, the authors' criterion),
    "accuracy_all_lengths" (every input of the input space), "final" (the last step's loss, sampled
    edge sparsity and multipliers), "seconds" (the training's wall clock)}
    """
    from circuitlib.tasks.compiled import CompiledTask, accuracy

    s = settings or edge_settings(compiled)
    if s.loss not in EDGE_LOSSES:
        raise ValueError(f"unknown loss {s.loss!r}; choose one of {', '.join(EDGE_LOSSES)}")
    model, task = compiled.model, CompiledTask(compiled)
    graph = graph_for(model)
    tokens = task.inputs([s.length])[0]
    repl = make_replacement(model, s.ablation, graph=graph)
    training = train_edges(
        model,
        tokens,
        repl,
        target_sparsity=s.target,
        steps=s.steps,
        node_target_sparsity=s.node_target,
        lr=s.lr,
        reg_lr=s.reg_lr,
        warmup=s.warmup,
        lr_warmup=s.lr_warmup,
        batch_size=s.batch_size,
        seed=seed,
        graph=graph,
        progress=False,
        all_positions=True,
        loss_fn=EDGE_LOSSES[s.loss],
    )
    kept, closed = threshold_readoff(graph, training.gate_logits, training.node_gate_logits, s.threshold)
    found = [truth_edge_name(graph, e) for e in kept]  # computation order
    gates = gates_from_edges(model, kept, graph)

    def circuit_accuracy(batches: list[torch.Tensor]) -> float:
        with torch.no_grad():
            right = sum(
                accuracy(compiled, model(t), masked_logits(model, t, gates, repl, graph=graph, all_positions=True))
                * len(t)
                for t in batches
            )
        return right / sum(len(t) for t in batches)

    truths = edge_truths(compiled, s)
    return {
        "program": compiled.name,
        "seed": seed,
        "settings": asdict(s),
        "n_edges": graph.n_edges,
        "found_edges": found,
        "closed_nodes": closed,
        "found_components": remove_dead(graph, kept, closed)[1],
        "truth": truths,
        "scores": {k: edge_scores(found, v) for k, v in truths.items()},
        "accuracy": circuit_accuracy([tokens]),
        "accuracy_all_lengths": circuit_accuracy(task.inputs()),
        "final": {k: training.curve[k][-1] for k in ("kl", "edge_sparsity", "lambda1", "lambda2")},
        "seconds": training.seconds,
    }


def edge_recovery_table(runs: list[dict]) -> list[dict]:
    """One row per program from `edge_pruning` results: seeds, exact-match rate per truth
    definition, mean precision and recall (objective truth), the rate of seeds whose edge set is
    the objective truth *and* whose accuracy is 100 % (the paper's claim), mean seconds."""
    rows = []
    for program in dict.fromkeys(r["program"] for r in runs):
        mine = [r for r in runs if r["program"] == program]
        n = len(mine)
        row = {"program": program, "seeds": [r["seed"] for r in mine]}
        for k in mine[0]["scores"]:
            row[f"exact_{k}"] = sum(r["scores"][k]["exact"] for r in mine) / n
        row |= {
            "precision": sum(r["scores"]["objective"]["precision"] for r in mine) / n,
            "recall": sum(r["scores"]["objective"]["recall"] for r in mine) / n,
            "recovered": sum(r["scores"]["objective"]["exact"] and r["accuracy"] == 1.0 for r in mine) / n,
            "accuracy_100": sum(r["accuracy"] == 1.0 for r in mine) / n,
            "accuracy_all_lengths_100": sum(r["accuracy_all_lengths"] == 1.0 for r in mine) / n,
            "seconds": sum(r["seconds"] for r in mine) / n,
        }
        rows.append(row)
    return rows


def edge_run_path(out_dir, program: str, seed: int, settings: EdgeSettings) -> Path:
    """Where a saved `edge_pruning` result goes, named after its settings: <out_dir>/edges-<program>-
    <ablation>-len<L>-target<T>[-nodes<N>]-lr<LR>-reglr<R>-steps<K>-bs<B>-<loss>-thr<t>-seed<S>.json"""
    s = settings
    name = f"edges-{program}-{s.ablation}-len{s.length}-target{s.target:g}"
    if s.node_target is not None:
        name += f"-nodes{s.node_target:g}"
    name += f"-lr{s.lr:g}-reglr{s.reg_lr:g}-steps{s.steps}-bs{s.batch_size}-{s.loss}-thr{s.threshold:g}-seed{seed}"
    return Path(out_dir) / f"{name}.json"


def save_edge_run(path, run: dict, provenance: dict) -> Path:
    """Write an `edge_pruning` result with its provenance as JSON, atomically."""
    from circuitlib.core.io import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(run | {"provenance": provenance}, indent=1)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load_edge_runs(directory) -> list[dict]:
    """Every saved `edge_pruning` result (edges-*.json) in `directory`, in name order."""
    return [json.loads(p.read_text()) for p in sorted(Path(directory).glob("edges-*.json"))]


def edges_among(compiled: Compiled, kept: list[str]) -> list[str]:
    """The edges of a node circuit: the structural edges (without BOS plumbing) whose ends are kept heads
    or MLPs, the embeddings or the logits (always there: a node method keeps or removes heads and MLPs only)."""
    from circuitlib.models.compiled import truth

    ends = {"embed", "pos", "logits"} | set(kept)
    return [
        e
        for e in truth.structural_edges(compiled.info, compiled.model, bos_plumbing=False)
        if e.split(" -> ")[0] in ends and truth.node_of(e.split(" -> ")[1]) in ends
    ]


GREEDY_ALPHA = 1e-3  # the CLI's default threshold (KL or squared error, every position but BOS)
INPUTS_PER_LENGTH = 100


def groundtruth_report(
    program: str, method: str = "greedy", seed: int = 0, alpha: float = GREEDY_ALPHA, ablation: str | None = None
) -> dict:
    """Compile (or load) `program`, run a method, and score it against the compiler's truth.

    greedy (ablation "mean" by default): up to INPUTS_PER_LENGTH inputs of every length, drawn with
    `seed`, for both the means and the metric. Truth edges are the functional ones without BOS
    plumbing (see `truth`); the edges a node method finds are the structural edges (without BOS
    plumbing) among its kept components.
    edges: `edge_pruning` at the authors' settings (zero ablation; `seed` seeds the training);
    truth edges are the objective ones (`objective_edges`), the scores against every definition
    are in "scores"; `alpha` is not used.
    """
    from circuitlib.models.compiled import truth
    from circuitlib.models.compiled.compile import load_compiled
    from circuitlib.tasks.compiled import CompiledTask, accuracy

    if method not in ("greedy", "edges"):
        raise ValueError(f"unknown method {method!r}; choose 'greedy' or 'edges'")
    if method == "edges" and ablation not in (None, "zero"):
        raise ValueError(
            f"Edge Pruning runs at its authors' Tracr settings, with zero ablation, not {ablation!r}; "
            "leave the ablation out"
        )
    alpha, ablation = check_alpha(alpha), check_ablation(ablation or ("zero" if method == "edges" else "mean"))
    compiled = load_compiled(program)
    if method == "edges":
        run = edge_pruning(compiled, seed)
        truth_edges = run["truth"]["objective"]
        return {
            "program": compiled.name,
            "method": method,
            "seed": seed,
            "ablation": ablation,
            "settings": run["settings"],
            "truth_components": truth.truth_components(compiled.info),
            "found_components": run["found_components"],
            "truth_edges": truth_edges,
            "found_edges": run["found_edges"],
            "closed_nodes": run["closed_nodes"],
            "exact": run["scores"]["objective"]["exact"],
            "edge_scores": run["scores"]["objective"],
            "scores": run["scores"],
            "truths": run["truth"],
            "accuracy": run["accuracy"],
            "accuracy_all_lengths": run["accuracy_all_lengths"],
            "seconds": run["seconds"],
        }
    task = CompiledTask(compiled)
    inputs = task.inputs(cap=INPUTS_PER_LENGTH, seed=seed)
    circuit = greedy(compiled, inputs, inputs, alpha, ablation=ablation)
    model, info = compiled.model, compiled.info
    true_components = truth.truth_components(info)
    structural = truth.structural_edges(info, model)
    found_edges = edges_among(compiled, circuit.kept)
    truth_edges = truth.functional_edges(info, model, task.inputs(), bos_plumbing=False)
    every = task.inputs()
    means = pooled_means(model, every) if ablation == "mean" else None
    pruned = prune(model, circuit.kept, ablation, means)
    acc = sum(accuracy(compiled, model(t), pruned(t)) * len(t) for t in every) / sum(len(t) for t in every)
    tpr, fpr = rates(circuit.kept, true_components, components_of(model))
    return {
        "program": compiled.name,
        "method": method,
        "seed": seed,
        "alpha": alpha,
        "ablation": ablation,
        "truth_components": true_components,
        "found_components": circuit.kept,
        "truth_edges": truth_edges,
        "found_edges": found_edges,
        "structural_edges": structural,
        "exact": set(circuit.kept) == set(true_components),
        "tpr": tpr,
        "fpr": fpr,
        "edge_scores": edge_scores(found_edges, truth_edges),
        "accuracy": acc,
    }
