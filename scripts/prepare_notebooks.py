"""Copy every notebook into a folder with CI's small parameters injected (papermill --prepare-only).

    python scripts/prepare_notebooks.py --out .nbval --config notebooks/ci.yml [-p NAME VALUE ...]

The config (YAML) maps "all" and notebook stems to parameters; `-p` adds parameters for every
notebook. nbval then executes the copies top to bottom (`pytest --nbval-lax .nbval`). Parameters
a notebook does not declare in its `parameters` cell are left out for that notebook; a config
entry naming no notebook, or a parameter its notebook does not declare, is an error.
"""

import argparse
import ast
import shutil
from pathlib import Path

import papermill
import yaml

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".nbval", help="folder for the prepared copies (emptied first)")
    parser.add_argument("--config", help="YAML file: parameters for 'all' notebooks and per notebook stem")
    parser.add_argument(
        "-p",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a parameter to inject into every notebook (value parsed as a Python literal)",
    )
    args = parser.parse_args()
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    config = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    unknown = set(config) - {"all"} - {nb.stem for nb in notebooks}
    if unknown:
        raise SystemExit(
            f"{args.config}: no notebook called {', '.join(sorted(unknown))}; "
            f"use 'all' or one of {', '.join(nb.stem for nb in notebooks)}"
        )
    common = {**config.get("all", {}), **{name: ast.literal_eval(value) for name, value in args.p}}
    chosen = {}
    for notebook in notebooks:  # check everything before writing anything
        declared = papermill.inspect_notebook(str(notebook))
        own = config.get(notebook.stem, {})
        undeclared = set(own) - set(declared)
        if undeclared:
            raise SystemExit(f"{args.config}: {notebook.stem} has no parameter {', '.join(sorted(undeclared))}")
        chosen[notebook] = {k: v for k, v in common.items() if k in declared} | own
    out = ROOT / args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for notebook, params in chosen.items():
        papermill.execute_notebook(
            str(notebook),
            str(out / notebook.name),
            parameters=params,
            prepare_only=True,
            log_output=False,
            progress_bar=False,
        )
        print(f"{notebook.name}: {params or 'as committed'}")


if __name__ == "__main__":
    main()
