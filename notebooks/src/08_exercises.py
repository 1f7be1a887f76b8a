# The ONE source of the exercises: `scripts/make_exercises.py` writes from it both
#   notebooks/08_exercises.ipynb   the solution notebook, the book's chapter (solutions behind a "Solution" toggle)
#   a student notebook             stubs instead of solutions, no solution-only cells (--student PATH)
# Edit this file, never the generated notebook. The format (read by scripts/make_exercises.py):
#   "# %%" starts a code cell, "# %% [markdown]" a markdown cell (its lines lose their leading "# ");
#   after the marker, "solution-only" keeps a cell out of the student notebook, "tag:NAME" adds a cell tag.
#   In code: lines between "# SOLUTION" and "# END SOLUTION" are the solution; lines between
#   "# EXERCISE" and "# END EXERCISE" are the student's stub, written here commented out.
#   In markdown: "EXERCISE difficulty=D importance=I minutes=M writes=..." becomes the rating line;
#   lines between "HINT" and "END HINT" become a collapsed hint.
#   Everything above the first cell marker (this header) is not part of either notebook.

# %% [markdown]
# # Exercises
#
# Seven short programming exercises rebuild, piece by piece, what the extraction method of
# {cite}`garciacarrasco2024extracting` is made of: the pruning rule, the KL divergence, mean
# ablation, the greedy walk of Algorithm 1, the parameter count of a head, the accuracy of a task
# with several correct answers and an honest timer. An eighth puts the pieces to work on a real
# language model. The last two train judgement rather than implementation, on transformers
# compiled from RASP programs, whose circuit is known (see {doc}`06a_ground_truth`): read a
# program and predict its circuit, then explain why a method's circuit differs from the truth.
#
# Each exercise has the same shape:
#
# 1. a task, the signature of one function, and a rating: **difficulty** and **importance** on a
#    scale of 1 to 5 (●○○○○ to ●●●●●) and a **time budget**, the thinking and typing time to plan for;
# 2. **hints**, folded away: open one only when you are stuck; they point the way without giving
#    the answer;
# 3. a code cell with a stub for you to fill in (it raises `NotImplementedError` until you do),
#    then a cell that runs the exercise's **checker**: it compares your function with
#    circuitlib's on several cases and prints `PASS`, or `FAIL` with the first case that went
#    wrong and a hint.
#
# Work in Jupyter (`make lab` opens the notebooks in JupyterLab): fill in a stub, run its cell and
# the checker's, read the message, repeat. The last cell prints a summary of what passes. In the
# book, the solutions are behind a toggle labelled **Solution**; the student notebook (made by
# `make exercises`, see {doc}`../book/teaching`) has the stubs instead and no solutions.

# %% tag:parameters
# Parameters (papermill replaces these values; see "Re-running a notebook")
model: str = "smollm2-135m"  # model of exercise 8; offline stand-in. "gpt2" is the paper's GPT-2 Small (needs internet)
task: str = "ioi"            # task of exercise 8: "acronyms", "ioi" or "greater-than"
alpha: float = 0.02          # threshold of exercise 8's extraction (twice the task chapters' 0.01: a smaller circuit)
ablation: str = "mean"       # "mean" or "zero": what a removed component writes instead
include_mlps: bool = False   # also test the MLPs for removal in exercise 8
n: int = 8                   # prompts per split in exercise 8 (exercises 1-7 use fixed cases)
seed: int = 0                # seed of the prompt sampling
device: str = "cpu"          # exercise 8's device: "cpu", or "cuda" / "cuda:N" where there is a GPU
timing_repeats: int = 10     # timed forward passes per model in exercise 8

# %%
import statistics
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # no ipywidgets: tqdm prints text bars
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display

from circuitlib import ExtractionConfig, get_task, load_model, run_extraction
from booklib import exercises as ex, report

settings = {"model": model, "task": task, "alpha": alpha, "ablation": ablation,
            "include_mlps": include_mlps, "n": n, "seed": seed}

