"""EdgeConfig, the settings of one Edge Pruning training: checked when made (one clear error), the
key of the one settings-checked cache, and the names of every committed result and checkpoint in
results/edges; the gate locations (`gate_logits` in code) read from committed files, which keep
the authors' key `log_alpha`."""

import dataclasses
from pathlib import Path

import pytest
import torch

from circuitlib.discovery.edges.graph import GATE_FILE_KEYS, EdgeGraph
from circuitlib.discovery.edges.train import LEGACY_SETTINGS, EdgeCircuit
from circuitlib.pipeline.edges import EdgeConfig, edge_result_path, gates_path, load_gates

RESULTS = Path(__file__).resolve().parents[2] / "results" / "edges"
STAND_IN = dict(n_layers=30, n_heads=9, n_kv_heads=3)  # smollm2-135m's shape


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(target_sparsity=2.5), "target_sparsity must be a number in [0, 2)"),
        (dict(target_sparsity="x"), "target_sparsity must be a number"),
        (dict(node_target_sparsity=1.0), "(the fraction of nodes removed)"),
        (dict(steps=0), "steps must be a positive whole number, got 0"),
        (dict(steps=2.5), "steps must be a positive whole number, got 2.5"),
        (dict(seed=-1), "seed must be a whole number >= 0"),
        (dict(n=0), "n must be a positive whole number or None, got 0"),
        (dict(batch_size=True), "batch_size must be a positive whole number, got True"),
        (dict(n=8, batch_size=9), "batch_size 9 is larger than the 8 prompts a step draws from (n)"),
        (dict(lr=0), "lr must be a finite number > 0, got 0"),
        (dict(reg_lr=float("nan")), "reg_lr must be a finite number > 0"),
        (dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0"),
        (dict(warmup=11), "warmup 11 is longer than the run (steps 10)"),
        (dict(lr_warmup=10), "lr_warmup must be below steps (10), got 10"),
        (dict(ablation="resample"), "unknown ablation 'resample'; choose one of mean, zero, corrupted"),
        (dict(sparsity_term="l0"), "unknown sparsity_term 'l0'"),
        (dict(clip_grad_norm=0), "clip_grad_norm must be a finite number > 0"),
        (dict(readout="top-k"), "unknown readout 'top-k'"),
        (dict(readout="forced-count", target_sparsity=1.02), "the forced-count readout keeps (1 - target)"),
        (dict(kv_readers="per-head"), "unknown kv_readers 'per-head'"),
        (dict(split_embedding="yes"), "split_embedding must be True, False or None"),
    ],
)
def test_a_bad_setting_is_one_clear_error_when_the_config_is_made(changes, message):
    base = dict(task="ioi", target_sparsity=0.9, steps=10)
    with pytest.raises(ValueError) as refused:
        EdgeConfig(**(base | changes))
    assert message in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(ValueError):  # replace checks again
        EdgeConfig(**base).replace(**changes)


def test_a_config_is_frozen_and_its_defaults_are_the_authors_recipe():
    config = EdgeConfig("ioi", 0.95, 3000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 10
    assert (config.sparsity_term, config.clip_grad_norm, config.readout, config.kv_readers) == (
        "sampled",
        1.0,
        "authors",
        "per-kv-head",
    )
    legacy = EdgeConfig.legacy("ioi", 0.95, 3000, batch_size=8)
    assert {k: getattr(legacy, k) for k in LEGACY_SETTINGS} == LEGACY_SETTINGS and legacy.batch_size == 8
    assert legacy == config.replace(batch_size=8, **LEGACY_SETTINGS)
    assert EdgeConfig("ioi", "0.95", 3000).target_sparsity == 0.95  # a number as text, as the CLI gives it


def committed_results():
    return sorted(p for p in RESULTS.rglob("*.json") if "nodes" not in p.relative_to(RESULTS).parts)


def test_every_committed_result_resolves_through_its_config():
    """Each committed result's name is the name its recorded settings give (so the chapter and
    scripts/edge_runs.py find it), and each result's gate file reads back as gate_logits."""
    results = committed_results()
    assert len(results) >= 5  # the four legacy trainings and the plain-Adam one
    for path in results:
        result = EdgeCircuit.load_json(path)
        if path.parent.name == "plain-adam":  # plain Adam, before weight decay and the LR schedule existed
            with pytest.raises(ValueError, match="lack weight_decay, lr_warmup"):
                EdgeConfig.of(result.settings)
            config = EdgeConfig.of(result.settings | {"weight_decay": 0.0, "lr_warmup": None})
        else:
            config = EdgeConfig.of(result.settings)
            gates = load_gates(gates_path(path))
            assert set(torch.load(gates_path(path), weights_only=True)) == set(GATE_FILE_KEYS.values())
            assert gates["gate_logits"].shape == (result.n_edges_total,)
            assert gates["node_gate_logits"] is None
        assert edge_result_path(path.parent, config) == path, path.name
    legacy = EdgeConfig.legacy("ioi", 0.9, 3000, n=32, batch_size=8)
    assert edge_result_path(RESULTS, legacy).name == "ioi-mean-seed0-n32-bs8-steps3000-target0.9.json"


@pytest.mark.parametrize("target", [0.95, 1.02])
def test_the_committed_authors_recipe_checkpoints_resolve_and_resume(target):
    """The two 3000-step trainings checkpointed at step 450 (scripts/edge_runs.py --task ioi-mixed
    --ablation corrupted --n 200 --batch-size 16 --steps 3000): their names are their configs', their
    recorded training settings are what train_edges asks of these configs, and they hold every key
    train_edges reads back, the gate locations under the authors' key."""
    config = EdgeConfig("ioi-mixed", target, 3000, ablation="corrupted", n=200, batch_size=16)
    path = edge_result_path(RESULTS, config).with_suffix(".ckpt")
    assert path.name == f"ioi-mixed-corrupted-seed0-n200-bs16-steps3000-target{target:g}-sampled-clip1-authors-kv.ckpt"
    saved = torch.load(path, map_location="cpu", weights_only=True)
    n_edges = EdgeGraph.build(**STAND_IN, kv_readers=config.kv_readers).n_edges
    assert {k: v for k, v in saved["settings"].items() if k not in ("tokens", "device")} == {
        "model": "smollm2-135m",
        "replacement": config.ablation,
        "target_sparsity": config.target_sparsity,
        "steps": config.steps,
        "lr": config.lr,
        "reg_lr": config.reg_lr,
        "warmup": round(config.steps * 5 / 6),  # train_edges' default ramp
        "batch_size": config.batch_size,
        "seed": config.seed,
        "init": 10.0,
        "node_target_sparsity": None,
        "n_prompts": config.n,
        "weight_decay": config.weight_decay,
        "lr_warmup": round(config.steps / 15),  # train_edges' default: the authors' 200 of 3000
        "sparsity_term": config.sparsity_term,
        "clip_grad_norm": config.clip_grad_norm,
        "n_edges": n_edges,
    }
    read = {GATE_FILE_KEYS["gate_logits"], GATE_FILE_KEYS["node_gate_logits"], "lambdas", "opt", "reg_opt", "gen"}
    assert read | {"batch_gen", "curve", "step", "seconds", "cpu_seconds", "settings"} == set(saved)
    assert saved["log_alpha"].shape == (n_edges,) and saved[GATE_FILE_KEYS["node_gate_logits"]] is None
    assert saved["step"] == len(saved["curve"]["step"]) == 450
