"""Edge Pruning (Bhaskar et al. 2024): circuits made of edges, found by gradient descent on gates.

Algorithm 1 (`extract.py`) removes *nodes*: a head or an MLP either runs or is replaced by its
mean. Edge Pruning asks a finer question: which *connections* between components matter? To ask
it, the residual stream is taken apart. In the ordinary model every component reads the sum of
everything written before it. Here that sum is kept as a list of separate writer outputs, and
every reader gets its own masked sum of them:

    writers:  "embed" (token + position embedding), every head "L.H", every MLP "MLP L"
    readers:  the query, key and value input of every head ("L.H.q", "L.H.k", "L.H.v"),
              every MLP input ("MLP L") and the logits ("logits")

    input of reader r  =  sum over writers w before r of   g[w->r] * out[w] + (1 - g[w->r]) * repl[w]
                       +  the attention output biases b_O of the layers before r (always present)

A gate g = 1 passes the writer's real output along that edge, g = 0 passes its replacement
instead. `repl` is what Algorithm 1 would ablate a node to, so the two methods speak the same
language: the per-position **mean** of the writer over the patching set (`Means`, exactly the
hook_z / hook_mlp_out means of `ablation.py`), **zero**, or the writer's output on a
**corrupted** input (paired prompt by prompt; interchange ablation, the paper's default). The
gates are computed as `repl + g * (out - repl)`, so the masked sum costs one matrix product per
reader block. The attention output bias b_O is not a head's output (hook_z ablation keeps it),
so it is not gated. Edges in GPT-2 Small: 32,491, as the paper counts them.

Nodes can be gated too (`node_gates`): a closed node gate replaces the writer's output by its
replacement on every outgoing edge at once, which is node ablation.

**Grouped K/V heads (Llama).** Several query heads share one K/V head. We give *every query
head its own key and value readers*: query head h's keys are `W_K[kv(h)]` applied to h's own
masked input, so each query head has its own K and V input edges, exactly like a GPT-2 head,
and the shared weights are applied once per query head instead of once per group (the K/V
projections cost `group_size` times more; they are a small part of the work). The alternative,
one pair of readers per K/V group, would tie the key-side edges of all the heads in a group
together: cutting a writer from one head's keys would cut it from its siblings' too, so a
circuit could not describe one head without the others. With all edges open, or all of a
writer's edges closed, both choices compute the same thing (tested against the pruned model).
When a circuit is turned into a standalone model, a K/V head stays if any of its query heads
stays (`surgery.prune`).

**Memory (the writer tensor).** What each writer adds over its replacement is kept in one
buffer of `n_writers = 1 + L (H + 1)` slices of shape [B, S, D]; a reader block is one matrix
product over its prefix (`_MaskedSum`, whose backward reads the same buffer instead of saving
copies). The replacements add `n_writers x S x D` floats (mean), `n_writers` rows (zero), or
`n_writers x n x S x D` (corrupted: one per prompt). Every layer forms its `3H + 1` reader
inputs [B, S, D]; training keeps them, and their normalised copies, for the backward pass. In
all, training holds about `(1 + L (H + 1) + 2 L (3H + 1)) B S D` floats:

- GPT-2 Small (L = H = 12, D = 768): 1,045 B S D floats, 1.4 GiB for 32 prompts of 15 tokens
  (the writer buffer alone: 157 B S D, 0.22 GiB);
- SmolLM2-135M (L = 30, H = 9, D = 576): 1,981 B S D floats, 2.0 GiB for 32 prompts of 15 tokens
  (the writer buffer alone: 301 B S D, 0.31 GiB). Measured on IOI (15 tokens, CPU, one thread,
  the whole process with the model): peak 2.2, 3.3 and 5.4 GiB at 8, 16 and 32 prompts per
  step; 4.8, 8.5 and 17.9 CPU-seconds per step.

Memory and time grow linearly with the batch, so batches are small (`edges_train.train_edges`
draws 32 prompts per step by default).

`edges_train.py` trains the gates (hard-concrete, with a Lagrangian sparsity target), reads off a
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

@dataclass
class EdgeGraph:
    """Writers, readers and edges of one model shape, in computation order.

    writers: "embed", then per layer its heads "L.H" and its MLP "MLP L"
    readers: per layer "L.H.q" for every head, then every "L.H.k", every "L.H.v", then "MLP L";
             last "logits"
    edges:   (writer index, reader index) pairs; reader r reads every writer computed before it
             (an MLP also reads the heads of its own layer). Edge e of a gate vector [n_edges]
             is edges[e].
    """

    n_layers: int
    n_heads: int
    writers: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)
    edges: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def build(cls, n_layers: int, n_heads: int) -> "EdgeGraph":
        g = cls(n_layers, n_heads)
        g.writers = [EMBED]
        g._attn, g._mlp = [], []       # offsets into the gate vector: (start, n_writers read)
        for l in range(n_layers):
            W = len(g.writers)
            g._attn.append((len(g.edges), W))
            for kind in KINDS:
                for h in range(n_heads):
                    g._add_reader(f"{l}.{h}.{kind}", W)
            g.writers += [head_name(l, h) for h in range(n_heads)]
            g._mlp.append((len(g.edges), W + n_heads))
            g._add_reader(mlp_name(l), W + n_heads)
            g.writers.append(mlp_name(l))
        g._out = (len(g.edges), len(g.writers))
        g._add_reader(LOGITS, len(g.writers))
        g.writer_index = {w: i for i, w in enumerate(g.writers)}
        g.reader_node = [g._node_of(name) for name in g.readers]
        g.edge_index = {e: i for i, e in enumerate(g.edges)}
        return g

    def _add_reader(self, name: str, n_writers: int) -> None:
        r = len(self.readers)
        self.readers.append(name)
        self.edges += [(w, r) for w in range(n_writers)]

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    @property
    def nodes(self) -> list[str]:
        """Gated nodes: the heads and MLPs (every writer but the embedding), in writer order."""
        return self.writers[1:]

    def edge_name(self, e: int) -> str:
        w, r = self.edges[e]
        return f"{self.writers[w]} -> {self.readers[r]}"

    def parse_edge(self, name: str) -> int:
        try:
            w, r = (p.strip() for p in name.split("->"))
            return self.edge_index[(self.writer_index[w], self.readers.index(r))]
        except (ValueError, KeyError):
            raise ValueError(f"bad edge {name!r}: write 'WRITER -> READER', e.g. 'embed -> 0.1.q', "
                             "'0.3 -> MLP 1', 'MLP 2 -> logits'") from None

    # Views of a gate vector [n_edges] per reader block.
    def attn_gates(self, gates: torch.Tensor, layer: int) -> torch.Tensor:
        """[3, H, W] gates of layer `layer`'s q, k and v readers over its W preceding writers."""
        start, W = self._attn[layer]
        return gates[start:start + 3 * self.n_heads * W].view(3, self.n_heads, W)

    def mlp_gates(self, gates: torch.Tensor, layer: int) -> torch.Tensor:
        start, W = self._mlp[layer]
        return gates[start:start + W]

    def out_gates(self, gates: torch.Tensor) -> torch.Tensor:
        start, W = self._out
        return gates[start:start + W]

    def node_of_reader(self, r: int) -> str:
        """The node a reader belongs to: 'L.H' for 'L.H.q/k/v', 'MLP L', or 'logits'."""
        return self.reader_node[r]

    @staticmethod
    def _node_of(name: str) -> str:
        return name if name == LOGITS or name.startswith("MLP") else name.rsplit(".", 1)[0]


