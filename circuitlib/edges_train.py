"""Edge Pruning, part two: train the gates, read off a circuit, make a standalone model of it.

Every edge (and, optionally, every node) gets a hard-concrete gate (Louizos et al. 2018) with a
learned location `log_alpha`. Each training step samples the gates, runs the masked model of
`edges.py` on a batch of prompts and minimises

    KL(f || masked) + lambda1 (t - s) + lambda2 (t - s)^2

where s is the expected edge sparsity (1 - the mean probability that a gate is open) and t the
target sparsity, ramped up linearly over the first `warmup` steps. The multipliers lambda1 and
lambda2 are trained by gradient *ascent* (a Lagrangian), so the sparsity is pushed to the target
rather than traded off against the KL at a fixed price. With `node_target_sparsity`, node gates
get their own Lagrangian term and an edge counts as open only if its writer's node is too.

The optimizer is the authors': AdamW with its default weight decay (0.01) at learning rate 0.8
for the gates and the multipliers alike, the rate warmed up linearly over the first 1/15 of the
steps (their 200 of 3000) and decayed linearly to 0 at the last. The weight decay matters: it
pulls every `log_alpha` back towards 0. Without it (plain Adam at a constant rate, as circuitlib
trained before), a gate the KL wants open climbs until its samples are always exactly 1 (no KL
gradient) and 1 - P(open) rounds to 0 in float32 (no sparsity gradient): it is frozen open. On
the stand-in (123,211 edges), at step 1500 of 3000, 53 % of the gates sat frozen and the expected
sparsity had stalled at 0.44 while the target ramped past 0.5 (chapter 06b shows that run). The
sparsity is also computed from P(closed) directly (`edges.expected_closed`), which keeps its
gradient where 1 - P(open) would round to 0.

After training, the gates are made deterministic and binary: edges are ranked by `log_alpha`,
and a search over the number kept picks the largest circuit whose edges, *after dead-node
removal* (`edges.remove_dead`: nodes that reach the logits by no kept edge are dropped with all
their edges, which changes no logit), number at most (1 - target) x all edges. The nodes that
survive are a node circuit; `surgery.prune` turns it into a physically smaller model. That model
keeps every edge among its nodes, more than the edge circuit, so its KL differs from the edge
circuit's; the difference is measured and reported (`conversion_kl_change`).

Seeded and reproducible: the gate noise and the initial `log_alpha` come from a generator seeded
with `seed` on the model's device, the batches from one on the cpu.

Resumable: with a `checkpoint_path`, the training saves its whole state every `checkpoint_every`
steps (gates, multipliers, both optimizers, both generators, the curve) and a training started
again with the same settings continues from it, to exactly the result of an uninterrupted run.
`edge_result` keeps finished runs as JSON files named after their settings, so that a long run
is data: computed once (`scripts/edge_runs.py`, in the background), read afterwards.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .edges import (REPLACEMENTS, EdgeGraph, Replacement, check_full, deterministic_gates,
                    edges_among, expected_closed, gates_from_edges, graph_for, kl_loss, make_replacement,
                    masked_logits, node_circuit, remove_dead, sample_gates)
from .metrics import accuracy, kl_divergence
from .model import Transformer, atomic_write
from .resumable import ResultInProgress, load_checkpoint, result_lock, save_checkpoint, tensor_digest  # noqa: F401
                                      # (ResultInProgress: edge_result raises it; importable from here)

RESULT_FILE = "edges.json"


def check_sparsity(value, name: str = "target sparsity") -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if math.isnan(value) or not 0 <= value < 1:
        removed = "nodes" if "node" in name else "edges"     # a node target is a fraction of the nodes
        raise ValueError(f"{name} must be a number in [0, 1) (the fraction of {removed} removed), got {value}; "
                         "try e.g. 0.95")
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
    per_prompt = 4 * ((writers + 2 * readers + (2 * writers if ablation == "corrupted" else 0)) * S * D
                      + 2 * H * S * S + 3 * S * M + 6 * V)
    return fixed, per_prompt


@contextlib.contextmanager
def _frozen(model: Transformer):
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

    log_alpha: torch.Tensor                   # [n_edges]
    node_log_alpha: torch.Tensor | None       # [n_nodes] or None (no node gates)
    curve: dict = field(default_factory=dict)  # step, loss, kl, edge_sparsity, target, lambda1, lambda2, ...
    seconds: float = 0.0                      # wall clock, checkpointed runs included
    cpu_seconds: float | None = None          # CPU time of the training; None if it resumed from a checkpoint
                                              # that predates CPU-time records


def train_edges(model: Transformer, tokens: torch.Tensor, repl: Replacement, *, target_sparsity: float,
                steps: int, node_target_sparsity: float | None = None, lr: float = 0.8, reg_lr: float = 0.8,
                warmup: int | None = None, batch_size: int = 32, seed: int = 0, init: float = 10.0,
                weight_decay: float = 0.01, lr_warmup: int | None = None, progress: bool = True,
                checkpoint_path: str | os.PathLike | None = None, checkpoint_every: int = 50) -> EdgeTraining:
    """Learn hard-concrete gates on `tokens` [n, S] (the full model `model` is frozen).

    repl:             the replacement (`edges.make_replacement`); a corrupted one is paired row by row
    warmup:           steps over which the target ramps from 0 (default: 5/6 of `steps`, as the authors)
    batch_size:       prompts per step (all of them if fewer)
    init:             initial log_alpha (the authors' 10: every gate open, its samples almost always 1)
    weight_decay:     AdamW's decoupled weight decay, for the gates and the multipliers (the authors' 0.01)
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
        raise ValueError(f"lr_warmup must be a whole number of steps in [0, steps) = [0, {steps}), got {lr_warmup!r}; "
                         f"the default is 1/15 of the steps ({round(steps / 15)})")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}; the authors' is 0.01")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int (steps between checkpoints), "
                         f"got {checkpoint_every!r}")
    check_full(model)
    warmup = max(1, round(steps * 5 / 6) if warmup is None else warmup)
    g, dev = graph_for(model), model.W_E.device
    tokens = tokens.to(dev)
    n = len(tokens)
    if repl.per_prompt and repl.values.shape[1] != n:
        raise ValueError(f"the corrupted replacement has {repl.values.shape[1]} prompts, the training set {n}")
    gen = torch.Generator(device=dev).manual_seed(seed)
    batch_gen = torch.Generator(device="cpu").manual_seed(seed)
    log_alpha = (init + 0.01 * torch.randn(g.n_edges, generator=gen, device=dev)).requires_grad_(True)
    params = [log_alpha]
    node_log_alpha = None
    if node_target is not None:
        node_log_alpha = (init + 0.01 * torch.randn(len(g.nodes), generator=gen, device=dev)).requires_grad_(True)
        params.append(node_log_alpha)
        edge_writer = torch.tensor([w for w, _ in g.edges], device=dev)
    lambdas = torch.zeros(4, device=dev, requires_grad=True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    reg_opt = torch.optim.AdamW([lambdas], lr=reg_lr, weight_decay=weight_decay, maximize=True)

    def lr_factor(step: int) -> float:
        """The learning rates' multiplier at (0-based) `step`: up linearly, then down linearly to 0."""
        if step < lr_warmup:
            return step / lr_warmup
        return (steps - step) / max(1, steps - lr_warmup)

    with torch.no_grad():
        full = model(tokens, last_only=True)
    curve = {k: [] for k in ("step", "loss", "kl", "edge_sparsity", "target", "lambda1", "lambda2", "lr")}
    if node_target is not None:
        curve |= {"node_sparsity": [], "node_target": []}
    first_step, seconds_before, cpu_before = 0, 0.0, 0.0
    settings = {"model": model.cfg.name, "replacement": repl.kind, "device": dev.type, "target_sparsity": target,
                "steps": steps, "lr": lr, "reg_lr": reg_lr, "warmup": warmup, "batch_size": batch_size,
                "seed": seed, "init": init, "node_target_sparsity": node_target, "n_prompts": n,
                "weight_decay": weight_decay, "lr_warmup": lr_warmup, "tokens": tensor_digest(tokens)}
    saved = load_checkpoint(checkpoint_path, settings)
    if saved is not None:
        with torch.no_grad():
            log_alpha.copy_(saved["log_alpha"])
            lambdas.copy_(saved["lambdas"])
            if node_log_alpha is not None:
                node_log_alpha.copy_(saved["node_log_alpha"])
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
        save_checkpoint(checkpoint_path, settings, {
            "step": steps_done, "log_alpha": log_alpha.detach().cpu(),
            "node_log_alpha": None if node_log_alpha is None else node_log_alpha.detach().cpu(),
            "lambdas": lambdas.detach().cpu(), "opt": opt.state_dict(), "reg_opt": reg_opt.state_dict(),
            "gen": gen.get_state(), "batch_gen": batch_gen.get_state(), "curve": curve,
            "seconds": seconds_before + time.perf_counter() - started, "cpu_seconds": cpu_so_far()})

    bar = tqdm(range(first_step, steps), initial=first_step, total=steps, desc=f"edge pruning (target {target:g})",
               disable=not progress)
    with _frozen(model):
        for step in bar:
            rows = None
            if n > batch_size:
                rows = torch.randperm(n, generator=batch_gen, device="cpu")[:batch_size].to(dev)
            batch = tokens if rows is None else tokens[rows]
            ramp = min(1.0, (step + 1) / warmup)
            gates = sample_gates(log_alpha, gen)
            node_gates = None if node_log_alpha is None else sample_gates(node_log_alpha, gen)
            logits = masked_logits(model, batch, gates, repl, node_gates, rows=rows if repl.per_prompt else None)
            kl = kl_loss(full if rows is None else full[rows], logits)
            q_edge = expected_closed(log_alpha)                    # [n_edges] P(edge gate = 0)
            if node_log_alpha is not None:
                q_node = torch.cat([torch.zeros(1, device=dev), expected_closed(node_log_alpha)])
                q_writer = q_node[edge_writer]                     # writer w is node w - 1; the embedding has no gate
                q_edge = q_edge + q_writer - q_edge * q_writer     # P(edge or writer closed)
                gap_n = ramp * node_target - expected_closed(node_log_alpha).mean()
            gap = ramp * target - q_edge.mean()
            lagrangian = lambdas[0] * gap + lambdas[1] * gap ** 2
            if node_log_alpha is not None:
                lagrangian = lagrangian + lambdas[2] * gap_n + lambdas[3] * gap_n ** 2
            loss = kl + lagrangian
            opt.zero_grad()
            reg_opt.zero_grad()
            loss.backward()
            for optimizer, base in ((opt, lr), (reg_opt, reg_lr)):
                for group in optimizer.param_groups:
                    group["lr"] = base * lr_factor(step)
            opt.step()
            reg_opt.step()
            sparsity = q_edge.mean().item()
            for k, v in (("step", step + 1), ("loss", loss.item()), ("kl", kl.item()), ("edge_sparsity", sparsity),
                         ("target", ramp * target), ("lambda1", lambdas[0].item()), ("lambda2", lambdas[1].item()),
                         ("lr", lr * lr_factor(step))):
                curve[k].append(v)
            if node_log_alpha is not None:
                curve["node_sparsity"].append(expected_closed(node_log_alpha).mean().item())
                curve["node_target"].append(ramp * node_target)
            bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.4f}", sparsity=f"{sparsity:.3f}")
            if checkpoint_path is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                checkpoint(step + 1)
    bar.close()
    if checkpoint_path is not None:
        Path(checkpoint_path).unlink(missing_ok=True)
    return EdgeTraining(log_alpha.detach(), None if node_log_alpha is None else node_log_alpha.detach(), curve,
                        seconds_before + time.perf_counter() - started, cpu_so_far())


