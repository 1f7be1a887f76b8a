"""Edge Pruning end to end, and its results as data.

`run_edges` loads a model and a task, trains the gates (`circuitlib.discovery.edges.train`), reads
the circuit off, measures it and makes the standalone pruned model; `EdgeRun.save` writes it as a run
folder that `evaluate` and `export` read. `edge_result` keeps finished trainings as JSON files named
after their settings (computed once, in the background, by `scripts/edge_runs.py`; read afterwards),
and `reread` reads a stored training's gates again with another read-off, without training.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from circuitlib.core.io import atomic_write
from circuitlib.core.metrics import accuracy, kl_divergence
from circuitlib.core.model import Transformer
from circuitlib.core.resumable import ResultInProgress, computed_once  # noqa: F401 (edge_result raises it)
from circuitlib.discovery.edges.graph import (
    GATE_FILE_KEYS,
    KV_READERS,
    REPLACEMENTS,
    EdgeGraph,
    edges_among,
    gates_from_edges,
    graph_for,
    make_replacement,
    node_circuit,
)
from circuitlib.discovery.edges.train import (
    LEGACY_SETTINGS,
    RESULT_FILE,
    SPARSITY_TERMS,
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


@dataclass(frozen=True)
class EdgeConfig:
    """The settings of one Edge Pruning training, nanoGPT's `GPTConfig` style: with the model's name,
    they are what a result records as "settings", what `edge_result` checks a stored result against,
    and what `edge_result_path` names its file after. Checked when made, so a config that exists is
    one that can run. The model is given beside it (a name to `run_edges`, a loaded model to
    `edge_result`), and so are the device and the checkpointing, which do not change the result.

    task:                 a built-in task or a .jsonl/.csv task file
    target_sparsity:      edge target, in [0, 2) (above 1 pushes harder, as the authors' sweeps)
    steps:                training steps (the authors' 3000)
    ablation:             what a closed edge passes: "mean", "zero" or "corrupted" (see `run_edges`)
    seed, n:              of the prompts (n per split; None: the task's default) and of the gates
    batch_size:           prompts per step, at most n (the authors' 32)
    lr, reg_lr:           learning rates of the gates and of the Lagrange multipliers (> 0)
    warmup, lr_warmup:    steps of the target's ramp and of the learning rates' (None: `train_edges`'
                          fractions of `steps`)
    node_target_sparsity: also gate nodes, with this target in [0, 1) (None: edges only)
    weight_decay:         AdamW's, for the gates and the multipliers (>= 0)
    sparsity_term, clip_grad_norm: see `train_edges`; readout: see `binarize`
    kv_readers, split_embedding: the graph (`graph_for`; split_embedding None: the model's default)

    The defaults are the authors' recipe; `EdgeConfig.legacy` gives circuitlib's before issue 28.
    """

    task: str
    target_sparsity: float
    steps: int
    ablation: str = "mean"
    seed: int = 0
    n: int | None = None
    batch_size: int = 32
    lr: float = 0.8
    reg_lr: float = 0.8
    warmup: int | None = None
    node_target_sparsity: float | None = None
    weight_decay: float = 0.01
    lr_warmup: int | None = None
    sparsity_term: str = "sampled"
    clip_grad_norm: float | None = 1.0
    readout: str = "authors"
    kv_readers: str = "per-kv-head"
    split_embedding: bool | None = None

    def __post_init__(self):
        def whole(name: str, low: int = 1, none_ok: bool = False) -> None:
            value = getattr(self, name)
            if value is None and none_ok:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                what = "a positive whole number" if low == 1 else f"a whole number >= {low}"
                raise ValueError(f"{name} must be {what}{' or None' if none_ok else ''}, got {value!r}")

        def number(name: str, positive: bool) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (value <= 0 if positive else value < 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")

        object.__setattr__(self, "task", os.fspath(self.task))
        object.__setattr__(self, "target_sparsity", check_sparsity(self.target_sparsity, "target_sparsity"))
        if self.node_target_sparsity is not None:
            node = check_sparsity(self.node_target_sparsity, "node_target_sparsity")
            object.__setattr__(self, "node_target_sparsity", node)
        whole("steps")
        whole("seed", low=0)
        whole("n", none_ok=True)
        whole("batch_size")
        whole("warmup", none_ok=True)
        whole("lr_warmup", low=0, none_ok=True)
        for name in ("lr", "reg_lr"):
            number(name, positive=True)
        number("weight_decay", positive=False)
        if self.ablation not in REPLACEMENTS:
            raise ValueError(f"unknown ablation {self.ablation!r}; choose one of {', '.join(REPLACEMENTS)}")
        if self.n is not None and self.batch_size > self.n:
            raise ValueError(
                f"batch_size {self.batch_size} is larger than the {self.n} prompts a step draws from (n); "
                f"lower batch_size to at most {self.n}, or raise n"
            )
        if self.warmup is not None and self.warmup > self.steps:
            raise ValueError(
                f"warmup {self.warmup} is longer than the run (steps {self.steps}); give at most {self.steps}, "
                "or None (5/6 of the steps)"
            )
        if self.lr_warmup is not None and self.lr_warmup >= self.steps:
            raise ValueError(f"lr_warmup must be below steps ({self.steps}), got {self.lr_warmup}")
        if self.sparsity_term not in SPARSITY_TERMS:
            raise ValueError(f"unknown sparsity_term {self.sparsity_term!r}; choose one of {', '.join(SPARSITY_TERMS)}")
        if self.clip_grad_norm is not None:
            number("clip_grad_norm", positive=True)
        check_readout(self.readout, self.target_sparsity)
        if self.kv_readers not in KV_READERS:
            raise ValueError(f"unknown kv_readers {self.kv_readers!r}; choose one of {', '.join(KV_READERS)}")
        if self.split_embedding is not None and not isinstance(self.split_embedding, bool):
            raise ValueError(f"split_embedding must be True, False or None, got {self.split_embedding!r}")

    @classmethod
    def legacy(cls, task: str, target_sparsity: float, steps: int, **settings) -> EdgeConfig:
        """circuitlib's recipe before issue 28 (`LEGACY_SETTINGS`: the "expected" sparsity term, no
        clipping, the forced-count read-off, per-query-head K/V readers, one embedding writer), the
        one the chapter's committed results were trained with; `settings` as in `EdgeConfig`."""
        return cls(task, target_sparsity, steps, **(LEGACY_SETTINGS | settings))

    @classmethod
    def of(cls, settings: dict) -> EdgeConfig:
        """The config of a result's recorded settings (`EdgeCircuit.settings`; what it records besides
        the config's fields, the model, device and times, is left out). A record that lacks a field
        (one made before that setting existed, with another optimiser) is refused, naming it."""
        fields = [f.name for f in dataclasses.fields(cls)]
        missing = [k for k in fields if k not in settings]
        if missing:
            raise ValueError(f"these settings lack {', '.join(missing)}: not a training an EdgeConfig describes")
        return cls(**{k: settings[k] for k in fields})

    def replace(self, **changes) -> EdgeConfig:
        """This config with some settings changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def resolved(self, model: Transformer) -> EdgeConfig:
        """This config as it runs on `model`: the task by the name it resolves to, n and
        split_embedding filled in from the task and the model."""
        from circuitlib.tasks import get_task

        task = get_task(self.task)
        split = graph_for(model, self.kv_readers, self.split_embedding).split_embedding
        return self.replace(task=task.name, n=self.n or task.default_n, split_embedding=split)

    def settings(self, model: Transformer) -> dict:
        """The settings a result of this config on `model` records and is checked by: the model's
        name and the resolved config's fields."""
        return {"model": model.cfg.name, **dataclasses.asdict(self.resolved(model))}


def run_edges(
    model_name: str,
    config: EdgeConfig,
    *,
    device: str | None = None,
    progress: bool = True,
    loaded=None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
) -> EdgeRun:
    """Load a model and a task, train edge gates on the validation split (the split Algorithm 1
    decides on), read off the circuit, prune the model to its nodes, and measure both, as `config` says.

    config.ablation: 'mean' (patching-split means), 'zero', or 'corrupted' (each prompt paired with its
              corrupted version, `corrupt`); the standalone model replaces removed nodes by
              their means under 'mean' and 'corrupted' (it has no corrupted input), by zero under 'zero'
    `loaded`: an already loaded (model, tokenizer) pair.
    checkpoint_path, checkpoint_every: make the training resumable (see `train_edges`).
    """
    from circuitlib.core.memory import check_fits, out_of_memory_as_error
    from circuitlib.models.loading import load_model
    from circuitlib.tasks import get_task

    if not isinstance(config, EdgeConfig):
        raise TypeError(f"config must be an EdgeConfig, got {type(config).__name__}")
    task = get_task(config.task)
    model, tokenizer = loaded if loaded is not None else load_model(model_name)
    if device is not None:
        model = model.to(device)
    dev = model.W_E.device
    c = config.resolved(model)
    n, batch_size = c.n, c.batch_size
    graph = graph_for(model, c.kv_readers, c.split_embedding)
    data = task.generate(tokenizer, n=n, seed=c.seed)
    fixed, per_prompt = edges_memory(model.cfg, n, batch_size, data.validation.tokens.shape[1], c.ablation)
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
        repls, means = _replacements(model, data, c.ablation, graph)
        training = train_edges(
            model,
            data.validation.tokens,
            repls["validation"],
            target_sparsity=c.target_sparsity,
            steps=c.steps,
            node_target_sparsity=c.node_target_sparsity,
            lr=c.lr,
            reg_lr=c.reg_lr,
            warmup=c.warmup,
            batch_size=batch_size,
            seed=c.seed,
            weight_decay=c.weight_decay,
            lr_warmup=c.lr_warmup,
            sparsity_term=c.sparsity_term,
            clip_grad_norm=c.clip_grad_norm,
            graph=graph,
            progress=progress,
            checkpoint_path=checkpoint_path,
            checkpoint_every=checkpoint_every,
        )
        started = time.perf_counter()
        read = binarize(graph, training.gate_logits, c.target_sparsity, training.node_gate_logits, readout=c.readout)
        pruned, metrics = _measure(model, task, data, graph, read, repls, means, c.ablation)
    metrics |= {
        "training_seconds": training.seconds,
        "seconds_per_step": training.seconds / c.steps,
        "training_cpu_seconds": training.cpu_seconds,  # None when unknown (see EdgeTraining)
        "torch_threads": torch.get_num_threads(),  # of the process that finished the training
        "readout_seconds": time.perf_counter() - started,
    }
    settings = config.settings(model) | {
        "standalone_scheme": "zero" if c.ablation == "zero" else "mean",
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
    read = binarize(graph, gates["gate_logits"], st["target_sparsity"], gates["node_gate_logits"], readout=readout)
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


def edge_result_path(out_dir: str | os.PathLike, config: EdgeConfig, model: Transformer | None = None) -> Path:
    """Where `edge_result` keeps the result of `config`:
    <out_dir>/<task>-<ablation>-seed<S>-n<N>-bs<B>-steps<K>-target<T>[-nodes<NT>][-<recipe>].json
    (N: the task's default when None); its training checkpoint is the same name ending in .ckpt.
    The recipe names each of sparsity_term, clip_grad_norm, readout, kv_readers and
    split_embedding that differs from `LEGACY_SETTINGS` (`EdgeConfig.legacy`), so that the names of
    results made before these settings existed still resolve: e.g. "-sampled-clip1-authors-kv" for
    the defaults on a grouped-K/V model. Given the `model`, the graph parts follow its shape (no
    "-kv" where its K/V heads are not grouped, "-splitembed" by default where it has position
    embeddings); without it, split_embedding=None counts as False."""
    from circuitlib.tasks import get_task

    c = config
    kv_readers, split_embedding = c.kv_readers, c.split_embedding
    if model is not None:
        split_embedding = graph_for(model, kv_readers, split_embedding).split_embedding
        if model.cfg.n_kv_heads == model.cfg.n_heads:
            kv_readers = LEGACY_SETTINGS["kv_readers"]  # both graphs are one
    task = get_task(c.task)
    name = f"{task.name}-{c.ablation}-seed{c.seed}-n{c.n or task.default_n}-bs{c.batch_size}-steps{c.steps}"
    name += f"-target{c.target_sparsity:g}"
    if c.node_target_sparsity is not None:
        name += f"-nodes{c.node_target_sparsity:g}"
    if c.sparsity_term != LEGACY_SETTINGS["sparsity_term"]:
        name += f"-{c.sparsity_term}"
    if c.clip_grad_norm is not None:
        name += f"-clip{c.clip_grad_norm:g}"
    if c.readout != LEGACY_SETTINGS["readout"]:
        name += f"-{c.readout}"
    if kv_readers != LEGACY_SETTINGS["kv_readers"]:
        name += "-kv"
    if split_embedding:
        name += "-splitembed"
    return Path(out_dir) / f"{name}.json"


def edge_result(
    out_dir: str | os.PathLike,
    model: Transformer,
    tokenizer,
    config: EdgeConfig,
    *,
    device: str | None = None,
    progress: bool = True,
    checkpoint_every: int = 50,
) -> EdgeCircuit:
    """The Edge Pruning result of `config` on the loaded (`model`, `tokenizer`), as data: the one
    settings-checked cache (`core.resumable.computed_once`) at `edge_result_path`. A stored result
    made with these settings (`EdgeConfig.settings`) is read; one made with others (lr, say, which
    the name leaves out) is refused, one ValueError naming each difference, and never replaced;
    otherwise `run_edges` computes it and it is saved there (atomically), with its final gate
    locations beside it (`gates_path`), before it is returned. While it computes, the file lock
    <name>.lock is held: another process asking for the same result gets `ResultInProgress`.

    The training checkpoints to the same name ending in .ckpt, so a computation cut off (a killed
    process, the end of a session) continues where it stopped when asked again. Results made before
    issue 28 are asked for with `EdgeConfig.legacy`.
    """
    path = edge_result_path(out_dir, config, model)

    def compute() -> EdgeRun:
        return run_edges(
            model.cfg.name,
            config,
            device=device,
            progress=progress,
            loaded=(model, tokenizer),
            checkpoint_path=path.with_suffix(".ckpt"),
            checkpoint_every=checkpoint_every,
        )

    def write(path: Path, run: EdgeRun) -> None:
        save_gates(gates_path(path), run.training)  # before the JSON: a result always has its gates
        run.result.save_json(path)

    found = computed_once(
        path,
        config.settings(model),
        compute=compute,
        read=EdgeCircuit.load_json,
        write=write,
        settings_of=lambda result: result.settings,
        busy_hint="wait for it, or ask for other settings (scripts/edge_runs.py: other --targets)",
    )
    return found if isinstance(found, EdgeCircuit) else found.result


def gates_path(result_path: str | os.PathLike) -> Path:
    """Where `edge_result` keeps a result's trained gate locations: <name>.gates.pt beside <name>.json."""
    return Path(result_path).with_suffix(".gates.pt")


def save_gates(path: str | os.PathLike, training: EdgeTraining) -> Path:
    """The final gate locations (gate_logits [n_edges], node_gate_logits [n_nodes] or None), atomically,
    under the file keys the authors' names give them (`GATE_FILE_KEYS`: "log_alpha", "node_log_alpha"),
    as every gate file before them. A few hundred kB for the stand-in: what the binary circuit was cut from."""
    gates = {"gate_logits": training.gate_logits, "node_gate_logits": training.node_gate_logits}
    state = {GATE_FILE_KEYS[k]: None if v is None else v.detach().cpu().float() for k, v in gates.items()}
    return atomic_write(Path(path), lambda p: torch.save(state, p))


def load_gates(path: str | os.PathLike) -> dict:
    """`save_gates`' file: {"gate_logits": [n_edges], "node_gate_logits": [n_nodes] or None}."""
    stored = torch.load(path, map_location="cpu", weights_only=True)
    return {k: stored[key] for k, key in GATE_FILE_KEYS.items()}
