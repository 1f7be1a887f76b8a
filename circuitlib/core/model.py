"""A small, readable transformer that can physically lose attention heads and MLPs.

One module in the spirit of nanoGPT's `model.py`. Weights use TransformerLens's layout and names
(`W_Q [n_heads, d_model, d_head]`, `W_O [n_heads, d_head, d_model]`, `W_in [d_model, d_mlp]`, ...),
so every tensor here lines up with a TransformerLens hook point of the same name.

Two architecture families are supported:
- "gpt2":  LayerNorm, learned position embeddings, GELU (tanh) MLP, biases everywhere;
- "llama": RMSNorm, rotary positions, gated SiLU MLP, grouped K/V heads, no biases.
Four config fields widen the "gpt2" family to the transformers Tracr compiles (`circuitlib.models.compiled`):
bidirectional attention (`causal=False`), no normalisation (`normalization=False`), ReLU MLPs
(`activation="relu"`) and an unembedding of its own with its own output size (`d_vocab_out`). Their
defaults leave every other model exactly as it was.

A `Layer` holds only the heads it keeps (`heads`: their original indices) and may hold no MLP at all.
What the removed parts wrote to the residual stream under mean ablation is added back as a
per-position bias buffer (`attn_ablation`, `mlp_ablation`, each [seq, d_model]). Zero ablation adds
nothing. A full model is simply a model in which every layer keeps everything.

Shapes in comments: B batch, S sequence, H kept query heads, K kept K/V heads, D d_model,
E d_head, M d_mlp, V vocabulary.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from circuitlib.core.components import parse_head
from circuitlib.core.io import atomic_write, file_sha256

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelConfig:
    """Shape and family of a (full) model. `name` says which model made a result."""

    name: str  # e.g. "gpt2", "smollm2-135m", "tiny-gpt2"
    arch: str  # "gpt2" | "llama"
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    n_kv_heads: int = 0  # 0 means "same as n_heads" (no grouping)
    norm_eps: float = 1e-5
    rotary_base: float = 10000.0
    causal: bool = True  # False: every position attends to every position
    normalization: bool = True  # False: no LayerNorm / RMSNorm anywhere (the norms are the identity)
    activation: str = ""  # MLP activation: "" = the family's own (GELU-tanh, gated SiLU); "relu" (gpt2 only)
    d_vocab_out: int = 0  # 0: unembedding tied to W_E; > 0: an own unembedding W_U [d_model, d_vocab_out]

    def __post_init__(self):
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"unknown architecture {self.arch!r}; use 'gpt2' or 'llama'")
        if self.activation not in ("", "relu") or (self.activation and self.arch != "gpt2"):
            raise ValueError(
                f"activation {self.activation!r} is not available for arch {self.arch!r}; "
                "use '' (the family's own) or 'relu' with arch 'gpt2'"
            )
        if self.d_vocab_out < 0:
            raise ValueError(f"d_vocab_out must be >= 0 (0 ties the unembedding to W_E), got {self.d_vocab_out}")
        if self.n_kv_heads == 0:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def group_size(self) -> int:
        """Query heads that share one K/V head."""
        return self.n_heads // self.n_kv_heads


@dataclass
class LayerPlan:
    """Which parts of one layer exist. `heads` are original query-head indices, sorted."""

    heads: list[int]
    has_mlp: bool = True
    attn_ablation: bool = False  # a per-position bias stands in for removed heads
    mlp_ablation: bool = False  # a per-position bias stands in for a removed MLP
    ablation_len: int = 0  # S of those biases

    def kv_heads(self, cfg: ModelConfig) -> list[int]:
        """K/V heads still needed: a K/V head goes only when all of its query heads are gone."""
        return sorted({h // cfg.group_size for h in self.heads})


def full_plan(cfg: ModelConfig) -> list[LayerPlan]:
    return [LayerPlan(heads=list(range(cfg.n_heads))) for _ in range(cfg.n_layers)]


class Norm(nn.Module):
    """LayerNorm (gpt2) or RMSNorm (llama), with TransformerLens's parameter names w and b.

    Without normalisation (`cfg.normalization=False`) it is the identity and holds no parameters.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.enabled = cfg.normalization
        self.rms = cfg.arch == "llama"
        self.eps = cfg.norm_eps
        self.w = nn.Parameter(torch.ones(cfg.d_model)) if self.enabled else None
        self.b = None if self.rms or not self.enabled else nn.Parameter(torch.zeros(cfg.d_model))

    def forward(self, x):  # [..., D] -> [..., D]
        if not self.enabled:
            return x
        if self.rms:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w
        return F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps)


