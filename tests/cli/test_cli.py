"""The command line: extract writes a complete run folder; evaluate reads it alone; bad input writes nothing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from circuitlib.cli import main
from circuitlib.core import memory
from circuitlib.models.loading import load_model
from circuitlib.pipeline import extraction as experiment

CAPITALS = Path(__file__).resolve().parents[2] / "examples" / "capitals.jsonl"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ioi"
    assert (
        main(
            [
                "extract",
                "--model",
                "tiny-gpt2",
                "--task",
                "ioi",
                "--alpha",
                "1e-4",
                "--n",
                "12",
                "--include-mlps",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_extract_writes_a_complete_run_folder(run_dir):
    record = json.loads((run_dir / "circuit.json").read_text())
    assert record["settings"] == {
        "model": "tiny-gpt2",
        "task": "ioi",
        "alpha": 1e-4,
        "ablation": "mean",
        "include_mlps": True,
        "seed": 0,
        "n": 12,
        "order": "heads-ascending",
        "method": "fast",
        "device": "cpu",
        "torch_threads": record["settings"]["torch_threads"],
    }
    assert len(record["decisions"]) == 4 * 4 + 4
    assert {"component", "kl_before", "kl_after", "delta", "pruned"} <= set(record["decisions"][0])
    assert all(isinstance(h, str) and "." in h for h in record["kept_heads"])
    for model in ("full", "pruned"):
        for split in ("validation", "test"):
            assert set(record["metrics"][model][split]) == {"accuracy", "kl"}
    assert record["metrics"]["full"]["validation"]["kl"] == 0.0
    for name in ("model.safetensors", "model.json", "reference.safetensors", "tokenizer.json"):
        assert (run_dir / name).is_file()
        assert (run_dir / name).stat().st_mode & 0o044 == 0o044, f"{name} is private"
    assert run_dir.stat().st_mode & 0o055 == 0o055, "the run folder is private"


def test_evaluate_reads_the_saved_model_alone(run_dir):
    # a fresh interpreter that must not import transformer_lens
    code = (
        "import sys, json; from circuitlib.cli import main; rc = main(['evaluate', sys.argv[1], '--json']); "
        "assert 'transformer_lens' not in sys.modules; sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    record = json.loads((run_dir / "circuit.json").read_text())
    assert report["accuracy"] == pytest.approx(record["metrics"]["pruned"]["validation"]["accuracy"])
    assert report["kl"] == pytest.approx(record["metrics"]["pruned"]["validation"]["kl"], rel=1e-5, abs=1e-7)
    assert report["kept_heads"] == record["kept_heads"]
    assert report["n_params"] == record["metrics"]["pruned"]["n_params"]


def test_evaluate_test_split(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--split", "test", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    record = json.loads((run_dir / "circuit.json").read_text())
    assert report["kl"] == pytest.approx(record["metrics"]["pruned"]["test"]["kl"], rel=1e-5, abs=1e-7)


def test_python_dash_m_entry_point(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "circuitlib",
            "extract",
            "--model",
            "tiny-gpt2",
            "--task",
            "greater-than",
            "--alpha",
            "0.001",
            "--n",
            "8",
            "--out",
            str(tmp_path / "gt"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "parameter reduction" in out.stdout and (tmp_path / "gt" / "circuit.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alpha", "-1"], "alpha must be a number >= 0"),
        (["--alpha", "nan"], "alpha must be a number >= 0"),
        (["--model", "gpt3"], "unknown model"),
        (["--n", "0"], "--n must be a positive number"),
        (["--alpha", "inf"], "alpha must be finite"),
        (["--alpha", "Infinity"], "alpha must be finite"),
        (["--task", "missing.jsonl"], "task file missing.jsonl does not exist"),
        (["--n", "100000", "--task", str(CAPITALS)], "the file has 36 rows; lower n to at most 12"),
    ],
)
def test_bad_input_gives_one_clear_error_and_writes_nothing(tmp_path, capsys, args, message):
    base = {"--model": "tiny-gpt2", "--task": "ioi", "--alpha": "0.01", "--n": "8"}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["extract", *[x for kv in base.items() for x in kv], "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.lower() in err.lower() and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_unknown_task_or_scheme_is_refused(tmp_path, capsys):
    argv = ["extract", "--model", "tiny-gpt2", "--task", "sums", "--alpha", "0.01", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert (
        "unknown task 'sums'; choose one of acronyms, ioi, greater-than, ioi-mixed, or give a task file"
        in capsys.readouterr().err
    )
    argv[argv.index("sums")] = "ioi"
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--ablation", "resample"])
    assert exit_info.value.code == 2 and list(tmp_path.iterdir()) == []


def test_an_existing_run_is_not_overwritten(run_dir, capsys):
    before = (run_dir / "circuit.json").read_text()
    assert (
        main(["extract", "--model", "tiny-gpt2", "--task", "ioi", "--alpha", "0.5", "--n", "8", "--out", str(run_dir)])
        == 2
    )
    assert "pass --force" in capsys.readouterr().err
    assert (run_dir / "circuit.json").read_text() == before


def test_force_replaces_a_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert (
        main(
            [
                "extract",
                "--model",
                "tiny-gpt2",
                "--task",
                "ioi",
                "--alpha",
                "0.5",
                "--n",
                "8",
                "--out",
                str(out),
                "--force",
            ]
        )
        == 0
    )
    assert not (out / "old.txt").exists() and (out / "circuit.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary folder left behind


def test_a_csv_task_file_is_kept_as_task_csv(tmp_path, capsys):
    import csv

    task = tmp_path / "capitals.csv"
    with task.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "answer"])
        writer.writerows([row["prompt"], row["answer"]] for row in map(json.loads, CAPITALS.read_text().splitlines()))
    out = tmp_path / "run"
    assert (
        main(["extract", "--model", "tiny-gpt2", "--task", str(task), "--alpha", "1e-4", "--n", "4", "--out", str(out)])
        == 0
    )
    assert json.loads((out / "circuit.json").read_text())["settings"]["task_file"] == "task.csv"
    assert (out / "task.csv").read_bytes() == task.read_bytes() and not (out / "task.jsonl").exists()
    task.unlink()
    assert main(["evaluate", str(out)]) == 0


def test_evaluate_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_a_task_file_end_to_end(tmp_path, capsys):
    task = tmp_path / "capitals.jsonl"
    shutil.copyfile(CAPITALS, task)
    out = tmp_path / "run"
    assert (
        main(
            [
                "extract",
                "--model",
                "tiny-gpt2",
                "--task",
                str(task),
                "--alpha",
                "1e-4",
                "--n",
                "6",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    record = json.loads((out / "circuit.json").read_text())
    assert record["settings"]["task"] == "capitals" and record["settings"]["task_file"] == "task.jsonl"
    assert (out / "task.jsonl").read_bytes() == CAPITALS.read_bytes()
    task.unlink()  # the run folder holds its own copy of the prompts
    capsys.readouterr()
    assert main(["evaluate", str(out), "--split", "test", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "capitals" and report["n"] == 6
    assert report["kl"] == pytest.approx(record["metrics"]["pruned"]["test"]["kl"], rel=1e-5, abs=1e-7)


def test_a_bad_task_file_is_refused_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "The capital of France is", "answer": " Paris"}\n'
        '{"prompt": "The capital of Burkina Faso is", "answer": " Ouagadougou"}\n'
    )
    monkeypatch.setattr("circuitlib.models.loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert (
        main(["extract", "--model", "tiny-gpt2", "--task", str(bad), "--alpha", "0.01", "--out", str(tmp_path / "out")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(line 2)" in err and "' Ouagadougou' is 5 tokens" in err
    assert "need at least 3 rows but the file has 2" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: (tmp / "file").write_text("x") and tmp / "file" / "run", "is a file, not a folder"),
        (lambda tmp: Path("/proc/circuitlib-run"), "is not writable"),
        (lambda tmp: (tmp / "ro").mkdir(mode=0o555) or tmp / "ro" / "deeper" / "run", "is not writable"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_the_work(tmp_path, capsys, monkeypatch, make, message):
    out = make(tmp_path)
    if "ro" in out.parts and os.geteuid() == 0:
        pytest.skip("root can write into a read-only folder")
    monkeypatch.setattr(experiment, "extract", lambda *a, **k: pytest.fail("the extraction started"))
    assert (
        main(["extract", "--model", "tiny-gpt2", "--task", "ioi", "--alpha", "0.01", "--n", "4", "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_n_beyond_memory_is_refused_with_the_limit_before_the_prompts_are_made(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**30)
    monkeypatch.setattr("circuitlib.tasks.Task.generate", lambda *a, **k: pytest.fail("the prompts were made"))
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
                "100000",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    limit = int(err.rsplit("at most ", 1)[1])
    assert "GiB for this extraction" in err and 0 < limit < 100000
    cfg = load_model("tiny-gpt2")[0].cfg
    assert experiment.extraction_memory(cfg, limit, 15) <= 2**30 < experiment.extraction_memory(cfg, limit + 1, 15)
    assert list(tmp_path.iterdir()) == []


def test_minus_zero_alpha_is_stored_as_zero(tmp_path):
    assert (
        main(
            [
                "extract",
                "--model",
                "tiny-gpt2",
                "--task",
                "ioi",
                "--alpha",
                "-0",
                "--n",
                "4",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    text = (tmp_path / "run" / "circuit.json").read_text()
    assert json.loads(text)["alpha"] == 0 and '"alpha": 0.0' in text and "-0.0" not in text


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda run: shutil.rmtree(run), "does not exist"),
        (lambda run: (run / "circuit.json").write_text('{"settings": {'), "cannot be read as JSON"),
        (
            lambda run: (run / "circuit.json").write_text('{"settings": {"model": "tiny-gpt2"}}'),
            "lacks settings.task, settings.n, settings.seed, tokens_digest.validation, tokens_digest.test",
        ),
        (
            lambda run: [(run / f).unlink() for f in ("tokenizer.json", "vocab.json", "merges.txt")],
            "the tokenizer files in",
        ),
        (lambda run: (run / "tokenizer.json").write_text(""), "the tokenizer files in"),  # found by tests/test_fuzz.py
        (lambda run: (run / "model.safetensors").unlink(), "model.safetensors is missing"),
        (
            lambda run: (run / "reference.safetensors").write_bytes(b"oops"),
            "reference.safetensors is missing or damaged",
        ),
    ],
)
def test_evaluate_names_the_damage_in_a_run_folder(run_dir, tmp_path, capsys, damage, message):
    run = tmp_path / "copy"
    shutil.copytree(run_dir, run)
    damage(run)
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [["extract", "--model", "tiny-gpt2"], ["edges", "--bogus"], ["study"], [], ["evaluate", "x", "--split", "train"]],
)
def test_a_bad_command_line_is_one_line_not_the_usage(capsys, argv):
    """argparse prints its whole usage before the error; found by tests/test_fuzz.py."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--help" in err


