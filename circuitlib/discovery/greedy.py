"""Algorithm 1 of García-Carrasco et al. (2024): greedy, top-down extraction of a task's circuit.

Walk the components from the last layer to the first (inside a layer: the heads, then the MLP).
Ablate each one in the current model g (at first the full model f); if the KL divergence to f
rises by less than alpha,

    KL(f || g without c) - KL(f || g) < alpha,

remove c for good, else keep it. The KL is taken at the last position, summed over the
vocabulary and averaged over the validation prompts, in float64 (`metrics.kl_divergence`).
Ties: the test is strict, so a component whose removal raises the KL by exactly alpha is kept,
and one whose removal lowers the KL (a negative delta) is always removed, even at alpha = 0.

Two paths make exactly the same decisions:
- `method="plain"`: the reference. A full TransformerLens forward pass with ablation hooks for
  every candidate, logits at every position (what the authors' code does).
- `method="fast"`: below the layer under test the model is still the full model, so its
  residual stream is computed once; a head's removal changes its layer's output by a known
  amount (its mean, or zero, minus its output); only the layers from the candidate's upward run
  again, the already-pruned layers above are physically smaller, only the last position's
  logits are formed, and above the highest layer that still keeps a head (positions mix only
  in attention) only the last position is computed at all. Under mean ablation, positions that
  begin every patching and validation prompt alike (BOS, "The", "Then ,") hold the same values
  in g as in f (each removed part is replaced there by its mean over identical values), so they
  are not recomputed: f's cached residual stream gives their keys and values, once for the batch.

`sweep` runs the fast path for many alphas in one walk: alphas that agree on every decision so
far share one model state, and a decision splits the set of alphas at its KL increase.

Batched candidates (`batch_candidates`, on by default on CUDA): a layer's remaining candidates
are evaluated in one pass of k x n prompts, candidate j assuming candidates 1..j-1 are removed.
While they are, the KLs hold; after a kept candidate the rest are evaluated again. Fewer, larger
passes pay on a GPU, whose small passes leave it idle; on a CPU, already busy with the matmuls,
the extra work of evaluations thrown away after a keep makes it a loss at n >= 32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from circuitlib.core.ablation import (
    Means,
    check_ablation,
    hooked_last_logits,
    mean_activations,
)
from circuitlib.core.components import head_name, is_mlp, mlp_name, parse_component
from circuitlib.core.metrics import kl_to, log_probs
from circuitlib.core.model import Transformer
from circuitlib.core.surgery import prune_layer

ORDERS = ("heads-ascending", "heads-descending")


class ResumeError(ValueError):
    """A sweep was asked to resume from a snapshot of other alphas or of another traversal."""


METHODS = ("fast", "plain")


def traversal(n_layers: int, n_heads: int, include_mlps: bool, order: str = "heads-ascending") -> list[str]:
    """Components in visiting order: last layer first; in a layer the heads, then the MLP.

    order: "heads-ascending" visits heads 0, 1, ... as the authors' code does (the default);
           "heads-descending" visits them in reverse, as the paper's pseudocode writes it.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown traversal order {order!r}; choose one of {', '.join(ORDERS)}")
    heads = range(n_heads) if order == "heads-ascending" else range(n_heads - 1, -1, -1)
    names = []
    for layer in range(n_layers - 1, -1, -1):
        names += [head_name(layer, h) for h in heads]
        if include_mlps:
            names.append(mlp_name(layer))
    return names


@dataclass
class Decision:
    """One step of Algorithm 1: the KL of g before and after ablating `component` too."""

    component: str
    kl_before: float
    kl_after: float
    pruned: bool

    @property
    def delta(self) -> float:
        return self.kl_after - self.kl_before


