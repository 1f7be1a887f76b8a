"""A fuzzer for every input a user gives: task files, study specs, command lines, damaged run folders and stores.

The contract checked on every generated input: the command either works, or exits 2 with exactly
one line on stderr (no traceback), and leaves nothing half-written (no file or folder beyond a
complete result). To stay fast, the commands run in this process (`circuitlib.cli.main`) on the
tiny random GPT-2 and stop where the real work would start (`Reached`): what is fuzzed is the
checking of the input, which is where bad input must be caught.

Bounded and reproducible in `make test` (the "ci" profile: a fixed seed, few examples); `make fuzz`
selects the "fuzz" profile (CIRCUITLIB_FUZZ=1: many more examples, a fresh seed each run).
"""

import json
import os
import shutil
import string
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitlib.cli import main
from circuitlib.pipeline import edges as edges_train
from circuitlib.pipeline import extraction as experiment
from circuitlib.studies import runner

settings.register_profile(
    "ci",
    max_examples=15,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz",
    max_examples=400,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("fuzz" if os.environ.get("CIRCUITLIB_FUZZ") else "ci")


class Reached(BaseException):
    """The input was accepted and the real work was about to start (a BaseException: nothing catches it)."""


def _reached(*args, **kwargs):
    raise Reached


@contextmanager
def stop_at_the_work():
    """Stop an accepted command where its work would start: the sweep, the gate training, a study's units."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(experiment, "extract", _reached)
        mp.setattr(edges_train, "train_edges", _reached)
        mp.setattr(runner, "run_unit", _reached)
        yield


def snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


def run_cli(argv: list[str], capsys) -> tuple[object, str]:
    """The command's exit status ("reached" if it got to the work) and its stderr."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    except Reached:
        code = "reached"
    return code, capsys.readouterr().err


def check_contract(code, err: str, before: dict, after: dict, allowed_new=()) -> None:
    """Works (0 or reached), or exits 2 with one line and nothing written; no traceback either way."""
    assert "Traceback" not in err, err
    assert code in (0, 2, "reached"), (code, err)
    new = set(after) - set(before)
    if code == 2:
        lines = err.strip("\n").split("\n")
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert after == before, f"a refused command changed files: {sorted(set(after) ^ set(before))}"
    else:
        stray = [p for p in new if not any(p == a or p.startswith(a + os.sep) for a in allowed_new)]
        assert not stray, f"unexpected new files: {sorted(stray)}"
    assert not [p for p in after if ".tmp" in p or "write-test" in p], "a temporary file was left behind"


# ---- task files ---------------------------------------------------------------------------------

WORDS = [
    "The capital of France is",
    "The capital of Spain is",
    "The capital of Italy is",
    "A B C",
    "The capital of Peru is",
    "The capital of Chile is",
    "x",
    "",
    " ",
    '"',
    "a,b",
    "é ü",
    "\n",
    "1 2 3 4 5 6",
]
ANSWERS = [" Paris", " Madrid", " Rome", " Lima", " Santiago", " Ouagadougou", "", " ", "Paris", "\t", " 7"]

json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(ANSWERS + WORDS),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=4,
)
jsonl_row = st.one_of(
    st.fixed_dictionaries({"prompt": st.sampled_from(WORDS), "answer": st.sampled_from(ANSWERS)}),
    st.fixed_dictionaries(
        {
            "prompt": st.sampled_from(WORDS),
            "answer": st.sampled_from(ANSWERS),
            "answers": st.lists(st.sampled_from(ANSWERS), max_size=3),
        }
    ),
    st.dictionaries(st.sampled_from(["prompt", "answer", "answers", "label", ""]), json_value, max_size=3),
).map(json.dumps) | st.sampled_from(["", "{", "[]", "null", '"text"', '{"prompt": 1}', "\ufeff{}"])
csv_text = st.lists(
    st.lists(st.sampled_from(WORDS + ANSWERS), min_size=1, max_size=3).map(
        lambda cells: ",".join(f'"{c}"' if "," in c or "\n" in c else c for c in cells)
    ),
    max_size=12,
)


