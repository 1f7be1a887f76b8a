"""Benchmark: one Edge Pruning training step, its FLOPs, and how near it runs to the machine's matmul peak.

    python benchmarks/edge_step.py [--model smollm2-135m|gpt2-shaped] [--batches 8 32] [--repeats 3] [--threads 1]

One step of `edges_train.train_edges` (sample the gates, the masked forward pass, the KL, its
backward) on IOI prompts with their counterfactuals (`ioi-mixed`, 15 tokens, corrupted
replacement), timed after a warm-up step (the median of `--repeats`), in wall-clock and in CPU
seconds (on a shared machine the CPU seconds are the step's own work). Its FLOPs are counted
exactly, op by op (`edges_train.step_flops`: matrix products only; a test checks the count against
torch's FLOP counter), so seconds become an achieved FLOP/s, set against the machine's float32
matmul peak measured in the same run (the best of several 2048 x 2048 products on the same
threads, by CPU time per thread). On the stand-in (grouped K/V heads) both graphs are timed: one key and one value
reader per K/V head (the authors') and one per query head; the ratio of their times sits next
to the ratio of their FLOPs. "gpt2-shaped" is a random model of GPT-2 Small's exact shape (no K/V
groups: one graph). The authors' settings (batch 32, 3000 steps) are extrapolated from the
batch-32 step's CPU seconds. Printed and written to benchmarks/results/edge_step[-<model>].json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import gpt2_shaped_model, peak_rss_gib, timed, write_result  # noqa: E402

from circuitlib.discovery.edges.graph import (  # noqa: E402
    graph_for,
    kl_loss,
    make_replacement,
    masked_logits,
    sample_gates,
)
from circuitlib.discovery.edges.train import corrupt, frozen_weights, step_flops  # noqa: E402
from circuitlib.tasks import get_task  # noqa: E402

AUTHORS_STEPS = 3000


def both_times(fn) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) of one call."""
    cpu = time.process_time()
    _, wall = timed(fn)
    return wall, time.process_time() - cpu


def matmul_peak(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """The best float32 FLOP/s of a size x size matrix product on this many threads, per CPU second
    and thread (wall-clock time on an idle machine)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    return max(2 * size**3 / (both_times(lambda: a @ b)[1] / threads) for _ in range(repeats))


def load(name: str):
    if name == "gpt2-shaped":
        from circuitlib.models.loading import gpt2_tokenizer

        return gpt2_shaped_model(), gpt2_tokenizer()
    from circuitlib.models.loading import load_model

    return load_model(name)


def step_seconds(model, tokens, repl, graph, repeats: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of `repeats` training steps (after one untimed), as `train_edges` runs them."""
    gen = torch.Generator().manual_seed(0)
    gate_logits = torch.full((graph.n_edges,), 3.0, requires_grad=True)
    with torch.no_grad():
        full = model(tokens, last_only=True)

    def step():
        gates = sample_gates(gate_logits, gen)
        loss = kl_loss(full, masked_logits(model, tokens, gates, repl, rows=torch.arange(len(tokens)), graph=graph))
        loss = loss + (1 - gates.mean()) ** 2  # a sparsity term's work (negligible)
        gate_logits.grad = None
        loss.backward()

    with frozen_weights(model):
        step()
        return [both_times(step) for _ in range(repeats)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (the stand-in) or gpt2-shaped")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    peak = matmul_peak(args.threads)
    data = get_task("ioi-mixed").generate(tokenizer, n=max(args.batches), seed=0).validation
    grouped = model.cfg.n_kv_heads < model.cfg.n_heads
    rows = []
    for kv_readers in ("per-kv-head", "per-query-head") if grouped else ("per-kv-head",):
        graph = graph_for(model, kv_readers)
        for batch in args.batches:
            tokens = data.tokens[:batch]
            repl = make_replacement(model, "corrupted", corrupted=corrupt(data[:batch]), graph=graph)
            times = step_seconds(model, tokens, repl, graph, args.repeats)
            wall = statistics.median(w for w, _ in times)
            seconds = statistics.median(c for _, c in times) / args.threads  # CPU seconds per thread
            flops = step_flops(model, graph, batch, tokens.shape[1])
            rows.append(
                {
                    "graph": kv_readers,
                    "n_edges": graph.n_edges,
                    "batch": batch,
                    "seq": tokens.shape[1],
                    "wall_seconds_per_step": wall,
                    "seconds_per_step": seconds,
                    "flops_per_step": flops["total"],
                    "flops_parts": {k: sum(v) for k, v in flops["parts"].items()},
                    "achieved_flops_per_s": flops["total"] / seconds,
                    "fraction_of_matmul_peak": flops["total"] / seconds / peak,
                }
            )
            r = rows[-1]
            print(
                f"{kv_readers:15s} {graph.n_edges:>7,} edges  batch {batch:3d}: {seconds:6.2f} CPU-s/step "
                f"({wall:.2f} s wall), "
                f"{r['flops_per_step'] / 1e9:7.1f} GFLOP, {r['achieved_flops_per_s'] / 1e9:6.1f} GFLOP/s = "
                f"{r['fraction_of_matmul_peak']:.2f} of the matmul peak ({peak / 1e9:.1f} GFLOP/s)",
                flush=True,
            )
    result = {
        "model": model.cfg.name,
        "threads": args.threads,
        "matmul_peak_flops_per_s": peak,
        "steps": rows,
        "peak_rss_gib": peak_rss_gib(),
    }
    biggest = max(args.batches)
    at = {(r["graph"], r["batch"]): r for r in rows}
    if grouped:
        kv, q = at[("per-kv-head", biggest)], at[("per-query-head", biggest)]
        result["per_kv_over_per_query"] = {
            "batch": biggest,
            "time": kv["seconds_per_step"] / q["seconds_per_step"],
            "flops": kv["flops_per_step"] / q["flops_per_step"],
            "edges": kv["n_edges"] / q["n_edges"],
        }
        print(
            f"per-K/V-head graph / per-query-head graph at batch {biggest}: time "
            f"{result['per_kv_over_per_query']['time']:.2f}, FLOPs {result['per_kv_over_per_query']['flops']:.2f}, "
            f"edges {result['per_kv_over_per_query']['edges']:.2f}"
        )
    if 32 in args.batches:
        s = at[("per-kv-head", 32)]["seconds_per_step"]
        result["authors_settings_hours"] = s * AUTHORS_STEPS / 3600
        print(
            f"the authors' settings (batch 32, {AUTHORS_STEPS} steps, per-K/V-head graph): "
            f"{result['authors_settings_hours']:.1f} CPU-hours per target on {args.threads} thread(s)"
        )
    suffix = "" if args.model == "smollm2-135m" else f"-{args.model}"
    print(f"-> {write_result('edge_step' + suffix, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