def binarize(graph: EdgeGraph, log_alpha: torch.Tensor, target_sparsity: float,
             node_log_alpha: torch.Tensor | None = None) -> tuple[list[int], list[str], float]:
    """The binary circuit of trained gates: (kept edges, kept nodes, log_alpha threshold).

    Nodes whose deterministic gate is below 1/2 are closed. Edges are ranked by log_alpha
    (ties: by index); the largest k whose top-k edges leave at most (1 - target) x n_edges edges
    after dead-node removal is found by bisection (the surviving set only grows with k).
    """
    target = check_sparsity(target_sparsity)
    closed = []
    if node_log_alpha is not None:
        det = deterministic_gates(node_log_alpha)
        closed = [n for n, d in zip(graph.nodes, det.tolist()) if d < 0.5]
    order = torch.argsort(-log_alpha.detach().float().cpu(), stable=True).tolist()
    want = math.floor((1 - target) * graph.n_edges + 1e-9)

    def survivors(k):
        return remove_dead(graph, order[:k], closed)

    lo, hi = 0, graph.n_edges          # survivors(lo) fits; find the largest k that fits
    if len(survivors(hi)[0]) <= want:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(survivors(mid)[0]) <= want:
            lo = mid
        else:
            hi = mid
    edges, nodes = survivors(lo)
    threshold = float(log_alpha[order[lo - 1]]) if lo > 0 else float("inf")
    return edges, nodes, threshold


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
        return {"circuitlib_version": __version__, **asdict(self), "n_edges": len(self.edges),
                "sparsity": self.sparsity, "kept_heads": self.kept_heads, "kept_mlps": self.kept_mlps}

    @classmethod
    def from_dict(cls, d: dict) -> "EdgeCircuit":
        return cls(**{k: d[k] for k in ("settings", "n_edges_total", "edges", "nodes", "threshold", "curve",
                                        "metrics")})

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
        return gates_from_edges(model, self.edges)


