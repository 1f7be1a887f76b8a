"""Attention patterns in the book's pages: CircuitsVis views that work offline and are deterministic.

:func:`attention_plot` draws an interactive CircuitsVis ``attention_heads`` view with a static PNG
copy; :func:`load_circuitsvis` (the last line of a chapter's set-up cell) sends the JavaScript
bundle to a live notebook once; :func:`write_circuitsvis_bundle` writes it into the book's
``_static`` folder.

How ``attention_plot`` is made offline and deterministic
--------------------------------------------------------
``circuitsvis.attention.attention_heads`` returns HTML that (1) decides between a CDN script
(unpkg) and an inline copy of its JavaScript by probing http://google.com at display time,
(2) inlines the whole ~1.3 MB bundle in *every* figure, and (3) gives each figure a random
``uuid4`` element id, so re-running a notebook changes its outputs. This module builds the
HTML itself from the same bundled ``circuitsvis/dist/cdn/iife.js`` and calls the same
``CircuitsVis.render(id, CircuitsVis.AttentionHeads, props)`` entry point, but:

* it never touches the network and never references a CDN: the bundle is read from the
  installed circuitsvis package and inlined;
* the bundle is **not stored in the notebook**. :func:`load_circuitsvis` (the last line of a
  notebook's set-up cell) sends it inline to a live notebook, so that every later figure of the
  kernel finds the global ``CircuitsVis``, and then replaces that output by a one-line
  reference to ``../_static/circuitsvis-<version>.js``: what the saved notebook keeps (a few
  hundred bytes instead of 1.3 MB). The book writes that file once into its ``_static`` folder
  (book/_ext/circuitlib_book.py calls :func:`write_circuitsvis_bundle`), so a page of the book
  opened from disk (``file://``) with the network off has everything it needs. A saved notebook
  reopened without re-running shows the static copies below until its set-up cell is run;
* element ids are ``circuitlib-attn-<sha256 of the figure's data>``, so the same data gives
  the same bytes on every run (two identical figures on one page are told apart at view
  time, in the browser, without changing the stored output);
* the data is rounded to 4 decimals (smaller pages, no float noise in diffs);
* every figure also carries a static matplotlib rendering, as an ``image/png`` output (what
  PDF/LaTeX builds and plain-text viewers use) and inside the HTML as the content shown
  until the script replaces it (what a viewer that strips scripts, such as an untrusted
  notebook or GitHub's notebook preview, shows).

Token labels are shown as text: byte-level BPE markers (``Ġ`` for a space, ``Ċ`` for a newline)
and SentencePiece's ``▁`` are turned back into the characters they stand for
(:func:`clean_token`), so a plot reads `` Karen``, not ``ĠKaren``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "attention_plot",
    "AttentionPlot",
    "load_circuitsvis",
    "reset_page",
    "write_circuitsvis_bundle",
    "bundle_filename",
    "clean_token",
]


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().to("cpu").float().numpy()
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------------------
# attention patterns (CircuitsVis, offline and deterministic)

_BUNDLE_MARK = "data-circuitlib-bundle"
_page = {"bundle_sent": False}  # per Python process, i.e. per notebook kernel


@lru_cache(maxsize=1)
def _circuitsvis_js() -> tuple[str, str]:
    """(version, JS) of the bundle shipped inside the installed circuitsvis package."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    js = path.read_text(encoding="utf-8")
    # No source-map reference (the .map is not shipped with the page) and nothing that
    # could close the <script> element early: "<\/script" is the same string in JS.
    js = "\n".join(l for l in js.splitlines() if not l.startswith("//# sourceMappingURL="))
    js = js.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")
    return getattr(circuitsvis, "__version__", "unknown"), js


def _bundle_html() -> str:
    version, js = _circuitsvis_js()
    return f'<script {_BUNDLE_MARK}="circuitsvis-{version}">\n{js}\n</script>\n'


def bundle_filename() -> str:
    """Name of the static copy of the bundle, e.g. ``circuitsvis-1.43.3.js``."""
    return f"circuitsvis-{_circuitsvis_js()[0]}.js"


