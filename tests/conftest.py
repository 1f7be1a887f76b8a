"""Shared fixtures: small random GPT-2-shaped and Llama-shaped models, built offline in-process."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from circuitlib.convert import from_hf

VOCAB = 101


def small_hf_model(arch: str, seed: int = 0, n_layers: int = 3):
    """A random HF model, initialised with a wide spread so that ablations move the KL visibly."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if arch == "gpt2":
            cfg = GPT2Config(n_layer=n_layers, n_head=4, n_embd=32, n_inner=64, vocab_size=VOCAB, n_positions=16,
                             resid_pdrop=0, attn_pdrop=0, embd_pdrop=0, initializer_range=0.2)
            return GPT2LMHeadModel(cfg).eval()
        cfg = LlamaConfig(num_hidden_layers=n_layers, num_attention_heads=6, num_key_value_heads=2, hidden_size=48,
                          intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=16,
                          tie_word_embeddings=True, initializer_range=0.2)
        return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def hf_models():
    return {a: small_hf_model(a) for a in ("gpt2", "llama")}


@pytest.fixture(scope="session")
def models(hf_models):
    return {a: from_hf(m, f"test-{a}") for a, m in hf_models.items()}


@pytest.fixture(scope="session")
def data():
    """Disjoint random patching and validation prompts of one length: [24, 8] and [10, 8]."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (24, 8), generator=g), torch.randint(0, VOCAB, (10, 8), generator=g)
