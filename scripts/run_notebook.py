#!/usr/bin/env python
"""Re-run one of the book's notebooks with new parameters, into a new folder under runs/.

    python scripts/run_notebook.py NB [--alpha A] [--model M] [-p NAME VALUE ...] [--out-root runs]

NB names a notebook in notebooks/: by the name after its number (``ioi``, ``greater-than``),
by its number (``02``), by its stem (``02_ioi``) or by a path to an ``.ipynb`` file.

The notebook is executed with papermill (kernel ``python3``, working directory = the
notebook's folder, as in the book) into a hidden temporary folder inside the output root,
then renamed to ``<out-root>/<stem>-<UTC time>[-alpha<A>]/``, next to a ``parameters.json``
that records what was run. An existing folder is never overwritten (a taken name gets a
``-2``, ``-3``... suffix). If the notebook fails, the partial output is kept under the same
name ending in ``-FAILED``, papermill's error is printed and the exit status is 1. Parameter
names that are not in the notebook's ``parameters`` cell are refused before anything runs.
The environment variable ``CIRCUITLIB_RUN_DIR`` tells the notebook the (temporary) folder of
the run, for any extra files it wants to leave there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tidy_outputs import tidy_file  # noqa: E402

NOTEBOOKS = REPO / "notebooks"


class UsageError(Exception):
    """A problem with the command line, reported before anything runs."""


# ---------------------------------------------------------------------------------------
# finding the notebook


def _name_part(stem: str) -> str:
    """'02_greater_than' -> 'greater_than', '06b_edges_vs_nodes' -> 'edges_vs_nodes' (after the number)."""
    return re.sub(r"^\d+[a-z]?[_-]", "", stem)


def _number_part(stem: str) -> str | None:
    """'06b_edges_vs_nodes' -> '06b', '02_ioi' -> '02', 'notes' -> None."""
    m = re.match(r"^(\d+[a-z]?)[_-]", stem)
    return m.group(1) if m else None


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(" ", "_")


def resolve_notebook(name: str, notebooks_dir: Path = NOTEBOOKS) -> Path:
    """The notebook that ``name`` designates; UsageError listing the choices otherwise."""
    as_path = Path(name)
    if as_path.suffix == ".ipynb" and as_path.is_file():
        return as_path.resolve()
    available = sorted(p for p in notebooks_dir.glob("*.ipynb") if not p.name.startswith("."))
    listing = (
        "\n".join(f"  {_name_part(p.stem):<20} {p.relative_to(notebooks_dir.parent)}" for p in available) or "  (none)"
    )
    key = _norm(Path(name).stem if name.endswith(".ipynb") else name)

    for rule in (
        lambda p: _norm(p.stem) == key,  # 02_ioi
        lambda p: _norm(_name_part(p.stem)) == key,  # ioi, greater-than
        lambda p: _number_part(p.stem) == key,  # 02, 06b
        lambda p: _number_part(p.stem) is not None
        and _number_part(p.stem).isdigit()
        and key.isdigit()
        and int(_number_part(p.stem)) == int(key),  # 2
        lambda p: _norm(_name_part(p.stem)).startswith(key),  # greater
    ):
        matches = [p for p in available if rule(p)]
        if len(matches) == 1:
            return matches[0].resolve()
        if len(matches) > 1:
            names = ", ".join(p.name for p in matches)
            raise UsageError(f"{name!r} is ambiguous: it matches {names}.\nAvailable notebooks:\n{listing}")
    raise UsageError(f"no notebook matches {name!r} in {notebooks_dir}.\nAvailable notebooks:\n{listing}")


# ---------------------------------------------------------------------------------------
# parameters


def parse_value(text: str):
    """A command-line value: JSON when it parses (0.02, true, null, [1, 2], "x"),
    Python's True/False/None, a string otherwise."""
    python_words = {"True": True, "False": False, "None": None}
    if text in python_words:
        return python_words[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def notebook_parameters(path: Path) -> dict:
    """{name: {"default": ..., "inferred_type_name": ..., "help": ...}} of the parameters cell."""
    import papermill

    return papermill.inspect_notebook(str(path))


def check_parameters(path: Path, params: dict, declared: dict) -> None:
    unknown = sorted(set(params) - set(declared))
    if not unknown:
        return
    if not declared:
        raise UsageError(
            f"{path.name} has no cell tagged 'parameters', so it takes no parameters (got: {', '.join(unknown)})."
        )
    accepted = "\n".join(f"  {k} = {v.get('default')}" for k, v in declared.items())
    raise UsageError(
        f"{path.name} has no parameter {', '.join(map(repr, unknown))}.\nIts parameters cell accepts:\n{accepted}"
    )


# ---------------------------------------------------------------------------------------
# the output folder


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("_") or "x"


def run_name(stem: str, params: dict, now: dt.datetime) -> str:
    name = f"{stem}-{now.strftime('%Y%m%dT%H%M%SZ')}"
    if "alpha" in params:
        name += f"-alpha{_slug(params['alpha'])}"
    return name


def free_path(root: Path, name: str) -> Path:
    """root/name, or root/name-2, root/name-3, ... whichever does not exist yet."""
    candidate, n = root / name, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{name}-{n}"
    return candidate


def _move_into_place(tmp: Path, root: Path, name: str) -> Path:
    """Rename tmp to a free name; os.rename refuses a non-empty target, so retry on a race."""
    while True:
        target = free_path(root, name)
        try:
            os.rename(tmp, target)
            return target
        except OSError:
            if not target.exists():
                raise


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------
# main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Re-run a notebook of the book with new parameters into runs/<name>/.",
        epilog="Example: python scripts/run_notebook.py ioi --alpha 0.02 -p ablation zero",
    )
    parser.add_argument("notebook", metavar="NB", help="notebook name (ioi, greater-than), number (02), stem or path")
    parser.add_argument("--alpha", type=str, help="shorthand for -p alpha A")
    parser.add_argument("--model", type=str, help="shorthand for -p model M")
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="set a parameter (repeatable)",
    )
    parser.add_argument(
        "--out-root", default="runs", type=Path, help="folder that receives the run folders (default: runs)"
    )
    parser.add_argument("--notebooks-dir", default=NOTEBOOKS, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel (default python3)")
    parser.add_argument("--no-progress-bar", action="store_true", help="no papermill progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        notebook = resolve_notebook(args.notebook, args.notebooks_dir)
        params = {name: parse_value(value) for name, value in args.parameter}
        if args.alpha is not None:
            params["alpha"] = parse_value(args.alpha)
        if args.model is not None:
            params["model"] = args.model
        declared = notebook_parameters(notebook)
        check_parameters(notebook, params, declared)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import papermill

    out_root = args.out_root.resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    name = run_name(notebook.stem, params, started)
    tmp = Path(tempfile.mkdtemp(prefix=f".incomplete-{name}-", dir=out_root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the run folder is an ordinary folder
    record = {
        "notebook": str(notebook.relative_to(REPO) if notebook.is_relative_to(REPO) else notebook),
        "parameters": params,
        "defaults": {k: v.get("default") for k, v in declared.items()},
        "kernel": args.kernel,
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": None,
        "status": "running",
        "git_commit": _git_commit(),
        "command": [sys.executable, *sys.argv] if argv is None else ["run_notebook.py", *argv],
        "papermill": papermill.__version__,
    }
    _write_json(tmp / "parameters.json", record)
    print(f"running {record['notebook']} with {params or 'its default parameters'}")

    error = None
    env_before = os.environ.get("CIRCUITLIB_RUN_DIR")
    os.environ["CIRCUITLIB_RUN_DIR"] = str(tmp)
    try:
        papermill.execute_notebook(
            str(notebook),
            str(tmp / notebook.name),
            parameters=params,
            kernel_name=args.kernel,
            cwd=str(notebook.parent),
            progress_bar=not args.no_progress_bar,
        )
    except BaseException as exc:  # a failing cell, a dead kernel, Ctrl-C: keep what ran
        error = exc
    finally:
        if env_before is None:
            os.environ.pop("CIRCUITLIB_RUN_DIR", None)
        else:
            os.environ["CIRCUITLIB_RUN_DIR"] = env_before

    if (tmp / notebook.name).exists():
        tidy_file(tmp / notebook.name)  # progress bars: their final state, not every redraw
    record["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    record["status"] = "ok" if error is None else "failed"
    if error is not None:
        record["error"] = f"{type(error).__name__}: {error}"
    _write_json(tmp / "parameters.json", record)
    final = _move_into_place(tmp, out_root, name if error is None else f"{name}-FAILED")

    if error is not None:
        print(f"\nerror: {record['notebook']} failed; partial output kept in {final}", file=sys.stderr)
        print(str(error), file=sys.stderr)
        if isinstance(error, KeyboardInterrupt):
            return 130
        return 1
    try:
        print(final.relative_to(Path.cwd()))
    except ValueError:
        print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
