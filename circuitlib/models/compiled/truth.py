"""The ground-truth circuit of a compiled program, read from the compiler, never typed by hand.

**Components.** Tracr's craft graph gives every RASP operation a block: an attention head, an MLP,
or (SelectorWidth) a head followed by an MLP. Its assembler allocates blocks to half-layers
(`craft_graph_to_model._allocate_modules_to_layers`), puts the heads of one half-layer side by
side (in that order) and the MLPs of one half-layer in parallel into one MLP, and numbers the
layers by skipping empty half-layers (`assemble._get_model_config_and_module_names`).
`read_structure` repeats exactly that bookkeeping and records, per head "L.H" and MLP "MLP L", the
RASP operations it carries and the residual directions it writes and reads (a head's query, key
and value separately). Heads Tracr pads a layer with (all-zero weights) carry nothing.

**Edges** go from a writer ("embed": token embedding, which also writes the constant direction
`one`; "pos": position embedding; a head "L.H"; an MLP "MLP L") to a reader ("L.H.q", "L.H.k",
"L.H.v", "MLP L", "logits"), as in `circuitlib.discovery.edges.graph`, except that the two embeddings are two
writers (`merge_embeddings` joins them into Edge Pruning's single "embed" writer).

- *structural* (`structural_edges`): the reader's weights are nonzero on a residual direction the
  writer writes (the reader's rows in W_Q, W_K, W_V or W_in; the logits read the output space).
  Every such direction lies in the subspaces the compiler declared for both (tested).
- *BOS plumbing*: every categorical or numerical Aggregate attends to BOS by default; the
  compiler adds `one` and `tokens:BOS` to the query and `tokens:BOS` to the key for this. The edges
  that carry only those directions ("embed -> L.H.q", "embed -> L.H.k") are BOS plumbing;
  `bos_plumbing=False` leaves them out (an edge that also carries other directions stays).
- *functional* (`functional_edges`): the structural edges whose single removal changes the output
  on some input of the input space, with the removed edge zero-ablated (the reader no longer
  receives that writer's output; Edge Pruning's Tracr setting). "Changes" = a different decoded
  output at some position but BOS (categorical) or a value moved by more than `atol` (numerical).

The true components (`truth_components`) are the heads and MLPs that carry an operation.
"""

from __future__ import annotations

from itertools import product

import torch
import torch.nn.functional as F

from circuitlib.core.components import head_name, mlp_name, parse_component
from circuitlib.core.model import Transformer

EMBED, POS, LOGITS = "embed", "pos", "logits"
KINDS = ("q", "k", "v")


# ---- reading the compiler (needs Tracr; runs once, at compile time) ------------------------------


def read_structure(graph, sources, craft_model, sink) -> dict:
    """Per component, the RASP operations it carries and the directions it writes and reads (JSON-ready).

    {"components": {"0.0": {"ops": [...], "writes": [...], "reads": {"q": [...], "k": [...], "v": [...]}},
                    "MLP 0": {"ops": [...], "writes": [...], "reads": {"in": [...]}}, ...},
     "output": [directions the logits read]}
    """
    from tracr.compiler import assemble, craft_graph_to_model, nodes
    from tracr.craft import transformers

    def labels(space) -> list[str]:
        return sorted(direction_label(d) for d in space.basis)

    _, module_names = assemble._get_model_config_and_module_names(craft_model)
    allocation = craft_graph_to_model._allocate_modules_to_layers(graph, sources)
    half_layers = sorted(
        {
            a + i
            for node_id, a in allocation.items()
            if a >= 0
            for i in range(
                2 if isinstance(graph.nodes[node_id].get(nodes.MODEL_BLOCK), transformers.SeriesWithResiduals) else 1
            )
        }
    )
    layer_of_half = {h: int(name.split("_")[1].split("/")[0]) for h, name in zip(half_layers, module_names)}
    components: dict[str, dict] = {}

    def add(name: str, op: str, writes: list[str], reads: dict) -> None:
        c = components.setdefault(name, {"ops": [], "writes": [], "reads": {k: [] for k in reads}})
        c["ops"].append(op)
        c["writes"] = sorted(set(c["writes"]) | set(writes))
        for k, v in reads.items():
            c["reads"][k] = sorted(set(c["reads"][k]) | set(v))

    for node_id, half in allocation.items():
        if half < 0:
            continue
        node = graph.nodes[node_id]
        block, op = node[nodes.MODEL_BLOCK], node[nodes.EXPR].label
        parts = block.blocks if isinstance(block, transformers.SeriesWithResiduals) else [block]
        for offset, part in enumerate(parts):
            layer = layer_of_half[half + offset]
            if isinstance(part, transformers.MLP):
                add(mlp_name(layer), op, labels(part.snd.output_space), {"in": labels(part.fst.input_space)})
                continue
            module = craft_model.blocks[half_layers.index(half + offset)]
            order = list(module.as_multi().heads())
            for head in part.as_multi().heads():
                h = next(i for i, other in enumerate(order) if other is head)
                add(
                    head_name(layer, h),
                    op,
                    labels(head.w_ov.output_space),
                    {
                        "q": labels(head.w_qk.left_space),
                        "k": labels(head.w_qk.right_space),
                        "v": labels(head.w_ov.input_space),
                    },
                )
    return {
        "components": dict(sorted(components.items(), key=lambda kv: _rank(kv[0]))),
        "output": sorted(direction_label(d) for d in sink[nodes.OUTPUT_BASIS]),
    }


