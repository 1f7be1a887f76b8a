"""The distillation baseline of chapter 07, trained until its validation loss plateaus, as data.

    python scripts/distill_baseline.py --task ioi --budget-from studies/table1.yml --alpha 0.01 \\
        --ablation mean --seed 0 [--include-mlps] [--device cuda] [--max-steps 20000] [--patience 10]

The student (the teacher's family with N layers, N the largest that fits in the extracted
model's parameter count, read from the study's store row of the same task, configuration, seed
and alpha) is trained on that row's patching prompts to copy the teacher's last-position logits
(L2, Adam, the paper's learning rate 1e-3), evaluated every `--eval-every` steps on the validation
prompts, and stopped when the validation loss has plateaued (`--patience` evaluations without a
relative improvement of `--min-improvement`) or after `--max-steps` (the paper's 20,000 epochs).
The result (settings, budget, N, the whole training curve, best validation and final test
accuracy, why it stopped, provenance) is written atomically to
results/distill/<task>-<ablation>-<heads|heads+mlps>-seed<S>-alpha<A>.json; an existing result is
never replaced without --force.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from circuitlib.distill import distill, layers_within, make_student, student_parameters  # noqa: E402
from circuitlib.loading import check_device, load_model  # noqa: E402
from circuitlib.model import atomic_write  # noqa: E402
from circuitlib.runner import provenance, study_table  # noqa: E402
from circuitlib.spec import load_spec  # noqa: E402
from circuitlib.tasks import get_task  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True)
    p.add_argument("--budget-from", required=True, help="the study spec whose store holds the extracted model's row")
    p.add_argument("--alpha", type=float, required=True)
    p.add_argument("--ablation", default="mean", choices=("mean", "zero"))
    p.add_argument("--include-mlps", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--min-improvement", type=float, default=1e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=str(ROOT / "results" / "distill"))
    p.add_argument("--force", action="store_true")
    args = p.parse_args()

    device = check_device(args.device)
    spec = load_spec(args.budget_from)
    table = study_table(spec)
    row = table[(table.task == get_task(args.task).name) & (table.ablation == args.ablation)
                & (table.include_mlps == args.include_mlps) & (table.seed == args.seed)
                & ((table.alpha - args.alpha).abs() <= 1e-12 * max(1.0, args.alpha))]
    if len(row) != 1:
        print(f"error: the store of {args.budget_from} has no row for {args.task}, {args.ablation}, "
              f"include_mlps={args.include_mlps}, seed {args.seed}, alpha {args.alpha}; run that study first "
              f"(python -m circuitlib study run {args.budget_from})", file=sys.stderr)
        return 2
    row = row.iloc[0]
    mlps = "heads+mlps" if args.include_mlps else "heads"
    out = Path(args.out_dir) / f"{args.task}-{args.ablation}-{mlps}-seed{args.seed}-alpha{args.alpha:g}.json"
    if out.exists() and not args.force:
        print(f"error: {out} exists; pass --force to replace it", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    teacher, tokenizer = load_model(spec.model, device=device)
    task = get_task(args.task)
    data = task.generate(tokenizer, n=int(row["n"]), seed=args.seed, n_test=int(row["n_test"]))
    budget = int(row["parameters"])
    n_layers = layers_within(teacher.cfg, budget)
    if n_layers < 1:
        print(f"error: not even a one-layer student fits in {budget:,} parameters", file=sys.stderr)
        return 2
    student = make_student(teacher, n_layers, seed=args.seed)
    history = distill(teacher, student, data.patching.tokens, data.validation, task, steps=args.max_steps,
                      lr=args.lr, seed=args.seed, eval_every=args.eval_every, patience=args.patience,
                      min_improvement=args.min_improvement)
    with torch.inference_mode():
        test_logits = student(data.test.tokens.to(device), last_only=True)
        test_accuracy = task.correct(data.test, test_logits).float().mean().item()
    record = {"model": spec.model, "task": task.name, "ablation": args.ablation, "include_mlps": args.include_mlps,
              "seed": args.seed, "alpha": args.alpha, "n": int(row["n"]), "n_test": int(row["n_test"]),
              "study": spec.name, "study_key": row["key"], "budget_parameters": budget,
              "extracted_test_accuracy": float(row["test_accuracy"]),
              "full_parameters": int(row["full_parameters"]), "student_layers": n_layers,
              "student_parameters": student_parameters(teacher.cfg, n_layers), "lr": args.lr,
              "max_steps": args.max_steps, "eval_every": args.eval_every, "patience": args.patience,
              "min_improvement": args.min_improvement, "steps_run": len(history.train_loss),
              "stopped": history.stopped, "seconds": history.seconds,
              "best_val_accuracy": history.best_val_accuracy, "best_step": history.best_step,
              "test_accuracy": test_accuracy, "train_loss": history.train_loss, "eval_steps": history.eval_steps,
              "val_loss": history.val_loss, "val_accuracy": history.val_accuracy,
              "provenance": {**provenance(str(device), args.threads),
                             "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(record)))
    print(f"{task.name}: {n_layers}-layer student ({record['student_parameters']:,} <= {budget:,} parameters), "
          f"{record['steps_run']} steps in {history.seconds / 60:.1f} min ({history.stopped}); best validation "
          f"accuracy {history.best_val_accuracy:.3f}, test {test_accuracy:.3f} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
