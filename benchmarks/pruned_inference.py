"""Benchmark: inference time of pruned models against the full model, next to their FLOP ratios.

    python benchmarks/pruned_inference.py [--device cpu|cuda] [--repeats 20]

On a GPT-2-shaped model (random weights, GPT-2 Small's exact shape) and the acronym prompts
(11 tokens), three circuits of the sizes the paper reports are cut out with true pruning:
- "half the heads": 72 heads, every MLP;
- "heads only, paper-sized": 8 heads (the acronym circuit's), every MLP (the paper: ~33 % fewer parameters);
- "heads and MLPs, paper-sized": the same 8 heads and 3 MLPs (the paper: ~83 % fewer parameters).
Each is timed against the full model at batch 1 and at the task's batch (250), with warm-up,
inference mode, synchronisation on a GPU and the median of many runs, the same batch for both,
both computing the last position's logits only. Next to torch, the same models exported to ONNX
(`circuitlib.pipeline.export`) are timed in onnxruntime on the CPU with as many threads as torch uses, so
that the saving can be checked where deployed models run (`--no-onnx` skips it). Printed and
written to benchmarks/results/pruned_inference[-cuda].json.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import acronym_batch, gpt2_shaped_model, write_result  # noqa: E402

from circuitlib.core.ablation import mean_activations  # noqa: E402
from circuitlib.core.metrics import time_forward  # noqa: E402
from circuitlib.core.surgery import prune  # noqa: E402
from circuitlib.pipeline.export import ort_session, write_onnx  # noqa: E402
from circuitlib.tasks import get_task  # noqa: E402

ALL_HEADS = [f"{l}.{h}" for l in range(12) for h in range(12)]
ALL_MLPS = [f"MLP {l}" for l in range(12)]


def circuits() -> dict[str, list[str]]:
    acronym_heads = get_task("acronyms").ground_truth("gpt2")
    half = sorted(random.Random(0).sample(ALL_HEADS, 72))
    return {
        "half the heads": half + ALL_MLPS,
        "heads only, paper-sized": acronym_heads + ALL_MLPS,
        "heads and MLPs, paper-sized": acronym_heads + ["MLP 0", "MLP 9", "MLP 11"],
    }


def export(model, tokens, path: Path) -> Path:
    """`model` as ONNX at `path` (batch dynamic), exported on the CPU."""
    write_onnx(model.cpu(), tokens[:2].cpu(), path)
    return path


def onnx_timings(full: Path, pruned: Path, tokens, n: int, repeats: int) -> dict:
    """onnxruntime (CPU) medians of the full and the pruned ONNX model at batch 1 and n, and their ratios."""
    sessions = {
        label: ort_session(path, threads=torch.get_num_threads())
        for label, path in (("full", full), ("pruned", pruned))
    }
    out = {}
    for batch in (1, n):
        feed = {"tokens": tokens[:batch].cpu().numpy()}
        median = {
            label: time_forward(lambda s=s: s.run(None, feed), warmup=3, repeats=repeats)["median_s"]
            for label, s in sessions.items()
        }
        out[f"ort_full_median_s_b{batch}"], out[f"ort_pruned_median_s_b{batch}"] = median["full"], median["pruned"]
        out[f"ort_time_ratio_b{batch}"] = median["pruned"] / median["full"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--n", type=int, default=250, help="the task's batch")
    parser.add_argument(
        "--no-onnx",
        dest="onnx",
        action="store_false",
        help="skip the onnxruntime timings (exporting takes a minute per model)",
    )
    args = parser.parse_args()
    model = gpt2_shaped_model()
    patching, validation = acronym_batch(args.n)
    means = mean_activations(model, patching)
    model = model.to(args.device)
    seq = validation.shape[1]
    full_flops = model.flops(seq)
    rows = []
    print(
        f"device {args.device}; GPT-2-shaped model (random weights); prompts of {seq} tokens; "
        f"median of {args.repeats} runs after warm-up"
    )
    header = f"{'circuit':30}{'params':>8}{'FLOPs':>8}{'time b=1':>10}{'time b=' + str(args.n):>11}{'time/FLOPs':>12}"
    print(header + (f"{'ORT b=1':>9}{'ORT b=' + str(args.n):>10}" if args.onnx else ""))
    onnx_dir = tempfile.TemporaryDirectory(prefix="pruned-inference-onnx-")
    full_onnx = export(model, validation, Path(onnx_dir.name) / "full.onnx") if args.onnx else None
    for name, kept in circuits().items():
        pruned = prune(model.cpu(), kept, "mean", means).to(args.device)
        model = model.to(args.device)
        row = {
            "circuit": name,
            "kept_heads": len([c for c in kept if "." in c]),
            "kept_mlps": len([c for c in kept if c.startswith("MLP")]),
            "param_ratio": pruned.count_parameters()["parameters"] / model.count_parameters()["parameters"],
            "flop_ratio": pruned.flops(seq) / full_flops,
        }
        for batch in (1, args.n):
            tokens = validation[:batch].to(args.device)
            timings = {}
            for label, m in (("full", model), ("pruned", pruned)):
                timings[label] = time_forward(
                    lambda m=m: m(tokens, last_only=True), warmup=3, repeats=args.repeats, device=args.device
                )["median_s"]
            row[f"time_ratio_b{batch}"] = timings["pruned"] / timings["full"]
            row[f"full_median_s_b{batch}"], row[f"pruned_median_s_b{batch}"] = timings["full"], timings["pruned"]
        row["time_over_flop_ratio"] = row[f"time_ratio_b{args.n}"] / row["flop_ratio"]
        row["target_met"] = row["time_over_flop_ratio"] <= 1.25
        if args.onnx:
            row |= onnx_timings(
                full_onnx,
                export(pruned, validation, Path(onnx_dir.name) / "pruned.onnx"),
                validation,
                args.n,
                args.repeats,
            )
        rows.append(row)
        print(
            f"{name:30}{row['param_ratio']:>8.2f}{row['flop_ratio']:>8.2f}{row['time_ratio_b1']:>10.2f}"
            f"{row[f'time_ratio_b{args.n}']:>11.2f}{row['time_over_flop_ratio']:>12.2f}"
            + (f"{row['ort_time_ratio_b1']:>9.2f}{row[f'ort_time_ratio_b{args.n}']:>10.2f}" if args.onnx else "")
        )
    onnx_dir.cleanup()
    suffix = "" if args.device == "cpu" else f"-{args.device.split(':')[0]}"
    path = write_result(
        f"pruned_inference{suffix}",
        {
            "model": "GPT-2-shaped, random weights (seed 0)",
            "device": args.device,
            "seq_len": seq,
            "task_batch": args.n,
            "repeats": args.repeats,
            "rows": rows,
            "onnxruntime": f"CPU, {torch.get_num_threads()} intra-op threads (as torch)" if args.onnx else None,
            "target": "time ratio within 1.25x of the FLOP ratio at the task's batch",
        },
    )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
