"""The distillation baseline on tiny random models: sizes, initialisation, training, determinism."""

import pytest
import torch

from circuitlib.core.ablation import mean_activations
from circuitlib.core.surgery import prune
from circuitlib.studies.distill import distill, l2_logit_loss, make_student, student_layers, student_parameters
from circuitlib.tasks import TaskSplit, get_task


def _split(teacher, tokens):
    """A TaskSplit whose 'correct' answer is the teacher's own argmax (accuracy = agreement)."""
    with torch.inference_mode():
        answers = teacher(tokens, last_only=True).argmax(-1)
    return TaskSplit([str(i) for i in range(len(tokens))], tokens, answers)


def test_student_parameters_match_a_real_student(models, arch):
    teacher = models[arch]
    for n in (1, 2, 3):
        student = make_student(teacher, n, seed=0)
        assert student.count_parameters()["parameters"] == student_parameters(teacher.cfg, n)
        assert student.cfg.n_layers == n and student.cfg.d_model == teacher.cfg.d_model
    assert student_parameters(teacher.cfg, teacher.cfg.n_layers) == teacher.count_parameters()["parameters"]


def test_student_is_the_largest_that_fits(models, data, arch):
    teacher = models[arch]
    means = mean_activations(teacher, data[0])
    heads = teacher.kept_heads()
    cases = [
        heads[: len(heads) // 2] + [f"MLP {l}" for l in range(teacher.cfg.n_layers)],  # ~ 2 layers' worth
        heads[:2],  # smaller than 1 layer
        heads + [f"MLP {l}" for l in range(teacher.cfg.n_layers)],
    ]  # the full model
    found = []
    for kept in cases:
        pruned = prune(teacher, kept, "mean", means)
        n = student_layers(teacher, pruned)
        budget = pruned.count_parameters()["parameters"]
        if n:
            assert student_parameters(teacher.cfg, n) <= budget
        if n < teacher.cfg.n_layers:
            assert student_parameters(teacher.cfg, n + 1) > budget
        found.append(n)
    assert found[1] == 0 and found[2] == teacher.cfg.n_layers
    assert 0 < found[0] < teacher.cfg.n_layers


def test_make_student_seeded_and_embeddings(models):
    teacher = models["gpt2"]
    a, b, c = make_student(teacher, 2, seed=3), make_student(teacher, 2, seed=3), make_student(teacher, 2, seed=4)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.layers[0].W_Q, c.layers[0].W_Q)
    assert not torch.equal(a.W_E, teacher.W_E)  # fresh, as in the paper
    d = make_student(teacher, 2, seed=3, copy_embeddings=True)
    assert torch.equal(d.W_E, teacher.W_E) and not d.W_E.requires_grad
    assert torch.equal(d.layers[0].W_Q, a.layers[0].W_Q)  # the rest is the same fresh init
    with pytest.raises(ValueError, match="at least one layer|>= 1"):
        make_student(teacher, 0)


def test_l2_loss_is_the_papers():
    t, s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    assert l2_logit_loss(t, s).item() == pytest.approx((4 + 3) / 2)


def test_distillation_lowers_the_loss_and_is_deterministic(models, data, arch):
    teacher = models[arch]
    train, val = data
    split = _split(teacher, val)
    task = get_task("ioi")  # its rule: argmax == answers
    runs = []
    for _ in range(2):
        student = make_student(teacher, 1, seed=0)
        runs.append(distill(teacher, student, train, split, task, steps=30, lr=1e-2, seed=0, progress=False))
    h = runs[0]
    assert h.train_loss[-1] < 0.5 * h.train_loss[0]
    assert len(h.val_loss) == len(h.eval_steps) and all(v == v for v in h.val_loss)  # (random data: it may overfit)
    assert h.eval_steps[0] == 0 and h.eval_steps[-1] == 30
    assert 0 <= h.best_val_accuracy <= 1 and h.best_step in h.eval_steps
    assert runs[0].train_loss == runs[1].train_loss and runs[0].val_accuracy == runs[1].val_accuracy
    # the teacher is not touched
    assert not any(p.grad is not None for p in teacher.parameters())


def test_minibatches_are_seeded(models, data):
    teacher = models["gpt2"]
    train, val = data
    split, task = _split(teacher, val), get_task("ioi")
    h = [
        distill(
            teacher, make_student(teacher, 1, seed=0), train, split, task, steps=6, batch_size=8, seed=s, progress=False
        ).train_loss
        for s in (0, 0, 1)
    ]
    assert h[0] == h[1] and h[0] != h[2]


