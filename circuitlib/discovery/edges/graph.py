"""Edge Pruning (Bhaskar et al. 2024): circuits made of edges, found by gradient descent on gates.

Algorithm 1 (`circuitlib.discovery.greedy`) removes *nodes*: a head or an MLP either runs or is replaced by its
mean. Edge Pruning asks a finer question: which *connections* between components matter? To ask
it, the residual stream is taken apart. In the ordinary model every component reads the sum of
everything written before it. Here that sum is kept as a list of separate writer outputs, and
every reader gets its own masked sum of them:

    writers:  the embedding(s), every head "L.H", every MLP "MLP L"
    readers:  the query, key and value input of every head ("L.H.q", "L.H.k", "L.H.v"; grouped
              K/V heads: "L.kvJ.k", "L.kvJ.v", see below), every MLP input ("MLP L") and the
              logits ("logits")

    input of reader r  =  sum over writers w before r of   g[w->r] * out[w] + (1 - g[w->r]) * repl[w]
                       +  the attention output biases b_O of the layers before r (always present)

A gate g = 1 passes the writer's real output along that edge, g = 0 passes its replacement
instead. `repl` is what Algorithm 1 would ablate a node to, so the two methods speak the same
language: the per-position **mean** of the writer over the patching set (`Means`, exactly the
hook_z / hook_mlp_out means of `circuitlib.core.ablation`), **zero**, or the writer's output on a
**corrupted** input (paired prompt by prompt; interchange ablation, the paper's default). The
gates are computed as `repl + g * (out - repl)`, so the masked sum costs one matrix product per
reader block. The attention output bias b_O is not a head's output (hook_z ablation keeps it),
so it is not gated.

Nodes can be gated too (`node_gates`): a closed node gate replaces the writer's output by its
replacement on every outgoing edge at once, which is node ablation.

**Two graphs for grouped K/V heads (Llama)** (`graph_for(model, kv_readers=...)`). Several query
heads share one K/V head.
- "per-kv-head" (default; the authors' `modeling_fllama.py`: `k_read_log_alphas` are
  [n_writers, num_kv_heads]): one key and one value reader per K/V head, feeding every query head
  of its group, which is what the model computes (the K/V projection runs once per group). Its
  edge counts and sparsities are comparable to the authors' (SmolLM2-135M: 70,651 edges). A
  writer cut from a K/V reader is cut from all the group's heads at once.
- "per-query-head": every query head its own key and value readers (query head h's keys are
  `W_K[kv(h)]` applied to h's own masked input), like a GPT-2 head, so that a circuit can
  describe one head's keys without its siblings'; the K/V projections then run `group_size`
  times (SmolLM2-135M: 123,211 edges). circuitlib's only graph before issue 28.
With all edges open, or all of a writer's edges closed, both compute the same thing (tested
against the pruned model). When a circuit is turned into a standalone model, a K/V head stays if
any of its query heads stays (`surgery.prune`).

**Embedding writers** (`split_embedding`). For GPT-2 the token and position embeddings are two
writers by default ("tok_embed", "pos_embed"; the authors' `--with_embedding_nodes`, used in
all their GPT-2 runs): 32,936 edges in GPT-2 Small. With one "embed" writer it has 32,491, the
figure in the paper's text. Rotary models (Llama) have no position writer: one "embed". A
closed position edge passes the position embedding's replacement (under mean ablation, itself:
positions are the same in every prompt).

**Memory (the writer tensor).** What each writer adds over its replacement is kept in one
buffer of `n_writers = 1 + L (H + 1)` slices (one more with split embeddings) of shape
[B, S, D]; a reader block is one matrix product over its prefix (`_MaskedSum`, whose backward
reads the same buffer instead of saving copies, and sums the writers' gradients in one more such
buffer, `_GradientSum`). The replacements add `n_writers x S x D` floats (mean), `n_writers`
rows (zero), or `n_writers x n x S x D` (corrupted: one per prompt). Every layer forms its `H + 2 K + 1` reader
inputs [B, S, D] (K key readers: H, or the K/V head count); training keeps them, and their
normalised copies, for the backward pass. In all, training holds about
`(n_writers + 2 L (H + 2 K + 1)) B S D` floats; for GPT-2 Small (L = H = K = 12, D = 768, split
embeddings) 1,046 B S D floats, 1.4 GiB for 32 prompts of 15 tokens.

**Other architectures.** The masked forward follows the model's configuration: bidirectional
attention where `cfg.causal` is False, no norms where `cfg.normalization` is False, the MLP's own
activation (ReLU in Tracr-compiled models) and an untied unembedding `W_U`; `all_positions`
gives the outputs at every position (Tracr programs output a sequence).

Memory and time grow linearly with the batch, so batches are small (`train.train_edges`
draws 32 prompts per step by default).

`circuitlib.discovery.edges.train` trains the gates (hard-concrete, with a Lagrangian sparsity target), reads off a
binary circuit, and turns it into a physically smaller model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F

from circuitlib.core.ablation import Means
from circuitlib.core.components import head_name, mlp_name, parse_component
from circuitlib.core.model import Transformer, rotate

REPLACEMENTS = ("mean", "zero", "corrupted")
EMBED, LOGITS = "embed", "logits"
KINDS = ("q", "k", "v")


# ---- the graph -------------------------------------------------------------------------------

KV_READERS = ("per-kv-head", "per-query-head")
TOKEN_EMBED, POS_EMBED = "tok_embed", "pos_embed"


@dataclass
class EdgeGraph:
    """Writers, readers and edges of one model shape, in computation order.

    writers: the embedding ("embed", or "tok_embed" and "pos_embed" when split), then per layer
             its heads "L.H" and its MLP "MLP L"
    readers: per layer "L.H.q" for every query head, then the key readers, then the value
             readers, then "MLP L"; last "logits". Key and value readers are one per K/V head
             ("L.kvJ.k", "L.kvJ.v") when `kv_readers` is "per-kv-head" and the model groups its
             K/V heads, else one per query head ("L.H.k", "L.H.v")
    edges:   (writer index, reader index) pairs; reader r reads every writer computed before it
             (an MLP also reads the heads of its own layer). Edge e of a gate vector [n_edges]
             is edges[e].
    reader_nodes: the nodes each reader feeds (one, or every query head sharing a K/V head)
    groups:  (start, size) slices of the gate vector that the authors keep as one parameter tensor
             (per layer: the q readers, the k readers, the v readers, the MLP reader; then the
             logits): their deterministic gates are computed tensor by tensor (`deterministic_mask`)
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int = 0
    kv_readers: str = "per-kv-head"
    split_embedding: bool = False
    writers: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)
    edges: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        n_layers: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        kv_readers: str = "per-kv-head",
        split_embedding: bool = False,
    ) -> "EdgeGraph":
        if kv_readers not in KV_READERS:
            raise ValueError(f"unknown kv_readers {kv_readers!r}; choose one of {', '.join(KV_READERS)}")
        n_kv = n_kv_heads or n_heads
        if n_heads % n_kv:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
        g = cls(n_layers, n_heads, n_kv, kv_readers, split_embedding)
        g.embed_writers = [TOKEN_EMBED, POS_EMBED] if split_embedding else [EMBED]
        g.writers = list(g.embed_writers)
        g.reader_nodes = []
        g._attn, g._mlp = [], []  # offsets into the gate vector: (start, n_writers read)
        g.groups = []
        per_kv = kv_readers == "per-kv-head" and n_kv < n_heads
        g.n_kv_readers = n_kv if per_kv else n_heads  # key (and value) readers per layer
        group = n_heads // n_kv
        for l in range(n_layers):
            W = len(g.writers)
            g._attn.append((len(g.edges), W))
            for kind in KINDS:
                g.groups.append((len(g.edges), (n_heads if kind == "q" else g.n_kv_readers) * W))
                if kind != "q" and per_kv:
                    for j in range(n_kv):
                        g._add_reader(
                            f"{l}.kv{j}.{kind}", W, tuple(head_name(l, h) for h in range(j * group, (j + 1) * group))
                        )
                else:
                    for h in range(n_heads):
                        g._add_reader(f"{l}.{h}.{kind}", W, (head_name(l, h),))
            g.writers += [head_name(l, h) for h in range(n_heads)]
            g._mlp.append((len(g.edges), W + n_heads))
            g.groups.append((len(g.edges), W + n_heads))
            g._add_reader(mlp_name(l), W + n_heads, (mlp_name(l),))
            g.writers.append(mlp_name(l))
        g._out = (len(g.edges), len(g.writers))
        g.groups.append(g._out)
        g._add_reader(LOGITS, len(g.writers), (LOGITS,))
        g.writer_index = {w: i for i, w in enumerate(g.writers)}
        g.edge_index = {e: i for i, e in enumerate(g.edges)}
        return g

    def _add_reader(self, name: str, n_writers: int, nodes: tuple[str, ...]) -> None:
        r = len(self.readers)
        self.readers.append(name)
        self.reader_nodes.append(nodes)
        self.edges += [(w, r) for w in range(n_writers)]

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    @property
    def n_attn_readers(self) -> int:
        """Readers per layer's attention: H query, then the key and the value readers."""
        return self.n_heads + 2 * self.n_kv_readers

    @property
    def nodes(self) -> list[str]:
        """Gated nodes: the heads and MLPs (every writer but the embeddings), in writer order."""
        return self.writers[len(self.embed_writers) :]

    def edge_name(self, e: int) -> str:
        w, r = self.edges[e]
        return f"{self.writers[w]} -> {self.readers[r]}"

    def parse_edge(self, name: str) -> int:
        try:
            w, r = (p.strip() for p in name.split("->"))
            return self.edge_index[(self.writer_index[w], self.readers.index(r))]
        except (ValueError, KeyError):
            raise ValueError(
                f"bad edge {name!r}: write 'WRITER -> READER', e.g. 'embed -> 0.1.q', '0.3 -> MLP 1', 'MLP 2 -> logits'"
            ) from None

    # Views of a gate vector [n_edges] per reader block.
    def attn_gates(self, gates: torch.Tensor, layer: int) -> torch.Tensor:
        """[H + 2 K, W] gates of layer `layer`'s q, k and v readers (K = `n_kv_readers`) over its W
        preceding writers."""
        start, W = self._attn[layer]
        return gates[start : start + self.n_attn_readers * W].view(self.n_attn_readers, W)

    def mlp_gates(self, gates: torch.Tensor, layer: int) -> torch.Tensor:
        start, W = self._mlp[layer]
        return gates[start : start + W]

    def out_gates(self, gates: torch.Tensor) -> torch.Tensor:
        start, W = self._out
        return gates[start : start + W]

    def node_of_reader(self, r: int) -> str:
        """The node a reader belongs to: 'L.H' for 'L.H.q/k/v', 'MLP L', or 'logits' (a K/V-head
        reader feeds several heads: see `reader_nodes`)."""
        nodes = self.reader_nodes[r]
        if len(nodes) != 1:
            raise ValueError(f"reader {self.readers[r]} feeds {len(nodes)} heads {nodes}; use reader_nodes")
        return nodes[0]


