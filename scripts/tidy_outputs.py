#!/usr/bin/env python
"""Tidy executed notebooks in place: progress bars reduced to what a terminal would show, figures
stored compactly.

    python scripts/tidy_outputs.py notebooks/03_greater_than.ipynb [...]

A text progress bar (tqdm without ipywidgets) redraws its line with carriage returns, and papermill
records every redraw as an output of its own: hundreds of lines on a page of the book. Here the
consecutive stream outputs of a cell that go to the same stream are merged, and every line keeps
only the text after its last carriage return. An opaque PNG figure (matplotlib's are) is stored
with a palette of 256 colours when that is smaller: a line plot uses far fewer, so it looks all but
the same at about a third of the bytes (a data chapter's nine figures otherwise make up most of its
notebook). Each notebook is rewritten atomically.
`scripts/run_notebook.py` applies the same to every run.
"""

from __future__ import annotations

import base64
import io
import os
import sys
from pathlib import Path

import nbformat
from PIL import Image


def final_lines(text: str) -> str:
    """'a\\r b\\r c\\nd' -> ' c\\nd': each line as a terminal leaves it after its carriage returns."""
    return "\n".join(next((part for part in reversed(line.split("\r")) if part), "") for line in text.split("\n"))


def compact_png(encoded: str) -> str:
    """A base64 PNG -> the same picture with a 256-colour palette, if it is opaque and that is smaller."""
    image = Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGBA")  # any mode, transparency kept
    if image.getextrema()[3][0] < 255:  # some transparency: leave it be
        return encoded
    buffer = io.BytesIO()
    image.convert("RGB").quantize(256).save(buffer, format="PNG", optimize=True)
    smaller = base64.b64encode(buffer.getvalue()).decode("ascii")
    return smaller if len(smaller) < len(encoded) else encoded


def tidy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Merge each cell's consecutive outputs to one stream, collapse carriage returns and store
    opaque PNG figures with a palette (in place)."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for out in cell.outputs:
            if (
                out.output_type == "stream"
                and merged
                and merged[-1].output_type == "stream"
                and merged[-1].name == out.name
            ):
                merged[-1].text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream":
                out.text = final_lines(out.text)
            elif "image/png" in out.get("data", {}):
                out.data["image/png"] = compact_png(out.data["image/png"])
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
