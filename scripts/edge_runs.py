"""Compute the missing Edge Pruning results of chapter 06b, one target sparsity after another.

    python scripts/edge_runs.py [--model smollm2-135m] [--task ioi] [--ablation mean] [--n 32] [--seed 0] \\
        [--steps 3000] [--batch-size 8] [--targets 0.9 0.95 0.98 0.99] [--out-dir results/edges] \\
        [--device cpu] [--threads 1] [--checkpoint-every 50] \\
        [--sparsity-term sampled] [--clip-grad-norm 1.0] [--readout authors] [--kv-readers per-kv-head] [--legacy]

    nohup nice -n 19 python scripts/edge_runs.py > edge_runs.log 2>&1 &   # in the background

    # issue 28's retraining: the authors' sparsity term, clipping, read-off and K/V graph (the defaults),
    # trained on IOI with both orders, 15 templates and counterfactual corruptions
    python scripts/edge_runs.py --task ioi-mixed --ablation corrupted --n 64 --batch-size 16 --targets 0.95 1.02

The recipe (--sparsity-term, --clip-grad-norm, --readout, --kv-readers) defaults to the authors'
(`circuitlib.discovery.edges.train`); --legacy asks for circuitlib's recipe before issue 28, the one the
chapter's committed results were trained with (`EdgeConfig.legacy`), so that they resolve.

Two cores, two trainings at once: start one process per core with disjoint --targets (say
`--targets 0.9 0.98` and `--targets 0.95 0.99`), each with --threads 1. A result another process
is training is skipped (its .lock), not trained twice.

The defaults are the chapter's parameters. Each result is `circuitlib.pipeline.edges.edge_result` of
an `EdgeConfig`: a JSON file <out-dir>/<task>-<ablation>-seed<S>-n<N>-bs<B>-steps<K>-target<T>[-<recipe>].json
(`edge_result_path`), which the
chapter reads instead of training. A result already there is kept (and checked against these
settings); a missing one is trained, with its state saved every --checkpoint-every steps to the
same name ending in .ckpt, so the script can be killed at any time and started again: it goes on
from the last checkpoint, to the result an uninterrupted run gives.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from circuitlib.discovery.edges.graph import KV_READERS
from circuitlib.discovery.edges.train import READOUTS, SPARSITY_TERMS, ResultInProgress, check_sparsity
from circuitlib.models.loading import check_device, load_model
from circuitlib.pipeline.edges import EdgeConfig, edge_result, edge_result_path
from circuitlib.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(text)


def sparsity(text: str) -> float:
    try:
        return check_sparsity(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def clip_norm(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0 or 'none', got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="ioi")
    p.add_argument("--ablation", default="mean", choices=("mean", "zero", "corrupted"))
    p.add_argument("--n", type=positive_int, default=32, help="prompts per split")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the gates")
    p.add_argument(
        "--steps", type=positive_int, default=3000, help="training steps per target (the chapter's, and the authors')"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="prompts per training step (the chapter's; the authors: 32)"
    )
    p.add_argument(
        "--targets",
        type=sparsity,
        nargs="+",
        default=[0.9, 0.95, 0.98, 0.99],
        help="target edge sparsities, computed in this order",
    )
    p.add_argument("--out-dir", default=str(ROOT / "results" / "edges"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    p.add_argument("--checkpoint-every", type=positive_int, default=50, help="steps between saved training states")
    p.add_argument(
        "--sparsity-term",
        choices=SPARSITY_TERMS,
        default="sampled",
        help="what the Lagrangian pushes: the sampled gates (the authors') or P(gate closed)",
    )
    p.add_argument("--clip-grad-norm", type=clip_norm, default=1.0, help="gradient clipping norm, or 'none'")
    p.add_argument(
        "--readout",
        choices=READOUTS,
        default="authors",
        help="the training's own sparsity (the authors') or (1 - target) x all edges",
    )
    p.add_argument("--kv-readers", choices=KV_READERS, default="per-kv-head", help="key/value readers of grouped heads")
    p.add_argument(
        "--legacy",
        action="store_true",
        help="circuitlib's recipe before issue 28 (the chapter's committed results); overrides the four above",
    )
    args = p.parse_args(argv)
    try:
        device = check_device(args.device)
        task = get_task(args.task).name
        settings = dict(ablation=args.ablation, seed=args.seed, n=args.n, batch_size=args.batch_size)
        if args.legacy:
            configs = [EdgeConfig.legacy(task, t, args.steps, **settings) for t in args.targets]
        else:
            recipe = dict(
                sparsity_term=args.sparsity_term,
                clip_grad_norm=args.clip_grad_norm,
                readout=args.readout,
                kv_readers=args.kv_readers,
            )
            configs = [EdgeConfig(task, t, args.steps, **settings, **recipe) for t in args.targets]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device=device)
    missing = [c for c in configs if not edge_result_path(args.out_dir, c, model).exists()]
    print(f"{len(configs) - len(missing)} of {len(configs)} results already in {args.out_dir}")
    if not missing:
        return 0
    for config in configs:
        t = config.target_sparsity
        path = edge_result_path(args.out_dir, config, model)
        checkpoint = path.with_suffix(".ckpt")
        state = "kept" if path.exists() else "resuming from its checkpoint" if checkpoint.exists() else "training"
        print(f"target {t:g}: {path.name} ({state})", flush=True)
        started = time.perf_counter()
        try:
            result = edge_result(
                args.out_dir, model, tokenizer, config, checkpoint_every=args.checkpoint_every, progress=True
            )
        except ResultInProgress as e:
            print(f"target {t:g}: skipped, {e}", flush=True)
            continue
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if state != "kept":
            m = result.metrics
            cpu = m.get("training_cpu_seconds")
            print(
                f"target {t:g}: {len(result.edges):,} edges, {len(result.nodes)} nodes, test KL "
                f"{m['edge_circuit']['test']['kl']:.4f} (standalone model {m['pruned_model']['test']['kl']:.4f}); "
                f"{(time.perf_counter() - started) / 60:.1f} min here, {m['training_seconds'] / 60:.1f} min of "
                f"training in all ({'?' if cpu is None else f'{cpu / 60:.1f}'} CPU-min, "
                f"{m['torch_threads']} threads) -> {path}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
