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

`strip_solutions(src, dst)` writes a copy of the exercises notebook without its solution cells
(cells tagged "solution") and without outputs, to hand out to students.

`timed(name)` measures how long an exercise's cells take to run (collected in `TIMES`;
`times_table()` lists them with `machine()`), which is what the teachers' page quotes.

The cases run on small random models (circuitlib's "tiny-gpt2" and a tiny Llama-shaped model)
and on configurations of GPT-2 Small and SmolLM2-135M built on PyTorch's meta device, so every
checker takes seconds on a laptop CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable

import torch

from .ablation import mean_activations
from .extract import extract, traversal
from .metrics import kl_divergence
from .model import LayerPlan, ModelConfig, Transformer, full_plan
from .study import machine  # noqa: F401  (re-exported: the exercises page prints it)

__all__ = ["strip_solutions", "timed", "TIMES", "times_table", "machine", "check_prune_decision", "check_kl", "check_mean_ablation", "check_greedy_extraction",
           "check_head_parameter_count", "check_accuracy", "check_timer", "GPT2_SMALL", "SMOLLM2_135M"]

# The shapes of the two models of the book (no weights needed to count parameters).
GPT2_SMALL = ModelConfig(name="gpt2", arch="gpt2", n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072,
                         d_vocab=50257, n_ctx=1024)
SMOLLM2_135M = ModelConfig(name="smollm2-135m", arch="llama", n_layers=30, d_model=576, n_heads=9, d_head=64,
                           d_mlp=1536, d_vocab=49152, n_ctx=8192, n_kv_heads=3)


# ------------------------------------------------------------------------------------------
# measuring what the exercises cost

TIMES: dict[str, float] = {}


@contextmanager
def timed(name: str):
    """Add the wall-clock seconds of the block to TIMES[name] (several blocks of one exercise add up)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - start
        TIMES[name] = TIMES.get(name, 0.0) + seconds
        print(f"[{name}: {seconds:.2f} s of computation]")


def times_table():
    """TIMES as a pandas DataFrame: exercise, seconds."""
    import pandas as pd

    return pd.DataFrame({"exercise": list(TIMES), "seconds": [round(s, 2) for s in TIMES.values()]}).set_index("exercise")


def strip_solutions(src, dst) -> int:
    """Copy notebook `src` to `dst` without the cells tagged "solution" and with outputs cleared.

    Returns the number of cells removed. `dst` must not exist yet (nothing is overwritten).
    """
    import os

    import nbformat

    if os.path.exists(dst):
        raise FileExistsError(f"{dst} exists; choose a new file name")
    nb = nbformat.read(src, as_version=4)
    before = len(nb.cells)
    nb.cells = [c for c in nb.cells if "solution" not in c.get("metadata", {}).get("tags", [])]
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    nbformat.write(nb, dst)
    return before - len(nb.cells)


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


def _report(name: str, run: Callable[[], int], hint: str) -> bool:
    try:
        with _one_thread():
            n_cases = run()
    except NotImplementedError:
        print(f"FAIL {name}: not implemented yet (the stub still raises NotImplementedError). Fill it in and rerun.")
        return False
    except _Fail as e:
        print(f"FAIL {name}: {e}\n     hint: {hint}")
        return False
    except Exception as e:  # the student's code crashed: say where, do not crash the notebook
        print(f"FAIL {name}: your function raised {type(e).__name__}: {e}\n     hint: {hint}")
        return False
    print(f"PASS {name}: all {n_cases} cases agree with circuitlib.")
    return True


# ------------------------------------------------------------------------------------------
# small models for the checks


@lru_cache(maxsize=None)
def _tiny(arch: str) -> Transformer:
    from .convert import from_hf
    from .loading import random_hf_model

    if arch == "gpt2":
        hf = random_hf_model("gpt2", n_layers=3, n_heads=4, d_model=32, d_mlp=64, vocab_size=101, seed=7, n_ctx=16)
    else:
        hf = random_hf_model("llama", n_layers=3, n_heads=6, n_kv_heads=2, d_model=48, d_mlp=64, vocab_size=101,
                             seed=7, n_ctx=16)
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


def _reference_decision(kl_before: float, kl_after: float, alpha: float) -> bool:
    return kl_after - kl_before < alpha


def check_prune_decision(fn: Callable[[float, float, float], bool]) -> bool:
    """fn(kl_before, kl_after, alpha) -> True when Algorithm 1 prunes the component for good."""
    cases = [(0.10, 0.105, 0.01), (0.10, 0.20, 0.01), (0.10, 0.11, 0.01 + 1e-12), (0.30, 0.25, 0.0),
             (0.0, 0.0, 0.0), (0.5, 0.5, 1e-9), (0.2, 0.1, 0.05), (1.0, 3.0, 1.0), (0.0, 1e-3, 1e-3)]

    def run():
        for kl_before, kl_after, alpha in cases:
            want, got = _reference_decision(kl_before, kl_after, alpha), fn(kl_before, kl_after, alpha)
            if not isinstance(got, (bool, torch.Tensor)) and got not in (0, 1):
                raise _Fail(f"return True or False; got {got!r}")
            if bool(got) != want:
                raise _Fail(f"kl_before={kl_before}, kl_after={kl_after}, alpha={alpha}: you say "
                            f"{'prune' if got else 'keep'}, Algorithm 1 says {'prune' if want else 'keep'}")
        return len(cases)

    return _report("prune decision", run, "prune when the KL rises by strictly less than alpha: "
                                          "kl_after - kl_before < alpha (a KL that falls is always pruned)")


# ------------------------------------------------------------------------------------------
# 2. the KL divergence


def check_kl(fn: Callable[[torch.Tensor, torch.Tensor], float]) -> bool:
    """fn(full_last_logits [n, V], other_last_logits [n, V]) -> KL(f || g), as `metrics.kl_divergence`."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 11, generator=g) * 3, torch.randn(5, 11, generator=g) * 3
    cases = [("two random batches", a, b), ("swapped (KL is not symmetric)", b, a),
             ("identical logits", a, a.clone()), ("a shift of all logits changes nothing", a, a + 7.0),
             ("one prompt", a[:1], b[:1]), ("a sharp full distribution", a * 10, b),
             ("a larger vocabulary", torch.randn(3, 1000, generator=g) * 4, torch.randn(3, 1000, generator=g) * 4)]

    def run():
        for what, f, o in cases:
            want, got = kl_divergence(f, o), fn(f.clone(), o.clone())
            got = float(got)
            if not math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-5):
                raise _Fail(f"case '{what}': expected {want:.6f}, got {got:.6f}")
        return len(cases)

    return _report("KL divergence", run, "KL(f || g) = sum_v p_f(v) (log p_f(v) - log p_g(v)) with p = softmax over "
                                         "the vocabulary (use log_softmax), then the mean over prompts")


