"""Edge Pruning on Tracr-compiled programs at the authors' settings, several seeds: results as data.

    python scripts/groundtruth_edges.py [--programs reverse xproportion] [--seeds 0 1 2 3 4] \\
        [--out-dir results/groundtruth] [--threads 1]

Each (program, seed) is `circuitlib.pipeline.groundtruth.edge_pruning` at `edge_settings(program)`
(the authors' for reverse and xproportion), written atomically with its provenance (commit,
machine, threads) and the training's seconds to <out-dir>/edges-<program>-...-seed<S>.json
(`edge_run_path`: named after the settings). A result already there is kept. The chapter reads
them with `load_edge_runs` and shows `edge_recovery_table`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", nargs="+", default=["reverse", "xproportion"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--out-dir", default=str(ROOT / "results" / "groundtruth"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from circuitlib.models.compiled.compile import load_compiled
    from circuitlib.pipeline.groundtruth import (
        edge_pruning,
        edge_recovery_table,
        edge_run_path,
        edge_settings,
        load_edge_runs,
        save_edge_run,
    )
    from circuitlib.studies.provenance import provenance

    torch.set_num_threads(args.threads)
    try:
        compiled = {p: load_compiled(p) for p in args.programs}  # every program checked before any training
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for program, c in compiled.items():
        for seed in args.seeds:
            path = edge_run_path(args.out_dir, c.name, seed, edge_settings(c))
            if path.exists():
                print(f"kept {path.name}")
                continue
            run = edge_pruning(c, seed)
            save_edge_run(path, run, provenance("cpu", args.threads))
            print(
                f"{path.name}: exact (objective truth) {run['scores']['objective']['exact']}, accuracy "
                f"{run['accuracy']:.3f}, {run['seconds']:.1f} s",
                flush=True,
            )
    for row in edge_recovery_table(load_edge_runs(args.out_dir)):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
