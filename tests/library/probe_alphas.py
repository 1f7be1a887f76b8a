"""Alphas for tests that compare two paths' decisions: each splits the decisions, and none is a tie."""

from circuitlib.discovery.greedy import extract


def alphas_between_deltas(
    model, prompts, *, include_mlps: bool, ablation: str = "mean", quantiles=(0.25, 0.5, 0.75)
) -> list[float]:
    """One alpha per quantile of an alpha = 0 probe's |deltas|, halfway between two distinct deltas.

    An alpha equal to a delta is a tie that float error decides: a batched or shortened pass may
    round the same KL differently and flip the decision (seen in CI, once, for alpha = a probe's delta).
    Halfway between two neighbouring deltas, the first decisions are far from every alpha.
    """
    probe = extract(model, *prompts, alpha=0.0, ablation=ablation, include_mlps=include_mlps, progress=False)
    deltas = sorted({abs(d.delta) for d in probe.decisions})
    picks = [min(int(q * (len(deltas) - 1)), len(deltas) - 2) for q in quantiles]
    return [(deltas[i] + deltas[i + 1]) / 2 for i in picks]
