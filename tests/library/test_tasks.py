"""Task datasets under GPT-2's real (vendored) tokenizer, and the SmolLM2 ports (slow)."""

import json
from pathlib import Path

import pytest
import torch

from circuitlib.models.loading import gpt2_tokenizer
from circuitlib.tasks import (
    TASK_NAMES,
    TASKS,
    Task,
    get_task,
    is_gpt2_tokenizer,
    make_split,
    register_task,
    split_acronyms,
)
from circuitlib.tasks.builtin import _start_years

N = 40
# GPT-2's first two acronyms validation prompts at n = 250, seed 0, as generated before the SmolLM2 port
PAPER_ACRONYMS_SEED0 = ["The Zinc Yarn Aversion (ZY", "The Wrench Laughter Eaves (WL"]


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def datasets(tok):
    return {name: get_task(name).generate(tok, N, seed=0) for name in TASK_NAMES}


def splits(data):
    return [data.patching, data.validation, data.test]


@pytest.mark.parametrize("name, length", [("acronyms", 11), ("ioi", 15), ("greater-than", 10)])
def test_gpt2_token_lengths(datasets, name, length):
    for split in splits(datasets[name]):
        assert split.tokens.shape == (N, length)
        assert split.tokens.dtype == torch.long
        assert split.answers.shape == (N,)


def test_acronyms_starts_with_bos_and_others_do_not(datasets):
    assert (datasets["acronyms"].validation.tokens[:, 0] == 50256).all()
    for name in ("ioi", "greater-than"):
        assert (datasets[name].validation.tokens == 50256).sum() == 0


def test_tokens_are_the_tokenised_prompts(tok, datasets):
    for name, data in datasets.items():
        split = data.test
        bos = [tok.bos_token_id] if name == "acronyms" else []
        for prompt, row in zip(split.prompts[:5], split.tokens[:5]):
            assert row.tolist() == bos + tok.encode(prompt)


def test_acronyms_template(tok, datasets):
    split = datasets["acronyms"].validation
    for prompt, row, answer in zip(split.prompts, split.tokens, split.answers):
        pieces = tok.convert_ids_to_tokens(row.tolist())
        words = prompt.split()[1:4]
        assert [pieces[i] for i in (2, 4, 6)] == ["Ġ" + w[0] for w in words]  # " C1", " C2", " C3"
        assert pieces[8:] == ["Ġ(", words[0][0], words[1][0]]
        assert tok.decode([int(answer)]) == words[2][0]


def test_acronyms_with_gpt2_stay_the_papers(tok):
    """The SmolLM2 port (whole acronym split letter by letter) must not touch GPT-2's prompts."""
    assert is_gpt2_tokenizer(tok)
    data = get_task("acronyms").generate(tok, 250, seed=0)
    acronyms = [p.split()[1][0] + p.split()[2][0] + p.split()[3][0] for p in data.validation.prompts]
    merged = [a for a in acronyms if a not in split_acronyms(tok)]
    assert len(merged) > 100  # about 70 % of the paper's triples are not split letter by letter by GPT-2
    assert data.validation.prompts[:2] == PAPER_ACRONYMS_SEED0  # the same prompts as before the port


def test_ioi_answer_is_the_indirect_object(tok, datasets):
    split = datasets["ioi"].validation
    for prompt, answer in zip(split.prompts, split.answers):
        b, a = prompt.split()[1], prompt.split()[3]
        assert prompt == f"Then, {b} and {a} went to the {prompt.split()[7][:-1]}. {b} gave a {prompt.split()[11]} to"
        assert a != b and tok.decode([int(answer)]) == " " + a


def test_answers_are_single_tokens_that_decode_back(tok, datasets):
    for data in datasets.values():
        for answer in data.validation.answers.tolist():
            assert tok.encode(tok.decode([answer])) == [answer]


def test_splits_are_disjoint(datasets):
    for data in datasets.values():
        sets = [set(split.prompts) for split in splits(data)]
        assert all(len(s) == N for s in sets)
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