@st.composite
def task_files(draw):
    if draw(st.booleans()):
        rows = draw(st.lists(jsonl_row, max_size=12))
        return ".jsonl", "\n".join(rows) + draw(st.sampled_from(["", "\n", "\n\n"]))
    header = draw(st.sampled_from(["prompt,answer", "answer,prompt", "prompt", "prompt,answer,extra", "", "a,b"]))
    return ".csv", "\n".join([header, *draw(csv_text)]) + "\n"


@given(task_files(), st.sampled_from(["1", "2", "3", "0", "-1", "1000000"]))
def test_task_files(capsys, file, n):
    suffix, text = file
    with tempfile.TemporaryDirectory() as tmp, stop_at_the_work():
        tmp = Path(tmp)
        task = tmp / f"fuzzed{suffix}"
        task.write_text(text)
        before = snapshot(tmp)
        code, err = run_cli(
            [
                "extract",
                "--model",
                "tiny-gpt2",
                "--task",
                str(task),
                "--alpha",
                "0.01",
                "--n",
                n,
                "--out",
                str(tmp / "run"),
            ],
            capsys,
        )
        check_contract(code, err, before, snapshot(tmp))


# ---- study specs --------------------------------------------------------------------------------

spec_values = {
    "name": st.sampled_from(["s", "", "a/b", 3, None]),
    "model": st.sampled_from(["tiny-gpt2", "gpt3", "", 7, ["tiny-gpt2"], "./nowhere"]),
    "tasks": st.sampled_from(
        [["ioi"], ["ioi", "greater-than"], ["acronyms"], [], "ioi", ["nope"], [1], ["missing.jsonl"]]
    ),
    "ablations": st.sampled_from([["mean"], ["zero"], ["mean", "zero"], [], ["resample"], "mean"]),
    "include_mlps": st.sampled_from([[False], [True, False], "yes", [], [1]]),
    "alphas": st.sampled_from(
        [
            [0.01],
            [0.1, 0.01],
            [],
            [-1],
            [float("nan")],
            "0.01",
            [True],
            {"from": 0.001, "to": 1, "points": 3},
            {"from": 0, "to": 1, "points": 2},
            {"from": 1, "to": 0.1, "points": 2},
            {"from": 0.1, "to": 1},
        ]
    ),
    "seeds": st.sampled_from([1, 2, 0, -1, [0, 1], [1, 1], "x", [0.5]]),
    "n": st.sampled_from([2, 3, 0, -1, "x", 1.5, True, None, {"ioi": 2}, 3000]),
    "n_test": st.sampled_from([2, 0, "many", None]),
    "order": st.sampled_from(["heads-ascending", "random", 3]),
    "device": st.sampled_from(["cpu", "tpu", "cuda:7", 1]),
    "store": st.sampled_from(["results/fuzz", "", "/proc/fuzz", "spec.yml/inside", 5]),
    "batch": st.sampled_from([3]),
}
specs = st.one_of(
    st.fixed_dictionaries(
        {
            "model": spec_values["model"],
            "tasks": spec_values["tasks"],
            "alphas": spec_values["alphas"],
            "n": spec_values["n"],
        },
        optional={k: v for k, v in spec_values.items() if k not in ("model", "tasks", "alphas", "n")},
    ).map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.text(alphabet=string.printable, max_size=60),  # malformed YAML, or YAML of the wrong shape
    st.sampled_from(["", "- a\n- b\n", "model: [\n", "n: 3\n", "\x00", "tasks: !!python/object:os.system {}\n"]),
)


@given(
    specs,
    st.sampled_from(["run", "status", "show"]),
    st.sampled_from(
        [
            [],
            ["--workers", "0"],
            ["--workers", "-1"],
            ["--max-units", "0"],
            ["--task", "tsp"],
            ["--threads", "0"],
            ["--device", "tpu"],
            ["--json"],
        ]
    ),
)
def test_study_specs(capsys, text, command, extra):
    if command != "run":
        extra = [a for a in extra if a == "--json"]
    elif "--json" in extra:
        extra = ["--workers", "0"]
    elif "--workers" not in extra:
        extra = [*extra, "--workers", "0"]  # serially, in this process
    with tempfile.TemporaryDirectory() as tmp, stop_at_the_work():
        tmp = Path(tmp)
        spec = tmp / "spec.yml"
        spec.write_text(text)
        before = snapshot(tmp)
        code, err = run_cli(["study", command, str(spec), *extra], capsys)
        # once a run reaches its units, the store's (empty) folders exist: that is the complete start of a store
        check_contract(code, err, before, snapshot(tmp), allowed_new=["results"] if code == "reached" else ())