# %% [markdown]
# Exercise 8 uses these settings (exercises 1 to 7 do not depend on them):

# %%
report.provenance(settings, extra={"device": device, "machine": ex.machine()})

# %% [markdown]
# ## Exercise 1: the pruning rule
#
# EXERCISE difficulty=1 importance=4 minutes=5 writes="the keep-or-prune decision of one step, edge cases included"
#
# Algorithm 1 visits the components of the model one at a time. For the current model $g$ (at
# first the full model $f$) it computes $\mathrm{KL}(f \,\|\, g)$, ablates the component too,
# giving $g'$, computes $\mathrm{KL}(f \,\|\, g')$, and removes the component for good when
#
# $$\mathrm{KL}(f \,\|\, g') - \mathrm{KL}(f \,\|\, g) < \alpha .$$
#
# **Task.** Write `my_prune_decision(kl_before, kl_after, alpha)` returning `True` when the
# component is pruned.
#
# HINT
# Which quantity does the rule compare with $\alpha$: a KL, or a change of the KL?
# END HINT
#
# HINT
# Two edge cases decide most wrong answers: what if the KL *falls* when the component is ablated,
# and what if it rises by exactly $\alpha$? Read the comparison sign in the rule.
# END HINT

# %%
def my_prune_decision(kl_before: float, kl_after: float, alpha: float) -> bool:
    # SOLUTION
    return kl_after - kl_before < alpha   # strict: an increase of exactly alpha is kept
    # END SOLUTION
    # EXERCISE
    # # YOUR CODE HERE
    # raise NotImplementedError
    # END EXERCISE

# %%
ex.check_prune_decision(my_prune_decision);

# %% solution-only
# a common slip: "<=" instead of "<" (the authors' code uses a strict comparison)
ex.check_prune_decision(lambda before, after, a: after - before <= a, record=False);

# %% [markdown] solution-only
# A component whose ablation *lowers* the KL is always pruned, even at $\alpha = 0$: the model
# without it is closer to the full model than the model with it.

# %% [markdown]
# ## Exercise 2: the KL divergence
#
# EXERCISE difficulty=2 importance=5 minutes=15 writes="KL(f ‖ g) at the last position from two logit tensors"
#
# The extraction measures how far the pruned model $g$ is from the full model $f$ by the KL
# divergence of their next-token distributions **at the last position only**, summed over the
# vocabulary and averaged over the validation prompts:
#
# $$\mathrm{KL}(f \,\|\, g) = \frac{1}{n} \sum_{i=1}^{n} \sum_{v} p_f(v \mid x_i)
# \left(\log p_f(v \mid x_i) - \log p_g(v \mid x_i)\right).$$
#
# **Task.** Write `my_kl(full_logits, other_logits)`: both are `[n, V]` tensors of logits at the
# last position; return a Python float. The checker includes models so confident that some
# probabilities are smaller than the smallest `float32` number.
#
# HINT
# The KL is not symmetric: check which of the two distributions weights the sum.
# END HINT
#
# HINT
# `torch.softmax(x, -1)` rounds probabilities below about $e^{-104}$ to exactly 0 in `float32`,
# and the log of 0 is $-\infty$. Is there a way to get log-probabilities from logits without ever
# forming the probabilities?
# END HINT

# %%
def my_kl(full_logits: torch.Tensor, other_logits: torch.Tensor) -> float:
    # SOLUTION
    log_f = F.log_softmax(full_logits.float(), dim=-1)      # [n, V]
    log_g = F.log_softmax(other_logits.float(), dim=-1)
    return (log_f.exp() * (log_f - log_g)).sum(-1).mean().item()
    # END SOLUTION
    # EXERCISE
    # # YOUR CODE HERE
    # raise NotImplementedError
    # END EXERCISE

# %%
ex.check_kl(my_kl);

# %% solution-only
# the KL is not symmetric: KL(g || f) is another number
ex.check_kl(lambda f, g: my_kl(g, f), record=False)
# log(softmax): exact in theory, -inf in float32 once a probability underflows to 0
ex.check_kl(lambda f, g: (f.softmax(-1) * (f.softmax(-1).log() - g.softmax(-1).log())).sum(-1).mean().item(),
            record=False);

