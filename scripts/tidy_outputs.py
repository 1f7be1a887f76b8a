#!/usr/bin/env python
"""Tidy executed notebooks in place: progress bars reduced to what a terminal would show.

    python scripts/tidy_outputs.py notebooks/03_greater_than.ipynb [...]

A text progress bar (tqdm without ipywidgets) redraws its line with carriage returns, and papermill
records every redraw as an output of its own: hundreds of lines on a page of the book. Here the
consecutive stream outputs of a cell that go to the same stream are merged, and every line keeps
only the text after its last carriage return. Each notebook is rewritten atomically.
`scripts/run_notebook.py` applies the same to every run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat


def final_lines(text: str) -> str:
    """'a\\r b\\r c\\nd' -> ' c\\nd': each line as a terminal leaves it after its carriage returns."""
    return "\n".join(next((part for part in reversed(line.split("\r")) if part), "")
                     for line in text.split("\n"))


def tidy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Merge each cell's consecutive outputs to one stream, and collapse carriage returns (in place)."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for out in cell.outputs:
            if (out.output_type == "stream" and merged and merged[-1].output_type == "stream"
                    and merged[-1].name == out.name):
                merged[-1].text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream":
                out.text = final_lines(out.text)
        cell.outputs = merged
    return nb


def tidy_file(path: Path) -> None:
    nb = tidy(nbformat.read(path, as_version=4))
    tmp = path.with_name(f".{path.name}.tidy.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, path)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for name in sys.argv[1:]:
        tidy_file(Path(name))
