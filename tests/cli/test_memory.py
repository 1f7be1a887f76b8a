"""Memory limits: the process's own limits (RLIMIT_AS, cgroups) bound every up-front size check, and an
allocation failure that still happens is one clear error naming a size that fits."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from circuitlib.cli import main
from circuitlib.core import memory

ROOT = Path(__file__).resolve().parents[2]

# Runs the CLI under an address-space limit of the process's address space after its imports and
# model load plus HEADROOM GiB (torch alone reserves far more address space than it uses, so the
# limit is set relative to what is already mapped). FORCE_BYTES > 0: the extraction, once started,
# asks for a tensor that large, as a sweep whose estimate was too low would.
LIMITED = """
import resource, sys
import psutil, torch
from circuitlib.core import memory
from circuitlib.pipeline import extraction as experiment
from circuitlib.cli import main
from circuitlib.models.loading import load_model
load_model("tiny-gpt2")
headroom, force = float(sys.argv[1]), int(sys.argv[2])
if force:
    real = experiment.extract
    def extract(*args, **kwargs):
        torch.empty(force, dtype=torch.uint8)
        return real(*args, **kwargs)
    experiment.extract = extract
limit = psutil.Process().memory_info().vms + int(headroom * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(main(sys.argv[3:]))
"""


def _extract_limited(tmp_path, n: int, headroom: float = 0.7, force: int = 0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    argv = [
        "extract",
        "--model",
        "tiny-gpt2",
        "--task",
        "acronyms",
        "--alpha",
        "0.01",
        "--n",
        str(n),
        "--out",
        str(tmp_path / "run"),
    ]
    return subprocess.run(
        [sys.executable, "-c", LIMITED, str(headroom), str(force), *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_an_n_beyond_the_address_space_limit_is_refused_and_the_n_it_names_fits(tmp_path):
    refused = _extract_limited(tmp_path, 5000)
    assert refused.returncode == 2, refused.stderr
    err = refused.stderr.strip()
    assert "\n" not in err and "address-space limit (ulimit -v)" in err and "Traceback" not in err
    assert err.startswith("error: --n 5000 would need about") and "lower --n to at most " in err
    assert list(tmp_path.iterdir()) == []
    fits = int(err.rsplit("at most ", 1)[1])
    assert 1 <= fits < 5000
    # the process's address space at the check varies by a few MiB from run to run: 50 MiB more headroom
    # keeps the check from refusing the boundary n again, and is far below the estimate's fixed part
    done = _extract_limited(tmp_path, fits, headroom=0.7 + 0.05)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "circuit.json").is_file()


def test_an_allocation_failure_inside_the_work_is_one_line_naming_a_smaller_n(tmp_path):
    failed = _extract_limited(tmp_path, 20, headroom=1.0, force=2 * 2**30)
    assert failed.returncode == 2, failed.stderr
    err = failed.stderr.strip().splitlines()[-1]  # above it: only the progress bar's line
    assert "Traceback" not in failed.stderr and all(
        line.startswith("extract (") or line == err for line in failed.stderr.strip().splitlines()
    )
    assert err.startswith("error: ran out of memory during the extraction at --n 20 (")
    assert "(can't allocate memory: you tried to allocate 2147483648 bytes); nothing was written; " in err
    assert err.endswith("lower --n to at most 10")
    assert list(tmp_path.iterdir()) == []


def test_effective_limit_is_the_smallest_of_ram_rlimit_and_cgroup(monkeypatch):
    import resource

    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 8 * 2**30})())
    monkeypatch.setattr(memory, "cgroup_headroom", lambda: None)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert memory.effective_memory_limit() == (8 * 2**30, "free RAM")
    monkeypatch.setattr(memory, "cgroup_headroom", lambda: 3 * 2**30)
    assert memory.effective_memory_limit() == (3 * 2**30, "the cgroup's memory limit")
    vms = psutil.Process().memory_info().vms
    monkeypatch.setattr(resource, "getrlimit", lambda which: (vms + 2**30, resource.RLIM_INFINITY))
    free, which = memory.effective_memory_limit()
    assert which == "the address-space limit (ulimit -v)" and 0 < free <= 2**30


def _cgroups(tmp_path, files: dict, proc: str):
    for name, text in files.items():
        (tmp_path / "sys" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sys" / name).write_text(text)
    (tmp_path / "cgroup").write_text(proc)
    return memory.cgroup_headroom(tmp_path / "cgroup", tmp_path / "sys")


def test_cgroup_v2_limits_of_the_group_and_its_parents_count(tmp_path):
    assert (
        _cgroups(
            tmp_path,
            {
                "cgroup.controllers": "memory",
                "job/memory.max": "max\n",
                "job/memory.high": "max\n",
                "job/memory.current": "100\n",
                "job/step/memory.max": "1000\n",
                "job/step/memory.high": "max\n",
                "job/step/memory.current": "300\n",
            },
            "0::/job/step\n",
        )
        == 700
    )
    (tmp_path / "sys" / "job" / "memory.high").write_text("500\n")  # the parent's is tighter
    assert memory.cgroup_headroom(tmp_path / "cgroup", tmp_path / "sys") == 400


def test_cgroup_v1_and_no_limit(tmp_path):
    assert (
        _cgroups(
            tmp_path,
            {
                "memory/a/memory.limit_in_bytes": "2048\n",
                "memory/a/memory.usage_in_bytes": "48\n",
                "memory/memory.limit_in_bytes": "9223372036854771712\n",
            },
            "4:memory:/a\n1:cpu:/\n",
        )
        == 2000
    )
    assert _cgroups(tmp_path, {"memory/a/memory.limit_in_bytes": "9223372036854771712\n"}, "4:memory:/a\n") is None
    assert memory.cgroup_headroom(tmp_path / "missing", tmp_path / "sys") is None


def test_edge_pruning_beyond_memory_is_refused_before_training(tmp_path, capsys, monkeypatch):
    from circuitlib.pipeline import edges as edges_train

    monkeypatch.setattr(memory, "available_memory", lambda device: 2**26)
    monkeypatch.setattr(edges_train, "train_edges", lambda *a, **k: pytest.fail("the training started"))
    assert (
        main(
            [
                "edges",
                "--model",
                "tiny-gpt2",
                "--task",
                "ioi",
                "--target-sparsity",
                "0.5",
                "--steps",
                "2",
                "--n",
                "5000",
                "--batch-size",
                "4",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "for Edge Pruning" in err and "lower --n to at most" in err
    assert list(tmp_path.iterdir()) == []


def test_distillation_beyond_memory_is_refused_before_training(monkeypatch, models):
    import torch

    from circuitlib.studies import distill as d

    teacher = models["gpt2"]
    student = d.make_student(teacher, 1)
    tokens = torch.zeros(10, 8, dtype=torch.long)
    split = type("Split", (), {"tokens": tokens})()
    fixed, per_prompt = d.distill_memory(teacher.cfg, 1, 10, 8)
    monkeypatch.setattr(memory, "available_memory", lambda device: fixed + 15 * per_prompt)
    with pytest.raises(
        memory.OutOfMemory,
        match="number of prompts 20 .* for the distillation .* lower the number of prompts to at most 15$",
    ):
        d.distill(teacher, student, tokens, split, None, steps=1, progress=False)


def test_a_serial_study_refuses_an_n_beyond_memory_before_any_prompt_and_creates_nothing(tmp_path, capsys, monkeypatch):
    import yaml

    from circuitlib.studies import runner

    spec = tmp_path / "big.yml"
    spec.write_text(yaml.safe_dump({"model": "tiny-gpt2", "tasks": ["ioi"], "alphas": [0.01], "n": 4000}))
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**30)
    monkeypatch.setattr(runner, "run_unit", lambda *a, **k: pytest.fail("a unit started"))
    monkeypatch.setattr("circuitlib.tasks.Task.generate", lambda *a, **k: pytest.fail("the prompts were made"))
    assert main(["study", "run", str(spec), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the spec's n 4000 would need" in err and "lower the spec's n to at most" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.yml"]


def test_an_allocation_failure_in_edge_pruning_is_one_line(tmp_path, capsys, monkeypatch):
    """An Edge Pruning run whose estimate fits but whose training runs out of memory all the same ends in
    one line naming a smaller --n, and writes nothing."""
    from circuitlib.pipeline import edges as edges_train

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(edges_train, "train_edges", out_of_memory)
    assert (
        main(
            [
                "edges",
                "--model",
                "tiny-gpt2",
                "--task",
                "ioi",
                "--target-sparsity",
                "0.5",
                "--steps",
                "2",
                "--n",
                "8",
                "--batch-size",
                "4",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ran out of memory during Edge Pruning" in err and "lower --n to at most" in err
    assert list(tmp_path.iterdir()) == []
