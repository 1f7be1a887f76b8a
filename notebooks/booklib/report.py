"""Small display helpers for the book's notebooks: provenance, comparison tables, predictions.

Every helper returns either a string, a pandas DataFrame or an object that Jupyter displays
(through ``_repr_html_`` / ``_repr_markdown_``), so a notebook cell stays one line long and the
numbers shown are computed, never typed. Outputs are deterministic (no random ids, no
timestamps), so re-running a notebook with the same settings gives the same bytes.

* :func:`provenance` / :func:`provenance_markdown` - the "made with" box: model, task, alpha,
  ablation, include_mlps, n, seed and the circuitlib version and git commit.
* :func:`comparison_table` - full vs pruned model: accuracy and KL on validation and test,
  parameters, mean-ablation bias elements and FLOPs per prompt, with the pruned/full ratio.
* :func:`examples_table` - a few prompts of a split with their answers and token counts.
* :func:`top_predictions` - a model's top-k next tokens (with probabilities) for a few prompts.
* :func:`important_heads` / :func:`attention_summary` - which kept heads to look at, and where
  their last position attends on average.
"""

from __future__ import annotations

import html
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import torch

from circuitlib.version import __version__

__all__ = [
    "PROVENANCE_KEYS",
    "circuitlib_commit",
    "provenance_markdown",
    "provenance",
    "Provenance",
    "comparison_table",
    "examples_table",
    "top_predictions",
    "token_strings",
    "important_heads",
    "attention_summary",
]

# The settings a result depends on, in the order the provenance box lists them.
PROVENANCE_KEYS = ("model", "task", "alpha", "ablation", "include_mlps", "n", "seed")

_REPO = Path(__file__).resolve().parents[2]


@lru_cache(maxsize=1)
def circuitlib_commit() -> str:
    """The git commit circuitlib was loaded from, e.g. ``"963e1c3"``.

    Adds ``" + local changes"`` when files under ``circuitlib/`` or ``notebooks/booklib/`` differ from that commit
    (modified or new), since the outputs then come from code that is not in the commit.
    Returns ``"unknown"`` when circuitlib is not inside a git checkout or git is missing.
    """

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            raise OSError(done.stderr.strip())
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "circuitlib", "notebooks/booklib")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + (" + local changes" if changed else "")


def _format_value(key: str, value) -> str:
    if key == "alpha" and isinstance(value, (int, float)):
        return f"{value:g}"
    return str(value)


def _rows(settings: Mapping, extra: Mapping | None) -> list[tuple[str, str]]:
    missing = [k for k in PROVENANCE_KEYS if k not in settings]
    if missing:
        raise ValueError(
            f"settings lack {missing}; pass a dict with {', '.join(PROVENANCE_KEYS)} (e.g. Extraction.settings)"
        )
    rows = [(k, _format_value(k, settings[k])) for k in PROVENANCE_KEYS]
    rows += [(str(k), str(v)) for k, v in (extra or {}).items()]
    rows.append(("circuitlib", f"{__version__} (commit {circuitlib_commit()})"))
    return rows


def provenance_markdown(settings: Mapping, extra: Mapping | None = None) -> str:
    """One Markdown line saying which model and settings made a page's results.

    settings: a dict with at least ``PROVENANCE_KEYS`` (``Extraction.settings`` has them all);
    extra:    more ``name: value`` pairs to list after them (e.g. ``{"device": "cpu"}``).
    """
    parts = [f"{k} = `{v}`" for k, v in _rows(settings, extra)]
    return "**Made with:** " + ", ".join(parts)