@torch.no_grad()
def edge_logits(model: Transformer, tokens: torch.Tensor, gates: torch.Tensor, repl: Replacement,
                batch_size: int = 64) -> torch.Tensor:
    """Last-position logits [n, V] of the masked model, in batches (rows paired for corrupted)."""
    dev = model.W_E.device
    tokens = tokens.to(dev)
    out = []
    for start in range(0, len(tokens), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(tokens)), device=dev)
        out.append(masked_logits(model, tokens[rows], gates, repl, rows=rows if repl.per_prompt else None))
    return torch.cat(out)


def corrupt(tokens: torch.Tensor) -> torch.Tensor:
    """Corrupted prompts for a task split: prompt i is paired with prompt i - 1 of the same split
    (another prompt of the same template, with other names, letters or years)."""
    return tokens.roll(1, dims=0)


@dataclass
class EdgeRun:
    """An Edge Pruning run end to end: the result, the standalone pruned model, and what made them."""

    result: EdgeCircuit
    full: Transformer
    pruned: Transformer
    tokenizer: object
    task: object
    data: object
    training: EdgeTraining

    def save(self, out_dir: str | os.PathLike, force: bool = False) -> Path:
        """Write `edges.json`, its gate locations (`edges.gates.pt`), the pruned model, the tokenizer
        and the full model's reference (`reference.safetensors`, for `evaluate` and `export`) into
        `out_dir`, atomically."""
        from .experiment import full_reference, save_reference, write_folder

        def fill(tmp: Path) -> None:
            self.pruned.save(tmp)
            self.tokenizer.save_pretrained(tmp)
            save_reference(tmp, full_reference(self.full, self.data), self.data)
            save_gates(gates_path(tmp / RESULT_FILE), self.training)
            self.result.save_json(tmp / RESULT_FILE)

        return write_folder(out_dir, force, fill)


