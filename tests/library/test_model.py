"""circuitlib.core.model and circuitlib.core.convert: the readable transformer equals HF and TransformerLens."""

import json
import subprocess
import sys

import pytest
import torch

from circuitlib.core.convert import from_hooked, to_hooked
from circuitlib.core.model import ModelConfig, Transformer
from circuitlib.core.surgery import prune

GPT2_SMALL = ModelConfig(
    name="gpt2", arch="gpt2", n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024
)


@torch.no_grad()
def test_matches_hugging_face(arch, hf_models, models, data):
    tokens = data[1]
    assert torch.allclose(models[arch](tokens), hf_models[arch](tokens).logits, atol=1e-4)


@torch.no_grad()
def test_matches_transformer_lens_and_back(arch, models, data):
    model, tokens = models[arch], data[1]
    hooked = to_hooked(model)
    assert torch.allclose(hooked(tokens), model(tokens), atol=1e-4)
    again = from_hooked(hooked, model.cfg.name)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@torch.no_grad()
def test_last_only_is_the_last_position(arch, models, data):
    model, tokens = models[arch], data[1]
    assert torch.allclose(model(tokens, last_only=True), model(tokens)[:, -1], atol=1e-5)


def test_gpt2_small_parameter_count():
    model = Transformer(GPT2_SMALL)
    assert model.count_parameters() == {"parameters": 85_056_000, "ablation_bias": 0, "total": 85_056_000}
    all_heads = [f"{l}.{h}" for l in range(12) for h in range(12)]
    all_mlps = [f"MLP {l}" for l in range(12)]
    one_head_less = prune(model, [h for h in all_heads if h != "5.1"] + all_mlps, "zero")
    assert one_head_less.count_parameters()["parameters"] == 85_056_000 - 196_800
    one_mlp_less = prune(model, all_heads + [m for m in all_mlps if m != "MLP 3"], "zero")
    assert one_mlp_less.count_parameters()["parameters"] == 85_056_000 - 4_723_968


def test_too_long_input_is_refused(models):
    model = models["gpt2"]
    with pytest.raises(ValueError, match="at most 16 tokens"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_save_load_in_a_fresh_process(tmp_path, models, data):
    model, tokens = models["llama"], data[1]
    model.save(tmp_path / "m")
    torch.save(tokens, tmp_path / "tokens.pt")
    script = (
        "import sys, torch\n"
        "from circuitlib.core.model import Transformer\n"
        f"m = Transformer.load({str(tmp_path / 'm')!r})\n"
        f"torch.save(m(torch.load({str(tmp_path / 'tokens.pt')!r})), {str(tmp_path / 'out.pt')!r})\n"
        "assert 'transformer_lens' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), model(tokens))


def test_save_refuses_to_overwrite(tmp_path, models):
    models["gpt2"].save(tmp_path)
    with pytest.raises(FileExistsError, match="already holds a model"):
        models["gpt2"].save(tmp_path)


def test_saved_files_are_readable_by_others(tmp_path, models):
    """The atomic write goes through a private temporary file; the saved model must not stay private."""
    models["gpt2"].save(tmp_path / "m")
    for f in (tmp_path / "m").iterdir():
        assert f.stat().st_mode & 0o044 == 0o044, f"{f.name} is not readable by group and others"


def test_truncated_weights_give_a_clear_error(tmp_path, models):
    models["gpt2"].save(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated, corrupted or from another model"):
        Transformer.load(tmp_path)


def test_mismatched_weights_give_a_clear_error(tmp_path, models):
    models["gpt2"].save(tmp_path / "a")
    models["llama"].save(tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    meta = json.loads((tmp_path / "a" / "model.json").read_text())
    meta["weights_sha256"] = json.loads((tmp_path / "b" / "model.json").read_text())["weights_sha256"]
    (tmp_path / "a" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not fit the layout"):
        Transformer.load(tmp_path / "a")


def test_missing_model_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved circuitlib model"):
        Transformer.load(tmp_path)


def test_attention_patterns_match_transformer_lens(arch, models, data):
    model, tokens = models[arch], data[1][:2]
    _, cache = to_hooked(model).run_with_cache(tokens)
    ours = model.attention_patterns(tokens, ["1.2", "0.3"])
    assert torch.allclose(ours[:, 0], cache["blocks.1.attn.hook_pattern"][:, 2], atol=1e-5)
    assert torch.allclose(ours[:, 1], cache["blocks.0.attn.hook_pattern"][:, 3], atol=1e-5)
    with pytest.raises(ValueError, match="not in this model"):
        prune(model, ["0.1"], "zero").attention_patterns(tokens, ["0.2"])


def test_flops_of_gpt2_small_at_one_token():
    model = Transformer(GPT2_SMALL)
    # one token: every weight matrix is used once (2 FLOPs per weight), plus scores/mixing and the unembedding
    matrices = 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    assert model.flops(1, last_only=False) == 2 * matrices + 12 * 2 * 2 * 768 + 2 * 768 * 50257


def test_hooked_copy_of_a_long_context_rotary_model_has_a_short_mask():
    from circuitlib.core.convert import hooked_config

    smollm2 = ModelConfig(
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
    assert hooked_config(smollm2).n_ctx == 1024
    assert hooked_config(GPT2_SMALL).n_ctx == 1024  # learned positions: the whole table is kept