@dataclass
class Circuit:
    """The outcome of one extraction: settings, every decision, and what was kept."""

    model: str
    n_layers: int
    n_heads: int
    alpha: float
    ablation: str
    include_mlps: bool
    order: str
    decisions: list[Decision] = field(default_factory=list)

    @property
    def pruned(self) -> list[str]:
        return [d.component for d in self.decisions if d.pruned]

    @property
    def kept_heads(self) -> list[str]:
        gone = set(self.pruned)
        return [
            head_name(l, h) for l in range(self.n_layers) for h in range(self.n_heads) if head_name(l, h) not in gone
        ]

    @property
    def kept_mlps(self) -> list[int]:
        gone = set(self.pruned)
        return [l for l in range(self.n_layers) if mlp_name(l) not in gone]

    @property
    def kept(self) -> list[str]:
        return self.kept_heads + [mlp_name(l) for l in self.kept_mlps]

    @property
    def final_kl(self) -> float:
        """KL(f || g) of the final circuit on the validation set."""
        kl = 0.0
        for d in self.decisions:
            kl = d.kl_after if d.pruned else kl
        return kl

    def to_dict(self) -> dict:
        out = asdict(self)
        for d in out["decisions"]:
            d["delta"] = d["kl_after"] - d["kl_before"]
        out |= {"kept_heads": self.kept_heads, "kept_mlps": self.kept_mlps, "final_kl": self.final_kl}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Circuit":
        fields = {k: d[k] for k in ("model", "n_layers", "n_heads", "alpha", "ablation", "include_mlps", "order")}
        decisions = [Decision(x["component"], x["kl_before"], x["kl_after"], x["pruned"]) for x in d["decisions"]]
        return cls(**fields, decisions=decisions)


def check_alpha(alpha) -> float:
    """`alpha` as a float KL threshold: a finite number >= 0 (-0 becomes 0), or one ValueError."""
    if isinstance(alpha, (bool, np.bool_)):
        raise ValueError(f"alpha must be a number, got the boolean {alpha!r}; give a KL threshold such as 0.01")
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number, got {alpha!r}") from None
    if math.isnan(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a number >= 0 (a KL threshold), got {alpha}; try e.g. 0.01")
    if math.isinf(alpha):
        raise ValueError(
            "alpha must be finite (circuit.json must stay valid JSON); to remove every component "
            "give a large threshold such as 1e9"
        )
    return alpha + 0.0  # -0.0 -> 0.0


def _check_batches(model: Transformer, patching, validation, means: Means | None):
    """The patching and validation prompts [n, S] as given, or one ValueError saying what does not fit.

    Both must be non-empty LongTensors of one length S that the model can take (token ids below
    its vocabulary, S within its context), and `means`, if given, must be of length S too.
    """
    for name, tokens in (("patching", patching), ("validation", validation)):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(
                f"{name} tokens must be a LongTensor [n_prompts, seq]; got "
                f"{getattr(tokens, 'shape', type(tokens))} — pad or filter prompts to one token length"
            )
        if len(tokens) == 0:
            raise ValueError(f"{name} set is empty")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= model.cfg.d_vocab):
            raise ValueError(
                f"{name} tokens must be ids in [0, {model.cfg.d_vocab}) for this model's vocabulary; "
                f"found {int(tokens.min())}..{int(tokens.max())} — tokenise with the model's tokenizer"
            )
    if patching.shape[1] != validation.shape[1]:
        raise ValueError(
            f"patching prompts have {patching.shape[1]} tokens but validation prompts have "
            f"{validation.shape[1]}: the means are per position, so both must have one length; "
            "make both sets from the same task"
        )
    if means is not None and means.z.shape[2] != patching.shape[1]:
        raise ValueError(
            f"means were computed on prompts of {means.z.shape[2]} tokens but the prompts have "
            f"{patching.shape[1]}; compute them with mean_activations(model, patching)"
        )
    if patching.shape[1] > model.max_len:
        raise ValueError(
            f"prompts have {patching.shape[1]} tokens but this model takes at most {model.max_len}; shorten the prompts"
        )
    return patching, validation


