"""The paper's distillation baseline (Table 2, RQ4): a smaller student trained to copy the teacher.

García-Carrasco et al. compare each extracted circuit with a *student*: the same architecture as
the teacher with fewer layers, N being the largest number of layers whose size is at most the
pruned model's, trained to reproduce the teacher's logits at the last position with an L2 loss

    L = || z_teacher - z_student ||_2^2      (summed over the vocabulary, averaged over prompts)

(the setup of Tang et al., 2019), with Adam at learning rate 1e-3, on the same few task prompts
the extraction uses; they report the best validation accuracy seen during training. They trained
for 20,000 epochs and published no code for it. Here:

- `student_layers(teacher, pruned)` picks N. Sizes are counted as everywhere in circuitlib and
  in the paper: without the token/position embeddings and the tied unembedding, and without the
  pruned model's mean-ablation biases (`count_parameters()["parameters"]`).
- `make_student(teacher, n_layers, seed)` builds a fresh N-layer `Transformer` of the teacher's
  family and width. By default *everything* is freshly initialised, as in the paper ("training a
  model from scratch"). With `copy_embeddings=True` the student starts from the teacher's token
  (and position) embeddings and keeps them frozen: they are not counted in anyone's size, so this
  is a stronger baseline at no cost in the size comparison (it is not the paper's).
- `distill(...)` trains with full-batch steps (one step = one pass over the training prompts =
  one of the paper's epochs), seeded, with a tqdm progress bar, and returns a `DistillHistory`.
- `distill_baseline(teacher, tokenizer, row)` does it all for one row of a study's results store
  (the extracted model the student competes with): the row's prompts, its parameter budget, a
  student trained until its validation loss plateaus, and a JSON-ready record with the curve
  (`scripts/distill_baseline.py` and the baselines chapter write it to `baseline_path`).

Initialisation (fresh parts): normal(0, 0.02) for every weight matrix and the embeddings, as
GPT-2 and Llama are initialised; output projections (W_O, W_out) scaled by 1/sqrt(2 N) as in
GPT-2; norms at 1, biases at 0.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from circuitlib.core.memory import check_fits
from circuitlib.core.metrics import accuracy
from circuitlib.core.model import ModelConfig, Transformer, full_plan
from circuitlib.core.resumable import (
    computed_once,
    load_checkpoint,
    parameters_digest,
    save_checkpoint,
    tokens_digest,
)


def _layer_parameters(cfg: ModelConfig) -> int:
    """Parameters of one full layer of `cfg` (counted on the meta device: no memory used)."""
    one = dataclasses.replace(cfg, n_layers=1)
    with torch.device("meta"):
        model = Transformer(one, full_plan(one))
    return model.count_parameters()["parameters"] - sum(p.numel() for p in model.ln_final.parameters())


def student_parameters(cfg: ModelConfig, n_layers: int) -> int:
    """Size of an `n_layers`-layer student of `cfg`'s family (circuitlib's count: no embeddings)."""
    if n_layers < 1:
        raise ValueError(f"a student needs at least one layer; got n_layers={n_layers}")
    final_norm = cfg.d_model * (1 if cfg.arch == "llama" else 2)
    return n_layers * _layer_parameters(cfg) + final_norm


def student_layers(teacher: Transformer, pruned: Transformer) -> int:
    """The largest N whose N-layer student is no larger than `pruned` (0 if not even one layer fits).

    Sizes are `count_parameters()["parameters"]`: embeddings, unembedding and the mean-ablation
    biases are left out, as in the paper's parameter counts.
    """
    if pruned.cfg != teacher.cfg:
        raise ValueError("`pruned` must be pruned from `teacher` (their configurations differ)")
    return layers_within(teacher.cfg, pruned.count_parameters()["parameters"])


def layers_within(cfg: ModelConfig, budget: int) -> int:
    """The largest N (at most cfg.n_layers) whose N-layer student has at most `budget` parameters."""
    n = 0
    while n < cfg.n_layers and student_parameters(cfg, n + 1) <= budget:
        n += 1
    return n


@torch.no_grad()
def make_student(teacher: Transformer, n_layers: int, seed: int = 0, *, copy_embeddings: bool = False) -> Transformer:
    """A fresh `n_layers`-layer Transformer with the teacher's family, width, heads and vocabulary.

    seed:            seeds the initialisation (the global RNG is left untouched)
    copy_embeddings: start from the teacher's token/position embeddings and freeze them (not the
                     paper's setup, which trains everything from scratch; see the module docstring)
    """
    if not 1 <= n_layers:
        raise ValueError(f"n_layers must be >= 1; got {n_layers} (the pruned model may be smaller than one layer)")
    cfg = dataclasses.replace(teacher.cfg, n_layers=n_layers, name=f"{teacher.cfg.name}-student-{n_layers}L")
    student = Transformer(cfg)
    g = torch.Generator().manual_seed(seed)
    out_scale = 1 / math.sqrt(2 * n_layers)
    for name, p in student.named_parameters():
        short = name.rsplit(".", 1)[-1]
        if short in ("w",):  # norm gains
            p.fill_(1.0)
        elif short.startswith("b_") or short == "b":
            p.zero_()
        else:  # weight matrices and embeddings
            std = 0.02 * (out_scale if short in ("W_O", "W_out") else 1.0)
            p.copy_(torch.randn(p.shape, generator=g) * std)
    if copy_embeddings:
        student.W_E.copy_(teacher.W_E)
        student.W_E.requires_grad_(False)
        if student.W_pos is not None:
            student.W_pos.copy_(teacher.W_pos)
            student.W_pos.requires_grad_(False)
    return student.to(teacher.W_E.device).train()


@dataclass
class DistillHistory:
    """What `distill` saw. Accuracies are on the validation prompts, at the steps in `eval_steps`."""

    n_layers: int
    steps: int
    lr: float
    seed: int
    train_loss: list[float] = field(default_factory=list)  # one per step
    eval_steps: list[int] = field(default_factory=list)  # 0 = before training
    val_accuracy: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0  # wall clock, checkpointed runs included
    cpu_seconds: float = 0.0  # CPU time, likewise
    stopped: str = ""  # why training ended

    @property
    def best_val_accuracy(self) -> float:
        """The paper's number: the largest validation accuracy seen during training."""
        return max(self.val_accuracy) if self.val_accuracy else float("nan")

    @property
    def best_step(self) -> int:
        return self.eval_steps[self.val_accuracy.index(self.best_val_accuracy)] if self.val_accuracy else -1