class Provenance:
    """The "made with" box; displays as a framed HTML table (and as Markdown where HTML is not shown)."""

    def __init__(self, settings: Mapping, extra: Mapping | None = None):
        self.rows = _rows(settings, extra)
        self.settings, self.extra = dict(settings), dict(extra or {})

    def _repr_markdown_(self) -> str:
        return provenance_markdown(self.settings, self.extra)

    def _repr_html_(self) -> str:
        cells = "".join(
            f'<tr><th style="text-align:left;padding:1px 12px 1px 0">{html.escape(k)}</th>'
            f'<td style="text-align:left;padding:1px 0"><code>{html.escape(v)}</code></td></tr>'
            for k, v in self.rows
        )
        return (
            '<div class="circuitlib-provenance" style="border:1px solid #0072B2;border-left-width:4px;'
            'border-radius:4px;padding:6px 12px;margin:8px 0;font-size:0.9em">'
            "<strong>Made with</strong>"
            f'<table style="border:none;margin:4px 0 0 0">{cells}</table></div>'
        )

    def __repr__(self) -> str:
        return "Made with: " + ", ".join(f"{k}={v}" for k, v in self.rows)


def provenance(settings: Mapping, extra: Mapping | None = None) -> Provenance:
    """The "made with" box for a notebook cell (see :class:`Provenance`, :func:`provenance_markdown`)."""
    return Provenance(settings, extra)


# ---------------------------------------------------------------------------------------------
# tables


def _ratio(pruned: float, full: float) -> str:
    return f"{pruned / full:.3f}" if full else "-"


def comparison_table(extraction, formatted: bool = True):
    """Full vs pruned model of one extraction, as a pandas DataFrame.

    Rows: accuracy and KL(full || model) on the validation and test splits, parameters (without
    embeddings, as in the paper), elements of the mean-ablation bias buffers (not counted by the
    paper's authors), and FLOPs of one prompt (``Transformer.flops(seq_len)``, last position
    only). Columns: ``full``, ``pruned`` and ``pruned / full`` (for the sizes and FLOPs).
    ``formatted=False`` gives the raw numbers (floats and ints), ``True`` strings for display.
    """
    import pandas as pd

    m = extraction.metrics
    seq_len = extraction.data.validation.tokens.shape[1]
    flops = {"full": extraction.full.flops(seq_len), "pruned": extraction.pruned.flops(seq_len)}
    rows = []
    for split in ("validation", "test"):
        rows.append((f"accuracy ({split})", m["full"][split]["accuracy"], m["pruned"][split]["accuracy"], None))
        rows.append((f"KL to full ({split})", m["full"][split]["kl"], m["pruned"][split]["kl"], None))
    for label, key in (("parameters", "parameters"), ("ablation-bias elements", "ablation_bias")):
        full, pruned = m["full"]["n_params"][key], m["pruned"]["n_params"][key]
        rows.append((label, full, pruned, pruned / full if full else None))
    rows.append(
        (f"FLOPs per prompt ({seq_len} tokens)", flops["full"], flops["pruned"], flops["pruned"] / flops["full"])
    )
    table = pd.DataFrame(rows, columns=["", "full", "pruned", "pruned / full"]).set_index("")
    if not formatted:
        return table

    def fmt(label: str, value) -> str:
        if value is None:
            return "-"
        if label.startswith("accuracy"):
            return f"{value:.3f}"
        if label.startswith("KL"):
            return f"{value:.4f}"
        return f"{int(value):,}"

    out = pd.DataFrame(index=table.index, columns=table.columns, dtype=object)
    for label in table.index:
        out.loc[label, "full"] = fmt(label, table.loc[label, "full"])
        out.loc[label, "pruned"] = fmt(label, table.loc[label, "pruned"])
        ratio = table.loc[label, "pruned / full"]
        out.loc[label, "pruned / full"] = "-" if ratio is None or ratio != ratio else f"{ratio:.3f}"
    return out