# %% [markdown]
# ## Exercise 3: what mean ablation puts in a head's place
#
# EXERCISE difficulty=3 importance=4 minutes=20 writes="a head's per-position mean hook_z over the patching prompts"
#
# Mean ablation replaces the output of a head by its **average over the patching prompts**
# $D_a$, computed **separately at each position** (all prompts of a task have the same template,
# so position 4 is always, say, the second name). circuitlib stores a head's output before its
# output matrix $W_O$, as TransformerLens's `hook_z`: the attention-weighted values, a vector of
# size `d_head` at each position. The mean is taken once, on the full model.
#
# **Task.** Write `my_mean_z(model, tokens, layer, head)` returning the mean `hook_z` of head
# `head` of layer `layer` over the prompts `tokens` (`[n, S]`), shape `[S, d_head]`. The pieces
# of a circuitlib `Transformer` you need:
#
# - `model.embed(tokens)`: the residual stream entering layer 0, `[n, S, d_model]`;
# - `model.layers[l](x)`: the residual stream after layer `l`, for its input `x`;
# - `model.layers[l].z(x)`: the `hook_z` of every head of layer `l` for its input `x`,
#   `[n, S, n_heads, d_head]`.
#
# HINT
# What is the input `x` of layer `layer`? Only the layers below it have run on it.
# END HINT
#
# HINT
# The result has one vector per position. Over which dimension of `[n, S, d_head]` do you
# average, and over which not?
# END HINT

