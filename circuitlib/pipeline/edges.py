"""Edge Pruning end to end, and its results as data.

`run_edges` loads a model and a task, trains the gates (`circuitlib.discovery.edges.train`), reads
the circuit off, measures it and makes the standalone pruned model; `EdgeRun.save` writes it as a run
folder that `evaluate` and `export` read. `edge_result` keeps finished trainings as JSON files named
after their settings (computed once, in the background, by `scripts/edge_runs.py`; read afterwards),
and `reread` reads a stored training's gates again with another read-off, without training.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from circuitlib.core.io import atomic_write
from circuitlib.core.metrics import accuracy, kl_divergence
from circuitlib.core.model import Transformer
from circuitlib.core.resumable import (  # noqa: F401
    ResultInProgress,
    load_checkpoint,
    result_lock,
    save_checkpoint,
    tokens_digest,
)
from circuitlib.discovery.edges.graph import (
    REPLACEMENTS,
    EdgeGraph,
    edges_among,
    gates_from_edges,
    graph_for,
    make_replacement,
    node_circuit,
)

# (ResultInProgress: edge_result raises it; importable from here)
from circuitlib.discovery.edges.train import (
    LEGACY_SETTINGS,
    RESULT_FILE,
    EdgeCircuit,
    EdgeTraining,
    ReadOff,
    binarize,
    check_readout,
    check_sparsity,
    corrupt,
    edge_logits,
    edges_memory,
    train_edges,
)


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
        from circuitlib.core.io import write_folder
        from circuitlib.pipeline.extraction import full_reference, save_reference

        def fill(tmp: Path) -> None:
            self.pruned.save(tmp)
            self.tokenizer.save_pretrained(tmp)
            save_reference(tmp, full_reference(self.full, self.data), self.data)
            save_gates(gates_path(tmp / RESULT_FILE), self.training)
            self.result.save_json(tmp / RESULT_FILE)

        return write_folder(out_dir, force, fill)


def run_edges(
    model_name: str,
    task_name: str,
    *,
    target_sparsity: float,
    steps: int,
    ablation: str = "mean",
    seed: int = 0,
    n: int | None = None,
    lr: float = 0.8,
    reg_lr: float = 0.8,
    warmup: int | None = None,
    batch_size: int = 32,
    node_target_sparsity: float | None = None,
    weight_decay: float = 0.01,
    lr_warmup: int | None = None,
    sparsity_term: str = "sampled",
    clip_grad_norm: float | None = 1.0,
    readout: str = "authors",
    kv_readers: str = "per-kv-head",
    split_embedding: bool | None = None,
    device: str | None = None,
    progress: bool = True,
    loaded=None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
) -> EdgeRun:
    """Load a model and a task, train edge gates on the validation split (the split Algorithm 1
    decides on), read off the circuit, prune the model to its nodes, and measure both.

    ablation: 'mean' (patching-split means), 'zero', or 'corrupted' (each prompt paired with its
              corrupted version, `corrupt`); the standalone model replaces removed nodes by
              their means under 'mean' and 'corrupted' (it has no corrupted input), by zero under 'zero'
    sparsity_term, clip_grad_norm: see `train_edges`; readout: see `binarize`;
    kv_readers, split_embedding: the graph (`edges.graph_for`)
    `loaded`: an already loaded (model, tokenizer) pair.
    checkpoint_path, checkpoint_every: make the training resumable (see `train_edges`).
    """
    from circuitlib.core.memory import check_fits, out_of_memory_as_error
    from circuitlib.models.loading import load_model
    from circuitlib.tasks import get_task

    target = check_sparsity(target_sparsity)
    if ablation not in REPLACEMENTS:
        raise ValueError(f"unknown ablation {ablation!r}; choose one of {', '.join(REPLACEMENTS)}")
    check_readout(readout, target)
    task = get_task(task_name)
    model, tokenizer = loaded if loaded is not None else load_model(model_name)
    if device is not None:
        model = model.to(device)
    dev = model.W_E.device
    n = n or task.default_n
    graph = graph_for(model, kv_readers, split_embedding)
    data = task.generate(tokenizer, n=n, seed=seed)
    fixed, per_prompt = edges_memory(model.cfg, n, batch_size, data.validation.tokens.shape[1], ablation)
    check_fits(
        dev,
        per_prompt,
        fixed,
        n,
        f"Edge Pruning ({model.cfg.name}, batch {batch_size})",
        small_enough="a smaller --batch-size",
    )
    # an allocation that fails all the same ends as one error naming an --n that should fit
    with out_of_memory_as_error(dev, per_prompt, fixed, n, f"Edge Pruning ({model.cfg.name}, batch {batch_size})"):
        repls, means = _replacements(model, data, ablation, graph)
        training = train_edges(
            model,
            data.validation.tokens,
            repls["validation"],
            target_sparsity=target,
            steps=steps,
            node_target_sparsity=node_target_sparsity,
            lr=lr,
            reg_lr=reg_lr,
            warmup=warmup,
            batch_size=batch_size,
            seed=seed,
            weight_decay=weight_decay,
            lr_warmup=lr_warmup,
            sparsity_term=sparsity_term,
            clip_grad_norm=clip_grad_norm,
            graph=graph,
            progress=progress,
            checkpoint_path=checkpoint_path,
            checkpoint_every=checkpoint_every,
        )
        started = time.perf_counter()
        read = binarize(graph, training.log_alpha, target, training.node_log_alpha, readout=readout)
        pruned, metrics = _measure(model, task, data, graph, read, repls, means, ablation)
    metrics |= {
        "training_seconds": training.seconds,
        "seconds_per_step": training.seconds / steps,
        "training_cpu_seconds": training.cpu_seconds,  # None when unknown (see EdgeTraining)
        "torch_threads": torch.get_num_threads(),  # of the process that finished the training
        "readout_seconds": time.perf_counter() - started,
    }
    settings = {
        "model": model.cfg.name,
        "task": task.name,
        "target_sparsity": target,
        "steps": steps,
        "ablation": ablation,
        "standalone_scheme": "zero" if ablation == "zero" else "mean",
        "seed": seed,
        "n": n,
        "lr": lr,
        "reg_lr": reg_lr,
        "warmup": warmup,
        "batch_size": batch_size,
        "node_target_sparsity": node_target_sparsity,
        "weight_decay": weight_decay,
        "lr_warmup": lr_warmup,
        "sparsity_term": sparsity_term,
        "clip_grad_norm": clip_grad_norm,
        "readout": readout,
        "kv_readers": kv_readers,
        "split_embedding": graph.split_embedding,
        "train_split": "validation",
        "device": str(dev),
    }
    result = EdgeCircuit(
        settings,
        graph.n_edges,
        [graph.edge_name(e) for e in read.edges],
        read.nodes,
        read.threshold,
        training.curve,
        metrics,
    )
    return EdgeRun(result, model, pruned, tokenizer, task, data, training)


def _replacements(model: Transformer, data, ablation: str, graph: EdgeGraph) -> tuple[dict, object]:
    """The replacement of each split ({split: Replacement}) and the patching split's means."""
    from circuitlib.core.ablation import mean_activations
    from circuitlib.tasks import SPLITS

    dev = model.W_E.device
    patching = data.patching.tokens.to(dev)
    means = mean_activations(model, patching)
    repls = {}
    for split in SPLITS:
        s = getattr(data, split)
        repls[split] = make_replacement(
            model,
            ablation,
            patching=patching,
            means=means,
            graph=graph,
            corrupted=corrupt(s).to(dev) if ablation == "corrupted" else None,
        )
    return repls, means


