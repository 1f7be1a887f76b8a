"""booklib.attention: offline, deterministic CircuitsVis attention figures in the book's pages."""

import re

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from booklib import attention  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_network")  # figures must not reach for the network

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def fresh_page():
    attention.reset_page()
    yield
    attention.reset_page()


def _cells(fig, prefix):
    return [p.get_gid() for ax in fig.axes for p in ax.patches if (p.get_gid() or "").startswith(prefix)]


def _pattern(seed=0, heads=2, seq=5):
    rng = np.random.default_rng(seed)
    p = np.tril(rng.random((heads, seq, seq))) + np.eye(seq)
    return p / p.sum(-1, keepdims=True)


TOKENS = ["<s>", "When", " Mary", "</script>", " $x$"]


# ------------------------------------------------------------------ circuit grid


def test_attention_html_is_offline():
    html = attention.attention_plot(TOKENS, _pattern(), ["9.6", "9.9"])._repr_mimebundle_()["text/html"]
    assert not re.search(r"<script[^>]*\ssrc=", html), "no external (or any src=) scripts"
    for cdn in ("unpkg.com", "jsdelivr", "cdnjs", "circuitsvis@", "sourceMappingURL"):
        assert cdn not in html
    assert not re.search(r"import[^;]*from\s*[\"']https?:", html)
    # two <script> elements (bundle, figure); the token "</script>" cannot close one early
    assert html.count("</script") == 2
    assert "\\u003c/script\\u003e" in html


def test_attention_ids_are_stable_and_content_derived():
    a1 = attention.attention_plot(TOKENS, _pattern(0), ["9.6", "9.9"], include_bundle=False)
    a2 = attention.attention_plot(TOKENS, _pattern(0), ["9.6", "9.9"], include_bundle=False)
    b = attention.attention_plot(TOKENS, _pattern(1), ["9.6", "9.9"], include_bundle=False)
    h1, h2, hb = (x._repr_mimebundle_()["text/html"] for x in (a1, a2, b))
    assert h1 == h2
    assert a1.element_id == a2.element_id != b.element_id
    assert f'id="{a1.element_id}"' in h1 and a1.element_id not in hb
    assert "uuid" not in h1
    assert a1._repr_mimebundle_()["image/png"] == a2._repr_mimebundle_()["image/png"]


def test_bundle_is_inlined_once_per_page():
    first = attention.attention_plot(TOKENS, _pattern(0), ["9.6", "9.9"])._repr_mimebundle_()
    second = attention.attention_plot(TOKENS, _pattern(1), ["9.6", "9.9"])._repr_mimebundle_()
    page = first["text/html"] + second["text/html"]
    assert page.count("data-circuitlib-bundle=") == 1
    assert page.index("data-circuitlib-bundle=") < page.index("data-circuitlib-figure=")
    assert "CircuitsVis" in first["text/html"] and len(first["text/html"]) > 500_000
    assert len(second["text/html"]) < 100_000
    attention.reset_page()
    again = attention.attention_plot(TOKENS, _pattern(0), ["9.6", "9.9"])._repr_mimebundle_()
    assert again["text/html"] == first["text/html"]  # re-running from the top: same bytes


def test_load_circuitsvis_takes_the_bundle():
    loader = attention.load_circuitsvis()._repr_mimebundle_()
    assert "data-circuitlib-bundle=" in loader["text/html"]
    fig = attention.attention_plot(TOKENS, _pattern(), ["9.6", "9.9"])._repr_mimebundle_()
    assert "data-circuitlib-bundle=" not in fig["text/html"]


def test_png_fallback_and_static_mode():
    import base64

    bundle = attention.attention_plot(TOKENS, _pattern(), ["9.6", "9.9"])._repr_mimebundle_()
    assert base64.b64decode(bundle["image/png"]).startswith(PNG_MAGIC)
    assert 'src="data:image/png;base64,' in bundle["text/html"]  # shown where scripts are stripped
    static = attention.attention_plot(TOKENS, _pattern(), ["9.6", "9.9"], static=True)
    sb = static._repr_mimebundle_()
    assert "text/html" not in sb and base64.b64decode(sb["image/png"]).startswith(PNG_MAGIC)
    assert static.figure().axes  # a matplotlib Figure with one heatmap per head


def test_attention_accepts_tensors_and_checks_shapes():
    torch = pytest.importorskip("torch")
    a = attention.attention_plot(TOKENS, torch.tensor(_pattern(), dtype=torch.float32), ["a", "b"])
    assert a.pattern.shape == (2, 5, 5)
    with pytest.raises(ValueError):
        attention.attention_plot(TOKENS[:4], _pattern(), ["a", "b"])
    with pytest.raises(ValueError):
        attention.attention_plot(TOKENS, _pattern(), ["a"])
