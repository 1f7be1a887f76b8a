"""circuitlib: extract task-specific circuits from language models by greedy ablation, then prune them
for real into smaller standalone models (García-Carrasco, Maté and Trujillo, 2024)."""

__version__ = "0.1.0"
