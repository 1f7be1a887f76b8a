"""Circuit discovery methods, one module each: `greedy` (Algorithm 1 of the paper, with its exact fast
path and the TransformerLens reference) and `edges` (Edge Pruning)."""
