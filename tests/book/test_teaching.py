"""The teachers' page states only what the executed notebooks and the exercises' source say."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("teaching_page", REPO / "scripts" / "teaching_page.py")
tp = sys.modules["teaching_page"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tp)

PAGE = REPO / "book" / "teaching.md"
SOURCE = REPO / "notebooks" / "src" / "08_exercises.py"


def _outside_blocks(text: str) -> str:
    return tp.BLOCK.sub("", text)


def test_the_page_matches_the_executed_notebooks():
    page = PAGE.read_text()
    assert tp.render(page) == page, "book/teaching.md is stale: run python scripts/teaching_page.py"


def test_no_time_is_typed_outside_the_generated_blocks():
    typed = re.findall(r"\b\d[\d.,]*\s*(?:s|sec|seconds?|min|minutes?|hours?)\b", _outside_blocks(PAGE.read_text()))
    assert typed == []


def test_a_stale_page_is_noticed():
    page = PAGE.read_text()
    stale = re.sub(r"(\| 1\. [^\n]*\| )[\d.]+ s", r"\g<1>999.99 s", page, count=1)
    assert stale != page and tp.render(stale) == page
    with pytest.raises(ValueError, match="generated blocks"):
        tp.render(_outside_blocks(page))


def test_the_paper_is_quoted_as_its_table_3_says():
    """The paper's time reductions (Table 3, as `report.PAPER_TABLE_3` holds them) bound the quotes."""
    from booklib.report import PAPER_TABLE_3

    values = [row["time_reduction"] for row in PAPER_TABLE_3]
    low, high = f"{min(values):.2f} %", f"{max(values):.2f} %"
    for text in (PAGE.read_text(), SOURCE.read_text()):
        assert low in text and high in text
        assert "77 to 88" not in text
