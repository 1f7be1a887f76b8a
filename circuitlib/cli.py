"""Command line: `python -m circuitlib extract ...`, `python -m circuitlib evaluate DIR`, `... groundtruth PROGRAM`.

Errors in the input (a bad alpha, an unknown model, an occupied output folder, ...) end with one
line on stderr naming the problem and the fix, exit status 2, and nothing written.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from circuitlib.core.ablation import ABLATIONS
from circuitlib.discovery.greedy import METHODS, ORDERS
from circuitlib.studies.store import RunningElsewhere

MODELS = ("gpt2", "smollm2-135m", "tiny-gpt2")
TASKS = ("acronyms", "ioi", "greater-than", "ioi-mixed")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (argparse prints the whole usage first); subcommands inherit it."""

    def error(self, message: str):
        self.exit(2, f"error: {message} ({self.prog} --help lists the options)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m circuitlib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("extract", help="extract a task's circuit, prune the model and save both")
    ex.add_argument("--model", required=True, help=f"one of {', '.join(MODELS)}, or a local Hugging Face model folder")
    ex.add_argument(
        "--task",
        required=True,
        help=f"one of {', '.join(TASKS)}, or a task file: prompts and answers, one per row, in a "
        ".jsonl or .csv file (see examples/capitals.jsonl)",
    )
    ex.add_argument("--alpha", required=True, type=str, help="KL threshold, a number >= 0 (e.g. 0.01)")
    ex.add_argument("--ablation", default="mean", choices=ABLATIONS)
    ex.add_argument("--include-mlps", action="store_true", help="also consider MLPs for removal")
    ex.add_argument(
        "--order",
        default="heads-ascending",
        choices=ORDERS,
        help="head order inside a layer (default: the authors' code)",
    )
    ex.add_argument(
        "--method",
        default="fast",
        choices=METHODS,
        help="fast (exact, default) or plain (TransformerLens hooks; the slow reference)",
    )
    ex.add_argument("--seed", type=int, default=0, help="seed of the prompts (same seed, same circuit)")
    ex.add_argument(
        "--n", type=int, default=None, help="prompts per split (patching, validation, test); default: the paper's size"
    )
    ex.add_argument("--out", required=True, help="output folder (must be new or empty)")
    ex.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    ex.add_argument("--json", action="store_true", help="print circuit.json's summary as JSON")
    ex.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda or cuda:N")

    ev = sub.add_parser("evaluate", help="evaluate a saved pruned model on its own")
    ev.add_argument("run_dir")
    ev.add_argument("--split", default="validation", choices=("validation", "test"))
    ev.add_argument("--json", action="store_true", help="print a JSON object")

    xp = sub.add_parser("export", help="write a run's pruned model as ONNX, checked against torch with onnxruntime")
    xp.add_argument("run_dir")
    xp.add_argument("--format", required=True, choices=("onnx",))
    xp.add_argument("--out", default=None, help="the .onnx file to write (default: RUN_DIR/model.onnx)")
    xp.add_argument("--force", action="store_true", help="replace an existing file")
    _add_edges_parser(sub)

    _add_study_parser(sub)
    gt = sub.add_parser(
        "groundtruth",
        help="find the circuit of a Tracr-compiled RASP program and score it against the compiler's ground truth",
    )
    gt.add_argument(
        "program",
        help="a built-in program (reverse, xproportion, hist, sort_unique, shuffle_dyck2) "
        "or a .py file defining program, vocab and max_seq_len",
    )
    gt.add_argument("--method", default="greedy", choices=("greedy", "edges"))
    gt.add_argument(
        "--seed", type=int, default=0, help="seed of the inputs drawn per length (greedy) or of the training (edges)"
    )
    gt.add_argument("--alpha", type=str, default="0.001", help="greedy threshold (KL or squared error), default 0.001")
    gt.add_argument(
        "--ablation",
        default=None,
        choices=ABLATIONS,
        help="greedy: default mean; edges: zero only (the authors' Tracr setting)",
    )
    gt.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _add_study_parser(sub) -> None:
    st = sub.add_parser("study", help="run, resume and inspect a study declared in a YAML spec (studies/*.yml)")
    st_sub = st.add_subparsers(dest="study_command", required=True)
    run = st_sub.add_parser("run", help="compute the spec's pending units (finished ones are skipped)")
    run.add_argument("spec", help="the study spec, e.g. studies/book.yml")
    run.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local Dask workers, one torch thread each (default: one per core); 0 = serially",
    )
    run.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler (tcp://host:8786)")
    run.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1; recorded)")
    run.add_argument("--device", default=None, help="override the spec's device (cpu, cuda, cuda:N)")
    run.add_argument("--max-units", type=int, default=None, help="stop after this many units")
    run.add_argument(
        "--task", action="append", default=None, help="run only this task's units (repeatable); the others stay pending"
    )
    run.add_argument(
        "--ablation",
        action="append",
        default=None,
        choices=("mean", "zero"),
        help="run only this ablation scheme's units (repeatable)",
    )
    run.add_argument(
        "--include-mlps",
        action="append",
        default=None,
        choices=("true", "false"),
        help="run only the units with (true) or without (false) the MLPs as candidates (repeatable)",
    )
    for name, text in (
        ("status", "done / pending / failed / running units, time spent and left"),
        ("show", "the summary table of the finished units"),
    ):
        p = st_sub.add_parser(name, help=text)
        p.add_argument("spec")
        p.add_argument("--json", action="store_true", help="print JSON")
        if name == "status":
            p.add_argument("--workers", type=int, default=None, help="workers to assume for the time left")


