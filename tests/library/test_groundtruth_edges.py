"""Edge Pruning on Tracr-compiled models: the masked forward is exact on them (bidirectional
attention, no norms, ReLU MLPs, an own unembedding, every position), and at the authors' Tracr
settings it recovers reverse's and xproportion's edges at a fixed seed."""

import json

import pytest
import torch
from published_circuits import ACDC_EDGES

from circuitlib.discovery.edges.graph import all_open, graph_for, make_replacement, masked_logits
from circuitlib.models.compiled import truth
from circuitlib.models.compiled.compile import load_compiled
from circuitlib.pipeline.groundtruth import (
    AUTHORS_SETTINGS,
    EdgeSettings,
    edge_pruning,
    edge_recovery_table,
    edge_settings,
    edge_truths,
    kl_over_outputs,
    kl_over_positions,
    objective_edges,
    truth_edge_name,
)
from circuitlib.tasks.compiled import CompiledTask


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name,every", [("reverse", 1), ("xproportion", 1), ("shuffle_dyck2", 23)])
def test_masked_forward_is_exact_on_compiled_models(name, every):
    """All gates open: the model's own outputs, at every position and at the last. One edge closed
    (zero replacement): the hand-written edge forward of `truth.edge_forward` (every edge; every
    23rd of shuffle_dyck2's 2,102, whose layer 1 has four heads)."""
    c = load_compiled(name)
    model, graph = c.model, graph_for(c.model)
    assert graph.embed_writers == ["tok_embed", "pos_embed"] and not model.cfg.causal
    repl = make_replacement(model, "zero", graph=graph)
    tokens = CompiledTask(c).inputs()[-1][:32]
    full = model(tokens)
    gates = all_open(model, graph)
    assert torch.allclose(
        masked_logits(model, tokens, gates, repl, graph=graph, all_positions=True), full, atol=1e-6, rtol=0
    )
    assert torch.allclose(masked_logits(model, tokens, gates, repl, graph=graph), full[:, -1], atol=1e-6, rtol=0)
    changed = 0
    for e in range(0, graph.n_edges, every):
        one_closed = gates.clone()
        one_closed[e] = 0
        ours = masked_logits(model, tokens, one_closed, repl, graph=graph, all_positions=True)
        hand = truth.edge_forward(model, tokens, {truth_edge_name(graph, e)})
        assert torch.allclose(ours, hand, atol=1e-6, rtol=0), graph.edge_name(e)
        changed += not torch.allclose(ours, full, atol=1e-6, rtol=0)
    assert changed > 0  # some single edges matter: the comparison is not between unchanged outputs


def test_losses_read_the_positions_the_authors_read():
    full = torch.randn(3, 5, 4)
    other = full.clone()
    other[:, 0] += 1.0  # only BOS moves
    assert kl_over_outputs(full, other) == 0  # reverse: positions 1.. only
    assert kl_over_positions(full[..., :1], other[..., :1]) > 0  # xproportion: BOS included
    shifted = full[..., :1] + 0.3  # every position by one constant
    assert kl_over_positions(full[..., :1], shifted).abs() < 1e-6  # the quirk: blind to a shift
    other[:, 2] -= 0.5
    manual = (
        sum(
            (full[b, 1:].softmax(-1) * (full[b, 1:].log_softmax(-1) - other[b, 1:].log_softmax(-1))).sum()
            for b in range(3)
        )
        / 3
    )
    assert torch.allclose(kl_over_outputs(full, other), manual, atol=1e-6)


def test_objective_truth_is_acdcs_published_list():
    """What the authors' losses can see is ACDC's list for both programs: reverse's loss skips BOS, so
    the BOS plumbing (which moves only BOS's logits) is out; xproportion's reads BOS, so it is in."""
    for name in ("reverse", "xproportion"):
        c = load_compiled(name)
        assert set(objective_edges(c, AUTHORS_SETTINGS[name])) == ACDC_EDGES[name]


@pytest.mark.parametrize("name,seed", [pytest.param("reverse", 2, marks=pytest.mark.slow), ("xproportion", 2)])
def test_edge_pruning_recovers_reverse_and_xproportion_at_a_fixed_seed(name, seed):
    """The paper's claim at the authors' settings: the read-off edge set is the true one and the
    circuit is right on every input. Seed 2 recovers both; other seeds do not always (reverse at
    seeds 0, 1: one extra BOS-plumbing edge; seed 4: MLP 0 -> MLP 1 lost; xproportion at seeds 0,
    1: the positional selector lost): see results/groundtruth/ and scripts/groundtruth_edges.py."""
    run = edge_pruning(load_compiled(name), seed)
    assert set(run["found_edges"]) == ACDC_EDGES[name]
    assert run["scores"]["objective"]["exact"] and run["accuracy"] == 1.0 and run["accuracy_all_lengths"] == 1.0
    table = edge_recovery_table([run])
    assert table[0]["recovered"] == 1.0 and table[0]["program"] == f"tracr-{name}"


def test_edge_truths_definitions_differ_only_by_bos_plumbing():
    c = load_compiled("xproportion")
    t = edge_truths(c)
    assert set(t["structural"]) - set(t["structural_without_bos"]) == {"embed -> 1.0.q", "embed -> 1.0.k"}
    assert set(t["functional"]) == set(t["structural_without_bos"]) and set(t["objective"]) == set(t["structural"])


def test_cli_groundtruth_edges_json_and_bad_ablation(capsys):
    from circuitlib.cli import main

    assert main(["groundtruth", "xproportion", "--method", "edges", "--seed", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["exact"] is True and report["accuracy"] == 1.0 and report["ablation"] == "zero"
    assert set(report["found_edges"]) == set(report["truth_edges"]) == ACDC_EDGES["xproportion"]
    assert report["settings"]["target"] == 0.92 and report["settings"]["threshold"] == 0.005
    assert main(["groundtruth", "xproportion", "--method", "edges", "--ablation", "mean"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zero ablation" in err


def test_settings_are_the_authors_for_their_programs_and_a_recipe_for_others():
    assert edge_settings(load_compiled("reverse")) is AUTHORS_SETTINGS["reverse"]
    assert edge_settings(load_compiled("xproportion")) is AUTHORS_SETTINGS["xproportion"]
    assert AUTHORS_SETTINGS["reverse"].length == 3 and AUTHORS_SETTINGS["xproportion"].length == 4
    hist = edge_settings(load_compiled("hist"))
    assert isinstance(hist, EdgeSettings) and hist.loss == "kl-outputs" and hist.length == 3


def test_saved_runs_are_named_after_their_settings_and_load_back(tmp_path):
    from circuitlib.pipeline.groundtruth import edge_run_path, load_edge_runs, save_edge_run

    path = edge_run_path(tmp_path, "tracr-xproportion", 3, AUTHORS_SETTINGS["xproportion"])
    assert path.name == (
        "edges-tracr-xproportion-zero-len4-target0.92-nodes0.4-lr1-reglr0.0001-steps720-bs16-"
        "kl-positions-thr0.005-seed3.json"
    )
    run = {"program": "tracr-xproportion", "seed": 3, "scores": {"objective": {"exact": True}}}
    save_edge_run(path, run, {"commit": "abc", "torch_threads": 1})
    assert load_edge_runs(tmp_path) == [run | {"provenance": {"commit": "abc", "torch_threads": 1}}]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
