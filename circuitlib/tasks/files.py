"""Your own task from a file: one prompt per row, read from JSON Lines or CSV.

    {"prompt": "The capital of France is", "answer": " Paris"}                      # .jsonl
    {"prompt": "A prime number below 10:", "answer": " 7", "answers": [" 2", " 3", " 5", " 7"]}

    prompt,answer                                                                    # .csv
    The capital of France is, Paris

`answer` is the next token the model should predict (one token under the model's tokenizer; mind
the leading space); the optional `answers` lists every accepted next token for tasks with
several right ones (`answer` always counts as right too). CSV files have exactly the columns
`prompt,answer`; a value's leading space is kept. The task's name is the file's stem.

Everything is checked before any model work, and every problem is reported in one message that
names the offending lines: a malformed or empty file, missing or unknown fields, duplicate
prompts, prompts of different token lengths (positions must line up across the batch), answers
that are not one token, and too few rows for three disjoint splits of the requested size.
Splits are drawn from the rows with the seed, as for the built-in tasks; no BOS token is added.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from circuitlib.tasks.builtin import Task, TaskSplit, make_split

SUFFIXES = (".jsonl", ".csv")
FIELDS = ("prompt", "answer", "answers")
MAX_LISTED = 12  # problems named in one message; the rest are counted


@dataclass(frozen=True)
class Row:
    """One prompt of a task file. `line`: where it is in the file (1-based), for error messages."""

    line: int
    prompt: str
    answer: str
    answers: tuple[str, ...] = ()

    @property
    def accepted(self) -> tuple[str, ...]:
        """Every accepted next token: `answer` first, then the other `answers`."""
        return (self.answer,) + tuple(a for a in self.answers if a != self.answer)


class FileTask(Task):
    """A task whose prompts and answers are the rows of a .jsonl or .csv file (see the module docstring).

    default_n: the paper's 250 prompts per split, or as many as the file holds for three splits.
    """

    def __init__(self, path: Path, rows: list[Row], name: str | None = None):
        self.path, self.rows = path, rows
        self.name = name or path.stem
        self.default_n = max(1, min(250, len(rows) // 3))

    def check(self, tokenizer, count: int) -> int:
        """Check every row under `tokenizer` and that `count` distinct prompts exist; their length in tokens.

        Raises one ValueError naming every problem found.
        """
        problems, ids = self._problems(tokenizer)
        if len(self.rows) < 3:
            problems.append(f"three disjoint splits need at least 3 rows but the file has {len(self.rows)}; add rows")
        elif count > len(self.rows):
            problems.append(
                f"{count} prompts are needed (three disjoint splits) but the file has {len(self.rows)} "
                f"rows; lower n to at most {len(self.rows) // 3}, or add rows"
            )
        if problems:
            raise ValueError(_report(self.path, problems))
        return len(ids[0])

    def build(self, tokenizer, count: int, rng: random.Random) -> TaskSplit:
        self.check(tokenizer, count)
        rows = [self.rows[i] for i in rng.sample(range(len(self.rows)), count)]
        prompts, answers = [r.prompt for r in rows], [r.answer for r in rows]
        if not any(r.answers for r in rows):
            return make_split(tokenizer, prompts, answers)
        candidates = sorted({a for r in rows for a in r.accepted})
        accepted = torch.tensor([[c in r.accepted for c in candidates] for r in rows])  # [count, k]
        return make_split(tokenizer, prompts, answers, candidates=candidates, accepted=accepted)

    def _problems(self, tokenizer) -> tuple[list[str], list[list[int]]]:
        """Duplicate prompts, unequal token lengths and multi-token answers; and the prompts' token ids."""
        problems = []
        first_line = {}
        for r in self.rows:
            if r.prompt in first_line:
                problems.append(f"line {r.line} repeats the prompt of line {first_line[r.prompt]} ({r.prompt!r})")
            first_line.setdefault(r.prompt, r.line)
        ids = tokenizer([r.prompt for r in self.rows], add_special_tokens=False)["input_ids"]
        lengths = Counter(len(x) for x in ids)
        if len(lengths) > 1:
            common = lengths.most_common(1)[0][0]
            groups = [
                f"{k} row{'s' * (k > 1)} of {length} tokens"
                + (
                    ""
                    if length == common
                    else f" (line{'s' * (k > 1)} "
                    f"{_lines([r.line for r, x in zip(self.rows, ids) if len(x) == length])})"
                )
                for length, k in sorted(lengths.items(), key=lambda kv: -kv[1])
            ]
            problems.append(
                "prompts must all have the same number of tokens so that positions line up across "
                f"the batch; found {', '.join(groups)}"
            )
        texts = sorted({a for r in self.rows for a in r.accepted})
        pieces = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"]))
        for r in self.rows:
            for a in r.accepted:
                if len(pieces[a]) != 1:
                    problems.append(
                        f"line {r.line}: answer {a!r} is {len(pieces[a])} tokens "
                        f"{tokenizer.convert_ids_to_tokens(pieces[a])}, not one"
                    )
        return problems, ids


