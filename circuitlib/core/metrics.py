"""Numbers the paper reports: KL divergence, accuracy, TPR/FPR against ground-truth heads, ROC AUC,
and an honest forward-pass timer; and the field's measures of a circuit:

    logit_difference               logit(right) - logit(other) per prompt (IOI: indirect object - subject)
    probability_difference         sum P(correct years) - sum P(other years) per prompt (greater-than)
    normalised_faithfulness        (m(circuit) - m(empty)) / (m(full) - m(empty))
    faithfulness_areas             the area under the faithfulness curve over circuit sizes (MIB's CPR)
                                   and between it and 1 (MIB's CMD)

Heads are strings "layer.head" (e.g. "9.9"), as in `circuitlib.core.components`. Each task's own
measure, and the best constant answer, are in `circuitlib.tasks.measures`.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from circuitlib.core.components import parse_head


def log_probs(last_logits: torch.Tensor) -> torch.Tensor:
    """[n, V] logits -> [n, V] log-probabilities in float64 (the KL's precision; see `kl_divergence`)."""
    return F.log_softmax(last_logits.to(torch.float64), dim=-1)


def kl_divergence(full_last_logits: torch.Tensor, other_last_logits: torch.Tensor) -> float:
    """KL(f || g) at the last position: summed over the vocabulary, averaged over the batch.

    full_last_logits:  [n, V] logits of the full model f
    other_last_logits: [n, V] logits of the ablated or pruned model g
    Same as `F.kl_div(log_softmax(g), log_softmax(f), log_target=True, reduction="batchmean")`,
    but computed and accumulated in float64 from the (float32) logits, so that a decision within
    float32 noise of alpha does not depend on how the sum was split across threads or devices.
    KL(x, x) is exactly 0.
    """
    if full_last_logits.ndim != 2 or full_last_logits.shape != other_last_logits.shape:
        raise ValueError(
            f"kl_divergence needs two [n, vocab] tensors of the same shape (logits at the last "
            f"position only); got {list(full_last_logits.shape)} and {list(other_last_logits.shape)}"
        )
    return kl_to(log_probs(full_last_logits), other_last_logits)


def kl_to(full_log_probs: torch.Tensor, other_last_logits: torch.Tensor) -> float:
    """`kl_divergence` with f given as `log_probs(full_last_logits)` [n, V], computed once by the caller."""
    return F.kl_div(log_probs(other_last_logits), full_log_probs, log_target=True, reduction="batchmean").item()


def kl_per_prompt(full_log_probs: torch.Tensor, other_last_logits: torch.Tensor) -> torch.Tensor:
    """KL(f || g) of each prompt [n] (float64); its mean is `kl_to` (for intervals over prompts)."""
    return F.kl_div(log_probs(other_last_logits), full_log_probs, log_target=True, reduction="none").sum(-1)


def accuracy(task, split, last_logits: torch.Tensor) -> float:
    """Fraction of prompts in `split` whose argmax next token is correct for `task`.

    last_logits: [n, V] logits at the last position
    Returns correct / n exactly as a Python float (a float32 mean would give 0.9639999866 for 241/250).
    """
    correct = task.correct(split, last_logits)  # [n] bool
    return int(correct.sum().item()) / correct.numel()


def _is_head(name) -> bool:
    try:
        parse_head(name)
        return True
    except ValueError:
        return False


def _heads(heads: Iterable[str], what: str) -> set[str]:
    heads = set(heads)
    bad = [h for h in heads if not _is_head(h)]
    if bad:
        raise ValueError(f"{what} must be heads written 'layer.head' (e.g. '9.9'); got {bad[:5]}")
    return heads


def tpr_fpr(found_heads: Iterable[str], ground_truth: Iterable[str], n_heads_total: int = 144) -> tuple[float, float]:
    """(TPR, FPR) of the heads a circuit kept against the ground-truth heads, heads only.

    TPR = |found ∩ GT| / |GT|,  FPR = |found \\ GT| / (n_heads_total - |GT|)
    """
    found, truth = _heads(found_heads, "found_heads"), _heads(ground_truth, "ground_truth")
    if not truth or len(truth) >= n_heads_total:
        raise ValueError(
            f"need 0 < |ground_truth| < n_heads_total; got {len(truth)} ground-truth heads "
            f"and n_heads_total={n_heads_total}"
        )
    return len(found & truth) / len(truth), len(found - truth) / (n_heads_total - len(truth))


def roc_curve(
    fprs: Iterable[float], tprs: Iterable[float], *, add_endpoints: bool = True
) -> tuple[list[float], list[float]]:
    """The points (one per alpha) sorted by FPR (then TPR), as (fprs, tprs).

    add_endpoints: add (0, 0) and (1, 1), the curves of "keep no head" and "keep every head".
    """
    fprs, tprs = [float(x) for x in fprs], [float(y) for y in tprs]
    if len(fprs) != len(tprs):
        raise ValueError(f"fprs and tprs must have the same length; got {len(fprs)} and {len(tprs)}")
    points = sorted(zip(fprs, tprs))
    if any(not (0 <= v <= 1) for point in points for v in point):
        raise ValueError("FPR and TPR values must lie in [0, 1]")
    if add_endpoints:
        points = [(0.0, 0.0)] + points + [(1.0, 1.0)]
    return [p[0] for p in points], [p[1] for p in points]


def roc_auc(fprs: Iterable[float], tprs: Iterable[float], *, add_endpoints: bool = True) -> float:
    """Area under the ROC curve of `roc_curve(fprs, tprs, add_endpoints=...)`, by the trapezoid rule."""
    xs, ys = roc_curve(fprs, tprs, add_endpoints=add_endpoints)
    if len(xs) < 2:
        raise ValueError("an ROC curve needs at least two points; pass more or keep add_endpoints=True")
    return sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))


