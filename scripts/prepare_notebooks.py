"""Copy every notebook into a folder with CI's small parameters injected (papermill --prepare-only).

    python scripts/prepare_notebooks.py --out .nbval -p n 8

nbval then executes the copies top to bottom (`pytest --nbval-lax .nbval`). Parameters a notebook
does not declare in its `parameters` cell are left out for that notebook.
"""

import argparse
import ast
import shutil
from pathlib import Path

import papermill

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".nbval", help="folder for the prepared copies (emptied first)")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a parameter to inject (value parsed as a Python literal)")
    args = parser.parse_args()
    out = ROOT / args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    wanted = {name: ast.literal_eval(value) for name, value in args.p}
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        declared = papermill.inspect_notebook(str(notebook))
        params = {k: v for k, v in wanted.items() if k in declared}
        papermill.execute_notebook(str(notebook), str(out / notebook.name), parameters=params,
                                   prepare_only=True, log_output=False, progress_bar=False)
        print(f"{notebook.name}: {params or 'as committed'}")


if __name__ == "__main__":
    main()
