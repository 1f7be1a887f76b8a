"""Sphinx extension of the circuitlib book (loaded through _config.yml, `sphinx.local_extensions`).

* **No Thebe, no Binder.** Jupyter Book always loads sphinx-thebe; its configuration script was
  added twice to every page (``SyntaxError: Identifier 'THEBE_JS_URL' has already been
  declared``) and every page carried a Binder configuration, although the book has no launch
  buttons and works offline. This extension takes both out.
* **The CircuitsVis bundle, once.** The attention figures need CircuitsVis' JavaScript
  (1.3 MB). The notebooks do not carry it: their set-up cell references
  ``_static/circuitsvis-<version>.js`` (see ``booklib.attention.load_circuitsvis``), and this
  extension writes that file, from the installed circuitsvis package, into the site's
  ``_static`` folder. The pages still work opened from disk, with no network.
* **Author-year labels.** The text cites "García-Carrasco et al., 2025"
  (``bibtex_reference_style: author_year``); the bibliography's labels are made the same way
  (style ``authoryear``, registered here) instead of pybtex's alpha labels
  (``[GarciaCMateT24]``).
* **Readable tables.** ``circuitlib.css`` (book/_static) gives output tables padding and a
  smaller font, and header cells may break after an underscore (``val_<wbr>accuracy``), so that
  wide tables fit the text column at a 1280-pixel window (tests/book/test_book.py checks it).
"""

from __future__ import annotations

import re
from pathlib import Path

STATIC = Path(__file__).resolve().parent.parent / "_static"
_TH = re.compile(r"(<th\b[^>]*>)(.*?)(</th>)", re.S)


def _drop_thebe(app, config):
    """Disconnect sphinx-thebe's listeners (it is loaded by Jupyter Book whatever the config says)."""
    for name, listeners in app.events.listeners.items():
        app.events.listeners[name] = [l for l in listeners if getattr(l.handler, "__module__", "") != "sphinx_thebe"]


def _static_path(app):
    app.config.html_static_path.append(str(STATIC))
    app.add_css_file("circuitlib.css")


def _page(app, pagename, templatename, context, doctree):
    # whatever sphinx-thebe registered before its listeners were dropped
    context["script_files"] = [
        s
        for s in context.get("script_files", [])
        if "THEBE_JS_URL" not in str(getattr(s, "attributes", {}).get("body", "")) and "sphinx-thebe" not in str(s)
    ]
    context["css_files"] = [c for c in context.get("css_files", []) if "sphinx-thebe" not in str(c)]
    body = context.get("body")
    if body and "<th" in body:
        context["body"] = _TH.sub(
            lambda m: m.group(1) + re.sub(r"_(?=[^<>]*(?:<|$))", "_<wbr>", m.group(2)) + m.group(3), body
        )


def _write_bundle(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    from booklib.attention import write_circuitsvis_bundle

    write_circuitsvis_bundle(Path(app.outdir) / "_static")


def _register_authoryear_style():
    import latexcodec  # noqa: F401 - registers the "latex" codec (a dependency of pybtex)
    from pybtex.plugin import register_plugin
    from pybtex.style.formatting.unsrt import Style as Unsrt
    from pybtex.style.labels import BaseLabelStyle

    def last(person) -> str:
        name = " ".join(person.prelast_names + person.last_names)
        return name.encode("utf-8").decode("latex").replace("{", "").replace("}", "")

    class AuthorYearLabels(BaseLabelStyle):
        def format_labels(self, sorted_entries):
            for entry in sorted_entries:
                people = entry.persons.get("author") or entry.persons.get("editor") or []
                if not people:
                    names = entry.fields.get("title", entry.key)
                elif len(people) == 1:
                    names = last(people[0])
                elif len(people) == 2:
                    names = f"{last(people[0])} and {last(people[1])}"
                else:
                    names = f"{last(people[0])} et al."
                yield f"{names}, {entry.fields.get('year', 'n.d.')}"

    class AuthorYear(Unsrt):
        default_label_style = AuthorYearLabels
        default_sorting_style = "author_year_title"

    register_plugin("pybtex.style.formatting", "authoryear", AuthorYear, force=True)


def setup(app):
    _register_authoryear_style()
    app.connect("config-inited", _drop_thebe, priority=900)
    app.connect("builder-inited", _static_path)
    app.connect("html-page-context", _page, priority=900)
    app.connect("build-finished", _write_bundle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
