"""circuitlib.plots: circuit grids, ROC curves, and offline, deterministic attention figures."""

import re
import socket

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from circuitlib import plots  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def fresh_page():
    plots.reset_page()
    yield
    plots.reset_page()


def _cells(fig, prefix):
    return [p.get_gid() for ax in fig.axes for p in ax.patches
            if (p.get_gid() or "").startswith(prefix)]


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
    fig = plots.circuit_grid(["9.6", "9.9", "1.2"], 12, 12, kept_mlps=[0, 11],
                             ground_truth=["9.9", "9.6", "0.1"], title="IOI")
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
    fig = plots.roc_plot({"mean": ([0.5, 0.0, 1.0], [0.9, 0.0, 1.0], 0.87),
                          "zero": ([0.0, 1.0], [0.0, 1.0], None)})
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # two curves and the chance diagonal
    assert list(ax.lines[0].get_xdata()) == [0.0, 0.5, 1.0]  # drawn in FPR order
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "mean (AUC = 0.87)" in labels and "zero" in labels


# ------------------------------------------------------------------ attention

def test_attention_html_is_offline():
    html = plots.attention_plot(TOKENS, _pattern(), ["9.6", "9.9"])._repr_mimebundle_()["text/html"]
    assert not re.search(r"<script[^>]*\ssrc=", html), "no external (or any src=) scripts"
    for cdn in ("unpkg.com", "jsdelivr", "cdnjs", "circuitsvis@", "sourceMappingURL"):
        assert cdn not in html
    assert not re.search(r"import[^;]*from\s*[\"']https?:", html)
    # two <script> elements (bundle, figure); the token "</script>" cannot close one early
    assert html.count("</script") == 2
    assert "\\u003c/script\\u003e" in html


def test_attention_ids_are_stable_and_content_derived():
    a1 = plots.attention_plot(TOKENS, _pattern(0), ["9.6", "9.9"], include_bundle=False)
    a2 = plots.attention_plot(TOKENS, _pattern(0), ["9.6", "9.9"], include_bundle=False)
    b = plots.attention_plot(TOKENS, _pattern(1), ["9.6", "9.9"], include_bundle=False)
    h1, h2, hb = (x._repr_mimebundle_()["text/html"] for x in (a1, a2, b))
    assert h1 == h2
    assert a1.element_id == a2.element_id != b.element_id
    assert f'id="{a1.element_id}"' in h1 and a1.element_id not in hb
    assert "uuid" not in h1
    assert a1._repr_mimebundle_()["image/png"] == a2._repr_mimebundle_()["image/png"]


def test_bundle_is_inlined_once_per_page():
    first = plots.attention_plot(TOKENS, _pattern(0), ["9.6", "9.9"])._repr_mimebundle_()
    second = plots.attention_plot(TOKENS, _pattern(1), ["9.6", "9.9"])._repr_mimebundle_()
    page = first["text/html"] + second["text/html"]
    assert page.count("data-circuitlib-bundle=") == 1
    assert page.index("data-circuitlib-bundle=") < page.index("data-circuitlib-figure=")
    assert "CircuitsVis" in first["text/html"] and len(first["text/html"]) > 500_000
    assert len(second["text/html"]) < 100_000
    plots.reset_page()
    again = plots.attention_plot(TOKENS, _pattern(0), ["9.6", "9.9"])._repr_mimebundle_()
    assert again["text/html"] == first["text/html"]  # re-running from the top: same bytes


def test_load_circuitsvis_takes_the_bundle():
    loader = plots.load_circuitsvis()._repr_mimebundle_()
    assert "data-circuitlib-bundle=" in loader["text/html"]
    fig = plots.attention_plot(TOKENS, _pattern(), ["9.6", "9.9"])._repr_mimebundle_()
    assert "data-circuitlib-bundle=" not in fig["text/html"]


def test_png_fallback_and_static_mode():
    import base64

    bundle = plots.attention_plot(TOKENS, _pattern(), ["9.6", "9.9"])._repr_mimebundle_()
    assert base64.b64decode(bundle["image/png"]).startswith(PNG_MAGIC)
    assert 'src="data:image/png;base64,' in bundle["text/html"]  # shown where scripts are stripped
    static = plots.attention_plot(TOKENS, _pattern(), ["9.6", "9.9"], static=True)
    sb = static._repr_mimebundle_()
    assert "text/html" not in sb and base64.b64decode(sb["image/png"]).startswith(PNG_MAGIC)
    assert static.figure().axes  # a matplotlib Figure with one heatmap per head


def test_attention_accepts_tensors_and_checks_shapes():
    torch = pytest.importorskip("torch")
    a = plots.attention_plot(TOKENS, torch.tensor(_pattern(), dtype=torch.float32), ["a", "b"])
    assert a.pattern.shape == (2, 5, 5)
    with pytest.raises(ValueError):
        plots.attention_plot(TOKENS[:4], _pattern(), ["a", "b"])
    with pytest.raises(ValueError):
        plots.attention_plot(TOKENS, _pattern(), ["a"])
