"""The core: a readable prunable transformer and what acts on it directly.

`model` (the Transformer and its config), `ablation` (component names, mean and zero ablation),
`surgery` (true pruning), `metrics` (KL, accuracy, TPR/FPR, ROC, timing), `convert` (Hugging Face
and TransformerLens conversion), `io` (atomic writes), `resumable` (checkpoints, fingerprints,
locks). Nothing here imports another layer of circuitlib.
"""
