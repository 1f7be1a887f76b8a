"""Numbers the paper reports: KL divergence, accuracy, TPR/FPR against ground-truth heads, ROC AUC,
and an honest forward-pass timer.

Heads are strings "layer.head" (e.g. "9.9"), as in `circuitlib.tasks`.
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
        raise ValueError(f"kl_divergence needs two [n, vocab] tensors of the same shape (logits at the last "
                         f"position only); got {list(full_last_logits.shape)} and {list(other_last_logits.shape)}")
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
    correct = task.correct(split, last_logits)   # [n] bool
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
        raise ValueError(f"need 0 < |ground_truth| < n_heads_total; got {len(truth)} ground-truth heads "
                         f"and n_heads_total={n_heads_total}")
    return len(found & truth) / len(truth), len(found - truth) / (n_heads_total - len(truth))


def roc_curve(fprs: Iterable[float], tprs: Iterable[float], *,
              add_endpoints: bool = True) -> tuple[list[float], list[float]]:
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


def time_forward(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20,
                 device: torch.device | str | None = None) -> dict:
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
    p10, median, p90 = torch.tensor(times, dtype=torch.float64).quantile(
        torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"median_s": median, "p10_s": p10, "p90_s": p90, "repeats": repeats, "times_s": times}
