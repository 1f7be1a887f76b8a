"""Checkers for the class exercises (the exercises chapter of the book).

Each checker takes the student's function, runs it on a few cases, compares the answers with
circuitlib's own, prints a clear PASS or FAIL message (with the first case that went wrong and
a hint), and returns True or False. A student function that raises is a FAIL, not a crash
(`NotImplementedError` from an untouched stub says "not implemented yet").

    check_prune_decision(fn)        fn(kl_before, kl_after, alpha) -> bool
    check_kl(fn)                    fn(full_logits [n, V], other_logits [n, V]) -> float
    check_mean_ablation(fn)         fn(model, tokens [n, S], layer, head) -> [S, d_head]
    check_greedy_extraction(fn)     fn(components, kl_of, alpha) -> list of pruned components
    check_head_parameter_count(fn)  fn(cfg, removed_heads) -> int
    check_accuracy(fn)              fn(task, split, last_logits [n, V]) -> float
    check_timer(fn)                 fn(callable, warmup, repeats) -> seconds
    check_circuit_prediction(fn)    fn() -> (components, edges) of sort_unique's compiled circuit
    check_diagnosis(fn)             fn(ablation, data, truth, kept) -> (missed, extra, reason)

Every checker records its verdict and its computing time under its exercise (`RESULTS`, `TIMES`;
`record=False` for demonstrations of wrong answers); `summary()` prints them, one exercise a
line, and `read_summary(notebook)` reads that table back from an executed notebook (the
teachers' page quotes it). `REFERENCES` maps each exercise's function name (`my_kl`, ...) to a
reference implementation that passes its checker (the tests fill the student notebook with them).

The student and the solution notebook are both generated from one source,
`notebooks/src/08_exercises.py`, by `scripts/make_exercises.py`.

The cases run on small random models (circuitlib's "tiny-gpt2" and a tiny Llama-shaped model)
and on configurations of GPT-2 Small and SmolLM2-135M built on PyTorch's meta device, so every
checker takes seconds on a laptop CPU. Exercises 9 and 10 use transformers compiled with Tracr
(`circuitlib.models.compiled`): their answers are the compiler's, never typed by hand.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable

import torch

from circuitlib.core.ablation import mean_activations
from circuitlib.core.metrics import kl_divergence, time_forward
from circuitlib.core.model import LayerPlan, ModelConfig, Transformer, full_plan
from circuitlib.discovery.greedy import extract, traversal
from circuitlib.studies.provenance import machine

__all__ = [
    "EXERCISES",
    "RESULTS",
    "TIMES",
    "REFERENCES",
    "timed",
    "record",
    "passed",
    "requires",
    "check_put_together",
    "summary",
    "read_summary",
    "machine",
    "check_prune_decision",
    "check_kl",
    "check_mean_ablation",
    "check_greedy_extraction",
    "check_head_parameter_count",
    "check_accuracy",
    "check_timer",
    "check_circuit_prediction",
    "check_diagnosis",
    "show_program",
    "reverse_runs",
    "DIAGNOSES",
    "reference_prune_decision",
    "reference_kl",
    "reference_mean_z",
    "reference_greedy",
    "reference_head_parameters",
    "reference_accuracy",
    "reference_timer",
    "reference_sort_unique_circuit",
    "reference_diagnosis",
    "GPT2_SMALL",
    "SMOLLM2_135M",
]

# The shapes of the two models of the book (no weights needed to count parameters).
GPT2_SMALL = ModelConfig(
    name="gpt2", arch="gpt2", n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024
)
SMOLLM2_135M = ModelConfig(
    name="smollm2-135m",
    arch="llama",
    n_layers=30,
    d_model=576,
    n_heads=9,
    d_head=64,
    d_mlp=1536,
    d_vocab=49152,
    n_ctx=8192,
    n_kv_heads=3,
)

# The exercises, in order: the name each checker reports under.
EXERCISES = (
    "1. prune decision",
    "2. KL divergence",
    "3. mean ablation",
    "4. greedy extraction",
    "5. head parameter count",
    "6. accuracy",
    "7. timer",
    "8. put it together",
    "9. circuit prediction",
    "10. diagnosis",
)


# ------------------------------------------------------------------------------------------
# verdicts and what the exercises cost

RESULTS: dict[str, bool] = {}
TIMES: dict[str, float] = {}


def _exercise(name: str) -> str:
    """'KL divergence' or '2. KL divergence' -> '2. KL divergence' (an error for an unknown name)."""
    for full in EXERCISES:
        if name == full or name == full.split(". ", 1)[1]:
            return full
    raise KeyError(f"no exercise called {name!r}; the exercises are {', '.join(EXERCISES)}")


def record(name: str, ok: bool, seconds: float | None = None) -> bool:
    """Store the verdict (and, if given, the computing seconds) of exercise `name`; returns `ok`."""
    name = _exercise(name)
    RESULTS[name] = bool(ok)
    if seconds is not None:
        TIMES[name] = seconds
    return bool(ok)


def passed(name: str) -> bool:
    """Whether exercise `name` passed its last check (False when it never ran)."""
    return RESULTS.get(_exercise(name), False)


def requires(name: str, needed) -> bool:
    """True when every exercise in `needed` passed; otherwise print a FAIL for `name`, record it, return False.

    Exercise 8 calls it first, so that a student copy fails at once instead of after minutes of work.
    """
    name = _exercise(name)
    missing = [_exercise(x) for x in needed if not passed(x)]
    if missing:
        record(name, False)
        print(
            f"FAIL {name.split('. ', 1)[1]}: needs exercise {' and '.join(missing)} to pass first "
            f"(this exercise uses those functions); skipped."
        )
        return False
    return True


def check_put_together(accuracy_full: float, accuracy_pruned: float, extraction) -> bool:
    """Exercise 8: the student's accuracies of both models agree with the extraction's own metrics."""
    want = (
        extraction.metrics["full"]["validation"]["accuracy"],
        extraction.metrics["pruned"]["validation"]["accuracy"],
    )
    ok = all(math.isclose(float(got), w, abs_tol=1e-6) for got, w in zip((accuracy_full, accuracy_pruned), want))
    if ok:
        print("PASS put it together: your accuracies of the full and the extracted model agree with circuitlib's.")
    else:
        print(
            f"FAIL put it together: your accuracies (full {float(accuracy_full):.4f}, extracted "
            f"{float(accuracy_pruned):.4f}) differ from circuitlib's ({want[0]:.4f}, {want[1]:.4f}) on the "
            f"same validation prompts."
        )
    return record("put it together", ok)


@contextmanager
def timed(name: str):
    """Add the wall-clock seconds of the block to TIMES for exercise `name`."""
    name = _exercise(name)
    start = time.perf_counter()
    try:
        yield
    finally:
        TIMES[name] = TIMES.get(name, 0.0) + time.perf_counter() - start


_SUMMARY_HEADER = f"{'exercise':<26} {'result':<8} {'seconds':>9}"
_SUMMARY_LINE = re.compile(r"^(\d+\. .+?)\s+(PASS|FAIL|not run)\s+(\S+)$")


def summary() -> None:
    """Print the machine, then every exercise's verdict and computing seconds, one a line (`read_summary` parses it)."""
    print(f"computed on {machine()}")
    print(_SUMMARY_HEADER)
    for name in EXERCISES:
        verdict = {True: "PASS", False: "FAIL", None: "not run"}[RESULTS.get(name)]
        seconds = f"{TIMES[name]:.2f}" if name in TIMES else "-"
        print(f"{name:<26} {verdict:<8} {seconds:>9}")