def token_strings(tokenizer, ids: Sequence[int] | torch.Tensor) -> list[str]:
    """Token ids -> the tokens as readable strings (GPT-2 style "Ġ" shown as a space)."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return [t.replace("Ġ", " ").replace("Ċ", "\\n") for t in tokenizer.convert_ids_to_tokens(ids)]


def examples_table(split, tokenizer, k: int = 5):
    """The first `k` prompts of a `TaskSplit`: prompt, expected answer, number of tokens.

    For tasks with several correct answers (greater-than) the answer column lists them all.
    """
    import pandas as pd

    rows = []
    for i in range(min(k, len(split))):
        if split.candidates is not None:
            accepted = split.candidates[split.accepted[i]].tolist()
            answer = " | ".join(repr(tokenizer.decode([t])) for t in accepted)
        else:
            answer = repr(tokenizer.decode([int(split.answers[i])]))
        rows.append({"prompt": split.prompts[i], "correct next token": answer, "tokens": int(split.tokens.shape[1])})
    return pd.DataFrame(rows)


@torch.inference_mode()
def top_predictions(model, tokenizer, task, split, n_prompts: int = 2, k: int = 5):
    """A model's `k` most likely next tokens for the first `n_prompts` prompts of a split.

    One row per prompt: the prompt, whether the argmax is correct for `task`, and the top-k
    tokens as ``'token' (probability)``.
    """
    import pandas as pd

    sub = split[:n_prompts]
    logits = model(sub.tokens, last_only=True)  # [n_prompts, V]
    top = logits.softmax(-1).topk(k, dim=-1)
    correct = task.correct(sub, logits)
    out = []
    for i in range(len(sub)):
        preds = [f"{tokenizer.decode([int(t)])!r} ({p:.2f})" for t, p in zip(top.indices[i], top.values[i].tolist())]
        out.append(
            {
                "prompt": sub.prompts[i],
                "argmax correct": bool(correct[i]),
                **{f"top {j + 1}": p for j, p in enumerate(preds)},
            }
        )
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------
# heads worth looking at


def important_heads(circuit, k: int = 4) -> list[str]:
    """The `k` kept heads whose ablation raised the KL the most when Algorithm 1 tested them.

    circuit: an ``extract.Circuit``; heads are returned as "L.H", most important first.
    """
    kept = [d for d in circuit.decisions if not d.pruned and not d.component.startswith("MLP")]
    return [d.component for d in sorted(kept, key=lambda d: -d.delta)][:k]


@torch.inference_mode()
def attention_summary(model, tokenizer, tokens: torch.Tensor, heads: Sequence[str], example: int = 0):
    """Where the last position of each head looks, averaged over prompts of one template.

    tokens: [n, S] prompts of one task (same template, so position s plays the same role in
    every prompt); heads: names "L.H" of heads the model has. One row per head: the source
    position the last position attends to most on average, the token at that position in
    prompt `example`, the mean attention weight there and the mean weight on the first token
    (where heads that have nothing to do often park their attention).
    """
    import pandas as pd

    heads = list(heads)
    if not heads:
        return pd.DataFrame(
            columns=["head", "position", "token (example prompt)", "mean weight", "weight on first token"]
        )
    last = model.attention_patterns(tokens, heads)[:, :, -1, :].mean(0)  # [len(heads), S]
    words = token_strings(tokenizer, tokens[example])
    rows = []
    for name, row in zip(heads, last):
        pos = int(row.argmax())
        rows.append(
            {
                "head": name,
                "position": pos,
                "token (example prompt)": repr(words[pos]),
                "mean weight": round(float(row[pos]), 3),
                "weight on first token": round(float(row[0]), 3),
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# results sentences computed from the numbers they describe (the benchmark and performance pages)

# The paper's Table 3 (appendix E): GPT-2 Small, mean ablation, means over five batches of
# prompts. Accuracy and parameter reduction are also its Table 1. Percentages as printed.
PAPER_TABLE_3 = (
    {
        "task": "acronyms",
        "alpha": 8.86e-2,
        "mlps": False,
        "accuracy": 99.92,
        "param_reduction": 32.88,
        "time_reduction": 83.56,
    },
    {
        "task": "acronyms",
        "alpha": 3.50e-2,
        "mlps": True,
        "accuracy": 78.64,
        "param_reduction": 63.70,
        "time_reduction": 86.20,
    },
    {
        "task": "ioi",
        "alpha": 8.53e-3,
        "mlps": False,
        "accuracy": 100.00,
        "param_reduction": 28.66,
        "time_reduction": 57.58,
    },
    {
        "task": "ioi",
        "alpha": 1.88e-2,
        "mlps": True,
        "accuracy": 96.53,
        "param_reduction": 72.31,
        "time_reduction": 82.78,
    },
    {
        "task": "greater-than",
        "alpha": 8.53e-2,
        "mlps": False,
        "accuracy": 100.00,
        "param_reduction": 32.65,
        "time_reduction": 77.78,
    },
    {
        "task": "greater-than",
        "alpha": 8.53e-2,
        "mlps": True,
        "accuracy": 99.84,
        "param_reduction": 82.77,
        "time_reduction": 88.33,
    },
)
# The full GPT-2 Small's accuracy on the validation prompts in the paper.
PAPER_FULL_ACCURACY = {"acronyms": 0.906, "ioi": 0.971, "greater-than": 1.0}


def _latex_alpha(a: float) -> str:
    mantissa, exponent = f"{a:.2e}".split("e")
    return f"${mantissa} \\cdot 10^{{{int(exponent)}}}$"


def paper_table_3_markdown() -> str:
    """The paper's Table 3 as a Markdown table (from :data:`PAPER_TABLE_3`)."""
    names = {"acronyms": "acronyms", "ioi": "IOI", "greater-than": "greater-than"}
    lines = [
        "| task | $\\alpha$ | MLPs removable | accuracy (%) | parameter reduction (%) | time reduction (%) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in PAPER_TABLE_3:
        lines.append(
            f"| {names[r['task']]} | {_latex_alpha(r['alpha'])} | {'yes' if r['mlps'] else 'no'} | "
            f"{r['accuracy']:.2f} | {r['param_reduction']:.2f} | {r['time_reduction']:.2f} |"
        )
    return "\n".join(lines)


def paper_range(key: str, mlps: bool) -> tuple[float, float]:
    """(min, max) of a Table 3 column over the heads-only (`mlps=False`) or heads-and-MLPs rows."""
    values = [r[key] for r in PAPER_TABLE_3 if r["mlps"] == mlps]
    return min(values), max(values)


def round_significant(x: float, digits: int = 3) -> float:
    """`x` rounded to `digits` significant digits (0.12328 -> 0.123), as the paper prints its alphas."""
    return float(f"{x:.{digits - 1}e}")


def threshold_origin(
    task: str, include_mlps: bool, alpha: float, chosen: Mapping | None = None, ablation: str = "mean", digits: int = 3
) -> str:
    """Where a Table 1 threshold comes from, for one task and configuration.

    "paper" when `alpha` is GPT-2 Small's threshold in the paper's Table 1 for this task and
    configuration; "rule" when it is the selection rule's pick for them (`chosen`, as returned by
    :func:`circuitlib.studies.analysis.choose_alpha`), exactly or rounded to `digits` significant digits; "paper, rule"
    for both; "" for neither (a threshold that belongs to the other configuration or another list).
    """

    def close(a, b):
        return abs(a - b) <= 1e-9 * max(abs(a), abs(b))

    origins = []
    if any(r["task"] == task and r["mlps"] == include_mlps and close(r["alpha"], alpha) for r in PAPER_TABLE_3):
        origins.append("paper")
    pick = (chosen or {}).get((task, ablation, include_mlps))
    if pick is not None and (close(pick, alpha) or close(round_significant(pick, digits), alpha)):
        origins.append("rule")
    return ", ".join(origins)


def compare_to_flops(time_ratio: float, flop_ratio: float, tolerance: float = 0.05) -> str:
    """How a time ratio relates to its FLOP ratio (both pruned / full): the words a sentence uses.

    "more than" FLOPs (time fell more: time ratio below the FLOP ratio by more than `tolerance`
    of it), "less than" FLOPs, or "in proportion to" FLOPs (within the tolerance).
    """
    if time_ratio < flop_ratio * (1 - tolerance):
        return "more than"
    if time_ratio > flop_ratio * (1 + tolerance):
        return "less than"
    return "in proportion to"


def _span(values, fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)} to {format(hi, fmt)}"


