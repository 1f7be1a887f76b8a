"""`make lab` starts JupyterLab on the notebooks with the project's kernel.

The test runs the Makefile's own command headless on a free local port (with a random token),
waits until the server answers, checks that it serves JupyterLab, lists the chapters and offers
the "python3" kernel of this virtual environment, then stops the server (its process group only).
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, token: str):
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read().decode()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.skipif(not (VENV / ".installed").exists(), reason="needs the set-up .venv (make setup)")
def test_make_lab_serves_the_notebooks_with_the_project_kernel(tmp_path):
    port, token = _free_port(), secrets.token_hex(16)
    args = f"--no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port={port} --IdentityProvider.token={token}"
    if os.geteuid() == 0:  # containers and CI often run as root, which Jupyter refuses unless told
        args += " --allow-root"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}  # no leftovers in the user's folders
    # -o: take the installed .venv as it is (the test checks the lab command, not the set-up)
    server = subprocess.Popen(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "lab", f"LAB_ARGS={args}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, "make lab exited early:\n" + server.stdout.read().decode()[-3000:]
            try:
                status, page = _get(f"{base}/lab", token)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "JupyterLab did not answer within 180 s"
                time.sleep(1)
        assert status == 200 and "JupyterLab" in page
        _, contents = _get(f"{base}/api/contents", token)
        names = {item["name"] for item in json.loads(contents)["content"]}
        assert {p.name for p in (REPO / "notebooks").glob("*.ipynb")} <= names
        _, specs = _get(f"{base}/api/kernelspecs", token)
        python3 = json.loads(specs)["kernelspecs"]["python3"]["spec"]
        assert Path(python3["argv"][0]).parent.resolve() == (VENV / "bin").resolve(), python3["argv"]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the process group this test started: make and jupyter-lab
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        _get(f"{base}/lab", token)