def read_summary(notebook) -> dict[str, dict]:
    """{exercise: {"result": "PASS"|"FAIL"|"not run", "seconds": float or None}} from an executed notebook.

    `notebook` is a path or an nbformat notebook; the table is the output of `summary()`. Raises
    ValueError when the notebook has no such output (not executed, or `summary()` never ran).
    """
    import nbformat

    nb = notebook if isinstance(notebook, nbformat.NotebookNode) else nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text = out.get("text", "") if out.get("output_type") == "stream" else ""
            if _SUMMARY_HEADER not in text:
                continue
            rows = {}
            for line in text.split(_SUMMARY_HEADER, 1)[1].splitlines():
                m = _SUMMARY_LINE.match(line.strip())
                if m:
                    rows[m.group(1)] = {
                        "result": m.group(2),
                        "seconds": None if m.group(3) == "-" else float(m.group(3)),
                    }
            if list(rows) != list(EXERCISES):
                raise ValueError(f"the summary table lists {list(rows)}, expected {list(EXERCISES)}")
            return rows
    raise ValueError("no exercise summary in this notebook: execute it to the end (its last cell prints it)")


class _Fail(Exception):
    """One case went wrong: the message says which and how."""


@contextmanager
def _one_thread():
    """The checks use tiny models: extra threads only add overhead (a lot, on a busy machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _report(name: str, run: Callable[[], int], hint: str, keep: bool) -> bool:
    """Run the cases, print PASS or FAIL (never raise) and, if `keep`, record the verdict and time."""
    start = time.perf_counter()
    try:
        with _one_thread():
            n_cases = run()
    except NotImplementedError:
        ok = False
        print(f"FAIL {name}: not implemented yet (the stub still raises NotImplementedError). Fill it in and rerun.")
    except _Fail as e:
        ok = False
        print(f"FAIL {name}: {e}\n     hint: {hint}")
    except Exception as e:  # the student's code crashed: say where, do not crash the notebook
        ok = False
        print(f"FAIL {name}: your function raised {type(e).__name__}: {e}\n     hint: {hint}")
    else:
        ok = True
        print(f"PASS {name}: all {n_cases} cases agree with circuitlib.")
    if keep:
        record(name, ok, time.perf_counter() - start)
    return ok


# ------------------------------------------------------------------------------------------
# small models for the checks


@lru_cache(maxsize=None)
def _tiny(arch: str) -> Transformer:
    from circuitlib.core.convert import from_hf
    from circuitlib.models.loading import random_hf_model

    if arch == "gpt2":
        hf = random_hf_model("gpt2", n_layers=3, n_heads=4, d_model=32, d_mlp=64, vocab_size=101, seed=7, n_ctx=16)
    else:
        hf = random_hf_model(
            "llama", n_layers=3, n_heads=6, n_kv_heads=2, d_model=48, d_mlp=64, vocab_size=101, seed=7, n_ctx=16
        )
    # a wide initialisation so that ablations move the KL visibly
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.mul_(10.0)
    return from_hf(hf, f"tiny-{arch}").eval()


def _tokens(n: int, S: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 101, (n, S), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------
# 1. the pruning criterion


def reference_prune_decision(kl_before: float, kl_after: float, alpha: float) -> bool:
    """Algorithm 1's test: prune when the KL rises by strictly less than alpha."""
    return kl_after - kl_before < alpha


