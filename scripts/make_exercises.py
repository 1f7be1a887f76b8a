#!/usr/bin/env python
"""Write the exercises' solution and student notebooks from their one source.

    python scripts/make_exercises.py                       # notebooks/08_exercises.ipynb, not executed
    python scripts/make_exercises.py --execute             # ... and execute it in place (papermill, minutes)
    python scripts/make_exercises.py --student FILE.ipynb  # the student notebook (stubs, no solutions)
    python scripts/make_exercises.py --check               # exit 1 if the chapter's cells differ from the source

The source, notebooks/src/08_exercises.py, describes its own format in its header. In the
solution notebook (the book's chapter) every cell holding a solution is folded behind a toggle
labelled "Solution" (in the book: the `hide-input` tag with myst-nb's prompts; in JupyterLab:
`source_hidden`); hints are folded `<details>` blocks in both notebooks. The student notebook
replaces each solution by its stub and leaves out the solution-only cells. --student never
overwrites a file; the chapter itself is always rewritten from the source.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "notebooks" / "src" / "08_exercises.py"
CHAPTER = ROOT / "notebooks" / "08_exercises.ipynb"

SOLUTION_METADATA = {
    "tags": ["hide-input"],
    "mystnb": {"code_prompt_show": "Solution", "code_prompt_hide": "Hide solution"},
    "jupyter": {"source_hidden": True},
}
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


@dataclasses.dataclass
class Cell:
    """One cell of the source: its type, lines, options ("solution-only"), tags and source line number."""

    kind: str
    lines: list[str]
    solution_only: bool
    tags: list[str]
    line: int


@dataclasses.dataclass
class Exercise:
    """An exercise's heading and rating, as the source gives them."""

    number: int
    title: str
    difficulty: int
    importance: int
    minutes: int
    writes: str


class SourceError(ValueError):
    """The source breaks its format: the message names the line."""


def parse(path: Path = SOURCE) -> list[Cell]:
    """The source's cells, in order (the header above the first marker is dropped)."""
    cells: list[Cell] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("# %%"):
            words = line[4:].split()
            kind = "markdown" if words[:1] == ["[markdown]"] else "code"
            options = words[1:] if kind == "markdown" else words
            unknown = [w for w in options if w != "solution-only" and not w.startswith("tag:")]
            if unknown:
                raise SourceError(
                    f"{path.name}:{number}: unknown cell option(s) {unknown}; use 'solution-only' or 'tag:NAME'"
                )
            cells.append(
                Cell(kind, [], "solution-only" in options, [w[4:] for w in options if w.startswith("tag:")], number)
            )
        elif cells:
            if cells[-1].kind == "markdown":
                if line and not (line == "#" or line.startswith("# ")):
                    raise SourceError(f"{path.name}:{number}: a markdown line must start with '# '")
                line = line[2:]
            cells[-1].lines.append(line)
    if not cells:
        raise SourceError(f"{path.name}: no cell markers ('# %%')")
    for cell in cells:
        while cell.lines and not cell.lines[-1].strip():
            cell.lines.pop()
        while cell.lines and not cell.lines[0].strip():
            cell.lines.pop(0)
    return cells


_RATING = re.compile(r"^EXERCISE (.*)$")
_TITLE = re.compile(r"^## Exercise (\d+): (.+)$")


def _rating(spec: str, where: str) -> dict:
    fields = dict(word.split("=", 1) for word in shlex.split(spec))
    if set(fields) != {"difficulty", "importance", "minutes", "writes"}:
        raise SourceError(f"{where}: an EXERCISE line needs difficulty=, importance=, minutes= and writes=")
    rating = {k: int(fields[k]) for k in ("difficulty", "importance", "minutes")}
    if not all(1 <= rating[k] <= 5 for k in ("difficulty", "importance")):
        raise SourceError(f"{where}: difficulty and importance go from 1 to 5")
    return {**rating, "writes": fields["writes"]}


def exercises(cells: list[Cell] | None = None) -> list[Exercise]:
    """Every exercise's number, title and rating, in order."""
    found = []
    for cell in cells if cells is not None else parse():
        if cell.kind != "markdown":
            continue
        title = next((m for m in map(_TITLE.match, cell.lines) if m), None)
        spec = next((m.group(1) for m in map(_RATING.match, cell.lines) if m), None)
        if title and spec:
            found.append(Exercise(int(title.group(1)), title.group(2), **_rating(spec, f"line {cell.line}")))
        elif title or spec:
            raise SourceError(
                f"line {cell.line}: an exercise needs both its '## Exercise N: title' and its EXERCISE line"
            )
    return found


def _dots(value: int) -> str:
    return "●" * value + "○" * (5 - value)


def _markdown(cell: Cell) -> str:
    out, hint, n_hints = [], None, 0
    for line in cell.lines:
        rating = _RATING.match(line)
        if rating:
            r = _rating(rating.group(1), f"line {cell.line}")
            out.append(
                f"> **Difficulty** {_dots(r['difficulty'])} {r['difficulty']}/5 · **Importance** "
                f"{_dots(r['importance'])} {r['importance']}/5 · **Time budget** about {r['minutes']} minutes"
            )
        elif line == "HINT":
            if hint is not None:
                raise SourceError(f"line {cell.line}: a HINT inside a HINT")
            hint, n_hints = [], n_hints + 1
        elif line == "END HINT":
            if hint is None:
                raise SourceError(f"line {cell.line}: END HINT without HINT")
            out += [f"<details><summary>Hint {n_hints}</summary>", "", *hint, "", "</details>"]
            hint = None
        elif hint is not None:
            hint.append(line)
        else:
            out.append(line)
    if hint is not None:
        raise SourceError(f"line {cell.line}: a HINT without END HINT")
    return "\n".join(out)