@torch.no_grad()
def _measure(
    model: Transformer, task, data, graph: EdgeGraph, read: ReadOff, repls: dict, means, ablation: str
) -> tuple[Transformer, dict]:
    """The standalone model of a read-off circuit and the metrics of the circuit and the model per split."""
    from circuitlib.core.surgery import prune
    from circuitlib.tasks import SPLITS

    dev = model.W_E.device
    pruned = prune(model, node_circuit(read.nodes), "zero" if ablation == "zero" else "mean", means)
    gates = gates_from_edges(model, read.edges, graph)
    metrics = {"full": {}, "edge_circuit": {}, "pruned_model": {}, "conversion_kl_change": {}}
    for split in SPLITS:
        s = getattr(data, split)
        tokens = s.tokens.to(dev)
        full = model(tokens, last_only=True)
        edge = edge_logits(model, tokens, gates, repls[split], graph=graph)
        small = pruned(tokens, last_only=True)
        metrics["full"][split] = {"accuracy": accuracy(task, s, full), "kl": 0.0}
        metrics["edge_circuit"][split] = {"accuracy": accuracy(task, s, edge), "kl": kl_divergence(full, edge)}
        metrics["pruned_model"][split] = {"accuracy": accuracy(task, s, small), "kl": kl_divergence(full, small)}
        metrics["conversion_kl_change"][split] = (
            metrics["pruned_model"][split]["kl"] - metrics["edge_circuit"][split]["kl"]
        )
    full_size, pruned_size = model.count_parameters(), pruned.count_parameters()
    metrics |= {
        "n_params": {"full": full_size, "pruned": pruned_size},
        "parameter_reduction": 1 - pruned_size["parameters"] / full_size["parameters"],
        "edges_among_kept_nodes": len(edges_among(graph, read.nodes)),
        "training_edge_sparsity": read.training_sparsity,  # the size the training chose (authors' readout)
        "n_edges_thresholded": read.n_thresholded,  # before closed writers and dead nodes are dropped
    }
    return pruned, metrics


