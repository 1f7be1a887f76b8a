"""Attention figures in a live JupyterLab: drawn by CircuitsVis, and the saved notebook stays small.

`attention.load_circuitsvis()` sends the 1.3 MB bundle to the live page and at once replaces that
output by a reference to the book's static copy, which is all the saved notebook keeps. This
test runs a two-cell notebook in a real JupyterLab (headless, on a free local port) driven by
headless Chromium, and checks both halves. About a minute; skipped without Chromium,
JupyterLab or websocket-client.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from browser import Browser, chromium  # noqa: E402

LAB = Path(sys.executable).with_name("jupyter-lab")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(chromium() is None or not LAB.exists(), reason="needs Chromium and JupyterLab")
def test_live_notebook_draws_attention_with_circuitsvis(tmp_path):
    pytest.importorskip("websocket")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("from booklib import attention\nimport numpy as np\nattention.load_circuitsvis()"),
        nbformat.v4.new_code_cell(
            "p = np.tril(np.ones((3, 3))); p = p / p.sum(1, keepdims=True)\n"
            "attention.attention_plot(['ĠThe', 'ĠKaren', 'Ġwent'], p, ['9.6'])"
        ),
    ]
    nbformat.write(nb, tmp_path / "t.ipynb")
    port, token = _free_port(), "circuitlib-test"
    server = subprocess.Popen(
        [
            str(LAB),
            "--no-browser",
            "--allow-root",
            f"--port={port}",
            f"--ServerApp.token={token}",
            "--expose-app-in-browser",
            f"--ServerApp.root_dir={tmp_path}",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with Browser(network_off=False) as b:
            target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            s = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            b.send("Runtime.enable", session=s)
            b.send("Page.enable", session=s)

            def ev(js, wait=False):
                return b.send(
                    "Runtime.evaluate", {"expression": js, "returnByValue": True, "awaitPromise": wait}, session=s
                )["result"].get("value")

            url = f"http://127.0.0.1:{port}/lab/tree/t.ipynb?token={token}"
            for _ in range(60):  # the server needs a few seconds to start
                b.send("Page.navigate", {"url": url}, session=s)
                b.wait_for("Page.loadEventFired", s, timeout=120)
                if not ev("location.href").startswith("chrome-error"):
                    break
                time.sleep(2)
                b.events = []
            for _ in range(120):
                if ev("!!(window.jupyterapp && document.querySelector('.jp-Notebook .jp-Cell'))"):
                    break
                time.sleep(1)
            ev(
                """(async () => { const app = window.jupyterapp, w = app.shell.currentWidget;
                  await w.context.sessionContext.ready; await app.commands.execute('notebook:run-all-cells'); })()""",
                wait=True,
            )
            state = None
            for _ in range(180):
                state = ev("""(() => { const el = document.querySelector('.circuitlib-attention');
                    return el ? JSON.stringify({fallback: el.innerText.includes('Static copy'),
                                                text: el.innerText.slice(0, 200)}) : null })()""")
                if state and not json.loads(state)["fallback"]:
                    break
                time.sleep(1)
            assert state and not json.loads(state)["fallback"], f"the figure was not drawn by CircuitsVis: {state}"
            assert "Head Selector" in json.loads(state)["text"]
            ev("(async () => { await window.jupyterapp.shell.currentWidget.context.save(); })()", wait=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    saved = nbformat.read(tmp_path / "t.ipynb", as_version=4)
    text = json.dumps(saved)
    assert "var CircuitsVis" not in text, "the saved notebook carries the bundle"
    assert len(text) < 60_000
    assert "data-circuitlib-bundle" in "".join(saved.cells[0].outputs[0]["data"]["text/html"])