# ---- command lines ------------------------------------------------------------------------------

VALUES = {
    "--model": ["tiny-gpt2", "gpt3", "", "./nowhere", "{tmp}"],
    "--task": ["ioi", "acronyms", "greater-than", "capitals", "{tmp}/missing.jsonl", "{tmp}", "{tmp}/x.txt"],
    "--alpha": ["0.01", "0", "-0", "-1", "nan", "inf", "1e400", "x", ""],
    "--n": ["1", "2", "0", "-5", "x", "1e3", "100000000"],
    "--seed": ["0", "-1", "x", "99999999999999999999"],
    "--ablation": ["mean", "zero", "corrupted", "resample"],
    "--order": ["heads-ascending", "heads-descending", "random"],
    "--method": ["fast", "plain", "slow"],
    "--device": ["cpu", "cuda", "cuda:3", "tpu", "", "cpu:0"],
    "--out": ["{tmp}/run", "{tmp}/x.txt", "{tmp}/full", "/proc/fuzz-run", "{tmp}/x.txt/run", ""],
    "--target-sparsity": ["0.5", "0", "1", "-0.1", "nan", "x"],
    "--node-target-sparsity": ["0.5", "1", "x"],
    "--steps": ["2", "0", "-1", "x"],
    "--warmup": ["1", "0", "5", "x"],
    "--batch-size": ["1", "2", "0", "1000"],
    "--lr": ["0.8", "0", "-1", "nan", "inf"],
    "--reg-lr": ["0.8", "0", "nan"],
    "--split": ["validation", "test", "train"],
    "--format": ["onnx", "tflite"],
}
FLAGS = {
    "extract": [
        "--model",
        "--task",
        "--alpha",
        "--n",
        "--seed",
        "--ablation",
        "--order",
        "--method",
        "--device",
        "--out",
        "--include-mlps",
        "--force",
        "--json",
        "--bogus",
    ],
    "edges": [
        "--model",
        "--task",
        "--target-sparsity",
        "--node-target-sparsity",
        "--steps",
        "--warmup",
        "--batch-size",
        "--lr",
        "--reg-lr",
        "--n",
        "--seed",
        "--ablation",
        "--device",
        "--out",
        "--force",
        "--json",
    ],
    "evaluate": ["--split", "--json", "--bogus"],
    "export": ["--format", "--out", "--force"],
}
SWITCHES = {"--include-mlps", "--force", "--json", "--bogus"}


@st.composite
def command_lines(draw):
    command = draw(st.sampled_from(sorted(FLAGS)))
    flags = draw(st.lists(st.sampled_from(FLAGS[command]), unique=True, max_size=len(FLAGS[command])))
    if command in ("extract", "edges") and draw(st.booleans()):  # usually the required options, too
        required = ["--model", "--task", "--out"] + (["--alpha"] if command == "extract" else ["--target-sparsity"])
        flags = required + [f for f in flags if f not in required]
    argv = [command]
    if command in ("evaluate", "export"):
        argv.append(draw(st.sampled_from(["{tmp}/full", "{tmp}", "{tmp}/missing", "{tmp}/x.txt"])))
    for flag in flags:
        argv.append(flag)
        if flag not in SWITCHES:
            argv.append(draw(st.sampled_from(VALUES.get(flag, ["1"]))))
    if command == "edges" and "--n" not in flags:
        argv += ["--n", "2", "--batch-size", "2"]  # the default n (hundreds of prompts) costs seconds
    return argv


