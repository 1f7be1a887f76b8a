"""Edge Pruning, part two: train the gates, read off a circuit, make a standalone model of it.

Every edge (and, optionally, every node) gets a hard-concrete gate (Louizos et al. 2018) with a
learned location `gate_logits` (the authors' and Louizos et al.'s `log_alpha`). Each training step
samples the gates, runs the masked model of `circuitlib.discovery.edges.graph` on a batch of
prompts and minimises

    KL(f || masked) + lambda1 (t - s) + lambda2 (t - s)^2

where s is the edge sparsity and t the target, ramped up linearly over the first `warmup` steps.
The multipliers lambda1 and lambda2 are trained by gradient *ascent* (a Lagrangian), so the
sparsity is pushed to the target rather than traded off against the KL at a fixed price (the
authors write (s - t); with lambda1 free in sign that is the same). With
`node_target_sparsity`, node gates get their own Lagrangian term.

**The authors' recipe** (princeton-nlp/Edge-Pruning: `src/modeling/l0.py`, `modeling_fpt2.py`,
`modeling_fllama.py`, `src/prune/fpt2_ioi.py`, `src/eval/ioi.py`, `run_scripts/ioi_sweep.sh`),
the default:
- sparsity term (`sparsity_term="sampled"`): s = 1 - the mean of this step's *sampled* edge
  gates, as their `model_edge_sparsity`; "expected" (s = mean P(gate = 0), circuitlib's before
  issue 28) counts a gate whose deterministic value is 0 as partly open, so it stops short.
- targets may exceed 1 (their IOI sweep runs 0.94 to 1.1): s cannot reach them, so the
  multipliers keep pushing.
- AdamW with its default weight decay (0.01) at learning rate 0.8 for the gates and the
  multipliers alike, warmed up linearly over 1/15 of the steps (their 200 of 3000) and decayed
  linearly to 0; the weight decay pulls every gate logit back towards 0, which keeps gates from
  freezing open (chapter 06b shows a run without it).
- gradients clipped to norm 1.0 over all trained parameters (gates and multipliers together),
  as their Hugging Face Trainer does by default (`clip_grad_norm`).
- read-off (`binarize`, readout="authors"): the gates' deterministic values (`edges.deterministic_mask`)
  give the training's own sparsity, and a threshold on them is bisected until the binary circuit
  has it: the training, not the target, sets the circuit's size (`ReadOff.training_sparsity`).
  readout="forced-count" (circuitlib before issue 28) keeps (1 - target) x all edges instead.

**Deviations that remain**, and why:
- Their deterministic gates are computed per parameter tensor, and their tensors also hold
  entries for writers a reader cannot see (the [n_writers, n_heads] padding). Those take no
  gradient, weight decay draws them to gate_logits ~ 0, and each then adds ~0.17 to the tensor's
  expected number of zeros, so a few more low gates are zeroed there. circuitlib has no padding
  entries; its tensors (`EdgeGraph.groups`) hold the real edges only.
- Their evaluation counts every thresholded edge; circuitlib then drops edges of nodes that
  cannot reach the logits (`edges.remove_dead`, which changes no logit) and reports both counts
  (`ReadOff.n_thresholded`, and the circuit's edges).
- Their node gates are trained in every run, by the KL alone when the node loss is off (their
  IOI default), which keeps them open; circuitlib gates nodes only with `node_target_sparsity`.
  With the node loss off, their node loss is still added at multipliers that stay 0 (no
  optimizer), so it moves nothing, but its multipliers' gradients count in the clipped norm;
  circuitlib's clipped norm covers the edge gates and their two multipliers only.
- Their GPT-2 embedding nodes carry gates of their own; circuitlib's embedding writers have
  edge gates only.
- They evaluate the KL over the answer's tokens of a padded batch; circuitlib's prompts of a
  batch have one length and the KL is taken at the last position (the prediction).
- Batch size and data follow what this CPU affords (see `scripts/edge_runs.py`); theirs are
  batch 32 and 200 IOI prompts.

The binary circuit is cleared of dead nodes; the nodes that survive are a node circuit, and
`surgery.prune` turns it into a physically smaller model. That model keeps every edge among its
nodes, more than the edge circuit, so its KL differs from the edge circuit's; the difference is
measured and reported (`conversion_kl_change`). `reread` reads a stored training's gates off
again with another read-off, without training.

Seeded and reproducible: the gate noise and the initial `gate_logits` come from a generator seeded
with `seed` on the model's device, the batches from one on the cpu.

Resumable: with a `checkpoint_path`, the training saves its whole state every `checkpoint_every`
steps (gates, multipliers, both optimizers, both generators, the curve) and a training started
again with the same settings continues from it, to exactly the result of an uninterrupted run.
`edge_result` keeps finished runs as JSON files named after their settings, so that a long run
is data: computed once (`scripts/edge_runs.py`, in the background), read afterwards. Results
made before issue 28 keep their names and load with the settings they were made with
(`LEGACY_SETTINGS`; asked for with `circuitlib.pipeline.edges.EdgeConfig.legacy`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from circuitlib.core.io import atomic_write
from circuitlib.core.model import Transformer
from circuitlib.core.resumable import (  # noqa: F401
    ResultInProgress,
    load_checkpoint,
    result_lock,
    save_checkpoint,
    tokens_digest,
)
from circuitlib.discovery.edges.graph import (
    GATE_FILE_KEYS,
    EdgeGraph,
    Replacement,
    check_full,
    deterministic_gates,
    deterministic_mask,
    expected_closed,
    gates_from_edges,
    graph_for,
    kl_loss,
    masked_logits,
    node_circuit,
    remove_dead,
    sample_gates,
)
from circuitlib.version import __version__

# (ResultInProgress: edge_result raises it; importable from here)

RESULT_FILE = "edges.json"
# (sparsity_term, clip_grad_norm) of every training before issue 28: a checkpoint or result without
# these settings was made with them
LEGACY_TRAINING = ("expected", None)


MAX_SPARSITY = 2.0  # targets above 1 are the authors' way to push the sparsity (their sweeps reach 1.4)


def check_sparsity(value, name: str = "target sparsity") -> float:
    """A target sparsity: of edges in [0, MAX_SPARSITY) (targets above 1 push harder, as the authors' sweeps
    do), of nodes (a `name` that mentions nodes) in [0, 1)."""
    nodes = "node" in name
    top = 1.0 if nodes else MAX_SPARSITY
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, {top:g}), got {value!r}") from None
    if math.isnan(value) or not 0 <= value < top:
        why = (
            "the fraction of nodes removed"
            if nodes
            else ("the fraction of edges removed; the authors push with targets up to 1.4")
        )
        raise ValueError(f"{name} must be a number in [0, {top:g}) ({why}), got {value}; try e.g. 0.95")
    return value


def edges_memory(cfg, n: int, batch_size: int, seq_len: int, ablation: str) -> tuple[int, int]:
    """Bytes an Edge Pruning run needs besides the model (an estimate), as (fixed, per prompt of a split).

    Fixed: a training step's `(1 + L (H + 1) + 2 L (3H + 1)) B S D` floats (see `edges`). Per prompt:
    the readout's writer buffer and one layer's reader inputs over a whole split ([S, D] x
    (1 + L (H + 1) + 2 (3H + 1))), a forward pass's attention scores and MLP hidden ([H, S, S] x 2,
    [S, M] x 3), a few last-position logits ([V] x 6) and, with corrupted inputs, the replacement
    of two splits ([S, D] x 2 (1 + L (H + 1))). float32 = 4 bytes.
    """
    L, S, D, H, M, V = cfg.n_layers, seq_len, cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.d_vocab
    writers, readers = 1 + L * (H + 1), 3 * H + 1
    fixed = 4 * (writers + 2 * L * readers) * min(batch_size, n) * S * D
    per_prompt = 4 * (
        (writers + 2 * readers + (2 * writers if ablation == "corrupted" else 0)) * S * D
        + 2 * H * S * S
        + 3 * S * M
        + 6 * V
    )
    return fixed, per_prompt


SPARSITY_TERMS = ("sampled", "expected")


@contextlib.contextmanager
def frozen_weights(model: Transformer):
    """The model's weights take no gradient while the gates train."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


