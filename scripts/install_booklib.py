#!/usr/bin/env python
"""Make the book's own code (notebooks/booklib) importable in this environment, beside circuitlib.

    python scripts/install_booklib.py

booklib is not part of the installed circuitlib package: it lives with the chapters (as a course
keeps its checkers beside its exercises). This writes one path file into the environment's
site-packages that puts notebooks/ on sys.path, so chapters, tests, scripts and the book's Sphinx
extension import `booklib` from any working directory, the same way `pip install -e .` makes
circuitlib importable.
"""

import site
import sys
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def main() -> int:
    if sys.prefix == sys.base_prefix:
        print(
            "error: run this with the project's environment (.venv/bin/python), not the system Python", file=sys.stderr
        )
        return 2
    target = Path(site.getsitepackages()[0]) / "circuitlib-booklib.pth"
    target.write_text(f"{NOTEBOOKS}\n")
    print(f"booklib: {target} -> {NOTEBOOKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