_GRAPHS: dict[tuple[int, int], EdgeGraph] = {}


def graph_for(model: Transformer) -> EdgeGraph:
    key = (model.cfg.n_layers, model.cfg.n_heads)
    if key not in _GRAPHS:
        _GRAPHS[key] = EdgeGraph.build(*key)
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
    if model.kept_heads() != [head_name(l, h) for l in range(cfg.n_layers) for h in range(cfg.n_heads)] \
            or model.kept_mlps() != list(range(cfg.n_layers)) or model.ablation is not None:
        raise ValueError("Edge Pruning works on the full model, not on a pruned one")


@torch.no_grad()
def make_replacement(model: Transformer, kind: str, *, patching: torch.Tensor | None = None,
                     means: Means | None = None, corrupted: torch.Tensor | None = None) -> Replacement:
    """The replacement of every writer.

    mean:      per-position means over `patching` [n_a, S] (or the given `means` plus `patching`
               for the embedding's mean); the same means Algorithm 1 ablates to
    zero:      zeros
    corrupted: the writers' outputs on `corrupted` [n, S], row i standing in for prompt i
    """
    if kind not in REPLACEMENTS:
        raise ValueError(f"unknown replacement {kind!r}; choose one of {', '.join(REPLACEMENTS)}")
    check_full(model)
    cfg, dev, dtype = model.cfg, model.W_E.device, model.W_E.dtype
    n_writers = 1 + cfg.n_layers * (cfg.n_heads + 1)
    if kind == "zero":
        return Replacement(kind, torch.zeros(n_writers, 1, cfg.d_model, device=dev, dtype=dtype))
    if kind == "corrupted":
        if corrupted is None:
            raise ValueError("corrupted replacement needs corrupted tokens [n, S], paired with the clean prompts")
        outs = writer_outputs(model, corrupted.to(dev))                       # [n_writers, n, S, D]
        return Replacement(kind, outs)
    if patching is None:
        raise ValueError("mean replacement needs the patching prompts (for the embedding's mean)")
    if means is None:
        from circuitlib.core.ablation import mean_activations
        means = mean_activations(model, patching)
    patching = patching.to(dev)
    S = patching.shape[1]
    values = [model.embed(patching).double().mean(0).to(dtype)]
    for l, layer in enumerate(model.layers):
        values += list(torch.einsum("hse,hed->hsd", means.z[l].to(dev, dtype), layer.W_O))
        values.append(means.mlp[l].to(dev, dtype))
    values = torch.stack(values)
    if values.shape[1] != S:
        raise ValueError("means and patching prompts have different lengths")
    return Replacement(kind, values)