def _study(args) -> int:
    from circuitlib.studies.runner import run_study, study_status, study_table, summary_table
    from circuitlib.studies.spec import load_spec

    spec = load_spec(args.spec)
    if args.study_command == "run":
        if args.workers is not None and args.workers < 0:
            raise ValueError(f"--workers must be >= 0 (0 runs serially), got {args.workers}")
        if args.max_units is not None and args.max_units < 1:
            raise ValueError(f"--max-units must be >= 1, got {args.max_units}")
        result = run_study(
            spec,
            workers=args.workers,
            scheduler=args.scheduler,
            threads=args.threads,
            device=args.device,
            max_units=args.max_units,
            tasks=args.task,
            ablations=args.ablation,
            include_mlps=None if args.include_mlps is None else [v == "true" for v in args.include_mlps],
        )
        status = study_status(spec, args.workers)
        print(
            f"study {spec.name}: {len(result['done'])} units computed, {len(result['failed'])} failed now; "
            f"{status['done']}/{status['units']} done in {spec.store}"
        )
        for r in result["quarantined"]:
            print(
                f"  quarantined: {r['label']}: {r['reason']}; moved to {r['to']} (with the reason beside it), "
                "the unit is pending again"
            )
        for r in result["failed"]:
            print(f"  failed: {r['label']}: {r['error']} (retried by the next run)")
        for r in result["elsewhere"]:
            print(f"  left to another run that claimed it meanwhile: {r['label']} ({r['by']})")
        return 1 if result["failed"] else 0
    if args.study_command == "status":
        status = study_status(spec, args.workers)
        if args.json:
            print(json.dumps(status))
            return 0
        left = status["seconds_left_estimate"]
        print(
            f"study {status['study']} ({status['store']}): {status['done']} done, {status['running']} running, "
            f"{status['failed']} failed, "
            + (
                f"{status['damaged']} damaged (unreadable files; the next run recomputes them), "
                if status["damaged"]
                else ""
            )
            + f"{status['pending']} pending"
            + (
                f" ({status['quarantined']} not done after their unreadable files went to quarantine/)"
                if status["quarantined"]
                else ""
            )
            + f" of {status['units']} units; "
            f"{status['seconds_spent'] / 3600:.2f} h spent"
            + (
                f" ({status['cpu_seconds_spent'] / 3600:.2f} CPU-hours in the {status['units_with_cpu_seconds']} "
                "units that record it)"
                if status["units_with_cpu_seconds"]
                else ""
            )
            + "; about "
            + (
                f"{left / 3600:.2f} h left with {status['workers_assumed']} workers, a core each"
                if left is not None
                else "? h left (no unit finished yet)"
            )
        )
        for u in status["unit_states"]:
            extra = u.get("error") or (
                (
                    f"{u['progress']} candidates"
                    if u["progress"]
                    else "starting (no candidate evaluated by this run yet)"
                )
                + f", updated {u['updated_s_ago']} s ago"
                if u["state"] == "running"
                else ""
            )
            if u.get("quarantined"):
                extra += " (its unreadable file was moved to quarantine/)"
            if u.get("saved"):
                extra += (
                    f" ({u['saved']} saved)"
                    if u["state"] == "running"
                    else f" (resumes after {u['saved']}, saved by an earlier run)"
                )
            print(f"  {u['state']:8} {u['key']}  {u['unit']}  {extra}")
        if status["other_units_in_store"]:
            print(f"  ({status['other_units_in_store']} units of other settings are in the store and left out)")
        return 0
    damaged: dict = {}
    table = summary_table(study_table(spec, damaged))
    for key, reason in damaged.items():
        print(
            f"left out: {reason}; `python -m circuitlib study run {args.spec}` moves it to quarantine/ and "
            "computes the unit again",
            file=sys.stderr,
        )
    if args.json:
        print(table.to_json(orient="records"))
    elif not len(table):
        print(f"study {spec.name}: no finished unit yet (python -m circuitlib study run {args.spec})")
    else:
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_rows", 500, "display.max_columns", 20):
            print(table.round(4).to_string(index=False))
    return 0