def direction_label(direction) -> str:
    """A Tracr basis direction -> "name:value" (or "name" when it has no value)."""
    return direction.name if direction.value is None else f"{direction.name}:{direction.value}"


def _rank(name: str) -> tuple:
    """When a writer writes or a node reads: embeddings first, then per layer its heads, then its MLP; logits last."""
    if name in (EMBED, POS):
        return (-1, 0, 0)
    if name == LOGITS:
        return (10**6, 0, 0)
    layer, head = parse_component(name)
    return (layer, 0 if head is not None else 1, head or 0)


def node_of(reader: str) -> str:
    """The node a reader belongs to: "L.H" for "L.H.q/k/v", else the reader itself."""
    return reader if reader == LOGITS or reader.startswith("MLP") else reader.rsplit(".", 1)[0]


def precedes(writer: str, reader: str) -> bool:
    """Is `writer` computed before `reader` reads the residual stream? (heads of one layer read together)"""
    return _rank(writer)[:2] < _rank(node_of(reader))[:2]


# ---- the truth (no Tracr needed) -------------------------------------------------------------------


def truth_components(info) -> list[str]:
    """Heads "L.H" and MLPs "MLP L" that carry a RASP operation, in computation order."""
    return list(info.structure["components"])


def writer_directions(info) -> dict[str, set[str]]:
    """What each writer writes: the embeddings' directions, then every component's declared output space."""
    labels = info.residual_labels
    out = {
        EMBED: {d for d in labels if d.startswith("tokens:") or d == "one"},
        POS: {d for d in labels if d.startswith("indices:")},
    }
    for name, c in info.structure["components"].items():
        out[name] = set(c["writes"])
    return out


def reader_directions(info, model: Transformer) -> dict[str, set[str]]:
    """What each reader's weights are nonzero on: rows of W_Q, W_K, W_V (per head), W_in; the logits' W_U."""
    labels = info.residual_labels
    out = {}
    for name in truth_components(info):
        layer, head = parse_component(name)
        L = model.layers[layer]
        if head is None:
            out[name] = {labels[d] for d in L.W_in.abs().sum(1).nonzero().flatten().tolist()}
            continue
        for kind, W in zip(KINDS, (L.W_Q, L.W_K, L.W_V)):
            out[f"{name}.{kind}"] = {labels[d] for d in W[head].abs().sum(1).nonzero().flatten().tolist()}
    out[LOGITS] = {labels[d] for d in model.W_U.abs().sum(1).nonzero().flatten().tolist()}
    return out


def bos_directions(info) -> dict[str, set[str]]:
    """The directions of the BOS plumbing per reader kind: `one` and `tokens:BOS` into Q, `tokens:BOS` into K."""
    bos = next(f"tokens:{t}" for t, i in info.token_ids if i == info.bos_id)
    return {"q": {"one", bos}, "k": {bos}}


def structural_edges(info, model: Transformer, bos_plumbing: bool = True) -> list[str]:
    """Edges "WRITER -> READER" along which a writer's directions reach nonzero reader weights (see module doc)."""
    writes, reads = writer_directions(info), reader_directions(info, model)
    plumbing = bos_directions(info)
    edges = []
    for reader, seen in reads.items():
        kind = reader.rsplit(".", 1)[1] if node_of(reader) != reader else None
        for writer, written in writes.items():
            shared = written & seen if precedes(writer, reader) else set()
            if not bos_plumbing and writer == EMBED and kind in plumbing:
                shared -= plumbing[kind]
            if shared:
                edges.append(f"{writer} -> {reader}")
    return sorted(edges, key=_edge_order)


