"""Tracr-compiled models: conversion equal to Tracr's own forward pass, cache, ground truth, pruning.

Each built-in program is compiled once per session (a cold JAX start-up, then seconds per program).
Tracr is a pinned dependency: without it these tests fail, they are not skipped.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from published_circuits import ACDC_EDGES, PUBLISHED_COMPONENTS

from circuitlib.core.ablation import ablation_hooks, mean_activations
from circuitlib.core.convert import to_hooked
from circuitlib.core.surgery import prune
from circuitlib.models.compiled import truth
from circuitlib.models.compiled.compile import compile_program, load_compiled
from circuitlib.models.compiled.programs import BUILTIN
from circuitlib.tasks.compiled import CompiledTask, accuracy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def compiled():
    return {name: compile_program(program) for name, program in BUILTIN.items()}


def all_inputs(c):
    return CompiledTask(c).inputs()


@pytest.mark.parametrize("name", list(BUILTIN))
def test_conversion_equals_tracr_on_every_input(compiled, name):
    import jax
    import jax.numpy as jnp

    c = compiled[name]
    n, forward = 0, jax.jit(c.tracr_model.forward)  # Tracr's own forward pass, compiled by JAX
    for tokens in all_inputs(c):
        out = forward(c.tracr_model.params, jnp.asarray(tokens.numpy()))
        theirs = out.transformer_output
        x = c.model.embed(tokens)
        for l, layer in enumerate(c.model.layers):  # every residual: after attention, after the MLP
            x = x + layer.attn_out(x)
            np.testing.assert_allclose(x.detach().numpy(), np.asarray(theirs.residuals[2 * l]), atol=1e-5, rtol=1e-5)
            x = x + layer.mlp_out(x)
            np.testing.assert_allclose(
                x.detach().numpy(), np.asarray(theirs.residuals[2 * l + 1]), atol=1e-5, rtol=1e-5
            )
        ours = c.model(tokens).detach()
        if c.info.categorical:
            assert torch.equal(ours.argmax(-1), torch.tensor(np.asarray(out.unembedded_output)))
        else:
            np.testing.assert_allclose(ours[..., 0].numpy(), np.asarray(out.unembedded_output), atol=1e-5)
        n += len(tokens)
    first = all_inputs(c)[-1][0]
    token_of = {i: t for t, i in c.info.token_ids}
    decoded = c.tracr_model.apply(["BOS"] + [token_of[int(t)] for t in first[1:]]).decoded
    logits = c.model(first[None])[0].detach()
    mine = [c.info.output_values[int(i)] for i in logits.argmax(-1)] if c.info.categorical else logits[:, 0].tolist()
    assert mine[1:] == pytest.approx(decoded[1:], abs=1e-5) if not c.info.categorical else mine[1:] == decoded[1:]
    assert n == sum(1 for L in range(1, c.info.max_seq_len + 1) for _ in CompiledTask(c).inputs([L])[0])


def test_models_have_the_architecture_the_issue_asks_for(compiled):
    cfgs = {name: c.model.cfg for name, c in compiled.items()}
    assert all(not c.causal and not c.normalization and c.activation == "relu" for c in cfgs.values())
    assert any(c.n_heads > 1 for c in cfgs.values())
    kinds = {c.info.categorical for c in compiled.values()}
    assert kinds == {True, False}
    bos = {name: dict(c.info.token_ids)["BOS"] for name, c in compiled.items()}
    assert bos == {name: c.info.bos_id for name, c in compiled.items()} and len(set(bos.values())) > 1
    assert {name: c.model.cfg.d_vocab_out for name, c in compiled.items()} == {
        name: len(c.info.output_values) for name, c in compiled.items()
    }


def test_input_space_respects_the_programs_domain(compiled):
    sizes = [len(t) for t in CompiledTask(compiled["sort_unique"]).inputs()]
    assert sizes == [5, 20, 60, 120]  # distinct tokens only: 5, 5*4, 5*4*3, 5*4*3*2
    assert [len(t) for t in CompiledTask(compiled["reverse"]).inputs()] == [3, 9, 27, 81, 243]


def test_cache_round_trip_without_jax(compiled, tmp_path):
    c = load_compiled("reverse", cache_dir=tmp_path)
    assert (tmp_path / "tracr").is_dir() and not list((tmp_path / "tracr").glob(".*"))  # no temp folder left
    fresh = compiled["reverse"].model.state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in c.model.state_dict().items())
    code = (
        "import sys; from circuitlib.models.loading import load_model; "
        f"m, info = load_model('tracr-reverse', cache_dir={str(tmp_path)!r}); "
        "assert 'jax' not in sys.modules and 'tracr' not in sys.modules; print(m.cfg.name, info.bos_id)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["tracr-reverse", str(c.info.bos_id)]


def test_import_circuitlib_does_not_import_jax():
    code = (
        "import sys, circuitlib, circuitlib.models.compiled, circuitlib.tasks, circuitlib.cli; "
        "assert 'jax' not in sys.modules and 'tracr' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# ---- the ground truth --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PUBLISHED_COMPONENTS))
def test_truth_components_match_the_published_lists(compiled, name):
    assert set(truth.truth_components(compiled[name].info)) == PUBLISHED_COMPONENTS[name]


@pytest.mark.parametrize("name", list(BUILTIN))
def test_truth_components_are_exactly_the_nonzero_ones(compiled, name):
    c = compiled[name]
    nonzero = []
    for l, layer in enumerate(c.model.layers):
        for h in range(c.model.cfg.n_heads):
            if any(W[h].abs().sum() > 0 for W in (layer.W_Q, layer.W_K, layer.W_V, layer.W_O)):
                nonzero.append(f"{l}.{h}")
        if layer.W_in.abs().sum() > 0:
            nonzero.append(f"MLP {l}")
    assert set(truth.truth_components(c.info)) == set(nonzero)


@pytest.mark.parametrize("name", list(BUILTIN))
def test_structural_edges_lie_in_the_declared_subspaces(compiled, name):
    c = compiled[name]
    comps = c.info.structure["components"]
    for reader, seen in truth.reader_directions(c.info, c.model).items():
        if reader == "logits":
            assert seen == set(c.info.structure["output"])
        elif reader.startswith("MLP"):
            assert seen <= set(comps[reader]["reads"]["in"])
        else:
            node, kind = reader.rsplit(".", 1)
            assert seen <= set(comps[node]["reads"][kind])


def test_xproportion_structural_edges_equal_acdc_and_bos_plumbing_is_what_differs(compiled):
    c = compiled["xproportion"]
    with_bos = set(truth.structural_edges(c.info, c.model))
    without = set(truth.structural_edges(c.info, c.model, bos_plumbing=False))
    assert with_bos == ACDC_EDGES["xproportion"]
    assert with_bos - without == {"embed -> 1.0.q", "embed -> 1.0.k"}
    functional = set(truth.functional_edges(c.info, c.model, all_inputs(c)))
    assert functional == without  # the BOS-only edges change no output when removed alone


def test_reverse_functional_edges_equal_acdc(compiled):
    c = compiled["reverse"]
    functional = set(truth.functional_edges(c.info, c.model, all_inputs(c)))
    assert functional == ACDC_EDGES["reverse"]
    structural = set(truth.structural_edges(c.info, c.model))
    assert structural - functional == {"embed -> 0.0.q", "embed -> 0.0.k", "embed -> 3.0.q", "embed -> 3.0.k"}


@pytest.mark.parametrize("name", ["reverse", "shuffle_dyck2"])
def test_edge_forward_is_the_model_and_node_removal_is_zero_ablation(compiled, name):
    c = compiled[name]
    tokens = all_inputs(c)[-1][:16]
    assert torch.allclose(truth.edge_forward(c.model, tokens), c.model(tokens), atol=1e-5)
    comps = truth.truth_components(c.info)
    for node in comps:
        removed = {e for e in truth.all_edges(c.model) if e.split(" -> ")[0] == node}
        kept = [x for x in comps if x != node]
        assert torch.allclose(
            truth.edge_forward(c.model, tokens, removed), prune(c.model, kept, "zero")(tokens), atol=1e-4
        )


@pytest.mark.parametrize("scheme", ["zero", "mean"])
def test_pruned_compiled_model_equals_hook_ablation(compiled, scheme):
    c = compiled["reverse"]
    tokens = all_inputs(c)[-1]
    means = mean_activations(c.model, tokens) if scheme == "mean" else None
    hooked = to_hooked(c.model)
    assert torch.allclose(hooked(tokens), c.model(tokens), atol=1e-5)
    for kept in (["0.0", "MLP 0", "MLP 1", "MLP 2", "3.0"], ["3.0", "MLP 2"], ["0.0", "MLP 1"]):
        ablated = [x for x in ["0.0", "1.0", "2.0", "3.0", "MLP 0", "MLP 1", "MLP 2", "MLP 3"] if x not in kept]
        with torch.no_grad():
            want = hooked.run_with_hooks(tokens, fwd_hooks=ablation_hooks(ablated, scheme, means))
            got = prune(c.model, kept, scheme, means)(tokens)
        assert torch.allclose(got, want, atol=1e-4)


def test_pruned_equals_hook_ablation_with_means_pooled_over_lengths(compiled):
    from circuitlib.pipeline.groundtruth import pooled_means

    c = compiled["sort_unique"]
    inputs = all_inputs(c)
    means = pooled_means(c.model, inputs)
    hooked = to_hooked(c.model)
    pruned = prune(c.model, ["1.0", "MLP 1"], "mean", means)
    with torch.no_grad():
        for tokens in inputs:  # every length reads the first S rows of the pooled means
            want = hooked.run_with_hooks(tokens, fwd_hooks=ablation_hooks(["0.0", "MLP 0"], "mean", means))
            assert torch.allclose(pruned(tokens), want, atol=1e-4)


def test_model_and_task_resolve_by_name(compiled):
    from circuitlib.models.loading import load_model
    from circuitlib.tasks import get_task

    model, info = load_model("tracr-xproportion")
    assert model.cfg.name == "tracr-xproportion" and not info.categorical
    task = get_task("tracr-xproportion")
    inputs = task.inputs(cap=10)
    assert [t.shape for t in inputs] == [(4, 2), (10, 3), (10, 4), (10, 5), (10, 6)]
    assert accuracy(task.compiled, model(inputs[2]), model(inputs[2])) == 1.0


# ---- Algorithm 1 on compiled models --------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILTIN))
@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_greedy_recovers_the_true_components_on_mixed_lengths(compiled, name, ablation):
    from circuitlib.pipeline import groundtruth as scoring

    c = compiled[name]
    inputs = CompiledTask(c).inputs(cap=40 if name == "shuffle_dyck2" else 100)
    circuits = [scoring.greedy(c, inputs, inputs, a, ablation=ablation) for a in (0.0, 1e-3, 10.0)]
    scores = scoring.roc(c, circuits)
    assert 1e-3 in scores["exact_alphas"]
    assert scores["tpr"][0] == 1.0 and scores["tpr"][-1] == 0.0 and scores["fpr"][-1] == 0.0
    assert scores["auc"] == pytest.approx(1.0)


def test_greedy_head_order_and_last_position_variant(compiled):
    from circuitlib.pipeline import groundtruth as scoring

    c = compiled["shuffle_dyck2"]  # four heads in layer 1: the head order matters here if anywhere
    inputs = CompiledTask(c).inputs(cap=40)
    truth_set = set(c.info.structure["components"])
    for order in ("heads-ascending", "heads-descending"):
        circuit = scoring.greedy(c, inputs, inputs, 1e-3, order=order, position="last")
        assert set(circuit.kept) == truth_set and circuit.order == order


def test_one_length_data_hides_reverse_length_computation(compiled):
    from circuitlib.pipeline import groundtruth as scoring

    found = scoring.failure_modes(compiled["reverse"])
    hidden = {"0.0", "MLP 0", "MLP 1", "MLP 2"}
    assert {c for c, v in found["mean, full length only"].items() if v == 0} == hidden
    assert {c for c, v in found["zero, full length only"].items() if v == 0} == {"0.0"}  # max length decoded
    assert all(v > 0.01 for key in ("mean, mixed lengths", "zero, mixed lengths") for v in found[key].values())


def test_pooled_means_equal_per_length_means_weighted(compiled):
    from circuitlib.pipeline import groundtruth as scoring

    c = compiled["reverse"]
    inputs = CompiledTask(c).inputs()
    pooled = scoring.pooled_means(c.model, inputs)
    last = mean_activations(c.model, inputs[-1])
    assert torch.allclose(pooled.z[..., -1, :], last.z[..., -1, :], atol=1e-6)  # only the longest reach it
    counts = torch.tensor([len(t) for t in inputs], dtype=torch.float64)
    want = sum(mean_activations(c.model, t).mlp[:, 0].double() * n for t, n in zip(inputs, counts)) / counts.sum()
    assert torch.allclose(pooled.mlp[:, 0].double(), want, atol=1e-5)


def test_edges_among_kept_components_are_the_structural_edges_between_them(compiled):
    from circuitlib.pipeline.groundtruth import edges_among

    c = compiled["reverse"]
    wiring = truth.structural_edges(c.info, c.model, bos_plumbing=False)
    assert edges_among(c, truth.truth_components(c.info)) == wiring
    without = edges_among(c, ["0.0", "MLP 0", "MLP 2", "3.0"])  # MLP 1 gone: every edge into or out of it too
    assert without == [e for e in wiring if "MLP 1" not in e]
    assert edges_among(c, []) == []  # reverse has no edge from an embedding straight to the logits


# ---- the command line --------------------------------------------------------------------------


def test_cli_groundtruth_json(compiled, capsys):
    from circuitlib.cli import main

    assert main(["groundtruth", "xproportion", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["truth_components"] == ["MLP 0", "1.0"] and set(report["found_components"]) == {"MLP 0", "1.0"}
    assert report["exact"] is True and report["accuracy"] == 1.0
    assert set(report["truth_edges"]) == ACDC_EDGES["xproportion"] - {"embed -> 1.0.q", "embed -> 1.0.k"}
    assert set(report["found_edges"]) == set(report["truth_edges"])
    assert report["edge_scores"] == {"precision": 1.0, "recall": 1.0, "exact": True}


def test_edge_scores():
    from circuitlib.pipeline.groundtruth import edge_scores

    truth_edges = ["embed -> MLP 0", "MLP 0 -> 1.0.v", "1.0 -> logits"]
    found = ["embed -> MLP 0", "1.0 -> logits", "pos -> 1.0.q", "embed -> 1.0.q"]
    assert edge_scores(found, truth_edges) == {"precision": 0.5, "recall": 2 / 3, "exact": False}
    assert edge_scores(truth_edges[::-1], truth_edges)["exact"] is True


def test_cli_groundtruth_user_program_file(tmp_path, capsys, monkeypatch):
    from circuitlib.cli import main

    monkeypatch.setenv("CIRCUITLIB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "double.py"
    path.write_text(
        "from tracr.rasp import rasp\nprogram = rasp.numerical(rasp.Map(lambda x: 2 * x, rasp.tokens))\n"
        "vocab = {1, 2, 3}\nmax_seq_len = 3\n"
    )
    assert main(["groundtruth", str(path), "--json", "--alpha", "1e-6"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["truth_components"] == ["MLP 0"] and report["exact"] is True


@pytest.mark.parametrize(
    "text, message",
    [
        ("x = 1\n", "does not define program, vocab, max_seq_len"),
        ("raise RuntimeError('boom')\n", "failed to run: RuntimeError: boom"),
        (
            "from tracr.rasp import rasp\nprogram = rasp.Aggregate(rasp.Select(rasp.tokens, rasp.tokens, "
            "rasp.Comparison.EQ), rasp.numerical(rasp.tokens))\nvocab = {1, 2}\nmax_seq_len = 3\n",
            "Tracr cannot compile",
        ),
    ],
)
def test_cli_groundtruth_bad_program_file(tmp_path, capsys, monkeypatch, text, message):
    from circuitlib.cli import main

    monkeypatch.setenv("CIRCUITLIB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "bad.py"
    path.write_text(text)
    assert main(["groundtruth", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.json"))


def test_cli_groundtruth_unknown_program(capsys):
    from circuitlib.cli import main

    assert main(["groundtruth", "nope"]) == 2
    assert "unknown Tracr program 'nope'" in capsys.readouterr().err


# ---- distractors -------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", [("reverse", "hist"), ("xproportion", "shuffle_dyck2")])
def test_distractor_model_computes_both_programs_and_greedy_prunes_the_distractor(compiled, pair):
    from circuitlib.models.compiled.distractors import side_by_side
    from circuitlib.pipeline import groundtruth as scoring

    target, other = compiled[pair[0]], compiled[pair[1]]
    both, distractor, to_other = side_by_side(target, other)
    inputs = CompiledTask(both).inputs(cap=60)
    for tokens in inputs:  # the target's output is unchanged, and the distractor's block computes its program
        assert torch.allclose(both.model(tokens), target.model(tokens), atol=1e-5)
        theirs = other.model.residual(torch.tensor(to_other)[tokens])
        assert torch.allclose(both.model.residual(tokens)[..., target.model.cfg.d_model :], theirs, atol=1e-5)
    busy_heads = [c for c in distractor if not c.startswith("MLP")]
    target_layers = {int(c.split(".")[0]) for c in target.info.structure["components"] if not c.startswith("MLP")}
    assert {int(c.split(".")[0]) for c in busy_heads} & target_layers  # both programs' heads in one layer
    circuit = scoring.greedy(both, inputs, inputs, 1e-3, ablation="mean")
    truth = set(target.info.structure["components"])
    shared_mlps = {c for c in distractor if c.startswith("MLP") and c in truth}
    assert set(circuit.kept) == truth, (circuit.kept, truth, shared_mlps)
    assert not set(circuit.kept) & (set(distractor) - shared_mlps)


def test_divergence_metrics():
    from circuitlib.pipeline.groundtruth import divergence

    torch.manual_seed(0)
    full, other = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert torch.allclose(divergence(True, full, full), torch.zeros(3, dtype=torch.float64))
    p, q = full.double().log_softmax(-1), other.double().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)  # [3, 4]
    assert torch.allclose(divergence(True, full, other), kl[:, 1:].mean(-1))  # BOS left out
    assert torch.allclose(divergence(True, full, other, "last"), kl[:, -1])
    a, b = full[..., :1], other[..., :1]
    assert torch.allclose(divergence(False, a, b), (b - a).double().pow(2)[:, 1:, 0].mean(-1))
    with pytest.raises(ValueError, match="unknown position"):
        divergence(True, full, other, "first")


def test_extract_fast_path_equals_plain_on_a_bidirectional_model(compiled):
    from circuitlib.discovery.greedy import extract

    c = compiled["reverse"]
    tokens = CompiledTask(c).inputs([5])[0]  # one length, BOS shared by every input
    for ablation in ("mean", "zero"):
        fast = extract(c.model, tokens, tokens, alpha=1e-3, ablation=ablation, include_mlps=True, progress=False)
        plain = extract(
            c.model, tokens, tokens, alpha=1e-3, ablation=ablation, include_mlps=True, method="plain", progress=False
        )
        assert [d.pruned for d in fast.decisions] == [d.pruned for d in plain.decisions]
        assert [d.kl_after for d in fast.decisions] == pytest.approx([d.kl_after for d in plain.decisions], abs=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_extract_fast_path_equals_plain_with_a_shared_start(causal):
    """A bidirectional model's shared first token is not the same in g as in f: the fast path must recompute it."""
    from circuitlib.core.model import ModelConfig, Transformer
    from circuitlib.discovery.greedy import extract

    cfg = ModelConfig(
        name="random-bidirectional",
        arch="gpt2",
        n_layers=2,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_mlp=32,
        d_vocab=11,
        n_ctx=8,
        causal=causal,
    )
    model = Transformer(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.dim() == 1 and p.shape[0] == 16 else 0.0))
    tokens = torch.randint(0, 10, (24, 6), generator=gen)
    tokens[:, :2] = 10  # two leading positions shared by every prompt
    fast = extract(model, tokens[:12], tokens[12:], alpha=1e-3, include_mlps=True, progress=False)
    plain = extract(model, tokens[:12], tokens[12:], alpha=1e-3, include_mlps=True, method="plain", progress=False)
    assert [d.kl_after for d in fast.decisions] == pytest.approx([d.kl_after for d in plain.decisions], abs=1e-5)


def test_the_text_task_pipeline_refuses_compiled_programs_in_one_line(capsys, tmp_path):
    from circuitlib.cli import main

    for model, task in (("tracr-reverse", "tracr-reverse"), ("tracr-reverse", "ioi"), ("tiny-gpt2", "tracr-hist")):
        assert main(["extract", "--model", model, "--task", task, "--alpha", "0.01", "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert "python -m circuitlib groundtruth PROGRAM" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
