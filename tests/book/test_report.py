"""booklib.report: provenance box, full-vs-pruned table, example and prediction tables."""

import pytest

from booklib import report
from circuitlib.models.loading import load_model
from circuitlib.pipeline.extraction import ExtractionConfig, run_extraction
from circuitlib.tasks import get_task

SETTINGS = {
    "model": "smollm2-135m",
    "task": "ioi",
    "alpha": 0.02,
    "ablation": "mean",
    "include_mlps": False,
    "n": 40,
    "seed": 0,
}


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-gpt2")


@pytest.fixture(scope="module")
def extraction(tiny):
    return run_extraction(ExtractionConfig("tiny-gpt2", "ioi", alpha=0.05, n=6), progress=False, loaded=tiny)


def test_provenance_lists_every_setting_and_the_commit():
    text = report.provenance_markdown(SETTINGS, extra={"device": "cpu"})
    for part in (
        "model = `smollm2-135m`",
        "task = `ioi`",
        "alpha = `0.02`",
        "ablation = `mean`",
        "include_mlps = `False`",
        "n = `40`",
        "seed = `0`",
        "device = `cpu`",
    ):
        assert part in text
    assert "commit" in text and report.circuitlib_commit() in text
    box = report.provenance(SETTINGS)
    page = box._repr_html_()
    assert "Made with" in page and "smollm2-135m" in page and "<script" not in page
    assert box._repr_markdown_() == report.provenance_markdown(SETTINGS)
    assert page == report.provenance(dict(SETTINGS))._repr_html_()  # deterministic


def test_provenance_refuses_incomplete_settings():
    with pytest.raises(ValueError, match="alpha"):
        report.provenance({k: v for k, v in SETTINGS.items() if k != "alpha"})


def test_provenance_accepts_extraction_settings(extraction):
    text = report.provenance_markdown(extraction.settings)
    assert "model = `tiny-gpt2`" in text and "alpha = `0.05`" in text


def test_commit_is_a_string():
    commit = report.circuitlib_commit()
    assert isinstance(commit, str) and commit


def test_comparison_table_matches_the_metrics(extraction):
    raw = report.comparison_table(extraction, formatted=False)
    m = extraction.metrics
    assert raw.loc["accuracy (validation)", "full"] == m["full"]["validation"]["accuracy"]
    assert raw.loc["accuracy (test)", "pruned"] == m["pruned"]["test"]["accuracy"]
    assert raw.loc["KL to full (test)", "pruned"] == m["pruned"]["test"]["kl"]
    assert raw.loc["parameters", "pruned"] == m["pruned"]["n_params"]["parameters"]
    seq = extraction.data.validation.tokens.shape[1]
    flops_row = f"FLOPs per prompt ({seq} tokens)"
    assert raw.loc[flops_row, "full"] == extraction.full.flops(seq)
    assert raw.loc[flops_row, "pruned"] <= raw.loc[flops_row, "full"]
    shown = report.comparison_table(extraction)
    assert list(shown.columns) == ["full", "pruned", "pruned / full"]
    assert shown.loc["parameters", "full"] == f"{m['full']['n_params']['parameters']:,}"
    assert shown.loc["accuracy (validation)", "pruned / full"] == "-"
    assert all(isinstance(v, str) for v in shown.to_numpy().ravel())


def test_examples_and_top_predictions(tiny):
    model, tokenizer = tiny
    for name in ("ioi", "greater-than"):
        task = get_task(name)
        split = task.generate(tokenizer, n=4, seed=0).validation
        table = report.examples_table(split, tokenizer, k=3)
        assert len(table) == 3 and table.loc[0, "prompt"] == split.prompts[0]
        assert (table["tokens"] == split.tokens.shape[1]).all()
        preds = report.top_predictions(model, tokenizer, task, split, n_prompts=2, k=3)
        assert len(preds) == 2 and list(preds.columns)[-1] == "top 3"
    assert report.token_strings(tokenizer, tokenizer.encode(" Mary")) == [" Mary"]


def test_important_heads_and_attention_summary(extraction, tiny):
    _, tokenizer = tiny
    kept = extraction.pruned.kept_heads()
    heads = report.important_heads(extraction.circuit, k=3)
    assert set(heads) <= set(kept) and len(heads) == min(3, len(kept))
    deltas = {d.component: d.delta for d in extraction.circuit.decisions}
    assert [deltas[h] for h in heads] == sorted((deltas[h] for h in heads), reverse=True)
    tokens = extraction.data.validation.tokens
    table = report.attention_summary(extraction.pruned, tokenizer, tokens, heads)
    assert list(table["head"]) == heads
    assert ((table["mean weight"] >= 0) & (table["mean weight"] <= 1)).all()
    assert (table["position"] < tokens.shape[1]).all()
    assert report.attention_summary(extraction.pruned, tokenizer, tokens, []).empty


def test_threshold_origin_names_the_paper_and_the_rule():
    from booklib.report import round_significant, threshold_origin

    assert round_significant(0.12328467394420659) == 0.123 and round_significant(0.015199110829) == 0.0152
    chosen = {
        ("ioi", "mean", False): 0.12328467394420659,
        ("ioi", "mean", True): 0.01519911082952933,
        ("greater-than", "mean", True): None,
    }
    assert threshold_origin("ioi", False, 8.53e-3, chosen) == "paper"  # the paper's heads-only alpha
    assert threshold_origin("ioi", True, 8.53e-3, chosen) == ""  # ... not its heads-and-MLPs one
    assert threshold_origin("ioi", False, 0.123, chosen) == "rule"
    assert threshold_origin("ioi", True, 0.0152, chosen) == "rule"
    assert threshold_origin("ioi", True, 0.01519911082952933, chosen) == "rule"  # the exact pick
    assert threshold_origin("ioi", True, 0.0153, chosen) == ""
    assert threshold_origin("ioi", True, 0.0152, chosen, ablation="zero") == ""  # the pick of another ablation
    assert threshold_origin("ioi", True, 0.0152) == ""  # no rule given
    assert threshold_origin("greater-than", True, 0.0853, chosen) == "paper"  # no pick: only the paper
    assert threshold_origin("acronyms", True, 0.035, {("acronyms", "mean", True): 0.0350001}) == "paper, rule"