def test_same_seed_same_data_other_seed_other_data(tok, datasets):
    for name, data in datasets.items():
        again = get_task(name).generate(tok, N, seed=0)
        other = get_task(name).generate(tok, N, seed=1)
        assert again.validation.prompts == data.validation.prompts
        assert torch.equal(again.test.tokens, data.test.tokens)
        assert other.validation.prompts != data.validation.prompts


def test_more_test_prompts_leave_the_search_splits_and_the_first_test_prompts_unchanged(tok, datasets):
    """A chapter may measure on more held-out prompts than a stored result was searched with."""
    for name, data in datasets.items():
        more = get_task(name).generate(tok, N, seed=0, n_test=3 * N)
        for split in ("patching", "validation"):
            assert torch.equal(getattr(more, split).tokens, getattr(data, split).tokens), (name, split)
        assert more.test.prompts[:N] == data.test.prompts and len(more.test) == 3 * N


def one_hot_logits(tokens, vocab=50257):
    logits = torch.zeros(len(tokens), vocab)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return logits


def test_correct_is_argmax_equals_answer(datasets):
    for name in ("acronyms", "ioi"):
        split, task = datasets[name].validation, get_task(name)
        assert task.correct(split, one_hot_logits(split.answers.tolist())).all()
        wrong = (split.answers + 1).tolist()
        assert not task.correct(split, one_hot_logits(wrong)).any()


def test_greater_than_start_years_drop_each_centurys_first_and_last(tok):
    years = _start_years(tok, lambda yy: yy, 100)
    assert [yy for century, yy in years if century == 17] == list(range(3, 98))  # 1702 and 1798 dropped
    assert {century for century, _ in years} == set(range(11, 18))


