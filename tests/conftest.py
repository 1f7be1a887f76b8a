"""Shared fixtures: small random GPT-2-shaped and Llama-shaped models, built offline in-process."""

import importlib.util
import signal
import socket
from pathlib import Path

import pytest
import torch

from circuitlib.core.convert import from_hf
from circuitlib.models.loading import random_hf_model

VOCAB = 101


def small_hf_model(arch: str, seed: int = 0, n_layers: int = 3):
    """A random HF model (Llama: 6 query heads sharing 2 K/V heads), with a wide initialisation so that
    ablations move the KL visibly."""
    shape = (
        dict(n_heads=4, d_model=32, d_mlp=64) if arch == "gpt2" else dict(n_heads=6, n_kv_heads=2, d_model=48, d_mlp=64)
    )
    return random_hf_model(arch, n_layers=n_layers, vocab_size=VOCAB, n_ctx=16, seed=seed, init_std=0.2, **shape)


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


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def interruptible():
    """`subprocess.Popen` keyword arguments for a child that a test interrupts with SIGINT, as Ctrl-C does.

    A shell without job control starts a background command with SIGINT ignored, CI may run the tests
    that way, and a Python started with SIGINT ignored never raises KeyboardInterrupt: the child gets
    the default disposition back before it starts."""
    return {"preexec_fn": _default_sigint}


@pytest.fixture(scope="session")
def load_script():
    """``load_script("run_notebook")``: a script of scripts/ imported as a module (they are not a package)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
