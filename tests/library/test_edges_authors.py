"""Edge Pruning as its authors run it (issue 28): their read-off, sparsity term, targets above 1,
gradient clipping and graphs, each pinned against a computation written out by hand here; the
masked forward pass stays exact on the per-K/V-head graph and with split embeddings."""

import math
from unittest import mock

import pytest
import torch

from circuitlib.core.ablation import mean_activations
from circuitlib.core.surgery import prune
from circuitlib.discovery.edges.graph import (
    EdgeGraph,
    all_open,
    deterministic_mask,
    expected_closed,
    graph_for,
    make_replacement,
    masked_logits,
    sample_gates,
)
from circuitlib.discovery.edges.train import EdgeCircuit, binarize, check_sparsity, train_edges


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- graphs and their edge counts -----------------------------------------------------------------


def authors_gpt2_edges(n_layers, n_heads, embedding_writers):
    """Edge-Pruning modeling_fpt2.get_num_edges, written out: layer l's q, k and v readers read the
    embeddings and the l earlier layers' heads and MLPs; its MLP reads those and its own heads;
    the logits read every writer."""
    total = 0
    for l in range(n_layers):
        before = embedding_writers + l * (n_heads + 1)
        total += 3 * n_heads * before + before + n_heads
    return total + embedding_writers + n_layers * (n_heads + 1)


def authors_llama_edges(n_layers, n_heads, n_kv_heads):
    """Edge-Pruning modeling_fllama.num_edges (one embedding writer), written out by writer: the
    embedding feeds every reader; each head feeds its own MLP, every later layer's H query, 2 K
    key/value readers and MLP, and the logits; so does each MLP, without its own layer's MLP."""
    per_layer_readers = n_heads + 2 * n_kv_heads + 1
    total = n_layers * per_layer_readers + 1
    for l in range(n_layers):
        later = (n_layers - l - 1) * per_layer_readers
        total += n_heads * (1 + later + 1) + later + 1
    return total


