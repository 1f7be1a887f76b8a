"""The distillation baseline of chapter 07, trained until its validation loss plateaus, as data.

    python scripts/distill_baseline.py --task ioi --budget-from studies/book.yml [--alpha auto|A] \\
        [--ablation mean] [--seed 0] [--include-mlps] [--device cuda] [--max-steps 20000] [--patience 10]

The student (the teacher's family with N layers, N the largest that fits in the extracted
model's parameter count, read from the study's store row of the same task, configuration, seed
and alpha) is trained on that row's patching prompts to copy the teacher's last-position logits
(L2, Adam, the paper's learning rate 1e-3), evaluated every `--eval-every` steps on the validation
prompts, and stopped when the validation loss has plateaued (`--patience` evaluations without a
relative improvement of `--min-improvement`) or after `--max-steps` (the paper's 20,000 epochs).
`--alpha auto` (the default) takes the chapters' rule: the largest alpha of the study whose
circuits keep the validation accuracy within 5 points of the full model's
(`circuitlib.studies.analysis.choose_alpha`). The record
(`circuitlib.studies.distill.distilled_student`: settings, budget, N, the whole training curve,
best validation and final test accuracy, why it stopped) and its provenance are written atomically
to results/distill/<task>-<ablation>-<heads|heads+mlps>-seed<S>-alpha<A>.json; an existing result is
never replaced without --force.

A student of the stand-in trains for hours (about 7 s a step for a 9-layer student, 15 s for a
22-layer one, on IOI at n = 64 with other work beside it), so the training checkpoints every
`--checkpoint-every` steps to the same name ending in .ckpt (hundreds of MB: kept out of git),
and a run that was cut off (Ctrl-C, the end of a session or of a cluster job) continues from it,
to exactly the uninterrupted result, when the same command runs again. While it trains it holds
<name>.lock: a second process asking for the same student is refused, so several can run at once
for different configurations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from circuitlib.core.resumable import ResultInProgress
from circuitlib.models.loading import check_device, load_model
from circuitlib.studies.analysis import choose_alpha
from circuitlib.studies.distill import baseline_path, distilled_student
from circuitlib.studies.runner import study_table
from circuitlib.studies.spec import load_spec
from circuitlib.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True)
    p.add_argument("--budget-from", required=True, help="the study spec whose store holds the extracted model's row")
    p.add_argument("--alpha", default="auto", help="the row's alpha, or 'auto' (the chapters' selection rule)")
    p.add_argument("--ablation", default="mean", choices=("mean", "zero"))
    p.add_argument("--include-mlps", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--min-improvement", type=float, default=1e-3)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=str(ROOT / "results" / "distill"))
    p.add_argument("--force", action="store_true")
    args = p.parse_args()

    device = check_device(args.device)
    spec = load_spec(args.budget_from)
    task_name = get_task(args.task).name
    table = study_table(spec)
    table = table[
        (table.task == task_name) & (table.ablation == args.ablation) & (table.include_mlps == args.include_mlps)
    ]
    if args.alpha == "auto":
        alpha = choose_alpha(table).get((task_name, args.ablation, args.include_mlps)) if len(table) else None
        if alpha is None:
            print(
                f"error: no alpha of {args.budget_from}'s finished units keeps {task_name} within 5 points of the "
                "full model (or none are finished); give --alpha",
                file=sys.stderr,
            )
            return 2
    else:
        alpha = float(args.alpha)
    row = table[(table.seed == args.seed) & ((table.alpha - alpha).abs() <= 1e-12 * max(1.0, alpha))]
    if len(row) != 1:
        print(
            f"error: the store of {args.budget_from} has no row for {task_name}, {args.ablation}, "
            f"include_mlps={args.include_mlps}, seed {args.seed}, alpha {alpha:g}; run that study first "
            f"(python -m circuitlib study run {args.budget_from})",
            file=sys.stderr,
        )
        return 2
    row = row.iloc[0]
    out = baseline_path(args.out_dir, row)
    if out.exists() and not args.force:
        print(f"error: {out} exists; pass --force to replace it", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    teacher, tokenizer = load_model(spec.model, device=device)
    try:
        record = distilled_student(
            args.out_dir,
            teacher,
            tokenizer,
            row,
            device=str(device),
            threads=args.threads,
            replace=args.force,
            checkpoint_every=args.checkpoint_every,
            lr=args.lr,
            max_steps=args.max_steps,
            eval_every=args.eval_every,
            patience=args.patience,
            min_improvement=args.min_improvement,
        )
    except ResultInProgress as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{task_name}, alpha {alpha:g}: {record['student_layers']}-layer student ({record['student_parameters']:,} <= "
        f"{record['budget_parameters']:,} parameters), {record['steps_run']} steps in {record['seconds'] / 60:.1f} min "
        f"({record['cpu_seconds'] / 60:.1f} min of CPU; {record['stopped']}); best validation accuracy "
        f"{record['best_val_accuracy']:.3f}, test "
        f"{record['test_accuracy']:.3f} -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
