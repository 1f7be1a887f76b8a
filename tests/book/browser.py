"""A small headless-Chromium driver for the book's rendering tests (Chrome DevTools Protocol).

Opens built pages from disk at a given window width, with the network off, waits for MathJax and
the pages' own scripts, and reports what a reader would see go wrong:

* ``overflow`` - tables and equations wider than the article column, or cut off by a
  scrolling/clipping box (the columns on the right are then hidden), and the page itself wider
  than the window;
* ``crowded`` - adjacent table cells whose texts run together (less than a few pixels apart);
* ``scales`` - each output figure's shown size over its own size (below about 0.6 its labels
  become too small to read);
* ``raw_math`` - LaTeX left as text in the browser title or the sidebar (``\\(\\alpha\\)``);
* ``errors`` - uncaught exceptions, ``console.error`` calls and failed loads.

Used by tests/test_book.py; ``python tests/browser.py _build/html/notebooks/05_benchmark.html``
prints the report of one page. Needs ``chromium`` and the ``websocket-client`` package.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--disable-extensions",
    "--mute-audio",
    # no network: every host resolves to nothing, every request goes to a closed port
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=127.0.0.1:9",
]

# Runs in the page once it has settled; returns the problems a reader would see.
CHECK_JS = r"""
(() => {
  const art = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
  const limit = art.getBoundingClientRect().right + 1;
  const text = el => (el.innerText || el.textContent || '').trim().replace(/\s+/g, ' ').slice(0, 70);
  const overflow = [], crowded = [], small = [];
  const seen = new Set();
  const boxes = art.querySelectorAll('table, mjx-container[display="true"], div.math, div.amsmath');
  for (const el of boxes) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.height === 0) continue;                // hidden (a closed toggle)
    const what = (el.tagName === 'TABLE' ? 'table' : 'equation') + ' "' + text(el) + '"';
    if (seen.has(what)) continue;
    if (r.right > limit) { overflow.push(`${what} sticks out of the column by ${Math.round(r.right - limit)} px`); seen.add(what); continue; }
    for (let a = el; a && a !== art; a = a.parentElement) {
      const ox = getComputedStyle(a).overflowX;
      if (ox !== 'visible' && a.scrollWidth > a.clientWidth + 1) {
        overflow.push(`${what} is cut off: ${a.scrollWidth - a.clientWidth} px hidden in a scrolling <${a.tagName.toLowerCase()}>`);
        seen.add(what); break;
      }
    }
  }
  for (const row of art.querySelectorAll('table tr')) {
    const cells = [...row.children].filter(c => c.getBoundingClientRect().width > 0);
    for (let i = 0; i + 1 < cells.length; i++) {
      const rect = c => { const g = document.createRange(); g.selectNodeContents(c); return g.getBoundingClientRect(); };
      const a = rect(cells[i]), b = rect(cells[i + 1]);
      if (a.width === 0 || b.width === 0 || text(cells[i]) === '' || text(cells[i + 1]) === '') continue;
      const gap = b.left - a.right;
      if (gap < 6) { crowded.push(`"${text(cells[i])}" and "${text(cells[i + 1])}" are ${gap.toFixed(1)} px apart`); break; }
    }
    if (crowded.length > 20) break;
  }
  for (const img of art.querySelectorAll('.cell_output img, figure img, img.align-center')) {
    const r = img.getBoundingClientRect();
    if (r.width === 0 || !img.naturalWidth) continue;
    small.push([img.getAttribute('alt') || img.src.split('/').pop().slice(0, 40), r.width / img.naturalWidth]);
  }
  const page = document.documentElement.scrollWidth > window.innerWidth + 1 ?
    [`the page is ${document.documentElement.scrollWidth - window.innerWidth} px wider than the window`] : [];
  const sidebar = document.querySelector('.bd-sidebar-primary');
  const rawMath = [document.title, sidebar ? sidebar.innerText : ''].filter(t => /\\\(|\$[^$\s][^$]*\$/.test(t))
    .map(t => t.slice(0, 80));
  return JSON.stringify({overflow: page.concat(overflow), crowded, scales: small, raw_math: rawMath,
                         title: document.title});
})()
"""

SETTLE_JS = r"""
(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  for (let i = 0; i < 100 && !(window.MathJax && MathJax.startup && MathJax.startup.promise); i++) await sleep(50);
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  await sleep(800);   // attention figures poll for their library every 50 ms
  return true;
})()
"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium, driven over its DevTools websocket."""

    def __init__(self, width: int = 1280, height: int = 1000, network_off: bool = True):
        import websocket  # websocket-client (a dependency of jupyter_server)

        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="circuitlib-chromium-")
        self.proc = subprocess.Popen(
            [
                chromium(),
                *(FLAGS if network_off else [f for f in FLAGS if not f.startswith(("--host-", "--proxy"))]),
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        url, deadline = None, time.time() + 60
        while url is None and time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            if "DevTools listening on " in line:
                url = line.split("DevTools listening on ", 1)[1].strip()
        if url is None:
            self.close()
            raise RuntimeError("Chromium did not open its DevTools port")
        self.ws = websocket.create_connection(url, timeout=120, suppress_origin=True)
        self._id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        if any(e.get("method") == method and e.get("sessionId") == session for e in self.events):
            return
        self.ws.settimeout(timeout)
        while time.time() < deadline:
            event = json.loads(self.ws.recv())
            self.events.append(event)
            if event.get("method") == method and event.get("sessionId") == session:
                return
        raise TimeoutError(f"no {method} within {timeout} s")

    def check(self, page: Path, screenshot: Path | None = None) -> dict:
        """Open `page` from disk and return {"overflow", "crowded", "scales", "errors", "title"}."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.events = []
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable", session=session)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        self.send("Page.navigate", {"url": Path(page).resolve().as_uri()}, session=session)
        self.wait_for("Page.loadEventFired", session)
        self.send("Runtime.evaluate", {"expression": SETTLE_JS, "awaitPromise": True}, session=session)
        value = self.send("Runtime.evaluate", {"expression": CHECK_JS, "returnByValue": True}, session=session)[
            "result"
        ]["value"]
        report = json.loads(value)
        if screenshot is not None:
            import base64

            metrics = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
            shot = self.send(
                "Page.captureScreenshot",
                {
                    "format": "png",
                    "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": self.width, "height": min(metrics["height"], 16000), "scale": 1},
                },
                session=session,
            )
            Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
        report["errors"] = self._errors(session)
        self.send("Target.closeTarget", {"targetId": target})
        return report

    def _errors(self, session: str) -> list[str]:
        errors = []
        for event in self.events:
            if event.get("sessionId") != session:
                continue
            params = event.get("params", {})
            if event.get("method") == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                errors.append((details.get("exception") or {}).get("description") or details.get("text"))
            elif event.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(
                    "console.error: "
                    + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                )
            elif event.get("method") == "Log.entryAdded" and params["entry"].get("level") == "error":
                entry = params["entry"]
                errors.append(f"{entry.get('text')} {entry.get('url', '')}".strip())
        return errors

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    with Browser() as browser:
        for arg in sys.argv[1:]:
            shot = Path("/tmp") / (Path(arg).stem + ".png")
            print(arg, json.dumps(browser.check(Path(arg), screenshot=shot), indent=1))