def _summary(result) -> str:
    m, s = result.metrics, result.settings
    lines = [
        f"model {s['model']} · task {s['task']} · alpha {s['alpha']:g} · {s['ablation']} ablation · "
        f"MLPs {'included' if s['include_mlps'] else 'kept'} · seed {s['seed']} · n {s['n']}",
        f"{'':10}{'accuracy (val/test)':>22}{'KL (val/test)':>22}{'parameters':>14}",
    ]
    for name in ("full", "pruned"):
        r = m[name]
        lines.append(
            f"{name:10}{r['validation']['accuracy']:>11.3f}/{r['test']['accuracy']:<10.3f}"
            f"{r['validation']['kl']:>11.4f}/{r['test']['kl']:<10.4f}{r['n_params']['parameters']:>14,}"
        )
    lines.append(f"kept heads ({len(result.circuit.kept_heads)}): {' '.join(result.circuit.kept_heads)}")
    if s["include_mlps"]:
        lines.append(f"kept MLPs: {result.circuit.kept_mlps}")
    lines.append(
        f"parameter reduction {m['parameter_reduction']:.2%} (plus "
        f"{m['pruned']['n_params']['ablation_bias']:,} mean-ablation bias elements); "
        f"extraction took {m['extraction_seconds']:.1f} s"
    )
    return "\n".join(lines)


def _add_edges_parser(sub) -> None:
    ed = sub.add_parser("edges", help="find an edge circuit by Edge Pruning, prune the model to its nodes, save both")
    ed.add_argument("--model", required=True, help=f"one of {', '.join(MODELS)}, or a local Hugging Face model folder")
    ed.add_argument(
        "--task", required=True, help=f"one of {', '.join(TASKS)}, or a task file (.jsonl or .csv, as for extract)"
    )
    ed.add_argument(
        "--target-sparsity", required=True, type=str, help="fraction of edges to remove, in [0, 1) (e.g. 0.95)"
    )
    ed.add_argument("--steps", type=int, default=3000, help="training steps (default: the authors' 3000)")
    ed.add_argument(
        "--ablation",
        default="mean",
        choices=("mean", "zero", "corrupted"),
        help="what a closed edge passes: the writer's patching-set mean (default), zero, or its "
        "output on another prompt of the split (corrupted)",
    )
    ed.add_argument(
        "--node-target-sparsity",
        type=str,
        default=None,
        help="also gate nodes, with this target: the fraction of nodes to remove, in [0, 1) (default: edges only)",
    )
    ed.add_argument("--lr", type=float, default=0.8, help="learning rate of the gates (default 0.8)")
    ed.add_argument("--reg-lr", type=float, default=0.8, help="learning rate of the Lagrange multipliers")
    ed.add_argument("--warmup", type=int, default=None, help="steps to ramp the target up (default 5/6 of --steps)")
    ed.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="prompts per step, at most --n (default 32, or all of them if --n is smaller)",
    )
    ed.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the gates")
    ed.add_argument("--n", type=int, default=None, help="prompts per split; default: the paper's size")
    ed.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ed.add_argument("--out", required=True, help="output folder (must be new or empty)")
    ed.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    ed.add_argument("--json", action="store_true", help="print the result's summary as JSON")


