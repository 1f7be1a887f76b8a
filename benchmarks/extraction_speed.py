"""Benchmark: the fast exact extraction path against the plain hook path, a one-pass alpha sweep, memory.

    python benchmarks/extraction_speed.py [--plain-steps K] [--n 250] [--device cpu|cuda]

Everything is measured in this one run, on a GPT-2-shaped model and the acronym batch (250 x 11):
1. the fast path at one alpha (its decisions are checked against the plain path's);
2. the plain path (TransformerLens hooks, a full forward pass per candidate) at the same alpha:
   all 144 candidates by default, or only the first K with --plain-steps K (then its time is
   extrapolated per candidate and the result says so);
3. the plain path's forward pass with the authors' hook settings (use_attn_result,
   use_split_qkv_input, use_hook_mlp_in), timed on a few candidates and extrapolated;
4. a sweep over the paper's 30 alphas against the single-alpha fast run;
5. batched candidates (a layer's remaining candidates in one pass; the default on CUDA) against
   one candidate at a time (the default on the CPU), side by side, same decisions checked;
6. the peak memory (resident set) of a fast extraction in a fresh process, model included; on
   CUDA, the peak GPU memory allocated by the fast extraction instead.
Ratios are printed and written to benchmarks/results/extraction_speed.json (extraction_speed-cuda.json
on a GPU).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import acronym_batch, gpt2_shaped_model, timed, write_result  # noqa: E402

from circuitlib.core.ablation import hooked_last_logits, mean_activations  # noqa: E402
from circuitlib.core.convert import to_hooked  # noqa: E402
from circuitlib.core.metrics import kl_divergence  # noqa: E402
from circuitlib.discovery.greedy import extract, sweep, traversal  # noqa: E402
from circuitlib.models.loading import check_device  # noqa: E402

PEAK_MEMORY_SCRIPT = """
import gc, sys
sys.path.insert(0, {bench!r})
from common import acronym_batch, gpt2_shaped_model, peak_rss_gib, reset_peak_rss
from circuitlib.discovery.greedy import extract
model = gpt2_shaped_model()
patching, validation = acronym_batch({n})
gc.collect()
reset = reset_peak_rss()  # forget the transient peak of building the model from Hugging Face's
extract(model, patching, validation, alpha={alpha!r}, progress=False)
print(peak_rss_gib(), reset)
"""


def plain_steps(model, patching, validation, alpha, steps, hooked):
    """The plain path's first `steps` decisions (Algorithm 1 with hooks), and their times."""
    means = mean_activations(model, patching)
    full = hooked_last_logits(hooked, validation, [], "mean", means)
    ablated, kl, decisions, seconds = [], 0.0, [], []
    for name in traversal(12, 12, include_mlps=False)[:steps]:
        logits, t = timed(lambda: hooked_last_logits(hooked, validation, ablated + [name], "mean", means))
        kl_new = kl_divergence(full, logits)
        pruned = kl_new - kl < alpha
        decisions.append((name, pruned))
        seconds.append(t)
        if pruned:
            ablated.append(name)
            kl = kl_new
    return decisions, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--plain-steps", type=int, default=144, help="plain-path decisions to run (<= 144; 0 skips the plain path)"
    )
    parser.add_argument("--authors-steps", type=int, default=2, help="passes timed with the authors' hook settings")
    parser.add_argument("--n", type=int, default=250, help="prompts in the patching and validation batches")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    device = check_device(args.device)
    torch.manual_seed(0)
    model = gpt2_shaped_model().to(device)
    patching, validation = acronym_batch(args.n)
    print(
        f"model: GPT-2-shaped (random weights), batch {tuple(validation.shape)}, device {device}, "
        f"torch threads {torch.get_num_threads()}"
    )

    # An alpha on this model's own scale: the median KL increase of a run that prunes only harmless heads.
    probe, probe_s = timed(lambda: extract(model, patching, validation, alpha=0.0, progress=False))
    alpha = float(np.median([d.delta for d in probe.decisions]))
    fast, fast_s = timed(lambda: extract(model, patching, validation, alpha=alpha, progress=False))
    print(
        f"fast path, alpha={alpha:.3g}: {fast_s:.1f} s, {len(fast.pruned)}/144 heads pruned "
        f"(alpha=0 run: {probe_s:.1f} s)"
    )

    steps = min(args.plain_steps, 144)
    if steps > 0:  # --plain-steps 0 skips the plain path (e.g. where TransformerLens is not installed)
        hooked = to_hooked(model)
        decisions, plain_times = plain_steps(model, patching, validation, alpha, steps, hooked)
        same = decisions == [(d.component, d.pruned) for d in fast.decisions[:steps]]
        plain_s = float(np.sum(plain_times)) if steps == 144 else float(np.mean(plain_times)) * 144
        print(
            f"plain path: {np.mean(plain_times):.2f} s per candidate, {plain_s:.0f} s for 144"
            f"{'' if steps == 144 else f' (extrapolated from {steps} candidates)'}; same decisions: {same}"
        )

        hooked.set_use_attn_result(True)
        hooked.set_use_split_qkv_input(True)
        hooked.set_use_hook_mlp_in(True)
        _, authors_times = plain_steps(model, patching, validation, alpha, args.authors_steps, hooked)
        authors_s = float(np.mean(authors_times)) * 144
        print(
            f"plain path with the authors' hook settings: {np.mean(authors_times):.1f} s per candidate, "
            f"{authors_s:.0f} s for 144 (extrapolated from {args.authors_steps})"
        )
    else:
        same, plain_s, authors_s = None, None, None
        print("plain path: skipped (--plain-steps 0)")

    alphas = [float(a) for a in np.logspace(-5, 0, 30) * alpha / 1e-2]  # the paper's grid, centred on alpha
    swept, sweep_s = timed(lambda: sweep(model, patching, validation, alphas, progress=False))
    i = int(np.argmin([abs(a - alpha) for a in alphas]))
    check = extract(model, patching, validation, alpha=alphas[i], progress=False)
    print(
        f"sweep over 30 alphas: {sweep_s:.1f} s = {sweep_s / fast_s:.2f}x one extraction; "
        f"alpha {alphas[i]:.3g} identical to its own run: {check.to_dict() == swept[i].to_dict()}"
    )

    batched, batched_s = timed(
        lambda: extract(model, patching, validation, alpha=alpha, progress=False, batch_candidates=True)
    )
    single, single_s = timed(
        lambda: extract(model, patching, validation, alpha=alpha, progress=False, batch_candidates=False)
    )
    batched_same = [(d.component, d.pruned) for d in batched.decisions] == [
        (d.component, d.pruned) for d in single.decisions
    ]
    print(
        f"batched candidates: {batched_s:.1f} s, one at a time: {single_s:.1f} s "
        f"({single_s / batched_s:.2f}x); same decisions: {batched_same}"
    )

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        extract(model, patching, validation, alpha=alpha, progress=False)
        peak_gib, peak_scope = torch.cuda.max_memory_allocated(device) / 2**30, "GPU memory allocated, model included"
    else:
        script = PEAK_MEMORY_SCRIPT.format(bench=str(Path(__file__).parent), n=args.n, alpha=alpha)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        peak, reset = out.stdout.strip().splitlines()[-1].split()
        peak_gib, peak_scope = (
            float(peak),
            ("extraction, model included" if reset == "True" else "whole process, building the model included"),
        )
    print(f"peak memory of a fast extraction ({peak_scope}): {peak_gib:.2f} GiB")

    result = {
        "model": "GPT-2-shaped, random weights (seed 0)",
        "batch": list(validation.shape),
        "alpha": alpha,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "fast_seconds": fast_s,
        "plain_seconds": plain_s,
        "plain_steps_measured": steps,
        "authors_hooks_seconds": authors_s,
        "authors_steps_measured": args.authors_steps,
        "same_decisions": same,
        "sweep_seconds": sweep_s,
        "sweep_alphas": len(alphas),
        "sweep_matches_separate_run": check.to_dict() == swept[i].to_dict(),
        "peak_memory_gib": peak_gib,
        "peak_memory_scope": peak_scope,
        "batched_candidates_seconds": batched_s,
        "one_candidate_at_a_time_seconds": single_s,
        "batched_candidates_same_decisions": batched_same,
        "ratios": {
            "plain_over_fast": plain_s and plain_s / fast_s,
            "authors_hooks_over_fast": authors_s and authors_s / fast_s,
            "sweep_over_single": sweep_s / fast_s,
            "one_at_a_time_over_batched": single_s / batched_s,
        },
        "targets": {
            "plain_over_fast": ">= 30",
            "authors_hooks_over_fast": ">= 30",
            "sweep_over_single": "<= 5",
            "peak_memory_gib": "< 3",
        },
    }
    result["met"] = {
        "plain_over_fast": plain_s and plain_s / fast_s >= 30,
        "authors_hooks_over_fast": authors_s and authors_s / fast_s >= 30,
        "sweep_over_single": sweep_s / fast_s <= 5,
        "peak_memory_gib": peak_gib < 3,
    }
    path = write_result("extraction_speed" + ("" if device.type == "cpu" else f"-{device.type}"), result)
    print(
        "ratios:",
        {k: v and round(v, 2) for k, v in result["ratios"].items()},
        "targets met:",
        result["met"],
        f"-> {path}",
    )


if __name__ == "__main__":
    main()