@dataclass
class EdgeTraining:
    """Trained gate locations and the training curve (one entry per step)."""

    gate_logits: torch.Tensor  # [n_edges]
    node_gate_logits: torch.Tensor | None  # [n_nodes] or None (no node gates)
    curve: dict = field(default_factory=dict)  # step, loss, kl, edge_sparsity, target, lambda1, lambda2, ...
    seconds: float = 0.0  # wall clock, checkpointed runs included
    cpu_seconds: float | None = None  # CPU time of the training; None if it resumed from a checkpoint
    # that predates CPU-time records


def train_edges(
    model: Transformer,
    tokens: torch.Tensor,
    repl: Replacement,
    *,
    target_sparsity: float,
    steps: int,
    node_target_sparsity: float | None = None,
    lr: float = 0.8,
    reg_lr: float = 0.8,
    warmup: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    init: float = 10.0,
    weight_decay: float = 0.01,
    lr_warmup: int | None = None,
    sparsity_term: str = "sampled",
    clip_grad_norm: float | None = 1.0,
    graph: EdgeGraph | None = None,
    progress: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    all_positions: bool = False,
    loss_fn=kl_loss,
) -> EdgeTraining:
    """Learn hard-concrete gates on `tokens` [n, S] (the full model `model` is frozen).

    repl:             the replacement (`edges.make_replacement`); a corrupted one is paired row by row
    warmup:           steps over which the target ramps from 0 (default: 5/6 of `steps`, as the authors)
    batch_size:       prompts per step (all of them if fewer)
    init:             initial gate_logits (the authors' 10: every gate open, its samples almost always 1)
    weight_decay:     AdamW's decoupled weight decay, for the gates and the multipliers (the authors' 0.01)
    sparsity_term:    "sampled" (the authors'): s = 1 - the mean of this step's sampled edge gates;
                      "expected": s = the mean P(edge gate = 0) (circuitlib before issue 28)
    clip_grad_norm:   the gradients of the gates and the multipliers together are clipped to this
                      norm before each step (the authors' Hugging Face trainer: 1.0); None: not clipped
    graph:            the edge graph (default `edges.graph_for(model)`); `repl` must be made for it
    all_positions:    train on the outputs at every position [B, S, V] (programs that output a
                      sequence) instead of the last position's [B, V]
    loss_fn:          loss_fn(full outputs, masked outputs) -> scalar, differentiable in the second
                      (default `edges.kl_loss`, the last position's KL); its name is part of the
                      checkpoint's settings when it is not the default
    lr_warmup:        steps over which the learning rates rise linearly from 0, after which they fall
                      linearly to 0 at the last step (default: 1/15 of `steps`, as the authors' 200 of 3000)
    checkpoint_path:  a file for the training's state, written (atomically) every `checkpoint_every`
                      steps; if it exists at the start, the training continues from it (its settings
                      must be these, or a ValueError names the difference); deleted at the end.
                      Resumed or not, the gates and the curve are the same to the bit; `seconds`
                      adds up the time of every part.
    """
    target = check_sparsity(target_sparsity)
    node_target = None if node_target_sparsity is None else check_sparsity(node_target_sparsity, "node target sparsity")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    lr_warmup = round(steps / 15) if lr_warmup is None else lr_warmup
    if not isinstance(lr_warmup, int) or not 0 <= lr_warmup < steps:
        raise ValueError(
            f"lr_warmup must be a whole number of steps in [0, steps) = [0, {steps}), got {lr_warmup!r}; "
            f"the default is 1/15 of the steps ({round(steps / 15)})"
        )
    if sparsity_term not in SPARSITY_TERMS:
        raise ValueError(f"unknown sparsity_term {sparsity_term!r}; choose one of {', '.join(SPARSITY_TERMS)}")
    if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float)) and clip_grad_norm > 0):
        raise ValueError(
            f"clip_grad_norm must be a number > 0 or None (no clipping), got {clip_grad_norm!r}; the authors' is 1.0"
        )
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}; the authors' is 0.01")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(
            f"checkpoint_every must be a positive int (steps between checkpoints), got {checkpoint_every!r}"
        )
    check_full(model)
    warmup = max(1, round(steps * 5 / 6) if warmup is None else warmup)
    g, dev = graph or graph_for(model), model.W_E.device
    tokens = tokens.to(dev)
    n = len(tokens)
    if repl.per_prompt and repl.values.shape[1] != n:
        raise ValueError(f"the corrupted replacement has {repl.values.shape[1]} prompts, the training set {n}")
    gen = torch.Generator(device=dev).manual_seed(seed)
    batch_gen = torch.Generator(device="cpu").manual_seed(seed)
    gate_logits = (init + 0.01 * torch.randn(g.n_edges, generator=gen, device=dev)).requires_grad_(True)
    params = [gate_logits]
    node_gate_logits = None
    if node_target is not None:
        node_gate_logits = (init + 0.01 * torch.randn(len(g.nodes), generator=gen, device=dev)).requires_grad_(True)
        params.append(node_gate_logits)
        edge_writer = torch.tensor([w for w, _ in g.edges], device=dev)
    lambdas = torch.zeros(4, device=dev, requires_grad=True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    reg_opt = torch.optim.AdamW([lambdas], lr=reg_lr, weight_decay=weight_decay, maximize=True)

    def lr_factor(step: int) -> float:
        """The learning rates' multiplier at (0-based) `step`: up linearly, then down linearly to 0."""
        if step < lr_warmup:
            return step / lr_warmup
        return (steps - step) / max(1, steps - lr_warmup)

    def sparsities(gate_logits, node_gate_logits, gates, node_gates):
        """(edge sparsity, node sparsity or None) that the Lagrangian pushes to the targets."""
        if sparsity_term == "sampled":  # the authors': 1 - mean of the sampled gates
            return 1 - gates.mean(), None if node_gates is None else 1 - node_gates.mean()
        q_edge = expected_closed(gate_logits)  # [n_edges] P(edge gate = 0)
        if node_gate_logits is None:
            return q_edge.mean(), None
        q_node = expected_closed(node_gate_logits)
        q_writer = torch.cat([torch.zeros(1, device=dev), q_node])[edge_writer]  # the embedding has no gate
        return (q_edge + q_writer - q_edge * q_writer).mean(), q_node.mean()  # P(edge or writer closed)

    with torch.no_grad():
        full = model(tokens) if all_positions else model(tokens, last_only=True)
    curve = {k: [] for k in ("step", "loss", "kl", "edge_sparsity", "target", "lambda1", "lambda2", "lr")}
    if node_target is not None:
        curve |= {"node_sparsity": [], "node_target": []}
    first_step, seconds_before, cpu_before = 0, 0.0, 0.0
    settings = {
        "model": model.cfg.name,
        "replacement": repl.kind,
        "device": dev.type,
        "target_sparsity": target,
        "steps": steps,
        "lr": lr,
        "reg_lr": reg_lr,
        "warmup": warmup,
        "batch_size": batch_size,
        "seed": seed,
        "init": init,
        "node_target_sparsity": node_target,
        "n_prompts": n,
        "weight_decay": weight_decay,
        "lr_warmup": lr_warmup,
        "tokens": tokens_digest(tokens),
    }
    legacy_graph = graph_for(model, "per-query-head", False)
    if (sparsity_term, clip_grad_norm) != LEGACY_TRAINING or g is not legacy_graph:  # older checkpoints resume
        settings |= {"sparsity_term": sparsity_term, "clip_grad_norm": clip_grad_norm, "n_edges": g.n_edges}
    if all_positions or loss_fn is not kl_loss:
        settings |= {"all_positions": all_positions, "loss": loss_fn.__name__}
    saved = load_checkpoint(checkpoint_path, settings)
    if saved is not None:
        with torch.no_grad():
            gate_logits.copy_(saved[GATE_FILE_KEYS["gate_logits"]])
            lambdas.copy_(saved["lambdas"])
            if node_gate_logits is not None:
                node_gate_logits.copy_(saved[GATE_FILE_KEYS["node_gate_logits"]])
        opt.load_state_dict(saved["opt"])
        reg_opt.load_state_dict(saved["reg_opt"])
        gen.set_state(saved["gen"])
        batch_gen.set_state(saved["batch_gen"])
        curve, first_step, seconds_before = saved["curve"], saved["step"], saved["seconds"]
        cpu_before = saved.get("cpu_seconds")
    started, cpu_started = time.perf_counter(), time.process_time()

    def cpu_so_far() -> float | None:
        return None if cpu_before is None else cpu_before + time.process_time() - cpu_started

    def checkpoint(steps_done: int) -> None:
        save_checkpoint(
            checkpoint_path,
            settings,
            {
                "step": steps_done,
                GATE_FILE_KEYS["gate_logits"]: gate_logits.detach().cpu(),
                GATE_FILE_KEYS["node_gate_logits"]: (
                    None if node_gate_logits is None else node_gate_logits.detach().cpu()
                ),
                "lambdas": lambdas.detach().cpu(),
                "opt": opt.state_dict(),
                "reg_opt": reg_opt.state_dict(),
                "gen": gen.get_state(),
                "batch_gen": batch_gen.get_state(),
                "curve": curve,
                "seconds": seconds_before + time.perf_counter() - started,
                "cpu_seconds": cpu_so_far(),
            },
        )

    bar = tqdm(
        range(first_step, steps),
        initial=first_step,
        total=steps,
        desc=f"edge pruning (target {target:g})",
        disable=not progress,
    )
    with frozen_weights(model):
        for step in bar:
            rows = None
            if n > batch_size:
                rows = torch.randperm(n, generator=batch_gen, device="cpu")[:batch_size].to(dev)
            batch = tokens if rows is None else tokens[rows]
            ramp = min(1.0, (step + 1) / warmup)
            gates = sample_gates(gate_logits, gen)
            node_gates = None if node_gate_logits is None else sample_gates(node_gate_logits, gen)
            logits = masked_logits(
                model,
                batch,
                gates,
                repl,
                node_gates,
                rows=rows if repl.per_prompt else None,
                graph=g,
                all_positions=all_positions,
            )
            kl = loss_fn(full if rows is None else full[rows], logits)
            s_edge, s_node = sparsities(gate_logits, node_gate_logits, gates, node_gates)
            gap = ramp * target - s_edge
            lagrangian = lambdas[0] * gap + lambdas[1] * gap**2
            if node_gate_logits is not None:
                gap_n = ramp * node_target - s_node
                lagrangian = lagrangian + lambdas[2] * gap_n + lambdas[3] * gap_n**2
            loss = kl + lagrangian
            opt.zero_grad()
            reg_opt.zero_grad()
            loss.backward()
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params + [lambdas], clip_grad_norm)
            for optimizer, base in ((opt, lr), (reg_opt, reg_lr)):
                for group in optimizer.param_groups:
                    group["lr"] = base * lr_factor(step)
            opt.step()
            reg_opt.step()
            sparsity = s_edge.item()
            for k, v in (
                ("step", step + 1),
                ("loss", loss.item()),
                ("kl", kl.item()),
                ("edge_sparsity", sparsity),
                ("target", ramp * target),
                ("lambda1", lambdas[0].item()),
                ("lambda2", lambdas[1].item()),
                ("lr", lr * lr_factor(step)),
            ):
                curve[k].append(v)
            if node_gate_logits is not None:
                curve["node_sparsity"].append(s_node.item())
                curve["node_target"].append(ramp * node_target)
            bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.4f}", sparsity=f"{sparsity:.3f}")
            if checkpoint_path is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                checkpoint(step + 1)
    bar.close()
    if checkpoint_path is not None:
        Path(checkpoint_path).unlink(missing_ok=True)
    return EdgeTraining(
        gate_logits.detach(),
        None if node_gate_logits is None else node_gate_logits.detach(),
        curve,
        seconds_before + time.perf_counter() - started,
        cpu_so_far(),
    )


