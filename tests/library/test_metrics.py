"""KL divergence, accuracy, TPR/FPR, ROC AUC and the forward timer on hand-made numbers."""

import math

import pytest
import torch
import torch.nn.functional as F

from circuitlib.core.metrics import accuracy, kl_divergence, roc_auc, roc_curve, time_forward, tpr_fpr
from circuitlib.models.loading import gpt2_tokenizer
from circuitlib.tasks import get_task, make_split


def random_logits(seed, shape=(6, 50)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_kl_of_identical_logits_is_zero():
    x = random_logits(0)
    assert kl_divergence(x, x) == 0.0
    assert kl_divergence(x, x + 7.0) == pytest.approx(0.0, abs=1e-6)  # a shift does not change softmax


def test_kl_is_positive_and_asymmetric():
    f, g = random_logits(0), random_logits(1)
    assert kl_divergence(f, g) > 0 and kl_divergence(g, f) > 0
    assert kl_divergence(f, g) != pytest.approx(kl_divergence(g, f))


def test_kl_matches_the_formula_and_torch():
    f, g = random_logits(2).double(), random_logits(3).double()
    p, log_p, log_q = f.softmax(-1), f.log_softmax(-1), g.log_softmax(-1)
    manual = (p * (log_p - log_q)).sum(-1).mean().item()  # sum over vocab, mean over batch
    torch_kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean").item()
    assert kl_divergence(f, g) == pytest.approx(manual, rel=1e-12)
    assert manual == pytest.approx(torch_kl, rel=1e-12)


def test_kl_upcasts_half_precision():
    f, g = random_logits(4), random_logits(5)
    assert kl_divergence(f.half(), g.half()) == pytest.approx(
        kl_divergence(f.half().float(), g.half().float()), rel=1e-6
    )


def test_kl_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[n, vocab\]"):
        kl_divergence(torch.zeros(2, 5), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"\[n, vocab\]"):
        kl_divergence(torch.zeros(2, 4, 5), torch.zeros(2, 4, 5))


def test_accuracy_counts_correct_argmax():
    tok = gpt2_tokenizer()
    split = make_split(
        tok, ["Then, Mary and John went", "Then, John and Mary went"] * 2, [" Mary", " John", " Mary", " John"]
    )
    logits = torch.zeros(4, 50257)
    mary, john = tok.encode(" Mary")[0], tok.encode(" John")[0]
    logits[0, mary] = logits[1, john] = logits[2, john] = logits[3, john] = 1.0
    assert accuracy(get_task("ioi"), split, logits) == 0.75


def test_accuracy_is_the_exact_fraction_of_correct_prompts():
    # 241 of 250 correct: a float32 mean gives 0.9639999866; stores and rebuilt circuits compare 241 / 250 exactly
    tok = gpt2_tokenizer()
    split = make_split(tok, ["Then, Mary and John went"] * 250, [" John"] * 250)
    logits = torch.zeros(250, 50257)
    logits[:241, tok.encode(" John")[0]] = 1.0
    logits[241:, tok.encode(" Mary")[0]] = 1.0
    assert accuracy(get_task("ioi"), split, logits) == 241 / 250


def test_tpr_fpr_by_hand():
    truth = ["9.9", "9.6", "10.0", "10.7"]
    tpr, fpr = tpr_fpr(["9.9", "9.6", "1.1", "2.2", "3.3"], truth, n_heads_total=144)
    assert tpr == 2 / 4
    assert fpr == 3 / 140
    assert tpr_fpr(truth, truth) == (1.0, 0.0)
    assert tpr_fpr([], truth) == (0.0, 0.0)
    all_heads = [f"{layer}.{head}" for layer in range(12) for head in range(12)]
    assert tpr_fpr(all_heads, truth) == (1.0, 1.0)


def test_tpr_fpr_rejects_bad_heads():
    with pytest.raises(ValueError, match="'layer.head'"):
        tpr_fpr([(9, 9)], ["9.9"])
    with pytest.raises(ValueError, match="ground_truth"):
        tpr_fpr(["9.9"], [])


def test_auc_of_perfect_and_diagonal_curves():
    assert roc_auc([0.0], [1.0]) == 1.0  # (0,0) -> (0,1) -> (1,1)
    assert roc_auc([0.2, 0.5, 0.8], [0.2, 0.5, 0.8]) == pytest.approx(0.5)
    assert roc_auc([], []) == pytest.approx(0.5)  # only the endpoints
    assert roc_auc([0.0, 1.0], [1.0, 1.0], add_endpoints=False) == 1.0


def test_auc_trapezoid_by_hand_and_unsorted_input():
    # (0,0) (0.1,0.5) (0.5,0.75) (1,1): 0.1*0.25 + 0.4*0.625 + 0.5*0.875 = 0.7125
    assert roc_auc([0.5, 0.1], [0.75, 0.5]) == pytest.approx(0.7125)
    assert roc_auc([0.1, 0.5], [0.5, 0.75], add_endpoints=False) == pytest.approx(0.4 * 0.625)


def test_roc_curve_sorts_and_adds_endpoints():
    assert roc_curve([0.5, 0.1], [0.75, 0.5]) == ([0.0, 0.1, 0.5, 1.0], [0.0, 0.5, 0.75, 1.0])
    assert roc_curve([0.5, 0.1], [0.75, 0.5], add_endpoints=False) == ([0.1, 0.5], [0.5, 0.75])
    with pytest.raises(ValueError, match="same length"):
        roc_curve([0.1], [0.2, 0.3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        roc_curve([1.5], [0.2])


def test_time_forward_returns_sane_numbers():
    calls, modes = [], []

    def fn():
        calls.append(1)
        modes.append(torch.is_inference_mode_enabled())
        return torch.ones(64, 64) @ torch.ones(64, 64)

    result = time_forward(fn, warmup=2, repeats=7, device="cpu")
    assert len(calls) == 9 and all(modes)
    assert result["repeats"] == 7 and len(result["times_s"]) == 7
    assert 0 < result["p10_s"] <= result["median_s"] <= result["p90_s"]
    assert all(math.isfinite(t) and t > 0 for t in result["times_s"])
    assert result["median_s"] == pytest.approx(sorted(result["times_s"])[3])


def test_time_forward_rejects_bad_counts():
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_forward(lambda: None, repeats=0)


def test_kl_is_computed_and_accumulated_in_float64():
    import numpy as np

    from circuitlib.core.metrics import kl_per_prompt, kl_to, log_probs

    g = torch.Generator().manual_seed(0)
    f, o = torch.randn(6, 5000, generator=g), torch.randn(6, 5000, generator=g)
    lf = f.double().numpy() - np.log(np.exp(f.double().numpy()).sum(-1, keepdims=True))
    lo = o.double().numpy() - np.log(np.exp(o.double().numpy()).sum(-1, keepdims=True))
    want = float((np.exp(lf) * (lf - lo)).sum(-1).mean())
    assert log_probs(f).dtype == torch.float64
    assert kl_divergence(f, o) == pytest.approx(want, rel=1e-12)
    assert kl_to(log_probs(f), o) == kl_divergence(f, o)
    assert kl_per_prompt(log_probs(f), o).mean().item() == pytest.approx(want, rel=1e-12)


def test_decisions_do_not_depend_on_the_thread_count(models, data):
    from circuitlib.discovery.greedy import sweep

    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(sweep(models["llama"], *data, [0.0, 1e-3, 1e-2, 1e-1], include_mlps=True, progress=False))
    finally:
        torch.set_num_threads(before)
    assert [c.kept for c in runs[0]] == [c.kept for c in runs[1]]


# ---------------------------------------------------------------------------------------------
# the field's measures: logit and probability differences, faithfulness, its areas, constant answers


def test_logit_difference_and_best_other_letter_on_hand_made_logits():
    from circuitlib.core.metrics import best_other_logit_difference, logit_difference

    logits = torch.tensor([[1.0, 2.0, 3.0, 9.0], [0.0, 5.0, -1.0, 9.0]])
    assert logit_difference(logits, torch.tensor([2, 1]), torch.tensor([0, 2])).tolist() == [2.0, 6.0]
    assert logit_difference(logits + 4.0, torch.tensor([2, 1]), torch.tensor([0, 2])).tolist() == [2.0, 6.0]
    options = torch.tensor([0, 1, 2])  # token 3 is no option: its 9.0 does not count
    assert best_other_logit_difference(logits, torch.tensor([2, 0]), options).tolist() == [1.0, -5.0]
    with pytest.raises(ValueError, match="one of the options"):
        best_other_logit_difference(logits, torch.tensor([3, 0]), options)
    with pytest.raises(ValueError, match="one right token per prompt"):
        logit_difference(logits, torch.tensor([2]), torch.tensor([0, 2]))


def test_probability_difference_on_hand_made_logits():
    from circuitlib.core.metrics import probability_difference

    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]).log()
    candidates = torch.tensor([1, 2, 3])
    accepted = torch.tensor([[False, True, True], [False, False, True]])
    got = probability_difference(logits, candidates, accepted)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([-0.2 + 0.3 + 0.4, -0.3 - 0.2 + 0.1], abs=1e-6)
    with pytest.raises(ValueError, match="accepted must be"):
        probability_difference(logits, candidates, accepted[:, :2])


def test_standard_metrics_of_the_three_tasks_read_the_right_tokens():
    from circuitlib.tasks.measures import standard_metric, standard_metric_name

    tok = gpt2_tokenizer()
    ioi = get_task("ioi").generate(tok, 6, seed=0).test
    logits = torch.zeros(len(ioi), len(tok))
    subjects = [tok.encode(" " + p.split(",")[1].split()[0]) for p in ioi.prompts]  # "Then, B and A ..."
    for i, (io, (s,)) in enumerate(zip(ioi.answers.tolist(), subjects)):
        logits[i, io], logits[i, s] = 3.0, 1.0 + i
    assert standard_metric(get_task("ioi"), tok, ioi, logits).tolist() == [2.0 - i for i in range(len(ioi))]

    gt = get_task("greater-than").generate(tok, 6, seed=0).test
    logits = torch.full((len(gt), len(tok)), -1e4)
    logits[:, tok.encode("99")[0]] = 0.0  # certain of "99": right on every prompt
    assert standard_metric(get_task("greater-than"), tok, gt, logits).tolist() == pytest.approx([1.0] * len(gt))
    logits[:, tok.encode("00")[0]] = 0.0  # half on "00", never later than a start year
    assert standard_metric(get_task("greater-than"), tok, gt, logits).tolist() == pytest.approx([0.0] * len(gt))

    acro = get_task("acronyms").generate(tok, 6, seed=0).test
    logits = torch.zeros(len(acro), len(tok))
    logits[:, tok.encode("Q")[0]] = 2.0  # the best wrong letter, unless Q is right
    logits[:, tok.encode(" Z")[0]] = 50.0  # not a letter token of the answer: ignored
    logits[torch.arange(len(acro)), acro.answers] = 5.0
    want = [5.0 if tok.decode(int(a)) == "Q" else 3.0 for a in acro.answers]
    assert standard_metric(get_task("acronyms"), tok, acro, logits).tolist() == want
    assert standard_metric_name(get_task("ioi")).startswith("logit difference")


def test_the_mixed_ioi_task_is_measured_by_ioi_logit_difference_in_both_orders():
    """ioi-mixed (ABBA and BABA, many templates): the subject read off the prompt's words, whatever the order."""
    from circuitlib.tasks.builtin import IOI_NAMES
    from circuitlib.tasks.measures import LOGIT_METRICS, standard_metric, standard_metric_name

    tok = gpt2_tokenizer()
    task = get_task("ioi-mixed")
    split = task.generate(tok, 8, seed=0).test
    logits = torch.zeros(len(split), len(tok))
    for i, (prompt, io) in enumerate(zip(split.prompts, split.answers.tolist())):
        words = {w.strip(".,") for w in prompt.split()}
        (subject,) = {w for w in words if w in IOI_NAMES} - {tok.decode(io).strip()}
        logits[i, io], logits[i, tok.encode(" " + subject)[0]] = 3.0, 1.0 + i
    assert standard_metric(task, tok, split, logits).tolist() == [2.0 - i for i in range(len(split))]
    assert standard_metric_name(task) == standard_metric_name(get_task("ioi")) and task.name in LOGIT_METRICS


def test_standard_metric_of_a_task_file_is_accuracy(tmp_path):
    from circuitlib.tasks.files import load_task_file
    from circuitlib.tasks.measures import standard_metric, standard_metric_name

    tok = gpt2_tokenizer()
    path = tmp_path / "colours.csv"
    path.write_text("prompt,answer\n" + "".join(f"Item {i} is,{c}\n" for i, c in enumerate([" red", " blue"] * 3)))
    task = load_task_file(path)
    split = task.generate(tok, 2, seed=0).test
    logits = torch.zeros(len(split), len(tok))
    logits[0, split.answers[0]] = 1.0
    assert standard_metric(task, tok, split, logits).tolist() == [1.0, 0.0]
    assert standard_metric_name(task) == "accuracy"


def test_normalised_faithfulness_and_its_areas():
    from circuitlib.core.metrics import faithfulness_areas, faithfulness_curve, normalised_faithfulness

    assert normalised_faithfulness(3.0, full=5.0, empty=1.0) == 0.5
    assert normalised_faithfulness(1.0, full=5.0, empty=1.0) == 0.0 and normalised_faithfulness(5, 5, 1) == 1.0
    assert math.isnan(normalised_faithfulness(2.0, full=1.0, empty=1.0))
    assert faithfulness_curve([1, 0, 0.5], [1, 0, 0.9]) == ([0.0, 0.5, 1.0], [0.0, 0.9, 1.0])
    assert faithfulness_areas([0, 0.5, 1], [0, 1, 1]) == {"cpr": 0.75, "cmd": 0.25}
    assert faithfulness_areas([0, 0.5, 1], [0, 1.5, 1]) == {"cpr": 1.0, "cmd": 0.5}  # overshooting costs CMD
    assert faithfulness_areas([1, 0], [1, 0]) == {"cpr": 0.5, "cmd": 0.5}  # the straight line
    with pytest.raises(ValueError, match="at least two points"):
        faithfulness_areas([0.5], [1.0])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        faithfulness_curve([0, 2], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        faithfulness_curve([0, 1], [float("nan"), 1])


def test_best_constant_answer_on_hand_made_splits():
    from circuitlib.tasks import TaskSplit
    from circuitlib.tasks.measures import best_constant_answer, constant_answer_metric

    tokens = torch.zeros(3, 4, dtype=torch.long)
    plain = TaskSplit(["a", "b", "c"], tokens, torch.tensor([7, 5, 7]))
    assert best_constant_answer(plain) == {"token": 7, "accuracy": 2 / 3}
    several = TaskSplit(
        ["a", "b", "c"],
        tokens,
        torch.tensor([11, 12, 10]),
        torch.tensor([10, 11, 12]),
        torch.tensor([[False, True, True], [False, False, True], [True, True, True]]),
    )
    assert best_constant_answer(several) == {"token": 12, "accuracy": 1.0}
    assert constant_answer_metric(get_task("greater-than"), None, several, 12) == 1.0
    assert constant_answer_metric(get_task("greater-than"), None, several, 10) == pytest.approx(2 * 1 / 3 - 1)
    assert constant_answer_metric(get_task("ioi"), None, plain, 7) is None  # a logit difference: infinite


def test_the_largest_year_ending_is_right_on_every_greater_than_prompt():
    """Why greater-than accuracy cannot fail a constant answer (see `tasks.GreaterThan`)."""
    from circuitlib.tasks.measures import best_constant_answer

    tok = gpt2_tokenizer()
    for seed in (0, 1):
        test = get_task("greater-than").generate(tok, 50, seed=seed).test
        assert best_constant_answer(test) == {"token": tok.encode("99")[0], "accuracy": 1.0}
