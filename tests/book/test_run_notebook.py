"""scripts/run_notebook.py on a tiny throw-away notebook (not the book's notebooks)."""

import json
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rn(load_script):
    return load_script("run_notebook")


@pytest.fixture
def nbdir(tmp_path):
    """notebooks/ with 01_tiny (parameters alpha, fail) and 02_tinier/03_other for name tests."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    meta = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    }
    nb = nbformat.v4.new_notebook(metadata=meta)
    nb.cells = [
        nbformat.v4.new_code_cell("alpha = 0.01\nfail = False", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print(f'alpha is {alpha}')\nassert not fail, 'asked to fail'"),
    ]
    nbformat.write(nb, folder / "01_tiny.ipynb")
    nbformat.write(nbformat.v4.new_notebook(metadata=meta), folder / "02_tinier.ipynb")
    nbformat.write(nbformat.v4.new_notebook(metadata=meta), folder / "03_greater_than.ipynb")
    return folder


def _run(rn, nbdir, *args):
    out = nbdir.parent / "runs"
    code = rn.main([*args, "--notebooks-dir", str(nbdir), "--out-root", str(out), "--no-progress-bar"])
    return code, out


def _outputs(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_each_run_gets_a_new_complete_folder(rn, nbdir):
    code, out = _run(rn, nbdir, "tiny", "--alpha", "0.02")
    assert code == 0
    code, out = _run(rn, nbdir, "01", "-p", "alpha", "0.5")
    assert code == 0
    runs = sorted(p for p in out.iterdir())
    assert len(runs) == 2, runs  # and no leftover temporary folder
    names = {p.name for p in runs}
    assert any(n.startswith("01_tiny-") and n.endswith("-alpha0.02") for n in names)
    for run in runs:
        assert (run / "01_tiny.ipynb").is_file()
        record = json.loads((run / "parameters.json").read_text())
        assert record["status"] == "ok"
        assert f"alpha is {record['parameters']['alpha']}" in _outputs(run / "01_tiny.ipynb")
        assert record["defaults"] == {"alpha": "0.01", "fail": "False"}


def test_existing_folder_is_never_overwritten(rn, nbdir, monkeypatch):
    monkeypatch.setattr(rn, "run_name", lambda stem, params, now: f"{stem}-fixed")
    assert _run(rn, nbdir, "tiny", "--alpha", "0.1")[0] == 0
    first = nbdir.parent / "runs" / "01_tiny-fixed"
    before = (first / "01_tiny.ipynb").read_bytes()
    assert _run(rn, nbdir, "tiny", "--alpha", "0.2")[0] == 0
    assert (first / "01_tiny.ipynb").read_bytes() == before
    second = nbdir.parent / "runs" / "01_tiny-fixed-2"
    assert "alpha is 0.2" in _outputs(second / "01_tiny.ipynb")


def test_unknown_parameter_is_rejected_before_running(rn, nbdir, capsys):
    code, out = _run(rn, nbdir, "tiny", "-p", "beta", "1")
    assert code == 2
    err = capsys.readouterr().err
    assert "'beta'" in err and "alpha" in err and "fail" in err
    assert not out.exists()
    code, _ = _run(rn, nbdir, "tinier", "--alpha", "0.1")  # no parameters cell at all
    assert code == 2 and "no cell tagged 'parameters'" in capsys.readouterr().err


def test_bad_or_ambiguous_name_lists_the_notebooks(rn, nbdir, capsys):
    assert _run(rn, nbdir, "nope")[0] == 2
    err = capsys.readouterr().err
    assert "no notebook matches 'nope'" in err and "01_tiny.ipynb" in err and "greater_than" in err
    assert _run(rn, nbdir, "tin")[0] == 2  # prefix of both tiny and tinier
    assert "ambiguous" in capsys.readouterr().err
    assert rn.resolve_notebook("greater-than", nbdir).name == "03_greater_than.ipynb"
    assert rn.resolve_notebook("3", nbdir).name == "03_greater_than.ipynb"
    assert rn.resolve_notebook("tiny", nbdir).name == "01_tiny.ipynb"  # exact beats prefix


def test_failing_notebook_leaves_a_failed_folder(rn, nbdir, capsys):
    code, out = _run(rn, nbdir, "tiny", "-p", "fail", "True")
    assert code == 1
    (run,) = list(out.iterdir())
    assert run.name.endswith("-FAILED")
    record = json.loads((run / "parameters.json").read_text())
    assert record["status"] == "failed" and "asked to fail" in record["error"]
    assert "asked to fail" in capsys.readouterr().err


def test_parse_value(rn):
    assert rn.parse_value("0.02") == 0.02 and rn.parse_value("3") == 3
    assert rn.parse_value("True") is True and rn.parse_value("false") is False
    assert rn.parse_value("None") is None and rn.parse_value("[1, 2]") == [1, 2]
    assert rn.parse_value("mean") == "mean"


def test_the_book_notebooks_resolve(rn):
    assert rn.resolve_notebook("background").name == "00_background.ipynb"
    assert rn.resolve_notebook("06").name == "06_roc.ipynb"
    assert rn.resolve_notebook("6").name == "06_roc.ipynb"
    assert rn.resolve_notebook("06b").name == "06b_edges_vs_nodes.ipynb"
    assert rn.resolve_notebook("edges").name == "06b_edges_vs_nodes.ipynb"


def test_ci_configuration_is_injected(tmp_path):
    """`make test` runs the notebooks with notebooks/ci.yml's small parameters."""
    import subprocess
    import sys

    out = tmp_path / "nbval"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "prepare_notebooks.py"),
            "--out",
            str(out),
            "--config",
            str(REPO / "notebooks" / "ci.yml"),
        ],
        check=True,
        capture_output=True,
    )
    assert sorted(p.name for p in out.glob("*.ipynb")) == sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))

    def injected(stem):
        nb = nbformat.read(out / f"{stem}.ipynb", as_version=4)
        cells = [c.source for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(cells) == 1, stem
        return cells[0]

    assert "n = 8" in injected("02_ioi")  # from "all"
    assert 'spec = "../studies/ci.yml"' in injected("04_hyperparameters")  # the notebook's own entry
    assert "n = 8" not in injected("04_hyperparameters")  # it declares no n


def test_ci_configuration_errors_write_nothing(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "ci.yml"
    bad.write_text("04_hyperparameters: {n_alpha: 3}\n")
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "prepare_notebooks.py"),
            "--out",
            str(tmp_path / "nbval"),
            "--config",
            str(bad),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "has no parameter n_alpha" in done.stderr
    assert not (tmp_path / "nbval").exists()


def test_tidy_keeps_the_final_state_of_progress_bars(load_script):
    tidy_outputs = load_script("tidy_outputs")
    stream = nbformat.v4.new_output
    cell = nbformat.v4.new_code_cell("work()")
    cell.outputs = [
        stream("stream", name="stderr", text="\rbar   0%"),
        stream("stream", name="stderr", text="\rbar  50%"),
        stream("stream", name="stderr", text="\rbar 100%\r"),
        stream("stream", name="stderr", text="\n"),
        stream("stream", name="stdout", text="kept 4 heads\nsaved\n"),
        stream("display_data", data={"text/plain": "table"}),
        stream("stream", name="stdout", text="after\n"),
    ]
    nb = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_markdown_cell("text")])
    outputs = tidy_outputs.tidy(nb).cells[0].outputs
    assert [(o.output_type, o.get("name"), o.get("text")) for o in outputs] == [
        ("stream", "stderr", "bar 100%\n"),
        ("stream", "stdout", "kept 4 heads\nsaved\n"),
        ("display_data", None, None),
        ("stream", "stdout", "after\n"),
    ]