def step_flops(model: Transformer, graph: EdgeGraph, batch: int, seq: int) -> dict:
    """Matrix-product FLOPs (2 per multiply-add) of one `train_edges` step on `batch` prompts of
    `seq` tokens: {"forward", "backward", "total", "parts": {op: (forward, backward)}}. Elementwise
    work (norms, softmax, gates) is not counted; the full model's logits and the replacements are
    computed once before the steps, not per step. Per op (B batch, S seq, D d_model, E d_head,
    H heads, K key/value readers per layer, W_l writers before layer l, F d_mlp, V vocabulary):

    masked sums  2 (H + 2K) W_l BSD + 2 (W_l + H) BSD per layer, 2 n_writers BD for the logits;
                 backward twice (the gates' gradient and the writers'), but once for layer 0's
                 attention readers (they read only the embeddings, which take no gradient)
    q, k, v      2 BSDE (H + 2K) per layer (K = H: every query head its own K/V projection);
                 backward once (the weights are frozen: the inputs' gradient only)
    attention    4 BHS^2 E per layer (scores and weighted values, the causal half included, as
                 the kernels compute it); backward 8 BHS^2 E (the gradients of q, k and v)
    out proj.    2 BHSED per layer (each head separately); backward once
    MLP          2 BSDF per weight matrix (2 in GPT-2, 3 in Llama) per layer; backward once
    unembedding  2 BDV at the last position; backward once
    """
    cfg = model.cfg
    B, S, D, E, H, K = batch, seq, cfg.d_model, cfg.d_head, cfg.n_heads, graph.n_kv_readers
    n_mlp = 2 if model.layers[0].W_gate is None else 3
    N = B * S * D
    parts = {"masked sums": 0, "q k v": 0, "attention": 0, "out projection": 0, "mlp": 0}
    for l in range(cfg.n_layers):
        W = graph._attn[l][1]
        parts["masked sums"] += 2 * (H + 2 * K) * W * N + 2 * (W + H) * N
        parts["q k v"] += 2 * N * E * (H + 2 * K)
        parts["attention"] += 4 * B * H * S * S * E
        parts["out projection"] += 2 * B * H * S * E * D
        parts["mlp"] += n_mlp * 2 * N * cfg.d_mlp
    parts["masked sums"] += 2 * len(graph.writers) * B * D
    parts["unembedding"] = 2 * B * D * cfg.d_vocab
    backward = {"masked sums": 2, "attention": 2}
    parts = {k: (v, v * backward.get(k, 1)) for k, v in parts.items()}
    first = 2 * (H + 2 * K) * graph._attn[0][1] * N  # layer 0's attention readers: no writer gradient
    parts["masked sums"] = (parts["masked sums"][0], parts["masked sums"][1] - first)
    forward = sum(f for f, _ in parts.values())
    back = sum(b for _, b in parts.values())
    return {"forward": forward, "backward": back, "total": forward + back, "parts": parts}


