"""Two compiled programs side by side in one model: a circuit benchmark with busy, irrelevant components.

In a plain compiled model every nonzero component is in the circuit. `side_by_side(target,
distractor)` builds one model that runs both programs on the same input: the residual stream is
the two residual streams stacked (block-diagonal: each program's heads and MLPs read and write
only its own block), layer l holds the target's heads and then the distractor's (heads padded to
one d_head with zeros), its MLP is both MLPs in parallel, and the unembedding reads the target's
output only. Both programs start at layer 0, so their components are active in the same layers.

Tokens: the model takes the target's token ids; the distractor sees, for the target's i-th
vocabulary token, its own i-th token (the vocabularies must have the same size; BOS and PAD map
to BOS and PAD). Inputs are at most the shorter of the two max_seq_lens.

The truth is the target's components (same names: its heads keep their indices); the
distractor's heads are "L.(H_target + h)" and its MLP neurons share "MLP L" with the target's, so
an MLP layer used by both counts as the target's (a node method cannot split it). Residual
labels of the distractor block are prefixed "distractor/".
"""

from __future__ import annotations

import copy

import torch

from circuitlib.core.components import head_name, parse_component
from circuitlib.core.model import ModelConfig, Transformer
from circuitlib.models.compiled.compile import Compiled, CompiledInfo


@torch.no_grad()
def side_by_side(target: Compiled, distractor: Compiled) -> tuple[Compiled, list[str], list[int]]:
    """The combined model (a Compiled whose truth is the target's), the distractor's component names, and the
    distractor's token id for each of the target's token ids."""
    a, b, ia, ib = target.model, distractor.model, target.info, distractor.info
    if len(ia.vocab) != len(ib.vocab):
        raise ValueError(
            f"the programs' vocabularies differ in size ({len(ia.vocab)} vs {len(ib.vocab)}); "
            "pair programs whose vocabularies have the same size"
        )
    A, B = a.cfg, b.cfg
    L, H, E = max(A.n_layers, B.n_layers), A.n_heads + B.n_heads, max(A.d_head, B.d_head)
    D, M = A.d_model + B.d_model, A.d_mlp + B.d_mlp
    n_ctx = min(A.n_ctx, B.n_ctx)
    cfg = ModelConfig(
        name=f"{A.name}+{B.name}",
        arch="gpt2",
        n_layers=L,
        d_model=D,
        n_heads=H,
        d_head=E,
        d_mlp=M,
        d_vocab=A.d_vocab,
        n_ctx=n_ctx,
        causal=False,
        normalization=False,
        activation="relu",
        d_vocab_out=A.d_vocab_out,
    )
    model = Transformer(cfg).eval()
    ids_b, order_a = {t: i for t, i in ib.token_ids}, {t: k for k, t in enumerate(ia.vocab)}
    # target token id -> distractor token id (the i-th vocabulary token to the i-th; BOS, PAD to themselves)
    to_b = [ids_b[ib.vocab[order_a[t]] if t in order_a else t] for t, _ in sorted(ia.token_ids, key=lambda p: p[1])]
    da = slice(0, A.d_model)
    db = slice(A.d_model, D)
    model.W_E[:, da] = a.W_E
    model.W_E[:, db] = b.W_E[to_b]
    model.W_pos[:, da], model.W_pos[:, db] = a.W_pos[:n_ctx], b.W_pos[:n_ctx]
    model.W_U[da] = a.W_U
    for src, rows, heads, hidden, n in (
        (a, da, slice(0, A.n_heads), slice(0, A.d_mlp), A),
        (b, db, slice(A.n_heads, H), slice(A.d_mlp, M), B),
    ):
        for l in range(n.n_layers):
            new, old = model.layers[l], src.layers[l]
            for name in ("W_Q", "W_K", "W_V"):
                getattr(new, name)[heads, rows, : n.d_head] = getattr(old, name)
                getattr(new, name.replace("W", "b"))[heads, : n.d_head] = getattr(old, name.replace("W", "b"))
            new.W_O[heads, : n.d_head, rows] = old.W_O
            new.b_O[rows] += old.b_O
            new.W_in[rows, hidden], new.b_in[hidden] = old.W_in, old.b_in
            new.W_out[hidden, rows] = old.W_out
            new.b_out[rows] += old.b_out
    structure = copy.deepcopy(ia.structure)
    info = CompiledInfo(
        **{
            **ia.__dict__,
            "program": f"{ia.program}+{ib.program}",
            "max_seq_len": n_ctx - 1,
            "residual_labels": ia.residual_labels + [f"distractor/{x}" for x in ib.residual_labels],
            "structure": structure,
        }
    )
    others = []
    for name in ib.structure["components"]:
        layer, head = parse_component(name)
        others.append(name if head is None else head_name(layer, A.n_heads + head))
    return Compiled(model, info, target.program), others, to_b