def _count(words: list[str], which: str) -> str:
    return f"{sum(w == which for w in words)} of {len(words)}"


def benchmark_findings(rows: Sequence[Mapping], tolerance: float = 0.05) -> str:
    """The benchmark page's findings, as Markdown computed from its table's rows.

    rows: dicts with "MLP" (bool), "param reduction %", "FLOP ratio", "time ratio, batch 1",
    "time ratio, batch <n>" (one other batch), "layers without heads" and "layers". Every
    number and every "more"/"less" in the text is derived here from those values, and
    tests/book/test_results_prose.py re-derives them from the notebook's stored data.
    """
    rows = list(rows)
    if not rows:
        return "(no rows)"
    big = next(k for k in rows[0] if k.startswith("time ratio, batch ") and not k.endswith(" 1"))
    n_big = big.rsplit(" ", 1)[1]
    out = []
    for mlps, label in ((False, "heads only"), (True, "heads and MLPs")):
        sel = [r for r in rows if bool(r["MLP"]) == mlps]
        if not sel:
            continue
        w1 = [compare_to_flops(r["time ratio, batch 1"], r["FLOP ratio"], tolerance) for r in sel]
        wn = [compare_to_flops(r[big], r["FLOP ratio"], tolerance) for r in sel]
        cut_time = 100 * (1 - min(min(r["time ratio, batch 1"], r[big]) for r in sel))
        cut_flops = 100 * (1 - min(r["FLOP ratio"] for r in sel))
        p_lo, p_hi = paper_range("param_reduction", mlps)
        t_lo, t_hi = paper_range("time_reduction", mlps)
        out.append(
            f"- **{label}** ({len(sel)} rows): {_span([r['param reduction %'] for r in sel], '.1f')} % fewer "
            f"parameters, FLOP ratio {_span([r['FLOP ratio'] for r in sel], '.3f')}, time ratio "
            f"{_span([r['time ratio, batch 1'] for r in sel], '.3f')} at batch 1 and "
            f"{_span([r[big] for r in sel], '.3f')} at batch {n_big}. Time fell more than FLOPs in "
            f"{_count(w1, 'more than')} rows at batch 1 and {_count(wn, 'more than')} at batch {n_big}, "
            f"less than FLOPs in {_count(w1, 'less than')} and {_count(wn, 'less than')}, in proportion "
            f"(within {100 * tolerance:.0f} %) in the others. The largest time cut measured is "
            f"{cut_time:.0f} %, the largest FLOP cut {cut_flops:.0f} %. The paper's {label} rows: "
            f"{p_lo:.2f} to {p_hi:.2f} % fewer parameters and {t_lo:.2f} to {t_hi:.2f} % less time."
        )
    faster = [
        r
        for r in rows
        if compare_to_flops(r["time ratio, batch 1"], r["FLOP ratio"], tolerance) == "more than"
        or compare_to_flops(r[big], r["FLOP ratio"], tolerance) == "more than"
    ]
    if faster:
        empty = [r["layers without heads"] for r in faster]
        out.append(
            f"\nIn the {len(faster)} row(s) where time fell more than FLOPs, {_span(empty, 'd')} of the "
            f"{rows[0]['layers']} layers had lost every head. Such a layer skips its whole attention block "
            "(a normalisation, the projections, the scores and their softmax: several operations, "
            "each with a cost per call "
            "that does not depend on the FLOPs it does), and on small inputs those costs weigh more than the "
            "arithmetic. A FLOP count, which counts multiply-adds only, cannot see them: where time fell more "
            "than FLOPs, the difference is in such costs, not in arithmetic saved."
        )
    heads_only = [r for r in rows if not r["MLP"]]
    if heads_only:
        paper = [r for r in PAPER_TABLE_3 if not r["mlps"]]
        paper_gap = [r["time_reduction"] - r["param_reduction"] for r in paper]
        our_gap = [100 * (r["FLOP ratio"] - min(r["time ratio, batch 1"], r[big])) for r in heads_only]
        out.append(
            f"\nFor its heads-only models the paper reports time cuts {_span(paper_gap, '.0f')} points larger than "
            f"their parameter cuts (Table 3, row by row). Here, on the machine named above, the heads-only rows' "
            f"largest time cut (at batch 1 or {n_big}) "
            + (
                f"exceeds their FLOP cut by {_span(our_gap, '.0f')} points. "
                if min(our_gap) > 0
                else f"falls short of their FLOP cut by {_span([-g for g in our_gap], '.0f')} points. "
                if max(our_gap) < 0
                else f"differs from their FLOP cut by {_span(our_gap, '+.0f')} points (positive: larger). "
            )
            + "What the authors' timer measures, and what each of its choices does to a measured ratio, is on the "
            "{doc}`performance page <09_performance>`."
        )
    return "\n".join(out)


