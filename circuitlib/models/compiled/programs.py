"""RASP programs to compile: the built-in ones and a user's program file.

A program is a RASP expression (`program`), the set of input tokens (`vocab`) and the longest
input (`max_seq_len`, without BOS). Every input is a BOS token followed by 1..max_seq_len tokens.

Built-in programs (`BUILTIN`):
- reverse:       ACDC's and Edge Pruning's reverse: length by SelectorWidth, opp_index = length -
                 indices - 1, Aggregate of the tokens at opp_index. vocab {1, 2, 3}, max_seq_len 5.
- xproportion:   `make_frac_prevs(tokens == "x")`: the fraction of "x" so far (numerical output).
                 vocab {w, x, y, z}, max_seq_len 5.
- hist:          `make_hist()`: how often each token occurs (SelectorWidth). vocab {a, b, c}, 4.
- sort_unique:   `make_sort_unique(tokens, tokens)`: sorts inputs of distinct tokens (only those
                 are in its input space). vocab {1, 2, 3, 4, 5}, max_seq_len 4.
- shuffle_dyck2: `make_shuffle_dyck2()`: 1 if the brackets "()" and "{}" balance (shuffled Dyck-2);
                 two pair balances side by side, so more than one head in a layer. max_seq_len 4.

The metric that fits each output (`scoring.divergence`): reverse, hist, sort_unique and
shuffle_dyck2 have categorical outputs (KL over the output values); xproportion has a numerical
one (squared error). Every position but BOS counts (the last-position variant is an option).

A user's file is plain Python that defines `program`, `vocab` and `max_seq_len` (see `load_file`).
Nothing here imports Tracr until a program is built.
"""

from __future__ import annotations

import hashlib
import runpy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BOS = "BOS"


class ProgramError(ValueError):
    """A program that cannot be loaded or compiled; the message names the problem and the fix."""


@dataclass(frozen=True)
class Program:
    """A RASP program to compile. `make()` builds the RASP expression (imports Tracr)."""

    name: str  # "reverse", or "file-<sha256 prefix>" for a user's file
    make: Callable[[], object]
    vocab: frozenset
    max_seq_len: int
    valid: Callable[[tuple], bool] | None = None  # inputs outside the program's domain (None: all valid)
    source: str = ""  # where a user's program came from


def _reverse():
    from tracr.rasp import rasp

    length = rasp.SelectorWidth(rasp.Select(rasp.tokens, rasp.tokens, rasp.Comparison.TRUE)).named("length")
    opp_index = (length - rasp.indices - 1).named("opp_index")
    flip = rasp.Select(rasp.indices, opp_index, rasp.Comparison.EQ).named("flip")
    return rasp.Aggregate(flip, rasp.tokens).named("reverse")


def _xproportion():
    from tracr.compiler.lib import make_frac_prevs
    from tracr.rasp import rasp

    return make_frac_prevs(rasp.tokens == "x")


def _hist():
    from tracr.compiler.lib import make_hist

    return make_hist()


def _sort_unique():
    from tracr.compiler.lib import make_sort_unique
    from tracr.rasp import rasp

    return make_sort_unique(rasp.tokens, rasp.tokens)


def _shuffle_dyck2():
    from tracr.compiler.lib import make_shuffle_dyck2

    return make_shuffle_dyck2()


def _distinct(tokens: tuple) -> bool:
    return len(set(tokens)) == len(tokens)


BUILTIN: dict[str, Program] = {
    p.name: p
    for p in (
        Program("reverse", _reverse, frozenset({1, 2, 3}), 5),
        Program("xproportion", _xproportion, frozenset({"w", "x", "y", "z"}), 5),
        Program("hist", _hist, frozenset({"a", "b", "c"}), 4),
        Program("sort_unique", _sort_unique, frozenset({1, 2, 3, 4, 5}), 4, valid=_distinct),
        Program("shuffle_dyck2", _shuffle_dyck2, frozenset({"(", ")", "{", "}"}), 4),
    )
}

MODEL_PREFIX = "tracr-"


def builtin(name: str) -> Program:
    if name not in BUILTIN:
        raise ProgramError(
            f"unknown Tracr program {name!r}; built-in programs: {', '.join(BUILTIN)} "
            "(or give the path of a .py file defining program, vocab and max_seq_len)"
        )
    return BUILTIN[name]


def resolve(name_or_path: str) -> Program:
    """A built-in program by name, or the program defined in a .py file (path ending in .py)."""
    text = str(name_or_path)
    if text.endswith(".py") or "/" in text:
        return load_file(text)
    return builtin(text)


def file_key(path: str | Path) -> str:
    """The cache name of a program file: its content's hash (the same file compiles once)."""
    return "file-" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def load_file(path: str | Path) -> Program:
    """The program defined in a Python file: `program` (a RASP SOp), `vocab` (a set), `max_seq_len` (an int).

    The file is run as a script (it imports Tracr itself). Refuses, with one ProgramError naming the
    problem, a missing file, a file that fails to run, and one that does not define the three names
    with the right types.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ProgramError(
            f"program file {path} does not exist; give a built-in program ({', '.join(BUILTIN)}) "
            "or a .py file defining program, vocab and max_seq_len"
        )
    from tracr.rasp import rasp

    try:
        namespace = runpy.run_path(str(path))
    except Exception as e:  # the user's code: any failure is reported as one line
        raise ProgramError(f"program file {path} failed to run: {type(e).__name__}: {e}") from None
    missing = [n for n in ("program", "vocab", "max_seq_len") if n not in namespace]
    if missing:
        raise ProgramError(
            f"program file {path} does not define {', '.join(missing)}; it must define "
            "program (a RASP expression), vocab (a set of tokens) and max_seq_len (an int)"
        )
    program, vocab, max_seq_len = namespace["program"], namespace["vocab"], namespace["max_seq_len"]
    if not isinstance(program, rasp.SOp):
        raise ProgramError(
            f"in {path}, program is a {type(program).__name__}, not a RASP SOp "
            "(e.g. program = rasp.Map(lambda x: x + 1, rasp.tokens))"
        )
    if (
        not isinstance(vocab, (set, frozenset))
        or not vocab
        or not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in vocab)
    ):
        raise ProgramError(f"in {path}, vocab must be a non-empty set of ints or strings, got {vocab!r}")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ProgramError(f"in {path}, max_seq_len must be an int >= 1, got {max_seq_len!r}")
    if BOS in vocab:
        raise ProgramError(f"in {path}, vocab contains {BOS!r}, the BOS token the compiler adds; rename that token")
    return Program(file_key(path), lambda: program, frozenset(vocab), max_seq_len, source=str(path.resolve()))