READOUTS = ("authors", "forced-count")


@dataclass
class ReadOff:
    """A binary circuit read off trained gates.

    edges, nodes:       the circuit after dead-node removal (what reaches the logits; exact)
    threshold:          the gate_logits above which an edge was kept (inf: none kept)
    training_sparsity:  the gates' own deterministic edge sparsity, 1 - mean `deterministic_mask`
                        (the size the training chose; None for the forced count)
    n_thresholded:      edges kept by the threshold, before closed writers and dead nodes are
                        dropped (the authors' count of the circuit's edges)
    """

    edges: list[int]
    nodes: list[str]
    threshold: float
    training_sparsity: float | None
    n_thresholded: int


def _bisect_threshold(mask: torch.Tensor, sparsity: float) -> float:
    """The authors' search (Edge-Pruning src/eval/ioi.py): bisect t in [0, 1] to a width of 1e-5 so
    that 1 - mean(mask > t) meets `sparsity`; the last midpoint tried is the threshold."""
    lo, hi = 0.0, 1.0
    t = 0.5
    while hi - lo > 1e-5:
        t = (lo + hi) / 2
        if 1 - (mask > t).float().mean().item() > sparsity:
            hi = t
        else:
            lo = t
    return t


def node_groups(graph: EdgeGraph) -> list[tuple[int, int]]:
    """The authors' node-gate tensors over `graph.nodes`: per layer its heads, then its MLP."""
    groups, start = [], 0
    for _ in range(graph.n_layers):
        groups += [(start, graph.n_heads), (start + graph.n_heads, 1)]
        start += graph.n_heads + 1
    return groups