def time_vs_flops_findings(rows: Sequence[Mapping], batch: int, tolerance: float = 0.05) -> str:
    """The performance page's findings on pruned models, as Markdown computed from the result rows.

    rows: the rows of benchmarks/results/pruned_inference.json ("circuit", "flop_ratio",
    "time_ratio_b1", "time_ratio_b<batch>").
    """
    out = []
    for r in rows:
        w1 = compare_to_flops(r["time_ratio_b1"], r["flop_ratio"], tolerance)
        wb = compare_to_flops(r[f"time_ratio_b{batch}"], r["flop_ratio"], tolerance)
        out.append(
            f"- **{r['circuit']}** (FLOP ratio {r['flop_ratio']:.3f}): at batch 1 time fell {w1} FLOPs "
            f"(time ratio {r['time_ratio_b1']:.3f}); at batch {batch} it fell {wb} FLOPs "
            f"({r[f'time_ratio_b{batch}']:.3f})."
        )
    ratios = [r[f"time_ratio_b{batch}"] / r["flop_ratio"] for r in rows]
    ones = [r["time_ratio_b1"] / r["flop_ratio"] for r in rows]
    out.append(
        f"\nAt batch {batch}, time / FLOPs is {_span(ratios, '.2f')} over the {len(rows)} circuits; at batch 1 "
        f"it is {_span(ones, '.2f')}. "
        + (
            "The large batch follows the FLOP count more closely than batch 1: "
            if max(abs(x - 1) for x in ratios) < max(abs(x - 1) for x in ones)
            else "Batch 1 follows the FLOP count at least as closely as the large batch: "
        )
        + "at batch 1 a forward pass is too small to keep the arithmetic units busy, and costs that do not "
        "scale with the FLOPs (the embedding lookup, Python and per-operation overheads, whole attention "
        "blocks skipped in layers with no head left) weigh more, in either direction."
    )
    return "\n".join(out)