def extract(
    model: Transformer,
    patching: torch.Tensor,
    validation: torch.Tensor,
    *,
    alpha: float,
    ablation: str = "mean",
    include_mlps: bool = False,
    order: str = "heads-ascending",
    method: str = "fast",
    progress: bool = True,
    means: Means | None = None,
    batch_candidates: bool | None = None,
) -> Circuit:
    """Run Algorithm 1 on the full `model`.

    patching:   [n_a, S] prompts whose per-position means stand in for ablated components (D_a)
    validation: [n_v, S] prompts on which KL(f || g) is measured (D_v)
    means:      `mean_activations(model, patching)` if already computed (mean ablation only)
    batch_candidates: fast path only, see `sweep`
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose 'fast' or 'plain'")
    if method == "fast":
        return sweep(
            model,
            patching,
            validation,
            [alpha],
            ablation=ablation,
            include_mlps=include_mlps,
            order=order,
            progress=progress,
            means=means,
            batch_candidates=batch_candidates,
        )[0]
    alpha, ablation = check_alpha(alpha), check_ablation(ablation)
    patching, validation = _check_batches(model, patching, validation, means)
    from circuitlib.core.convert import to_hooked

    hooked = to_hooked(model)
    patching, validation = patching.to(model.device), validation.to(model.device)
    if ablation == "mean" and means is None:
        means = mean_activations(model, patching)
    full = log_probs(hooked_last_logits(hooked, validation, [], ablation, means))
    circuit = Circuit(model.cfg.name, model.cfg.n_layers, model.cfg.n_heads, alpha, ablation, include_mlps, order)
    ablated, kl = [], 0.0
    for name in tqdm(
        traversal(model.cfg.n_layers, model.cfg.n_heads, include_mlps, order),
        desc=f"extract (plain, alpha={alpha:g})",
        disable=not progress,
    ):
        kl_new = kl_to(full, hooked_last_logits(hooked, validation, ablated + [name], ablation, means))
        pruned = kl_new - kl < alpha
        circuit.decisions.append(Decision(name, kl, kl_new, pruned))
        if pruned:
            ablated.append(name)
            kl = kl_new
    return circuit


class _State:
    """The model g shared by a set of alphas: what is ablated so far and the pruned layers above."""

    def __init__(
        self,
        alphas: list[int],
        decisions: list[Decision],
        kl: float,
        above: list,
        ahead: dict[str, float] | None = None,
    ):
        self.alphas, self.decisions, self.kl, self.above = alphas, decisions, kl, above
        # batched candidates: KL of each later candidate of this layer, computed assuming that
        # every candidate before it is removed (valid while this state removes them)
        self.ahead = ahead if ahead is not None else {}

    def ablated_in(self, layer: int) -> list[str]:
        return [d.component for d in self.decisions if d.pruned and parse_component(d.component)[0] == layer]


def shared_prefix_length(*token_sets: torch.Tensor) -> int:
    """How many leading positions every prompt of every set has in common ([n_i, S] each), at most S - 1."""
    tokens = torch.cat(token_sets)  # [n, S]
    same = (tokens == tokens[:1]).all(0)  # [S]: position identical in every prompt
    differs = (~same).nonzero()
    p = int(differs[0]) if len(differs) else tokens.shape[1]
    return min(p, tokens.shape[1] - 1)


class FastPath:
    """Exact, incremental evaluation of KL(f || g') for one candidate at a time.

    prefix: positions 0..prefix-1 shared by every patching and validation prompt (mean ablation
            only; see the module docstring); 0 recomputes every position.
    """

    def __init__(
        self, model: Transformer, validation: torch.Tensor, ablation: str, means: Means | None, prefix: int = 0
    ):
        self.model, self.ablation, self.means, self.prefix = model, ablation, means, prefix
        self.resid = []  # resid[l]: [n, S, D], input of layer l in f
        x = model.embed(validation)
        for layer in model.layers:
            self.resid.append(x)
            x = layer(x)
        self.full = log_probs(model.unembed(x[:, -1]))  # [n, V]: f's last-position log-probs (float64)
        self.layer_cache: dict[tuple, object] = {}

    def enter(self, layer: int) -> None:
        """Per-head outputs of `layer` in f (its input is f's), and what each is replaced by."""
        L = self.model.layers[layer]
        x = self.resid[layer]
        z = L.z(x)  # [n, S, H, E]
        self.head_out = torch.einsum("bshe,hed->hbsd", z, L.W_O)  # [H, n, S, D]
        self.attn_full = self.head_out.sum(0) + (L.b_O if L.b_O is not None else 0.0)
        S, H = x.shape[1], self.model.cfg.n_heads
        if self.ablation == "mean":
            self.head_repl = torch.einsum("hse,hed->hsd", self.means.z[layer], L.W_O)  # [H, S, D]
            self.mlp_repl = self.means.mlp[layer]  # [S, D]
        else:
            self.head_repl = torch.zeros(H, S, x.shape[2], device=x.device, dtype=x.dtype)
            self.mlp_repl = torch.zeros(S, x.shape[2], device=x.device, dtype=x.dtype)

    def kl(self, layer: int, ablated: list[str], above: list) -> float:
        """KL(f || g) where g ablates `ablated` (all in `layer`) and runs the pruned layers `above`."""
        return self.kl_many(layer, [ablated], above)[0]

    def kl_many(self, layer: int, ablated_sets: list[list[str]], above: list) -> list[float]:
        """`kl` for several ablated sets of `layer` at once: their n prompts each stacked into one batch.

        The layers above see a batch of len(ablated_sets) * n prompts; one set gives `kl` itself.
        """
        S = self.resid[layer].shape[1]
        # Positions mix only in attention: above the highest layer that keeps a head, and
        # everywhere if no layer above keeps one, the last position alone decides the logits.
        top = max((i for i, upper in enumerate(above) if upper.heads), default=-1)
        P = self.prefix
        pos = slice(P, S) if top >= 0 else slice(S - 1, S)
        x = torch.cat([self._layer_output(layer, ablated, pos) for ablated in ablated_sets])  # [k * n, s, D]
        for i, upper in enumerate(above):
            prefix = self.resid[layer + 1 + i][:1, :P] if P else None  # f's input there: [1, P, D]
            if i < top:
                x = upper(x, prefix=prefix)
            elif i == top:
                x, pos = upper(x, last_only=True, prefix=prefix), slice(S - 1, S)
            else:
                x = upper.forward_positionwise(x, pos)
        logits = self.model.unembed(x[:, -1])  # [k * n, V]
        return [kl_to(self.full, chunk) for chunk in logits.split(len(self.full))]

    def _layer_output(self, layer: int, ablated: list[str], pos: slice):
        """Output [n, s, D] of `layer` at positions `pos` with `ablated` (its heads and/or MLP) replaced."""
        heads = [parse_component(c)[1] for c in ablated if not is_mlp(c)]
        x = self.resid[layer][:, pos] + self.attn_full[:, pos]  # [n, s, D]
        if heads:
            x = x + (self.head_repl[heads][:, None, pos] - self.head_out[heads][:, :, pos]).sum(0)
        L = self.model.layers[layer]
        return x + (self.mlp_repl[pos] if mlp_name(layer) in ablated else L.mlp_out(x, pos))

    def pruned_layer(self, layer: int, ablated: list[str]):
        """Layer `layer` with `ablated` removed, physically (shared between states that agree)."""
        key = (layer, tuple(sorted(ablated)))
        if key not in self.layer_cache:
            cfg = self.model.cfg
            kept = [
                c for c in [head_name(layer, h) for h in range(cfg.n_heads)] + [mlp_name(layer)] if c not in ablated
            ]
            self.layer_cache[key] = prune_layer(self.model, layer, kept, self.ablation, self.means)
        return self.layer_cache[key]


@torch.inference_mode()
def sweep(
    model: Transformer,
    patching: torch.Tensor,
    validation: torch.Tensor,
    alphas: list[float],
    *,
    ablation: str = "mean",
    include_mlps: bool = False,
    order: str = "heads-ascending",
    progress: bool = True,
    means: Means | None = None,
    batch_candidates: bool | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
    on_layer: Callable[[dict], None] | None = None,
    resume: dict | None = None,
) -> list[Circuit]:
    """Algorithm 1 for every alpha in `alphas` in one walk (fast path); one Circuit per alpha, in order.

    Identical to running `extract` separately for each alpha. `means` as in `extract`.
    batch_candidates: evaluate a layer's remaining candidates in one batched pass, each assuming
             the ones before it are removed, and evaluate again after a candidate is kept (same
             decisions, more work per pass, fewer passes). None (default): on for CUDA devices,
             where it pays; off on the CPU, where the work itself is the cost (see the module
             docstring).
    on_step: called as on_step(candidates_done, candidates_total, model_states) after each
             candidate (studies use it to report a unit's progress from a worker process)
    on_layer: called with a JSON-ready snapshot of the walk after each layer (studies save it, so
             that a unit cut off by the end of a session resumes where it stopped)
    resume:  such a snapshot: the walk continues from it and gives exactly the circuits of an
             uninterrupted walk (the layers above are rebuilt from its decisions)
    """
    alphas = [check_alpha(a) for a in alphas]
    if not alphas:
        raise ValueError("give at least one alpha")
    ablation = check_ablation(ablation)
    patching, validation = _check_batches(model, patching, validation, means)
    cfg = model.cfg
    names = traversal(cfg.n_layers, cfg.n_heads, include_mlps, order)
    patching, validation = patching.to(model.device), validation.to(model.device)
    if ablation == "mean" and means is None:
        means = mean_activations(model, patching)
    if batch_candidates is None:
        batch_candidates = model.device.type == "cuda"
    # A shared start is left alone only where attention is causal (later tokens cannot change it).
    shared = ablation == "mean" and model.cfg.causal
    fast = FastPath(
        model, validation, ablation, means, prefix=shared_prefix_length(patching, validation) if shared else 0
    )
    states, start = [_State(list(range(len(alphas))), [], 0.0, [])], cfg.n_layers - 1
    if resume is not None:
        states, start = _resumed_states(resume, alphas, names, fast)
    label = f"alpha={alphas[0]:g}" if len(alphas) == 1 else f"{len(alphas)} alphas"
    done_before = len(states[0].decisions)
    bar = tqdm(total=len(names), initial=done_before, desc=f"extract ({label})", disable=not progress)
    for layer in range(start, -1, -1):
        fast.enter(layer)
        in_layer = [n for n in names if parse_component(n)[0] == layer]
        for j, name in enumerate(in_layer):
            next_states = []
            for s in states:
                ablated = s.ablated_in(layer)
                if not batch_candidates:
                    kl_new = fast.kl(layer, ablated + [name], s.above)
                else:
                    if name not in s.ahead:  # assume each candidate from here on is removed
                        rest = in_layer[j:]
                        s.ahead = dict(
                            zip(rest, fast.kl_many(layer, [ablated + rest[: m + 1] for m in range(len(rest))], s.above))
                        )
                    kl_new = s.ahead[name]
                for pruned in (True, False):
                    group = [i for i in s.alphas if (kl_new - s.kl < alphas[i]) == pruned]
                    if group:  # a kept candidate breaks the assumption behind the KLs ahead
                        next_states.append(
                            _State(
                                group,
                                s.decisions + [Decision(name, s.kl, kl_new, pruned)],
                                kl_new if pruned else s.kl,
                                s.above,
                                s.ahead if pruned else None,
                            )
                        )
            states = next_states
            bar.update(1)
            bar.set_postfix(states=len(states))
            if on_step is not None:
                on_step(names.index(name) + 1, len(names), len(states))
        for s in states:
            s.above = [fast.pruned_layer(layer, s.ablated_in(layer))] + s.above
        if on_layer is not None and layer > 0:
            on_layer(_snapshot(states, alphas, layer - 1))
    bar.close()
    circuits = [None] * len(alphas)
    for s in states:
        for i in s.alphas:
            circuits[i] = Circuit(
                cfg.name, cfg.n_layers, cfg.n_heads, alphas[i], ablation, include_mlps, order, list(s.decisions)
            )
    return circuits


def _snapshot(states: list[_State], alphas: list[float], next_layer: int) -> dict:
    """The walk so far, as JSON-ready data: every state's alphas, KL and decisions, and where to go on."""
    return {
        "format": 1,
        "alphas": alphas,
        "next_layer": next_layer,
        "states": [
            {
                "alphas": s.alphas,
                "kl": s.kl,
                "decisions": [[d.component, d.kl_before, d.kl_after, d.pruned] for d in s.decisions],
            }
            for s in states
        ],
    }


def _resumed_states(snapshot: dict, alphas: list[float], names: list[str], fast: FastPath) -> tuple[list, int]:
    """The states of a `_snapshot` with their pruned layers above rebuilt, and the layer to continue at.

    Refuses (ResumeError) a snapshot of other alphas or of another traversal.
    """
    if snapshot.get("format") != 1 or snapshot.get("alphas") != alphas:
        raise ResumeError("the snapshot to resume from was made with other alphas; start the sweep afresh")
    next_layer = int(snapshot["next_layer"])
    states = []
    for raw in snapshot["states"]:
        decisions = [
            Decision(c, float(before), float(after), bool(pruned)) for c, before, after, pruned in raw["decisions"]
        ]
        if [d.component for d in decisions] != names[: len(decisions)] or any(
            parse_component(n)[0] > next_layer for n in names[len(decisions) :]
        ):
            raise ResumeError(
                "the snapshot to resume from belongs to another traversal (model, MLPs or order); "
                "start the sweep afresh"
            )
        states.append(_State(list(raw["alphas"]), decisions, float(raw["kl"]), []))
    for layer in range(fast.model.cfg.n_layers - 1, next_layer, -1):
        for s in states:
            s.above = [fast.pruned_layer(layer, s.ablated_in(layer))] + s.above
    return states, next_layer
