"""Device plumbing: loading, extraction (fast path and sweep), pruning, measuring, studies and Edge Pruning on
every device torch sees here. On a machine without a GPU the CUDA cases are skipped; run this file
on a GPU machine to check them (book/studies.md, section GPU)."""

import copy

import pytest
import torch

from circuitlib.core.ablation import mean_activations
from circuitlib.core.surgery import prune
from circuitlib.discovery.greedy import sweep
from circuitlib.models.loading import check_device, load_model

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA GPU here"))]
ALPHAS = [0.0, 1e-3, 1e-2, 1e-1]


def test_a_missing_or_unknown_device_is_refused_before_loading():
    if not CUDA:
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            load_model("tiny-gpt2", device="cuda")
    with pytest.raises(ValueError, match="unknown device|not supported"):
        check_device("tpu")
    assert check_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_sweep_prune_and_measure_on_device_agree_with_cpu(models, data, arch, ablation, device):
    cpu_model = models[arch]
    model = copy.deepcopy(cpu_model).to(device)
    patching, validation = data
    expected = sweep(cpu_model, patching, validation, ALPHAS, ablation=ablation, include_mlps=True, progress=False)
    got = sweep(model, patching, validation, ALPHAS, ablation=ablation, include_mlps=True, progress=False)
    assert [c.kept for c in got] == [c.kept for c in expected]
    for g, e in zip(got, expected):
        assert [d.kl_after for d in g.decisions] == pytest.approx([d.kl_after for d in e.decisions], abs=1e-5)
    means_cpu = mean_activations(cpu_model, patching) if ablation == "mean" else None
    means = mean_activations(model, patching) if ablation == "mean" else None
    if means is not None:
        assert means.z.device.type == torch.device(device).type
    kept = got[1].kept
    on_device = prune(model, kept, ablation, means)
    on_cpu = prune(cpu_model, kept, ablation, means_cpu)
    assert next(on_device.parameters()).device.type == torch.device(device).type
    with torch.inference_mode():
        torch.testing.assert_close(
            on_device(validation.to(device), last_only=True).cpu(),
            on_cpu(validation, last_only=True),
            atol=1e-4,
            rtol=1e-4,
        )


@pytest.mark.parametrize("device", DEVICES)
def test_run_extraction_on_device(device):
    from circuitlib.pipeline.extraction import ExtractionConfig, run_extraction

    result = run_extraction(ExtractionConfig("tiny-gpt2", "ioi", alpha=0.01, n=4), progress=False, device=device)
    assert result.settings["device"].startswith(device)
    assert result.pruned.device.type == device
    assert 0.0 <= result.metrics["pruned"]["test"]["accuracy"] <= 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_a_study_unit_on_device(tmp_path, device):
    from circuitlib.studies.runner import run_study, study_table
    from circuitlib.studies.spec import parse_spec

    spec = parse_spec(
        {
            "model": "tiny-gpt2",
            "tasks": ["ioi"],
            "alphas": [0.01, 0.1],
            "n": 4,
            "device": device,
            "store": str(tmp_path / "store"),
        }
    )
    assert run_study(spec, workers=0, progress=False)["failed"] == []
    row = study_table(spec).iloc[0]
    assert row["device"] == device and row["torch_threads"] == 1


@pytest.mark.parametrize("device", DEVICES)
def test_edge_pruning_on_device(models, data, arch, device):
    """The masked model, its node-ablation equivalence and a short training on each device (the gate
    noise comes from a generator on the device, so a CUDA training is reproducible, not CPU-equal)."""
    from circuitlib.discovery.edges.graph import all_open, graph_for, make_replacement, masked_logits
    from circuitlib.discovery.edges.train import train_edges

    cpu_model = models[arch]
    model = copy.deepcopy(cpu_model).to(device)
    patching, validation = data
    repl = make_replacement(model, "mean", patching=patching.to(device))
    with torch.no_grad():
        open_logits = masked_logits(model, validation.to(device), all_open(model), repl)
        assert open_logits.device.type == device
        torch.testing.assert_close(open_logits.cpu(), cpu_model(validation, last_only=True), atol=1e-4, rtol=1e-4)
        closed = masked_logits(model, validation.to(device), torch.zeros_like(all_open(model)), repl)
        repl_cpu = make_replacement(cpu_model, "mean", patching=patching)
        closed_cpu = masked_logits(cpu_model, validation, torch.zeros(graph_for(cpu_model).n_edges), repl_cpu)
        torch.testing.assert_close(closed.cpu(), closed_cpu, atol=1e-4, rtol=1e-4)
    kw = dict(target_sparsity=0.5, steps=3, batch_size=4, seed=0, progress=False)
    first, again = train_edges(model, validation, repl, **kw), train_edges(model, validation, repl, **kw)
    assert first.gate_logits.device.type == device
    # reproducible (to float error: a GPU's reductions may add in another order from run to run)
    torch.testing.assert_close(first.gate_logits, again.gate_logits, atol=1e-5, rtol=1e-5)
    assert first.curve["edge_sparsity"] == pytest.approx(again.curve["edge_sparsity"], abs=1e-5)
