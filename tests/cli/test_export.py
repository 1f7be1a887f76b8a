"""ONNX export: the pruned model runs in onnxruntime with torch's logits (< 1e-4), at any batch size."""

import json
import random

import pytest
import torch

from circuitlib.cli import main
from circuitlib.core.ablation import mean_activations
from circuitlib.core.surgery import prune
from circuitlib.pipeline.export import export_onnx, onnx_logits, write_onnx
from circuitlib.pipeline.extraction import load_run

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ioi"
    assert (
        main(
            [
                "extract",
                "--model",
                "tiny-gpt2",
                "--task",
                "ioi",
                "--alpha",
                "0",
                "--n",
                "6",
                "--include-mlps",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_export_writes_an_onnx_file_that_onnxruntime_runs_like_torch(run_dir, capsys):
    assert main(["export", str(run_dir), "--format", "onnx"]) == 0
    printed = capsys.readouterr().out
    assert "max abs logit difference" in printed and str(run_dir / "model.onnx") in printed
    run = load_run(run_dir, "test")
    assert run.pruned.kept_heads(), "the circuit under test keeps some heads"
    tokens = torch.cat([run.prompts.tokens, run.prompts.tokens[:1]])  # a batch never exported with
    with torch.inference_mode():
        reference = run.pruned(tokens, last_only=True)
    for batch in (tokens, tokens[:1]):
        got = torch.from_numpy(onnx_logits(run_dir / "model.onnx", batch, threads=1))
        assert got.shape == (len(batch), run.pruned.cfg.d_vocab)
        assert (got - reference[: len(batch)]).abs().max() < 1e-4


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_a_pruned_llama_shaped_model_exports_exactly(models, data, tmp_path, ablation):
    model, (patching, validation) = models["llama"], data  # rotary positions, grouped K/V, gated MLP
    names = [f"{l}.{h}" for l in range(3) for h in range(6)] + [f"MLP {l}" for l in range(3)]
    pruned = prune(model, random.Random(0).sample(names, 12), ablation, mean_activations(model, patching))
    write_onnx(pruned, validation[:2], tmp_path / "m.onnx")
    with torch.inference_mode():
        reference = pruned(validation, last_only=True)
    got = torch.from_numpy(onnx_logits(tmp_path / "m.onnx", validation, threads=1))
    assert (got - reference).abs().max() < 1e-4


def test_an_existing_file_is_kept_unless_forced(run_dir, tmp_path, capsys):
    out = tmp_path / "pruned.onnx"
    out.write_text("mine")
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err and out.read_text() == "mine"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "x.bin")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err


def test_an_export_that_disagrees_with_torch_writes_nothing(run_dir, tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="differ from torch's by up to .* not written"):
        export_onnx(run_dir, out, tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_damaged_run_folder_names_the_file(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "circuit.json").write_text(json.dumps({"settings": {}}))
    assert main(["export", str(run), "--format", "onnx"]) == 2
    assert "circuit.json lacks settings.model" in capsys.readouterr().err
