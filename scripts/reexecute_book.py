#!/usr/bin/env python
"""Re-execute the book's chapters in place, all from one clean commit.

    python scripts/reexecute_book.py [CHAPTER ...] [--dry-run]
    python scripts/reexecute_book.py --check      # were all chapters made at one commit?

Every chapter the table of contents lists (or the named ones, as ``make run`` names them:
``02_ioi``, ``ioi``, ``02``) is run with papermill at its own committed parameters (kernel
``python3``, working directory ``notebooks/``, one torch thread unless ``OMP_NUM_THREADS`` says
otherwise), its progress bars tidied (``scripts/tidy_outputs.py``), and written back over the
committed notebook only when it ran to the end: the run goes to a hidden file next to it that
replaces the chapter atomically, and a failed run is kept as ``.<stem>.FAILED.ipynb`` (when
papermill got as far as writing one) with the chapter untouched. Each re-executed chapter records
the commit it was made at in its metadata (``circuitlib.made_at_commit``), and ``--check`` lists
them and fails unless every chapter carries the same one. The teachers' page tables
(``scripts/teaching_page.py``) are regenerated at the end.

Refused before anything runs when the library, the scripts, the specs or the notebooks differ from
the commit (``git status``): the pages' provenance must name a commit that holds the code that made
them. Commit first, then re-execute, then commit the re-executed notebooks.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_notebook import UsageError, resolve_notebook  # noqa: E402
from tidy_outputs import tidy_file  # noqa: E402

# What the pages' numbers depend on: a change in any of these must be committed first.
SOURCES = ("circuitlib", "scripts", "studies", "notebooks", "benchmarks")


def toc_chapters(repo: Path = REPO) -> list[str]:
    """The stems of the notebooks the book's table of contents lists, in its order."""
    toc = yaml.safe_load((repo / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    return [f.split("/", 1)[1] for f in files if f.startswith("notebooks/")]


def select(chapters: list[str], names: list[str], notebooks: Path = REPO / "notebooks") -> list[str]:
    """The chapters ``names`` designate (as ``make run`` reads them: stem, number or name), in book order."""
    try:
        chosen = {resolve_notebook(name, notebooks).stem for name in names}
    except UsageError as e:
        raise SystemExit(f"error: {e}") from None
    if not_in_book := chosen - set(chapters):
        raise SystemExit(f"error: not a chapter of _toc.yml: {', '.join(sorted(not_in_book))}")
    return [c for c in chapters if c in chosen] if names else chapters


def uncommitted(repo: Path = REPO) -> list[str]:
    """``git status --porcelain`` lines for the sources the pages depend on (empty when clean)."""
    done = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--", *SOURCES], capture_output=True, text=True, check=True
    )
    return [line for line in done.stdout.splitlines() if line.strip()]


def reexecute(stem: str, notebooks: Path, commit: str) -> float:
    """Run ``notebooks/<stem>.ipynb`` in place (atomically), stamped as made at ``commit``; returns the seconds."""
    chapter = notebooks / f"{stem}.ipynb"
    running = notebooks / f".{stem}.running.ipynb"
    failed = notebooks / f".{stem}.FAILED.ipynb"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "papermill", chapter.name, running.name, "-k", "python3"], cwd=notebooks, env=env
    )
    if done.returncode != 0:
        if running.exists():  # papermill writes nothing when it fails before the first cell
            os.replace(running, failed)
        raise SystemExit(
            f"error: {stem} failed (papermill exit {done.returncode}); the chapter is "
            f"unchanged, the failed run is {failed}"
        )
    tidy_file(running)
    nb = nbformat.read(running, as_version=4)
    nb.metadata.setdefault("circuitlib", {})["made_at_commit"] = commit
    nbformat.write(nb, running)
    os.replace(running, chapter)
    return time.perf_counter() - start


def made_at(chapter: Path) -> str | None:
    """The commit a chapter was re-executed at (its metadata stamp), or None if it carries none."""
    return nbformat.read(chapter, as_version=4).metadata.get("circuitlib", {}).get("made_at_commit")


def check_one_commit(stems: list[str], notebooks: Path) -> list[str]:
    """Problems that keep the chapters from being made at one commit (empty when they all were)."""
    commits = {stem: made_at(notebooks / f"{stem}.ipynb") for stem in stems}
    problems = [
        f"{stem}: no commit recorded (not re-executed by this script)" for stem, c in commits.items() if c is None
    ]
    if len({c for c in commits.values() if c is not None}) > 1:
        problems += [f"{stem}: made at {c[:7]}" for stem, c in commits.items() if c is not None]
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("chapters", nargs="*", help="chapters to run (default: every chapter of _toc.yml)")
    p.add_argument("--dry-run", action="store_true", help="check and list, run nothing")
    p.add_argument("--check", action="store_true", help="run nothing; fail unless all chapters were made at one commit")
    args = p.parse_args(argv)
    stems = select(toc_chapters(), args.chapters)
    if args.check:
        if problems := check_one_commit(stems, REPO / "notebooks"):
            print("the chapters were not made at one commit:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        print(f"all {len(stems)} chapters were made at {made_at(REPO / 'notebooks' / f'{stems[0]}.ipynb')[:7]}")
        return 0
    dirty = uncommitted()
    if dirty:
        raise SystemExit(
            "error: uncommitted changes in what the pages depend on; commit them first "
            "so the pages' provenance names the code that made them:\n  " + "\n  ".join(dirty)
        )
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    print(f"re-executing {len(stems)} chapters at commit {commit[:7]}: {', '.join(stems)}")
    if args.dry_run:
        return 0
    for stem in stems:
        seconds = reexecute(stem, REPO / "notebooks", commit)
        print(f"  {stem}: {seconds / 60:.1f} min", flush=True)
    subprocess.run([sys.executable, str(REPO / "scripts" / "teaching_page.py")], check=True)
    print(f"done: commit the re-executed notebooks (made at {commit[:7]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