@given(command_lines())
def test_command_lines(capsys, argv):
    with tempfile.TemporaryDirectory() as tmp, stop_at_the_work():
        tmp = Path(tmp)
        (tmp / "x.txt").write_text("not a folder")
        (tmp / "full").mkdir()
        (tmp / "full" / "old.txt").write_text("an earlier result")
        argv = [a.replace("{tmp}", str(tmp)) for a in argv]
        before = snapshot(tmp)
        code, err = run_cli(argv, capsys)
        check_contract(code, err, before, snapshot(tmp))


# ---- damaged run folders and stores ---------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A real run folder and a real study store (tiny-gpt2, 2 prompts per split), made once."""
    root = tmp_path_factory.mktemp("fuzz")
    assert (
        main(
            [
                "extract",
                "--model",
                "tiny-gpt2",
                "--task",
                "ioi",
                "--alpha",
                "0.01",
                "--n",
                "2",
                "--out",
                str(root / "run"),
            ]
        )
        == 0
    )
    spec = root / "spec.yml"
    spec.write_text(
        yaml.safe_dump(
            {
                "model": "tiny-gpt2",
                "tasks": ["ioi"],
                "ablations": ["zero"],
                "include_mlps": [False],
                "alphas": [0.01, 0.1],
                "seeds": 2,
                "n": 2,
            }
        )
    )
    assert main(["study", "run", str(spec), "--workers", "0"]) == 0
    return root


@st.composite
def damages(draw, names):
    """(file, new bytes or None to delete) pairs: cut short, emptied, foreign bytes, JSON of another shape."""
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    out = []
    for name in chosen:
        kind = draw(st.sampled_from(["delete", "truncate", "empty", "bytes", "json"]))
        content = {
            "delete": None,
            "empty": b"",
            "truncate": draw(st.floats(0, 1)),
            "bytes": draw(st.binary(max_size=64)),
            "json": json.dumps(
                draw(
                    st.recursive(
                        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                        lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(
                            st.sampled_from(
                                [
                                    "settings",
                                    "model",
                                    "task",
                                    "n",
                                    "seed",
                                    "tokens_digest",
                                    "snapshot",
                                    "seconds",
                                    "states",
                                    "run",
                                    "pid",
                                    "host",
                                    "done",
                                    "total",
                                ]
                            ),
                            inner,
                            max_size=4,
                        ),
                        max_leaves=8,
                    )
                )
            ).encode(),
        }[kind]
        out.append((name, content))
    return out


def _damage(folder: Path, damage) -> None:
    for name, content in damage:
        path = folder / name
        if not path.is_file():
            continue
        if content is None:
            path.unlink()
        elif isinstance(content, float):
            path.write_bytes(path.read_bytes()[: int(content * path.stat().st_size)])
        else:
            path.write_bytes(content)


RUN_FILES = [
    "circuit.json",
    "model.json",
    "model.safetensors",
    "reference.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]


@given(damages(RUN_FILES), st.sampled_from(["validation", "test"]))
def test_damaged_run_folders(capsys, finished, damage, split):
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(finished / "run", run)
        _damage(run, damage)
        before = snapshot(Path(tmp))
        code, err = run_cli(["evaluate", str(run), "--split", split], capsys)
        check_contract(code, err, before, snapshot(Path(tmp)))


STORE_FILES = ["units/{unit}.parquet", "running/{unit}.json", "failed/{unit}.json", "partial/{unit}.json"]


@given(damages(STORE_FILES), st.sampled_from(["status", "show"]))
def test_damaged_stores(capsys, finished, damage, command):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copytree(finished, tmp / "study", ignore=shutil.ignore_patterns("run"))
        store = tmp / "study" / "results" / "spec"
        unit = sorted((store / "units").glob("*.parquet"))[0].stem
        for sub in ("running", "failed", "partial"):  # something to damage in every folder
            (store / sub).mkdir(exist_ok=True)
            (store / sub / f"{unit}.json").write_text("{}")
        _damage(store, [(name.format(unit=unit), content) for name, content in damage])
        before = snapshot(tmp)
        code, err = run_cli(["study", command, str(tmp / "study" / "spec.yml")], capsys)
        if code == 0:  # a store that can be read in part is shown in part
            err = "\n".join(line for line in err.splitlines() if not line.startswith("left out: "))
        check_contract(code, err, before, snapshot(tmp))