# ------------------------------------------------------------------------------------------
# 3. mean ablation


def check_mean_ablation(fn: Callable[[Transformer, torch.Tensor, int, int], torch.Tensor]) -> bool:
    """fn(model, tokens, layer, head) -> the head's mean hook_z over the prompts, per position: [S, d_head]."""
    cases = [("gpt2", 0, 1), ("gpt2", 2, 3), ("llama", 1, 4), ("llama", 2, 0)]

    def run():
        for arch, layer, head in cases:
            model, tokens = _tiny(arch), _tokens(12, 7, seed=layer + 10 * head)
            want = mean_activations(model, tokens).z[layer, head]                 # [S, E]
            with torch.inference_mode():
                got = fn(model, tokens, layer, head)
            got = torch.as_tensor(got).detach().float()
            if tuple(got.shape) != tuple(want.shape):
                raise _Fail(f"{arch} model, head {layer}.{head}: expected shape {list(want.shape)} (positions x "
                            f"d_head), got {list(got.shape)}")
            if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
                err = (got - want).abs().max().item()
                raise _Fail(f"{arch} model, head {layer}.{head}: values differ (largest difference {err:.3g})")
        return len(cases)

    return _report("mean ablation", run, "run the residual stream through the layers below (x = layer(x)), take "
                                         "model.layers[layer].z(x)[:, :, head] and average over prompts only "
                                         "(dim 0), not over positions")