def _plateaued(val_loss: list[float], patience: int, min_improvement: float) -> bool:
    """Whether none of the last `patience` evaluations beat the best earlier one by `min_improvement`."""
    if len(val_loss) <= patience:
        return False
    best_before = min(val_loss[:-patience])
    return min(val_loss[-patience:]) > best_before * (1 - min_improvement)


def l2_logit_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """|| z_T - z_S ||_2^2 at the last position: summed over the vocabulary, averaged over prompts.

    Both [n, V].
    """
    return (teacher_logits - student_logits).pow(2).sum(-1).mean()


def distill_memory(cfg: ModelConfig, student_layers: int, batch_size: int, seq_len: int) -> tuple[int, int]:
    """Bytes a distillation needs besides the models (an estimate), as (fixed, per prompt).

    Fixed: a training step on `batch_size` prompts, whose student keeps per layer about 12 [S, D],
    2 [H, S, S] and 2 [S, M] activations for the backward pass, and 4 [V] logits and gradients per
    prompt; the optimiser's two moments and the gradient of every student parameter. Per prompt
    (training and validation): the teacher's last-position logits ([V], kept) and one teacher
    forward pass's activations ([H, S, S] x 2, [S, M] x 3, [S, D] x 5). float32 = 4 bytes.
    """
    S, D, H, M, V = seq_len, cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.d_vocab
    step = batch_size * (student_layers * (12 * S * D + 2 * H * S * S + 2 * S * M) + 4 * V)
    fixed = 4 * (step + 3 * student_parameters(cfg, student_layers))
    per_prompt = 4 * (V + 2 * H * S * S + 3 * S * M + 5 * S * D)
    return fixed, per_prompt


