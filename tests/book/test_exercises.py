"""The exercise checkers accept correct solutions, reject typical mistakes, and never crash."""

import importlib.util
import re
import statistics
import sys
import time
from pathlib import Path

import nbformat
import papermill
import pytest
import torch
import torch.nn.functional as F

from booklib import exercises as ex

# ------------------------------------------------------------------ correct solutions


def decision(kl_before, kl_after, alpha):
    return kl_after - kl_before < alpha


def kl(full, other):
    log_f, log_g = F.log_softmax(full.float(), -1), F.log_softmax(other.float(), -1)
    return (log_f.exp() * (log_f - log_g)).sum(-1).mean().item()


def mean_z(model, tokens, layer, head):
    x = model.embed(tokens)
    for l in range(layer):
        x = model.layers[l](x)
    return model.layers[layer].z(x)[:, :, head].mean(0)


def greedy(components, kl_of, alpha):
    pruned, current = [], kl_of([])
    for c in components:
        new = kl_of(pruned + [c])
        if new - current < alpha:
            pruned.append(c)
            current = new
    return pruned


def head_params(cfg, removed):
    removed = set(removed)
    bias = cfg.arch == "gpt2"
    q = len(removed) * (2 * cfg.d_model * cfg.d_head + (cfg.d_head if bias else 0))
    group = cfg.n_heads // cfg.n_kv_heads
    gone_kv = [k for k in range(cfg.n_kv_heads) if all(k * group + i in removed for i in range(group))]
    kv = len(gone_kv) * 2 * (cfg.d_model * cfg.d_head + (cfg.d_head if bias else 0))
    norm = cfg.d_model * (2 if bias else 1) if len(removed) == cfg.n_heads else 0
    return q + kv + norm


def acc(task, split, logits):
    pred = logits.argmax(-1)
    if split.candidates is None:
        return (pred == split.answers).float().mean().item()
    hit = (pred[:, None] == split.candidates) & split.accepted
    return hit.any(-1).float().mean().item()


def timer(forward, warmup, repeats):
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            forward()
        for _ in range(repeats):
            t = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def sort_unique_circuit():  # read off the RASP source by hand, as a student would
    components = ["0.0", "MLP 0", "1.0"]
    edges = ["embed -> 0.0.q", "embed -> 0.0.k", "embed -> 0.0.v", "0.0 -> MLP 0", "embed -> MLP 0"]
    edges += ["MLP 0 -> 1.0.k", "pos -> 1.0.q", "embed -> 1.0.v", "1.0 -> logits"]
    return components, edges


def diagnosis(ablation, data, truth, kept):
    missed, extra = sorted(set(truth) - set(kept)), sorted(set(kept) - set(truth))
    if not missed and not extra:
        return missed, extra, "none"
    return missed, extra, "position-mean" if ablation == "mean" else "max-length"


CORRECT = [
    (ex.check_prune_decision, decision),
    (ex.check_kl, kl),
    (ex.check_mean_ablation, mean_z),
    (ex.check_greedy_extraction, greedy),
    (ex.check_head_parameter_count, head_params),
    (ex.check_accuracy, acc),
    (ex.check_timer, timer),
    (ex.check_circuit_prediction, sort_unique_circuit),
    (ex.check_diagnosis, diagnosis),
]


@pytest.mark.parametrize("checker,solution", CORRECT, ids=[c.__name__ for c, _ in CORRECT])
def test_checker_accepts_a_correct_solution(checker, solution, capsys):
    assert checker(solution) is True
    assert capsys.readouterr().out.startswith("PASS")


CHECKER_OF = {
    "my_prune_decision": ex.check_prune_decision,
    "my_kl": ex.check_kl,
    "my_mean_z": ex.check_mean_ablation,
    "my_greedy": ex.check_greedy_extraction,
    "my_head_parameters": ex.check_head_parameter_count,
    "my_accuracy": ex.check_accuracy,
    "my_timer": ex.check_timer,
    "my_sort_unique_circuit": ex.check_circuit_prediction,
    "my_diagnosis": ex.check_diagnosis,
}


@pytest.mark.parametrize("name", sorted(ex.REFERENCES))
def test_each_reference_passes_its_checker(name):
    assert set(ex.REFERENCES) == set(CHECKER_OF)
    assert CHECKER_OF[name](ex.REFERENCES[name], record=False)


def test_head_parameters_of_the_papers_model():
    # 4 * d * d_head + 3 * d_head biases = 196,800 for GPT-2 Small (paper-facts)
    assert ex.reference_head_parameters(ex.GPT2_SMALL, [0]) == 196_800
    assert ex.reference_head_parameters(ex.SMOLLM2_135M, [0]) == 2 * 576 * 64
    assert (
        ex.reference_head_parameters(ex.SMOLLM2_135M, [0, 1, 2]) == 8 * 576 * 64
    )  # 3 x (W_Q + W_O) + the K/V head they shared


