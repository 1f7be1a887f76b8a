"""Weight conversion between Hugging Face models, TransformerLens and `circuitlib.core.model.Transformer`.

circuitlib's own model uses TransformerLens's weight layout, so the TransformerLens direction is a
renaming; the Hugging Face direction reshapes fused or transposed matrices into per-head form.
Only full (unpruned) models are converted; pruned models live as circuitlib files.
"""

from __future__ import annotations

import torch

from circuitlib.core.model import ModelConfig, Transformer


def from_hf(hf_model, name: str) -> Transformer:
    """A `GPT2LMHeadModel` or `LlamaForCausalLM` -> an equivalent full `Transformer` (float32)."""
    c = hf_model.config
    if c.model_type == "gpt2":
        cfg = ModelConfig(
            name=name,
            arch="gpt2",
            n_layers=c.n_layer,
            d_model=c.n_embd,
            n_heads=c.n_head,
            d_head=c.n_embd // c.n_head,
            d_mlp=c.n_inner or 4 * c.n_embd,
            d_vocab=c.vocab_size,
            n_ctx=c.n_positions,
            norm_eps=c.layer_norm_epsilon,
        )
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 models with activation {c.activation_function!r} are not supported")
        state = _gpt2_state(hf_model.state_dict(), cfg)
    elif c.model_type == "llama":
        if getattr(c, "rope_scaling", None):
            raise ValueError("Llama models with rope_scaling are not supported")
        cfg = ModelConfig(
            name=name,
            arch="llama",
            n_layers=c.num_hidden_layers,
            d_model=c.hidden_size,
            n_heads=c.num_attention_heads,
            d_head=c.hidden_size // c.num_attention_heads,
            d_mlp=c.intermediate_size,
            d_vocab=c.vocab_size,
            n_ctx=c.max_position_embeddings,
            n_kv_heads=c.num_key_value_heads,
            norm_eps=c.rms_norm_eps,
            rotary_base=c.rope_theta,
        )
        state = _llama_state(hf_model.state_dict(), cfg)
    else:
        raise ValueError(f"model type {c.model_type!r} is not supported; circuitlib handles 'gpt2' and 'llama'")
    if not getattr(c, "tie_word_embeddings", True):
        raise ValueError("models with an untied unembedding are not supported")
    model = Transformer(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def _gpt2_state(sd: dict, cfg: ModelConfig) -> dict:
    """GPT-2's fused Conv1D weights ([in, out], x @ W) -> per-head TransformerLens layout."""
    H, D, E = cfg.n_heads, cfg.d_model, cfg.d_head
    out = {
        "W_E": sd["transformer.wte.weight"],
        "W_pos": sd["transformer.wpe.weight"],
        "ln_final.w": sd["transformer.ln_f.weight"],
        "ln_final.b": sd["transformer.ln_f.bias"],
    }
    for l in range(cfg.n_layers):
        p, q = f"transformer.h.{l}.", f"layers.{l}."
        W_qkv = sd[p + "attn.c_attn.weight"].reshape(D, 3, H, E).permute(1, 2, 0, 3)  # [3, H, D, E]
        b_qkv = sd[p + "attn.c_attn.bias"].reshape(3, H, E)
        out |= {
            q + "ln1.w": sd[p + "ln_1.weight"],
            q + "ln1.b": sd[p + "ln_1.bias"],
            q + "W_Q": W_qkv[0],
            q + "W_K": W_qkv[1],
            q + "W_V": W_qkv[2],
            q + "b_Q": b_qkv[0],
            q + "b_K": b_qkv[1],
            q + "b_V": b_qkv[2],
            q + "W_O": sd[p + "attn.c_proj.weight"].reshape(H, E, D),
            q + "b_O": sd[p + "attn.c_proj.bias"],
            q + "ln2.w": sd[p + "ln_2.weight"],
            q + "ln2.b": sd[p + "ln_2.bias"],
            q + "W_in": sd[p + "mlp.c_fc.weight"],
            q + "b_in": sd[p + "mlp.c_fc.bias"],
            q + "W_out": sd[p + "mlp.c_proj.weight"],
            q + "b_out": sd[p + "mlp.c_proj.bias"],
        }
    return {k: v.contiguous() for k, v in out.items()}


def _llama_state(sd: dict, cfg: ModelConfig) -> dict:
    """Llama's nn.Linear weights ([out, in], x @ W.T) -> per-head TransformerLens layout."""
    H, K, D, E = cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head
    out = {"W_E": sd["model.embed_tokens.weight"], "ln_final.w": sd["model.norm.weight"]}
    for l in range(cfg.n_layers):
        p, q = f"model.layers.{l}.", f"layers.{l}."
        out |= {
            q + "ln1.w": sd[p + "input_layernorm.weight"],
            q + "W_Q": sd[p + "self_attn.q_proj.weight"].reshape(H, E, D).transpose(1, 2),
            q + "W_K": sd[p + "self_attn.k_proj.weight"].reshape(K, E, D).transpose(1, 2),
            q + "W_V": sd[p + "self_attn.v_proj.weight"].reshape(K, E, D).transpose(1, 2),
            q + "W_O": sd[p + "self_attn.o_proj.weight"].T.reshape(H, E, D),
            q + "ln2.w": sd[p + "post_attention_layernorm.weight"],
            q + "W_gate": sd[p + "mlp.gate_proj.weight"].T,
            q + "W_in": sd[p + "mlp.up_proj.weight"].T,
            q + "W_out": sd[p + "mlp.down_proj.weight"].T,
        }
    return {k: v.contiguous() for k, v in out.items()}


# ---- TransformerLens ------------------------------------------------------------------------

# TransformerLens keeps an [n_ctx, n_ctx] causal mask in every layer: 64 MB per layer for
# SmolLM2's 8192 positions, 2 GB in all. Rotary models have no position weights, so their hooked
# copy gets a shorter context; the task prompts are 10-15 tokens.
HOOKED_ROTARY_CTX = 1024


def hooked_config(cfg: ModelConfig, device: str = "cpu"):
    """The `HookedTransformerConfig` of the same architecture on `device` (rotary models: context capped at 1024)."""
    from transformer_lens import HookedTransformerConfig

    n_ctx = cfg.n_ctx if cfg.arch == "gpt2" else min(cfg.n_ctx, HOOKED_ROTARY_CTX)
    common = dict(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_head=cfg.d_head,
        d_mlp=cfg.d_mlp,
        d_vocab=cfg.d_vocab,
        n_ctx=n_ctx,
        eps=cfg.norm_eps,
        default_prepend_bos=False,
        dtype=torch.float32,
        device=str(device),
        d_vocab_out=cfg.d_vocab_out or -1,
        attention_dir="causal" if cfg.causal else "bidirectional",
    )
    if cfg.arch == "gpt2":
        return HookedTransformerConfig(
            **common,
            act_fn="relu" if cfg.activation == "relu" else "gelu_new",
            normalization_type="LN" if cfg.normalization else None,
            positional_embedding_type="standard",
            original_architecture="GPT2LMHeadModel",
        )
    return HookedTransformerConfig(
        **common,
        act_fn="silu",
        normalization_type="RMS",
        final_rms=True,
        positional_embedding_type="rotary",
        rotary_dim=cfg.d_head,
        rotary_base=cfg.rotary_base,
        rotary_adjacent_pairs=False,
        gated_mlp=True,
        n_key_value_heads=cfg.n_kv_heads if cfg.n_kv_heads != cfg.n_heads else None,
        original_architecture="LlamaForCausalLM",
    )


def to_hooked(model: Transformer):
    """A full `Transformer` -> a `HookedTransformer` with identical weights (for hook-based ablation)."""
    from transformer_lens import HookedTransformer

    if model.kept_heads() != Transformer(model.cfg).kept_heads() or model.kept_mlps() != list(
        range(model.cfg.n_layers)
    ):
        raise ValueError("to_hooked converts full models only; a pruned model is already standalone")
    hooked = HookedTransformer(hooked_config(model.cfg, model.device))
    target = hooked.state_dict()
    state = {}
    for name, value in model.state_dict().items():
        tl_name = _tl_name(name, model.cfg)
        if tl_name is not None:
            state[tl_name] = value
    state["unembed.W_U"] = (model.W_E.detach().T if model.W_U is None else model.W_U.detach()).contiguous()
    for name, value in target.items():  # biases absent in llama, and TransformerLens's own buffers
        state.setdefault(name, torch.zeros_like(value) if name.split(".")[-1].lstrip("_").startswith("b_") else value)
    hooked.load_state_dict(state, strict=True)
    return hooked.eval()


def from_hooked(hooked, name: str) -> Transformer:
    """A `HookedTransformer` loaded without weight processing (`from_pretrained_no_processing`) -> `Transformer`.

    Folded layer norms or centred weights are refused: circuitlib keeps the original parameterisation.
    """
    c = hooked.cfg
    if c.original_architecture not in ("GPT2LMHeadModel", "LlamaForCausalLM"):
        raise ValueError(f"{c.original_architecture} is not supported; circuitlib handles GPT-2 and Llama")
    if c.normalization_type not in ("LN", "RMS"):
        raise ValueError("load the model with HookedTransformer.from_pretrained_no_processing (layer norms folded)")
    arch = "gpt2" if c.original_architecture == "GPT2LMHeadModel" else "llama"
    cfg = ModelConfig(
        name=name,
        arch=arch,
        n_layers=c.n_layers,
        d_model=c.d_model,
        n_heads=c.n_heads,
        d_head=c.d_head,
        d_mlp=c.d_mlp,
        d_vocab=c.d_vocab,
        n_ctx=c.n_ctx,
        n_kv_heads=c.n_key_value_heads or c.n_heads,
        norm_eps=c.eps,
        rotary_base=getattr(c, "rotary_base", 10000.0),
    )
    model = Transformer(cfg)
    tl_state = hooked.state_dict()
    if not torch.allclose(tl_state["unembed.W_U"].T, tl_state["embed.W_E"]):
        raise ValueError("the HookedTransformer's unembedding is not tied to its embedding (processed weights?)")
    model.load_state_dict({n: tl_state[_tl_name(n, cfg)] for n in model.state_dict()}, strict=True)
    return model.eval()


def _tl_name(name: str, cfg: ModelConfig) -> str | None:
    """circuitlib parameter name -> TransformerLens name (None for circuitlib-only buffers)."""
    if name == "W_E":
        return "embed.W_E"
    if name == "W_pos":
        return "pos_embed.W_pos"
    if name.startswith("ln_final."):
        return name
    if name == "W_U":
        return None  # set by to_hooked, which also writes the tied unembedding
    layer, rest = name.split(".", 2)[1], name.split(".", 2)[2]
    grouped = cfg.n_kv_heads != cfg.n_heads
    if rest in ("W_Q", "W_O", "b_Q", "b_O"):
        return f"blocks.{layer}.attn.{rest}"
    if rest in ("W_K", "W_V", "b_K", "b_V"):
        return f"blocks.{layer}.attn.{'_' if grouped else ''}{rest}"
    if rest.startswith(("W_in", "W_out", "W_gate", "b_in", "b_out")):
        return f"blocks.{layer}.mlp.{rest}"
    if rest.startswith(("ln1.", "ln2.")):
        return f"blocks.{layer}.{rest}"
    return None
