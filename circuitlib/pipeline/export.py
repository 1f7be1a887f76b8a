"""Export a run's pruned model to ONNX, so that a deployment runtime (ONNX Runtime) can load it.

    python -m circuitlib export RUN_DIR --format onnx       # -> RUN_DIR/model.onnx

The graph takes `tokens` (int64 [batch, S], batch dynamic, S the task's prompt length, fixed:
the mean-ablation biases are per position) and returns `logits` (float32 [batch, vocab]) at the
last position, the next-token prediction the task is about. It is written with torch's
`torch.export`-based exporter (needs `onnx` and `onnxscript`), then checked with onnxruntime
against the torch model on the run's held-out test prompts, at their batch and at batch 1;
the file is renamed into place only if the largest absolute logit difference is within
`tolerance`, so a failed or interrupted export leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from circuitlib.core.model import Transformer
from circuitlib.pipeline.extraction import load_run

OPSET = 18
TOLERANCE = 1e-4


class LastLogits(nn.Module):
    """tokens [B, S] -> the model's logits at the last position [B, V]."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(tokens, last_only=True)


def write_onnx(model: Transformer, example: torch.Tensor, path: str | os.PathLike) -> None:
    """Write `model` as ONNX to `path`: int64 tokens [batch, S] -> float32 last-position logits [batch, V].

    example: LongTensor [b, S] with b >= 2 (S is fixed by it; the batch stays dynamic).
    """
    if example.ndim != 2 or len(example) < 2:
        raise ValueError(
            f"the example batch must be [b >= 2, S] so that the batch stays dynamic; got {list(example.shape)}"
        )
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the exporter logs what it skips (e.g. torchvision ops) as warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside torch.export, not ours
            torch.onnx.export(
                LastLogits(model).eval(),
                (example.to(model.device),),
                str(path),
                dynamo=True,
                input_names=["tokens"],
                output_names=["logits"],
                dynamic_shapes={"tokens": {0: batch}},
                opset_version=OPSET,
                external_data=False,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)


def onnx_logits(path: str | os.PathLike, tokens: torch.Tensor, threads: int | None = None) -> np.ndarray:
    """Run the ONNX file at `path` with onnxruntime (CPU) on tokens [B, S] -> logits [B, V]."""
    session = ort_session(path, threads)
    return session.run(None, {"tokens": tokens.cpu().numpy()})[0]


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session for the file at `path` (`threads`: intra-op threads, default: its own)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_onnx(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    force: bool = False,
    tolerance: float = TOLERANCE,
) -> dict:
    """Export the pruned model of the run folder `run_dir` to `out` (default RUN_DIR/model.onnx), checked.

    Returns {"path", "bytes", "opset", "seq_len", "n" (test prompts), "max_abs_diff" (onnxruntime vs
    torch logits, over the test prompts and batch 1), "argmax_agreement", "onnxruntime" (version)}.
    Refuses, before exporting, an `out` that exists (unless `force`) or cannot be written.
    """
    import onnxruntime

    run = load_run(run_dir, "test")
    out = Path(out) if out is not None else run.run_dir / "model.onnx"
    if out.suffix != ".onnx":
        raise ValueError(f"{out}: the ONNX file's name must end in .onnx")
    if out.exists() and (out.is_dir() or not force):
        raise FileExistsError(f"{out} exists; choose another --out, or pass --force to replace it")
    if not out.parent.is_dir():
        raise ValueError(f"cannot write {out}: {out.parent} is not an existing folder")
    tokens = run.prompts.tokens  # [n, S]
    example = tokens[:2] if len(tokens) >= 2 else tokens.repeat(2, 1)
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as e:
        raise ValueError(f"cannot write {out}: {out.parent} is not writable ({e.strerror})") from None
    os.close(fd)
    try:
        write_onnx(run.pruned, example, tmp)
        with torch.inference_mode():
            reference = run.pruned(tokens, last_only=True).numpy()  # [n, V]
        got = onnx_logits(tmp, tokens)
        single = onnx_logits(tmp, tokens[:1])  # batch 1: dynamic batch
        diff = max(float(np.abs(got - reference).max()), float(np.abs(single - reference[:1]).max()))
        if not diff <= tolerance:
            raise ValueError(
                f"the ONNX model's logits differ from torch's by up to {diff:.2e} (> {tolerance:g}) "
                f"on the test prompts of {run.run_dir}; not written"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {
        "path": str(out),
        "bytes": out.stat().st_size,
        "opset": OPSET,
        "seq_len": tokens.shape[1],
        "n": len(tokens),
        "max_abs_diff": diff,
        "argmax_agreement": float((got.argmax(-1) == reference.argmax(-1)).mean()),
        "onnxruntime": onnxruntime.__version__,
    }
