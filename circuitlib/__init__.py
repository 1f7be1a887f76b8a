"""circuitlib: extract task-specific circuits from language models, and prune them for real.

The greedy node walk of García-Carrasco, Maté and Trujillo (2024) and Edge Pruning (Bhaskar et al.
2024) on a readable transformer, with true pruning into smaller standalone models. The package is
built in layers whose imports point one way (tested in tests/library/test_layers.py):

    core/       the model, component names, ablation, surgery, metrics, conversion, atomic I/O
    tasks/      the paper's tasks and tasks read from files          models/   model loading
    discovery/  the greedy walk (`greedy`) and Edge Pruning (`edges/`)
    pipeline/   one extraction end to end, saved run folders, ONNX export
    studies/    specs, the results store, the runner, analysis, derived data, distillation
    plots, cli  figures and the command line, on top

The names below are the public API, loaded on first use (so `python -m circuitlib` and
`import circuitlib` stay fast):

    import circuitlib as cl
    model, tokenizer = cl.load_model("smollm2-135m")
    data = cl.get_task("ioi").generate(tokenizer, n=150, seed=0)
    circuit = cl.extract(model, data.patching.tokens, data.validation.tokens, alpha=0.01, ablation="mean")
    pruned = cl.prune(model, circuit.kept, "mean", cl.mean_activations(model, data.patching.tokens))
"""

from __future__ import annotations

import importlib

from circuitlib.version import __version__

# public name -> the module that defines it
_API = {
    # core
    "ModelConfig": "core.model",
    "Transformer": "core.model",
    "head_name": "core.components",
    "mlp_name": "core.components",
    "parse_component": "core.components",
    "parse_head": "core.components",
    "is_mlp": "core.components",
    "Means": "core.ablation",
    "mean_activations": "core.ablation",
    "hooked_last_logits": "core.ablation",
    "prune": "core.surgery",
    "log_probs": "core.metrics",
    "kl_divergence": "core.metrics",
    "kl_per_prompt": "core.metrics",
    "accuracy": "core.metrics",
    "tpr_fpr": "core.metrics",
    "roc_curve": "core.metrics",
    "roc_auc": "core.metrics",
    "time_forward": "core.metrics",
    "logit_difference": "core.metrics",
    "probability_difference": "core.metrics",
    "normalised_faithfulness": "core.metrics",
    "faithfulness_areas": "core.metrics",
    "from_hf": "core.convert",
    "to_hooked": "core.convert",
    "from_hooked": "core.convert",
    # models and tasks
    "load_model": "models.loading",
    "MODEL_NAMES": "models.loading",
    "get_task": "tasks",
    "register_task": "tasks",
    "load_task_file": "tasks",
    "Task": "tasks",
    "TaskSplit": "tasks",
    "TaskData": "tasks",
    "make_split": "tasks",
    "TASK_NAMES": "tasks",
    "standard_metric": "tasks.measures",
    "standard_metric_name": "tasks.measures",
    "best_constant_answer": "tasks.measures",
    "constant_answer_metric": "tasks.measures",
    # compiled programs: a known circuit
    "load_compiled": "models.compiled.compile",
    "truth_components": "models.compiled.truth",
    "structural_edges": "models.compiled.truth",
    "functional_edges": "models.compiled.truth",
    "side_by_side": "models.compiled.distractors",
    "CompiledTask": "tasks.compiled",
    # discovery
    "extract": "discovery.greedy",
    "sweep": "discovery.greedy",
    "traversal": "discovery.greedy",
    "Circuit": "discovery.greedy",
    "Decision": "discovery.greedy",
    "graph_for": "discovery.edges.graph",
    "count_edges": "discovery.edges.graph",
    "make_replacement": "discovery.edges.graph",
    "sample_gates": "discovery.edges.graph",
    "deterministic_gates": "discovery.edges.graph",
    "expected_open": "discovery.edges.graph",
    "train_edges": "discovery.edges.train",
    "EdgeConfig": "pipeline.edges",
    "run_edges": "pipeline.edges",
    "EdgeCircuit": "discovery.edges.train",
    "edge_logits": "discovery.edges.train",
    "corrupt": "discovery.edges.train",
    "edge_result": "pipeline.edges",
    "edge_result_path": "pipeline.edges",
    "gates_path": "pipeline.edges",
    "load_gates": "pipeline.edges",
    "standalone_model": "discovery.edges.train",
    "binarize": "discovery.edges.train",
    "reread": "pipeline.edges",
    # pipeline
    "ExtractionConfig": "pipeline.extraction",
    "run_extraction": "pipeline.extraction",
    "load_run": "pipeline.extraction",
    "evaluate_saved": "pipeline.extraction",
    "full_reference": "pipeline.extraction",
    "measure": "pipeline.extraction",
    "export_onnx": "pipeline.export",
    "groundtruth_report": "pipeline.groundtruth",
    "failure_modes": "pipeline.groundtruth",
    "edge_recovery_table": "pipeline.groundtruth",
    "load_edge_runs": "pipeline.groundtruth",
    # studies
    "load_spec": "studies.spec",
    "parse_spec": "studies.spec",
    "run_study": "studies.runner",
    "study_table": "studies.runner",
    "study_status": "studies.runner",
    "paper_alphas": "studies.analysis",
    "alpha_study": "studies.analysis",
    "evaluate_kept": "studies.analysis",
    "bootstrap_interval": "studies.analysis",
    "with_intervals": "studies.analysis",
    "tpr_fpr_by_alpha": "studies.analysis",
    "top_heads": "studies.analysis",
    "time_pair": "studies.analysis",
    "choose_alpha": "studies.analysis",
    "config_label": "studies.analysis",
    "spread_over_batches": "studies.analysis",
    "kept_overlap": "studies.analysis",
    "intervals": "studies.analysis",
    "compare_orders": "studies.analysis",
    "prompt_flips": "studies.analysis",
    "attention_mass": "studies.analysis",
    "attention_targets": "studies.analysis",
    "standard_metrics_table": "studies.derived",
    "faithfulness_area_table": "studies.derived",
    "reference_metrics": "studies.derived",
    "head_effects": "studies.derived",
    "random_baselines": "studies.derived",
    "random_metrics": "studies.derived",
    "student_layers": "studies.distill",
    "student_parameters": "studies.distill",
    "layers_within": "studies.distill",
    "baseline_path": "studies.distill",
    "distilled_student": "studies.distill",
    "machine": "studies.provenance",
    # figures
    "circuit_grid": "plots",
    "roc_plot": "plots",
    "circuit_graph": "plots",
    "plot_vs_alpha": "plots",
    "plot_accuracy_vs_size": "plots",
}
_SUBPACKAGES = ("core", "tasks", "models", "discovery", "pipeline", "studies", "plots")

__all__ = ["__version__", *_API, *_SUBPACKAGES]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f"circuitlib.{_API[name]}"), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"circuitlib.{name}")
    else:
        raise AttributeError(f"module 'circuitlib' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