def time_forward(
    fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20, device: torch.device | str | None = None
) -> dict:
    """Wall-clock seconds of `fn()` (e.g. `lambda: model(tokens)`, always the same input).

    Runs `warmup` untimed calls, then `repeats` timed ones, all under `torch.inference_mode()`.
    On CUDA (`device` is a CUDA device, or `device` is None and CUDA is in use) it synchronises
    before starting and before stopping each clock, so queued GPU work is counted.
    Returns {"median_s", "p10_s", "p90_s", "repeats", "times_s"}.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1; got warmup={warmup}, repeats={repeats}")
    if device is None:
        sync = torch.cuda.is_available() and torch.cuda.is_initialized()
    else:
        sync = torch.device(device).type == "cuda"

    def synchronize():
        if sync:
            torch.cuda.synchronize(device)

    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            times.append(time.perf_counter() - start)
    p10, median, p90 = (
        torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    )
    return {"median_s": median, "p10_s": p10, "p90_s": p90, "repeats": repeats, "times_s": times}


# ------------------------------------------------------------------------------------------
# the field's measures of a circuit


def logit_difference(last_logits: torch.Tensor, right: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """[n] float64: logit of token right[i] minus logit of token other[i] at the last position.

    last_logits: [n, V]; right, other: LongTensor [n]. With right = the indirect object and other =
    the subject this is IOI's logit difference (Wang et al. 2022). It is shift-invariant, so the
    logits need not be normalised.
    """
    _check_rows(last_logits, right, "right")
    _check_rows(last_logits, other, "other")
    rows = torch.arange(len(last_logits), device=last_logits.device)
    logits = last_logits.to(torch.float64)
    return logits[rows, right.to(logits.device)] - logits[rows, other.to(logits.device)]


def best_other_logit_difference(last_logits: torch.Tensor, right: torch.Tensor, options: torch.Tensor) -> torch.Tensor:
    """[n] float64: logit of right[i] minus the largest logit of the other tokens in `options` [k].

    Positive exactly when the right token beats every other option (the acronyms task: the
    right letter against the best wrong capital letter).
    """
    _check_rows(last_logits, right, "right")
    logits = last_logits.to(torch.float64)
    options = options.to(logits.device)
    right = right.to(logits.device)
    if not bool((options[None, :] == right[:, None]).any(-1).all()):
        raise ValueError("every right token must be one of the options (e.g. the acronym's letter among the letters)")
    option_logits = logits[:, options]  # [n, k]
    is_right = options[None, :] == right[:, None]  # [n, k]
    best_other = option_logits.masked_fill(is_right, float("-inf")).amax(-1)  # [n]
    return logits[torch.arange(len(logits), device=logits.device), right] - best_other


def probability_difference(last_logits: torch.Tensor, candidates: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """[n] float64: sum of P(candidates accepted for the prompt) - sum of P(the other candidates).

    last_logits: [n, V]; candidates: LongTensor [k]; accepted: BoolTensor [n, k]. Probabilities
    are the softmax over the whole vocabulary. For greater-than, candidates are the year endings
    and accepted[i, j] says ending j is later than prompt i's start: Hanna et al.'s (2023)
    probability difference, in [-1, 1]. In the digit port (tokenizers that split numbers,
    `tasks.GreaterThan`) the candidates are the ten digit tokens of the end year's tens digit,
    so it is sum P(d > start's tens digit) - sum P(d <= it) over those ten tokens.
    """
    if accepted.ndim != 2 or tuple(accepted.shape) != (len(last_logits), len(candidates)):
        raise ValueError(
            f"accepted must be [n prompts, k candidates] = [{len(last_logits)}, {len(candidates)}]; "
            f"got {list(accepted.shape)}"
        )
    probs = log_probs(last_logits).exp()[:, candidates.to(last_logits.device)]  # [n, k]
    sign = accepted.to(probs.device).to(torch.float64) * 2 - 1  # +1 accepted, -1 not
    return (probs * sign).sum(-1)


def normalised_faithfulness(circuit: float, full: float, empty: float) -> float:
    """(circuit - empty) / (full - empty): 0 for the empty circuit, 1 for the full model.

    The measures are means over the same prompts (the ratio of means, as MIB computes it). NaN
    where full == empty: then no circuit can be placed between them.
    """
    span = float(full) - float(empty)
    return (float(circuit) - float(empty)) / span if span != 0 else float("nan")


def faithfulness_curve(sizes: Iterable[float], faithfulness: Iterable[float]) -> tuple[list[float], list[float]]:
    """The points (circuit size, faithfulness) sorted by size, as (sizes, faithfulness).

    sizes: the fraction of the candidate components each circuit keeps, in [0, 1]. Give the
    measured end points too (the empty circuit at 0, the full model at 1): they are not assumed.
    """
    xs, ys = [float(x) for x in sizes], [float(y) for y in faithfulness]
    if len(xs) != len(ys):
        raise ValueError(f"sizes and faithfulness must have the same length; got {len(xs)} and {len(ys)}")
    if any(not 0 <= x <= 1 for x in xs):
        raise ValueError("sizes must be fractions of the candidate components kept, in [0, 1]")
    if any(y != y for y in ys):
        raise ValueError("a faithfulness is NaN (the full and the empty circuit measure the same); no curve")
    points = sorted(zip(xs, ys))
    return [p[0] for p in points], [p[1] for p in points]


def faithfulness_areas(sizes: Iterable[float], faithfulness: Iterable[float]) -> dict[str, float]:
    """MIB's two areas of the faithfulness curve (`faithfulness_curve`), by the trapezoid rule over size.

    cpr: the area under the curve, integral of f (higher is better; above 1 when circuits
         overshoot the full model)
    cmd: the area between the curve and 1, integral of |1 - f| (0 is best)
    As MIB's circuit track computes them (`evaluate_area_under_curve` in MIB_circuit_track/
    evaluation.py: trapezoids over the fraction kept, linear axis), whose sizes are fractions of
    *edges* from 0.001 to 1; here they are fractions of the candidate components (heads, or
    heads and MLPs) at the sizes the circuits have, so the numbers are not comparable one to one.
    Each trapezoid of |1 - f| uses |1 - f| at its two ends, as MIB does (a segment that crosses 1
    is not split).
    """
    xs, ys = faithfulness_curve(sizes, faithfulness)
    if len(xs) < 2:
        raise ValueError("a faithfulness curve needs at least two points (give the empty circuit and the full model)")
    cpr = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))
    cmd = sum((x1 - x0) * (abs(1 - y0) + abs(1 - y1)) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))
    return {"cpr": cpr, "cmd": cmd}


def _check_rows(last_logits: torch.Tensor, tokens: torch.Tensor, what: str) -> None:
    if last_logits.ndim != 2 or tokens.ndim != 1 or len(tokens) != len(last_logits):
        raise ValueError(
            f"need [n, vocab] logits and one {what} token per prompt; got {list(last_logits.shape)} "
            f"and {list(tokens.shape)}"
        )
