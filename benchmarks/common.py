"""Shared set-up of the benchmarks: a GPT-2-shaped model, the acronym batch, machine facts, result files.

No GPT-2 weights can be downloaded where these benchmarks were written, so they run on a randomly
initialised model of GPT-2 Small's exact shape (12 layers, 12 heads, d_model 768, vocabulary
50,257): every cost is the same as the real model's; only the circuits differ.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def gpt2_shaped_model():
    """A random model with GPT-2 Small's shape, as a circuitlib Transformer (seed 0)."""
    from circuitlib.core.convert import from_hf
    from circuitlib.models.loading import random_hf_model

    hf = random_hf_model("gpt2", n_layers=12, n_heads=12, d_model=768, d_mlp=3072, vocab_size=50257, n_ctx=1024, seed=0)
    return from_hf(hf, "gpt2-shaped-random")


def acronym_batch(n: int = 250, seed: int = 0):
    """The acronym task's patching and validation prompts with GPT-2's tokenizer: two [n, 11] tensors."""
    from circuitlib.models.loading import gpt2_tokenizer
    from circuitlib.tasks import get_task

    data = get_task("acronyms").generate(gpt2_tokenizer(), n=n, seed=seed)
    return data.patching.tokens, data.validation.tokens


def machine() -> dict:
    """Where a result was measured."""
    from circuitlib.studies.provenance import cpu_name

    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_1min": os.getloadavg()[0],
    }  # > cores: other jobs shared the CPU during the run
    try:
        info["commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
            ).stdout.strip()
            or None
        )
    except OSError:
        info["commit"] = None
    return info


def reset_peak_rss() -> bool:
    """Restart the kernel's count of this process's peak resident memory (Linux); False if it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float:
    """Peak resident memory of this process in GiB (since `reset_peak_rss`, where that worked)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed(fn):
    """(result, seconds) of one call (queued GPU work included: synchronised before and after)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def write_result(name: str, result: dict) -> Path:
    """Write results/<name>.json atomically, with the machine and the date."""
    RESULTS.mkdir(exist_ok=True)
    result = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        **result,
    }
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    return path
