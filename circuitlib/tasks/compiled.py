"""A compiled program's input space as a task: every input, grouped by length, with its outputs.

An input is BOS followed by 1..max_seq_len tokens of the program's vocabulary (a program may
restrict its domain, e.g. sort_unique takes distinct tokens only). Compiled models have no
padding mask, so inputs of different lengths never share a batch: `inputs` gives one LongTensor
[n_L, L + 1] per length L. `sample` draws a seeded subset per length (all of them up to a cap).

The reference outputs are the full model's (equal to Tracr's own, tested). Accuracy compares the
decoded output at every position but BOS: the argmax over the output values (categorical), or the
value within `atol` (numerical; Edge Pruning's criterion for xproportion is 0.05).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import product

import torch

from circuitlib.models.compiled.compile import Compiled, load_compiled
from circuitlib.models.compiled.programs import MODEL_PREFIX


@dataclass
class CompiledTask:
    """The task of a compiled program: its name is "tracr-<program>", like its model's."""

    compiled: Compiled

    @property
    def name(self) -> str:
        return self.compiled.name

    def inputs(self, lengths: list[int] | None = None, cap: int | None = None, seed: int = 0) -> list[torch.Tensor]:
        """Token ids [n_L, L + 1] (BOS first) of every valid input of each length in `lengths` (default: all).

        cap: at most this many inputs per length, drawn without replacement with `seed` (None: all).
        """
        info, program = self.compiled.info, self.compiled.program
        lengths = list(range(1, info.max_seq_len + 1)) if lengths is None else lengths
        bad = [L for L in lengths if not 1 <= L <= info.max_seq_len]
        if bad:
            raise ValueError(f"lengths {bad} are outside 1..{info.max_seq_len} (the program's max_seq_len)")
        rng, out = random.Random(seed), []
        for L in lengths:
            seqs = [
                s for s in product(info.vocab, repeat=L) if program is None or program.valid is None or program.valid(s)
            ]
            if cap is not None and len(seqs) > cap:
                seqs = rng.sample(seqs, cap)
            if seqs:
                out.append(torch.tensor([info.encode(s) for s in seqs]))
        return out


def accuracy(compiled: Compiled, full: torch.Tensor, other: torch.Tensor, atol: float = 0.05) -> float:
    """Fraction of inputs whose output at every position but BOS matches the full model's (outputs [B, S, V])."""
    if compiled.info.categorical:
        same = (full[:, 1:].argmax(-1) == other[:, 1:].argmax(-1)).all(-1)
    else:
        same = ((full[:, 1:, 0] - other[:, 1:, 0]).abs() <= atol).all(-1)
    return float(same.float().mean())


def get_compiled_task(name: str) -> CompiledTask:
    """The task "tracr-<program>" (or a program's name or file)."""
    return CompiledTask(load_compiled(name[len(MODEL_PREFIX) :] if name.startswith(MODEL_PREFIX) else name))