def binarize(
    graph: EdgeGraph,
    gate_logits: torch.Tensor,
    target_sparsity: float | None = None,
    node_gate_logits: torch.Tensor | None = None,
    *,
    readout: str = "authors",
) -> ReadOff:
    """The binary circuit of trained gates.

    readout="authors" (default; Edge-Pruning src/eval/ioi.py): the gates' deterministic values
      (`edges.deterministic_mask`, per parameter tensor) give the training's own edge sparsity
      s = 1 - their mean; a threshold t on those values is bisected until 1 - mean(mask > t)
      meets s, and the edges with mask > t are kept. `target_sparsity` is not used: the training
      sets the size. With node gates, the nodes are read off the same way (their own sparsity,
      their own threshold) and edges out of a closed node are dropped (their effective sparsity).
    readout="forced-count" (circuitlib before issue 28): edges ranked by gate_logits; the largest k
      whose top-k edges leave at most (1 - target) x n_edges edges after dead-node removal
      (bisection: the surviving set only grows with k); nodes whose deterministic gate
      (`edges.deterministic_gates`) is below 1/2 are closed.
    Either way the result is then cleared of dead nodes (`edges.remove_dead`, exact).
    """
    check_readout(readout, None if target_sparsity is None else check_sparsity(target_sparsity))
    if readout == "forced-count":
        return _forced_count(graph, gate_logits, target_sparsity, node_gate_logits)
    la = gate_logits.detach().float().cpu()
    mask = deterministic_mask(la, graph.groups)
    own = 1 - mask.mean().item()
    t = _bisect_threshold(mask, own)
    kept = torch.nonzero(mask > t).flatten()
    n_thresholded = len(kept)
    closed = []
    if node_gate_logits is not None:
        node_mask = deterministic_mask(node_gate_logits.detach().float().cpu(), node_groups(graph))
        node_t = _bisect_threshold(node_mask, 1 - node_mask.mean().item())
        closed = [n for n, m in zip(graph.nodes, node_mask.tolist()) if not m > node_t]
    edges, nodes = remove_dead(graph, kept.tolist(), closed)
    threshold = float(la[kept].min()) if len(kept) else float("inf")
    return ReadOff(edges, nodes, threshold, own, n_thresholded)