# ------------------------------------------------------------------------------------------
# 4. Algorithm 1


def reference_greedy(components, kl_of, alpha):
    """Algorithm 1 written over an abstract KL function (the solution of exercise 4)."""
    pruned, kl = [], kl_of([])
    for c in components:
        kl_new = kl_of(pruned + [c])
        if kl_new - kl < alpha:
            pruned.append(c)
            kl = kl_new
    return pruned


def _kl_function(model: Transformer, patching, validation, scheme: str):
    """kl_of(ablated): KL(f || g) of the model with the `ablated` components physically pruned."""
    from .surgery import prune

    means = mean_activations(model, patching) if scheme == "mean" else None
    everything = model.kept_heads() + [f"MLP {l}" for l in range(model.cfg.n_layers)]
    with torch.inference_mode():
        full = model(validation, last_only=True)

    def kl_of(ablated):
        gone = set(ablated)
        with torch.inference_mode():
            g = prune(model, [c for c in everything if c not in gone], scheme, means)
            return kl_divergence(full, g(validation, last_only=True))

    return kl_of


def check_greedy_extraction(fn: Callable) -> bool:
    """fn(components, kl_of, alpha) -> the components Algorithm 1 prunes, in visiting order.

    components: names in visiting order ("L.H" heads, "MLP L"); kl_of(list of names) -> float is
    KL(f || g) when those components are ablated. Compared with `circuitlib.extract.extract`.
    """
    cases = [("gpt2", "mean", True, 0.05), ("gpt2", "zero", False, 0.2), ("llama", "mean", True, 0.02),
             ("llama", "mean", False, 0.0)]

    def run():
        for arch, scheme, mlps, alpha in cases:
            model = _tiny(arch)
            patching, validation = _tokens(16, 6, seed=1), _tokens(8, 6, seed=2)
            components = traversal(model.cfg.n_layers, model.cfg.n_heads, mlps)
            base = _kl_function(model, patching, validation, scheme)
            got = list(fn(list(components), lambda ablated: base(list(ablated)), alpha))
            want = extract(model, patching, validation, alpha=alpha, ablation=scheme, include_mlps=mlps,
                           progress=False).pruned
            if got != want:
                missing = [c for c in want if c not in got][:4]
                extra = [c for c in got if c not in want][:4]
                raise _Fail(f"{arch} model, {scheme} ablation, alpha={alpha}: circuitlib prunes {len(want)} "
                            f"components, you prune {len(got)} (you keep {missing or 'none'} that it prunes, "
                            f"prune {extra or 'none'} that it keeps)")
        return len(cases)

    return _report("greedy extraction", run, "visit the components in the given order; compare each against the "
                                             "KL of the model as pruned *so far* (update it only when you prune), "
                                             "never against the full model")


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


def check_head_parameter_count(fn: Callable[[ModelConfig, list], int]) -> bool:
    """fn(cfg, removed_heads) -> parameters freed when `removed_heads` of ONE layer are pruned.

    Cases on GPT-2 Small (biases, one K/V per head) and SmolLM2-135M (no biases, grouped K/V: a key
    and value head goes only when all the query heads sharing it go). A layer that loses every head
    also loses its first norm.
    """
    cases = [(GPT2_SMALL, [5]), (GPT2_SMALL, [0, 1, 2]), (SMOLLM2_135M, [0]), (SMOLLM2_135M, [0, 1, 2]),
             (SMOLLM2_135M, [2, 3]), (SMOLLM2_135M, list(range(9))), (GPT2_SMALL, list(range(12)))]

    def run():
        for cfg, removed in cases:
            want, got = reference_head_parameters(cfg, removed), fn(cfg, list(removed))
            if int(got) != want:
                raise _Fail(f"{cfg.name}, removing heads {removed} of one layer: expected {want:,} parameters, "
                            f"got {int(got):,}")
        return len(cases)

    return _report("head parameter count", run,
                   "per query head: W_Q [d_model, d_head] and W_O [d_head, d_model] (+ b_Q in GPT-2); per K/V head "
                   "(only when its whole group is removed): W_K, W_V (+ b_K, b_V in GPT-2); a layer with no head "
                   "left also drops ln1 (d_model weights, + d_model biases in GPT-2); b_O always stays")


