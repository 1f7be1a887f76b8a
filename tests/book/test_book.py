"""The book: notebooks are re-runnable, the site builds and works offline.

The HTML checks use the site in _build/html when it is newer than every source of the book
(`make book` was run since the last edit); otherwise they build the book into a temporary
folder first (a few seconds plus the size of the notebooks' outputs; the build never executes
a notebook). Set CIRCUITLIB_TEST_REBUILD=1 to always build.
"""

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
EXTERNAL = re.compile(r"^\s*(https?:)?//", re.I)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # no network: every host resolves to nothing, every request goes to a closed port
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=127.0.0.1:9",
    "--virtual-time-budget=10000",
]


# ------------------------------------------------------------------ (a) notebooks


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_has_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters', need 1"
    assert tagged[0].cell_type == "code"


# ------------------------------------------------------------------ (b) the built site


def _book_sources():
    yield from (REPO / "_config.yml", REPO / "_toc.yml")
    yield from (REPO / "book").rglob("*")
    yield from (REPO / "notebooks").glob("*.ipynb")


def _fresh(html_dir: Path) -> bool:
    stamp = html_dir / ".buildinfo"
    if os.environ.get("CIRCUITLIB_TEST_REBUILD") == "1" or not stamp.exists():
        return False
    built = stamp.stat().st_mtime
    return all(p.stat().st_mtime <= built for p in _book_sources() if p.is_file())


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    existing = REPO / "_build" / "html"
    if _fresh(existing):
        return existing
    out = tmp_path_factory.mktemp("book")
    jb = Path(sys.executable).with_name("jupyter-book")
    if not jb.exists():
        pytest.skip("jupyter-book is not installed next to this Python")
    done = subprocess.run(
        [str(jb), "build", str(REPO), "--path-output", str(out), "--warningiserror", "--keep-going"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, f"book build failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    return out / "_build" / "html"


class _Page(HTMLParser):
    """Collects what a page loads: scripts, style sheets, images, frames."""

    def __init__(self):
        super().__init__()
        self.loads = []  # (tag, url)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script" and a.get("src"):
            self.loads.append((tag, a["src"]))
        elif (
            tag == "link"
            and a.get("href")
            and set((a.get("rel") or "").split()) & {"stylesheet", "preload", "modulepreload", "icon", "manifest"}
        ):
            self.loads.append((tag, a["href"]))
        elif tag in ("img", "iframe", "embed", "source", "audio", "video") and a.get("src"):
            self.loads.append((tag, a["src"]))


def _pages(site):
    return sorted(p for p in site.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)


def test_site_loads_nothing_from_the_network(site):
    pages = _pages(site)
    assert (site / "book" / "intro.html").exists() and len(pages) >= 5
    problems = []
    for page in pages:
        parser = _Page()
        parser.feed(page.read_text(encoding="utf-8"))
        for tag, url in parser.loads:
            if EXTERNAL.match(url):
                problems.append(f"{page.relative_to(site)}: <{tag}> {url}")
            elif not url.startswith("data:"):
                target = (page.parent / url.split("?")[0].split("#")[0]).resolve()
                if not target.exists():
                    problems.append(f"{page.relative_to(site)}: <{tag}> {url} is missing")
    for css in site.glob("_static/**/*.css"):
        for url in re.findall(r"url\(\s*['\"]?((?:https?:)?//[^'\")]+)", css.read_text("utf-8")):
            problems.append(f"{css.relative_to(site)}: url({url})")
    assert not problems, "\n".join(problems)


def test_math_uses_the_local_mathjax(site):
    page = (site / "book" / "intro.html").read_text(encoding="utf-8")
    assert re.search(
        r'<script[^>]*src="\.\./_static/mathjax/tex-chtml\.js(\?v=[0-9a-f]+)?"', page
    )  # Sphinx may add ?v=<checksum>
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()


def test_attention_pages_carry_the_circuitsvis_bundle(site):
    """Each page with attention figures loads the bundle once, from the site's _static folder."""
    pages = [p for p in _pages(site) if 'class="circuitlib-attention"' in p.read_text("utf-8")]
    if not pages:
        pytest.skip("no page of the book shows an attention plot yet")
    for page in pages:
        text = page.read_text(encoding="utf-8")
        n = text.count("data-circuitlib-bundle=")
        assert n == 1, f"{page.name}: the CircuitsVis bundle is referenced {n} times (want 1)"
        assert text.index("data-circuitlib-bundle=") < text.index("data-circuitlib-figure=")
        src = re.search(r'<script data-circuitlib-bundle="[^"]*" src="([^"]+)"', text)
        assert src, f"{page.name}: the bundle is not a reference to a static file"
        assert (page.parent / src.group(1)).resolve().is_file(), f"{page.name}: {src.group(1)} is missing"
        assert "var CircuitsVis=" not in text, f"{page.name}: the bundle is inlined in the page"


def test_notebooks_are_small():
    """No notebook carries the 1.3 MB CircuitsVis bundle (the book ships it once, in _static)."""
    for path in NOTEBOOKS:
        text = path.read_text(encoding="utf-8")
        assert "var CircuitsVis=" not in text, f"{path.name} inlines the CircuitsVis bundle"
        assert path.stat().st_size < 600_000, f"{path.name} is {path.stat().st_size / 1e6:.1f} MB"


def test_no_thebe_or_binder(site):
    """The book has no launch buttons: no Thebe script (it was added twice: a SyntaxError) and no Binder config."""
    for page in _pages(site):
        text = page.read_text(encoding="utf-8")
        assert "THEBE_JS_URL" not in text and "binderOptions" not in text, f"{page.name} carries Thebe/Binder"


def test_bibliography_labels_read_like_the_citations(site):
    """A citation "García-Carrasco et al., 2025" points at an entry labelled the same way."""
    refs = (site / "book" / "references.html").read_text(encoding="utf-8")
    labels = set(re.findall(r'<span class="label"><span class="fn-bracket">\[</span>(.*?)<span', refs))
    assert labels, "no labelled bibliography entries"
    cited = set()
    for page in _pages(site):
        for text in re.findall(r'href="[^"]*references\.html#[^"]*"[^>]*>(.*?)</a>', page.read_text("utf-8")):
            cited.add(re.sub(r"<[^>]+>", "", text).replace("\xa0", " ").strip())
    cited = {c for c in cited if re.search(r"\d{4}$", c)}
    assert cited and cited <= labels, f"citations without a matching label: {sorted(cited - labels)}"


# ------------------------------------------------------------------ (c) in a real browser


def _chromium():
    """A headless-capable Chromium (Debian: apt-get install chromium), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _page_requests(netlog: Path) -> list[str]:
    """URLs that a page (not the browser's own services) asked the network for.

    Chromium's net log tags the requests of a page opened from disk with a file:// network
    isolation key; the browser's background requests (updates, sign-in) carry none.
    """
    import json

    text = netlog.read_text(encoding="utf-8", errors="replace")
    try:
        log = json.loads(text)
    except ValueError:  # a log cut short: close the event list
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log.get("events", []):
        params = event.get("params") or {}
        if (
            event.get("type") == start_job
            and "file://" in params.get("network_isolation_key", "")
            and re.match(r"(https?|wss?|ftp):", params.get("url", ""))
        ):
            urls.append(params["url"])
    return urls


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium installed")
def test_pages_render_offline_in_chromium(site, tmp_path):
    from PIL import Image

    def browse(page, *extra):
        netlog = tmp_path / f"{page.stem}-{len(extra)}.netlog.json"
        subprocess.run(
            [
                _chromium(),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp_path / 'profile'}",
                f"--log-net-log={netlog}",
                *extra,
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        requests = _page_requests(netlog)
        assert not requests, f"{page.name} asked the network for: {requests}"

    def dom(page):
        done = subprocess.run(
            [
                _chromium(),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp_path / 'profile'}",
                "--dump-dom",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return done.stdout

    intro = site / "book" / "intro.html"
    assert "<mjx-container" in dom(intro), "MathJax did not typeset the page offline"
    shot = tmp_path / "intro.png"
    browse(intro, f"--screenshot={shot}", "--window-size=1200,1400")
    image = Image.open(shot).convert("L")
    low, high = image.getextrema()
    assert high - low > 100, "the screenshot is blank"

    for page in _pages(site):
        if 'class="circuitlib-attention"' in page.read_text("utf-8"):
            assert "Static copy: the interactive view" not in dom(page), (
                f"{page.name}: an attention figure was not drawn by CircuitsVis"
            )
            browse(page, f"--screenshot={tmp_path / 'attention.png'}")
            break


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium installed")
def test_pages_fit_a_1280px_window_without_console_errors(site):
    """Every page of the book, opened from disk at 1280 x 1000 px with the network off:

    no table or equation wider than the text column or cut off by a scroll box, no table cells
    whose texts run together, no output figure shrunk below 60 % of its size (labels then become
    unreadable), no raw LaTeX in the browser title or the sidebar, and nothing in the console:
    no uncaught exception, no console.error, no failed load.
    """
    pytest.importorskip("websocket", reason="websocket-client drives Chromium (a jupyter_server dependency)")
    sys.path.insert(0, str(Path(__file__).parent))
    from browser import Browser

    problems = []
    with Browser(width=1280, height=1000) as browser:
        for page in _pages(site):
            if page.name in ("genindex.html", "search.html") or 'http-equiv="Refresh"' in page.read_text(
                "utf-8"
            ).replace("refresh", "Refresh"):
                continue  # index.html only redirects to the intro
            name = str(page.relative_to(site))
            report = browser.check(page)
            problems += [f"{name}: {p}" for p in report["overflow"]]
            problems += [f"{name}: cells run together: {p}" for p in report["crowded"][:3]]
            problems += [
                f"{name}: a figure is shown at {scale:.0%} of its size: {what}"
                for what, scale in report["scales"]
                if scale < 0.6
            ]
            problems += [f"{name}: raw LaTeX in the title or the sidebar: {t!r}" for t in report["raw_math"]]
            problems += [f"{name}: console: {e}" for e in report["errors"]]
    assert not problems, "\n".join(problems)
