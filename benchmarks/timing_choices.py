"""Benchmark: what each choice of a timing protocol does to a measured pruned/full time ratio.

    python benchmarks/timing_choices.py [--n 16] [--trials 3] [--device cpu|cuda]

The paper's Table 3 reports inference-time cuts measured by the authors' `measure_time`
(their public code, utils.py): 5 calls of `model(val_tokens)` timed with `time.time()`, the
mean of the 5, no warm-up inside the timer and no device synchronisation. Gradients were off
(their benchmark notebook calls `torch.set_grad_enabled(False)`), and each model had just run
once on the same batch, untimed, to compute its accuracy. The forward pass computes the logits
at every position (a Hugging Face GPT-2 returns them all).

This script re-creates that protocol on a model of GPT-2 Small's exact shape (random weights)
and the acronym prompts, for a pruned model of the paper's heads-only size (the 8 acronym heads,
every MLP), and then changes ONE choice at a time:

- ``authors``: the protocol above (one untimed call, then 5 timed calls, mean; all positions);
- ``cold``: no call at all before the timer (a freshly copied model's first call is timed);
- ``warm-up 3``: three untimed calls before the timer instead of one;
- ``median of 5``: the median of the same 5 calls instead of the mean;
- ``median of 30``: 30 timed calls, median (with the authors' single untimed call);
- ``last position``: logits at the last position only (all the tasks need), else as ``authors``;
- ``pruned first``: the pruned model is timed before the full one, else as ``authors``;
- ``synchronised`` (GPU only): ``torch.cuda.synchronize()`` before reading each clock; on a CPU
  every operation has finished when the call returns, so there is nothing to synchronise and
  this row is not measured.

Each protocol is repeated ``--trials`` times on fresh copies of both models (so "cold" is cold
for the weights; process-wide caches are warm after the first trial, as they were for the
authors, who ran one benchmark after another in a notebook). For every protocol the result
keeps each trial's ratio, so the spread shows how far one measurement can be trusted, and
each call's time, so the cost of a first call shows. Writes
benchmarks/results/timing_choices[-cuda].json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import acronym_batch, gpt2_shaped_model, write_result  # noqa: E402

from circuitlib.core.ablation import mean_activations  # noqa: E402
from circuitlib.core.surgery import prune  # noqa: E402
from circuitlib.tasks import get_task  # noqa: E402

ALL_MLPS = [f"MLP {layer}" for layer in range(12)]

# name -> (untimed calls before the timer, timed calls, statistic, last position only, pruned first, sync)
PROTOCOLS = {
    "authors": (1, 5, "mean", False, False, False),
    "cold": (0, 5, "mean", False, False, False),
    "warm-up 3": (3, 5, "mean", False, False, False),
    "median of 5": (1, 5, "median", False, False, False),
    "median of 30": (1, 30, "median", False, False, False),
    "last position": (1, 5, "mean", True, False, False),
    "pruned first": (1, 5, "mean", False, True, False),
    "synchronised": (1, 5, "mean", False, False, True),
}


def time_calls(model, tokens, before: int, timed: int, last_only: bool, sync: bool) -> list[float]:
    """`before` untimed calls, then `timed` calls each timed with time.time() (as the authors)."""
    times = []
    with torch.no_grad():  # the authors: torch.set_grad_enabled(False)
        for _ in range(before):
            model(tokens, last_only=last_only)
        for _ in range(timed):
            if sync:
                torch.cuda.synchronize()
            start = time.time()
            model(tokens, last_only=last_only)
            if sync:
                torch.cuda.synchronize()
            times.append(time.time() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=16, help="prompts in the timed batch (the authors: 250)")
    parser.add_argument("--trials", type=int, default=3, help="repetitions of each protocol")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")

    full = gpt2_shaped_model()
    patching, validation = acronym_batch(max(args.n, 50))
    means = mean_activations(full, patching)
    heads = get_task("acronyms").ground_truth("gpt2")
    pruned = prune(full, heads + ALL_MLPS, "mean", means)
    tokens = validation[: args.n].to(args.device)
    seq = tokens.shape[1]
    flop_ratio = pruned.flops(seq) / full.flops(seq)
    param_ratio = pruned.count_parameters()["parameters"] / full.count_parameters()["parameters"]
    print(
        f"device {args.device}; GPT-2-shaped model (random weights); batch {args.n} x {seq} tokens; "
        f"pruned: {len(heads)} heads, 12 MLPs; parameter ratio {param_ratio:.3f}, FLOP ratio "
        f"{flop_ratio:.3f} (last position), {args.trials} trials per protocol"
    )
    print(f"{'protocol':16}{'ratio mean':>11}{'min':>8}{'max':>8}{'1st call/next (full)':>22}")

    rows = []
    for name, (before, timed, stat, last_only, pruned_first, sync) in PROTOCOLS.items():
        if sync and not on_gpu:
            rows.append(
                {
                    "protocol": name,
                    "measured": False,
                    "why": "on a CPU a call returns when its work is done: nothing to synchronise",
                }
            )
            print(f"{name:16}{'(CPU: nothing to synchronise)':>49}")
            continue
        trials = []
        for _ in range(args.trials):
            models = {"full": copy.deepcopy(full).to(args.device), "pruned": copy.deepcopy(pruned).to(args.device)}
            order = ["pruned", "full"] if pruned_first else ["full", "pruned"]
            calls = {label: time_calls(models[label], tokens, before, timed, last_only, sync) for label in order}
            pick = statistics.mean if stat == "mean" else statistics.median
            trials.append(
                {
                    "full_s": pick(calls["full"]),
                    "pruned_s": pick(calls["pruned"]),
                    "ratio": pick(calls["pruned"]) / pick(calls["full"]),
                    "calls_s": calls,
                }
            )
            del models
        ratios = [t["ratio"] for t in trials]
        row = {
            "protocol": name,
            "measured": True,
            "untimed_calls_before": before,
            "timed_calls": timed,
            "statistic": stat,
            "last_position_only": last_only,
            "pruned_first": pruned_first,
            "synchronised": sync,
            "ratio_mean": statistics.mean(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "trials": trials,
        }
        first = statistics.median(t["calls_s"]["full"][0] for t in trials)
        rest = statistics.median(x for t in trials for x in t["calls_s"]["full"][1:])
        row["full_first_call_over_rest"] = first / rest
        rows.append(row)
        print(
            f"{name:16}{row['ratio_mean']:>11.3f}{row['ratio_min']:>8.3f}{row['ratio_max']:>8.3f}"
            f"{row['full_first_call_over_rest']:>22.2f}"
        )

    suffix = "" if not on_gpu else "-cuda"
    path = write_result(
        f"timing_choices{suffix}",
        {
            "model": "GPT-2-shaped, random weights (seed 0)",
            "device": args.device,
            "batch": args.n,
            "seq_len": seq,
            "trials": args.trials,
            "pruned": f"{len(heads)} heads (the acronym circuit's), every MLP",
            "param_ratio": param_ratio,
            "flop_ratio_last_position": flop_ratio,
            "flop_ratio_all_positions": pruned.flops(seq, last_only=False) / full.flops(seq, last_only=False),
            "protocols": rows,
        },
    )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
