"""Edge Pruning: the disentangled masked model is exact against the full model, node ablation and
node circuits; training is reproducible and resumes exactly; results are kept as data and their
standalone models rebuilt from them; the result, the CLI run folder and the script are complete."""

import contextlib
import importlib.util
import json
import random
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch

from circuitlib.cli import main
from circuitlib.core.ablation import hooked_last_logits, mean_activations
from circuitlib.core.convert import to_hooked
from circuitlib.core.metrics import kl_divergence
from circuitlib.core.surgery import prune
from circuitlib.discovery.edges.graph import (
    EdgeGraph,
    all_open,
    edges_among,
    expected_closed,
    expected_open,
    gates_from_edges,
    graph_for,
    make_replacement,
    masked_logits,
    remove_dead,
)
from circuitlib.discovery.edges.train import (
    EdgeCircuit,
    ResultInProgress,
    binarize,
    check_sparsity,
    standalone_model,
    train_edges,
)
from circuitlib.discovery.greedy import extract
from circuitlib.pipeline.edges import EdgeConfig, edge_result, edge_result_path, gates_path, load_gates, run_edges
from circuitlib.tasks import get_task


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a shared CPU: one thread avoids thread contention (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def means(models, data):
    return {a: mean_activations(m, data[0]) for a, m in models.items()}


def repl(model, scheme, patching, means):
    return make_replacement(model, scheme, patching=patching, means=means)


def closing_outgoing(model, nodes):
    """All gates open except every edge leaving one of `nodes`."""
    g = graph_for(model)
    gates = all_open(model).clone()
    idx = {g.writer_index[n] for n in nodes}
    for e, (w, _) in enumerate(g.edges):
        if w in idx:
            gates[e] = 0.0
    return gates


def test_edge_counts_match_the_paper():
    assert EdgeGraph.build(12, 12).n_edges == 32491  # GPT-2 Small, as Bhaskar et al. count them
    g = EdgeGraph.build(2, 3)
    assert g.writers == ["embed", "0.0", "0.1", "0.2", "MLP 0", "1.0", "1.1", "1.2", "MLP 1"]
    assert g.readers[:3] == ["0.0.q", "0.1.q", "0.2.q"] and g.readers[-1] == "logits"
    for e in range(g.n_edges):
        assert g.parse_edge(g.edge_name(e)) == e
    with pytest.raises(ValueError, match="bad edge"):
        g.parse_edge("1.0 -> 0.0.q")  # edges only go forward


@pytest.mark.parametrize("scheme", ["mean", "zero", "corrupted"])
def test_every_gate_open_is_the_full_model(arch, models, data, means, scheme):
    model, (patching, validation) = models[arch], data
    r = make_replacement(model, scheme, patching=patching, means=means[arch], corrupted=validation.roll(1, 0))
    with torch.no_grad():
        ours = masked_logits(model, validation, all_open(model), r)
        assert torch.allclose(ours, model(validation, last_only=True), atol=1e-4)


@pytest.mark.parametrize("scheme", ["mean", "zero"])
def test_closing_a_nodes_outgoing_edges_ablates_it(arch, models, data, means, scheme):
    model, (patching, validation) = models[arch], data
    g, r = graph_for(model), repl(model, scheme, patching, means[arch])
    full = model(validation, last_only=True)
    rng = random.Random(0)
    for nodes in [["0.1"], ["MLP 1"], [g.nodes[-2]], rng.sample(g.nodes, 4)]:
        with torch.no_grad():
            ours = masked_logits(model, validation, closing_outgoing(model, nodes), r)
            reference = prune(model, [n for n in g.nodes if n not in nodes], scheme, means[arch])(
                validation, last_only=True
            )
        assert torch.allclose(ours, reference, atol=1e-4), nodes
        assert not torch.allclose(ours, full, atol=1e-3), f"ablating {nodes} should change the logits"
        # a closed node gate does the same
        node_gates = torch.tensor([0.0 if n in nodes else 1.0 for n in g.nodes])
        with torch.no_grad():
            assert torch.allclose(
                masked_logits(model, validation, all_open(model), r, node_gates), reference, atol=1e-4
            )


def test_node_ablation_matches_transformer_lens_hooks(arch, models, data, means):
    model, (patching, validation) = models[arch], data
    ablated = ["0.2", "1.0", "MLP 0", "2.1"]
    for scheme in ("mean", "zero"):
        with torch.no_grad():
            ours = masked_logits(
                model, validation, closing_outgoing(model, ablated), repl(model, scheme, patching, means[arch])
            )
        reference = hooked_last_logits(to_hooked(model), validation, ablated, scheme, means[arch])
        assert torch.allclose(ours, reference, atol=1e-4)


def test_corrupted_replacement_patches_in_the_corrupted_run(arch, models, data):
    model, (_, validation) = models[arch], data
    corrupted = validation.roll(1, 0)
    r = make_replacement(model, "corrupted", corrupted=corrupted)
    with torch.no_grad():
        closed = masked_logits(model, validation, torch.zeros(graph_for(model).n_edges), r)
        assert torch.allclose(closed, model(corrupted, last_only=True), atol=1e-4)  # every edge closed
        # one head: its output replaced by its output on the corrupted prompt (hook_z patching)
        hooked = to_hooked(model)
        _, cache = hooked.run_with_cache(corrupted)
        z_bad = cache["blocks.1.attn.hook_z"][:, :, 2]

        def patch(z, hook):
            z = z.clone()
            z[:, :, 2] = z_bad
            return z

        reference = hooked.run_with_hooks(validation, fwd_hooks=[("blocks.1.attn.hook_z", patch)])[:, -1]
        ours = masked_logits(model, validation, closing_outgoing(model, ["1.2"]), r)
        assert torch.allclose(ours, reference, atol=1e-4)
        rows = torch.tensor([3, 7])
        assert torch.allclose(
            masked_logits(model, validation[rows], closing_outgoing(model, ["1.2"]), r, rows=rows),
            reference[rows],
            atol=1e-4,
        )


@pytest.mark.parametrize("scheme", ["mean", "zero"])
def test_edges_of_a_node_circuit_reproduce_its_kl(arch, models, data, means, scheme):
    model, (patching, validation) = models[arch], data
    alpha = {"gpt2": 0.03, "llama": 0.1}[arch]
    circuit = extract(
        model, patching, validation, alpha=alpha, ablation=scheme, include_mlps=True, progress=False, means=means[arch]
    )
    assert 0 < len(circuit.kept) < len(graph_for(model).nodes)
    edges = edges_among(graph_for(model), circuit.kept)
    with torch.no_grad():
        ours = masked_logits(
            model, validation, gates_from_edges(model, edges), repl(model, scheme, patching, means[arch])
        )
    assert kl_divergence(model(validation, last_only=True), ours) == pytest.approx(circuit.final_kl, abs=1e-5)


def test_gradients_of_edge_and_node_gates_are_exact(arch, hf_models, data):
    """The hand-written backward of the masked sum, checked against finite differences in float64."""
    from circuitlib.core.convert import from_hf

    model = from_hf(hf_models[arch], "double").double()
    patching, validation = data
    g = graph_for(model)
    r = make_replacement(model, "mean", patching=patching)
    gen = torch.Generator().manual_seed(0)
    base_gates = torch.rand(g.n_edges, generator=gen, dtype=torch.float64)
    base_nodes = torch.rand(len(g.nodes), generator=gen, dtype=torch.float64)
    edges = torch.randperm(g.n_edges, generator=gen)[:12]
    nodes = torch.randperm(len(g.nodes), generator=gen)[:4]

    def f(e, n):
        gates, node_gates = base_gates.clone(), base_nodes.clone()
        gates[edges], node_gates[nodes] = e, n
        return masked_logits(model, validation[:3], gates, r, node_gates)[:, :7]

    assert torch.autograd.gradcheck(
        f,
        (base_gates[edges].clone().requires_grad_(True), base_nodes[nodes].clone().requires_grad_(True)),
        eps=1e-6,
        atol=1e-5,
    )


def test_dead_node_removal_changes_no_logit(arch, models, data, means):
    model, (patching, validation) = models[arch], data
    g, r = graph_for(model), repl(model, "mean", patching, means[arch])
    gen = torch.Generator().manual_seed(0)
    kept = torch.nonzero(torch.rand(g.n_edges, generator=gen) < 0.15).flatten().tolist()
    survivors, nodes = remove_dead(g, kept)
    assert len(survivors) < len(kept) and set(survivors) <= set(kept)
    with torch.no_grad():
        before = masked_logits(model, validation, gates_from_edges(model, kept), r)
        after = masked_logits(model, validation, gates_from_edges(model, survivors), r)
    assert torch.allclose(before, after, atol=1e-5)
    assert all(g.writers[g.edges[e][0]] in set(nodes) | set(g.embed_writers) for e in survivors)


def test_training_is_reproducible_and_reaches_the_target(arch, models, data, means):
    model, (patching, validation) = models[arch], data
    r = repl(model, "mean", patching, means[arch])
    kw = dict(target_sparsity=0.8, steps=12, batch_size=6, progress=False)
    a = train_edges(model, validation, r, seed=3, **kw)
    b = train_edges(model, validation, r, seed=3, **kw)
    c = train_edges(model, validation, r, seed=4, **kw)
    assert a.curve == b.curve and torch.equal(a.gate_logits, b.gate_logits)
    assert not torch.equal(a.gate_logits, c.gate_logits)
    assert set(a.curve) >= {"loss", "kl", "edge_sparsity", "target", "lambda1"} and len(a.curve["kl"]) == 12
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was
    g = graph_for(model)
    read = binarize(g, a.gate_logits, 0.8, readout="forced-count")  # circuitlib's read-off before issue 28
    assert 0 < len(read.edges) <= 0.2 * g.n_edges
    assert remove_dead(g, read.edges)[0] == read.edges  # nothing dead left
    # node gates: trained alongside, with their own target
    d = train_edges(model, validation, r, seed=3, node_target_sparsity=0.5, **kw)
    assert d.node_gate_logits.shape == (len(g.nodes),) and "node_sparsity" in d.curve


def test_no_gate_freezes_beyond_the_sparsity_gradient():
    """P(closed) computed directly keeps a gradient where 1 - P(open) rounds to 0 in float32."""
    la = torch.tensor([-5.0, 0.0, 5.0, 20.0], requires_grad=True)
    assert torch.allclose(expected_closed(la.detach()), 1 - expected_open(la.detach()), atol=1e-6)
    (1 - expected_open(la)).sum().backward()
    assert la.grad[3] == 0  # the old formula: frozen at 20
    la.grad = None
    expected_closed(la).sum().backward()
    assert (la.grad < 0).all()  # every gate can still close


def test_the_optimizer_is_the_authors(models, data, means):
    """AdamW: the learning rate warms up linearly, then falls linearly to 0; the weight decay pulls
    every gate location towards 0 (a huge one keeps them all near 0; without it they stay far from 0)."""
    model, (patching, validation) = models["gpt2"], data
    r = repl(model, "mean", patching, means["gpt2"])
    kw = dict(target_sparsity=0.8, steps=12, batch_size=6, progress=False, seed=3, lr=0.8, lr_warmup=3)
    plain = train_edges(model, validation, r, weight_decay=0.0, **kw)
    assert plain.curve["lr"] == pytest.approx(
        [0.8 * s / 3 for s in range(3)] + [0.8 * (12 - s) / 9 for s in range(3, 12)]
    )
    assert plain.gate_logits.min() > 5  # started at 10: the gradient alone moved them little
    decayed = train_edges(model, validation, r, weight_decay=1 / 0.8, **kw)  # lr x decay = 1 at the peak
    assert decayed.gate_logits.abs().max() < 3.5
    for bad in (-1, 12, 2.5):
        with pytest.raises(ValueError, match="lr_warmup must be a whole number of steps"):
            train_edges(model, validation, r, target_sparsity=0.5, steps=12, lr_warmup=bad)
    with pytest.raises(ValueError, match="weight_decay must be a number >= 0"):
        train_edges(model, validation, r, target_sparsity=0.5, steps=2, weight_decay=-0.1)


def test_bad_settings_are_refused(models, data):
    model, (_, validation) = models["gpt2"], data
    r = make_replacement(model, "zero")
    for bad in (2.0, -0.1, float("nan"), "x"):
        with pytest.raises(ValueError, match="target sparsity must be a number in"):
            train_edges(model, validation, r, target_sparsity=bad, steps=1)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        train_edges(model, validation, r, target_sparsity=0.5, steps=0)
    with pytest.raises(ValueError, match="unknown replacement"):
        make_replacement(model, "resample")
    with pytest.raises(ValueError, match="full model"):
        make_replacement(prune(model, ["0.1"], "zero"), "zero")
    with pytest.raises(ValueError, match="gates must have shape"):
        masked_logits(model, validation, torch.ones(3), r)
    assert check_sparsity("0.95") == 0.95


# ---- end to end: the command line on tiny-gpt2 --------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("edges") / "ioi"
    assert (
        main(
            [
                "edges",
                "--model",
                "tiny-gpt2",
                "--task",
                "ioi",
                "--target-sparsity",
                "0.9",
                "--steps",
                "8",
                "--n",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_cli_writes_a_complete_run_folder(run_dir):
    record = json.loads((run_dir / "edges.json").read_text())
    assert record["settings"]["target_sparsity"] == 0.9 and record["settings"]["steps"] == 8
    assert record["n_edges_total"] == graph_for_tiny_gpt2_edges()
    m = record["metrics"]  # the authors' read-off: the training sets the size
    assert record["settings"]["readout"] == "authors" and 0 <= m["training_edge_sparsity"] <= 1
    assert len(record["edges"]) <= m["n_edges_thresholded"]
    assert len(record["curve"]["kl"]) == 8
    for name in ("full", "edge_circuit", "pruned_model"):
        assert set(record["metrics"][name]) == {"validation", "test"}
    for name in ("model.safetensors", "model.json", "tokenizer.json", "edges.gates.pt"):
        assert (run_dir / name).is_file()
    assert not [p for p in run_dir.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    result = EdgeCircuit.load_json(run_dir / "edges.json")
    assert result.edges == record["edges"] and result.nodes == record["nodes"]
    assert load_gates(run_dir / "edges.gates.pt")["gate_logits"].shape == (record["n_edges_total"],)


def graph_for_tiny_gpt2_edges():
    return EdgeGraph.build(4, 4, split_embedding=True).n_edges  # token and position embeddings: two writers


def test_cli_pruned_model_is_the_node_circuit(run_dir):
    from circuitlib.core.model import Transformer
    from circuitlib.models.loading import load_model
    from circuitlib.tasks import get_task

    record = json.loads((run_dir / "edges.json").read_text())
    pruned = Transformer.load(run_dir)
    assert pruned.kept_heads() == record["kept_heads"] and pruned.kept_mlps() == record["kept_mlps"]
    full, tokenizer = load_model("tiny-gpt2")
    data = get_task("ioi").generate(tokenizer, n=8, seed=0)
    with torch.no_grad():
        kl = kl_divergence(full(data.test.tokens, last_only=True), pruned(data.test.tokens, last_only=True))
    assert kl == pytest.approx(record["metrics"]["pruned_model"]["test"]["kl"], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target-sparsity", "2.5"], "--target-sparsity must be a number in [0, 2)"),
        (["--steps", "0"], "steps must be a positive whole number"),
        (["--n", "0"], "n must be a positive whole number"),
        (["--lr", "0"], "lr must be a finite number > 0"),
        (["--device", "tpu"], "--device"),
        (["--model", "gpt3"], "unknown model"),
        (["--batch-size", "9"], "batch_size 9 is larger than the 8 prompts a step draws from (n)"),
        (["--n", None, "--batch-size", "151"], "batch_size 151 is larger than the 150 prompts"),  # IOI's default n
        (["--warmup", "3"], "warmup 3 is longer than the run (steps 2)"),
        (["--node-target-sparsity", "1"], "(the fraction of nodes removed)"),
    ],
)
def test_cli_refuses_bad_input_and_writes_nothing(tmp_path, capsys, args, message):
    base = {"--model": "tiny-gpt2", "--task": "ioi", "--target-sparsity": "0.9", "--steps": "2", "--n": "8"}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["edges", *[x for k, v in base.items() if v is not None for x in (k, v)], "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.lower() in err.lower() and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_evaluate_and_export_read_an_edges_folder(run_dir, tmp_path, capsys):
    record = json.loads((run_dir / "edges.json").read_text())
    for split in ("validation", "test"):
        assert main(["evaluate", str(run_dir), "--split", split, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        measured = record["metrics"]["pruned_model"][split]
        assert report["accuracy"] == measured["accuracy"] and report["n"] == 8
        assert report["kl"] == pytest.approx(measured["kl"], rel=1e-4, abs=1e-7)
        assert report["kept_heads"] == record["kept_heads"]
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert "max abs logit difference" in capsys.readouterr().out and (tmp_path / "m.onnx").is_file()
    old = tmp_path / "old"  # a folder of an older circuitlib: no reference.safetensors
    shutil.copytree(run_dir, old)
    (old / "reference.safetensors").unlink()
    assert main(["evaluate", str(old)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no reference.safetensors" in err and "re-run Edge Pruning" in err


def test_cli_steps_default_to_the_authors_3000():
    from circuitlib.cli import _parser

    args = _parser().parse_args(
        ["edges", "--model", "tiny-gpt2", "--task", "ioi", "--target-sparsity", "0.9", "--out", "x"]
    )
    assert args.steps == 3000 and args.warmup is None


def test_cli_refuses_an_occupied_out_unless_forced(run_dir, tmp_path, capsys):
    before = (run_dir / "edges.json").read_text()
    argv = [
        "edges",
        "--model",
        "tiny-gpt2",
        "--task",
        "ioi",
        "--target-sparsity",
        "0.5",
        "--steps",
        "2",
        "--n",
        "8",
        "--out",
    ]
    assert main(argv + [str(run_dir)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (run_dir / "edges.json").read_text() == before
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main(argv + [str(out), "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["target_sparsity"] == 0.5
    assert not (out / "old.txt").exists() and (out / "edges.json").is_file()


# ---- resumable training and edge results as data (tiny-gpt2) ------------------------------------


class Cut(Exception):
    """Stands in for a process killed in the middle of a training."""


@contextlib.contextmanager
def cut_at_step(step):
    """Training dies at the start of step `step` (1-based): the masked forward of that step raises."""
    import circuitlib.discovery.edges.train as edges_train

    real, calls = edges_train.masked_logits, [0]

    def forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            raise Cut(f"cut at step {step}")
        return real(*args, **kwargs)

    with mock.patch.object(edges_train, "masked_logits", forward):
        yield


@pytest.fixture(scope="module")
def tiny():
    from circuitlib.models.loading import load_model

    return load_model("tiny-gpt2")


TIMES = ("training_seconds", "seconds_per_step", "training_cpu_seconds", "readout_seconds")


def without_times(result):
    return {**result.to_dict(), "metrics": {k: v for k, v in result.metrics.items() if k not in TIMES}}


@pytest.mark.parametrize("ablation, node_target", [("mean", None), ("mean", 0.5), ("corrupted", None)])
def test_a_cut_off_training_resumes_to_the_uninterrupted_result(tiny, tmp_path, ablation, node_target):
    config = EdgeConfig("ioi", 0.9, 9, ablation=ablation, n=8, batch_size=4, seed=1, node_target_sparsity=node_target)
    kw = dict(progress=False, loaded=tiny)
    whole = run_edges("tiny-gpt2", config, **kw)
    checkpoint = tmp_path / "run.ckpt"
    with cut_at_step(6), pytest.raises(Cut):  # steps 1-5 done, the last checkpoint after 4
        run_edges("tiny-gpt2", config, checkpoint_path=checkpoint, checkpoint_every=2, **kw)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["step"] == 4 and "log_alpha" in saved and "gate_logits" not in saved  # the file keys of old
    resumed = run_edges("tiny-gpt2", config, checkpoint_path=checkpoint, checkpoint_every=2, **kw)
    assert torch.equal(resumed.training.gate_logits, whole.training.gate_logits)
    if node_target is not None:
        assert torch.equal(resumed.training.node_gate_logits, whole.training.node_gate_logits)
    assert resumed.training.curve == whole.training.curve and len(resumed.training.curve["step"]) == 9
    assert without_times(resumed.result) == without_times(whole.result)
    assert not checkpoint.exists()  # deleted once the training is done
    assert resumed.result.metrics["training_cpu_seconds"] > 0 and whole.result.metrics["training_cpu_seconds"] > 0


def cut_training(tiny, checkpoint):
    """A 6-step training on the tiny model cut off after step 3 (checkpoint after step 2): its arguments."""
    model, tokenizer = tiny
    data = get_task("ioi").generate(tokenizer, n=8, seed=0)
    r = make_replacement(model, "zero")
    kw = dict(
        target_sparsity=0.9, steps=6, batch_size=4, progress=False, checkpoint_path=checkpoint, checkpoint_every=2
    )
    with cut_at_step(4), pytest.raises(Cut):
        train_edges(model, data.validation.tokens, r, **kw)
    return model, data, r, kw


def test_a_training_resumed_from_a_checkpoint_without_cpu_time_reports_none(tiny, tmp_path):
    """Checkpoints made before CPU time was recorded resume, with the CPU time unknown (not wrong)."""
    checkpoint = tmp_path / "run.ckpt"
    model, data, r, kw = cut_training(tiny, checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["cpu_seconds"] > 0
    torch.save({k: v for k, v in saved.items() if k != "cpu_seconds"}, checkpoint)
    resumed = train_edges(model, data.validation.tokens, r, **kw)
    assert resumed.cpu_seconds is None and resumed.seconds > saved["seconds"]


def test_a_checkpoint_of_other_settings_is_refused(tiny, tmp_path):
    checkpoint = tmp_path / "run.ckpt"
    model, data, r, kw = cut_training(tiny, checkpoint)
    with pytest.raises(ValueError, match=r"run.ckpt belongs to another training: lr 0.8 \(checkpoint\) vs 0.5"):
        train_edges(model, data.validation.tokens, r, **{**kw, "lr": 0.5})
    with pytest.raises(ValueError, match="tokens"):  # other prompts
        train_edges(model, data.test.tokens, r, **kw)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
        train_edges(model, data.validation.tokens, r, **{**kw, "checkpoint_every": 0})
    assert checkpoint.exists()  # a refused checkpoint is left alone
    train_edges(model, data.validation.tokens, r, **kw)
    assert not checkpoint.exists()


def test_an_edge_result_is_computed_once_then_read(tiny, tmp_path, monkeypatch):
    import circuitlib.pipeline.edges as edges_train

    model, tokenizer = tiny
    config = EdgeConfig("ioi", 0.9, 4, n=8, batch_size=4)
    first = edge_result(tmp_path, model, tokenizer, config, progress=False)
    path = tmp_path / "ioi-mean-seed0-n8-bs4-steps4-target0.9-sampled-clip1-authors-splitembed.json"
    assert edge_result_path(tmp_path, config, model) == path
    gates = gates_path(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, gates.name])  # no checkpoint, no temporary
    # the stored gate locations are the ones the binary circuit was cut from, under the authors' file key
    assert set(torch.load(gates, weights_only=True)) == {"log_alpha", "node_log_alpha"}
    gate_logits = load_gates(gates)["gate_logits"]
    read = binarize(graph_for(model), gate_logits)
    assert [graph_for(model).edge_name(e) for e in read.edges] == first.edges and read.nodes == first.nodes
    assert read.threshold == first.threshold

    def no_training(*args, **kwargs):
        raise AssertionError("a stored result was computed again")

    monkeypatch.setattr(edges_train, "run_edges", no_training)
    assert edge_result(tmp_path, model, tokenizer, config, progress=False).to_dict() == first.to_dict()
    for other, difference in (
        (config.replace(lr=0.5), "lr: 0.8 there, 0.5 asked"),
        (config.replace(weight_decay=0.0), "weight_decay: 0.01 there, 0.0 asked"),
        (config.replace(warmup=2), "warmup: None there, 2 asked"),
    ):  # settings the file name leaves out: the one cache (core.resumable.computed_once) refuses them
        with pytest.raises(ValueError, match=rf"holds a result of other settings \({difference}\)"):
            edge_result(tmp_path, model, tokenizer, other, progress=False)
    assert EdgeCircuit.load_json(path).to_dict() == first.to_dict()  # never overwritten


def test_a_result_in_training_is_refused_to_a_second_process(tiny, tmp_path):
    from filelock import FileLock

    model, tokenizer = tiny
    config = EdgeConfig("ioi", 0.9, 4, n=8, batch_size=4)
    path = edge_result_path(tmp_path, config, model)
    with FileLock(path.with_suffix(".lock")):  # as a first process holds it while it trains
        with pytest.raises(ResultInProgress, match="another process is computing .*target0.9-.*json"):
            edge_result(tmp_path, model, tokenizer, config, progress=False)
        assert not path.exists() and not path.with_suffix(".ckpt").exists()
    edge_result(tmp_path, model, tokenizer, config, progress=False)  # a lock left by a killed process does not block
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, gates_path(path).name])


def test_a_result_that_arrives_during_training_is_kept(tiny, tmp_path, monkeypatch):
    """A file copied in from elsewhere (another machine, no shared lock) while this process trains."""
    import circuitlib.pipeline.edges as edges_train

    model, tokenizer = tiny
    config = EdgeConfig("ioi", 0.9, 4, n=8, batch_size=4)
    path = edge_result_path(tmp_path, config, model)
    real = edges_train.run_edges

    def trained_while_a_copy_arrives(*args, **kwargs):
        run = real(*args, **kwargs)
        EdgeCircuit.from_dict({**run.result.to_dict(), "threshold": -1.0}).save_json(path)
        return run

    monkeypatch.setattr(edges_train, "run_edges", trained_while_a_copy_arrives)
    with pytest.warns(UserWarning, match="appeared while this process computed"):
        kept = edge_result(tmp_path, model, tokenizer, config, progress=False)
    assert kept.threshold == -1.0 == EdgeCircuit.load_json(path).threshold  # the arrived file, unchanged


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_the_rebuilt_standalone_model_is_the_runs(tiny, tmp_path, ablation):
    model, tokenizer = tiny
    run = run_edges(
        "tiny-gpt2", EdgeConfig("ioi", 0.8, 4, ablation=ablation, n=8, batch_size=4), progress=False, loaded=tiny
    )
    assert run.result.metrics["torch_threads"] == torch.get_num_threads()  # timings carry their thread count
    run.result.save_json(tmp_path / "edges.json")
    rebuilt = standalone_model(EdgeCircuit.load_json(tmp_path / "edges.json"), model, tokenizer)
    assert rebuilt.kept_heads() == run.pruned.kept_heads() and rebuilt.kept_mlps() == run.pruned.kept_mlps()
    tokens = run.data.test.tokens
    with torch.no_grad():
        assert torch.allclose(rebuilt(tokens, last_only=True), run.pruned(tokens, last_only=True), atol=1e-6, rtol=0)
    other = EdgeCircuit.from_dict({**run.result.to_dict(), "settings": {**run.result.settings, "model": "gpt2"}})
    with pytest.raises(ValueError, match="computed on 'gpt2'"):
        standalone_model(other, model, tokenizer)


def test_the_edge_runs_script_computes_what_is_missing(tmp_path, capsys):
    path = Path(__file__).resolve().parents[2] / "scripts" / "edge_runs.py"
    spec = importlib.util.spec_from_file_location("edge_runs", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as done:
        script.main(["--help"])
    assert done.value.code == 0 and "--targets" in capsys.readouterr().out
    argv = [
        "--model",
        "tiny-gpt2",
        "--n",
        "8",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--legacy",
        "--targets",
        "0.9",
        "--out-dir",
        str(tmp_path),
    ]  # --legacy: the names of the chapter's committed results
    assert script.main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ioi-mean-seed0-n8-bs4-steps3-target0.9.gates.pt",
        "ioi-mean-seed0-n8-bs4-steps3-target0.9.json",
    ]
    assert "0 of 1 results already" in capsys.readouterr().out
    assert script.main(argv) == 0
    assert "1 of 1 results already" in capsys.readouterr().out
    from filelock import FileLock

    busy = tmp_path / "ioi-mean-seed0-n8-bs4-steps3-target0.95.lock"
    with FileLock(busy):  # another edge_runs.py trains 0.95: this one skips it, does 0.98
        assert script.main(argv[:-3] + ["0.95", "0.98", "--out-dir", str(tmp_path)]) == 0
    assert "target 0.95: skipped, another process is computing" in capsys.readouterr().out
    assert (
        not busy.with_suffix(".json").exists() and busy.with_name(busy.name.replace("0.95.lock", "0.98.json")).exists()
    )
    with pytest.raises(SystemExit) as refused:
        script.main(["--targets", "2.5"])
    assert refused.value.code == 2 and "target sparsity must be a number in [0, 2)" in capsys.readouterr().err
    authors = tmp_path / "authors"  # the default recipe: the authors', named so
    assert script.main(argv[:-3] + ["1.02", "--out-dir", str(authors)]) == 2  # the forced count keeps no edge
    assert "forced-count readout" in capsys.readouterr().err and not authors.exists()
    assert script.main([a for a in argv[:-3] if a != "--legacy"] + ["1.02", "--out-dir", str(authors)]) == 0
    record = json.loads(
        (authors / "ioi-mean-seed0-n8-bs4-steps3-target1.02-sampled-clip1-authors-splitembed.json").read_text()
    )
    assert {k: record["settings"][k] for k in ("sparsity_term", "clip_grad_norm", "readout", "split_embedding")} == {
        "sparsity_term": "sampled",
        "clip_grad_norm": 1.0,
        "readout": "authors",
        "split_embedding": True,
    }