def load_task_file(path: str | os.PathLike, name: str | None = None) -> FileTask:
    """Read a .jsonl or .csv task file; one ValueError naming every malformed line.

    name: the task's name (default: the file's stem).
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"task file {path} must end in .jsonl or .csv")
    if not path.is_file():
        raise ValueError(
            f"task file {path} does not exist (or is not a file); check the path, or choose a built-in task"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"task file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None
    rows, problems = (_read_jsonl if path.suffix == ".jsonl" else _read_csv)(text)
    if not rows and not problems:
        problems.append("the file holds no rows; write one prompt per row (see circuitlib.tasks.files)")
    if problems:
        raise ValueError(_report(path, problems))
    return FileTask(path, rows, name)


def _read_jsonl(text: str) -> tuple[list[Row], list[str]]:
    rows, problems = [], []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            problems.append(f"line {line} is not JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            problems.append(f'line {line} is not a JSON object like {{"prompt": "...", "answer": " ..."}}')
            continue
        row = _row(line, obj, problems)
        if row is not None:
            rows.append(row)
    return rows, problems


def _read_csv(text: str) -> tuple[list[Row], list[str]]:
    reader = csv.reader(text.splitlines())
    header = next((values for values in reader if any(v.strip() for v in values)), None)
    if header is None:
        return [], []
    if sorted(header) != ["answer", "prompt"]:
        return [], [f"line {reader.line_num} must be the header 'prompt,answer'; found {','.join(header)!r}"]
    rows, problems = [], []
    for values in reader:
        line = reader.line_num
        if not any(v.strip() for v in values):
            continue
        if len(values) != 2:
            problems.append(
                f"line {line} has {len(values)} values, not 2 (prompt,answer); quote values that contain a comma"
            )
            continue
        row = _row(line, dict(zip(header, values)), problems)
        if row is not None:
            rows.append(row)
    return rows, problems


def _row(line: int, obj: dict, problems: list[str]) -> Row | None:
    """A Row from one parsed record, or None after adding what is wrong with it to `problems`."""
    found = []
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        found.append(
            f"unknown field{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} (allowed: {', '.join(FIELDS)})"
        )
    for key in ("prompt", "answer"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            found.append(f"{key!r} must be a non-empty string" + ("" if key in obj else " (missing)"))
    answers = obj.get("answers", [])
    if "answers" in obj and not (
        isinstance(answers, list) and answers and all(isinstance(a, str) and a for a in answers)
    ):
        found.append("'answers' must be a non-empty list of non-empty strings")
    if found:
        problems.append(f"line {line}: {'; '.join(found)}")
        return None
    return Row(line, obj["prompt"], obj["answer"], tuple(dict.fromkeys(answers)))


def _lines(lines: list[int]) -> str:
    shown = ", ".join(map(str, lines[:MAX_LISTED]))
    return shown + (f" and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else "")


def _report(path: Path, problems: list[str]) -> str:
    """One line naming the file and its problems (the first MAX_LISTED, and how many more)."""
    shown = "; ".join(problems[:MAX_LISTED])
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"task file {path}: {len(problems)} problem{'s' * (len(problems) > 1)}: {shown}{more}"