def test_training_stops_when_the_validation_loss_plateaus(models, data):
    from circuitlib.studies.distill import _plateaued

    assert not _plateaued([5, 4, 3, 2], 2, 1e-3)
    assert _plateaued([5, 2, 2.0, 2.1], 2, 1e-3)
    assert not _plateaued([5, 2], 2, 1e-3)
    teacher = models["gpt2"]
    patching, validation = data
    split, Task = _split(teacher, validation), get_task("ioi")
    student = make_student(teacher, 1, seed=0)
    history = distill(
        teacher, student, patching, split, Task, steps=2000, lr=3e-2, eval_every=5, patience=3, progress=False
    )
    assert history.stopped.startswith("validation loss plateaued") and len(history.train_loss) < 2000
    assert _plateaued(history.val_loss, 3, 1e-3)
    budget = distill(teacher, make_student(teacher, 1, seed=0), patching, split, Task, steps=5, progress=False)
    assert budget.stopped == "step budget (5) reached" and len(budget.train_loss) == 5
    with pytest.raises(ValueError, match="patience"):
        distill(teacher, student, patching, split, Task, steps=5, patience=0, progress=False)


def test_the_distillation_baseline_script_writes_its_curve_once(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from circuitlib.studies.runner import run_study
    from circuitlib.studies.spec import load_spec

    spec_path = tmp_path / "tiny.yml"
    spec_path.write_text(yaml.safe_dump({"model": "tiny-gpt2", "tasks": ["ioi"], "alphas": [0.01], "n": 4}))
    assert run_study(load_spec(spec_path), workers=0, progress=False)["failed"] == []
    script = Path(__file__).resolve().parents[2] / "scripts" / "distill_baseline.py"
    command = [
        sys.executable,
        str(script),
        "--task",
        "ioi",
        "--budget-from",
        str(spec_path),
        "--alpha",
        "0.01",
        "--max-steps",
        "40",
        "--eval-every",
        "5",
        "--patience",
        "2",
        "--out-dir",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert record["student_parameters"] <= record["budget_parameters"] and record["student_layers"] >= 1
    assert len(record["train_loss"]) == record["steps_run"] <= 40 and record["stopped"]
    assert record["eval_steps"][0] == 0 and len(record["val_loss"]) == len(record["eval_steps"])
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr
    missing = subprocess.run(command[:7] + ["0.5"] + command[8:], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "has no row" in missing.stderr


def test_the_script_picks_the_chapters_alpha_by_default(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from circuitlib.studies.analysis import choose_alpha
    from circuitlib.studies.runner import run_study, study_table
    from circuitlib.studies.spec import load_spec

    spec_path = tmp_path / "tiny.yml"
    spec_path.write_text(yaml.safe_dump({"model": "tiny-gpt2", "tasks": ["ioi"], "alphas": [0.001, 0.1], "n": 4}))
    spec = load_spec(spec_path)
    assert run_study(spec, workers=0, progress=False)["failed"] == []
    want = choose_alpha(study_table(spec))[("ioi", "mean", False)]
    script = Path(__file__).resolve().parents[2] / "scripts" / "distill_baseline.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--task",
            "ioi",
            "--budget-from",
            str(spec_path),
            "--max-steps",
            "6",
            "--eval-every",
            "3",
            "--out-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    [written] = (tmp_path / "out").glob("*.json")
    assert json.loads(written.read_text())["alpha"] == want and written.name.endswith(f"alpha{want:g}.json")


@pytest.fixture
def study_row(tmp_path):
    """One row of a tiny study's store (tiny-gpt2, IOI, alpha 0.01, n = 4), the teacher and its tokenizer."""
    import yaml

    from circuitlib.models.loading import load_model
    from circuitlib.studies.runner import run_study, study_table
    from circuitlib.studies.spec import load_spec

    spec_path = tmp_path / "tiny.yml"
    spec_path.write_text(yaml.safe_dump({"model": "tiny-gpt2", "tasks": ["ioi"], "alphas": [0.01], "n": 4}))
    spec = load_spec(spec_path)
    run_study(spec, workers=0, progress=False)
    return (study_table(spec).iloc[0], *load_model("tiny-gpt2"))


def test_baseline_reuses_a_record_of_the_same_settings_and_refuses_another(tmp_path, study_row):
    from circuitlib.studies.distill import distilled_student

    row, teacher, tokenizer = study_row
    first = distilled_student(tmp_path / "out", teacher, tokenizer, row, progress=False, max_steps=4, eval_every=2)
    assert first["steps_run"] <= 4 and first["provenance"]["commit"]
    again = distilled_student(tmp_path / "out", teacher, tokenizer, row, progress=False, max_steps=4, eval_every=2)
    assert again == first  # read back, not retrained
    with pytest.raises(ValueError, match="max_steps: 4 there, 6 asked"):
        distilled_student(tmp_path / "out", teacher, tokenizer, row, progress=False, max_steps=6, eval_every=2)
    replaced = distilled_student(
        tmp_path / "out", teacher, tokenizer, row, progress=False, max_steps=6, eval_every=2, replace=True
    )
    assert replaced["max_steps"] == 6


class Cut(Exception):
    """Stands for a killed process (the end of a session)."""


def _cut_at_step(step):
    """The student's training dies at the start of step `step` (1-based): its optimiser step raises."""
    from unittest import mock

    real, calls = torch.optim.Adam.step, [0]

    def opt_step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            raise Cut(f"cut at step {step}")
        return real(self, *args, **kwargs)

    return mock.patch.object(torch.optim.Adam, "step", opt_step)


@pytest.mark.parametrize("batch_size", [None, 8])
def test_a_cut_off_distillation_resumes_to_the_uninterrupted_result(models, data, tmp_path, batch_size):
    teacher = models["gpt2"]
    train, val = data
    split, task = _split(teacher, val), get_task("ioi")
    kw = dict(steps=9, lr=1e-2, seed=3, batch_size=batch_size, eval_every=2, patience=None, progress=False)
    whole_student = make_student(teacher, 1, seed=0)
    whole = distill(teacher, whole_student, train, split, task, **kw)
    checkpoint = tmp_path / "student.ckpt"
    with _cut_at_step(7), pytest.raises(Cut):  # steps 1-6 done, the last checkpoint after 6
        distill(
            teacher,
            make_student(teacher, 1, seed=0),
            train,
            split,
            task,
            checkpoint_path=checkpoint,
            checkpoint_every=3,
            **kw,
        )
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["step"] == 6 and saved["cpu_seconds"] > 0
    student = make_student(teacher, 1, seed=0)  # a fresh process: only the checkpoint carries over
    resumed = distill(teacher, student, train, split, task, checkpoint_path=checkpoint, checkpoint_every=3, **kw)
    assert resumed.train_loss == whole.train_loss and resumed.val_loss == whole.val_loss
    assert resumed.eval_steps == whole.eval_steps and resumed.val_accuracy == whole.val_accuracy
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), whole_student.state_dict().values()))
    assert resumed.seconds > saved["seconds"] and not checkpoint.exists()
    with _cut_at_step(4), pytest.raises(Cut):
        distill(
            teacher,
            make_student(teacher, 1, seed=0),
            train,
            split,
            task,
            checkpoint_path=checkpoint,
            checkpoint_every=3,
            **kw,
        )
    with pytest.raises(ValueError, match=r"student.ckpt belongs to another training: lr 0.01 \(checkpoint\) vs 0.02"):
        distill(
            teacher,
            make_student(teacher, 1, seed=0),
            train,
            split,
            task,
            checkpoint_path=checkpoint,
            **{**kw, "lr": 2e-2},
        )
    with pytest.raises(ValueError, match=r"student_init"):  # a student initialised otherwise
        distill(teacher, make_student(teacher, 1, seed=1), train, split, task, checkpoint_path=checkpoint, **kw)
    assert checkpoint.exists()  # a refused checkpoint is left alone
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
        distill(
            teacher,
            make_student(teacher, 1, seed=0),
            train,
            split,
            task,
            checkpoint_path=checkpoint,
            checkpoint_every=0,
            **kw,
        )


def test_a_student_in_training_is_locked_and_its_cut_off_run_resumes(tmp_path, study_row):
    from circuitlib.core.resumable import ResultInProgress, result_lock
    from circuitlib.studies.distill import baseline_path, distilled_student

    row, teacher, tokenizer = study_row
    out = tmp_path / "out"
    path = baseline_path(out, row)
    kw = dict(progress=False, max_steps=6, eval_every=2, patience=None, checkpoint_every=2)
    with result_lock(path, "(held by this test)"):
        with pytest.raises(ResultInProgress, match=r"another process is computing .*\.json"):
            distilled_student(out, teacher, tokenizer, row, **kw)
    assert not path.exists()
    with _cut_at_step(4), pytest.raises(Cut):
        distilled_student(out, teacher, tokenizer, row, **kw)
    assert path.with_suffix(".ckpt").exists() and not path.exists() and not path.with_suffix(".lock").exists()
    resumed = distilled_student(out, teacher, tokenizer, row, **kw)
    whole = distilled_student(tmp_path / "whole", teacher, tokenizer, row, **kw)
    assert resumed["train_loss"] == whole["train_loss"] and resumed["test_accuracy"] == whole["test_accuracy"]
    assert resumed["cpu_seconds"] > 0 and not path.with_suffix(".ckpt").exists()
