"""Tasks: the built-in ones of the paper, tasks read from files, and one registry for both.

`get_task(name)` returns a registered task, or the task a .jsonl/.csv file defines. A task turns a
tokenizer and a seed into three disjoint splits of prompts of one length (`TaskData`).
"""

from __future__ import annotations

import os

from circuitlib.tasks.builtin import (
    ACRONYM_WORDS,
    GREATER_THAN_NOUNS,
    IOI,
    IOI_NAMES,
    IOI_OBJECTS,
    IOI_PLACES,
    IOI_TEMPLATES,
    SPLITS,
    Acronyms,
    GreaterThan,
    IOIMixed,
    Task,
    TaskData,
    TaskSplit,
    ioi_subject_tokens,
    is_gpt2_tokenizer,
    letter_plus_one_token_words,
    letter_tokens,
    make_split,
    one_token_words,
    split_acronyms,
    split_letter_pairs,
)
from circuitlib.tasks.files import SUFFIXES, FileTask, load_task_file

__all__ = [
    "SPLITS",
    "Task",
    "TaskSplit",
    "TaskData",
    "make_split",
    "FileTask",
    "load_task_file",
    "get_task",
    "register_task",
    "TASKS",
    "TASK_NAMES",
    "Acronyms",
    "IOI",
    "IOIMixed",
    "GreaterThan",
    "IOI_TEMPLATES",
    # the word lists and the tokenizer filters the built-in tasks apply (the chapters show them)
    "ACRONYM_WORDS",
    "GREATER_THAN_NOUNS",
    "IOI_NAMES",
    "IOI_OBJECTS",
    "IOI_PLACES",
    "is_gpt2_tokenizer",
    "letter_plus_one_token_words",
    "one_token_words",
    "split_acronyms",
    "split_letter_pairs",
    "ioi_subject_tokens",
    "letter_tokens",
]

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make `task` available to `get_task` under `task.name`."""
    if not task.name:
        raise ValueError(f"{task!r} has no name; set the class attribute `name`")
    if task.name in TASKS:
        raise ValueError(f"a task named {task.name!r} is already registered; pick another name")
    TASKS[task.name] = task
    return task


def get_task(name: str | os.PathLike) -> Task:
    """The registered task called `name`, the input space of a compiled program ("tracr-<program>"), or the
    task in a .jsonl or .csv file (`circuitlib.tasks.files`).

    A compiled program's task (`circuitlib.tasks.compiled.CompiledTask`) gives its inputs grouped by length;
    it is not a text task and has no tokenizer.
    """
    name = os.fspath(name)
    if name in TASKS:
        return TASKS[name]
    if name.startswith("tracr-"):  # imported here: no JAX or Tracr for the text tasks
        from circuitlib.tasks.compiled import get_compiled_task

        return get_compiled_task(name)
    if name.endswith(SUFFIXES) or os.path.isfile(name):
        return load_task_file(name)
    raise ValueError(
        f"unknown task {name!r}; choose one of {', '.join(TASKS)}, or give a task file "
        f"(prompts and answers in a {' or '.join(SUFFIXES)} file)"
    )


register_task(Acronyms())
register_task(IOI())
register_task(GreaterThan())
register_task(IOIMixed())
TASK_NAMES = ("acronyms", "ioi", "greater-than")  # the paper's tasks