def _code(cell: Cell, student: bool) -> tuple[str, bool]:
    """The cell's code for one notebook, and whether it held a solution."""
    out, block, has_solution = [], None, False
    for line in cell.lines:
        marker = line.strip()
        if marker in ("# SOLUTION", "# EXERCISE"):
            if block is not None:
                raise SourceError(f"line {cell.line}: {marker} inside another block")
            block, has_solution = marker[2:], has_solution or marker == "# SOLUTION"
        elif marker in ("# END SOLUTION", "# END EXERCISE"):
            if block != marker[6:]:
                raise SourceError(f"line {cell.line}: {marker} closes no open {marker[6:]} block")
            block = None
        elif block == "SOLUTION":
            if not student:
                out.append(line)
        elif block == "EXERCISE":
            if student:
                indent = line[: len(line) - len(line.lstrip())]
                if not line.lstrip().startswith("# "):
                    raise SourceError(f"line {cell.line}: a stub line must be commented out in the source: {line!r}")
                out.append(indent + line.lstrip()[2:])
        else:
            out.append(line)
    if block is not None:
        raise SourceError(f"line {cell.line}: a {block} block is not closed")
    return "\n".join(out), has_solution


def build(student: bool, cells: list[Cell] | None = None) -> nbformat.NotebookNode:
    """The student (True) or the solution (False) notebook, without outputs."""
    cells = cells if cells is not None else parse()
    exercises(cells)  # checks every exercise's heading and rating
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    for cell in cells:
        if student and cell.solution_only:
            continue
        if cell.kind == "markdown":
            new = nbformat.v4.new_markdown_cell(_markdown(cell))
        else:
            code, has_solution = _code(cell, student)
            new = nbformat.v4.new_code_cell(code)
            if has_solution and not student:
                new.metadata.update(
                    {
                        k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                        for k, v in SOLUTION_METADATA.items()
                    }
                )
        if cell.tags:
            new.metadata["tags"] = sorted(set(new.metadata.get("tags", [])) | set(cell.tags))
        new.id = f"{'student' if student else 'solution'}-{len(nb.cells):02d}"
        nb.cells.append(new)
    return nb


def _essence(nb: nbformat.NotebookNode) -> list[tuple]:
    """What the source decides about each cell: type, source, tags and the solution toggle (not outputs)."""
    keep = []
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "injected-parameters" in tags:
            continue
        keep.append(
            (
                cell.cell_type,
                cell.source,
                tuple(sorted(tags)),
                cell.metadata.get("mystnb"),
                cell.metadata.get("jupyter"),
            )
        )
    return keep


def differences(chapter: Path = CHAPTER) -> list[str]:
    """How the chapter's cells differ from what the source makes (empty when they agree)."""
    have, want = _essence(nbformat.read(chapter, as_version=4)), _essence(build(student=False))
    problems = [
        f"cell {i}: the chapter has {h[1][:60]!r}..., the source makes {w[1][:60]!r}..."
        for i, (h, w) in enumerate(zip(have, want))
        if h != w
    ]
    if len(have) != len(want):
        problems.append(f"the chapter has {len(have)} cells, the source makes {len(want)}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--student", metavar="FILE", help="write the student notebook to FILE (must not exist)")
    group.add_argument("--check", action="store_true", help="exit 1 if the chapter's cells differ from the source")
    group.add_argument(
        "--execute",
        action="store_true",
        help="write the chapter, then execute it in place with papermill and tidy its outputs",
    )
    args = parser.parse_args()
    if args.check:
        problems = differences()
        if problems:
            sys.exit(
                f"{CHAPTER.relative_to(ROOT)} is not what {SOURCE.relative_to(ROOT)} makes:\n  "
                + "\n  ".join(problems)
                + "\nrun: python scripts/make_exercises.py --execute"
            )
        print(f"{CHAPTER.relative_to(ROOT)} agrees with {SOURCE.relative_to(ROOT)}")
        return
    if args.student:
        target = Path(args.student)
        if target.exists():
            sys.exit(f"{target} exists; choose a new file name")
        nbformat.write(build(student=True), target)
        print(f"wrote {target} (the student notebook: stubs, no solutions)")
        return
    nbformat.write(build(student=False), CHAPTER)
    print(f"wrote {CHAPTER.relative_to(ROOT)} (not executed)")
    if args.execute:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "papermill",
                str(CHAPTER),
                str(CHAPTER),
                "-k",
                "python3",
                "--cwd",
                str(CHAPTER.parent),
            ],
            check=True,
        )
        subprocess.run([sys.executable, str(ROOT / "scripts" / "tidy_outputs.py"), str(CHAPTER)], check=True)
        print(f"executed {CHAPTER.relative_to(ROOT)} in place")


if __name__ == "__main__":
    main()