def _edges(args) -> int:
    from pathlib import Path

    import torch

    from circuitlib.core.io import check_out_dir
    from circuitlib.discovery.edges.train import check_sparsity
    from circuitlib.pipeline.edges import EdgeConfig, run_edges
    from circuitlib.tasks import get_task

    task = get_task(args.task)  # an unknown name or a bad task file: refused first
    target = check_sparsity(args.target_sparsity, "--target-sparsity")
    node_target = (
        None
        if args.node_target_sparsity is None
        else check_sparsity(args.node_target_sparsity, "--node-target-sparsity")
    )
    n = args.n if args.n is not None else task.default_n
    # the authors' batch of 32, or all the prompts if fewer; every other setting is checked by EdgeConfig
    batch_size = args.batch_size if args.batch_size is not None else min(32, n) if n > 0 else 32
    config = EdgeConfig(
        args.task,
        target,
        args.steps,
        ablation=args.ablation,
        seed=args.seed,
        n=n,
        batch_size=batch_size,
        lr=args.lr,
        reg_lr=args.reg_lr,
        warmup=args.warmup,
        node_target_sparsity=node_target,
    )
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asked for, but CUDA is not available here; use cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device!r} is not supported; use cpu or cuda")
    check_out_dir(Path(args.out), args.force)
    run = run_edges(args.model, config, device=str(device))
    out = run.save(args.out, force=args.force)
    r, m = run.result, run.result.metrics
    if args.json:
        print(
            json.dumps(
                {
                    "out": str(out),
                    "settings": r.settings,
                    "metrics": m,
                    "n_edges": len(r.edges),
                    "n_edges_total": r.n_edges_total,
                    "nodes": r.nodes,
                }
            )
        )
        return 0
    s = r.settings
    print(
        f"model {s['model']} · task {s['task']} · edge pruning, target sparsity {s['target_sparsity']:g} · "
        f"{s['steps']} steps · {s['ablation']} ablation · seed {s['seed']} · n {s['n']}"
    )
    print(f"{'':14}{'accuracy (val/test)':>22}{'KL (val/test)':>22}")
    for name in ("full", "edge_circuit", "pruned_model"):
        v, t = m[name]["validation"], m[name]["test"]
        print(f"{name:14}{v['accuracy']:>11.3f}/{t['accuracy']:<10.3f}{v['kl']:>11.4f}/{t['kl']:<10.4f}")
    print(
        f"edges kept {len(r.edges):,} of {r.n_edges_total:,} (sparsity {r.sparsity:.4f}); nodes kept {len(r.nodes)}: "
        f"{' '.join(r.nodes)}"
    )
    if m.get("training_edge_sparsity") is not None:  # the authors' read-off: the training's size
        print(
            f"the training chose sparsity {m['training_edge_sparsity']:.4f}: {m['n_edges_thresholded']:,} edges "
            f"thresholded, {len(r.edges):,} after dead nodes are dropped"
        )
    print(
        f"pruned model: {m['n_params']['pruned']['parameters']:,} parameters "
        f"({m['parameter_reduction']:.2%} fewer), {m['edges_among_kept_nodes']:,} edges among its nodes; "
        f"training took {m['training_seconds']:.1f} s ({m['seconds_per_step']:.3f} s/step"
        + (f", {m['training_cpu_seconds']:.1f} s of CPU)" if m.get("training_cpu_seconds") is not None else ")")
    )
    print(f"saved to {out}")
    return 0