def check_prune_decision(fn: Callable[[float, float, float], bool], record: bool = True) -> bool:
    """fn(kl_before, kl_after, alpha) -> True when Algorithm 1 prunes the component for good."""
    cases = [
        (0.10, 0.105, 0.01),
        (0.10, 0.20, 0.01),
        (0.10, 0.11, 0.01 + 1e-12),
        (0.30, 0.25, 0.0),
        (0.0, 0.0, 0.0),
        (0.5, 0.5, 1e-9),
        (0.2, 0.1, 0.05),
        (1.0, 3.0, 1.0),
        (0.0, 1e-3, 1e-3),
    ]

    def run():
        for kl_before, kl_after, alpha in cases:
            want, got = reference_prune_decision(kl_before, kl_after, alpha), fn(kl_before, kl_after, alpha)
            if not isinstance(got, (bool, torch.Tensor)) and got not in (0, 1):
                raise _Fail(f"return True or False; got {got!r}")
            if bool(got) != want:
                raise _Fail(
                    f"kl_before={kl_before}, kl_after={kl_after}, alpha={alpha}: you say "
                    f"{'prune' if got else 'keep'}, Algorithm 1 says {'prune' if want else 'keep'}"
                )
        return len(cases)

    return _report(
        "prune decision",
        run,
        "the test is on the change of the KL, not on the KL itself; reread what "
        "the equation says when the change equals alpha exactly, and when it "
        "is negative",
        record,
    )


# ------------------------------------------------------------------------------------------
# 2. the KL divergence


def reference_kl(full_logits: torch.Tensor, other_logits: torch.Tensor) -> float:
    """KL(f || g) at the last position, summed over the vocabulary, averaged over prompts."""
    return kl_divergence(full_logits, other_logits)