_GRAPHS: dict[tuple, EdgeGraph] = {}


def graph_for(model: Transformer, kv_readers: str = "per-kv-head", split_embedding: bool | None = None) -> EdgeGraph:
    """The edge graph of `model`'s shape.

    kv_readers:      "per-kv-head" (default, the authors' Llama graph): one key and one value
                     reader per K/V head, shared by its query heads, as the model computes them;
                     "per-query-head": every query head its own (see the module docstring)
    split_embedding: token and position embeddings as two writers (default for models with
                     learned positions, GPT-2: the authors' `--with_embedding_nodes`, as in their
                     runs); False: one "embed" writer (rotary models have no position writer)
    """
    cfg = model.cfg
    if split_embedding is None:
        split_embedding = model.W_pos is not None
    if split_embedding and model.W_pos is None:
        raise ValueError(f"{cfg.name} has no position embedding to split off; use split_embedding=False")
    key = (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, kv_readers, bool(split_embedding))
    if key not in _GRAPHS:
        _GRAPHS[key] = EdgeGraph.build(
            cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, kv_readers=kv_readers, split_embedding=bool(split_embedding)
        )
    return _GRAPHS[key]


# ---- replacements ----------------------------------------------------------------------------


@dataclass
class Replacement:
    """What each writer passes along a closed edge.

    values: [n_writers, S, D] (mean: the same for every prompt; zero: S = 1, every position) or
            [n_writers, n, S, D] (corrupted: one per prompt, row i paired with prompt i)
    """

    kind: str
    values: torch.Tensor

    @property
    def per_prompt(self) -> bool:
        return self.values.dim() == 4

    def rows(self, index: torch.Tensor | None) -> torch.Tensor:
        """[n_writers, B or 1, S, D] for the prompts `index` (all if None)."""
        if not self.per_prompt:
            return self.values[:, None]
        return self.values if index is None else self.values[:, index]


