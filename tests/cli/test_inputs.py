"""Bad inputs to the extraction are refused before any work, with one message that names the fix."""

import json

import numpy as np
import pytest
import torch

from circuitlib.core.ablation import mean_activations
from circuitlib.discovery.greedy import check_alpha, extract, sweep


@pytest.mark.parametrize(
    "alpha, message",
    [
        (float("inf"), "must be finite"),
        ("inf", "must be finite"),
        ("-Infinity", ">= 0"),
        (True, "boolean"),
        (np.bool_(False), "boolean"),
        (float("nan"), ">= 0"),
        ("0.1x", "must be a number"),
        (None, "must be a number"),
    ],
)
def test_bad_alphas_are_refused(alpha, message):
    with pytest.raises(ValueError, match=message):
        check_alpha(alpha)


@pytest.mark.parametrize("alpha", [-0.0, "-0", "-0.0"])
def test_minus_zero_is_stored_as_zero(alpha):
    value = check_alpha(alpha)
    assert value == 0 and json.dumps(value) == "0.0"


def test_good_alphas_pass():
    assert check_alpha("1e-3") == 1e-3 and check_alpha(2) == 2.0 and check_alpha(np.float32(0.5)) == 0.5


@pytest.mark.parametrize("method", ["fast", "plain"])
def test_patching_and_validation_of_different_lengths_are_refused(models, data, method):
    model, (patching, validation) = models["gpt2"], data
    with pytest.raises(ValueError, match="patching prompts have 8 tokens but validation prompts have 6"):
        extract(model, patching, validation[:, :6], alpha=0.01, method=method, progress=False)


def test_means_of_another_length_are_refused(models, data):
    model, (patching, validation) = models["gpt2"], data
    means = mean_activations(model, patching[:, :5])
    with pytest.raises(ValueError, match="means were computed on prompts of 5 tokens"):
        sweep(model, patching, validation, [0.01], means=means, progress=False)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda v: v + 1000, r"ids in \[0, 101\)"),
        (lambda v: -v - 1, r"ids in \[0, 101\)"),
        (lambda v: v[:0], "validation set is empty"),
        (lambda v: v.float(), "must be a LongTensor"),
        (lambda v: torch.zeros(1, 40, dtype=torch.long), "takes at most 16"),
    ],
)
def test_validation_prompts_the_model_cannot_take_are_refused(models, data, bad, message):
    model, (patching, validation) = models["gpt2"], data
    validation = bad(validation)
    if validation.ndim == 2 and validation.shape[1] == 40:
        patching = torch.zeros(2, 40, dtype=torch.long)
    with pytest.raises(ValueError, match=message):
        sweep(model, patching, validation, [0.01], progress=False)