def test_tidy_stores_opaque_figures_with_a_palette(load_script):
    """An opaque figure comes back smaller and looks the same; one with transparency is left as it is."""
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    tidy_outputs = load_script("tidy_outputs")

    def figure_png(transparent: bool) -> str:
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot(np.linspace(0, 1, 50), np.linspace(0, 1, 50) ** 2)
        ax.fill_between([0, 1], [0, 0.5], [0.2, 0.9], alpha=0.3)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", transparent=transparent)
        plt.close(fig)
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def pixels(encoded: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"), dtype=int)

    opaque, transparent = figure_png(False), figure_png(True)
    cell = nbformat.v4.new_code_cell("plot()")
    cell.outputs = [
        nbformat.v4.new_output("display_data", data={"image/png": opaque, "text/plain": "<Figure>"}),
        nbformat.v4.new_output("display_data", data={"image/png": transparent, "text/plain": "<Figure>"}),
    ]
    compacted, kept = (
        o.data["image/png"] for o in tidy_outputs.tidy(nbformat.v4.new_notebook(cells=[cell])).cells[0].outputs
    )
    assert len(compacted) < 0.7 * len(opaque)
    assert Image.open(io.BytesIO(base64.b64decode(compacted))).mode == "P"
    difference = np.abs(pixels(compacted) - pixels(opaque))
    assert difference.mean() < 1 and difference.max() <= 64  # a palette colour close to every pixel's
    assert kept == transparent