def _forced_count(
    graph: EdgeGraph, gate_logits: torch.Tensor, target_sparsity: float | None, node_gate_logits: torch.Tensor | None
) -> ReadOff:
    target = check_sparsity(target_sparsity)
    closed = []
    if node_gate_logits is not None:
        det = deterministic_gates(node_gate_logits)
        closed = [n for n, d in zip(graph.nodes, det.tolist()) if d < 0.5]
    order = torch.argsort(-gate_logits.detach().float().cpu(), stable=True).tolist()
    want = math.floor((1 - target) * graph.n_edges + 1e-9)

    def survivors(k):
        return remove_dead(graph, order[:k], closed)

    lo, hi = 0, graph.n_edges  # survivors(lo) fits; find the largest k that fits
    if len(survivors(hi)[0]) <= want:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(survivors(mid)[0]) <= want:
            lo = mid
        else:
            hi = mid
    edges, nodes = survivors(lo)
    threshold = float(gate_logits[order[lo - 1]]) if lo > 0 else float("inf")
    return ReadOff(edges, nodes, threshold, None, lo)


@dataclass
class EdgeCircuit:
    """One Edge Pruning result: settings, kept edges and nodes, training curve, metrics.

    edges: kept edges as 'WRITER -> READER' ('embed -> 0.1.q', '0.3 -> MLP 1', 'MLP 2 -> logits')
    nodes: kept heads 'L.H' and MLPs 'MLP L' (those that reach the logits)
    """

    settings: dict
    n_edges_total: int
    edges: list[str]
    nodes: list[str]
    threshold: float
    curve: dict
    metrics: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return 1 - len(self.edges) / self.n_edges_total

    @property
    def kept_heads(self) -> list[str]:
        return [n for n in self.nodes if not n.startswith("MLP")]

    @property
    def kept_mlps(self) -> list[int]:
        return [int(n[4:]) for n in self.nodes if n.startswith("MLP")]

    def to_dict(self) -> dict:
        return {
            "circuitlib_version": __version__,
            **asdict(self),
            "n_edges": len(self.edges),
            "sparsity": self.sparsity,
            "kept_heads": self.kept_heads,
            "kept_mlps": self.kept_mlps,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "EdgeCircuit":
        """A result of any circuitlib version: settings an older file lacks get the value that
        older version used (`LEGACY_SETTINGS`)."""
        d = dict(d, settings={**LEGACY_SETTINGS, **d["settings"]})
        return cls(
            **{k: d[k] for k in ("settings", "n_edges_total", "edges", "nodes", "threshold", "curve", "metrics")}
        )

    def graph(self, model: Transformer) -> EdgeGraph:
        """The edge graph this result was computed on (checked against the model)."""
        st = self.settings
        if st["model"] != model.cfg.name:
            raise ValueError(
                f"this edge result was computed on {st['model']!r}, not on {model.cfg.name!r}; load that model"
            )
        graph = graph_for(model, st["kv_readers"], st["split_embedding"])
        if graph.n_edges != self.n_edges_total:
            raise ValueError(
                f"this edge result has {self.n_edges_total:,} edges in all, {model.cfg.name!r}'s "
                f"graph {graph.n_edges:,}"
            )
        return graph

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write the result as JSON atomically (a temporary file renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2)
        return atomic_write(path, lambda p: Path(p).write_text(text))

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> "EdgeCircuit":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def gates(self, model: Transformer) -> torch.Tensor:
        return gates_from_edges(model, self.edges, self.graph(model))


@torch.no_grad()
def edge_logits(
    model: Transformer,
    tokens: torch.Tensor,
    gates: torch.Tensor,
    repl: Replacement,
    batch_size: int = 64,
    graph: EdgeGraph | None = None,
    all_positions: bool = False,
) -> torch.Tensor:
    """Last-position logits [n, V] (every position's [n, S, V] if `all_positions`) of the masked
    model, in batches (rows paired for corrupted)."""
    dev = model.W_E.device
    tokens = tokens.to(dev)
    out = []
    for start in range(0, len(tokens), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(tokens)), device=dev)
        out.append(
            masked_logits(
                model,
                tokens[rows],
                gates,
                repl,
                rows=rows if repl.per_prompt else None,
                graph=graph,
                all_positions=all_positions,
            )
        )
    return torch.cat(out)


