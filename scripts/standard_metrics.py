"""The field's measures of every stored circuit of a study, computed once into its store.

    python scripts/standard_metrics.py studies/book.yml [--split test] [--device cpu] [--threads 1] [--csv OUT]

    nohup nice -n 19 python scripts/standard_metrics.py studies/book.yml > standard_metrics.log 2>&1 &

For every finished unit of the spec, each circuit is rebuilt from its kept heads and MLPs and
measured with its task's standard measure, beside the full model, the empty circuit and the best
constant answer (`circuitlib.studies.derived.standard_metrics_table`). Every result is a record in the
study's store (`<store>/circuit-metrics/`, `<store>/reference-metrics/`), written when it is
done: the script can be killed at any time and started again, and goes on with what is missing.
At the end it prints the mean normalised faithfulness and MIB's CPR and CMD per task and
configuration, and with --csv writes one row per circuit (without the per-prompt values).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from circuitlib.models.loading import check_device
from circuitlib.studies.derived import faithfulness_area_table, standard_metrics_table
from circuitlib.studies.spec import load_spec


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="a study spec (studies/*.yml) whose units are in its store")
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--device", default=None, help="where the model runs (default: the spec's device)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    parser.add_argument("--csv", type=Path, default=None, help="also write one row per circuit to this CSV file")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        check_device(args.device or spec.device)
        if args.csv is not None and not args.csv.parent.is_dir():
            raise ValueError(f"the folder of --csv {args.csv} does not exist; create it or choose another path")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    table = standard_metrics_table(spec, split=args.split, device=args.device, progress=True)
    if not len(table):
        print(f"{spec.name}: no finished units in {spec.store} yet; run the study first")
        return 0
    if args.csv is not None:
        table.drop(columns="value_per_prompt").to_csv(args.csv, index=False)
    areas = faithfulness_area_table(table)
    by = ["task", "ablation", "include_mlps"]
    summary = table.groupby(by).agg(
        circuits=("alpha", "size"),
        faithfulness=("faithfulness", "mean"),
        accuracy=("accuracy", "mean"),
        constant_accuracy=("constant_accuracy", "mean"),
    )
    summary = summary.join(areas.groupby(by).agg(units=("key", "size"), cpr=("cpr", "mean"), cmd=("cmd", "mean")))
    print(f"{spec.name}, {args.split} split, {table['key'].nunique()} units:")
    print(summary.round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
