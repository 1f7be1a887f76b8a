"""Results sentences agree with their tables (the benchmark and performance pages).

A sentence that states a result must come from the data it describes. On these two pages every
such sentence is printed by a code cell from the numbers of the page's table (booklib.report);
the tests here re-derive the sentences from the data committed with the page (the table's raw
rows stored in the notebook, or the benchmarks' result files the page reads) and check:

* the notebook's stored sentences are exactly what the data gives today (a table re-run without
  its sentences, or sentences edited by hand, fail);
* every "more than" / "less than" / "in proportion to" and every range in them is true of the
  data, computed here independently of booklib.report;
* the text cells of the two pages type no measured numbers (decimals, percentages, "7.3x"):
  numbers belong in computed output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from booklib import report

REPO = Path(__file__).resolve().parents[2]
BENCHMARK = REPO / "notebooks" / "05_benchmark.ipynb"
PERFORMANCE = REPO / "notebooks" / "09_performance.ipynb"
RESULTS = REPO / "benchmarks" / "results"


def _outputs(nb, source_contains: str) -> list[dict]:
    cells = [c for c in nb.cells if c.cell_type == "code" and source_contains in c.source]
    assert cells, f"no code cell contains {source_contains!r}"
    return [o for c in cells for o in c.get("outputs", [])]


def _markdown_outputs(outputs) -> list[str]:
    texts = []
    for o in outputs:
        text = o.get("data", {}).get("text/markdown")
        if text is not None:
            texts.append("".join(text) if isinstance(text, list) else text)
    return texts


def _direction(time_ratio: float, flop_ratio: float, tol: float = 0.05) -> str:
    """Independent of booklib.report: did time fall more than, less than or as FLOPs did?"""
    if time_ratio < flop_ratio * (1 - tol):
        return "more than"
    if time_ratio > flop_ratio * (1 + tol):
        return "less than"
    return "in proportion to"


# ------------------------------------------------------------------ the benchmark page


@pytest.fixture(scope="module")
def benchmark():
    nb = nbformat.read(BENCHMARK, as_version=4)
    tables = [o for o in _outputs(nb, '"circuitlib": {"rows": rows}') if "circuitlib" in o.get("metadata", {})]
    if not tables:
        pytest.fail("the benchmark page stores no raw table rows (output metadata): re-execute it")
    rows = tables[0]["metadata"]["circuitlib"]["rows"]
    html = "".join("".join(o["data"]["text/html"]) for o in tables)
    findings = _markdown_outputs(_outputs(nb, "benchmark_findings"))
    return nb, rows, html, findings


def test_benchmark_findings_are_computed_from_the_table(benchmark):
    _, rows, _, findings = benchmark
    assert findings == [report.benchmark_findings(rows)], (
        "the benchmark page's findings are not what its table gives: re-execute the page"
    )


def test_benchmark_table_shows_the_rows(benchmark):
    _, rows, html, _ = benchmark
    text = re.sub(r"<[^>]+>", " ", html)
    big = next(k for k in rows[0] if k.startswith("time ratio, batch ") and not k.endswith(" 1"))
    for r in rows:
        for key in ("FLOP ratio", "time ratio, batch 1", big):
            assert f"{r[key]:.3f}" in text, f"{r['task']}: {key} {r[key]:.3f} is not in the table"
        assert f"{r['param reduction %']:.1f}" in text


def test_benchmark_findings_are_true_of_the_data(benchmark):
    _, rows, _, findings = benchmark
    text = findings[0]
    big = next(k for k in rows[0] if k.startswith("time ratio, batch ") and not k.endswith(" 1"))
    bullets = {b.split("**")[1]: b for b in text.splitlines() if b.startswith("- **")}
    for mlps, label in ((False, "heads only"), (True, "heads and MLPs")):
        sel = [r for r in rows if bool(r["MLP"]) == mlps]
        if not sel:
            continue
        line = bullets[label]
        flops = [r["FLOP ratio"] for r in sel]
        assert f"FLOP ratio {min(flops):.3f}" in line and f"{max(flops):.3f}" in line
        for key, where in (("time ratio, batch 1", "at batch 1"), (big, f"at batch {big.rsplit(' ', 1)[1]}")):
            words = [_direction(r[key], r["FLOP ratio"]) for r in sel]
            more = sum(w == "more than" for w in words)
            less = sum(w == "less than" for w in words)
            if where == "at batch 1":
                assert f"more than FLOPs in {more} of {len(sel)} rows at batch 1" in line, line
                assert f"less than FLOPs in {less} of {len(sel)}" in line, line
            else:
                assert f"{more} of {len(sel)} {where}" in line, line
        cut = 100 * (1 - min(min(r["time ratio, batch 1"], r[big]) for r in sel))
        assert f"largest time cut measured is {cut:.0f} %" in line
        paper = [r for r in report.PAPER_TABLE_3 if r["mlps"] == mlps]
        assert (
            f"{min(r['time_reduction'] for r in paper):.2f} to "
            f"{max(r['time_reduction'] for r in paper):.2f} % less time" in line
        )


def test_benchmark_paper_table_is_the_papers():
    """The paper's Table 3 as the page prints it: the values in the project's paper notes."""
    time_cuts = {(r["task"], r["mlps"]): r["time_reduction"] for r in report.PAPER_TABLE_3}
    assert time_cuts == {
        ("acronyms", False): 83.56,
        ("acronyms", True): 86.20,
        ("ioi", False): 57.58,
        ("ioi", True): 82.78,
        ("greater-than", False): 77.78,
        ("greater-than", True): 88.33,
    }
    nb = nbformat.read(BENCHMARK, as_version=4)
    shown = _markdown_outputs(_outputs(nb, "paper_table_3_markdown"))
    assert shown and report.paper_table_3_markdown() in shown[0]


# ------------------------------------------------------------------ the performance page


def _load(name):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


@pytest.fixture(scope="module")
def performance():
    return nbformat.read(PERFORMANCE, as_version=4)


def test_performance_time_vs_flops_sentences(performance):
    inf = _load("pruned_inference")
    if inf is None:
        pytest.skip("no pruned_inference result committed")
    b = inf["task_batch"]
    shown = _markdown_outputs(_outputs(performance, "time_vs_flops_findings"))
    assert report.time_vs_flops_findings(inf["rows"], b) in shown, (
        "the performance page's sentences on pruned models are not what "
        "benchmarks/results/pruned_inference.json gives: re-execute the page"
    )
    text = report.time_vs_flops_findings(inf["rows"], b)
    for r in inf["rows"]:
        line = next(l for l in text.splitlines() if l.startswith(f"- **{r['circuit']}**"))
        assert f"at batch 1 time fell {_direction(r['time_ratio_b1'], r['flop_ratio'])} FLOPs" in line
        assert f"at batch {b} it fell {_direction(r[f'time_ratio_b{b}'], r['flop_ratio'])} FLOPs" in line


def test_performance_extraction_sentence(performance):
    speed = _load("extraction_speed")
    if speed is None:
        pytest.skip("no extraction_speed result committed")
    shown = "\n".join(_markdown_outputs(_outputs(performance, 'load("extraction_speed")')))
    r = speed["ratios"]
    assert f"took {speed['fast_seconds']:.0f} s on the fast path" in shown
    assert f"{r['plain_over_fast']:.1f} times as long with lean hooks" in shown
    assert f"{r['authors_hooks_over_fast'] / r['plain_over_fast']:.1f} times as slow" in shown
    assert f"cost {r['sweep_over_single']:.2f} extractions" in shown


def test_performance_timing_choices_sentences(performance):
    choices = _load("timing_choices")
    if choices is None:
        pytest.skip("no timing_choices result committed")
    shown = _markdown_outputs(_outputs(performance, 'load("timing_choices")'))
    text = report.timing_choices_findings(choices)
    assert text in shown, (
        "the performance page's timing sentences are not what "
        "benchmarks/results/timing_choices.json gives: re-execute the page"
    )
    by = {p["protocol"]: p for p in choices["protocols"]}
    base = by["authors"]["ratio_mean"]
    for name, p in by.items():
        if name != "authors" and p["measured"]:
            line = next(l for l in text.splitlines() if l.startswith(f"- **{name}**"))
            assert f"ratio {p['ratio_mean']:.3f}, {p['ratio_mean'] - base:+.3f}" in line
            spread = by["authors"]["ratio_max"] - by["authors"]["ratio_min"]
            assert ("within" if abs(p["ratio_mean"] - base) <= spread else "beyond") in line


# ------------------------------------------------------------------ no typed results

NUMBER = re.compile(r"\b\d+\.\d+\b|\b\d+(?:\.\d+)?\s?%|\b\d+(?:\.\d+)?x\b")


def _prose(markdown: str) -> str:
    text = re.sub(r"```.*?```", " ", markdown, flags=re.S)  # code blocks
    text = re.sub(r"\$\$.*?\$\$|\$[^$]+\$", " ", text, flags=re.S)  # math
    text = re.sub(r"`[^`]*`", " ", text)  # inline code
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    text = re.sub(r"\b95 % (?=bootstrap|confidence|interval|CI)", " ", text)  # the intervals' level: a setting
    return text


@pytest.mark.parametrize("path", [BENCHMARK, PERFORMANCE], ids=lambda p: p.name)
def test_text_cells_type_no_measured_numbers(path):
    nb = nbformat.read(path, as_version=4)
    typed = [
        (i, m.group(0))
        for i, c in enumerate(nb.cells)
        if c.cell_type == "markdown"
        for m in NUMBER.finditer(_prose(c.source))
    ]
    assert not typed, f"{path.name}: numbers typed in text cells (compute them in a code cell): {typed}"