def run_edges(model_name: str, task_name: str, *, target_sparsity: float, steps: int, ablation: str = "mean",
              seed: int = 0, n: int | None = None, lr: float = 0.8, reg_lr: float = 0.8, warmup: int | None = None,
              batch_size: int = 32, node_target_sparsity: float | None = None, weight_decay: float = 0.01,
              lr_warmup: int | None = None, device: str | None = None,
              progress: bool = True, loaded=None, checkpoint_path: str | os.PathLike | None = None,
              checkpoint_every: int = 50) -> EdgeRun:
    """Load a model and a task, train edge gates on the validation split (the split Algorithm 1
    decides on), read off the circuit, prune the model to its nodes, and measure both.

    ablation: 'mean' (patching-split means), 'zero', or 'corrupted' (each prompt paired with
              another of its split, `corrupt`); the standalone model replaces removed nodes by
              their means under 'mean' and 'corrupted' (it has no corrupted input), by zero under 'zero'
    `loaded`: an already loaded (model, tokenizer) pair.
    checkpoint_path, checkpoint_every: make the training resumable (see `train_edges`).
    """
    from .ablation import mean_activations
    from .experiment import SPLITS, check_fits
    from .loading import load_model
    from .surgery import prune
    from .tasks import get_task

    target = check_sparsity(target_sparsity)
    if ablation not in REPLACEMENTS:
        raise ValueError(f"unknown ablation {ablation!r}; choose one of {', '.join(REPLACEMENTS)}")
    task = get_task(task_name)
    model, tokenizer = loaded if loaded is not None else load_model(model_name)
    if device is not None:
        model = model.to(device)
    dev = model.W_E.device
    n = n or task.default_n
    data = task.generate(tokenizer, n=n, seed=seed)
    fixed, per_prompt = edges_memory(model.cfg, n, batch_size, data.validation.tokens.shape[1], ablation)
    check_fits(dev, per_prompt, fixed, n, f"Edge Pruning ({model.cfg.name}, batch {batch_size})",
               small_enough="a smaller --batch-size")
    patching = data.patching.tokens.to(dev)
    means = mean_activations(model, patching)
    graph = graph_for(model)
    repls = {}
    for split in SPLITS:
        tokens = getattr(data, split).tokens.to(dev)
        repls[split] = make_replacement(model, ablation, patching=patching, means=means,
                                        corrupted=corrupt(tokens) if ablation == "corrupted" else None)
    training = train_edges(model, data.validation.tokens, repls["validation"], target_sparsity=target, steps=steps,
                           node_target_sparsity=node_target_sparsity, lr=lr, reg_lr=reg_lr, warmup=warmup,
                           batch_size=batch_size, seed=seed, weight_decay=weight_decay, lr_warmup=lr_warmup,
                           progress=progress,
                           checkpoint_path=checkpoint_path,
                           checkpoint_every=checkpoint_every)
    started = time.perf_counter()
    kept, nodes, threshold = binarize(graph, training.log_alpha, target, training.node_log_alpha)
    scheme = "zero" if ablation == "zero" else "mean"
    pruned = prune(model, node_circuit(nodes), scheme, means)
    gates = gates_from_edges(model, kept)
    metrics = {"full": {}, "edge_circuit": {}, "pruned_model": {}, "conversion_kl_change": {}}
    with torch.no_grad():
        for split in SPLITS:
            s = getattr(data, split)
            tokens = s.tokens.to(dev)
            full = model(tokens, last_only=True)
            edge = edge_logits(model, tokens, gates, repls[split])
            small = pruned(tokens, last_only=True)
            metrics["full"][split] = {"accuracy": accuracy(task, s, full), "kl": 0.0}
            metrics["edge_circuit"][split] = {"accuracy": accuracy(task, s, edge), "kl": kl_divergence(full, edge)}
            metrics["pruned_model"][split] = {"accuracy": accuracy(task, s, small), "kl": kl_divergence(full, small)}
            metrics["conversion_kl_change"][split] = (metrics["pruned_model"][split]["kl"]
                                                      - metrics["edge_circuit"][split]["kl"])
    full_size, pruned_size = model.count_parameters(), pruned.count_parameters()
    metrics |= {
        "n_params": {"full": full_size, "pruned": pruned_size},
        "parameter_reduction": 1 - pruned_size["parameters"] / full_size["parameters"],
        "edges_among_kept_nodes": len(edges_among(graph, nodes)),
        "training_seconds": training.seconds,
        "seconds_per_step": training.seconds / steps,
        "training_cpu_seconds": training.cpu_seconds,     # None when unknown (see EdgeTraining)
        "torch_threads": torch.get_num_threads(),         # of the process that finished the training
        "readout_seconds": time.perf_counter() - started,
    }
    settings = {"model": model.cfg.name, "task": task.name, "target_sparsity": target, "steps": steps,
                "ablation": ablation, "standalone_scheme": scheme, "seed": seed, "n": n, "lr": lr, "reg_lr": reg_lr,
                "warmup": warmup, "batch_size": batch_size, "node_target_sparsity": node_target_sparsity,
                "weight_decay": weight_decay, "lr_warmup": lr_warmup, "train_split": "validation",
                "device": str(dev)}
    result = EdgeCircuit(settings, graph.n_edges, [graph.edge_name(e) for e in kept], nodes, threshold,
                         training.curve, metrics)
    return EdgeRun(result, model, pruned, tokenizer, task, data, training)