def write_circuitsvis_bundle(folder) -> Path:
    """Write the CircuitsVis bundle (from the installed package) into `folder`; return its path.

    The book's Sphinx extension writes it into the site's ``_static`` folder, where the
    notebooks' set-up cells reference it (see :func:`load_circuitsvis`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / bundle_filename()
    js = _circuitsvis_js()[1]
    if not path.exists() or path.read_text(encoding="utf-8") != js:
        path.write_text(js, encoding="utf-8")
    return path


def _bundle_reference_html() -> str:
    """The saved form of the bundle: a reference to the book's static copy (a few hundred bytes)."""
    version, _ = _circuitsvis_js()
    return (
        f'<script {_BUNDLE_MARK}="circuitsvis-{html.escape(version)}" '
        f'src="../_static/{bundle_filename()}"></script>\n'
        f'<p style="font-size:small;color:#666">CircuitsVis {html.escape(version)} (offline copy: '
        f"the book's <code>_static/{bundle_filename()}</code>; in a live notebook, sent by this cell).</p>"
    )


def _in_colab() -> bool:
    # Colab shows every output in its own iframe: a bundle from another cell is not visible.
    return "google.colab" in sys.modules


def reset_page() -> None:
    """Forget that the bundle was sent: the next attention figure carries it again.

    Use it after reloading the browser tab of a live notebook (the page lost the bundle
    while the kernel did not), or between independent pages in a script.
    """
    _page["bundle_sent"] = False


class _BundleOnly:
    """Display object that puts the CircuitsVis bundle on the page (see load_circuitsvis)."""

    def _repr_mimebundle_(self, include=None, exclude=None):
        # the saved form (what a notebook file keeps); _ipython_display_ sends the bundle first
        _page["bundle_sent"] = True
        version, _ = _circuitsvis_js()
        return {"text/html": _bundle_reference_html(), "text/plain": f"CircuitsVis {version} JavaScript (offline copy)"}

    def _ipython_display_(self):
        from IPython.display import display

        version, _ = _circuitsvis_js()
        if _in_colab():  # every output is its own iframe: nothing to share, nothing to reference
            _page["bundle_sent"] = False
            return
        # 1. the whole bundle, inline: a live notebook runs it and keeps the global CircuitsVis;
        # 2. at once replaced by the reference, which is all that the saved notebook keeps.
        handle = display(
            {"text/html": _bundle_html(), "text/plain": f"CircuitsVis {version}"}, raw=True, display_id=True
        )
        handle.update(self._repr_mimebundle_(), raw=True)


def load_circuitsvis() -> _BundleOnly:
    """Put the CircuitsVis JavaScript on the page, in a cell of its own, without storing it.

    Make it the last line of a notebook's set-up cell. In a live notebook the cell sends the
    1.3 MB bundle, which the browser runs, and immediately replaces that output by a reference
    to the book's static copy (``../_static/circuitsvis-<version>.js``), so the saved notebook
    stays small; the book writes that file (:func:`write_circuitsvis_bundle`). Later figures of
    the kernel carry only their data. Without this cell, the first figure of the kernel does
    the same before it shows.
    """
    return _BundleOnly()