def test_ctrl_c_during_the_extraction_writes_nothing(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "extract", interrupted)
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
                "4",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 130
    )
    assert capsys.readouterr().err.startswith("interrupted") and list(tmp_path.iterdir()) == []


def test_ctrl_c_while_saving_leaves_no_half_written_folder(tmp_path, capsys, monkeypatch):
    from circuitlib.core.model import Transformer

    save = Transformer.save

    def save_then_interrupt(self, directory):
        save(self, directory)
        raise KeyboardInterrupt

    monkeypatch.setattr(Transformer, "save", save_then_interrupt)
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
                "4",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 130
    )
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_in_a_real_process_exits_130_without_a_traceback(tmp_path, interruptible):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "circuitlib",
            "extract",
            "--model",
            "tiny-gpt2",
            "--task",
            "ioi",
            "--alpha",
            "0.01",
            "--n",
            "100",
            "--include-mlps",
            "--method",
            "plain",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **interruptible,
    )
    seen = []
    # read what arrives as it arrives (byte by byte lagged behind a loaded machine: the run could end first)
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: process.stderr.read1(4096), b"")))
    reader.start()
    deadline = time.time() + 300
    while b"extract (plain" not in b"".join(seen) and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    reader.join()
    err = b"".join(seen).decode()
    assert "Traceback" not in err and err.rstrip().splitlines()[-1].startswith("interrupted")
    assert list(tmp_path.iterdir()) == []
