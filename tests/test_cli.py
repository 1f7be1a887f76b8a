"""The command line: extract writes a complete run folder; evaluate reads it alone; bad input writes nothing."""

import json
import subprocess
import sys

import pytest

from circuitlib.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ioi"
    assert main(["extract", "--model", "tiny-gpt2", "--task", "ioi", "--alpha", "1e-4", "--n", "12",
                 "--include-mlps", "--out", str(out)]) == 0
    return out


def test_extract_writes_a_complete_run_folder(run_dir):
    record = json.loads((run_dir / "circuit.json").read_text())
    assert record["settings"] | {"alpha": 1e-4} == {
        "model": "tiny-gpt2", "task": "ioi", "alpha": 1e-4, "ablation": "mean", "include_mlps": True, "seed": 0,
        "n": 12, "order": "heads-ascending", "method": "fast"}
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
    code = ("import sys, json; from circuitlib.cli import main; rc = main(['evaluate', sys.argv[1], '--json']); "
            "assert 'transformer_lens' not in sys.modules; sys.exit(rc)")
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
    out = subprocess.run([sys.executable, "-m", "circuitlib", "extract", "--model", "tiny-gpt2", "--task",
                          "greater-than", "--alpha", "0.001", "--n", "8", "--out", str(tmp_path / "gt")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "parameter reduction" in out.stdout and (tmp_path / "gt" / "circuit.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--alpha", "-1"], "alpha must be a number >= 0"),
    (["--alpha", "nan"], "alpha must be a number >= 0"),
    (["--model", "gpt3"], "unknown model"),
    (["--n", "0"], "--n must be a positive number"),
])
def test_bad_input_gives_one_clear_error_and_writes_nothing(tmp_path, capsys, args, message):
    base = {"--model": "tiny-gpt2", "--task": "ioi", "--alpha": "0.01", "--n": "8"}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["extract", *[x for kv in base.items() for x in kv], "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.lower() in err.lower() and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, value", [("--task", "sums"), ("--ablation", "resample")])
def test_unknown_task_or_scheme_is_refused(tmp_path, flag, value):
    argv = ["extract", "--model", "tiny-gpt2", "--task", "ioi", "--alpha", "0.01", "--ablation", "mean",
            "--out", str(tmp_path / "o")]
    argv[argv.index(flag) + 1] = value
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and list(tmp_path.iterdir()) == []


def test_an_existing_run_is_not_overwritten(run_dir, capsys):
    before = (run_dir / "circuit.json").read_text()
    assert main(["extract", "--model", "tiny-gpt2", "--task", "ioi", "--alpha", "0.5", "--n", "8",
                 "--out", str(run_dir)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (run_dir / "circuit.json").read_text() == before


def test_force_replaces_a_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main(["extract", "--model", "tiny-gpt2", "--task", "ioi", "--alpha", "0.5", "--n", "8",
                 "--out", str(out), "--force"]) == 0
    assert not (out / "old.txt").exists() and (out / "circuit.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary folder left behind


def test_evaluate_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
