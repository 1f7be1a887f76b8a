"""Each task's standard measure of a circuit, and the baselines a score must beat.

    standard_metric         the task's usual measure per prompt (STANDARD_METRICS): IOI's logit
                            difference, greater-than's probability difference, the acronyms' letter
                            margin; accuracy for a task read from a file
    best_constant_answer    the single answer token that is right on the most prompts, and how often
    constant_answer_metric  the standard measure of a model certain of one answer

The measures themselves (logit and probability differences) are task-free tensors functions in
`circuitlib.core.metrics`; this module knows which one a task uses and where its tokens are.
"""

from __future__ import annotations

import torch

from circuitlib.core.metrics import best_other_logit_difference, logit_difference, probability_difference
from circuitlib.tasks.builtin import TaskSplit, ioi_subject_tokens, letter_tokens

STANDARD_METRICS = {
    "ioi": "logit difference, indirect object - subject",
    "ioi-mixed": "logit difference, indirect object - subject",  # IOI's, on both orders and many templates
    "greater-than": "probability difference, later - not later years",
    "acronyms": "logit difference, right letter - best other letter",
}
"""Each built-in task's measure (`standard_metric`); any other task (a task file) is measured by accuracy.

IOI and greater-than: the measures of the papers that found their circuits (Wang et al. 2022;
Hanna et al. 2023). Acronyms: García-Carrasco et al. measure against corrupted prompts, which
these splits do not have; the margin of the right letter over the best wrong capital letter is
the corrupted-prompt-free measure in the same units as IOI's (logits, additive in the residual
stream), and is positive exactly when the model prefers the right letter to every other letter.
"""

LOGIT_METRICS = ("ioi", "ioi-mixed", "acronyms")  # measures in logits: a constant, certain answer has none


def standard_metric_name(task) -> str:
    """What `standard_metric` measures for `task`."""
    return STANDARD_METRICS.get(task.name, "accuracy")


def standard_metric(task, tokenizer, split: TaskSplit, last_logits: torch.Tensor) -> torch.Tensor:
    """[n] float64: the task's usual measure of each prompt (`STANDARD_METRICS`; else 1.0 if correct, 0.0 if not).

    tokenizer: the one the split was made with (to find IOI's subject and the acronyms' letters).
    """
    if last_logits.ndim != 2 or len(last_logits) != len(split):
        raise ValueError(
            f"last_logits must be [n, vocab] with n = {len(split)} (the last position only); "
            f"got {list(last_logits.shape)}"
        )
    if task.name in ("ioi", "ioi-mixed"):
        return logit_difference(last_logits, split.answers, ioi_subject_tokens(tokenizer, split))
    if task.name == "greater-than":
        return probability_difference(last_logits, split.candidates, split.accepted)
    if task.name == "acronyms":
        return best_other_logit_difference(last_logits, split.answers, letter_tokens(tokenizer))
    return task.correct(split, last_logits).to(torch.float64)


def answer_tokens(split: TaskSplit) -> torch.Tensor:
    """LongTensor [k]: every token that is a right answer to some prompt of `split` (sorted)."""
    if split.candidates is None:
        return torch.unique(split.answers)
    return torch.unique(split.candidates[split.accepted.any(0)])


def constant_answer_correct(split: TaskSplit, token: int) -> torch.Tensor:
    """BoolTensor [n]: whether always answering `token` is right on each prompt of `split`."""
    if split.candidates is None:
        return split.answers == token
    return (split.accepted & (split.candidates == token)[None, :]).any(-1)


def best_constant_answer(split: TaskSplit) -> dict:
    """The single answer token that is right on the most prompts of `split`: {"token", "accuracy"}.

    A model that ignores its input can reach this accuracy; an accuracy means something only
    above it. Ties go to the smallest token id.
    """
    scores = [(int(constant_answer_correct(split, int(t)).sum()), -int(t)) for t in answer_tokens(split)]
    correct, token = max(scores)
    return {"token": -token, "accuracy": correct / len(split)}


def constant_answer_metric(task, tokenizer, split: TaskSplit, token: int) -> float | None:
    """The mean `standard_metric` of a model certain of `token` on every prompt, or None for a measure in logits.

    Certain = probability 1 on `token`: for a year ending its probability difference is +1 on the
    prompts where it is right and -1 elsewhere (2 * accuracy - 1); its accuracy is the constant
    answer's.
    A logit difference of a certain answer is infinite, so it has none (None).
    """
    if task.name in LOGIT_METRICS:
        return None
    known = [split.tokens.max(), split.answers.max()]
    known += [split.candidates.max()] if split.candidates is not None else []
    logits = torch.full((len(split), int(max(token, *known)) + 1), float("-inf"))  # [n, V]
    logits[:, token] = 0.0
    return float(standard_metric(task, tokenizer, split, logits).mean())
