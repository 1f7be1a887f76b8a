"""circuitlib.plots: circuit grids and ROC curves."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from circuitlib import plots  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_network")  # figures must not reach for the network

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cells(fig, prefix):
    return [p.get_gid() for ax in fig.axes for p in ax.patches if (p.get_gid() or "").startswith(prefix)]


def _pattern(seed=0, heads=2, seq=5):
    rng = np.random.default_rng(seed)
    p = np.tril(rng.random((heads, seq, seq))) + np.eye(seq)
    return p / p.sum(-1, keepdims=True)


TOKENS = ["<s>", "When", " Mary", "</script>", " $x$"]


# ------------------------------------------------------------------ circuit grid


def test_grid_fills_exactly_the_kept_heads():
    fig = plots.circuit_grid(["9.6", "9.9", "0.1"], n_layers=12, n_heads=12)
    heads = _cells(fig, "head ")
    assert len(heads) == 144
    kept = sorted(g.split()[1] for g in heads if g.endswith("kept"))
    assert kept == ["0.1", "9.6", "9.9"]
    assert not _cells(fig, "mlp ")


def test_grid_mlp_column_and_ground_truth_categories():
    fig = plots.circuit_grid(
        ["9.6", "9.9", "1.2"], 12, 12, kept_mlps=[0, 11], ground_truth=["9.9", "9.6", "0.1"], title="IOI"
    )
    heads = _cells(fig, "head ")
    assert sum(g.endswith(" tp") for g in heads) == 2
    assert sum(g.endswith(" fp") for g in heads) == 1
    assert sum(g.endswith(" fn") for g in heads) == 1
    assert sum(" kept" in g for g in heads) == 3
    mlps = _cells(fig, "mlp ")
    assert len(mlps) == 12 and sum(g.endswith("kept") for g in mlps) == 2
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("TP: 2" in t for t in legend) and any("FN: 1" in t for t in legend)
    assert fig.axes[0].get_title() == "IOI"


def test_grid_on_given_axes_and_bad_heads():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    assert plots.circuit_grid(["1.1"], 2, 3, ax=ax) is fig
    plt.close(fig)
    with pytest.raises(ValueError):
        plots.circuit_grid(["2.0"], 2, 3)
    with pytest.raises(ValueError):
        plots.circuit_grid(["1-1"], 2, 3)


# ------------------------------------------------------------------ ROC


def test_roc_plot_curves_and_auc_labels():
    fig = plots.roc_plot({"mean": ([0.5, 0.0, 1.0], [0.9, 0.0, 1.0], 0.87), "zero": ([0.0, 1.0], [0.0, 1.0], None)})
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # two curves and the chance diagonal
    assert list(ax.lines[0].get_xdata()) == [0.0, 0.5, 1.0]  # drawn in FPR order
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "mean (AUC = 0.87)" in labels and "zero" in labels


# ------------------------------------------------------------------ attention


# ------------------------------------------------------------------ circuit graph (compiled models)

GRAPH_COMPONENTS = ["0.0", "0.1", "MLP 0", "1.0", "1.1", "MLP 1"]
GRAPH_TRUTH = ["0.0", "MLP 0", "1.1"]
GRAPH_EDGES = ["embed -> 0.0.q", "pos -> 0.0.k", "0.0 -> MLP 0", "MLP 0 -> 1.1.v", "1.1 -> logits"]


def test_circuit_graph_draws_the_truth_alone():
    fig = plots.circuit_graph(GRAPH_COMPONENTS, GRAPH_TRUTH, GRAPH_EDGES)
    assert len(fig.axes) == 1
    truth = {f"node {n} truth" for n in ["0.0", "MLP 0", "1.1", "embed", "pos", "logits"]}
    assert set(_cells(fig, "node ")) == truth | {"node 0.1 off", "node 1.0 off", "node MLP 1 off"}
    assert sorted(g[len("edge ") :].rsplit(" ", 1)[0] for g in _cells(fig, "edge ")) == sorted(GRAPH_EDGES)
    assert {g.rsplit(" ", 1)[1] for g in _cells(fig, "edge ")} == {"truth"}


def test_circuit_graph_marks_hits_misses_and_extras():
    found_nodes = ["MLP 0", "1.1", "1.0"]
    found_edges = ["0.0 -> MLP 0", "MLP 0 -> 1.1.v", "1.1 -> logits", "embed -> 1.0.k"]
    fig = plots.circuit_graph(GRAPH_COMPONENTS, GRAPH_TRUTH, GRAPH_EDGES, found_nodes, found_edges, title="found")
    assert len(fig.axes) == 2 and fig.axes[1].get_title() == "found"
    panel = [p.get_gid() for p in fig.axes[1].patches]
    assert {"node 0.0 miss", "node MLP 0 hit", "node 1.1 hit", "node 1.0 extra", "node 0.1 off"} <= set(panel)
    edges = {g[len("edge ") :].rsplit(" ", 1)[0]: g.rsplit(" ", 1)[1] for g in panel if g.startswith("edge ")}
    assert edges == {
        "embed -> 0.0.q": "miss",
        "pos -> 0.0.k": "miss",
        "0.0 -> MLP 0": "hit",
        "MLP 0 -> 1.1.v": "hit",
        "1.1 -> logits": "hit",
        "embed -> 1.0.k": "extra",
    }
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend == ["in both (2 components, 3 edges)", "missed (1, 2)", "extra (1, 1)"]


def test_circuit_graph_refuses_unknown_components_and_half_a_found_circuit():
    with pytest.raises(ValueError, match="2.0 not among the model's components"):
        plots.circuit_graph(GRAPH_COMPONENTS, GRAPH_TRUTH, GRAPH_EDGES + ["MLP 1 -> 2.0.q"])
    with pytest.raises(ValueError, match="both found_components and found_edges"):
        plots.circuit_graph(GRAPH_COMPONENTS, GRAPH_TRUTH, GRAPH_EDGES, found_components=["0.0"])