# Settings that make two edge results the same result (the device and the seconds do not).
RESULT_SETTINGS = ("model", "task", "target_sparsity", "steps", "ablation", "seed", "n", "lr", "reg_lr", "warmup",
                   "batch_size", "node_target_sparsity", "weight_decay", "lr_warmup")


def edge_result_path(out_dir: str | os.PathLike, task_name: str, *, target_sparsity: float, steps: int,
                     ablation: str = "mean", seed: int = 0, n: int | None = None, batch_size: int = 32,
                     node_target_sparsity: float | None = None) -> Path:
    """Where `edge_result` keeps a run:
    <out_dir>/<task>-<ablation>-seed<S>-n<N>-bs<B>-steps<K>-target<T>[-nodes<NT>].json
    (N: the task's default when None); its training checkpoint is the same name ending in .ckpt."""
    from .tasks import get_task

    task = get_task(task_name)
    target = check_sparsity(target_sparsity)
    name = f"{task.name}-{ablation}-seed{seed}-n{n or task.default_n}-bs{batch_size}-steps{steps}-target{target:g}"
    if node_target_sparsity is not None:
        name += f"-nodes{check_sparsity(node_target_sparsity, 'node target sparsity'):g}"
    return Path(out_dir) / f"{name}.json"


def edge_result(out_dir: str | os.PathLike, model: Transformer, tokenizer, task_name: str, *,
                target_sparsity: float, steps: int, ablation: str = "mean", seed: int = 0, n: int | None = None,
                batch_size: int = 32, lr: float = 0.8, reg_lr: float = 0.8, warmup: int | None = None,
                node_target_sparsity: float | None = None, weight_decay: float = 0.01,
                lr_warmup: int | None = None, device: str | None = None, progress: bool = True, checkpoint_every: int = 50) -> EdgeCircuit:
    """The Edge Pruning result of these settings, as data: read from `edge_result_path` when it
    is there, else computed by `run_edges` on the loaded (`model`, `tokenizer`) and saved there
    (atomically) before it is returned, with its final gate locations beside it (`gates_path`).
    While it computes, it holds the file lock <name>.lock (removed when done): another process
    asking for the same result meanwhile gets `ResultInProgress` (a ValueError) instead of
    training it a second time; a file that appears there during the training anyway (copied
    from another machine) is kept, with a warning.

    The training checkpoints to the same name ending in .ckpt, so a computation cut off (a killed
    process, the end of a session) continues where it stopped when asked again. A stored result
    made with other settings (lr, say, which the name leaves out) is never replaced: a ValueError
    names the differences.
    """
    from .tasks import get_task

    task = get_task(task_name)
    path = edge_result_path(out_dir, task.name, target_sparsity=target_sparsity, steps=steps, ablation=ablation,
                            seed=seed, n=n, batch_size=batch_size, node_target_sparsity=node_target_sparsity)
    asked = {"model": model.cfg.name, "task": task.name, "target_sparsity": check_sparsity(target_sparsity),
             "steps": steps, "ablation": ablation, "seed": seed, "n": n or task.default_n, "lr": lr, "reg_lr": reg_lr,
             "warmup": warmup, "batch_size": batch_size, "node_target_sparsity": node_target_sparsity,
             "weight_decay": weight_decay, "lr_warmup": lr_warmup}
    def stored() -> EdgeCircuit:
        result = EdgeCircuit.load_json(path)
        differ = [f"{k} {result.settings.get(k)!r} (stored) vs {asked[k]!r} (asked)" for k in RESULT_SETTINGS
                  if result.settings.get(k) != asked[k]]
        if differ:
            raise ValueError(f"{path} holds a result of other settings: {'; '.join(differ)}; ask for its settings, "
                             "or give another out_dir (or delete the file to recompute it)")
        return result

    if path.exists():
        return stored()
    # one process per result: a second one (another worker, a second edge_runs.py) is refused, not run twice
    with result_lock(path, "wait for it, or ask for other settings (scripts/edge_runs.py: other --targets)"):
        if path.exists():       # finished by the process that held the lock a moment ago
            return stored()
        run = run_edges(model.cfg.name, task.name, target_sparsity=target_sparsity, steps=steps, ablation=ablation,
                        seed=seed, n=n, lr=lr, reg_lr=reg_lr, warmup=warmup, batch_size=batch_size,
                        node_target_sparsity=node_target_sparsity, weight_decay=weight_decay, lr_warmup=lr_warmup,
                        device=device, progress=progress, loaded=(model, tokenizer),
                        checkpoint_path=path.with_suffix(".ckpt"), checkpoint_every=checkpoint_every)
        if path.exists():       # arrived meanwhile from elsewhere (another machine's copy): kept, not replaced
            warnings.warn(f"{path} appeared while this process trained the same settings; the file there is kept "
                          "and returned, this training's result is dropped", stacklevel=2)
            return stored()
        save_gates(gates_path(path), run.training)     # before the JSON: a result always has its gates
        run.result.save_json(path)
        return run.result