def reread(result_path: str | os.PathLike, model: Transformer, tokenizer, *, readout: str = "authors") -> EdgeCircuit:
    """A stored result read off again from its stored gates (`gates_path`) with `readout`, and
    measured again (validation and test KL and accuracy, of the edge circuit and of its standalone
    model). No training: the settings, the curve and the training's times are the stored ones;
    `settings["readout"]` is the new one. `model` must be the full model the result was trained on."""
    from circuitlib.tasks import get_task

    stored = EdgeCircuit.load_json(result_path)
    graph = stored.graph(model)
    st = stored.settings
    gates = load_gates(gates_path(result_path))
    task = get_task(st["task"])
    data = task.generate(tokenizer, n=st["n"], seed=st["seed"])
    repls, means = _replacements(model, data, st["ablation"], graph)
    read = binarize(graph, gates["log_alpha"], st["target_sparsity"], gates["node_log_alpha"], readout=readout)
    _, metrics = _measure(model, task, data, graph, read, repls, means, st["ablation"])
    kept = {k: v for k, v in stored.metrics.items() if k not in metrics}
    return EdgeCircuit(
        st | {"readout": readout},
        graph.n_edges,
        [graph.edge_name(e) for e in read.edges],
        read.nodes,
        read.threshold,
        stored.curve,
        kept | metrics,
    )


# Settings that make two edge results the same result (the device and the seconds do not).
RESULT_SETTINGS = (
    "model",
    "task",
    "target_sparsity",
    "steps",
    "ablation",
    "seed",
    "n",
    "lr",
    "reg_lr",
    "warmup",
    "batch_size",
    "node_target_sparsity",
    "weight_decay",
    "lr_warmup",
    "sparsity_term",
    "clip_grad_norm",
    "readout",
    "kv_readers",
    "split_embedding",
)


# What circuitlib did before these settings existed: a stored result without one was made so.
def edge_result_path(
    out_dir: str | os.PathLike,
    task_name: str,
    *,
    target_sparsity: float,
    steps: int,
    ablation: str = "mean",
    seed: int = 0,
    n: int | None = None,
    batch_size: int = 32,
    node_target_sparsity: float | None = None,
    sparsity_term: str = "sampled",
    clip_grad_norm: float | None = 1.0,
    readout: str = "authors",
    kv_readers: str = "per-kv-head",
    split_embedding: bool | None = None,
    model: Transformer | None = None,
) -> Path:
    """Where `edge_result` keeps a run:
    <out_dir>/<task>-<ablation>-seed<S>-n<N>-bs<B>-steps<K>-target<T>[-nodes<NT>][-<recipe>].json
    (N: the task's default when None); its training checkpoint is the same name ending in .ckpt.
    The recipe names each of sparsity_term, clip_grad_norm, readout, kv_readers and
    split_embedding that differs from `LEGACY_SETTINGS`, so that the names of results made
    before these settings existed still resolve: e.g. "-sampled-clip1-authors-kv" for the defaults
    on a grouped-K/V model. Given the `model`, the graph parts follow its shape (no "-kv" where
    its K/V heads are not grouped, "-splitembed" by default where it has position embeddings);
    without it, split_embedding=None counts as False."""
    from circuitlib.tasks import get_task

    if model is not None:
        split_embedding = graph_for(model, kv_readers, split_embedding).split_embedding
        if model.cfg.n_kv_heads == model.cfg.n_heads:
            kv_readers = LEGACY_SETTINGS["kv_readers"]  # both graphs are one
    task = get_task(task_name)
    target = check_sparsity(target_sparsity)
    name = f"{task.name}-{ablation}-seed{seed}-n{n or task.default_n}-bs{batch_size}-steps{steps}-target{target:g}"
    if node_target_sparsity is not None:
        name += f"-nodes{check_sparsity(node_target_sparsity, 'node target sparsity'):g}"
    if sparsity_term != LEGACY_SETTINGS["sparsity_term"]:
        name += f"-{sparsity_term}"
    if clip_grad_norm is not None:
        name += f"-clip{clip_grad_norm:g}"
    if readout != LEGACY_SETTINGS["readout"]:
        name += f"-{readout}"
    if kv_readers != LEGACY_SETTINGS["kv_readers"]:
        name += "-kv"
    if split_embedding:
        name += "-splitembed"
    return Path(out_dir) / f"{name}.json"