def check_kl(fn: Callable[[torch.Tensor, torch.Tensor], float], record: bool = True) -> bool:
    """fn(full_last_logits [n, V], other_last_logits [n, V]) -> KL(f || g), as `metrics.kl_divergence`.

    Two cases have probabilities below float32's smallest number (e^-104): there the softmax is
    exactly 0, so taking the log of a softmax gives -inf and a KL of inf or nan; log_softmax does not.
    """
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 11, generator=g) * 3, torch.randn(5, 11, generator=g) * 3
    confident = b.clone()
    confident[:, 0] += 150.0  # g puts almost all its mass on token 0: the rest underflows to 0
    cases = [
        ("two random batches", a, b),
        ("swapped (KL is not symmetric)", b, a),
        ("identical logits", a, a.clone()),
        ("a shift of all logits changes nothing", a, a + 7.0),
        ("one prompt", a[:1], b[:1]),
        ("a sharp full distribution", a * 10, b),
        ("a larger vocabulary", torch.randn(3, 1000, generator=g) * 4, torch.randn(3, 1000, generator=g) * 4),
        ("g gives some tokens a probability below e^-104 (0 in float32)", a, confident),
        ("f gives some tokens a probability below e^-104 (0 in float32)", confident, a),
    ]

    def run():
        for what, f, o in cases:
            want, got = kl_divergence(f, o), fn(f.clone(), o.clone())
            got = float(got)
            if not math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-5):
                raise _Fail(f"case '{what}': expected {want:.6f}, got {got:.6f}")
        return len(cases)

    return _report(
        "KL divergence",
        run,
        "which distribution weights the sum, and over which dimension do you sum "
        "and over which average? If a case gives inf or nan, look at how you "
        "get log-probabilities from logits",
        record,
    )


# ------------------------------------------------------------------------------------------
# 3. mean ablation