# ------------------------------------------------------------------ wrong solutions


def _stub(*args):
    raise NotImplementedError


def greedy_against_full(components, kl_of, alpha):  # compares with the full model: a classic mistake
    return [c for c in components if kl_of([c]) < alpha]


def timer_no_warmup(forward, warmup, repeats):
    times = []
    with torch.inference_mode():
        for _ in range(warmup + repeats):
            t = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t)
    return sum(times) / len(times)


def timer_min(forward, warmup, repeats):  # the fastest call instead of a typical one
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            forward()
        for _ in range(repeats):
            t = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t)
    return min(times)


def timer_mean_after_warmup(forward, warmup, repeats):  # warm, but one outlier moves a mean
    with torch.inference_mode():
        for _ in range(warmup):
            forward()
        t = time.perf_counter()
        for _ in range(repeats):
            forward()
        return (time.perf_counter() - t) / repeats


def kl_softmax_then_log(full, other):  # log(softmax) is -inf where the softmax underflows to 0
    p_f, p_g = torch.softmax(full.float(), -1), torch.softmax(other.float(), -1)
    return (p_f * (p_f.log() - p_g.log())).sum(-1).mean().item()


def kl_torch_softmax_then_log(full, other):  # the same slip through F.kl_div
    return (
        F.kl_div(torch.softmax(other, -1).log(), torch.softmax(full, -1).log(), log_target=True, reduction="none")
        .sum(-1)
        .mean()
        .item()
    )


def timer_with_grad(forward, warmup, repeats):
    for _ in range(warmup):
        forward()
    t = time.perf_counter()
    for _ in range(repeats):
        forward()
    return (time.perf_counter() - t) / repeats


def select_arguments_swapped():  # Select(keys, queries, ...) read as (queries, keys)
    components, edges = sort_unique_circuit()
    swap = {"MLP 0 -> 1.0.k": "MLP 0 -> 1.0.q", "pos -> 1.0.q": "pos -> 1.0.k"}
    return components, [swap.get(e, e) for e in edges]


def selector_width_as_one_head():  # SelectorWidth's MLP forgotten, with its edges
    components, edges = sort_unique_circuit()
    return [c for c in components if c != "MLP 0"], [e for e in edges if "MLP 0" not in e]


def diagnosis_blames_alpha(ablation, data, truth, kept):
    missed, extra, reason = diagnosis(ablation, data, truth, kept)
    return missed, extra, "threshold" if reason != "none" else reason


def diagnosis_one_reason_for_both(ablation, data, truth, kept):  # the mean's story told for zero ablation too
    missed, extra, reason = diagnosis(ablation, data, truth, kept)
    return missed, extra, "position-mean" if reason != "none" else reason


WRONG = [
    (ex.check_prune_decision, lambda b, a, alpha: a - b <= alpha),  # <= instead of <
    (ex.check_prune_decision, lambda b, a, alpha: abs(a - b) < alpha),  # |delta|
    (ex.check_kl, lambda f, o: kl(o, f)),  # KL(g || f)
    (ex.check_kl, lambda f, o: kl(f, o) * len(f)),  # sum over the batch
    (ex.check_kl, kl_softmax_then_log),
    (ex.check_kl, kl_torch_softmax_then_log),
    (ex.check_mean_ablation, lambda m, t, l, h: mean_z(m, t, l, h).mean(0, keepdim=True).expand(t.shape[1], -1)),
    (ex.check_mean_ablation, lambda m, t, l, h: mean_z(m, t, l, (h + 1) % m.cfg.n_heads)),
    (ex.check_greedy_extraction, greedy_against_full),
    (ex.check_head_parameter_count, lambda cfg, r: len(r) * 4 * cfg.d_model * cfg.d_head),  # the paper's GPT-2 formula
    (ex.check_accuracy, lambda task, split, logits: (logits.argmax(-1) == split.answers).float().mean().item()),
    (ex.check_timer, timer_no_warmup),
    (ex.check_timer, timer_with_grad),
    (ex.check_timer, timer_min),
    (ex.check_timer, timer_mean_after_warmup),
    (ex.check_circuit_prediction, select_arguments_swapped),
    (ex.check_circuit_prediction, selector_width_as_one_head),
    (ex.check_circuit_prediction, lambda: ["0.0", "MLP 0", "1.0"]),  # components only, no edges
    (ex.check_diagnosis, diagnosis_blames_alpha),
    (ex.check_diagnosis, diagnosis_one_reason_for_both),
    (ex.check_diagnosis, lambda a, d, t, k: ([], [], "none")),  # no look at what was kept
]


