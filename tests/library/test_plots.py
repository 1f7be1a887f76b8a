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