# What each protocol of benchmarks/timing_choices.py changes from the authors' one, in words.
TIMING_CHOICES = {
    "authors": "the authors' protocol: one untimed call on the batch, then 5 calls timed with time.time(), the mean; "
    "logits at every position",
    "cold": "no call before the timer, so the first, cold call is timed",
    "warm-up 3": "three untimed calls before the timer instead of one",
    "median of 5": "the median of the same 5 calls instead of their mean",
    "median of 30": "30 timed calls and their median",
    "last position": "logits at the last position only, all that the tasks use",
    "pruned first": "the pruned model timed before the full one",
    "synchronised": "the device synchronised before each clock reading",
}


def timing_choices_table(result: Mapping):
    """benchmarks/results/timing_choices.json as a table: one row per protocol (pandas DataFrame).

    Display it inside ``pd.option_context("display.max_colwidth", None)``: the "what changes"
    texts are longer than pandas' default cut.
    """
    import pandas as pd

    rows = []
    for p in result["protocols"]:
        if not p["measured"]:
            rows.append(
                {
                    "protocol": p["protocol"],
                    "what changes": TIMING_CHOICES.get(p["protocol"], ""),
                    "ratio (mean of trials)": "not measured (see below)",
                    "lowest trial": "",
                    "highest trial": "",
                    "first call / later calls (full)": "",
                }
            )
            continue
        rows.append(
            {
                "protocol": p["protocol"],
                "what changes": TIMING_CHOICES.get(p["protocol"], ""),
                "ratio (mean of trials)": f"{p['ratio_mean']:.3f}",
                "lowest trial": f"{p['ratio_min']:.3f}",
                "highest trial": f"{p['ratio_max']:.3f}",
                "first call / later calls (full)": f"{p['full_first_call_over_rest']:.2f}",
            }
        )
    return pd.DataFrame(rows).set_index("protocol")