@torch.no_grad()
def writer_outputs(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Every writer's output in the full model: [n_writers, n, S, D]."""
    x = model.embed(tokens)
    outs = [x]
    for layer in model.layers:
        z = layer.z(x)                                                        # [n, S, H, E]
        heads = torch.einsum("bshe,hed->hbsd", z, layer.W_O)
        outs += list(heads)
        x = x + heads.sum(0) + layer.attn_bias(slice(0, x.shape[1]))
        m = layer.mlp_out(x)
        outs.append(m)
        x = x + m
    return torch.stack(outs)


# ---- the masked forward pass -----------------------------------------------------------------

def masked_logits(model: Transformer, tokens: torch.Tensor, gates: torch.Tensor, repl: Replacement,
                  node_gates: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Last-position logits [B, V] of the model in which every edge passes `gates` of its writer.

    tokens:     [B, S]
    gates:      [n_edges] in [0, 1] (1 = the writer's output, 0 = its replacement), in
                `graph_for(model).edges` order
    node_gates: [n_nodes] or None (all open), in `graph.nodes` order (heads and MLPs)
    rows:       which prompts of a per-prompt (corrupted) replacement these tokens are
    Differentiable in `gates` and `node_gates`.
    """
    g, cfg = graph_for(model), model.cfg
    H, S = cfg.n_heads, tokens.shape[1]
    if gates.shape != (g.n_edges,):
        raise ValueError(f"gates must have shape [{g.n_edges}] (the edges of this model); got {list(gates.shape)}")
    R = repl.rows(rows)                                            # [n_writers, B or 1, S', D]
    if R.shape[2] != 1:                                            # 1: the same for every position (zero)
        if R.shape[2] < S:
            raise ValueError(f"the replacement covers {R.shape[2]} positions; the prompts have {S}")
        R = R[:, :, :S]
    B, D = tokens.shape[0], cfg.d_model
    # deltas[w] = out[w] - repl[w] (times w's node gate): what writer w adds over its replacement.
    # One buffer, filled writer by writer; a reader block is then one matrix product over its prefix.
    deltas = torch.empty(len(g.writers), B, S, D, device=model.W_E.device, dtype=model.W_E.dtype)
    chunks = []   # the same deltas as autograd tensors, in order, so gradients reach the writers

    def put(w: int, delta: torch.Tensor) -> None:
        with torch.no_grad():
            deltas[w:w + delta.shape[0]] = delta
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
        return base + _MaskedSum.apply(block, deltas, W, last, *used)

    def node(i0: int, k: int) -> torch.Tensor | None:
        return None if node_gates is None else node_gates[i0:i0 + k].view(k, 1, 1, 1)

    def gated(delta: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        return delta if gate is None else delta * gate

    x = model.embed(tokens)
    put(0, (x - R[0])[None].expand(1, B, S, D))
    base = R[0]                                                      # sum of replacements and biases so far
    w = 1
    for l, layer in enumerate(model.layers):
        inp = read(g.attn_gates(gates, l).reshape(3 * H, -1), base).view(3, H, B, S, D)
        heads = _heads(layer, cfg, _norm(layer.ln1, inp))            # [H, B, S, D]
        put(w, gated(heads - R[w:w + H], node(w - 1, H)))
        base = base + R[w:w + H].sum(0)
        if layer.b_O is not None:
            base = base + layer.b_O
        w += H
        m_in = read(g.mlp_gates(gates, l)[None], base)[0]            # [B, S, D]
        m = layer.mlp_out(m_in)
        put(w, gated((m - R[w])[None], node(w - 1, 1)))
        base = base + R[w]
        w += 1
    resid = read(g.out_gates(gates)[None], base[:, -1:], last=True)[0]   # [B, 1, D]
    return model.unembed(resid[:, -1])


class _MaskedSum(torch.autograd.Function):
    """sum_w block[r, w] * deltas[w] for the first W writers, as one matrix product.

    `deltas` is the buffer the writers' deltas are copied into as they are computed; rows below W
    never change afterwards, so the backward pass reads them from it instead of saving copies.
    The autograd tensors of the same deltas (`chunks`, in writer order, covering 0..W-1) are passed
    only to route their gradients.
    """

    @staticmethod
    def forward(ctx, block, deltas, W, last, *chunks):
        ctx.save_for_backward(block)
        ctx.deltas, ctx.W, ctx.last, ctx.sizes = deltas, W, last, [c.shape[0] for c in chunks]
        flat = _prefix(deltas, W, last)                              # [W, B * s * D]
        out = block @ flat
        return out.view(block.shape[0], deltas.shape[1], 1 if last else deltas.shape[2], deltas.shape[3])

    @staticmethod
    def backward(ctx, grad):
        (block,) = ctx.saved_tensors
        g = grad.reshape(grad.shape[0], -1)                          # [r, B * s * D]
        grad_block = g @ _prefix(ctx.deltas, ctx.W, ctx.last).T if ctx.needs_input_grad[0] else None
        grad_flat = (block.T @ g).view(ctx.W, *grad.shape[1:])
        parts = list(torch.split(grad_flat, ctx.sizes))
        covered = sum(ctx.sizes)
        if covered > ctx.W:                                          # the last chunk reaches past W
            parts[-1] = torch.cat([parts[-1], grad_flat.new_zeros(covered - ctx.W, *grad.shape[1:])])
        if ctx.last:                                                 # only the last position was read
            parts = [torch.cat([p.new_zeros(p.shape[0], p.shape[1], ctx.deltas.shape[2] - 1, p.shape[3]), p], 2)
                     for p in parts]
        return (grad_block, None, None, None, *parts)


def _prefix(deltas: torch.Tensor, W: int, last: bool) -> torch.Tensor:
    d = deltas[:W, :, -1:] if last else deltas[:W]
    return d.reshape(W, -1)


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    """The layer's norm on many reader inputs at once (fused kernels: less memory kept for backward)."""
    if norm.rms:
        return F.rms_norm(x, x.shape[-1:], norm.w, norm.eps)
    return F.layer_norm(x, x.shape[-1:], norm.w, norm.b, norm.eps)


def _heads(layer, cfg, h: torch.Tensor) -> torch.Tensor:
    """Head outputs [H, B, S, D] from normalised q, k, v reader inputs h [3, H, B, S, D]."""
    kv = layer.kv_of_head                                           # each query head's K/V head
    q = torch.einsum("hbsd,hde->bhse", h[0], layer.W_Q)
    k = torch.einsum("hbsd,hde->bhse", h[1], layer.W_K[kv])
    v = torch.einsum("hbsd,hde->bhse", h[2], layer.W_V[kv])
    if layer.b_Q is not None:
        q = q + layer.b_Q[:, None]
        k = k + layer.b_K[kv][:, None]
        v = v + layer.b_V[kv][:, None]
    if cfg.arch == "llama":
        q, k = rotate(q, cfg.rotary_base), rotate(k, cfg.rotary_base)
    z = F.scaled_dot_product_attention(q, k, v, is_causal=True)    # [B, H, S, E]
    return torch.einsum("bhse,hed->hbsd", z, layer.W_O)


def kl_loss(full_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(f || g) at the last position, summed over the vocabulary, mean over prompts (differentiable)."""
    return F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(full_logits.float(), -1),
                    log_target=True, reduction="batchmean")


# ---- binary circuits: edges <-> nodes --------------------------------------------------------

def all_open(model: Transformer) -> torch.Tensor:
    return torch.ones(graph_for(model).n_edges, device=model.W_E.device)


def gates_from_edges(model: Transformer, kept: Iterable[int | str]) -> torch.Tensor:
    """A 0/1 gate vector opening the edges `kept` (indices or 'W -> R' names)."""
    g = graph_for(model)
    gates = torch.zeros(g.n_edges, device=model.W_E.device)
    idx = [e if isinstance(e, int) else g.parse_edge(e) for e in kept]
    gates[torch.tensor(idx, dtype=torch.long, device=gates.device)] = 1.0
    return gates


def edges_among(graph: EdgeGraph, nodes: Iterable[str]) -> list[int]:
    """The edges whose writer and reader's node are both in `nodes` (the embedding and the
    logits always count as kept): the edge circuit of a node circuit."""
    nodes = set(nodes) | {EMBED, LOGITS}
    for n in nodes - {EMBED, LOGITS}:
        parse_component(n)
    return [e for e, (w, r) in enumerate(graph.edges)
            if graph.writers[w] in nodes and graph.node_of_reader(r) in nodes]


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
        if any(graph.node_of_reader(graph.edges[e][1]) in alive for e in out_edges.get(w, [])):
            alive.add(name)
    edges = sorted(e for e in kept if graph.writers[graph.edges[e][0]] in alive
                   and graph.node_of_reader(graph.edges[e][1]) in alive)
    nodes = [n for n in graph.nodes if n in alive]
    return edges, nodes


def node_circuit(nodes: Iterable[str]) -> list[str]:
    """Component names for `surgery.prune` ('L.H' and 'MLP L'), in writer order as given."""
    return [n for n in nodes if n not in (EMBED, LOGITS)]


def count_edges(graph: EdgeGraph, nodes: Iterable[str]) -> int:
    """Edges of a node circuit: those among its nodes, the embedding and the logits."""
    return len(edges_among(graph, nodes))


def expected_open(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(gate > 0) of hard-concrete gates (their expected L0 norm), elementwise."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LEFT / RIGHT))


def expected_closed(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(gate = 0) = 1 - `expected_open`, elementwise, computed directly: in float32,
    1 - sigmoid(x) rounds to exactly 0 (and so does its gradient) once x > 16.6, which would
    leave a gate that drifted there with no gradient to close it; sigmoid(-x) keeps both."""
    return torch.sigmoid(BETA * math.log(-LEFT / RIGHT) - log_alpha)


# Hard-concrete gates (Louizos et al. 2018): a stretched, clipped binary concrete variable.
BETA, LEFT, RIGHT = 2 / 3, -0.1, 1.1


def sample_gates(log_alpha: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)


def deterministic_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(log_alpha) * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)