def check_full(model: Transformer) -> None:
    cfg = model.cfg
    if (
        model.kept_heads() != [head_name(l, h) for l in range(cfg.n_layers) for h in range(cfg.n_heads)]
        or model.kept_mlps() != list(range(cfg.n_layers))
        or model.ablation is not None
    ):
        raise ValueError("Edge Pruning works on the full model, not on a pruned one")


@torch.no_grad()
def make_replacement(
    model: Transformer,
    kind: str,
    *,
    patching: torch.Tensor | None = None,
    means: Means | None = None,
    corrupted: torch.Tensor | None = None,
    graph: EdgeGraph | None = None,
) -> Replacement:
    """The replacement of every writer of `graph` (default `graph_for(model)`).

    mean:      per-position means over `patching` [n_a, S] (or the given `means` plus `patching`
               for the embedding's mean); the same means Algorithm 1 ablates to
    zero:      zeros
    corrupted: the writers' outputs on `corrupted` [n, S], row i standing in for prompt i
    """
    if kind not in REPLACEMENTS:
        raise ValueError(f"unknown replacement {kind!r}; choose one of {', '.join(REPLACEMENTS)}")
    check_full(model)
    cfg, dev, dtype = model.cfg, model.W_E.device, model.W_E.dtype
    graph = graph or graph_for(model)
    n_writers = len(graph.writers)
    if kind == "zero":
        return Replacement(kind, torch.zeros(n_writers, 1, cfg.d_model, device=dev, dtype=dtype))
    if kind == "corrupted":
        if corrupted is None:
            raise ValueError("corrupted replacement needs corrupted tokens [n, S], paired with the clean prompts")
        outs = writer_outputs(model, corrupted.to(dev), graph.split_embedding)  # [n_writers, n, S, D]
        return Replacement(kind, outs)
    if patching is None:
        raise ValueError("mean replacement needs the patching prompts (for the embedding's mean)")
    if means is None:
        from circuitlib.core.ablation import mean_activations

        means = mean_activations(model, patching)
    patching = patching.to(dev)
    S = patching.shape[1]
    if graph.split_embedding:  # token part's mean; positions are constant
        values = [model.W_E[patching].double().mean(0).to(dtype), model.W_pos[:S]]
    else:
        values = [model.embed(patching).double().mean(0).to(dtype)]
    for l, layer in enumerate(model.layers):
        values += list(torch.einsum("hse,hed->hsd", means.z[l].to(dev, dtype), layer.W_O))
        values.append(means.mlp[l].to(dev, dtype))
    values = torch.stack(values)
    if values.shape[1] != S:
        raise ValueError("means and patching prompts have different lengths")
    return Replacement(kind, values)