def rotate(x, base: float, start: int = 0):
    """Rotary position embedding, llama style (the two halves of each head rotate as pairs).

    x: [B, heads, S, E] holding positions start .. start+S-1 -> same shape.
    """
    S, E = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, E, 2, dtype=torch.float32, device=x.device) / E))
    positions = torch.arange(start, start + S, dtype=torch.float32, device=x.device)
    angles = positions[:, None] * inv_freq  # [S, E/2]
    angles = torch.cat([angles, angles], dim=-1)  # [S, E]
    x1, x2 = x[..., : E // 2], x[..., E // 2 :]
    return x * angles.cos() + torch.cat([-x2, x1], dim=-1) * angles.sin()


class Layer(nn.Module):
    """One transformer block that keeps only the heads in `plan.heads` and maybe no MLP."""

    def __init__(self, cfg: ModelConfig, plan: LayerPlan):
        super().__init__()
        self.cfg, self.plan = cfg, plan
        D, E, M = cfg.d_model, cfg.d_head, cfg.d_mlp
        H, K = len(plan.heads), len(plan.kv_heads(cfg))
        gpt2 = cfg.arch == "gpt2"
        self.heads = list(plan.heads)
        if H:
            self.ln1 = Norm(cfg)
            self.W_Q = nn.Parameter(torch.zeros(H, D, E))
            self.W_K = nn.Parameter(torch.zeros(K, D, E))
            self.W_V = nn.Parameter(torch.zeros(K, D, E))
            self.W_O = nn.Parameter(torch.zeros(H, E, D))
            self.b_Q = nn.Parameter(torch.zeros(H, E)) if gpt2 else None
            self.b_K = nn.Parameter(torch.zeros(K, E)) if gpt2 else None
            self.b_V = nn.Parameter(torch.zeros(K, E)) if gpt2 else None
            kv = plan.kv_heads(cfg)
            # kv_of_head[i]: position, among the kept K/V heads, of the K/V head of kept query head i
            self.register_buffer(
                "kv_of_head", torch.tensor([kv.index(h // cfg.group_size) for h in plan.heads]), persistent=False
            )
        # The attention output bias stays whatever happens to the heads (as with hook_z ablation).
        self.b_O = nn.Parameter(torch.zeros(D)) if gpt2 else None
        if plan.has_mlp:
            self.ln2 = Norm(cfg)
            self.W_in = nn.Parameter(torch.zeros(D, M))
            self.W_out = nn.Parameter(torch.zeros(M, D))
            self.W_gate = None if gpt2 else nn.Parameter(torch.zeros(D, M))
            self.b_in = nn.Parameter(torch.zeros(M)) if gpt2 else None
            self.b_out = nn.Parameter(torch.zeros(D)) if gpt2 else None
        L = plan.ablation_len
        self.register_buffer("attn_ablation", torch.zeros(L, D) if plan.attn_ablation else None)
        self.register_buffer("mlp_ablation", torch.zeros(L, D) if plan.mlp_ablation else None)

    def z(self, x, last_only: bool = False, prefix=None):
        """Attention-weighted values of the kept heads (TransformerLens's hook_z).

        x: [B, s, D] residual stream at positions p..S-1 (p = 0 without `prefix`)
           -> [B, s, H, E], or [B, 1, H, E] for the last query only.
        prefix: [1, p, D] this layer's input at positions 0..p-1 when it is the same for every
                prompt (a shared start such as BOS + "Then ,"): its keys and values are computed
                once and shared by the batch, and those positions are not queried.
        """
        p = 0 if prefix is None else prefix.shape[1]
        S = p + x.shape[1]
        h = self.ln1(x)
        q = torch.einsum("bsd,hde->bhse", h[:, -1:] if last_only else h, self.W_Q)  # [B, H, s or 1, E]
        k, v = self._keys_values(h, start=p)  # [B, K, s, E] each
        if self.b_Q is not None:
            q = q + self.b_Q[:, None]
        if self.cfg.arch == "llama":
            q = rotate(q, self.cfg.rotary_base, start=S - 1 if last_only else p)
        if prefix is not None:
            k_pre, v_pre = self._keys_values(self.ln1(prefix), start=0)  # [1, K, p, E] each
            B = x.shape[0]
            k = torch.cat([k_pre.expand(B, -1, -1, -1), k], dim=2)  # [B, K, S, E]
            v = torch.cat([v_pre.expand(B, -1, -1, -1), v], dim=2)
        k, v = k[:, self.kv_of_head], v[:, self.kv_of_head]  # [B, H, S, E]: each query head's K/V
        if last_only:  # the last query sees every key: no mask
            z = F.scaled_dot_product_attention(q, k, v)
        elif p == 0 or not self.cfg.causal:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=self.cfg.causal)
        else:  # query i is position p + i and sees keys 0..p + i
            seen = torch.arange(S, device=x.device)[None, :] <= torch.arange(p, S, device=x.device)[:, None]
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=seen)
        return z.transpose(1, 2)  # [B, s or 1, H, E]

    def _keys_values(self, h, start: int):
        """Keys and values [B, K, s, E] of the normed input h [B, s, D] at positions start.. (rotary applied)."""
        k = torch.einsum("bsd,kde->bkse", h, self.W_K)
        v = torch.einsum("bsd,kde->bkse", h, self.W_V)
        if self.b_K is not None:
            k, v = k + self.b_K[:, None], v + self.b_V[:, None]
        if self.cfg.arch == "llama":
            k = rotate(k, self.cfg.rotary_base, start=start)
        return k, v

    def pattern(self, x):
        """Attention probabilities of the kept heads, for inspection. x: [B, S, D] -> [B, H, S, S]."""
        S, E = x.shape[1], self.cfg.d_head
        h = self.ln1(x)
        q = torch.einsum("bsd,hde->bhse", h, self.W_Q)
        k = torch.einsum("bsd,kde->bkse", h, self.W_K)[:, self.kv_of_head]
        if self.b_Q is not None:
            q, k = q + self.b_Q[:, None], k + self.b_K[self.kv_of_head][:, None]
        if self.cfg.arch == "llama":
            q, k = rotate(q, self.cfg.rotary_base), rotate(k, self.cfg.rotary_base)
        scores = q @ k.transpose(-1, -2) / E**0.5  # [B, H, S, S]
        if not self.cfg.causal:
            return scores.softmax(-1)
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)

    def attn_out(self, x, z=None, last_only: bool = False, prefix=None):
        """What attention writes to the residual stream. x: [B, s, D] -> [B, s or 1, D].

        `z`, if given, is `self.z(x, last_only)` computed already; `prefix` as in `z`.
        """
        p = 0 if prefix is None else prefix.shape[1]
        S = p + x.shape[1]
        pos = slice(S - 1, S) if last_only else slice(p, S)
        out = torch.zeros_like(x[:, -1:] if last_only else x)
        if self.heads:
            out = torch.einsum("bshe,hed->bsd", self.z(x, last_only, prefix) if z is None else z, self.W_O)
        return out + self.attn_bias(pos)

    def attn_bias(self, pos: slice):
        """What attention writes whatever the input: b_O plus the removed heads' means at `pos` ([s, D] or 0)."""
        out = 0.0
        if self.b_O is not None:
            out = out + self.b_O
        if self.attn_ablation is not None:
            out = out + self.attn_ablation[pos]
        return out

    def mlp_out(self, x, pos: slice | None = None):
        """What the MLP (or the bias standing in for it) writes. x: [B, S, D] -> [B, S, D].

        `pos`: the positions x holds (default 0..S-1), to pick the right ablation bias rows.
        """
        out = torch.zeros_like(x)
        if self.plan.has_mlp:
            h = self.ln2(x)
            if self.cfg.activation == "relu":
                out = F.relu(h @ self.W_in + self.b_in) @ self.W_out + self.b_out
            elif self.W_gate is None:
                out = F.gelu(h @ self.W_in + self.b_in, approximate="tanh") @ self.W_out + self.b_out
            else:
                out = (F.silu(h @ self.W_gate) * (h @ self.W_in)) @ self.W_out
        if self.mlp_ablation is not None:
            out = out + self.mlp_ablation[pos if pos is not None else slice(0, x.shape[1])]
        return out

    def forward(self, x, last_only: bool = False, prefix=None):
        """x: [B, S, D] -> [B, S, D], or [B, 1, D] (the last position) if `last_only`.

        With `prefix` ([1, p, D], see `z`), x holds only positions p..S-1 and so does the output.
        """
        p = 0 if prefix is None else prefix.shape[1]
        S = p + x.shape[1]
        pos = slice(S - 1, S) if last_only else slice(p, S)
        x = (x[:, -1:] if last_only else x) + self.attn_out(x, last_only=last_only, prefix=prefix)
        return x + self.mlp_out(x, pos)

    def forward_positionwise(self, x, pos: slice):
        """A layer without heads mixes no positions, so it can run on some of them alone.

        x: [B, s, D] holding the positions `pos` of the sequence -> [B, s, D].
        """
        if self.heads:
            raise ValueError("a layer with attention heads needs every position; use forward")
        x = x + self.attn_bias(pos)
        return x + self.mlp_out(x, pos)


class Transformer(nn.Module):
    """A decoder-only language model whose layers may be pruned (see `Layer`)."""

    def __init__(self, cfg: ModelConfig, plan: list[LayerPlan] | None = None, ablation: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.plan = plan if plan is not None else full_plan(cfg)
        self.ablation = ablation  # how removed parts are replaced: None (full model), "mean" or "zero"
        if len(self.plan) != cfg.n_layers:
            raise ValueError(f"plan has {len(self.plan)} layers, config says {cfg.n_layers}")
        self.W_E = nn.Parameter(torch.zeros(cfg.d_vocab, cfg.d_model))
        self.W_pos = nn.Parameter(torch.zeros(cfg.n_ctx, cfg.d_model)) if cfg.arch == "gpt2" else None
        self.layers = nn.ModuleList(Layer(cfg, p) for p in self.plan)
        self.ln_final = Norm(cfg)
        # The unembedding is tied to W_E (GPT-2 and SmolLM2 both tie them) unless d_vocab_out gives it its own.
        self.W_U = nn.Parameter(torch.zeros(cfg.d_model, cfg.d_vocab_out)) if cfg.d_vocab_out else None

    @property
    def device(self) -> torch.device:
        """Where the weights are (inputs are moved there by the extraction and measuring code)."""
        return self.W_E.device

    @property
    def max_len(self) -> int:
        """Longest input: the context, or the length of the per-position ablation biases."""
        lens = [p.ablation_len for p in self.plan if p.attn_ablation or p.mlp_ablation]
        return min([self.cfg.n_ctx] + lens)

    def embed(self, tokens):
        """tokens: [B, S] int64 (on any device; moved to the model's) -> residual stream [B, S, D]."""
        if tokens.shape[1] > self.max_len:
            raise ValueError(
                f"input has {tokens.shape[1]} tokens but this model takes at most {self.max_len} tokens "
                "(its context, or the prompt length its per-position mean-ablation biases were "
                "computed for); shorten the prompts"
            )
        x = self.W_E[tokens.to(self.W_E.device)]
        if self.W_pos is not None:
            x = x + self.W_pos[: tokens.shape[1]]
        return x

    def unembed(self, x):
        """x: [..., D] final residual stream -> logits [..., V] (V = d_vocab_out if the unembedding is untied)."""
        return self.ln_final(x) @ (self.W_E.T if self.W_U is None else self.W_U)

    def residual(self, tokens, last_only: bool = False):
        """tokens: [B, S] -> final residual stream [B, S, D], or [B, D] at the last position."""
        x = self.embed(tokens)
        for layer in self.layers[:-1]:
            x = layer(x)
        x = self.layers[-1](x, last_only=last_only)  # the last layer's other positions feed nothing
        return x[:, -1] if last_only else x

    def forward(self, tokens, last_only: bool = False):
        """tokens: [B, S] -> logits [B, S, V], or [B, V] at the last position if `last_only`."""
        return self.unembed(self.residual(tokens, last_only))

    @torch.inference_mode()
    def attention_patterns(self, tokens, heads: list[str]):
        """Attention patterns of the named kept heads ('L.H') on tokens [B, S] -> [B, len(heads), S, S]."""
        wanted = {}
        for name in heads:
            layer, head = parse_head(name)
            if head not in self.layers[layer].heads:
                raise ValueError(f"head {name} is not in this model (pruned away?); kept: {self.kept_heads()}")
            wanted.setdefault(layer, []).append(head)
        found = {}
        x = self.embed(tokens)
        for l, layer in enumerate(self.layers):
            if l in wanted:
                p = layer.pattern(x)
                for h in wanted[l]:
                    found[f"{l}.{h}"] = p[:, layer.heads.index(h)]
            x = layer(x)
        return torch.stack([found[name] for name in heads], dim=1)

    # ---- bookkeeping -------------------------------------------------------------------------

    def kept_heads(self) -> list[str]:
        return [f"{l}.{h}" for l, p in enumerate(self.plan) for h in p.heads]

    def kept_mlps(self) -> list[int]:
        return [l for l, p in enumerate(self.plan) if p.has_mlp]

    def count_parameters(self) -> dict:
        """Parameters without the token/position embeddings and the (tied or own) unembedding.

        Full GPT-2 Small gives 85,056,000. `ablation_bias` counts the elements of the
        mean-ablation bias buffers separately (the paper's authors did not count them).
        """
        skip = {"W_E", "W_pos", "W_U"}
        params = sum(p.numel() for n, p in self.named_parameters() if n not in skip)
        biases = sum(b.numel() for n, b in self.named_buffers() if n.endswith("_ablation"))
        return {"parameters": params, "ablation_bias": biases, "total": params + biases}

    def flops(self, seq_len: int, last_only: bool = True) -> int:
        """Multiply-add FLOPs (2 per multiply-add) of one prompt of `seq_len` tokens through the model.

        Counts the matrix products: projections, attention scores and mixing, MLPs and the
        unembedding; norms, softmax and additions are left out. With `last_only`, the last layer
        works on the last position only and only its logits are formed, as in `forward(last_only=True)`.
        """
        cfg, S, total = self.cfg, seq_len, 0
        D, E = cfg.d_model, cfg.d_head
        for i, layer in enumerate(self.layers):
            last = last_only and i == len(self.layers) - 1
            Sq = 1 if last else S  # query positions computed
            H, K = len(layer.heads), len(layer.plan.kv_heads(cfg))
            total += 2 * D * E * (H * Sq + 2 * K * S)  # W_Q on queries, W_K and W_V
            seen = S * (S + 1) // 2 if cfg.causal else S * S  # (query, key) pairs
            total += 2 * 2 * H * E * (S if last else seen)  # scores and mixing
            total += 2 * H * E * D * Sq  # W_O
            if layer.plan.has_mlp:
                total += 2 * D * cfg.d_mlp * Sq * (2 if layer.W_gate is None else 3)
        return total + 2 * D * (cfg.d_vocab_out or cfg.d_vocab) * (1 if last_only else S)

    # ---- saving and loading ------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `model.safetensors` + `model.json` into `directory` (created; must not hold a model).

        Both files are written to a temporary name first and renamed, so a crash leaves no
        half-written model behind.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / CONFIG_FILE).exists():
            raise FileExistsError(f"{directory} already holds a model; choose a new folder or delete it first")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        weights = atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, p))
        meta = {
            "format_version": FORMAT_VERSION,
            "config": asdict(self.cfg),
            "plan": [asdict(p) for p in self.plan],
            "ablation": self.ablation,
            "weights_sha256": file_sha256(weights),
        }
        atomic_write(directory / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "cpu") -> "Transformer":
        """Load a model written by `save`. Needs torch, safetensors and circuitlib only."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for p in (meta_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p} is missing: {directory} is not a saved circuitlib model "
                    "(save one with Transformer.save or `python -m circuitlib extract`)"
                )
        try:
            meta = json.loads(meta_path.read_text())
            cfg, plan = ModelConfig(**meta["config"]), [LayerPlan(**p) for p in meta["plan"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{meta_path} is not a valid circuitlib model description ({e}); re-save the model"
            ) from None
        if file_sha256(weights_path) != meta.get("weights_sha256"):
            raise ValueError(
                f"{weights_path} does not match the checksum in {meta_path}: the file is truncated, "
                "corrupted or from another model; re-save or re-extract the model"
            )
        model = cls(cfg, plan, meta.get("ablation"))
        state = load_file(str(weights_path), device=device)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{weights_path} does not fit the layout in {meta_path}: {e}") from None
        return model.to(device).eval()