@pytest.mark.parametrize("checker,wrong", WRONG, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(WRONG)])
def test_checker_rejects_a_wrong_solution(checker, wrong, capsys):
    assert checker(wrong) is False
    out = capsys.readouterr().out
    assert out.startswith("FAIL") and "hint:" in out


@pytest.mark.parametrize("checker", [c for c, _ in CORRECT], ids=[c.__name__ for c, _ in CORRECT])
def test_an_untouched_stub_fails_cleanly(checker, capsys):
    assert checker(_stub) is False
    assert "not implemented yet" in capsys.readouterr().out


def test_verdicts_are_recorded_and_summarised(capsys):
    ex.RESULTS.clear(), ex.TIMES.clear()
    assert ex.check_prune_decision(decision)
    assert not ex.check_prune_decision(lambda b, a, alpha: a - b <= alpha, record=False)  # a demonstration
    assert not ex.check_kl(_stub)
    assert ex.passed("prune decision") and not ex.passed("KL divergence") and not ex.passed("timer")
    assert ex.RESULTS == {"1. prune decision": True, "2. KL divergence": False}
    capsys.readouterr()
    ex.summary()
    import nbformat

    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                outputs=[nbformat.v4.new_output("stream", name="stdout", text=capsys.readouterr().out)]
            )
        ]
    )
    table = ex.read_summary(nb)
    assert list(table) == list(ex.EXERCISES)
    assert table["1. prune decision"]["result"] == "PASS" and table["2. KL divergence"]["result"] == "FAIL"
    assert table["8. put it together"] == {"result": "not run", "seconds": None}
    assert table["1. prune decision"]["seconds"] == round(ex.TIMES["1. prune decision"], 2)
    with pytest.raises(ValueError, match="no exercise summary"):
        ex.read_summary(nbformat.v4.new_notebook())
    with pytest.raises(KeyError, match="no exercise called"):
        ex.passed("KL")
    ex.RESULTS.clear(), ex.TIMES.clear()


def test_exercise_8_agrees_only_with_the_extractions_own_accuracies_and_waits_for_6_and_7(capsys):
    from types import SimpleNamespace

    ex.RESULTS.clear()
    assert not ex.requires("put it together", ["accuracy", "timer"])
    assert "needs exercise 6. accuracy and 7. timer to pass first" in capsys.readouterr().out
    extraction = SimpleNamespace(
        metrics={"full": {"validation": {"accuracy": 0.75}}, "pruned": {"validation": {"accuracy": 0.5}}}
    )
    assert ex.check_put_together(0.75, 0.5, extraction) and ex.passed("put it together")
    assert not ex.check_put_together(0.75, 0.625, extraction) and not ex.passed("put it together")
    assert capsys.readouterr().out.splitlines()[-1].startswith("FAIL put it together")
    ex.record("accuracy", True), ex.record("timer", True)
    assert ex.requires("put it together", ["accuracy", "timer"])
    ex.RESULTS.clear()


def test_a_crashing_solution_is_reported_not_raised(capsys):
    assert ex.check_kl(lambda f, o: f.missing_attribute) is False
    assert "AttributeError" in capsys.readouterr().out


def test_wrong_answers_to_the_compiled_exercises_are_told_what_is_wrong_not_the_answer(capsys):
    assert not ex.check_circuit_prediction(select_arguments_swapped, record=False)
    out = capsys.readouterr().out
    assert "you miss 2 (into 1.0.k, 1.0.q)" in out and "'pos -> 1.0.k'" in out
    assert not ex.check_circuit_prediction(selector_width_as_one_head, record=False)
    out = capsys.readouterr().out
    assert "components: the compiler uses 3; you miss 1" in out and "MLP 0" not in out.split("hint:")[0]
    assert not ex.check_diagnosis(diagnosis_blames_alpha, record=False)
    assert "the metric did not rise at all when they were removed" in capsys.readouterr().out
    assert not ex.check_diagnosis(diagnosis_one_reason_for_both, record=False)
    assert "this run uses zero ablation" in capsys.readouterr().out


def test_the_compiled_exercises_answers_come_from_the_compiler():
    from circuitlib.models.compiled.compile import load_compiled
    from circuitlib.models.compiled.truth import structural_edges, truth_components

    c = load_compiled("sort_unique")
    components, edges = ex.reference_sort_unique_circuit()
    assert components == truth_components(c.info)
    assert edges == structural_edges(c.info, c.model, bos_plumbing=False)
    assert set(edges) == set(sort_unique_circuit()[1])  # the hand-read answer is the compiler's
    runs = ex.reverse_runs(show=False)
    assert [(r["ablation"], r["data"]) for r in runs] == [
        ("mean", "length 5 only"),
        ("zero", "length 5 only"),
        ("mean", "every length"),
    ]
    assert [sorted(set(r["truth"]) - set(r["kept"])) for r in runs] == [["0.0", "MLP 0", "MLP 1", "MLP 2"], ["0.0"], []]


