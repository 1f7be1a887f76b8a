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

from . import __version__

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

_REPO = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def circuitlib_commit() -> str:
    """The git commit circuitlib was loaded from, e.g. ``"963e1c3"``.

    Adds ``" + local changes"`` when files under ``circuitlib/`` differ from that commit
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
        changed = git("status", "--porcelain", "--", "circuitlib")
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
        raise ValueError(f"settings lack {missing}; pass a dict with {', '.join(PROVENANCE_KEYS)} "
                         "(e.g. Extraction.settings)")
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
            for k, v in self.rows)
        return ('<div class="circuitlib-provenance" style="border:1px solid #0072B2;border-left-width:4px;'
                'border-radius:4px;padding:6px 12px;margin:8px 0;font-size:0.9em">'
                '<strong>Made with</strong>'
                f'<table style="border:none;margin:4px 0 0 0">{cells}</table></div>')

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
    rows.append((f"FLOPs per prompt ({seq_len} tokens)", flops["full"], flops["pruned"],
                 flops["pruned"] / flops["full"]))
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
        rows.append({"prompt": split.prompts[i], "correct next token": answer,
                     "tokens": int(split.tokens.shape[1])})
    return pd.DataFrame(rows)


@torch.inference_mode()
def top_predictions(model, tokenizer, task, split, n_prompts: int = 2, k: int = 5):
    """A model's `k` most likely next tokens for the first `n_prompts` prompts of a split.

    One row per prompt: the prompt, whether the argmax is correct for `task`, and the top-k
    tokens as ``'token' (probability)``.
    """
    import pandas as pd

    sub = split[:n_prompts]
    logits = model(sub.tokens, last_only=True)          # [n_prompts, V]
    top = logits.softmax(-1).topk(k, dim=-1)
    correct = task.correct(sub, logits)
    out = []
    for i in range(len(sub)):
        preds = [f"{tokenizer.decode([int(t)])!r} ({p:.2f})" for t, p in zip(top.indices[i], top.values[i].tolist())]
        out.append({"prompt": sub.prompts[i], "argmax correct": bool(correct[i]),
                    **{f"top {j + 1}": p for j, p in enumerate(preds)}})
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
        return pd.DataFrame(columns=["head", "position", "token (example prompt)", "mean weight",
                                     "weight on first token"])
    last = model.attention_patterns(tokens, heads)[:, :, -1, :].mean(0)  # [len(heads), S]
    words = token_strings(tokenizer, tokens[example])
    rows = []
    for name, row in zip(heads, last):
        pos = int(row.argmax())
        rows.append({"head": name, "position": pos, "token (example prompt)": repr(words[pos]),
                     "mean weight": round(float(row[pos]), 3), "weight on first token": round(float(row[0]), 3)})
    return pd.DataFrame(rows)
