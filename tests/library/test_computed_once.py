"""The one settings-checked cache (core.resumable.computed_once) on a tiny JSON result."""

import json

import pytest

from circuitlib.core.io import atomic_write
from circuitlib.core.resumable import ResultInProgress, computed_once, result_lock


def ask(path, settings, calls, **kw):
    def compute():
        calls.append(1)
        return {"settings": dict(settings), "value": len(calls)}

    return computed_once(
        path,
        settings,
        compute=compute,
        read=lambda p: json.loads(p.read_text()),
        write=lambda p, r: atomic_write(p, lambda tmp: open(tmp, "w").write(json.dumps(r))),
        settings_of=lambda r: r["settings"],
        busy_hint="wait",
        **kw,
    )


def test_computed_once_then_read_back(tmp_path):
    calls = []
    first = ask(tmp_path / "r.json", {"a": 1}, calls)
    assert ask(tmp_path / "r.json", {"a": 1}, calls) == first and calls == [1]
    assert not (tmp_path / "r.lock").exists()


def test_a_result_of_other_settings_is_refused_naming_each_difference(tmp_path):
    ask(tmp_path / "r.json", {"a": 1, "b": "x"}, [])
    with pytest.raises(ValueError, match=r"a: 1 there, 2 asked; b: 'x' there, 'y' asked"):
        ask(tmp_path / "r.json", {"a": 2, "b": "y"}, [])


def test_replace_recomputes_and_writes_over(tmp_path):
    ask(tmp_path / "r.json", {"a": 1}, [])
    calls = []
    assert ask(tmp_path / "r.json", {"a": 2}, calls, replace=True)["settings"] == {"a": 2} and calls == [1]
    assert json.loads((tmp_path / "r.json").read_text())["settings"] == {"a": 2}


def test_a_result_being_computed_elsewhere_is_not_computed_twice(tmp_path):
    with result_lock(tmp_path / "r.json", "wait"):
        with pytest.raises(ResultInProgress, match="another process is computing"):
            ask(tmp_path / "r.json", {"a": 1}, [])
    assert not (tmp_path / "r.json").exists()


def test_a_failed_computation_writes_nothing(tmp_path):
    def boom():
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):
        computed_once(
            tmp_path / "r.json",
            {},
            compute=boom,
            read=json.loads,
            write=lambda p, r: None,
            settings_of=dict,
            busy_hint="",
        )
    assert list(tmp_path.iterdir()) == []