# ------------------------------------------------------------------ the notebooks made from the one source

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_exercises", REPO / "scripts" / "make_exercises.py")
mk = sys.modules["make_exercises"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(mk)

# the student notebook at its smallest: a random GPT-2-shaped model, 4 prompts per split
SMALL = {"model": "tiny-gpt2", "n": 4, "timing_repeats": 2}
STUB = re.compile(r"^def (my_\w+)\(", re.M)


def _run(nb, tmp_path, name):
    """Execute `nb` top to bottom (an exception fails the test) and return everything it printed."""
    src, out = tmp_path / f"{name}-in.ipynb", tmp_path / f"{name}.ipynb"
    nbformat.write(nb, src)
    papermill.execute_notebook(
        str(src),
        str(out),
        parameters=SMALL,
        kernel_name="python3",
        cwd=str(REPO / "notebooks"),
        progress_bar=False,
        log_output=False,
    )
    done = nbformat.read(out, as_version=4)
    text = "".join(
        o.get("text", "") for c in done.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"
    )
    return done, text


def test_the_chapter_is_what_the_source_makes_and_every_solution_passed_in_it():
    assert mk.differences() == []
    assert {row["result"] for row in ex.read_summary(mk.CHAPTER).values()} == {"PASS"}


def test_every_exercise_is_rated_and_every_checker_has_its_exercise():
    found = mk.exercises()
    assert [e.number for e in found] == list(range(1, len(ex.EXERCISES) + 1))
    assert [f"{e.number}. " for e in found] == [name.split(". ")[0] + ". " for name in ex.EXERCISES]
    assert all(1 <= e.difficulty <= 5 and 1 <= e.importance <= 5 and e.minutes > 0 and e.writes for e in found)


def test_solutions_are_behind_a_toggle_labelled_solution_and_absent_from_the_student_notebook():
    solution, student = mk.build(student=False), mk.build(student=True)
    folded = [c for c in solution.cells if c.metadata.get("mystnb", {}).get("code_prompt_show") == "Solution"]
    assert {m for c in folded for m in STUB.findall(c.source)} == set(ex.REFERENCES)
    assert all("hide-input" in c.metadata["tags"] and c.metadata["jupyter"]["source_hidden"] for c in folded)
    stubs = [c for c in student.cells if STUB.search(c.source)]
    assert len(stubs) == len(ex.REFERENCES) and all("raise NotImplementedError" in c.source for c in stubs)
    # no line of any solution (nor a solution-only cell) reaches the student notebook, hints included
    student_text = "\n".join(c.source for c in student.cells)
    public = {line.strip() for c in student.cells if c not in stubs for line in c.source.splitlines()}
    solution_lines = {
        line.strip()
        for c in folded
        for line in c.source.splitlines()
        if len(line.strip()) > 25 and not line.strip().startswith("def my_")
    } - public
    assert len(solution_lines) > 20 and not [line for line in solution_lines if line in student_text]
    assert "record=False" not in student_text
    assert all(
        "<details><summary>Hint" in c.source
        for c in student.cells
        if c.source.startswith("## Exercise ") and not c.source.startswith("## Exercise 8")
    )


def test_the_source_format_is_enforced(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("# %%\ndef f():\n    # SOLUTION\n    return 1\n")
    with pytest.raises(mk.SourceError, match="not closed"):
        mk.build(student=True, cells=mk.parse(bad))
    bad.write_text("# %% [markdown]\n# ## Exercise 1: x\n")
    with pytest.raises(mk.SourceError, match="EXERCISE line"):
        mk.exercises(mk.parse(bad))
    bad.write_text("# %% solutions-only\nx = 1\n")
    with pytest.raises(mk.SourceError, match="unknown cell option"):
        mk.parse(bad)


def test_the_student_notebook_fails_cleanly_when_nothing_is_filled_in(tmp_path):
    done, text = _run(mk.build(student=True), tmp_path, "unfilled")
    assert "NameError" not in text and "your function raised" not in text and "PASS" not in text
    assert text.count("not implemented yet") == len(ex.REFERENCES)
    assert "FAIL put it together: needs exercise 6. accuracy and 7. timer to pass first" in text
    assert {row["result"] for row in ex.read_summary(done).values()} == {"FAIL"}


def test_the_student_notebook_passes_with_the_references_filled_in(tmp_path):
    nb = mk.build(student=True)
    filled = []
    for cell in nb.cells:
        filled.append(cell)
        for name in STUB.findall(cell.source):
            filled.append(nbformat.v4.new_code_cell(f"{name} = ex.REFERENCES[{name!r}]"))
    nb.cells = filled
    done, text = _run(nb, tmp_path, "filled")
    assert "FAIL" not in text
    assert {row["result"] for row in ex.read_summary(done).values()} == {"PASS"}