# %%
def my_mean_z(model, tokens: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    # SOLUTION
    x = model.embed(tokens)
    for l in range(layer):            # the full model below the layer
        x = model.layers[l](x)
    z = model.layers[layer].z(x)      # [n, S, H, E]
    return z[:, :, head].mean(0)      # over prompts only: one vector per position
    # END SOLUTION
    # EXERCISE
    # # YOUR CODE HERE
    # raise NotImplementedError
    # END EXERCISE

# %%
ex.check_mean_ablation(my_mean_z);

# %% solution-only
# averaging over positions too throws away what the position tells
ex.check_mean_ablation(lambda m, t, l, h: my_mean_z(m, t, l, h).mean(0, keepdim=True).expand(t.shape[1], -1),
                       record=False);

# %% [markdown] solution-only
# Pruning a head under mean ablation then costs nothing at inference time beyond adding a
# constant: its mean `hook_z` times its slice of $W_O$ is a fixed `[S, d_model]` bias added to the
# residual stream (`circuitlib.core.surgery`).

# %% [markdown]
# ## Exercise 4: Algorithm 1
#
# EXERCISE difficulty=3 importance=5 minutes=20 writes="the greedy walk over an abstract kl_of(ablated)"
#
# Now the walk itself. The components come in visiting order (last layer first; in a layer the
# heads, then the MLP). You get a function `kl_of(ablated)` that returns
# $\mathrm{KL}(f \,\|\, g)$ for the model $g$ in which the listed components are ablated
# (`kl_of([])` is 0: nothing ablated).
#
# **Task.** Write `my_greedy(components, kl_of, alpha)` returning the list of pruned components,
# in visiting order. The checker runs it on two tiny random models (a GPT-2-shaped and a
# Llama-shaped one) with both ablation schemes, where `kl_of` physically prunes the model, and
# compares your list with `circuitlib.discovery.greedy.extract`.
#
# HINT
# Your `my_prune_decision` from exercise 1 takes the KL before and after; what is "before" when
# you reach the tenth component?
# END HINT
#
# HINT
# Keep two things as you walk: the components pruned so far, and the KL of the model without them.
# Which of the two changes when a component is kept?
# END HINT

# %%
def my_greedy(components: list[str], kl_of, alpha: float) -> list[str]:
    # SOLUTION
    pruned, kl = [], kl_of([])
    for c in components:
        kl_new = kl_of(pruned + [c])                  # g' = g without c as well
        if my_prune_decision(kl, kl_new, alpha):
            pruned.append(c)
            kl = kl_new                               # g becomes g'
    return pruned
    # END SOLUTION
    # EXERCISE
    # # YOUR CODE HERE (you may use your my_prune_decision)
    # raise NotImplementedError
    # END EXERCISE

# %%
ex.check_greedy_extraction(my_greedy);

# %% solution-only
# a classic mistake: judge each component against the full model instead of the model pruned so far
ex.check_greedy_extraction(lambda comps, kl_of, a: [c for c in comps if kl_of([c]) < a], record=False);

# %% [markdown] solution-only
# The mistaken version asks "does this component matter *in the full model*?" for each component
# separately. Algorithm 1 asks "does it matter *in what is left*?": once some components are gone,
# others can become necessary (or unnecessary). That is also why the order of the walk matters.

# %% [markdown]
# ## Exercise 5: how many parameters does a head cost?
#
# EXERCISE difficulty=3 importance=3 minutes=20 writes="the parameters freed by removing heads, with biases and grouped K/V"
#
# The paper counts $4\, d \cdot d_\text{head}$ parameters per attention head of GPT-2 Small: its
# slices of $W_Q$, $W_K$, $W_V$ (each $d \times d_\text{head}$) and of $W_O$
# ($d_\text{head} \times d$). The biases $b_Q$, $b_K$, $b_V$ ($d_\text{head}$ each) go with
# the head too. The stand-in SmolLM2 differs in two ways: it has no biases, and it uses
# *grouped-query attention*: its 9 query heads per layer share 3 key/value heads, query heads
# $3k, 3k+1, 3k+2$ reading K/V head $k$. A K/V head can only be removed when all the query heads
# of its group are. A layer that loses all its heads also loses the norm in front of attention
# ($d$ weights, plus $d$ biases in GPT-2). The output bias $b_O$ stays.
#
# **Task.** Write `my_head_parameters(cfg, removed)` returning the number of parameters removed
# from **one full layer** when the query heads in `removed` (a list of head indices) are pruned.
# `cfg` is a `circuitlib.core.model.ModelConfig` with `arch` (`"gpt2"` has biases, `"llama"` has
# none), `d_model`, `d_head`, `n_heads` and `n_kv_heads`.
#
# HINT
# Split the count in three: what each removed query head takes with it, what each K/V head whose
# whole group is removed takes with it, and what goes only with the last head of the layer.
# END HINT
#
# HINT
# With `group = n_heads // n_kv_heads` query heads per K/V head, which query heads read K/V head
# `k`? GPT-2 is the case `n_kv_heads == n_heads`: every group has one member.
# END HINT

# %%
def my_head_parameters(cfg, removed: list[int]) -> int:
    # SOLUTION
    removed, bias = set(removed), cfg.arch == "gpt2"
    d, e = cfg.d_model, cfg.d_head
    group = cfg.n_heads // cfg.n_kv_heads                  # query heads per K/V head
    query = len(removed) * (2 * d * e + (e if bias else 0))  # W_Q, W_O (and b_Q)
    kv_gone = [k for k in range(cfg.n_kv_heads) if all(k * group + i in removed for i in range(group))]
    kv = len(kv_gone) * 2 * (d * e + (e if bias else 0))     # W_K, W_V (and b_K, b_V)
    norm = (2 * d if bias else d) if len(removed) == cfg.n_heads else 0
    return query + kv + norm
    # END SOLUTION
    # EXERCISE
    # # YOUR CODE HERE
    # raise NotImplementedError
    # END EXERCISE

# %%
ex.check_head_parameter_count(my_head_parameters);

# %% solution-only
# the paper's formula (no biases, no grouping) is right for neither model
ex.check_head_parameter_count(lambda cfg, r: len(r) * 4 * cfg.d_model * cfg.d_head, record=False)
print(f"GPT-2 Small, one head: {my_head_parameters(ex.GPT2_SMALL, [0]):,} parameters; "
      f"SmolLM2-135M, one head: {my_head_parameters(ex.SMOLLM2_135M, [0]):,}, "
      f"a whole K/V group of three: {my_head_parameters(ex.SMOLLM2_135M, [0, 1, 2]):,}")

# %% [markdown]
# ## Exercise 6: accuracy when several answers are right
#
# EXERCISE difficulty=2 importance=3 minutes=10 writes="accuracy with one or several correct answers"
#
# A prompt counts as correct when the model's most likely next token (the argmax at the last
# position) is a right answer. For IOI there is one right answer, `split.answers[i]`. For
# greater-than, "The war lasted from the year 1732 to 17" is completed correctly by any year
# ending after 32; a `TaskSplit` then also carries `split.candidates` (the `k` tokens an answer
# can be) and `split.accepted` (a `[n, k]` boolean table: is candidate `j` right for prompt `i`).
#
# **Task.** Write `my_accuracy(task, split, last_logits)` returning the fraction of prompts
# answered correctly (`last_logits` is `[n, V]`; ignore `task`, it is there for circuitlib's
# signature). The checker uses GPT-2's tokenizer and logits whose argmax it chooses.
#
# HINT
# `split.candidates` is `None` for tasks with one right answer: handle that case first.
# END HINT
#
# HINT
# For greater-than, compare each prompt's predicted token with every candidate at once
# (broadcasting `[n, 1]` against `[k]` gives `[n, k]`), then ask which of those matches are accepted.
# END HINT

# %%
def my_accuracy(task, split, last_logits: torch.Tensor) -> float:
    # SOLUTION
    predicted = last_logits.argmax(-1)                                          # [n]
    if split.candidates is None:
        return (predicted == split.answers).float().mean().item()
    hit = (predicted[:, None] == split.candidates[None, :]) & split.accepted    # [n, k]
    return hit.any(-1).float().mean().item()
    # END SOLUTION
    # EXERCISE
    # # YOUR CODE HERE
    # raise NotImplementedError
    # END EXERCISE

# %%
ex.check_accuracy(my_accuracy);

# %% solution-only
# comparing with the canonical answer only undercounts greater-than
ex.check_accuracy(lambda t, s, lg: (lg.argmax(-1) == s.answers).float().mean().item(), record=False);

# %% [markdown]
# ## Exercise 7: an honest timer
#
# EXERCISE difficulty=2 importance=4 minutes=15 writes="warm-up, per-call timing, the median, no autograd"
#
# The paper's Table 3 reports that the extracted models need 57.58 % (IOI, heads only) to 88.33 %
# (greater-than, heads and MLPs) less inference time than GPT-2 Small. The authors' timer (their
# `measure_time`) calls the model 5 times on the validation batch, reads `time.time()` around each
# call and returns the **mean**; it runs no warm-up call of its own and does not synchronise the
# GPU before reading the clock. (Their gradients are off, and each model has just run once on
# the same batch to measure its accuracy, so the timed calls are not the very first ones.)
#
# Three things can move such a number. On a GPU, calls return before the GPU has finished, so a
# clock read without `torch.cuda.synchronize()` can stop early. The first calls of a model are
# often slower than later ones (memory allocation, kernel selection, caches). And one slow call
# among five (another process, a page fault) moves a mean by a fifth of its delay; a **median**
# does not move. The benchmark and performance chapters time the book's models with warm-up,
# synchronisation on a GPU and medians; exercise 8 below compares both timers on the real model.
#
# **Task.** Write `my_timer(forward, warmup, repeats)`: call `forward()` `warmup` times untimed,
# then time each of `repeats` calls separately with `time.perf_counter()`, and return one number
# in seconds that describes a typical call. The calls need no gradients. The checker's fake model
# is slow for its first two calls, then takes 15, 45 and 75 ms in turn, with one much slower call.
#
# HINT
# Time each call on its own and keep the times in a list: a single clock around the whole loop
# can only give you a mean.
# END HINT
#
# HINT
# Which summary of a list of times cannot be moved by one very slow call, nor set by one very
# fast one? The `statistics` module has it.
# END HINT
#
# HINT
# `torch.inference_mode()` is a context manager: every call inside a `with` block runs without autograd.
# END HINT

# %%
def my_timer(forward, warmup: int, repeats: int) -> float:
    # SOLUTION
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            forward()
        for _ in range(repeats):
            start = time.perf_counter()
            forward()               # on a GPU: torch.cuda.synchronize() before reading the clock
            times.append(time.perf_counter() - start)
    return statistics.median(times)
    # END SOLUTION
    # EXERCISE
    # # YOUR CODE HERE
    # raise NotImplementedError
    # END EXERCISE

# %%
ex.check_timer(my_timer);

# %% solution-only
def no_warmup_mean(forward, warmup, repeats):
    """The authors' choices in this exercise's interface: no warm-up call, time.time(), the mean."""
    start = time.time()
    for _ in range(warmup + repeats):
        forward()
    return (time.time() - start) / (warmup + repeats)


def fastest_call(forward, warmup, repeats):
    """Warm-up and per-call timing as asked, but the minimum instead of the median."""
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            forward()
        for _ in range(repeats):
            start = time.perf_counter()
            forward()
            times.append(time.perf_counter() - start)
    return min(times)


ex.check_timer(no_warmup_mean, record=False)
ex.check_timer(fastest_call, record=False);

# %% [markdown]
# ## Exercise 8: put it together on a real model
#
# EXERCISE difficulty=1 importance=4 minutes=10 writes="no new code: one extraction on the real model, then their accuracy and timer on it"
#
# Now run the real thing: load the language model named in the parameters, extract a circuit
# for the task with circuitlib's `run_extraction` (Algorithm 1 with its exact fast path), and
# measure the full and the extracted model with **your** `my_accuracy` and `my_timer`. The cell
# runs only once both pass their checkers (loading the model and extracting takes minutes on a
# CPU). It also times both models the authors' way (5 calls right after the accuracy pass, the
# mean), to compare.
#
# **Questions.** How many heads are left? How do the accuracies of the full and the extracted
# model compare? How does the measured time ratio compare with the FLOP ratio, and with the
# ratio the authors' way of timing gives? Why might they differ on your machine?

# %%


def mean_of_5(forward):
    """The authors' way: 5 calls, time.time() around each, the mean; no warm-up call of its own."""
    times = []
    for _ in range(5):
        start = time.time()
        forward()
        times.append(time.time() - start)
    return sum(times) / 5


if ex.requires("put it together", ["accuracy", "timer"]):
    with ex.timed("put it together"):
        full, tokenizer = load_model(model, device=device)
        extraction = run_extraction(ExtractionConfig(model, task, alpha=alpha, ablation=ablation, include_mlps=include_mlps,
                                    n=n, seed=seed), loaded=(full, tokenizer), progress=False)
        pruned, the_task, split = extraction.pruned, get_task(task), extraction.data.validation
        measured = {}
        for name, m in (("full", full), ("extracted", pruned)):
            def forward():
                return m(split.tokens, last_only=True)
            with torch.inference_mode():
                accuracy = my_accuracy(the_task, split, forward())   # the accuracy pass, as the authors did
                authors = mean_of_5(forward)
            measured[name] = {"accuracy": accuracy, "authors": authors, "yours": my_timer(forward, 3, timing_repeats)}
    f, e = measured["full"], measured["extracted"]
    ex.check_put_together(f["accuracy"], e["accuracy"], extraction)
    cfg, seq = full.cfg, split.tokens.shape[1]
    display(Markdown(
        f"`{model}` on {task} ({len(split)} validation prompts, alpha = {alpha:g}, {ablation} ablation): the "
        f"extraction kept **{len(pruned.kept_heads())} of {cfg.n_layers * cfg.n_heads} heads** and "
        f"{len(pruned.kept_mlps())} of {cfg.n_layers} MLPs, "
        f"{100 * extraction.metrics['parameter_reduction']:.1f} % fewer parameters. "
        f"Accuracy: {f['accuracy']:.3f} full, {e['accuracy']:.3f} extracted.\n\n"
        f"| one forward pass of the batch | full | extracted | extracted / full |\n| --- | --- | --- | --- |\n"
        f"| your timer (3 warm-up calls, median of {timing_repeats}) | {1000 * f['yours']:.1f} ms | "
        f"{1000 * e['yours']:.1f} ms | {e['yours'] / f['yours']:.2f} |\n"
        f"| the authors' timer (mean of 5, no warm-up of its own) | {1000 * f['authors']:.1f} ms | "
        f"{1000 * e['authors']:.1f} ms | "
        f"{e['authors'] / f['authors']:.2f} |\n"
        f"| FLOPs per prompt | {full.flops(seq):,} | {pruned.flops(seq):,} | "
        f"{pruned.flops(seq) / full.flops(seq):.2f} |"))

# %% [markdown]
# ## Exercise 9: read a compiled program's circuit
#
# EXERCISE difficulty=3 importance=5 minutes=25 writes="the heads, MLPs and edges of a compiled program's circuit, from its RASP source"
#
# Tracr compiles a RASP program into a transformer whose weights carry the program, operation by
# operation, so its circuit is known before anyone runs a method on it. You can predict it from
# the program with four rules of the compiler:
#
# - an `Aggregate` (with the `Select` that feeds it) becomes one attention head; a `Map` or
#   `SequenceMap` becomes an MLP; a `SelectorWidth` becomes a head followed by an MLP in the same
#   layer (the head attends to BOS as well as to the selected tokens and reads the BOS token in its
#   value; the MLP reads the head's output and the constant direction `one`, which the token
#   embedding writes);
# - every operation goes in the first layer after the operations it reads (a layer is attention,
#   then MLP); heads are named `"L.H"`, MLPs `"MLP L"`;
# - in `rasp.Select(keys, queries, predicate)` the **first** argument is what the head's key reads
#   and the second what its query reads; the `Aggregate`'s second argument is what its value reads;
# - `rasp.tokens` come from the token embedding (writer `embed`), `rasp.indices` from the position
#   embedding (writer `pos`), and the program's output is read by `logits`.
#
# An edge is `"WRITER -> READER"`: writers `embed`, `pos`, a head or an MLP; readers a head's
# query, key or value (`"L.H.q"`, `"L.H.k"`, `"L.H.v"`), an MLP, or `logits`. Leave out the
# compiler's BOS plumbing (the `one` and BOS directions it adds to every `Aggregate`'s query and
# key): an `Aggregate`'s query or key is an edge only where the program puts an input there.
#
# **Task.** The cell below prints the RASP source of *sort_unique* and the shape of its compiled
# model. Write `my_sort_unique_circuit()` returning `(components, edges)`: the list of heads and
# MLPs of its circuit and the list of edges between them. The checker compares both with what the
# compiler wired.
#
# HINT
# Count the operations first: how many `Select`/`Aggregate`, `SelectorWidth` and `Map` does the
# program have, and which reads the output of which?
# END HINT
#
# HINT
# `Select(target_pos, rasp.indices, EQ)`: which of the two is the key, and which writer writes it?
# END HINT

# %%
ex.show_program("sort_unique")

# %%
def my_sort_unique_circuit() -> tuple[list[str], list[str]]:
    # SOLUTION
    components = ["0.0", "MLP 0", "1.0"]          # SelectorWidth(smaller): head 0.0 + MLP 0; Aggregate: head 1.0
    edges = [
        "embed -> 0.0.q", "embed -> 0.0.k",       # smaller = Select(tokens, tokens, LT)
        "embed -> 0.0.v",                         # SelectorWidth's head reads BOS in its value
        "0.0 -> MLP 0", "embed -> MLP 0",         # SelectorWidth's MLP: the head's output and `one`
        "MLP 0 -> 1.0.k", "pos -> 1.0.q",         # Select(target_pos, indices, EQ): keys first
        "embed -> 1.0.v",                         # Aggregate(..., vals = tokens)
        "1.0 -> logits",
    ]
    return components, edges
    # END SOLUTION
    # EXERCISE
    # # YOUR CODE HERE: return (components, edges)
    # raise NotImplementedError
    # END EXERCISE

# %%
ex.check_circuit_prediction(my_sort_unique_circuit);

# %% solution-only
# the classic slip: Select's arguments read as (queries, keys)
components, edges = my_sort_unique_circuit()
swapped = {"MLP 0 -> 1.0.k": "MLP 0 -> 1.0.q", "pos -> 1.0.q": "pos -> 1.0.k"}
ex.check_circuit_prediction(lambda: (components, [swapped.get(e, e) for e in edges]), record=False);

# %% [markdown]
# ## Exercise 10: when the method and the compiler disagree
#
# EXERCISE difficulty=3 importance=5 minutes=20 writes="what a method missed and added against the truth, and which reason the data support"
#
# Now run a method on a compiled model and compare. The cell below runs Algorithm 1 (circuitlib's,
# alpha = 0.001, heads and MLPs, the KL over the output values at every position but BOS) on
# *reverse*, the program of the Edge Pruning paper (length by `SelectorWidth`, then
# `opp_index = length - indices - 1`, then an `Aggregate` of the tokens at `opp_index`; inputs of
# 1 to 5 tokens), in three settings: mean ablation on the inputs of length 5 only (like the
# language tasks' prompts of one length), zero ablation on the same inputs, and mean ablation on
# every input of every length. It prints the true components and what each run keeps.
#
# **Task.** Write `my_diagnosis(ablation, data, truth, kept)` returning `(missed, extra, reason)`:
# the true components the run did not keep, the kept ones that are not true, and the key of the
# reason in `ex.DIAGNOSES` that explains the difference (`"none"` when there is none). The
# checker compares your sets with the compiler's truth and your reason with what the runs' data
# support; a wrong reason is told what speaks against it.
#
# HINT
# Print `ex.DIAGNOSES`. For each run, ask what the ablation puts in place of a removed component.
# END HINT
#
# HINT
# On inputs that all have length 5, what is the length at every position, and what is
# `opp_index` at position 2? What is their mean over the inputs?
# END HINT

# %%
runs = ex.reverse_runs()
for key, text in ex.DIAGNOSES.items():
    print(f"{key:>14}: {text}")

# %%
def my_diagnosis(ablation: str, data: str, truth: list[str], kept: list[str]) -> tuple[list[str], list[str], str]:
    # SOLUTION
    missed, extra = sorted(set(truth) - set(kept)), sorted(set(kept) - set(truth))
    if not missed and not extra:
        return missed, extra, "none"
    # inputs of one length: a mean reproduces whatever depends only on position and length, and
    # without its head the length reads as the longest one
    return missed, extra, "position-mean" if ablation == "mean" else "max-length"
    # END SOLUTION
    # EXERCISE
    # # YOUR CODE HERE
    # raise NotImplementedError
    # END EXERCISE

# %%
ex.check_diagnosis(my_diagnosis);

# %% solution-only
# "the threshold is too large" is the reflex explanation; the walk's own numbers rule it out
ex.check_diagnosis(lambda a, d, t, k: (sorted(set(t) - set(k)), sorted(set(k) - set(t)),
                                       "threshold" if set(t) != set(k) else "none"), record=False);

# %% [markdown] solution-only
# The lesson transfers to the language tasks: with prompts of one template and position-wise
# means, anything that depends only on the position (and the prompt's length) is invisible to
# mean ablation, however important it is. The ground-truth chapter ({doc}`06a_ground_truth`)
# measures this on every compiled program.

# %% [markdown]
# ## What passes, and what it cost
#
# Each exercise's verdict and the seconds its checks (and, for exercise 8, the extraction and
# the timing) took to compute on this machine; not the time a student needs to think and type.
# The teachers' page {doc}`../book/teaching` quotes this table from the executed chapter.

# %%
ex.summary()
