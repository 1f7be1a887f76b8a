"""Tracr's compiled parameters -> an equivalent `circuitlib.core.model.Transformer`.

A Tracr model is a "gpt2"-family transformer with four differences, all config fields of
`ModelConfig`: bidirectional attention (`causal=False`, the compiler's default), no layer norms
(`normalization=False`), ReLU MLPs (`activation="relu"`) and an unembedding of its own
(`d_vocab_out`): the projection of the residual stream onto the output space, one column per
output value (categorical) or one column holding the value (numerical), built from the residual
space's labels. Attention scores are scaled by 1/sqrt(key size), as in `Layer.z`. Position 0
(BOS) has an all-zero position embedding row, which is copied like any other. Biases exist and
are zero.

Haiku's layout -> TransformerLens's: `query/w [D, H*E]` -> `W_Q [H, D, E]` (also key, value),
`linear/w [H*E, D]` -> `W_O [H, E, D]`, `mlp/linear_1/w [D, M]` -> `W_in`, `linear_2/w [M, D]` -> `W_out`.
"""

from __future__ import annotations

import numpy as np
import torch

from circuitlib.core.model import ModelConfig, Transformer


def from_tracr(assembled, output_columns: list[int], name: str, max_seq_len: int) -> Transformer:
    """An `AssembledTransformerModel` -> a full `Transformer` (float32) computing the same residual stream.

    output_columns: for each output (value), the residual dimension the unembedding reads.
    """
    params = {k: {n: np.asarray(v, dtype=np.float32) for n, v in d.items()} for k, d in assembled.params.items()}
    c = assembled.model_config
    W_E = params["token_embed"]["embeddings"]  # [V_in, D]
    V, D = W_E.shape
    H, E, L = c.num_heads, c.key_size, c.num_layers
    cfg = ModelConfig(
        name=name,
        arch="gpt2",
        n_layers=L,
        d_model=D,
        n_heads=H,
        d_head=E,
        d_mlp=c.mlp_hidden_size,
        d_vocab=V,
        n_ctx=max_seq_len + 1,
        causal=bool(c.causal),
        normalization=False,
        activation="relu",
        d_vocab_out=len(output_columns),
    )
    if c.layer_norm:
        raise ValueError(
            "this Tracr model uses layer norm; circuitlib converts Tracr's compiled models, which have none"
        )
    W_U = np.zeros((D, len(output_columns)), dtype=np.float32)
    W_U[output_columns, np.arange(len(output_columns))] = 1.0
    state = {"W_E": W_E, "W_pos": params["pos_embed"]["embeddings"], "W_U": W_U}
    for l in range(L):
        attn, mlp = f"transformer/layer_{l}/attn/", f"transformer/layer_{l}/mlp/"
        q = f"layers.{l}."
        for ours, theirs in (("Q", "query"), ("K", "key"), ("V", "value")):
            state[q + "W_" + ours] = params[attn + theirs]["w"].reshape(D, H, E).transpose(1, 0, 2)
            state[q + "b_" + ours] = params[attn + theirs]["b"].reshape(H, E)
        state[q + "W_O"] = params[attn + "linear"]["w"].reshape(H, E, D)
        state[q + "b_O"] = params[attn + "linear"]["b"]
        state[q + "W_in"], state[q + "b_in"] = params[mlp + "linear_1"]["w"], params[mlp + "linear_1"]["b"]
        state[q + "W_out"], state[q + "b_out"] = params[mlp + "linear_2"]["w"], params[mlp + "linear_2"]["b"]
    model = Transformer(cfg)
    model.load_state_dict({k: torch.tensor(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    return model.eval()