def test_edge_counts_of_gpt2_small_and_the_stand_in():
    # GPT-2 Small: 12 layers x 12 heads (a shape only, no weights)
    split, one = EdgeGraph.build(12, 12, split_embedding=True), EdgeGraph.build(12, 12)
    assert split.n_edges == authors_gpt2_edges(12, 12, 2) == 32_936  # their runs (--with_embedding_nodes)
    assert one.n_edges == authors_gpt2_edges(12, 12, 1) == 32_491  # the paper's text
    assert split.writers[:3] == ["tok_embed", "pos_embed", "0.0"] and len(split.writers) == 158
    # SmolLM2-135M's shape: 30 layers, 9 query heads sharing 3 K/V heads, one embedding writer
    kv, per_query = EdgeGraph.build(30, 9, 3), EdgeGraph.build(30, 9, 3, kv_readers="per-query-head")
    assert kv.n_edges == authors_llama_edges(30, 9, 3) == 70_651
    assert per_query.n_edges == authors_llama_edges(30, 9, 9) == 123_211
    assert kv.readers[9:15] == ["0.kv0.k", "0.kv1.k", "0.kv2.k", "0.kv0.v", "0.kv1.v", "0.kv2.v"]
    assert kv.reader_nodes[9] == ("0.0", "0.1", "0.2")
    for g in (split, kv):
        for e in (0, g.n_edges // 3, g.n_edges - 1):
            assert g.parse_edge(g.edge_name(e)) == e
    with pytest.raises(ValueError, match="unknown kv_readers"):
        EdgeGraph.build(2, 4, 2, kv_readers="per-layer")


def test_the_default_graphs(models):
    assert graph_for(models["gpt2"]).split_embedding  # learned positions: two writers
    llama = graph_for(models["llama"])
    assert not llama.split_embedding and llama.n_kv_readers == 2  # 6 query heads, 2 K/V heads
    with pytest.raises(ValueError, match="no position embedding"):
        graph_for(models["llama"], split_embedding=True)


GRAPHS = [
    ("gpt2", "per-kv-head", True),
    ("gpt2", "per-kv-head", False),
    ("llama", "per-kv-head", None),
    ("llama", "per-query-head", None),
]


@pytest.fixture(scope="module")
def means(models, data):
    return {a: mean_activations(m, data[0]) for a, m in models.items()}


@pytest.mark.parametrize("arch, kv_readers, split", GRAPHS)
def test_every_graph_is_exact_open_and_node_ablated(models, data, means, arch, kv_readers, split):
    """All open: the full model. A node's outgoing edges closed: the node mean-ablated (the pruned model)."""
    model, (patching, validation) = models[arch], data
    g = graph_for(model, kv_readers, split)
    r = make_replacement(model, "mean", patching=patching, means=means[arch], graph=g)
    with torch.no_grad():
        assert torch.allclose(
            masked_logits(model, validation, all_open(model, g), r, graph=g),
            model(validation, last_only=True),
            atol=1e-4,
        )
        for node in ("0.1", "1.4" if arch == "llama" else "1.3", "MLP 1"):
            gates = all_open(model, g).clone()
            gates[[e for e, (w, _) in enumerate(g.edges) if g.writers[w] == node]] = 0.0
            reference = prune(model, [n for n in g.nodes if n != node], "mean", means[arch])(validation, last_only=True)
            assert torch.allclose(masked_logits(model, validation, gates, r, graph=g), reference, atol=1e-4)
    if arch == "gpt2":  # a replacement of the other embedding convention is refused
        other = make_replacement(model, "zero", graph=graph_for(model, split_embedding=not split))
        with pytest.raises(ValueError, match="make it with make_replacement"):
            masked_logits(model, validation, all_open(model, g), other, graph=g)


def forward_with_edited_reader(model, tokens, layer_idx, kv_head, kind, delta):
    """The full model by hand, except that the `kind` ("k" or "v") input of K/V head `kv_head` in
    layer `layer_idx` is its residual stream minus `delta` [B, S, D]: what closing one edge into a
    K/V-head reader does (the writer's output replaced, for that reader only)."""
    x = model.embed(tokens)
    for l, layer in enumerate(model.layers):
        if l == layer_idx:
            keys_values = layer._keys_values
            edited = layer.ln1(x - delta)

            def patched(h, start, keys_values=keys_values, edited=edited):
                k, v = keys_values(h, start)
                k2, v2 = keys_values(edited, start)
                if kind == "k":
                    k[:, kv_head] = k2[:, kv_head]
                else:
                    v[:, kv_head] = v2[:, kv_head]
                return k, v

            with mock.patch.object(layer, "_keys_values", patched):
                x = x + layer.attn_out(x)
        else:
            x = x + layer.attn_out(x)
        x = x + layer.mlp_out(x)
    return model.unembed(x[:, -1])


@pytest.mark.parametrize("kind", ["k", "v"])
def test_removing_one_kv_reader_edge_is_exact(models, data, means, kind):
    model, (patching, validation) = models["llama"], data
    g = graph_for(model)  # one reader per K/V head
    with torch.no_grad():
        assert torch.allclose(
            forward_with_edited_reader(model, validation, 0, 0, kind, 0.0), model(validation, last_only=True), atol=1e-5
        )
        # embed -> 1.kv1.<kind>, zero replacement: the reader loses the embedding
        zero = make_replacement(model, "zero", graph=g)
        gates = all_open(model, g).clone()
        gates[g.parse_edge(f"embed -> 1.kv1.{kind}")] = 0.0
        reference = forward_with_edited_reader(model, validation, 1, 1, kind, model.embed(validation))
        ours = masked_logits(model, validation, gates, zero, graph=g)
        assert torch.allclose(ours, reference, atol=1e-5)
        assert not torch.allclose(ours, model(validation, last_only=True), atol=1e-3)
        # head 0.4 -> 2.kv0.<kind>, mean replacement: the reader gets the head's mean output instead of its output
        layer0 = model.layers[0]
        z = layer0.z(model.embed(validation))  # [B, S, H, E]
        out = z[:, :, 4] @ layer0.W_O[4]  # [B, S, D]
        mean_out = means["llama"].z[0][4] @ layer0.W_O[4]  # [S, D]
        r = make_replacement(model, "mean", patching=patching, means=means["llama"], graph=g)
        gates = all_open(model, g).clone()
        gates[g.parse_edge(f"0.4 -> 2.kv0.{kind}")] = 0.0
        reference = forward_with_edited_reader(model, validation, 2, 0, kind, out - mean_out)
        assert torch.allclose(masked_logits(model, validation, gates, r, graph=g), reference, atol=1e-5)


def test_split_embedding_edges_are_exact(models, data):
    """Closing 'pos_embed -> MLP 0' under zero replacement: MLP 0 reads its input without the positions."""
    model, (_, validation) = models["gpt2"], data
    g = graph_for(model)
    gates = all_open(model, g).clone()
    gates[g.parse_edge("pos_embed -> MLP 0")] = 0.0
    with torch.no_grad():
        x = model.embed(validation)
        layer = model.layers[0]
        x = x + layer.attn_out(x)
        x = x + layer.mlp_out(x - model.W_pos[: validation.shape[1]])
        for layer in model.layers[1:]:
            x = x + layer.attn_out(x)
            x = x + layer.mlp_out(x)
        reference = model.unembed(x[:, -1])
        ours = masked_logits(model, validation, gates, make_replacement(model, "zero", graph=g), graph=g)
    assert torch.allclose(ours, reference, atol=1e-5)


# ---- the read-off ---------------------------------------------------------------------------------


def test_the_authors_readoff_by_hand():
    """One layer, one head: 8 edges in 5 of the authors' parameter tensors.

    edge  writer -> reader   gate_logits  tensor
    0     embed -> 0.0.q        10      q       P(closed) ~ 0: no zero; value sigmoid(12) ~ 1
    1     embed -> 0.0.k       -10      k       P(closed) ~ 1: one zero
    2     embed -> 0.0.v         0      v       P(closed) = sigmoid(2/3 log(1/11)) = 0.168: rounds to no zero; 0.5
    3     embed -> MLP 0        10      mlp     P(closed) sum ~ 1: one zero, the smaller (edge 4)
    4     0.0 -> MLP 0         -10      mlp
    5     embed -> logits        2      logits  P(closed) 0.027 + 1 + 0 ~ 1.03: one zero (edge 6)
    6     0.0 -> logits        -10      logits  value of edge 5: sigmoid(0.8 x 2 / (2/3)) = sigmoid(2.4)
    7     MLP 0 -> logits       10      logits
    The training's own sparsity is 1 - mean(values) = 1 - (3 sigmoid(12) + 0.5 + sigmoid(2.4)) / 8.
    Bisection from [0, 1]: t = 0.5 keeps 4 edges (sparsity 0.5, above the own 0.448), so t moves
    below 0.5 and keeps 5 there (sparsity 0.375, not above): the last midpoint, just below 0.5,
    keeps edges 0, 2, 3, 5, 7. The head then reaches the logits by no kept edge: it is dead, and
    its input edges 0 and 2 go. Left: edges 3, 5, 7 and the node MLP 0.
    """
    g = EdgeGraph.build(1, 1)
    assert g.groups == [(0, 1), (1, 1), (2, 1), (3, 2), (5, 3)]
    la = torch.tensor([10.0, -10, 0, 10, -10, 2, -10, 10])
    assert math.isclose(
        float(expected_closed(torch.tensor(0.0))), 1 / (1 + math.exp(-2 / 3 * math.log(1 / 11))), rel_tol=1e-6
    )
    s12, s24 = 1 / (1 + math.exp(-12)), 1 / (1 + math.exp(-2.4))
    assert deterministic_mask(la, g.groups).tolist() == pytest.approx([s12, 0, 0.5, s12, 0, s24, 0, s12], abs=1e-6)
    read = binarize(g, la)
    assert read.training_sparsity == pytest.approx(1 - (3 * s12 + 0.5 + s24) / 8, abs=1e-6)
    assert read.n_thresholded == 5
    assert read.edges == [3, 5, 7] and read.nodes == ["MLP 0"]
    assert read.threshold == 0.0  # the smallest kept gate_logits (edge 2)
    # the forced count keeps (1 - target) x 8 edges after dead-node removal, whatever the training chose
    forced = binarize(g, la, 0.75, readout="forced-count")
    assert len(forced.edges) <= 2 and forced.training_sparsity is None
    with pytest.raises(ValueError, match="forced-count readout keeps"):
        binarize(g, la, 1.05, readout="forced-count")
    with pytest.raises(ValueError, match="unknown readout"):
        binarize(g, la, readout="top-k")


def test_committed_results_load_with_their_settings():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "results/edges/ioi-mean-seed0-n32-bs8-steps3000-target0.9.json"
    result = EdgeCircuit.load_json(path)
    assert {
        k: result.settings[k] for k in ("sparsity_term", "clip_grad_norm", "readout", "kv_readers", "split_embedding")
    } == {
        "sparsity_term": "expected",
        "clip_grad_norm": None,
        "readout": "forced-count",
        "kv_readers": "per-query-head",
        "split_embedding": False,
    }
    assert result.n_edges_total == EdgeGraph.build(30, 9, 3, kv_readers="per-query-head").n_edges


# ---- the training: sparsity term, targets above 1, clipping ------------------------------------------


@pytest.fixture(scope="module")
def zero_repl(models):
    return make_replacement(models["gpt2"], "zero")


def test_the_sparsity_terms_by_hand(models, data, zero_repl):
    """Step 1's recorded sparsity: 1 - the mean of the gates it sampled (the authors'), or the mean
    P(gate closed) of the initial gates ('expected'); both rebuilt here from the seeded generator."""
    model, (_, validation) = models["gpt2"], data
    g = graph_for(model)
    kw = dict(target_sparsity=0.5, steps=1, batch_size=4, seed=7, progress=False)
    gen = torch.Generator().manual_seed(7)
    la = 10.0 + 0.01 * torch.randn(g.n_edges, generator=gen)  # the initial gates
    sampled = sample_gates(la, gen)  # step 1's gates
    assert train_edges(model, validation, zero_repl, **kw).curve["edge_sparsity"][0] == pytest.approx(
        1 - sampled.mean().item(), abs=1e-7
    )
    assert train_edges(model, validation, zero_repl, sparsity_term="expected", **kw).curve["edge_sparsity"][
        0
    ] == pytest.approx(expected_closed(la).mean().item(), abs=1e-7)
    with pytest.raises(ValueError, match="unknown sparsity_term"):
        train_edges(model, validation, zero_repl, sparsity_term="l0", **kw)


def test_targets_above_one_are_accepted(models, data, zero_repl):
    model, (_, validation) = models["gpt2"], data
    assert check_sparsity(1.1) == 1.1 and check_sparsity("1.4") == 1.4
    for bad in (2.0, -0.01, float("inf")):
        with pytest.raises(ValueError, match=r"must be a number in \[0, 2\)"):
            check_sparsity(bad)
    t = train_edges(model, validation, zero_repl, target_sparsity=1.1, steps=3, warmup=1, progress=False)
    assert t.curve["target"] == [1.1] * 3 and t.curve["lambda1"][-1] != 0


def test_gradients_are_clipped_to_norm_one_over_gates_and_multipliers(models, data, zero_repl):
    """The gradients AdamW steps with: the raw ones (clip_grad_norm=None), or those scaled by
    1 / (their joint norm + 1e-6) when that norm is above 1 (torch's clip_grad_norm_, as the
    Hugging Face Trainer applies it to every trained parameter)."""
    model, (_, validation) = models["gpt2"], data
    seen = {}

    def recording(clip):
        real = torch.optim.AdamW.step

        def step(self, *args, **kwargs):
            seen.setdefault(clip, []).append([p.grad.clone() for group in self.param_groups for p in group["params"]])
            return real(self, *args, **kwargs)

        return step

    kw = dict(target_sparsity=1.9, warmup=1, steps=2, batch_size=4, seed=1, progress=False)  # a large gap: norm > 1
    for clip in (None, 1.0):
        with mock.patch.object(torch.optim.AdamW, "step", recording(clip)):
            train_edges(model, validation, zero_repl, clip_grad_norm=clip, **kw)
    raw = seen[None][0] + seen[None][1]  # step 1: gates, then multipliers
    clipped = seen[1.0][0] + seen[1.0][1]
    norm = torch.linalg.vector_norm(torch.cat([x.flatten() for x in raw])).item()
    assert norm > 1
    for r, c in zip(raw, clipped):
        assert torch.allclose(c, r / (norm + 1e-6), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="clip_grad_norm must be a number > 0"):
        train_edges(model, validation, zero_repl, clip_grad_norm=0, **kw)


# ---- IOI as the authors train on it ---------------------------------------------------------------


def test_ioi_mixed_has_both_orders_many_templates_and_counterfactuals():
    from circuitlib.models.loading import gpt2_tokenizer
    from circuitlib.tasks import IOI_TEMPLATES, get_task

    tok = gpt2_tokenizer()
    task = get_task("ioi-mixed")
    templates = task.templates(tok)
    assert len(templates) == 6 and set(templates) < set(IOI_TEMPLATES)  # the 15-token ones
    data = task.generate(tok, n=100, seed=0)
    split = data.validation
    assert split.corrupted.shape == split.tokens.shape == (100, 15)
    orders = {"abba": 0, "baba": 0}
    for prompt, answer, corrupted in zip(split.prompts, split.answers, split.corrupted):
        words, other = prompt.split(), tok.decode(corrupted).split()
        a = tok.decode(answer).strip()
        names = [i for i, w in enumerate(words) if w != other[i]]  # the counterfactual differs in names only
        assert len(words) == len(other) and len(names) == 3
        first, second, third = (words[i].rstrip(",.") for i in names)
        assert a in (first, second) and third == ({first, second} - {a}).pop()  # A and B, then B again
        new = [other[i].rstrip(",.") for i in names]
        assert len(set(new)) == 3 and not set(new) & {first, second}  # three other names, none repeated
        orders["abba" if first == a else "baba"] += 1
    assert min(orders.values()) > 30  # both orders
    assert data.test[:5].corrupted.shape == (5, 15)  # slicing keeps the pairs


def test_edge_pruning_uses_the_tasks_counterfactuals(models):
    from circuitlib.discovery.edges.train import corrupt
    from circuitlib.models.loading import gpt2_tokenizer
    from circuitlib.tasks import get_task

    split = get_task("ioi-mixed").generate(gpt2_tokenizer(), n=8, seed=0).validation
    assert corrupt(split) is split.corrupted
    ioi = get_task("ioi").generate(gpt2_tokenizer(), n=8, seed=0).validation
    assert torch.equal(corrupt(ioi), ioi.tokens.roll(1, 0))  # no counterfactuals: another prompt


def test_cli_edges_takes_a_task_file(tmp_path, capsys):
    from pathlib import Path

    from circuitlib.cli import main

    task = Path(__file__).resolve().parents[2] / "examples" / "capitals.jsonl"
    out = tmp_path / "run"
    assert (
        main(
            [
                "edges",
                "--model",
                "tiny-gpt2",
                "--task",
                str(task),
                "--target-sparsity",
                "1.05",
                "--steps",
                "2",
                "--n",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "edges.json").is_file()
    assert "the training chose sparsity" in capsys.readouterr().out  # the size the read-off took
    assert (
        main(
            [
                "edges",
                "--model",
                "tiny-gpt2",
                "--task",
                "no-such-task",
                "--target-sparsity",
                "0.9",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "other"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown task 'no-such-task'" in err and err.count("\n") == 1 and not (tmp_path / "other").exists()


def test_the_greedy_method_runs_on_ioi_mixed():
    from circuitlib.discovery.greedy import extract
    from circuitlib.models.loading import load_model
    from circuitlib.tasks import get_task

    model, tok = load_model("tiny-gpt2")
    data = get_task("ioi-mixed").generate(tok, n=6, seed=0)
    circuit = extract(model, data.patching.tokens, data.validation.tokens, alpha=1e-3, progress=False)
    assert set(circuit.kept) <= set(graph_for(model).nodes)


@pytest.mark.parametrize(
    "arch, kv_readers", [("gpt2", "per-kv-head"), ("llama", "per-kv-head"), ("llama", "per-query-head")]
)
def test_step_flops_are_counted_exactly(models, data, arch, kv_readers):
    """`step_flops` against torch's FLOP counter over one training step (attention by its math
    kernel, which the counter sees as matrix products; in-place addmm_ counted as addmm)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from circuitlib.discovery.edges.train import frozen_weights, step_flops

    model, (_, validation) = models[arch], data
    g = graph_for(model, kv_readers)
    r = make_replacement(model, "zero", graph=g)
    with torch.no_grad():
        full = model(validation[:4], last_only=True)  # once per training, not per step

    def addmm_(out, a, b, out_shape=None, **kwargs):  # [m, n] += [m, k] @ [k, n]
        return 2 * a[0] * a[1] * b[1]

    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_})
    with frozen_weights(model), sdpa_kernel(SDPBackend.MATH), counter:  # as train_edges: the weights frozen
        gates = torch.full((g.n_edges,), 0.7, requires_grad=True)
        logits = masked_logits(model, validation[:4], gates, r, graph=g)
        torch.nn.functional.kl_div(
            logits.log_softmax(-1), full.log_softmax(-1), log_target=True, reduction="batchmean"
        ).backward()
    assert counter.get_total_flops() == step_flops(model, g, 4, validation.shape[1])["total"]