def gates_path(result_path: str | os.PathLike) -> Path:
    """Where `edge_result` keeps a result's trained gate locations: <name>.gates.pt beside <name>.json."""
    return Path(result_path).with_suffix(".gates.pt")


def save_gates(path: str | os.PathLike, training: EdgeTraining) -> Path:
    """The final gate locations (log_alpha [n_edges], node_log_alpha [n_nodes] or None), atomically.
    A few hundred kB for the stand-in (123,211 float32): what the binary circuit was cut from."""
    state = {"log_alpha": training.log_alpha.detach().cpu().float(),
             "node_log_alpha": None if training.node_log_alpha is None else training.node_log_alpha.detach().cpu().float()}
    return atomic_write(Path(path), lambda p: torch.save(state, p))


def load_gates(path: str | os.PathLike) -> dict:
    """`save_gates`' file: {"log_alpha": [n_edges], "node_log_alpha": [n_nodes] or None}."""
    return torch.load(path, map_location="cpu", weights_only=True)


def standalone_model(result: EdgeCircuit, model: Transformer, tokenizer) -> Transformer:
    """The standalone pruned model of an edge result, rebuilt without training: the full `model`
    (the one the result was computed on) pruned to the result's nodes, removed nodes replaced as
    in `run_edges` (by their means over the patching split of the result's prompts, or by zero)."""
    from .ablation import mean_activations
    from .surgery import prune
    from .tasks import get_task

    settings = result.settings
    if settings["model"] != model.cfg.name or result.n_edges_total != graph_for(model).n_edges:
        raise ValueError(f"this edge result was computed on {settings['model']!r} ({result.n_edges_total:,} edges), "
                         f"not on {model.cfg.name!r} ({graph_for(model).n_edges:,} edges); load that model")
    data = get_task(settings["task"]).generate(tokenizer, n=settings["n"], seed=settings["seed"])
    means = mean_activations(model, data.patching.tokens.to(model.W_E.device))
    return prune(model, node_circuit(result.nodes), settings["standalone_scheme"], means)