def _edge_order(edge: str) -> tuple:
    writer, reader = edge.split(" -> ")
    return _rank(node_of(reader)), reader, _rank(writer)


def merge_embeddings(edges: list[str]) -> list[str]:
    """Edges with "pos" folded into "embed" (circuitlib.discovery.edges.graph has one embedding writer), each once."""
    return sorted({e.replace(f"{POS} -> ", f"{EMBED} -> ") for e in edges}, key=_edge_order)


# ---- a forward pass with edges removed -------------------------------------------------------------


def writers_of(model: Transformer) -> list[str]:
    cfg = model.cfg
    names = [EMBED, POS]
    for l in range(cfg.n_layers):
        names += [head_name(l, h) for h in range(cfg.n_heads)] + [mlp_name(l)]
    return names


@torch.no_grad()
def edge_forward(model: Transformer, tokens: torch.Tensor, removed: set[str] | frozenset = frozenset()) -> torch.Tensor:
    """Outputs [B, S, V] of a full compiled model in which every edge in `removed` is zero-ablated.

    Each reader gets its own sum of the writers' outputs, without those along removed edges. The
    attention output bias b_O reaches every later reader (it belongs to no head, as in
    `circuitlib.discovery.edges.graph`).
    Only models without normalisation (Tracr's) are handled; attention follows `cfg.causal`.
    """
    cfg = model.cfg
    if cfg.normalization:
        raise ValueError("edge_forward handles models without normalisation (compiled Tracr models)")
    S = tokens.shape[1]
    outs = {EMBED: model.W_E[tokens], POS: model.W_pos[:S].expand(len(tokens), S, cfg.d_model)}
    bias = torch.zeros(cfg.d_model)

    def read(reader: str) -> torch.Tensor:
        return bias + sum(out for w, out in outs.items() if f"{w} -> {reader}" not in removed)

    for l, layer in enumerate(model.layers):
        q, k, v = ([read(f"{head_name(l, h)}.{kind}") for h in range(cfg.n_heads)] for kind in KINDS)
        q = torch.einsum("hbsd,hde->bhse", torch.stack(q), layer.W_Q) + layer.b_Q[:, None]
        k = torch.einsum("hbsd,hde->bhse", torch.stack(k), layer.W_K) + layer.b_K[:, None]
        v = torch.einsum("hbsd,hde->bhse", torch.stack(v), layer.W_V) + layer.b_V[:, None]
        z = F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal)  # [B, H, S, E]
        heads = torch.einsum("bhse,hed->hbsd", z, layer.W_O)
        for h in range(cfg.n_heads):
            outs[head_name(l, h)] = heads[h]
        bias = bias + layer.b_O
        outs[mlp_name(l)] = layer.mlp_out(read(mlp_name(l)))
    return model.unembed(read(LOGITS))


def output_changed(info, full: torch.Tensor, other: torch.Tensor, atol: float = 1e-3) -> torch.Tensor:
    """Per input [B]: does `other` decode differently from `full` at some position but BOS? (outputs [B, S, V])"""
    if info.categorical:
        return (full[:, 1:].argmax(-1) != other[:, 1:].argmax(-1)).any(-1)
    return ((full[:, 1:, 0] - other[:, 1:, 0]).abs() > atol).any(-1)


def functional_edges(
    info, model: Transformer, inputs: list[torch.Tensor], bos_plumbing: bool = True, atol: float = 1e-3
) -> list[str]:
    """The structural edges whose single zero-ablation changes the output on some input (batches by length)."""
    found = []
    full = [model(tokens) for tokens in inputs]
    for edge in structural_edges(info, model, bos_plumbing):
        if any(
            output_changed(info, f, edge_forward(model, tokens, {edge}), atol).any() for f, tokens in zip(full, inputs)
        ):
            found.append(edge)
    return found


def all_edges(model: Transformer) -> list[str]:
    """Every possible edge of the model's shape (writer before reader), with separate token and position writers."""
    cfg = model.cfg
    readers = [f"{head_name(l, h)}.{k}" for l in range(cfg.n_layers) for k in KINDS for h in range(cfg.n_heads)]
    readers += [mlp_name(l) for l in range(cfg.n_layers)] + [LOGITS]
    edges = [f"{w} -> {r}" for r, w in product(readers, writers_of(model)) if precedes(w, r)]
    return sorted(edges, key=_edge_order)