@torch.no_grad()
def writer_outputs(model: Transformer, tokens: torch.Tensor, split_embedding: bool = False) -> torch.Tensor:
    """Every writer's output in the full model: [n_writers, n, S, D] (the embedding as token and
    position parts if `split_embedding`)."""
    x = model.embed(tokens)
    outs = [model.W_E[tokens], model.W_pos[: tokens.shape[1]].expand_as(x)] if split_embedding else [x]
    for layer in model.layers:
        z = layer.z(x)  # [n, S, H, E]
        heads = torch.einsum("bshe,hed->hbsd", z, layer.W_O)
        outs += list(heads)
        x = x + heads.sum(0) + layer.attn_bias(slice(0, x.shape[1]))
        m = layer.mlp_out(x)
        outs.append(m)
        x = x + m
    return torch.stack(outs)


# ---- the masked forward pass -----------------------------------------------------------------


def masked_logits(
    model: Transformer,
    tokens: torch.Tensor,
    gates: torch.Tensor,
    repl: Replacement,
    node_gates: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    graph: EdgeGraph | None = None,
    all_positions: bool = False,
) -> torch.Tensor:
    """Last-position logits [B, V] (every position's [B, S, V] if `all_positions`) of the model in
    which every edge passes `gates` of its writer.

    tokens:     [B, S]
    gates:      [n_edges] in [0, 1] (1 = the writer's output, 0 = its replacement), in
                `graph.edges` order
    node_gates: [n_nodes] or None (all open), in `graph.nodes` order (heads and MLPs)
    rows:       which prompts of a per-prompt (corrupted) replacement these tokens are
    graph:      the edge graph (default `graph_for(model)`); `repl` must be made for it
    Differentiable in `gates` and `node_gates`.
    """
    g, cfg = graph or graph_for(model), model.cfg
    H, S = cfg.n_heads, tokens.shape[1]
    if gates.shape != (g.n_edges,):
        raise ValueError(f"gates must have shape [{g.n_edges}] (the edges of this model); got {list(gates.shape)}")
    if repl.values.shape[0] != len(g.writers):
        raise ValueError(
            f"the replacement has {repl.values.shape[0]} writers, the graph {len(g.writers)}: "
            "make it with make_replacement(..., graph=graph)"
        )
    R = repl.rows(rows)  # [n_writers, B or 1, S', D]
    if R.shape[2] != 1:  # 1: the same for every position (zero)
        if R.shape[2] < S:
            raise ValueError(f"the replacement covers {R.shape[2]} positions; the prompts have {S}")
        R = R[:, :, :S]
    B, D = tokens.shape[0], cfg.d_model
    # deltas[w] = out[w] - repl[w] (times w's node gate): what writer w adds over its replacement.
    # One buffer, filled writer by writer; a reader block is then one matrix product over its prefix.
    deltas = torch.empty(len(g.writers), B, S, D, device=model.W_E.device, dtype=model.W_E.dtype)
    chunks = []  # the same deltas as autograd tensors, in order, so gradients reach the writers
    grads = _GradientSum(deltas)

    def put(w: int, delta: torch.Tensor) -> None:
        with torch.no_grad():
            deltas[w : w + delta.shape[0]] = delta
        chunks.append(delta)

    def read(block: torch.Tensor, base: torch.Tensor, last: bool = False) -> torch.Tensor:
        """block [r, W] gates over the first W writers -> reader inputs [r, B, S, D] (S = 1 if `last`)."""
        W = block.shape[1]
        used, k = [], 0
        for c in chunks:
            if k >= W:
                break
            used.append(c)
            k += c.shape[0]
        return base + _MaskedSum.apply(block, deltas, W, last, grads.claim(len(used), k), *used)

    def node(i0: int, k: int) -> torch.Tensor | None:
        return None if node_gates is None else node_gates[i0 : i0 + k].view(k, 1, 1, 1)

    def gated(delta: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        return delta if gate is None else delta * gate

    x = model.embed(tokens)
    if g.split_embedding:
        put(0, (model.W_E[tokens.to(x.device)] - R[0])[None].expand(1, B, S, D))
        put(1, (model.W_pos[:S] - R[1])[None].expand(1, B, S, D))
    else:
        put(0, (x - R[0])[None].expand(1, B, S, D))
    w = n_embed = len(g.embed_writers)
    base = R[:w].sum(0)  # sum of replacements and biases so far
    for l, layer in enumerate(model.layers):
        inp = read(g.attn_gates(gates, l), base)  # [H + 2 K, B, S, D]
        heads = _heads(layer, cfg, _norm(layer.ln1, inp), g.n_kv_readers)  # [H, B, S, D]
        put(w, gated(heads - R[w : w + H], node(w - n_embed, H)))
        base = base + R[w : w + H].sum(0)
        if layer.b_O is not None:
            base = base + layer.b_O
        w += H
        m_in = read(g.mlp_gates(gates, l)[None], base)[0]  # [B, S, D]
        m = layer.mlp_out(m_in)
        put(w, gated((m - R[w])[None], node(w - n_embed, 1)))
        base = base + R[w]
        w += 1
    if all_positions:
        return model.unembed(read(g.out_gates(gates)[None], base)[0])  # [B, S, V]
    resid = read(g.out_gates(gates)[None], base[:, -1:], last=True)[0]  # [B, 1, D]
    return model.unembed(resid[:, -1])


class _GradientSum:
    """The gradient of every writer's delta, summed over its readers in one buffer like `deltas`.

    In the backward pass the reader blocks come in reverse order; each adds its part
    (block^T @ grad) to the buffer in place, and the *first* reader of a chunk of writers (the last
    block to run backward, all later readers having added theirs) hands the chunk's rows on to
    autograd. One buffer and in-place sums instead of a gradient per block and chunk that autograd
    then adds up: the same sums, less memory traffic. The last block (the logits') runs first in
    every backward pass and starts the sums afresh, so that a second pass (retain_graph) is right.
    """

    def __init__(self, deltas: torch.Tensor):
        self.deltas, self.buffer, self.claimed, self.n_blocks = deltas, None, 0, 0

    def claim(self, n_chunks: int, covered: int) -> tuple["_GradientSum", int, int]:
        """A new reader block reads chunks 0..n_chunks-1 (covering writers 0..covered-1): the
        chunks from `first` on, which no earlier block read, are its to hand on.
        -> (self, first, covered, the block's index)"""
        first, self.claimed = self.claimed, max(self.claimed, n_chunks)
        self.n_blocks += 1
        return self, first, covered, self.n_blocks - 1

    def add(self, block: torch.Tensor, g: torch.Tensor, last: bool) -> None:
        """Add block^T @ g [W, B * s * D] to the first W writers' rows (s = 1: the last position only)."""
        if self.buffer is None:
            self.buffer = torch.zeros_like(self.deltas)
        W = block.shape[1]
        if last:
            _, B, _, D = self.deltas.shape
            self.buffer[:W, :, -1:] += (block.T @ g).view(W, B, 1, D)
        else:
            self.buffer[:W].view(W, -1).addmm_(block.T, g)


class _MaskedSum(torch.autograd.Function):
    """sum_w block[r, w] * deltas[w] for the first W writers, as one matrix product.

    `deltas` is the buffer the writers' deltas are copied into as they are computed; rows below W
    never change afterwards, so the backward pass reads them from it instead of saving copies.
    The autograd tensors of the same deltas (`chunks`, in writer order, covering 0..W-1) are passed
    only to route their gradients: summed in a `_GradientSum`, each chunk's gradient is returned
    by its first reader (`claim`: the sum, the first chunk this block hands on, the writers covered).
    """

    @staticmethod
    def forward(ctx, block, deltas, W, last, claim, *chunks):
        ctx.save_for_backward(block)
        ctx.deltas, ctx.W, ctx.last, ctx.claim = deltas, W, last, claim
        ctx.sizes = [c.shape[0] for c in chunks]
        flat = _prefix(deltas, W, last)  # [W, B * s * D]
        out = block @ flat
        return out.view(block.shape[0], deltas.shape[1], 1 if last else deltas.shape[2], deltas.shape[3])

    @staticmethod
    def backward(ctx, grad):
        (block,) = ctx.saved_tensors
        g = grad.reshape(grad.shape[0], -1)  # [r, B * s * D]
        grad_block = g @ _prefix(ctx.deltas, ctx.W, ctx.last).T if ctx.needs_input_grad[0] else None
        parts = [None] * len(ctx.sizes)
        grads, first, covered, index = ctx.claim
        if index == grads.n_blocks - 1:  # the logits' block: a backward pass begins
            grads.buffer = None
        if any(ctx.needs_input_grad[5:]):
            grads.add(block, g, ctx.last)
            if covered > ctx.W and first < len(ctx.sizes):
                raise RuntimeError("a chunk of writers is first read by a block that covers only part of it")
            start = sum(ctx.sizes[:first])
            for i in range(first, len(ctx.sizes)):  # this block is these chunks' first reader
                parts[i] = grads.buffer[start : start + ctx.sizes[i]]
                start += ctx.sizes[i]
        return (grad_block, None, None, None, None, *parts)


def _prefix(deltas: torch.Tensor, W: int, last: bool) -> torch.Tensor:
    d = deltas[:W, :, -1:] if last else deltas[:W]
    return d.reshape(W, -1)


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    """The layer's norm on many reader inputs at once (fused kernels: less memory kept for backward);
    the identity in a model without normalisation."""
    if not norm.enabled:
        return x
    if norm.rms:
        return F.rms_norm(x, x.shape[-1:], norm.w, norm.eps)
    return F.layer_norm(x, x.shape[-1:], norm.w, norm.b, norm.eps)


def _heads(layer, cfg, h: torch.Tensor, n_kv_readers: int) -> torch.Tensor:
    """Head outputs [H, B, S, D] from normalised reader inputs h [H + 2 K, B, S, D]: H query
    inputs, then K key and K value inputs, K = H (one per query head) or the K/V head count."""
    H = cfg.n_heads
    kv = layer.kv_of_head  # each query head's K/V head
    hq, hk, hv = h[:H], h[H : H + n_kv_readers], h[H + n_kv_readers :]
    q = torch.einsum("hbsd,hde->bhse", hq, layer.W_Q)
    if n_kv_readers == H:  # per query head: its K/V weights on its input
        k = torch.einsum("hbsd,hde->bhse", hk, layer.W_K[kv])
        v = torch.einsum("hbsd,hde->bhse", hv, layer.W_V[kv])
    else:  # per K/V head, shared by its query heads
        k = torch.einsum("kbsd,kde->bkse", hk, layer.W_K)[:, kv]
        v = torch.einsum("kbsd,kde->bkse", hv, layer.W_V)[:, kv]
    if layer.b_Q is not None:
        q = q + layer.b_Q[:, None]
        k = k + layer.b_K[kv][:, None]
        v = v + layer.b_V[kv][:, None]
    if cfg.arch == "llama":
        q, k = rotate(q, cfg.rotary_base), rotate(k, cfg.rotary_base)
    z = F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal)  # [B, H, S, E]
    return torch.einsum("bhse,hed->hbsd", z, layer.W_O)