def test_greater_than_digit_port_uses_start_years_ending_in_9(tok):
    years = _start_years(tok, lambda yy: yy // 10, 10)  # GPT-2's tokenizer, with the port's value rule
    assert [yy for century, yy in years if century == 17] == [19, 29, 39, 49, 59, 69, 79]  # 09 and 89 dropped


def test_greater_than_correct_is_strictly_greater(tok):
    task = get_task("greater-than")
    split = make_split(
        tok,
        ["The war lasted from the year 1732 to 17"] * 4,
        ["33"] * 4,
        candidates=[f"{v:02d}" for v in range(100)],
        accepted=(torch.arange(100) > 32).expand(4, 100),
    )
    predictions = [tok.encode(x)[0] for x in ("33", "99", "32", "05")]
    assert task.correct(split, one_hot_logits(predictions)).tolist() == [True, True, False, False]
    # A non-year token is never correct.
    assert not task.correct(split[:1], one_hot_logits(tok.encode(" war"))).any()


def test_greater_than_generated_rule(tok, datasets):
    split, task = datasets["greater-than"].validation, get_task("greater-than")
    start = torch.tensor([int(p.split()[6][2:]) for p in split.prompts])
    year_token = [tok.encode(f"{v:02d}")[0] for v in range(100)]
    for offset, expected in ((1, True), (0, False), (-1, False)):
        predicted = [year_token[int(y) + offset] for y in start]
        assert task.correct(split, one_hot_logits(predicted)).tolist() == [expected] * N
    assert all(tok.decode([int(a)]) == f"{int(y) + 1:02d}" for a, y in zip(split.answers, start))


def test_greater_than_years(datasets):
    years = [int(p.split()[6]) for p in datasets["greater-than"].validation.prompts]
    assert all(1100 <= y < 1800 and 2 < y % 100 < 98 for y in years)


def test_correct_checks_logit_shape(datasets):
    split = datasets["ioi"].validation
    with pytest.raises(ValueError, match=r"shape \[n, vocab\]"):
        get_task("ioi").correct(split, torch.zeros(N, 15, 50257))


def test_ground_truth_counts():
    assert len(get_task("acronyms").ground_truth("gpt2")) == 8
    assert len(get_task("greater-than").ground_truth("gpt2")) == 8
    assert len(get_task("ioi").ground_truth("gpt2")) == 23
    assert len(get_task("ioi").ground_truth("gpt2", "authors")) == 23
    wang = get_task("ioi").ground_truth("gpt2", "wang2022")
    assert len(wang) == len(set(wang)) == 26 and {"5.8", "5.9", "0.10"} <= set(wang)
    assert "8.11" in get_task("acronyms").ground_truth("gpt2")


def test_default_sizes_are_the_papers():
    assert [get_task(name).default_n for name in TASK_NAMES] == [250, 150, 250]


def test_ground_truth_errors():
    with pytest.raises(ValueError, match="only for GPT-2 Small"):
        get_task("ioi").ground_truth("smollm2-135m")
    with pytest.raises(ValueError, match="unknown ground-truth variant 'x'"):
        get_task("ioi").ground_truth("gpt2", "x")


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'x'; choose one of acronyms, ioi, greater-than"):
        get_task("x")


def test_make_split_rejects_unequal_lengths(tok):
    with pytest.raises(ValueError, match=r"same token length.*found lengths \[3, 5\]"):
        make_split(tok, ["The cat sat", "The cat sat on it"], [" down", " down"])


def test_make_split_rejects_multi_token_answers(tok):
    with pytest.raises(ValueError, match="answers must each be one token.*' Anastasiadis'"):
        make_split(tok, ["The cat sat", "The dog sat"], [" down", " Anastasiadis"])


def test_make_split_bos_and_ok(tok):
    split = make_split(tok, ["The cat sat", "The dog sat"], [" down", " up"], bos=True)
    assert split.tokens[:, 0].tolist() == [50256, 50256] and split.tokens.shape == (2, 4)
    assert split.answers.tolist() == [tok.encode(" down")[0], tok.encode(" up")[0]]


def test_n_too_large_and_bad_n(tok):
    with pytest.raises(ValueError, match="distinct prompts.*lower n"):
        get_task("greater-than").generate(tok, 10**6, seed=0)
    with pytest.raises(ValueError, match="positive int"):
        get_task("ioi").generate(tok, 0, seed=0)


def test_custom_task_can_be_registered(tok):
    class Echo(Task):
        name = "echo-test"

        def build(self, tokenizer, count, rng):
            words = rng.sample(["cat", "dog", "sun", "car", "red", "tree"], count)
            return make_split(tokenizer, [f"Say {w}:" for w in words], [" " + w for w in words])

    task = register_task(Echo())
    try:
        assert get_task("echo-test") is task
        data = task.generate(tok, 2, seed=0)
        assert data.validation.tokens.shape == (2, 3)
        with pytest.raises(ValueError, match="already registered"):
            register_task(Echo())
    finally:
        del TASKS["echo-test"]


def test_generate_rejects_repeated_prompts(tok):
    class Repeats(Task):
        name = "repeats-test"

        def build(self, tokenizer, count, rng):
            return make_split(tokenizer, ["Say cat:"] * count, [" cat"] * count)

    with pytest.raises(ValueError, match="must return 6 distinct prompts; got 6 prompts, 1 distinct"):
        Repeats().generate(tok, 2, seed=0)


# --- SmolLM2 ports ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tok():
    loading = pytest.importorskip("circuitlib.models.loading")
    if not hasattr(loading, "load_tokenizer"):
        pytest.skip("circuitlib.models.loading.load_tokenizer is not available")
    try:
        return loading.load_tokenizer("smollm2-135m")
    except Exception as error:  # the stand-in's files may be missing on this machine
        pytest.skip(f"SmolLM2 tokenizer not available: {error}")


@pytest.mark.slow
def test_smollm2_ports(smol_tok):
    lengths = {}
    for name in TASK_NAMES:
        data = get_task(name).generate(smol_tok, N, seed=0)
        for split in splits(data):
            assert split.tokens.shape[0] == N
            assert all(
                smol_tok.encode(smol_tok.decode([a]), add_special_tokens=False) == [a] for a in split.answers.tolist()
            )
        lengths[name] = data.validation.tokens.shape[1]
    assert lengths == {"acronyms": 11, "ioi": 15, "greater-than": 15}


@pytest.mark.slow
def test_smollm2_greater_than_asks_for_the_tens_digit(smol_tok):
    split, task = get_task("greater-than").generate(smol_tok, N, seed=0).validation, get_task("greater-than")
    digit = [smol_tok.encode(str(d), add_special_tokens=False)[0] for d in range(10)]
    tens = [int(p.split()[6][2]) for p in split.prompts]
    assert max(tens) <= 8
    assert all(p.split()[6].endswith("9") for p in split.prompts)  # the own tens digit is never a later year
    assert task.correct(split, one_hot_logits([digit[t + 1] for t in tens], len(smol_tok))).all()
    assert not task.correct(split, one_hot_logits([digit[t] for t in tens], len(smol_tok))).any()


# --- tasks from a file ---------------------------------------------------------------------

CAPITALS = Path(__file__).resolve().parents[2] / "examples" / "capitals.jsonl"


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def jsonl(rows):
    return [json.dumps(r) for r in rows]


def test_the_example_task_file_makes_seeded_disjoint_splits(tok):
    task = get_task(str(CAPITALS))
    assert task.name == "capitals" and task.default_n == 12
    data = task.generate(tok, 12, seed=0)
    assert [len(s) for s in splits(data)] == [12, 12, 12] and data.test.tokens.shape == (12, 5)
    assert len({p for s in splits(data) for p in s.prompts}) == 36
    rows = {json.loads(x)["prompt"]: json.loads(x)["answer"] for x in CAPITALS.read_text().splitlines()}
    assert [tok.decode([a]) for a in data.test.answers.tolist()] == [rows[p] for p in data.test.prompts]
    assert get_task(CAPITALS).generate(tok, 12, seed=0).test.prompts == data.test.prompts
    assert get_task(CAPITALS).generate(tok, 12, seed=1).test.prompts != data.test.prompts


def test_csv_task_file_and_several_accepted_answers(tok, tmp_path):
    csv_path = write(
        tmp_path,
        "sums.csv",
        ["prompt,answer", "Two plus two is, four", '"One, two,", three', "Three plus one is, four"],
    )
    data = get_task(csv_path).generate(tok, 1, seed=0)
    assert get_task(csv_path).name == "sums" and {p for s in splits(data) for p in s.prompts} == {
        "Two plus two is",
        "One, two,",
        "Three plus one is",
    }
    path = write(
        tmp_path,
        "primes.jsonl",
        jsonl([{"prompt": f"A prime below {k} is", "answer": " 2", "answers": [" 3", " 5"]} for k in (10, 11, 12)]),
    )
    task = get_task(path)
    split = task.generate(tok, 1, seed=0).validation
    assert [tok.decode([c]) for c in split.candidates.tolist()] == [" 2", " 3", " 5"] and split.accepted.all()
    right = [tok.encode(" 5")[0]]
    assert task.correct(split, one_hot_logits(right)).all()
    assert not task.correct(split, one_hot_logits(tok.encode(" 7"))).any()


def test_every_problem_of_a_task_file_is_named_in_one_message(tok, tmp_path):
    path = write(
        tmp_path,
        "bad.jsonl",
        jsonl(
            [
                {"prompt": "The capital of France is", "answer": " Paris"},
                {"prompt": "The capital of Germany is", "answer": " Berlin"},
                {"prompt": "The capital of the United States is", "answer": " Washington"},
                {"prompt": "The capital of France is", "answer": " Paris"},
                {"prompt": "The capital of Burkina Faso is", "answer": " Ouagadougou"},
            ]
        ),
    )
    with pytest.raises(ValueError) as error:
        get_task(path).generate(tok, 2, seed=0)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert "line 4 repeats the prompt of line 1" in message
    assert "3 rows of 5 tokens, 1 row of 7 tokens (line 3), 1 row of 8 tokens (line 5)" in message
    assert "line 5: answer ' Ouagadougou' is 5 tokens ['ĠOu', 'ag', 'ad', 'oug', 'ou'], not one" in message
    assert "6 prompts are needed" in message and "the file has 5 rows; lower n to at most 1" in message


@pytest.mark.parametrize(
    "name, lines, message",
    [
        ("empty.jsonl", [""], "holds no rows"),
        ("broken.jsonl", ['{"prompt": "A", "answer": " b"}', '{"prompt": "A"'], "line 2 is not JSON"),
        ("list.jsonl", ['["A", " b"]'], "line 1 is not a JSON object"),
        (
            "fields.jsonl",
            ['{"prompt": "A", "anser": " b"}'],
            "line 1: unknown field 'anser'.*'answer' must be a non-empty string \\(missing\\)",
        ),
        (
            "types.jsonl",
            ['{"prompt": 3, "answer": " b", "answers": " b"}'],
            "'prompt' must be a non-empty string; 'answers' must be a non-empty list",
        ),
        ("header.csv", ["question,answer", "A, b"], "line 1 must be the header 'prompt,answer'"),
        ("columns.csv", ["prompt,answer", "A, b, c"], "line 2 has 3 values, not 2"),
        ("empty.csv", [""], "holds no rows"),
        ("task.txt", ["A"], "must end in .jsonl or .csv"),
    ],
)
def test_malformed_task_files_are_refused(tmp_path, name, lines, message):
    path = write(tmp_path, name, lines)
    with pytest.raises(ValueError, match=message):
        get_task(path)


def test_missing_task_file_and_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        get_task(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="or give a task file"):
        get_task("capitals")


def test_check_reports_the_prompt_length_without_building(tok):
    assert get_task(CAPITALS).check(tok, 36) == 5
    assert get_task("ioi").check(tok, 3) == 15
    with pytest.raises(ValueError, match="lower n to at most 12"):
        get_task(CAPITALS).check(tok, 39)


@pytest.mark.parametrize("answers", [[], [""], [" 2", 3], "2"])
def test_bad_answers_lists_are_refused(tmp_path, answers):
    path = write(tmp_path, "t.jsonl", jsonl([{"prompt": "A", "answer": " 2", "answers": answers}]))
    with pytest.raises(ValueError, match="line 1: 'answers' must be a non-empty list of non-empty strings"):
        get_task(path)


@pytest.mark.slow
def test_smollm2_acronyms_port(smol_tok):
    assert not is_gpt2_tokenizer(smol_tok)
    data = get_task("acronyms").generate(smol_tok, 250, seed=0)  # 3 x 250 distinct prompts, as the paper's n
    paren = smol_tok.encode(" (", add_special_tokens=False)
    end_of_text = smol_tok.convert_tokens_to_ids("<|endoftext|>")
    for split in splits(data):
        assert split.tokens.shape == (250, 11)
        assert (split.tokens[:, 0] == end_of_text).all()  # not the tokenizer's BOS, "<|im_start|>"
        for prompt, row, answer in zip(split.prompts[:50], split.tokens[:50], split.answers[:50]):
            words = prompt.split()[1:4]
            acronym = "".join(w[0] for w in words)
            letters = [smol_tok.encode(c, add_special_tokens=False) for c in acronym]
            assert smol_tok.encode(" (" + acronym, add_special_tokens=False) == paren + sum(letters, [])
            assert row[1:].tolist() == smol_tok.encode(prompt, add_special_tokens=False)
            assert [answer.item()] == letters[2]
    assert "VPG" not in split_acronyms(smol_tok) and "CJL" in split_acronyms(smol_tok)  # " (", "V", "PG"


@pytest.fixture(scope="module")
def smol_model():
    loading = pytest.importorskip("circuitlib.models.loading")
    try:
        return loading.load_model("smollm2-135m")
    except Exception as error:  # the stand-in's files may be missing on this machine
        pytest.skip(f"SmolLM2 not available: {error}")


@pytest.mark.slow
def test_smollm2_can_do_the_acronyms_port(smol_model):
    """The full stand-in is competent on the port (0.906-0.969 measured at n = 64, seeds 0-4)."""
    model, tokenizer = smol_model
    task = get_task("acronyms")
    data = task.generate(tokenizer, 64, seed=0)
    for split in (data.validation, data.test):
        with torch.inference_mode():
            accuracy = task.correct(split, model(split.tokens, last_only=True)).float().mean().item()
        assert accuracy >= 0.8
