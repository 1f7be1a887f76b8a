"""Transformers compiled from RASP programs with Tracr, as circuitlib models with a known circuit.

Tracr (DeepMind's compiler, PyPI `tracr-pypi`) turns a RASP program into transformer weights in
which every head and MLP carries one known operation and reads known subspaces of the residual
stream. That makes it a ground truth against which circuit-finding methods can be scored.

- `programs`: the built-in programs (Edge Pruning's *reverse* and *xproportion*, and more from
  Tracr's library) and a user's program file;
- `compile`: compile once, convert and cache on disk (later loads need neither JAX nor Tracr);
- `convert`: Tracr's parameters -> `circuitlib.core.model.Transformer` (bidirectional, no norms, ReLU,
  own unembedding);
- `truth`: the true components and edges, read from the compiler's own blocks and subspaces;
- `tasks`: the program's input space as a task (batches grouped by length, no padding);
- `distractors`: two programs side by side in one model;
- `scoring`: metrics that fit a program's output, greedy node pruning on compiled models, and its
  scores against the truth.

JAX runs on the CPU: `JAX_PLATFORMS=cpu` is set (unless already set) before anything imports JAX,
and nothing here imports JAX or Tracr until a program has to be compiled.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
