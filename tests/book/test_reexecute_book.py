"""scripts/reexecute_book.py: chapter selection, the clean-tree check, and atomic in-place runs."""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rb(load_script):
    return load_script("reexecute_book")


def test_toc_chapters_are_the_books_notebooks_in_order(rb):
    chapters = rb.toc_chapters()
    assert chapters[0] == "00_background" and "09_performance" in chapters
    assert chapters == sorted(chapters)
    assert all((REPO / "notebooks" / f"{c}.ipynb").exists() for c in chapters)


def test_select_by_stem_number_or_name(rb, tmp_path):
    chapters = ["01_acronyms", "02_ioi", "03_greater_than"]
    for stem in chapters + ["99_draft"]:
        nbformat.write(nbformat.v4.new_notebook(), tmp_path / f"{stem}.ipynb")
    assert rb.select(chapters, [], tmp_path) == chapters
    assert rb.select(chapters, ["greater-than", "01"], tmp_path) == ["01_acronyms", "03_greater_than"]
    with pytest.raises(SystemExit, match="no notebook matches 'roc'"):
        rb.select(chapters, ["roc"], tmp_path)
    with pytest.raises(SystemExit, match="not a chapter of _toc.yml: 99_draft"):
        rb.select(chapters, ["99"], tmp_path)


def test_uncommitted_sees_changes_to_the_sources(rb, tmp_path):
    def git(*a):
        return subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "circuitlib").mkdir()
    (tmp_path / "circuitlib" / "a.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("readme\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert rb.uncommitted(tmp_path) == []
    (tmp_path / "README.md").write_text("changed\n")  # not something a page depends on
    assert rb.uncommitted(tmp_path) == []
    (tmp_path / "circuitlib" / "a.py").write_text("x = 2\n")
    assert rb.uncommitted(tmp_path) == [" M circuitlib/a.py"]


def _chapter(folder: Path, fail: bool) -> Path:
    meta = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    }
    nb = nbformat.v4.new_notebook(metadata=meta)
    nb.cells = [
        nbformat.v4.new_code_cell(f"fail = {fail}", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print('ran')\nassert not fail, 'asked to fail'"),
    ]
    path = folder / "01_tiny.ipynb"
    nbformat.write(nb, path)
    return path


def test_reexecute_replaces_the_chapter_with_its_run(rb, tmp_path):
    path = _chapter(tmp_path, fail=False)
    rb.reexecute("01_tiny", tmp_path, "0123abc")
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[1].outputs[0]["text"] == "ran\n"
    assert rb.made_at(path) == "0123abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01_tiny.ipynb"]


def test_a_failed_run_leaves_the_chapter_untouched(rb, tmp_path):
    path = _chapter(tmp_path, fail=True)
    before = path.read_bytes()
    with pytest.raises(SystemExit, match="01_tiny failed"):
        rb.reexecute("01_tiny", tmp_path, "0123abc")
    assert path.read_bytes() == before
    assert (tmp_path / ".01_tiny.FAILED.ipynb").exists()


def test_check_one_commit_names_chapters_made_elsewhere_or_unstamped(rb, tmp_path):
    for stem, commit in (("01_a", "1111111aaaa"), ("02_b", "1111111aaaa"), ("03_c", "2222222bbbb"), ("04_d", None)):
        nb = nbformat.v4.new_notebook()
        if commit:
            nb.metadata["circuitlib"] = {"made_at_commit": commit}
        nbformat.write(nb, tmp_path / f"{stem}.ipynb")
    assert rb.check_one_commit(["01_a", "02_b"], tmp_path) == []
    problems = rb.check_one_commit(["01_a", "02_b", "03_c", "04_d"], tmp_path)
    assert problems == [
        "04_d: no commit recorded (not re-executed by this script)",
        "01_a: made at 1111111",
        "02_b: made at 1111111",
        "03_c: made at 2222222",
    ]


def test_the_committed_book_was_made_at_one_commit_of_this_history(rb):
    """Every chapter of the book carries the same made-at commit, and it is one of this repository's."""
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "reexecute_book.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    commit = rb.made_at(REPO / "notebooks" / f"{rb.toc_chapters()[0]}.ipynb")
    shallow = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--is-shallow-repository"], capture_output=True, text=True
    ).stdout.strip()
    if (REPO / ".git").exists() and shallow == "false":  # a shallow clone lacks the history to check
        ancestor = subprocess.run(["git", "-C", str(REPO), "merge-base", "--is-ancestor", commit, "HEAD"])
        assert ancestor.returncode == 0, f"the book was made at {commit[:7]}, which is not in this branch's history"