def _json_for_script(obj: Any) -> str:
    """JSON that is safe inside an inline <script> (no '</script>', no '<!--')."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte (the inverse of ``bytes_to_unicode``)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def clean_token(token: str) -> str:
    """A token as a reader writes it: ``"ĠKaren"`` -> ``" Karen"``, ``"Ċ"`` -> ``"\\n"`` (shown).

    Byte-level BPE tokens (GPT-2, SmolLM2: they contain characters U+0100..U+0143 for spaces,
    newlines and other bytes) are decoded to their bytes and then to text; SentencePiece's
    ``▁`` becomes a space. Strings without those markers (already decoded tokens) are left as
    they are, so cleaning twice changes nothing.
    """
    token = str(token)
    if any("\u0100" <= c <= "\u0143" for c in token):
        decoder = _byte_decoder()
        if all(c in decoder for c in token):
            token = bytes(decoder[c] for c in token).decode("utf-8", errors="replace")
    return token.replace("\u2581", " ")


def _label(token: str) -> str:
    """A token as a tick label: newlines and tabs made visible (drawn with parse_math=False)."""
    return token.replace("\n", "\\n").replace("\t", "\\t") or "''"


class AttentionPlot:
    """Attention patterns of several heads on one prompt (see :func:`attention_plot`).

    Displays in Jupyter through ``_repr_mimebundle_``: ``text/html`` (the interactive
    CircuitsVis view, with the static image inside as its no-script fallback), ``image/png``
    (the static image) and ``text/plain``. With ``static=True`` only the image is shown.
    ``html()`` and ``png()`` give the parts; ``figure()`` the matplotlib Figure.
    """

    def __init__(
        self,
        tokens,
        pattern,
        head_names,
        *,
        static=False,
        max_value=None,
        mask_upper_tri=True,
        include_bundle=None,
        dpi=72,
    ):
        pattern = _to_numpy(pattern)
        if pattern.ndim == 2:
            pattern = pattern[None]
        tokens = [clean_token(t) for t in tokens]
        head_names = [str(h) for h in head_names]
        if pattern.ndim != 3 or pattern.shape[1] != pattern.shape[2]:
            raise ValueError(f"pattern must be [n_heads, seq, seq], got {tuple(pattern.shape)}")
        if pattern.shape[0] != len(head_names):
            raise ValueError(f"{pattern.shape[0]} patterns but {len(head_names)} head names")
        if pattern.shape[1] != len(tokens):
            raise ValueError(f"patterns over {pattern.shape[1]} positions but {len(tokens)} tokens")
        self.tokens = tokens
        self.pattern = np.round(pattern, 4)
        self.head_names = head_names
        self.static = static
        self.max_value = max_value
        self.mask_upper_tri = mask_upper_tri
        self.include_bundle = include_bundle
        self.dpi = dpi

    # -- the data, and an id derived from it
    def props(self) -> dict:
        props = {
            "attention": self.pattern.tolist(),
            "tokens": self.tokens,
            "attentionHeadNames": self.head_names,
            "maskUpperTri": bool(self.mask_upper_tri),
        }
        if self.max_value is not None:
            props["maxValue"] = float(self.max_value)
        return props

    @property
    def element_id(self) -> str:
        digest = hashlib.sha256(_json_for_script(self.props()).encode("utf-8")).hexdigest()
        return "circuitlib-attn-" + digest[:16]

    # -- static rendering
    def figure(self):
        """The heads' patterns as heatmaps with token labels (a matplotlib Figure, no pyplot)."""
        from matplotlib.figure import Figure

        n, seq = self.pattern.shape[0], self.pattern.shape[1]
        cols = min(n, 4)
        rows = -(-n // cols)
        side = max(2.4, 0.22 * seq + 1.2)
        fig = Figure(figsize=(side * cols, side * rows + 0.3), layout="constrained")
        vmax = self.max_value if self.max_value is not None else 1.0
        labels = [_label(t) for t in self.tokens]
        mask = np.triu(np.ones((seq, seq), bool), 1) if self.mask_upper_tri else None
        for i in range(n):
            ax = fig.add_subplot(rows, cols, i + 1)
            data = np.ma.masked_array(self.pattern[i], mask=mask)
            image = ax.imshow(data, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_title(self.head_names[i], fontsize=9)
            ax.set_xticks(range(seq))
            ax.set_xticklabels(labels, rotation=90, fontsize=7, parse_math=False)
            ax.set_yticks(range(seq))
            ax.set_yticklabels(labels, fontsize=7, parse_math=False)
            if i % cols == 0:
                ax.set_ylabel("destination", fontsize=8)
            if i // cols == rows - 1:
                ax.set_xlabel("source", fontsize=8)
        fig.colorbar(image, ax=fig.axes, shrink=0.6, label="attention")
        return fig

    def png(self) -> bytes:
        """The static figure as PNG bytes (deterministic: no timestamp, no version text)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        fig = self.figure()
        FigureCanvasAgg(fig)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=self.dpi, metadata={"Software": None})
        return buffer.getvalue()

    # -- interactive rendering
    def html(self, include_bundle: bool = False, png: bytes | None = None) -> str:
        """The figure's HTML; ``include_bundle`` puts the CircuitsVis JS in front of it."""
        element_id = self.element_id
        if png is None:
            png = self.png()
        img = base64.b64encode(png).decode("ascii")
        alt = html.escape("attention patterns of heads " + ", ".join(self.head_names))
        fallback = (
            f'<img alt="{alt}" src="data:image/png;base64,{img}" style="max-width:100%">'
            '<p style="font-size:small;color:#666">Static copy: the interactive view needs '
            "JavaScript (in Jupyter, trust the notebook).</p>"
        )
        script = f"""<script data-circuitlib-figure="{element_id}">
(function () {{
  var id = "{element_id}";
  var props = {_json_for_script(self.props())};
  var el = (document.currentScript && document.currentScript.previousElementSibling) ||
           document.getElementById(id);
  if (!el) {{ return; }}
  if (document.querySelectorAll("#" + id).length > 1) {{
    window.__circuitlibFigures = (window.__circuitlibFigures || 0) + 1;
    el.id = id + "-" + window.__circuitlibFigures;
  }}
  var tries = 0;
  (function draw() {{
    if (window.CircuitsVis) {{
      el.innerHTML = "";
      window.CircuitsVis.render(el.id, window.CircuitsVis.AttentionHeads, props);
    }} else if (tries++ < 100) {{
      setTimeout(draw, 50);
    }}
  }})();
}})();
</script>"""
        figure = (
            f'<div id="{element_id}" class="circuitlib-attention" style="margin: 15px 0;">{fallback}</div>\n{script}\n'
        )
        return (_bundle_html() if include_bundle else "") + figure

    def _wants_bundle(self) -> bool:
        if self.include_bundle is not None:
            return bool(self.include_bundle)
        return _in_colab() or not _page["bundle_sent"]

    def _ipython_display_(self):
        from IPython.display import display

        if not self.static and self.include_bundle is None and self._wants_bundle() and not _in_colab():
            display(load_circuitsvis())  # sent to the page, not stored (see load_circuitsvis)
        display(self._repr_mimebundle_(), raw=True)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        png = self.png()
        bundle = {
            "image/png": base64.b64encode(png).decode("ascii"),
            "text/plain": repr(self),
        }
        if not self.static:
            with_js = self._wants_bundle()
            bundle["text/html"] = self.html(include_bundle=with_js, png=png)
            if with_js:
                _page["bundle_sent"] = True
        if include:
            bundle = {k: v for k, v in bundle.items() if k in include}
        if exclude:
            bundle = {k: v for k, v in bundle.items() if k not in exclude}
        return bundle

    def __repr__(self) -> str:
        return f"AttentionPlot(heads={self.head_names}, seq={len(self.tokens)}, static={self.static})"


def attention_plot(
    tokens: list[str],
    pattern,
    head_names: list[str],
    *,
    static: bool = False,
    max_value: float | None = None,
    mask_upper_tri: bool = True,
    include_bundle: bool | None = None,
) -> AttentionPlot:
    """Interactive attention patterns of several heads (CircuitsVis ``attention_heads``).

    Args:
        tokens: the prompt's tokens as strings, one per position (``seq`` of them).
        pattern: ``[n_heads, seq, seq]`` attention probabilities (destination x source), a
            torch Tensor or a numpy array; a single ``[seq, seq]`` pattern is one head.
        head_names: one label per head, e.g. ``["9.6", "9.9"]``.
        static: show only the matplotlib heatmaps (``image/png``), no JavaScript.
        max_value: the value shown darkest (default: 1 in the static copy, the data's
            maximum in CircuitsVis).
        mask_upper_tri: hide the (causally impossible) future positions.
        include_bundle: ``None`` (default): the first figure shown in this kernel sends the
            CircuitsVis JavaScript to the page first (as :func:`load_circuitsvis` does, not
            stored in the notebook); ``True`` inlines it in this figure's HTML, ``False`` never.

    Returns an :class:`AttentionPlot`; make it a cell's value (or ``display`` it) to show
    it. It never reaches the network, and re-running a notebook from the top reproduces
    its outputs byte for byte (see this module's docstring for how and why).
    """
    return AttentionPlot(
        tokens,
        pattern,
        head_names,
        static=static,
        max_value=max_value,
        mask_upper_tri=mask_upper_tri,
        include_bundle=include_bundle,
    )