def distill(
    teacher: Transformer,
    student: Transformer,
    tokens: torch.Tensor,
    val_split,
    task,
    *,
    steps: int,
    lr: float = 1e-3,
    seed: int = 0,
    batch_size: int | None = None,
    eval_every: int | None = None,
    patience: int | None = None,
    min_improvement: float = 1e-3,
    progress: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
) -> DistillHistory:
    """Train `student` (in place) to match `teacher`'s last-position logits on `tokens`.

    tokens:     [n, S] training prompts (the paper uses the task's prompts; we use the patching split)
    val_split:  a `TaskSplit` whose accuracy (by `task.correct`) and loss are tracked
    steps:      optimiser steps; with the default full batch, one step is one epoch
    batch_size: prompts per step (None: all of them); minibatches are drawn with `seed`
    eval_every: evaluate every this many steps (default: about 20 evaluations in all); the
                student is also evaluated before the first step and after the last
    patience:   stop when the validation loss has plateaued: `patience` evaluations in a row
                without lowering the best loss so far by more than `min_improvement` (relative);
                None trains all `steps` (then `steps` is a budget, not a target)
    checkpoint_path: a file for the training's state (student, optimiser, minibatch order, curve),
                written atomically every `checkpoint_every` steps; if it exists at the start, the
                training continues from it to exactly the uninterrupted result (its settings must
                be these, or a ValueError names the difference); deleted at the end. A student
                of the stand-in takes hours, so `distill_baseline` and `baseline` always use one.
    `history.stopped` says which ended the training.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be a number of evaluations >= 1, or None; got {patience!r}")
    if student.cfg.d_vocab != teacher.cfg.d_vocab:
        raise ValueError("student and teacher must share the vocabulary")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int; got {checkpoint_every!r}")
    device = teacher.W_E.device
    n_train = len(tokens)
    fixed, per_prompt = distill_memory(
        teacher.cfg, student.cfg.n_layers, n_train if batch_size is None else min(batch_size, n_train), tokens.shape[1]
    )
    check_fits(device, per_prompt, fixed, n_train + len(val_split.tokens), "the distillation", "the number of prompts")
    tokens, val_tokens = tokens.to(device), val_split.tokens.to(device)
    with torch.inference_mode():
        target = teacher(tokens, last_only=True)  # [n, V]
        val_target = teacher(val_tokens, last_only=True)  # [n_val, V]
    target, val_target = target.clone(), val_target.clone()  # usable outside inference mode
    n = len(tokens)
    batch_size = n if batch_size is None else min(batch_size, n)
    eval_every = eval_every or max(1, steps // 20)
    g = torch.Generator().manual_seed(seed)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    history = DistillHistory(student.cfg.n_layers, steps, lr, seed)

    def evaluate(step: int) -> None:
        student.eval()
        with torch.inference_mode():
            logits = student(val_tokens, last_only=True)
            history.val_loss.append(l2_logit_loss(val_target, logits).item())
            history.val_accuracy.append(accuracy(task, val_split, logits))
        history.eval_steps.append(step)
        student.train()

    settings = {
        "teacher": teacher.cfg.name,
        "student": student.cfg.name,
        "student_init": parameters_digest(student),
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "batch_size": batch_size,
        "eval_every": eval_every,
        "patience": patience,
        "min_improvement": min_improvement,
        "device": device.type,
        "tokens": tokens_digest(tokens),
        "validation": tokens_digest(val_tokens),
    }
    saved = load_checkpoint(checkpoint_path, settings)
    curve_fields = ("train_loss", "eval_steps", "val_accuracy", "val_loss")
    started, cpu_started = time.perf_counter(), time.process_time()
    if saved is None:
        seconds_before, cpu_before, first_step = 0.0, 0.0, 1
        evaluate(0)
        order, cursor = torch.randperm(n, generator=g), 0
    else:
        seconds_before, cpu_before, first_step = saved["seconds"], saved["cpu_seconds"], saved["step"] + 1
        student.load_state_dict(saved["student"])
        opt.load_state_dict(saved["opt"])
        g.set_state(saved["generator"])
        order, cursor = saved["order"], saved["cursor"]
        for k in curve_fields:
            setattr(history, k, saved[k])
    bar = tqdm(
        range(first_step, steps + 1),
        initial=first_step - 1,
        total=steps,
        desc=f"distill {student.cfg.n_layers}-layer student",
        disable=not progress,
    )
    for step in bar:
        if batch_size == n:
            rows = slice(None)
        else:
            if cursor + batch_size > n:
                order, cursor = torch.randperm(n, generator=g), 0
            rows = order[cursor : cursor + batch_size].to(device)
            cursor += batch_size
        loss = l2_logit_loss(target[rows], student(tokens[rows], last_only=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.train_loss.append(loss.item())
        if step % eval_every == 0 or step == steps:
            evaluate(step)
            bar.set_postfix(loss=f"{loss.item():.3g}", val_acc=f"{history.val_accuracy[-1]:.2f}")
            if patience is not None and _plateaued(history.val_loss, patience, min_improvement):
                history.stopped = (
                    f"validation loss plateaued: no improvement over {min_improvement:.0e} "
                    f"(relative) in {patience} evaluations, at step {step}"
                )
                break
        if checkpoint_path is not None and step % checkpoint_every == 0 and step < steps:
            save_checkpoint(
                checkpoint_path,
                settings,
                {
                    "step": step,
                    "student": student.state_dict(),
                    "opt": opt.state_dict(),
                    "generator": g.get_state(),
                    "order": order,
                    "cursor": cursor,
                    **{k: getattr(history, k) for k in curve_fields},
                    "seconds": seconds_before + time.perf_counter() - started,
                    "cpu_seconds": cpu_before + time.process_time() - cpu_started,
                },
            )
    history.stopped = history.stopped or f"step budget ({steps}) reached"
    bar.close()
    history.seconds = seconds_before + time.perf_counter() - started
    history.cpu_seconds = cpu_before + time.process_time() - cpu_started
    if checkpoint_path is not None:
        Path(checkpoint_path).unlink(missing_ok=True)
    student.eval()
    return history


def baseline_path(out_dir, row: Mapping) -> Path:
    """Where the distillation baseline of a study row is kept:
    <task>-<ablation>-<heads|heads+mlps>-seed<S>-alpha<A>.json."""
    mlps = "heads+mlps" if row["include_mlps"] else "heads"
    return (
        Path(out_dir)
        / f"{row['task']}-{row['ablation']}-{mlps}-seed{int(row['seed'])}-alpha{float(row['alpha']):g}.json"
    )


def distill_baseline(
    teacher: Transformer,
    tokenizer,
    row: Mapping,
    *,
    lr: float = 1e-3,
    max_steps: int = 20000,
    eval_every: int = 25,
    patience: int | None = 10,
    min_improvement: float = 1e-3,
    progress: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
) -> dict:
    """The distillation baseline of one row of a study's results store, as a JSON-ready record.

    The row (the extracted model the student competes with) gives the task, the seed and sizes of
    its prompts, and its parameter budget. The student (the largest N-layer one within the budget,
    fresh, seeded by the row's seed) is trained on the row's patching prompts, evaluated every
    `eval_every` steps on its validation prompts and stopped when the validation loss plateaus
    (`patience`, `min_improvement`; see `distill`) or after `max_steps` (the paper's 20,000
    epochs). The record holds the settings, the budget, N, the whole curve, the best validation
    accuracy (the paper's number) and the final test accuracy. `checkpoint_path`,
    `checkpoint_every`: resumable, as in `distill`.
    """
    from circuitlib.tasks import get_task

    task = get_task(row["task"])
    seed = int(row["seed"])
    budget = int(row["parameters"])
    n_layers = layers_within(teacher.cfg, budget)
    if n_layers < 1:
        raise ValueError(f"not even a one-layer student fits in the extracted model's {budget:,} parameters")
    data = task.generate(tokenizer, n=int(row["n"]), seed=seed, n_test=int(row["n_test"]))
    student = make_student(teacher, n_layers, seed=seed)
    history = distill(
        teacher,
        student,
        data.patching.tokens,
        data.validation,
        task,
        steps=max_steps,
        lr=lr,
        seed=seed,
        eval_every=eval_every,
        patience=patience,
        min_improvement=min_improvement,
        progress=progress,
        checkpoint_path=checkpoint_path,
        checkpoint_every=checkpoint_every,
    )
    with torch.inference_mode():
        test_logits = student(data.test.tokens.to(teacher.W_E.device), last_only=True)
        test_accuracy = accuracy(task, data.test, test_logits)
    return {
        "model": row["model"],
        "task": task.name,
        "ablation": row["ablation"],
        "include_mlps": bool(row["include_mlps"]),
        "seed": seed,
        "alpha": float(row["alpha"]),
        "n": int(row["n"]),
        "n_test": int(row["n_test"]),
        "study": row["study"],
        "study_key": row["key"],
        "budget_parameters": budget,
        "extracted_val_accuracy": float(row["val_accuracy"]),
        "extracted_test_accuracy": float(row["test_accuracy"]),
        "full_parameters": int(row["full_parameters"]),
        "student_layers": n_layers,
        "student_parameters": student_parameters(teacher.cfg, n_layers),
        "lr": lr,
        "max_steps": max_steps,
        "eval_every": eval_every,
        "patience": patience,
        "min_improvement": min_improvement,
        "steps_run": len(history.train_loss),
        "stopped": history.stopped,
        "seconds": history.seconds,
        "cpu_seconds": history.cpu_seconds,
        "best_val_accuracy": history.best_val_accuracy,
        "best_step": history.best_step,
        "test_accuracy": test_accuracy,
        "train_loss": history.train_loss,
        "eval_steps": history.eval_steps,
        "val_loss": history.val_loss,
        "val_accuracy": history.val_accuracy,
    }


BASELINE_SETTINGS = ("lr", "max_steps", "eval_every", "patience", "min_improvement")


def distilled_student(
    out_dir,
    teacher: Transformer,
    tokenizer,
    row: Mapping,
    *,
    device: str = "cpu",
    threads: int = 1,
    progress: bool = True,
    replace: bool = False,
    checkpoint_every: int = 100,
    **settings,
) -> dict:
    """The record at `baseline_path(out_dir, row)` if it was trained with these `settings`, else train it.

    settings: any of BASELINE_SETTINGS (defaults as in `distill_baseline`). A record trained with
    other settings is never replaced silently: that raises, naming the file and the differences;
    `replace=True` retrains and replaces it (the old record stays until the new one is written).
    A new record gets its provenance and is written atomically. While it trains, the student
    checkpoints to the record's name ending in .ckpt (a training cut off continues from there when
    asked again) and holds <name>.lock: a second process asking for it gets `ResultInProgress`.
    """
    import json

    from circuitlib.core.io import atomic_write
    from circuitlib.studies.provenance import provenance

    unknown = set(settings) - set(BASELINE_SETTINGS)
    if unknown:
        raise TypeError(f"unknown distillation setting(s) {sorted(unknown)}; choose from {BASELINE_SETTINGS}")
    path = baseline_path(out_dir, row)

    def train() -> dict:
        record = distill_baseline(
            teacher,
            tokenizer,
            row,
            progress=progress,
            checkpoint_path=path.with_suffix(".ckpt"),
            checkpoint_every=checkpoint_every,
            **settings,
        )
        record["provenance"] = {
            **provenance(str(device), threads),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return record

    return computed_once(
        path,
        {**settings, "study_key": row["key"]},
        compute=train,
        read=lambda p: json.loads(p.read_text()),
        write=lambda p, record: atomic_write(p, lambda tmp: Path(tmp).write_text(json.dumps(record))),
        settings_of=lambda record: record,
        busy_hint="wait for it, or train another configuration meanwhile",
        replace=replace,
    )