def kl_loss(full_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(f || g) at the last position, summed over the vocabulary, mean over prompts (differentiable)."""
    return F.kl_div(
        F.log_softmax(logits.float(), -1),
        F.log_softmax(full_logits.float(), -1),
        log_target=True,
        reduction="batchmean",
    )


# ---- binary circuits: edges <-> nodes --------------------------------------------------------


def all_open(model: Transformer, graph: EdgeGraph | None = None) -> torch.Tensor:
    return torch.ones((graph or graph_for(model)).n_edges, device=model.W_E.device)


def gates_from_edges(model: Transformer, kept: Iterable[int | str], graph: EdgeGraph | None = None) -> torch.Tensor:
    """A 0/1 gate vector opening the edges `kept` (indices or 'W -> R' names) of `graph` (default
    `graph_for(model)`)."""
    g = graph or graph_for(model)
    gates = torch.zeros(g.n_edges, device=model.W_E.device)
    idx = [e if isinstance(e, int) else g.parse_edge(e) for e in kept]
    gates[torch.tensor(idx, dtype=torch.long, device=gates.device)] = 1.0
    return gates


def edges_among(graph: EdgeGraph, nodes: Iterable[str]) -> list[int]:
    """The edges whose writer and (one of) its reader's nodes are in `nodes` (the embeddings and
    the logits always count as kept): the edge circuit of a node circuit."""
    always = set(graph.embed_writers) | {LOGITS}
    nodes = set(nodes) | always
    for n in nodes - always:
        parse_component(n)
    return [
        e
        for e, (w, r) in enumerate(graph.edges)
        if graph.writers[w] in nodes and any(n in nodes for n in graph.reader_nodes[r])
    ]


def remove_dead(graph: EdgeGraph, kept: Iterable[int], closed_nodes: Iterable[str] = ()) -> tuple[list[int], list[str]]:
    """Drop what cannot reach the logits: (surviving edges, surviving nodes).

    A node is alive if one of its kept outgoing edges reaches the logits or a reader of a live
    node; a node whose gate is closed (`closed_nodes`) sends only its replacement, so its edges
    carry nothing of its own. Edges out of and into dead nodes change no logit, so dropping them
    is exact. Nodes with no incoming edge are kept: they still compute (from replacements).
    """
    kept = set(kept)
    closed = set(closed_nodes)
    out_edges: dict[int, list[int]] = {}
    for e in kept:
        out_edges.setdefault(graph.edges[e][0], []).append(e)
    alive = {LOGITS}
    for w in range(len(graph.writers) - 1, -1, -1):
        name = graph.writers[w]
        if name in closed:
            continue
        if any(n in alive for e in out_edges.get(w, []) for n in graph.reader_nodes[graph.edges[e][1]]):
            alive.add(name)
    edges = sorted(
        e
        for e in kept
        if graph.writers[graph.edges[e][0]] in alive and any(n in alive for n in graph.reader_nodes[graph.edges[e][1]])
    )
    nodes = [n for n in graph.nodes if n in alive]
    return edges, nodes


def node_circuit(nodes: Iterable[str]) -> list[str]:
    """Component names for `surgery.prune` ('L.H' and 'MLP L'), in writer order as given."""
    return [n for n in nodes if n not in (EMBED, TOKEN_EMBED, POS_EMBED, LOGITS)]


def count_edges(graph: EdgeGraph, nodes: Iterable[str]) -> int:
    """Edges of a node circuit: those among its nodes, the embedding and the logits."""
    return len(edges_among(graph, nodes))


def expected_open(gate_logits: torch.Tensor) -> torch.Tensor:
    """P(gate > 0) of hard-concrete gates (their expected L0 norm), elementwise."""
    return torch.sigmoid(gate_logits - BETA * math.log(-LEFT / RIGHT))


def expected_closed(gate_logits: torch.Tensor) -> torch.Tensor:
    """P(gate = 0) = 1 - `expected_open`, elementwise, computed directly: in float32,
    1 - sigmoid(x) rounds to exactly 0 (and so does its gradient) once x > 16.6, which would
    leave a gate that drifted there with no gradient to close it; sigmoid(-x) keeps both."""
    return torch.sigmoid(BETA * math.log(-LEFT / RIGHT) - gate_logits)


# Hard-concrete gates (Louizos et al. 2018): a stretched, clipped binary concrete variable. A gate's
# location, `gate_logits` here, is the logit of its open probability before the stretch: the authors'
# and Louizos et al.'s `log_alpha` (the key gate files and checkpoints store it under, `GATE_FILE_KEYS`).
BETA, LEFT, RIGHT = 2 / 3, -0.1, 1.1
# names in code -> keys in gate files and training checkpoints (the authors' names; every file keeps them)
GATE_FILE_KEYS = {"gate_logits": "log_alpha", "node_gate_logits": "node_log_alpha"}


def sample_gates(gate_logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(gate_logits.shape, generator=generator, device=gate_logits.device).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + gate_logits) / BETA)
    return (s * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)


def deterministic_gates(gate_logits: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(gate_logits) * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)


# The authors' deterministic gate (Edge-Pruning src/modeling/l0.py, `deterministic_z_from_log_alpha`).
SOFT_FACTOR, CDF_EPS = 0.8, 1e-6


def deterministic_mask(gate_logits: torch.Tensor, groups: Iterable[tuple[int, int]] | None = None) -> torch.Tensor:
    """The gates' deterministic values in [0, 1], as the authors evaluate them, per group [n].

    In each group (one of the authors' parameter tensors; `EdgeGraph.groups`; all of `gate_logits`
    if None) the expected number of closed gates, round(sum of P(gate = 0)), is counted; that many
    of the group's gates with the smallest `gate_logits` are set to 0, the others to
    sigmoid(0.8 gate_logits / beta). P(gate = 0) is clipped to [1e-6, 1 - 1e-6] as theirs is.
    """
    gate_logits = gate_logits.detach().float()
    out = torch.empty_like(gate_logits)
    for start, size in groups if groups is not None else [(0, gate_logits.numel())]:
        la = gate_logits[start : start + size]
        closed = expected_closed(la).clamp(CDF_EPS, 1 - CDF_EPS)
        n_zeros = int(torch.round(size - (1 - closed).sum()).item())
        soft = torch.sigmoid(la / BETA * SOFT_FACTOR)
        if n_zeros > 0:
            soft[torch.topk(soft, k=min(n_zeros, size), largest=False).indices] = 0.0
        out[start : start + size] = soft
    return out