def _one_line(text: str) -> str:
    """A message of several lines (a YAML parser's, say) as one: its lines joined by "; "."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job's end, `kill`), handled as Ctrl-C is: claims released, nothing half-written."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return _main(args)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(args) -> int:
    try:
        if args.command == "edges":
            return _edges(args)
        if args.command == "study":
            return _study(args)
        if args.command == "groundtruth":
            return _groundtruth(args)
        if args.command == "extract":
            from pathlib import Path

            from circuitlib.core.io import check_out_dir
            from circuitlib.discovery.greedy import check_alpha
            from circuitlib.pipeline.extraction import ExtractionConfig, run_extraction

            alpha = check_alpha(args.alpha)
            check_out_dir(Path(args.out), args.force)
            if args.n is not None and args.n < 1:
                raise ValueError(f"--n must be a positive number of prompts, got {args.n}")
            config = ExtractionConfig(
                args.model,
                args.task,
                alpha=alpha,
                ablation=args.ablation,
                include_mlps=args.include_mlps,
                seed=args.seed,
                n=args.n,
                order=args.order,
                method=args.method,
            )
            result = run_extraction(config, device=args.device)
            out = result.save(args.out, force=args.force)
            if args.json:
                print(
                    json.dumps(
                        {
                            "out": str(out),
                            "settings": result.settings,
                            "metrics": result.metrics,
                            "kept_heads": result.circuit.kept_heads,
                            "kept_mlps": result.circuit.kept_mlps,
                        }
                    )
                )
            else:
                print(_summary(result))
                print(f"saved to {out}")
        elif args.command == "export":
            from circuitlib.pipeline.export import export_onnx

            report = export_onnx(args.run_dir, args.out, force=args.force)
            print(
                f"wrote {report['path']} ({report['bytes'] / 2**20:.1f} MiB, opset {report['opset']}, batch dynamic, "
                f"{report['seq_len']} tokens); onnxruntime {report['onnxruntime']} on the {report['n']} test prompts: "
                f"max abs logit difference {report['max_abs_diff']:.2e}, same argmax on "
                f"{report['argmax_agreement']:.1%}"
            )
        else:
            from circuitlib.pipeline.extraction import evaluate_saved

            report = evaluate_saved(args.run_dir, args.split)
            if args.json:
                print(json.dumps(report))
            else:
                print(
                    f"{report['model']} · {report['task']} · {report['split']} split ({report['n']} prompts): "
                    f"accuracy {report['accuracy']:.3f}, KL {report['kl']:.4f}, "
                    f"{report['n_params']['parameters']:,} parameters, kept heads {' '.join(report['kept_heads'])}"
                )
    except (ValueError, FileExistsError, FileNotFoundError, RunningElsewhere) as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        from circuitlib.core.memory import allocation_failure_reason, is_allocation_failure

        if not is_allocation_failure(e):
            raise
        print(
            f"error: ran out of memory ({allocation_failure_reason(e)}); nothing was written; lower --n "
            "(or --batch-size)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as e:
        by = " by SIGTERM" if isinstance(e, Terminated) else ""
        _close_progress_bars()  # a bar left open would redraw itself below the message when collected
        print(f"interrupted{by}: nothing half-written was left behind (finished results are kept)", file=sys.stderr)
        return 143 if by else 130
    return 0


def _close_progress_bars() -> None:
    """Close every progress bar still open (a computation cut off), so that nothing is printed after the
    interruption's one line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _groundtruth(args) -> int:
    from circuitlib.discovery.greedy import check_alpha
    from circuitlib.pipeline.groundtruth import groundtruth_report

    report = groundtruth_report(args.program, args.method, args.seed, check_alpha(args.alpha), args.ablation)
    if args.json:
        print(json.dumps(report))
        return 0
    if args.method == "edges":
        missed = [e for e in report["truth_edges"] if e not in report["found_edges"]]
        extra = [e for e in report["found_edges"] if e not in report["truth_edges"]]
        sc = report["edge_scores"]
        print(
            f"{report['program']} · Edge Pruning (the authors' Tracr settings, zero ablation, "
            f"seed {report['seed']}; {report['seconds']:.1f} s)"
        )
        print(f"true edges ({len(report['truth_edges'])}): {', '.join(report['truth_edges'])}")
        print(f"found ({len(report['found_edges'])}): {', '.join(report['found_edges']) or '(nothing)'}")
        print(
            f"exact: {report['exact']}; precision {sc['precision']:.2f}, recall {sc['recall']:.2f}; missed: "
            f"{', '.join(missed) or '-'}; extra: {', '.join(extra) or '-'}; accuracy of the circuit "
            f"{report['accuracy']:.3f} (training length), {report['accuracy_all_lengths']:.3f} (every length)"
        )
        return 0
    missed = [c for c in report["truth_components"] if c not in report["found_components"]]
    extra = [c for c in report["found_components"] if c not in report["truth_components"]]
    print(
        f"{report['program']} · {report['method']} ({report['ablation']} ablation, alpha {report['alpha']:g}, "
        f"seed {report['seed']})"
    )
    print(f"truth:  {' '.join(report['truth_components'])}")
    print(f"found:  {' '.join(report['found_components']) or '(nothing)'}")
    print(
        f"exact: {report['exact']}; TPR {report['tpr']:.2f}, FPR {report['fpr']:.2f}; "
        f"missed: {' '.join(missed) or '-'}; extra: {' '.join(extra) or '-'}; "
        f"accuracy of the circuit over the input space {report['accuracy']:.3f}"
    )
    print(f"true edges ({len(report['truth_edges'])}): {', '.join(report['truth_edges'])}")
    return 0