# ------------------------------------------------------------------------------------------
# 6. accuracy with several correct answers


def check_accuracy(fn: Callable) -> bool:
    """fn(task, split, last_logits) -> fraction of prompts whose argmax is a correct answer.

    Checked on IOI (one correct token) and greater-than (any later year ending is correct) with the
    GPT-2 tokenizer and random logits that put the argmax on chosen tokens.
    """
    from .loading import gpt2_tokenizer
    from .tasks import get_task

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
                want, got = task.correct(split, logits).float().mean().item(), float(fn(task, split, logits))
                n_cases += 1
                if not math.isclose(got, want, abs_tol=1e-6):
                    raise _Fail(f"task {name}: expected accuracy {want:.3f}, got {got:.3f}")
        return n_cases

    return _report("accuracy", run, "take the argmax of each row; without split.candidates it must equal "
                                    "split.answers; with candidates, it is correct when it equals a candidate j "
                                    "with split.accepted[i, j] True")


# ------------------------------------------------------------------------------------------
# 7. an honest timer


class _FakeModel:
    """A callable whose first calls are slow (a cold start) and with one slow outlier later."""

    def __init__(self, cold_calls: int = 2, cold_s: float = 0.08, steady_s: float = 0.01, outlier_at: int = 4,
                 outlier_s: float = 0.12):
        self.calls, self.cold_calls, self.cold_s, self.steady_s = 0, cold_calls, cold_s, steady_s
        self.outlier_at, self.outlier_s = outlier_at, outlier_s
        self.grad_enabled = []

    def __call__(self):
        self.calls += 1
        self.grad_enabled.append(torch.is_grad_enabled())
        if self.calls <= self.cold_calls:
            time.sleep(self.cold_s)
        elif self.calls == self.cold_calls + self.outlier_at:
            time.sleep(self.outlier_s)
        else:
            time.sleep(self.steady_s)


def check_timer(fn: Callable[[Callable[[], object], int, int], float]) -> bool:
    """fn(forward, warmup, repeats) -> seconds of one call: warm-up first, then the median of repeats.

    The fake model's first two calls are slow (a cold start) and one later call is an outlier; an
    honest timer reports the steady time. Also checks that the timed calls run without autograd.
    """
    def run():
        for warmup, repeats in ((2, 9), (3, 7)):
            model = _FakeModel(cold_calls=2)
            got = float(fn(model, warmup, repeats))
            if model.calls != warmup + repeats:
                raise _Fail(f"warmup={warmup}, repeats={repeats}: the model was called {model.calls} times, "
                            f"expected {warmup + repeats}")
            if not 0.5 * model.steady_s <= got <= 2.5 * model.steady_s:
                raise _Fail(f"warmup={warmup}, repeats={repeats}: you report {got * 1000:.1f} ms per call, the "
                            f"steady time is {model.steady_s * 1000:.0f} ms (cold calls are "
                            f"{model.cold_s * 1000:.0f} ms, one outlier {model.outlier_s * 1000:.0f} ms)")
            if any(model.grad_enabled):
                raise _Fail("the model ran with autograd on: wrap the calls in torch.inference_mode()")
        return 2

    return _report("timer", run, "call the model `warmup` times untimed, then time each of `repeats` calls "
                                 "(time.perf_counter) and return the median; on a GPU, torch.cuda.synchronize() "
                                 "before reading the clock; all under torch.inference_mode()")