def reference_mean_z(model: Transformer, tokens: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """The head's hook_z averaged over the prompts, one vector per position: [S, d_head]."""
    return mean_activations(model, tokens).z[layer, head]


def check_mean_ablation(fn: Callable[[Transformer, torch.Tensor, int, int], torch.Tensor], record: bool = True) -> bool:
    """fn(model, tokens, layer, head) -> the head's mean hook_z over the prompts, per position: [S, d_head]."""
    cases = [("gpt2", 0, 1), ("gpt2", 2, 3), ("llama", 1, 4), ("llama", 2, 0)]

    def run():
        for arch, layer, head in cases:
            model, tokens = _tiny(arch), _tokens(12, 7, seed=layer + 10 * head)
            want = reference_mean_z(model, tokens, layer, head)  # [S, E]
            with torch.inference_mode():
                got = fn(model, tokens, layer, head)
            got = torch.as_tensor(got).detach().float()
            if tuple(got.shape) != tuple(want.shape):
                raise _Fail(
                    f"{arch} model, head {layer}.{head}: expected shape {list(want.shape)} (positions x "
                    f"d_head), got {list(got.shape)}"
                )
            if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
                err = (got - want).abs().max().item()
                raise _Fail(f"{arch} model, head {layer}.{head}: values differ (largest difference {err:.3g})")
        return len(cases)

    return _report(
        "mean ablation",
        run,
        "the head reads the residual stream as the full model leaves it after "
        "the layers below; check the shape you return: one vector per position",
        record,
    )


# ------------------------------------------------------------------------------------------
# 4. Algorithm 1


def reference_greedy(components, kl_of, alpha):
    """Algorithm 1 written over an abstract KL function (a solution of exercise 4)."""
    pruned, kl = [], kl_of([])
    for c in components:
        kl_new = kl_of(pruned + [c])
        if kl_new - kl < alpha:
            pruned.append(c)
            kl = kl_new
    return pruned


def _kl_function(model: Transformer, patching, validation, ablation: str):
    """kl_of(ablated): KL(f || g) of the model with the `ablated` components physically pruned."""
    from circuitlib.core.surgery import prune

    means = mean_activations(model, patching) if ablation == "mean" else None
    everything = model.kept_heads() + [f"MLP {l}" for l in range(model.cfg.n_layers)]
    with torch.inference_mode():
        full = model(validation, last_only=True)

    def kl_of(ablated):
        gone = set(ablated)
        with torch.inference_mode():
            g = prune(model, [c for c in everything if c not in gone], ablation, means)
            return kl_divergence(full, g(validation, last_only=True))

    return kl_of


def check_greedy_extraction(fn: Callable, record: bool = True) -> bool:
    """fn(components, kl_of, alpha) -> the components Algorithm 1 prunes, in visiting order.

    components: names in visiting order ("L.H" heads, "MLP L"); kl_of(list of names) -> float is
    KL(f || g) when those components are ablated. Compared with `circuitlib.discovery.greedy.extract`.
    """
    cases = [
        ("gpt2", "mean", True, 0.05),
        ("gpt2", "zero", False, 0.2),
        ("llama", "mean", True, 0.02),
        ("llama", "mean", False, 0.0),
    ]

    def run():
        for arch, ablation, mlps, alpha in cases:
            model = _tiny(arch)
            patching, validation = _tokens(16, 6, seed=1), _tokens(8, 6, seed=2)
            components = traversal(model.cfg.n_layers, model.cfg.n_heads, mlps)
            base = _kl_function(model, patching, validation, ablation)
            got = list(fn(list(components), lambda ablated: base(list(ablated)), alpha))
            want = extract(
                model, patching, validation, alpha=alpha, ablation=ablation, include_mlps=mlps, progress=False
            ).pruned
            if got != want:
                missing = [c for c in want if c not in got][:4]
                extra = [c for c in got if c not in want][:4]
                raise _Fail(
                    f"{arch} model, {ablation} ablation, alpha={alpha}: circuitlib prunes {len(want)} "
                    f"components, you prune {len(got)} (you keep {missing or 'none'} that it prunes, "
                    f"prune {extra or 'none'} that it keeps)"
                )
        return len(cases)

    return _report(
        "greedy extraction",
        run,
        "which model is g when you test a component: the full model, or the "
        "model after the decisions taken so far? And when does the KL you "
        "compare against change?",
        record,
    )


# ------------------------------------------------------------------------------------------
# 5. parameters of a head


def reference_head_parameters(cfg: ModelConfig, removed_heads) -> int:
    """Parameters freed by removing `removed_heads` from one full layer of `cfg` (counted on the meta device)."""
    removed = sorted(set(removed_heads))
    one = dataclasses.replace(cfg, n_layers=1)
    with torch.device("meta"):
        full = Transformer(one, full_plan(one))
        pruned = Transformer(one, [LayerPlan(heads=[h for h in range(cfg.n_heads) if h not in removed])])
    return full.count_parameters()["parameters"] - pruned.count_parameters()["parameters"]


def check_head_parameter_count(fn: Callable[[ModelConfig, list], int], record: bool = True) -> bool:
    """fn(cfg, removed_heads) -> parameters freed when `removed_heads` of ONE layer are pruned.

    Cases on GPT-2 Small (biases, one K/V per head) and SmolLM2-135M (no biases, grouped K/V: a key
    and value head goes only when all the query heads sharing it go). A layer that loses every head
    also loses its first norm.
    """
    cases = [
        (GPT2_SMALL, [5]),
        (GPT2_SMALL, [0, 1, 2]),
        (SMOLLM2_135M, [0]),
        (SMOLLM2_135M, [0, 1, 2]),
        (SMOLLM2_135M, [2, 3]),
        (SMOLLM2_135M, list(range(9))),
        (GPT2_SMALL, list(range(12))),
    ]

    def run():
        for cfg, removed in cases:
            want, got = reference_head_parameters(cfg, removed), fn(cfg, list(removed))
            if int(got) != want:
                raise _Fail(
                    f"{cfg.name}, removing heads {removed} of one layer: expected {want:,} parameters, got {int(got):,}"
                )
        return len(cases)

    return _report(
        "head parameter count",
        run,
        "count separately what belongs to one query head, what a key/value head shares with its group, "
        "and what goes only when the layer has no head left; which of them have biases in GPT-2?",
        record,
    )


# ------------------------------------------------------------------------------------------
# 6. accuracy with several correct answers


def reference_accuracy(task, split, last_logits: torch.Tensor) -> float:
    """Fraction of prompts whose argmax is a correct answer (`Task.correct`)."""
    return task.correct(split, last_logits).float().mean().item()


def check_accuracy(fn: Callable, record: bool = True) -> bool:
    """fn(task, split, last_logits) -> fraction of prompts whose argmax is a correct answer.

    Checked on IOI (one correct token) and greater-than (any later year ending is correct) with the
    GPT-2 tokenizer and random logits that put the argmax on chosen tokens.
    """
    from circuitlib.models.loading import gpt2_tokenizer
    from circuitlib.tasks import get_task

    tok = gpt2_tokenizer()
    g = torch.Generator().manual_seed(3)

    def logits_with_argmax(split, pick):
        logits = torch.randn(len(split), tok.vocab_size, generator=g)
        logits[torch.arange(len(split)), pick] = 50.0
        return logits

    def run():
        n_cases = 0
        for name in ("ioi", "greater-than"):
            task = get_task(name)
            split = task.generate(tok, n=20, seed=4).validation
            picks = [split.answers.clone(), torch.randint(0, tok.vocab_size, (len(split),), generator=g)]
            if split.candidates is not None:  # all the year endings, right and wrong
                picks.append(split.candidates[torch.randint(0, len(split.candidates), (len(split),), generator=g)])
            mixed = split.answers.clone()
            mixed[::3] = (mixed[::3] + 1) % tok.vocab_size
            picks.append(mixed)
            for pick in picks:
                logits = logits_with_argmax(split, pick)
                want, got = reference_accuracy(task, split, logits), float(fn(task, split, logits))
                n_cases += 1
                if not math.isclose(got, want, abs_tol=1e-6):
                    raise _Fail(f"task {name}: expected accuracy {want:.3f}, got {got:.3f}")
        return n_cases

    return _report(
        "accuracy",
        run,
        "for IOI one token is right; for greater-than, look at what split.candidates "
        "and split.accepted tell you about each prompt",
        record,
    )


# ------------------------------------------------------------------------------------------
# 7. an honest timer


class _FakeModel:
    """A callable with planned durations: a slow cold start, then calls of 15, 45 and 75 ms in turn, one outlier.

    `planned(k)` is the duration of call k (1-based), so a checker knows the median, the minimum
    and the mean that each way of timing would report.
    """

    def __init__(
        self,
        cold_calls: int = 2,
        cold_s: float = 0.12,
        cycle_s=(0.015, 0.045, 0.075),
        outlier_at: int = 4,
        outlier_s: float = 0.25,
    ):
        self.calls, self.cold_calls, self.cold_s, self.cycle_s = 0, cold_calls, cold_s, cycle_s
        self.outlier_at, self.outlier_s = outlier_at, outlier_s
        self.grad_enabled = []

    def planned(self, k: int) -> float:
        if k <= self.cold_calls:
            return self.cold_s
        if k == self.cold_calls + self.outlier_at:
            return self.outlier_s
        return self.cycle_s[(k - self.cold_calls - 1) % len(self.cycle_s)]

    def __call__(self):
        self.calls += 1
        self.grad_enabled.append(torch.is_grad_enabled())
        time.sleep(self.planned(self.calls))


def reference_timer(forward: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median seconds of `repeats` timed calls after `warmup` untimed ones (`metrics.time_forward`)."""
    return time_forward(forward, warmup=warmup, repeats=repeats)["median_s"]


def check_timer(fn: Callable[[Callable[[], object], int, int], float], record: bool = True) -> bool:
    """fn(forward, warmup, repeats) -> seconds of one call: warm-up first, then the median of repeats.

    The fake model's first two calls are slow (a cold start), the next ones take 15, 45 and 75 ms
    in turn and one is a 250 ms outlier: the median of the timed calls is 45 ms, their minimum
    15 ms and their mean over 70 ms, so a timer that reports the minimum or the mean fails (the
    tolerance, 30 % of the median, leaves room for a busy machine's late wake-ups). Also checks
    that the timed calls run without autograd.
    """
    import statistics

    def run():
        for warmup, repeats in ((2, 9), (3, 7)):
            model = _FakeModel()
            got = float(fn(model, warmup, repeats))
            if model.calls != warmup + repeats:
                raise _Fail(
                    f"warmup={warmup}, repeats={repeats}: the model was called {model.calls} times, "
                    f"expected {warmup + repeats}"
                )
            timed_calls = [model.planned(k) for k in range(warmup + 1, warmup + repeats + 1)]
            median, fastest = statistics.median(timed_calls), min(timed_calls)
            mean = sum(timed_calls) / repeats
            if abs(got - median) > 0.3 * median:
                why = (
                    "that is about the fastest call: one lucky call should not set the number"
                    if abs(got - fastest) < abs(got - median)
                    else "that is near the mean: a single slow call pulls a mean up"
                    if abs(got - mean) < 0.3 * mean
                    else "a typical call of this model takes much less or much more"
                )
                raise _Fail(f"warmup={warmup}, repeats={repeats}: you report {got * 1000:.1f} ms per call; {why}")
            if any(model.grad_enabled):
                raise _Fail("the model ran with autograd on: inference needs no gradients")
        return 2

    return _report(
        "timer",
        run,
        "which calls should be timed at all, and which single number describes a typical "
        "call even when one call is much slower or faster than the rest?",
        record,
    )


# ------------------------------------------------------------------------------------------
# 9. predict a compiled program's circuit from its RASP source

_COMPONENT = re.compile(r"^(\d+\.\d+|MLP \d+)$")
_EDGE = re.compile(r"^(embed|pos|\d+\.\d+|MLP \d+) -> (\d+\.\d+\.[qkv]|MLP \d+|logits)$")


@lru_cache(maxsize=None)
def _compiled(program: str):
    from circuitlib.models.compiled.compile import load_compiled

    return load_compiled(program)


def show_program(program: str = "sort_unique") -> None:
    """Print a built-in program's RASP source (Tracr's own code, read at run time) and its compiled shape."""
    import inspect

    from circuitlib.models.compiled.programs import BUILTIN

    c = _compiled(program)
    make = BUILTIN[program].make
    print(inspect.getsource(make))
    named = {"sort_unique": "make_sort_unique", "hist": "make_hist", "xproportion": "make_frac_prevs"}
    if program in named:  # the built-in calls Tracr's library: print that function too
        from tracr.compiler import lib

        print(inspect.getsource(getattr(lib, named[program])))
    cfg = c.model.cfg
    print(
        f'compiled: {cfg.n_layers} layers x {cfg.n_heads} head(s) (heads "L.H", MLPs "MLP L"); '
        f"inputs: BOS then 1 to {c.info.max_seq_len} tokens of {sorted(c.info.vocab)}"
    )


def reference_sort_unique_circuit() -> tuple[list[str], list[str]]:
    """sort_unique's circuit as the compiler wires it: its true components and its structural edges
    without BOS plumbing (`circuitlib.models.compiled.truth`)."""
    from circuitlib.models.compiled.truth import structural_edges, truth_components

    c = _compiled("sort_unique")
    return truth_components(c.info), structural_edges(c.info, c.model, bos_plumbing=False)


def check_circuit_prediction(fn: Callable[[], tuple], record: bool = True) -> bool:
    """fn() -> (components, edges): the heads and MLPs of sort_unique's compiled circuit and the edges between them.

    Compared with the compiler's truth. A wrong answer is told how many it misses and which of its
    names are wrong, not the answer itself.
    """

    def run():
        got = fn()
        if not (isinstance(got, tuple) and len(got) == 2):
            raise _Fail(f"return a pair (components, edges) of two lists; got {type(got).__name__}")
        components, edges = [str(x).strip() for x in got[0]], [str(x).strip() for x in got[1]]
        bad = [x for x in components if not _COMPONENT.match(x)] + [x for x in edges if not _EDGE.match(x)]
        if bad:
            raise _Fail(
                f"{bad[0]!r} is not a name: components are 'L.H' or 'MLP L', edges 'WRITER -> READER' with "
                "writers embed, pos, 'L.H', 'MLP L' and readers 'L.H.q', 'L.H.k', 'L.H.v', 'MLP L', logits"
            )
        want_components, want_edges = map(set, reference_sort_unique_circuit())
        missed, extra = want_components - set(components), set(components) - want_components
        if missed or extra:
            raise _Fail(
                f"components: the compiler uses {len(want_components)}; you miss {len(missed)}"
                + (f" and list {sorted(extra)}, which carry no operation" if extra else "")
            )
        missed, extra = want_edges - set(edges), set(edges) - want_edges
        if missed or extra:
            readers = sorted({e.split(" -> ")[1] for e in missed})
            raise _Fail(
                f"components right; edges: the compiler wires {len(want_edges)}; you miss {len(missed)}"
                + (f" (into {', '.join(readers)})" if readers else "")
                + (f" and list {sorted(extra)}, which it does not wire" if extra else "")
            )
        return 2

    return _report(
        "circuit prediction",
        run,
        "each Select/Aggregate is a head, each Map an MLP, a SelectorWidth a head and the MLP after it; "
        "an operation sits in the first layer after its inputs. In Select(keys, queries, predicate) "
        "the first argument feeds the head's key, the second its query; the Aggregate's values feed "
        "its value",
        record,
    )


# ------------------------------------------------------------------------------------------
# 10. explain where a method and the compiler disagree

DIAGNOSES = {
    "none": "no difference: the method found the true components",
    "threshold": "alpha is too large: the missed components matter, but change the metric by less than alpha",
    "zero-weights": "the compiler gave the missed components zero weights",
    "position-mean": "on inputs of one length, the missed components compute only what depends on position and "
    "length, which their position-wise mean reproduces exactly",
    "max-length": "without its head, the length operation reads the longest length, which is right on "
    "inputs of that length",
}
DIAGNOSIS_ALPHA = 1e-3


@lru_cache(maxsize=None)
def _reverse_runs() -> tuple:
    from circuitlib.models.compiled.truth import truth_components
    from circuitlib.pipeline.groundtruth import greedy
    from circuitlib.tasks.compiled import CompiledTask

    c = _compiled("reverse")
    task, longest = CompiledTask(c), c.info.max_seq_len
    cases = (
        ("mean", f"length {longest} only", task.inputs([longest])),
        ("zero", f"length {longest} only", task.inputs([longest])),
        ("mean", "every length", task.inputs()),
    )
    truth, runs = truth_components(c.info), []
    for ablation, data, batches in cases:
        circuit = greedy(c, batches, batches, DIAGNOSIS_ALPHA, ablation=ablation)
        rises = {d.component: d.kl_after - d.kl_before for d in circuit.decisions}  # the metric's rise at each step
        runs.append({"ablation": ablation, "data": data, "truth": list(truth), "kept": circuit.kept, "rises": rises})
    return tuple(runs)


def reverse_runs(show: bool = True) -> list[dict]:
    """Algorithm 1 (alpha 1e-3) on the compiled reverse in three settings: [{ablation, data, truth, kept}].

    show: print each run's settings, the true components and what the walk kept.
    """
    runs = [{k: v for k, v in r.items() if k != "rises"} for r in _reverse_runs()]
    if show:
        print(f"reverse's true components (from the compiler): {', '.join(runs[0]['truth'])}")
        for r in runs:
            print(f"  {r['ablation']} ablation, inputs of {r['data']}: Algorithm 1 keeps {', '.join(r['kept'])}")
    return runs


def reference_diagnosis(ablation: str, data: str, truth: list[str], kept: list[str]) -> tuple[list, list, str]:
    """(missed, extra, reason): what the walk missed and added, and which of `DIAGNOSES` explains it."""
    missed, extra = sorted(set(truth) - set(kept)), sorted(set(kept) - set(truth))
    if not missed and not extra:
        return missed, extra, "none"
    if data == "every length":
        raise ValueError("on inputs of every length the walk on reverse keeps the truth: no other case is known")
    return missed, extra, "position-mean" if ablation == "mean" else "max-length"


def _why_not(reason: str, run: dict) -> str:
    """What the data say against a wrong reason (one sentence)."""
    if reason == "threshold":
        missed = set(run["truth"]) - set(run["kept"])
        rise = max(run["rises"][c] for c in missed)
        if rise == 0:
            return "the metric did not rise at all when they were removed: no alpha above 0 would keep them"
        return f"removing them raised the metric by at most {rise:.3g}; ask why so little"
    if reason == "zero-weights":
        return "their weights are not zero: the compiler gave each of them an operation of the program"
    if reason == "none":
        return "the kept set is not the true set"
    if reason == "position-mean" and run["ablation"] == "zero":
        return "this run uses zero ablation: nothing here is replaced by a mean"
    if reason == "max-length" and run["ablation"] == "mean":
        return "this run uses mean ablation: a removed head writes its mean, not zero"
    return "another reason fits this run better"


def check_diagnosis(fn: Callable, record: bool = True) -> bool:
    """fn(ablation, data, truth, kept) -> (missed, extra, reason), reason a key of `DIAGNOSES`.

    Run on Algorithm 1's three runs on the compiled reverse (`reverse_runs`); compared with the
    compiler's truth and with the reason the runs' data support.
    """

    def run():
        for r in _reverse_runs():
            got = fn(r["ablation"], r["data"], list(r["truth"]), list(r["kept"]))
            if not (isinstance(got, tuple) and len(got) == 3):
                raise _Fail(f"return a triple (missed, extra, reason); got {type(got).__name__}")
            missed, extra, reason = got
            want = reference_diagnosis(r["ablation"], r["data"], r["truth"], r["kept"])
            where = f"{r['ablation']} ablation, inputs of {r['data']}"
            if sorted(missed) != want[0] or sorted(extra) != want[1]:
                raise _Fail(
                    f"{where}: missed {sorted(missed)} and extra {sorted(extra)} are not what the walk kept "
                    f"against the truth"
                )
            if reason not in DIAGNOSES:
                raise _Fail(f"{where}: reason {reason!r} is none of {', '.join(DIAGNOSES)}")
            if reason != want[2]:
                raise _Fail(f"{where}: {reason!r} does not explain it: {_why_not(reason, r)}")
        return len(_reverse_runs())

    return _report(
        "diagnosis",
        run,
        "what does each ablation put in place of a removed component, and what do a length and a "
        "position-wise mean look like on inputs that all have one length?",
        record,
    )


# The function each exercise asks for, by its name in the notebook, and a reference that passes its checker.
REFERENCES: dict[str, Callable] = {
    "my_prune_decision": reference_prune_decision,
    "my_kl": reference_kl,
    "my_mean_z": reference_mean_z,
    "my_greedy": reference_greedy,
    "my_head_parameters": reference_head_parameters,
    "my_accuracy": reference_accuracy,
    "my_timer": reference_timer,
    "my_sort_unique_circuit": reference_sort_unique_circuit,
    "my_diagnosis": reference_diagnosis,
}