def timing_choices_findings(result: Mapping) -> str:
    """What each timing choice did to the measured ratio, as Markdown computed from the result file.

    A change is compared with the trial-to-trial spread of the authors' protocol (highest minus
    lowest trial): a smaller change is not told apart from noise on that machine.
    """
    by = {p["protocol"]: p for p in result["protocols"]}
    base = by["authors"]
    a = base["ratio_mean"]
    spread = base["ratio_max"] - base["ratio_min"]
    out = [
        f"With the authors' protocol the pruned / full time ratio was {a:.3f}, the mean of {result['trials']} "
        f"trials that ranged from {base['ratio_min']:.3f} to {base['ratio_max']:.3f}: one such measurement can "
        f"land anywhere in a band {spread:.3f} wide on this machine. Changing one choice at a time:"
    ]
    moves = {}
    for name, p in by.items():
        if name == "authors":
            continue
        if not p["measured"]:
            out.append(f"- **{name}**: not measured here; {p.get('why', '')}.")
            continue
        moves[name] = p["ratio_mean"] - a
        line = (
            f"- **{name}**, {TIMING_CHOICES.get(name, name)}: ratio {p['ratio_mean']:.3f}, {moves[name]:+.3f}, "
            + ("within" if abs(moves[name]) <= spread else "beyond")
            + " the spread of the authors' trials"
        )
        if name == "cold":
            line += (
                f"; the full model's first call took {p['full_first_call_over_rest']:.2f} times as long as "
                "its later calls, median over the trials"
            )
        if name.startswith("median of"):
            line += (
                f"; its own trials ranged from {p['ratio_min']:.3f} to {p['ratio_max']:.3f}, a spread of "
                f"{p['ratio_max'] - p['ratio_min']:.3f}"
            )
        if name == "last position":
            line += (
                f"; the FLOP ratio is {result['flop_ratio_last_position']:.3f} with the last position only and "
                f"{result['flop_ratio_all_positions']:.3f} with every position, whose unembedding no pruning "
                "removes"
            )
        out.append(line + ".")
    beyond = [k for k in moves if abs(moves[k]) > spread]
    if moves:
        if beyond:
            out.append(
                "\nOn this " + result["device"].upper() + ", the choices that moved the ratio by more than the "
                "trial-to-trial spread: " + ", ".join(f"**{k}** ({moves[k]:+.3f})" for k in beyond) + "."
            )
        else:
            out.append(
                f"\nOn this {result['device'].upper()}, no choice moved the ratio by more than the "
                f"trial-to-trial spread ({spread:.3f})."
            )
        if "median of 30" in moves:
            m30 = by["median of 30"]
            tighter = m30["ratio_max"] - m30["ratio_min"]
            out.append(
                f"The trials of 30 calls and their median spread over {tighter:.3f}, against {spread:.3f} for "
                "the authors' 5 calls and their mean"
                + (
                    ": many calls and a median make one measurement far more repeatable."
                    if tighter < spread / 2
                    else "."
                    if tighter < spread
                    else ", no tighter on this machine."
                )
            )
        fewer = 100 * (1 - result["param_ratio"])
        out.append(
            f"With the authors' protocol the pruned model measured {100 * (1 - a):.0f} % faster than the full "
            f"one, for {fewer:.0f} % fewer parameters."
            if a < 1
            else f"With the authors' protocol the pruned model even measured {100 * (a - 1):.0f} % slower than the "
            f"full one, for {fewer:.0f} % fewer parameters."
        )
    return "\n".join(out)