def edge_result(
    out_dir: str | os.PathLike,
    model: Transformer,
    tokenizer,
    task_name: str,
    *,
    target_sparsity: float,
    steps: int,
    ablation: str = "mean",
    seed: int = 0,
    n: int | None = None,
    batch_size: int = 32,
    lr: float = 0.8,
    reg_lr: float = 0.8,
    warmup: int | None = None,
    node_target_sparsity: float | None = None,
    weight_decay: float = 0.01,
    lr_warmup: int | None = None,
    sparsity_term: str = "sampled",
    clip_grad_norm: float | None = 1.0,
    readout: str = "authors",
    kv_readers: str = "per-kv-head",
    split_embedding: bool | None = None,
    device: str | None = None,
    progress: bool = True,
    checkpoint_every: int = 50,
) -> EdgeCircuit:
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
    names the differences. Results made before issue 28 are asked for with their settings
    (`LEGACY_SETTINGS`: sparsity_term="expected", clip_grad_norm=None, readout="forced-count",
    kv_readers="per-query-head", split_embedding=False).
    """
    from circuitlib.tasks import get_task

    task = get_task(task_name)
    check_readout(readout, check_sparsity(target_sparsity))
    split_embedding = graph_for(model, kv_readers, split_embedding).split_embedding
    recipe = dict(
        sparsity_term=sparsity_term,
        clip_grad_norm=clip_grad_norm,
        readout=readout,
        kv_readers=kv_readers,
        split_embedding=split_embedding,
    )
    path = edge_result_path(
        out_dir,
        task.name,
        target_sparsity=target_sparsity,
        steps=steps,
        ablation=ablation,
        seed=seed,
        n=n,
        batch_size=batch_size,
        node_target_sparsity=node_target_sparsity,
        **recipe,
        model=model,
    )
    asked = {
        "model": model.cfg.name,
        "task": task.name,
        "target_sparsity": check_sparsity(target_sparsity),
        "steps": steps,
        "ablation": ablation,
        "seed": seed,
        "n": n or task.default_n,
        "lr": lr,
        "reg_lr": reg_lr,
        "warmup": warmup,
        "batch_size": batch_size,
        "node_target_sparsity": node_target_sparsity,
        "weight_decay": weight_decay,
        "lr_warmup": lr_warmup,
        **recipe,
    }

    def stored() -> EdgeCircuit:
        result = EdgeCircuit.load_json(path)
        differ = [
            f"{k} {result.settings.get(k)!r} (stored) vs {asked[k]!r} (asked)"
            for k in RESULT_SETTINGS
            if result.settings.get(k) != asked[k]
        ]
        if differ:
            raise ValueError(
                f"{path} holds a result of other settings: {'; '.join(differ)}; ask for its settings, "
                "or give another out_dir (or delete the file to recompute it)"
            )
        return result

    if path.exists():
        return stored()
    # one process per result: a second one (another worker, a second edge_runs.py) is refused, not run twice
    with result_lock(path, "wait for it, or ask for other settings (scripts/edge_runs.py: other --targets)"):
        if path.exists():  # finished by the process that held the lock a moment ago
            return stored()
        run = run_edges(
            model.cfg.name,
            task.name,
            target_sparsity=target_sparsity,
            steps=steps,
            ablation=ablation,
            seed=seed,
            n=n,
            lr=lr,
            reg_lr=reg_lr,
            warmup=warmup,
            batch_size=batch_size,
            node_target_sparsity=node_target_sparsity,
            weight_decay=weight_decay,
            lr_warmup=lr_warmup,
            **recipe,
            device=device,
            progress=progress,
            loaded=(model, tokenizer),
            checkpoint_path=path.with_suffix(".ckpt"),
            checkpoint_every=checkpoint_every,
        )
        if path.exists():  # arrived meanwhile from elsewhere (another machine's copy): kept, not replaced
            warnings.warn(
                f"{path} appeared while this process trained the same settings; the file there is kept "
                "and returned, this training's result is dropped",
                stacklevel=2,
            )
            return stored()
        save_gates(gates_path(path), run.training)  # before the JSON: a result always has its gates
        run.result.save_json(path)
        return run.result


def gates_path(result_path: str | os.PathLike) -> Path:
    """Where `edge_result` keeps a result's trained gate locations: <name>.gates.pt beside <name>.json."""
    return Path(result_path).with_suffix(".gates.pt")


def save_gates(path: str | os.PathLike, training: EdgeTraining) -> Path:
    """The final gate locations (log_alpha [n_edges], node_log_alpha [n_nodes] or None), atomically.
    A few hundred kB for the stand-in (123,211 float32): what the binary circuit was cut from."""
    state = {
        "log_alpha": training.log_alpha.detach().cpu().float(),
        "node_log_alpha": None if training.node_log_alpha is None else training.node_log_alpha.detach().cpu().float(),
    }
    return atomic_write(Path(path), lambda p: torch.save(state, p))


def load_gates(path: str | os.PathLike) -> dict:
    """`save_gates`' file: {"log_alpha": [n_edges], "node_log_alpha": [n_nodes] or None}."""
    return torch.load(path, map_location="cpu", weights_only=True)