def corrupt(split) -> torch.Tensor:
    """Corrupted prompts [n, S] for a task split (or its tokens): the task's own counterfactual
    prompts where it has them (`TaskSplit.corrupted`: the same sentence with other names, as the
    authors'), else prompt i paired with prompt i - 1 of the same split (another prompt of the
    same template, with other names, letters or years)."""
    own = getattr(split, "corrupted", None)
    if own is not None:
        return own
    tokens = split if isinstance(split, torch.Tensor) else split.tokens
    return tokens.roll(1, dims=0)


def check_readout(readout: str, target: float | None) -> None:
    if readout not in READOUTS:
        raise ValueError(f"unknown readout {readout!r}; choose one of {', '.join(READOUTS)}")
    if readout == "forced-count" and (target is None or target >= 1):
        raise ValueError(
            f"the forced-count readout keeps (1 - target) x all edges: it needs a target below 1, got "
            f"{target}; use readout='authors' (the training's own sparsity)"
        )


LEGACY_SETTINGS = {
    "sparsity_term": "expected",
    "clip_grad_norm": None,
    "readout": "forced-count",
    "kv_readers": "per-query-head",
    "split_embedding": False,
}


def standalone_model(result: EdgeCircuit, model: Transformer, tokenizer) -> Transformer:
    """The standalone pruned model of an edge result, rebuilt without training: the full `model`
    (the one the result was computed on) pruned to the result's nodes, removed nodes replaced as
    in `run_edges` (by their means over the patching split of the result's prompts, or by zero)."""
    from circuitlib.core.ablation import mean_activations
    from circuitlib.core.surgery import prune
    from circuitlib.tasks import get_task

    settings = result.settings
    result.graph(model)  # the model it was computed on
    data = get_task(settings["task"]).generate(tokenizer, n=settings["n"], seed=settings["seed"])
    means = mean_activations(model, data.patching.tokens.to(model.W_E.device))
    return prune(model, node_circuit(result.nodes), settings["standalone_scheme"], means)
