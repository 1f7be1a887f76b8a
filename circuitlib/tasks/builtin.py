"""Task datasets: templated prompts whose next token tests one ability, and the rule for "correct".

Each task turns a tokenizer and a seed into three disjoint splits of the same size (`patching` for
the ablation means, `validation` for the KL and accuracy, `test` held out). Prompts of one task
have the same token length, so that positions line up across the batch.

The tasks of the paper, with GPT-2's tokenizer:

- `acronyms`:     "<|endoftext|>The Cattle Jargon Lumber (CJ" -> "L"         11 tokens (with BOS)
- `ioi`:          "Then, Anna and Mark went to the park. Anna gave a ring to" -> " Mark"   15 tokens
- `greater-than`: "The war lasted from the year 1732 to 17" -> any of "33".."99"          10 tokens

Nothing is hard-coded to GPT-2: word lists are filtered and lengths derived under the tokenizer
given. Ports to other tokenizers:

- acronyms: words must tokenise as " X" + one more token and the first two acronym letters as two
  tokens. With GPT-2's tokenizer nothing else changes: the task is the paper's. With any other
  tokenizer two things change: the whole acronym must be split letter by letter by the tokenizer
  itself (" (A1A2A3" -> " (", "A1", "A2", "A3", as the paper's template reads), and the prompt
  starts with "<|endoftext|>" where the vocabulary has it, else with the tokenizer's BOS. The
  answer is still the third word's initial, one token, which the prompt holds as " C3".
- ioi: unchanged (names, places and objects are filtered to single tokens).
- greater-than: a tokenizer that splits numbers into digits cannot predict a two-digit year in
  one token. The port asks for the tens digit of the end year after start years ending in 9, so
  that every digit is unambiguous: "... from the year 1739 to 17" -> d is correct iff d > 3.
  Start years 1X99 (no later decade) are left out.

Why the ports are made this way, and what they change on the stand-in (measured), is told in the
book's page on models (book/models.md).

Beyond the paper: `ioi-mixed`, IOI as Edge Pruning trains on it: both name orders, Wang et al.'s
templates (those of one token length), and each prompt's counterfactual (`TaskSplit.corrupted`).

To add a task without code, write its prompts and answers into a .jsonl or .csv file and pass
the file's path wherever a task name goes (`get_task`, `--task`; see `circuitlib.tasks.files`).
In code: subclass `Task`, give it a `name`, implement `build` (return `count` distinct prompts
through `make_split`), and `register_task` an instance.
"""

from __future__ import annotations

import bisect
import random
import string
from dataclasses import dataclass

import torch

# ---------------------------------------------------------------------------------------------
# Word lists (our own). Each is filtered under the tokenizer in use, so entries that break a
# task's tokenisation constraint are simply skipped.

# Capitalised words; under GPT-2 most of them tokenise as " X" + one token (" B", "urden").
ACRONYM_WORDS = (
    "Aisle",
    "Aperture",
    "Aroma",
    "Auction",
    "Aversion",
    "Bacteria",
    "Bamboo",
    "Basket",
    "Batch",
    "Batter",
    "Bead",
    "Belly",
    "Bias",
    "Bicycle",
    "Bilateral",
    "Bilingual",
    "Boon",
    "Breeze",
    "Bribe",
    "Bucket",
    "Bully",
    "Bumper",
    "Bunch",
    "Bunk",
    "Burden",
    "Cabbage",
    "Cactus",
    "Cafe",
    "Cage",
    "Cake",
    "Calf",
    "Cane",
    "Cannon",
    "Cargo",
    "Casing",
    "Caste",
    "Cattle",
    "Cement",
    "Censor",
    "Cider",
    "Cobalt",
    "Cone",
    "Cottage",
    "Cradle",
    "Crib",
    "Crop",
    "Crossover",
    "Cuff",
    "Cursor",
    "Dagger",
    "Dancer",
    "Danger",
    "Daughter",
    "Dense",
    "Density",
    "Dental",
    "Dessert",
    "Diameter",
    "Diction",
    "Dime",
    "Diner",
    "Dinner",
    "Dioxide",
    "Ditch",
    "Diverse",
    "Dorm",
    "Dose",
    "Dossier",
    "Drought",
    "Duct",
    "Dummy",
    "Eager",
    "Earning",
    "Eaves",
    "Efficient",
    "Eminent",
    "Eruption",
    "Eternity",
    "Famine",
    "Feat",
    "Fence",
    "Fertility",
    "Fetus",
    "Fiasco",
    "Fictional",
    "Fidelity",
    "Fierce",
    "Fixture",
    "Focal",
    "Fodder",
    "Foil",
    "Folder",
    "Follower",
    "Folly",
    "Fraction",
    "Fructose",
    "Fuse",
    "Gaze",
    "Gestation",
    "Ghetto",
    "Gist",
    "Gland",
    "Gossip",
    "Gown",
    "Graft",
    "Grief",
    "Grit",
    "Grocery",
    "Groom",
    "Gull",
    "Hiatus",
    "Hike",
    "Hinge",
    "Hint",
    "Hose",
    "Humble",
    "Hype",
    "Icing",
    "Jaguar",
    "Jargon",
    "Jelly",
    "Jockey",
    "Joke",
    "Jungle",
    "Jury",
    "Kale",
    "Kernel",
    "Kettle",
    "Kitten",
    "Knee",
    "Lace",
    "Ladder",
    "Laptop",
    "Latch",
    "Lateral",
    "Laughter",
    "Lava",
    "Ledge",
    "Lender",
    "Lighter",
    "Lighthouse",
    "Locker",
    "Loneliness",
    "Longevity",
    "Luggage",
    "Lumber",
    "Lure",
    "Lymph",
    "Mango",
    "Mansion",
    "Mantle",
    "Maternal",
    "Maternity",
    "Mice",
    "Migrant",
    "Miser",
    "Mixture",
    "Moth",
    "Motto",
    "Mound",
    "Mural",
    "Mutation",
    "Muzzle",
    "Nail",
    "Narrow",
    "Nerve",
    "Niece",
    "Noun",
    "Numeric",
    "Nylon",
    "Oasis",
    "Omission",
    "Oven",
    "Ozone",
    "Paddle",
    "Padding",
    "Panda",
    "Pane",
    "Parchment",
    "Pardon",
    "Paternal",
    "Pavement",
    "Pawn",
    "Pencil",
    "Pension",
    "Pest",
    "Piety",
    "Pile",
    "Pinch",
    "Pinnacle",
    "Pint",
    "Pivot",
    "Pledge",
    "Podium",
    "Pony",
    "Pouch",
    "Poultry",
    "Pregnancy",
    "Prow",
    "Puck",
    "Pudding",
    "Puff",
    "Racket",
    "Railing",
    "Rake",
    "Ransom",
    "Ration",
    "Rental",
    "Rider",
    "Rink",
    "Rival",
    "Rivalry",
    "Rope",
    "Roster",
    "Rotation",
    "Routine",
    "Ruler",
    "Saddle",
    "Sailing",
    "Scent",
    "Sibling",
    "Sill",
    "Sincerity",
    "Sled",
    "Sleeve",
    "Sock",
    "Sorrow",
    "Surgical",
    "Tactic",
    "Tally",
    "Tandem",
    "Tangle",
    "Tendon",
    "Tension",
    "Tether",
    "Tidal",
    "Tissue",
    "Tolerance",
    "Toxin",
    "Tract",
    "Tractor",
    "Trench",
    "Tribute",
    "Trophy",
    "Trough",
    "Tuna",
    "Umpire",
    "Uprising",
    "Vague",
    "Vandal",
    "Vantage",
    "Vascular",
    "Vault",
    "Vendor",
    "Vessel",
    "Veto",
    "Viability",
    "Vintage",
    "Vivid",
    "Vocal",
    "Vodka",
    "Wagon",
    "Widespread",
    "Worthy",
    "Wreck",
    "Wrench",
    "Wrist",
    "Yacht",
    "Yarn",
    "Yawn",
    "Yield",
    "Zebra",
    "Zinc",
    "Zipper",
    "Zodiac",
)

IOI_NAMES = (
    "Aaron",
    "Adam",
    "Alan",
    "Albert",
    "Alex",
    "Alice",
    "Amanda",
    "Amy",
    "Andrea",
    "Andrew",
    "Angela",
    "Anna",
    "Anne",
    "Anthony",
    "Arthur",
    "Barbara",
    "Ben",
    "Betty",
    "Bill",
    "Bob",
    "Brian",
    "Bruce",
    "Carl",
    "Carol",
    "Charles",
    "Charlie",
    "Chris",
    "Christian",
    "Claire",
    "Craig",
    "Daniel",
    "Dave",
    "David",
    "Dennis",
    "Diana",
    "Donald",
    "Douglas",
    "Edward",
    "Elizabeth",
    "Emily",
    "Emma",
    "Eric",
    "Eva",
    "Frank",
    "Fred",
    "Gary",
    "George",
    "Grace",
    "Greg",
    "Hannah",
    "Harry",
    "Helen",
    "Henry",
    "Jack",
    "Jacob",
    "James",
    "Jane",
    "Jason",
    "Jeff",
    "Jennifer",
    "Jerry",
    "Jessica",
    "Jim",
    "Joe",
    "John",
    "Joseph",
    "Julia",
    "Julie",
    "Justin",
    "Karen",
    "Kate",
    "Keith",
    "Kelly",
    "Kevin",
    "Laura",
    "Linda",
    "Lisa",
    "Louis",
    "Lucy",
    "Mark",
    "Martin",
    "Mary",
    "Matt",
    "Max",
    "Michael",
    "Michelle",
    "Mike",
    "Nancy",
    "Nick",
    "Oliver",
    "Patrick",
    "Paul",
    "Peter",
    "Rachel",
    "Richard",
    "Robert",
    "Roger",
    "Rose",
    "Ryan",
    "Sam",
    "Sarah",
    "Scott",
    "Simon",
    "Steve",
    "Susan",
    "Thomas",
    "Tom",
    "Tony",
    "Victoria",
    "William",
)
IOI_PLACES = ("store", "park", "school", "hospital", "office", "station", "restaurant", "garden")
IOI_OBJECTS = ("book", "drink", "ring", "gift", "letter", "ball", "key", "phone")

# Things that can last from one year to another.
GREATER_THAN_NOUNS = (
    "accord",
    "affair",
    "agreement",
    "alliance",
    "assault",
    "attack",
    "auction",
    "ban",
    "battle",
    "blockade",
    "boom",
    "boycott",
    "campaign",
    "career",
    "celebration",
    "ceremony",
    "championship",
    "collapse",
    "competition",
    "conference",
    "conflict",
    "conquest",
    "contract",
    "controversy",
    "course",
    "crisis",
    "crusade",
    "debate",
    "decline",
    "deployment",
    "depression",
    "dictatorship",
    "dispute",
    "drought",
    "dynasty",
    "effort",
    "election",
    "embargo",
    "emergency",
    "empire",
    "epidemic",
    "era",
    "evacuation",
    "exhibition",
    "exile",
    "expansion",
    "expedition",
    "experiment",
    "famine",
    "festival",
    "fight",
    "flight",
    "flood",
    "friendship",
    "game",
    "government",
    "hearing",
    "hunt",
    "imprisonment",
    "inquiry",
    "internship",
    "investigation",
    "journey",
    "lawsuit",
    "lease",
    "lockdown",
    "marriage",
    "match",
    "meeting",
    "migration",
    "mission",
    "monopoly",
    "movement",
    "negotiation",
    "occupation",
    "offensive",
    "operation",
    "outbreak",
    "partnership",
    "period",
    "pilgrimage",
    "plague",
    "presidency",
    "process",
    "program",
    "project",
    "protest",
    "purge",
    "quarantine",
    "raid",
    "rebellion",
    "recession",
    "reform",
    "regime",
    "reign",
    "relationship",
    "renovation",
    "residency",
    "restoration",
    "revolt",
    "revolution",
    "riot",
    "rivalry",
    "rule",
    "sanction",
    "season",
    "session",
    "settlement",
    "siege",
    "show",
    "strike",
    "struggle",
    "study",
    "subscription",
    "surge",
    "survey",
    "suspension",
    "tenure",
    "term",
    "tour",
    "tournament",
    "trade",
    "trial",
    "tyranny",
    "upheaval",
    "uprising",
    "vacation",
    "voyage",
    "war",
    "warranty",
    "workshop",
)

# ---------------------------------------------------------------------------------------------
# Ground-truth (manually identified) heads of GPT-2 Small, as "layer.head".

ACRONYMS_HEADS = ("8.11", "10.10", "9.9", "11.4", "4.11", "1.0", "2.2", "5.8")
GREATER_THAN_HEADS = ("5.1", "5.5", "6.1", "6.9", "7.10", "8.8", "8.11", "9.1")
IOI_HEADS_AUTHORS = (
    "9.9",
    "9.6",
    "10.0",  # name movers
    "10.7",
    "11.10",  # negative name movers
    "9.0",
    "9.7",
    "10.1",
    "10.2",
    "10.6",
    "10.10",
    "11.2",
    "11.9",  # backup name movers
    "7.3",
    "7.9",
    "8.6",
    "8.10",  # S-inhibition
    "5.5",
    "6.9",  # induction
    "2.2",
    "4.11",  # previous token
    "0.1",
    "3.0",  # duplicate token
)
IOI_HEADS_WANG2022 = IOI_HEADS_AUTHORS + ("5.8", "5.9", "0.10")  # + induction, duplicate token

# ---------------------------------------------------------------------------------------------
# Data containers

SPLITS = ("validation", "test")  # the splits a circuit is measured on (`patching` only makes the means)


@dataclass
class TaskSplit:
    """n prompts of one token length, and what counts as a correct next token.

    prompts:    the n prompt strings (without BOS)
    tokens:     LongTensor [n, seq], BOS first where the task uses one
    answers:    LongTensor [n], the canonical correct next token
    candidates: LongTensor [k] or None; for tasks with several correct answers (greater-than):
                the tokens an answer can be
    accepted:   BoolTensor [n, k] or None; accepted[i, j] says whether candidates[j] is correct for
                prompt i. Without candidates, only `answers` is correct.
    corrupted:  LongTensor [n, seq] or None: prompt i's counterfactual (the same sentence with other
                names), for interchange ablation (Edge Pruning's corrupted mode); None: the task
                has none
    """

    prompts: list[str]
    tokens: torch.Tensor
    answers: torch.Tensor
    candidates: torch.Tensor | None = None
    accepted: torch.Tensor | None = None
    corrupted: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, rows: slice) -> TaskSplit:
        accepted = None if self.accepted is None else self.accepted[rows]
        corrupted = None if self.corrupted is None else self.corrupted[rows]
        return TaskSplit(
            self.prompts[rows], self.tokens[rows], self.answers[rows], self.candidates, accepted, corrupted
        )


@dataclass(frozen=True)
class TaskData:
    """Three disjoint splits of the same size: D_a (`patching`), D_v (`validation`), `test`."""

    patching: TaskSplit
    validation: TaskSplit
    test: TaskSplit


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def make_split(
    tokenizer,
    prompts: list[str],
    answers: list[str],
    bos: bool = False,
    *,
    candidates: list[str] | None = None,
    accepted: torch.Tensor | None = None,
    corrupted: list[str] | None = None,
) -> TaskSplit:
    """Tokenise prompts and answers into a `TaskSplit`, checking what the method relies on.

    prompts:    n strings that must all have the same token length
    answers:    n strings, each exactly one token (mind the leading space: " Mary")
    bos:        prepend the tokenizer's BOS token
    candidates: k single-token strings, with accepted BoolTensor [n, k] (see `TaskSplit`)
    corrupted:  n counterfactual prompts, each of its prompt's token length
    """
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt")
    if len(answers) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers; pass one answer per prompt")
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    lengths = {len(x) for x in ids}
    if len(lengths) > 1:
        example = next(p for p, x in zip(prompts, ids) if len(x) != len(ids[0]))
        raise ValueError(
            f"prompts must all have the same token length so that positions line up across the batch; "
            f"found lengths {sorted(lengths)} (e.g. {prompts[0]!r} has {len(ids[0])} tokens, {example!r} has "
            f"{len(_encode(tokenizer, example))}); use words that tokenise to a fixed number of tokens"
        )
    if bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("bos=True but the tokenizer has no BOS token; pass bos=False")
        ids = [[tokenizer.bos_token_id] + x for x in ids]
    split = TaskSplit(
        list(prompts),
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(_single_tokens(tokenizer, answers, "answers"), dtype=torch.long),
    )
    if (candidates is None) != (accepted is None):
        raise ValueError("pass candidates and accepted together, or neither")
    if candidates is not None:
        if tuple(accepted.shape) != (len(prompts), len(candidates)):
            raise ValueError(
                f"accepted must have shape [n prompts, k candidates] = [{len(prompts)}, "
                f"{len(candidates)}]; got {list(accepted.shape)}"
            )
        split.candidates = torch.tensor(_single_tokens(tokenizer, candidates, "candidates"), dtype=torch.long)
        split.accepted = accepted.bool()
    if corrupted is not None:
        other = make_split(tokenizer, corrupted, answers, bos)
        if len(other) != len(prompts) or other.tokens.shape != split.tokens.shape:
            raise ValueError(
                f"corrupted prompts must be one per prompt and of the prompts' token length "
                f"{split.tokens.shape[1]}; got {len(other)} of length {other.tokens.shape[1]}"
            )
        split.corrupted = other.tokens
    return split


def _single_tokens(tokenizer, texts: list[str], what: str) -> list[int]:
    """The one token of each text, or a ValueError naming the first text that is not one token."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    for text, x in zip(texts, ids):
        if len(x) != 1:
            pieces = tokenizer.convert_ids_to_tokens(x)
            raise ValueError(
                f"{what} must each be one token, but {text!r} tokenises to {len(x)} tokens "
                f"{pieces}; pick single-token {what} (mind the leading space, e.g. ' Mary')"
            )
    return [x[0] for x in ids]


def one_token_words(tokenizer, words: tuple[str, ...], prefix: str = " ") -> list[str]:
    """The words that are a single token after `prefix` (a leading space by default)."""
    ids = tokenizer([prefix + w for w in words], add_special_tokens=False)["input_ids"]
    return [w for w, x in zip(words, ids) if len(x) == 1]


def _sample_indices(rng: random.Random, n_possible: int, count: int, task: str) -> list[int]:
    """`count` distinct indices into the `n_possible` prompts a task can make, in random order."""
    if count > n_possible:
        raise ValueError(
            f"{task}: asked for {count} distinct prompts (3 splits of n) but this tokenizer allows "
            f"only {n_possible}; lower n to at most {n_possible // 3}"
        )
    return rng.sample(range(n_possible), count)


# ---------------------------------------------------------------------------------------------
# Tasks


class Task:
    """A single-token prediction task. Subclasses set `name`, `ground_truths` and implement `build`.

    default_n:     prompts per split when none is asked for (the paper's batch size)
    ground_truths: variant -> heads of GPT-2 Small ("layer.head"); the first variant is the default.
    """

    name: str = ""
    default_n: int = 100
    ground_truths: dict[str, tuple[str, ...]] = {}

    def build(self, tokenizer, count: int, rng: random.Random) -> TaskSplit:
        """`count` distinct prompts in random order, drawn with `rng`."""
        raise NotImplementedError

    def check(self, tokenizer, count: int) -> int:
        """Check, cheaply and before any model work, that the task works under `tokenizer`; its prompt length.

        The default builds one prompt (a port that cannot work fails here); whether `count`
        distinct prompts exist is checked when `build` starts. A task that can say more sooner
        (a task file: every row, and the number of rows) overrides this.
        """
        return self.build(tokenizer, 1, random.Random(0)).tokens.shape[1]

    def generate(self, tokenizer, n: int, seed: int, n_test: int | None = None) -> TaskData:
        """Three disjoint splits: n patching, n validation and `n_test` (default n) held-out test prompts.

        The same seed and sizes give the same data. Searching a circuit costs in proportion to n;
        measuring one is cheap, so a study may hold out more test prompts than it searches with.
        """
        n_test = n if n_test is None else n_test
        for name, value in (("n", n), ("n_test", n_test)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int (prompts per split); got {value!r}")
        total = 2 * n + n_test
        split = self.build(tokenizer, total, random.Random(seed))
        if len(split) != total or len(set(split.prompts)) != total:
            raise ValueError(
                f"{self.name}: build() must return {total} distinct prompts; got {len(split)} prompts, "
                f"{len(set(split.prompts))} distinct"
            )
        return TaskData(split[:n], split[n : 2 * n], split[2 * n :])

    def correct(self, split: TaskSplit, last_logits: torch.Tensor) -> torch.Tensor:
        """BoolTensor [n]: is the argmax of last_logits [n, vocab] a correct next token?"""
        if last_logits.ndim != 2 or len(last_logits) != len(split):
            raise ValueError(
                f"last_logits must have shape [n, vocab] with n = {len(split)} (the logits at the "
                f"last position only); got {list(last_logits.shape)}"
            )
        predicted = last_logits.argmax(-1)  # [n]
        if split.candidates is None:
            return predicted == split.answers.to(predicted.device)
        is_candidate = predicted[:, None] == split.candidates.to(predicted.device)  # [n, k]
        return (is_candidate & split.accepted.to(predicted.device)).any(-1)

    def ground_truth(self, model_name: str, variant: str | None = None) -> list[str]:
        """The manually identified heads ("layer.head") of `model_name`; only GPT-2 Small has them."""
        if model_name != "gpt2":
            raise ValueError(
                f"ground-truth heads exist only for GPT-2 Small ('gpt2'), the model the circuit "
                f"papers studied; got model {model_name!r}"
            )
        if not self.ground_truths:
            raise ValueError(f"task {self.name!r} has no ground-truth heads")
        variant = variant or next(iter(self.ground_truths))
        if variant not in self.ground_truths:
            raise ValueError(
                f"unknown ground-truth variant {variant!r} for task {self.name!r}; "
                f"choose one of {', '.join(self.ground_truths)}"
            )
        return list(self.ground_truths[variant])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Acronyms(Task):
    """ "The C1T1 C2T2 C3T3 (A1A2" -> A3: the third letter of a three-letter acronym.

    Each word is a capital-letter token plus one more token (" B" "urden"); A1 and A2 are two
    separate letter tokens after " ("; A3 is a bare letter token. The prompt starts with
    "<|endoftext|>" (GPT-2's BOS; the document separator of SmolLM2's pretraining), or with the
    tokenizer's BOS where the vocabulary has no "<|endoftext|>", or with nothing if it has neither.
    With a tokenizer other than GPT-2's, the whole acronym must also be split letter by letter by
    that tokenizer, " (A1A2A3" -> " (", "A1", "A2", "A3" (see the module docstring).
    Correct: the argmax is A3.
    """

    name = "acronyms"
    default_n = 250
    ground_truths = {"authors": ACRONYMS_HEADS}

    def build(self, tokenizer, count, rng):
        words = letter_plus_one_token_words(tokenizer)
        if not words:
            raise ValueError(
                "acronyms cannot be ported to this tokenizer: none of the words tokenises as a "
                "capital-letter token plus one more token"
            )
        letter_pairs = split_letter_pairs(tokenizer)
        pairs = [(a, b) for a in words for b in words if a != b and a[0] + b[0] in letter_pairs]
        # The words that may come third after each letter pair, in list order: all of them with
        # GPT-2's tokenizer (the paper's task), else those whose initial keeps the acronym split.
        acronyms = None if is_gpt2_tokenizer(tokenizer) else split_acronyms(tokenizer)
        thirds = {xy: [w for w in words if acronyms is None or xy + w[0] in acronyms] for xy in letter_pairs}
        offsets, total = [], 0  # pair k owns the indices offsets[k] .. offsets[k+1] - 1
        for a, b in pairs:
            offsets.append(total)
            allowed = thirds[a[0] + b[0]]
            total += len(allowed) - (a in allowed) - (b in allowed)
        prompts, answers = [], []
        for index in _sample_indices(rng, total, count, self.name):
            k = bisect.bisect_right(offsets, index) - 1  # the last pair starting at or before index
            first, second = pairs[k]
            third = [w for w in thirds[first[0] + second[0]] if w not in (first, second)][index - offsets[k]]
            prompts.append(f"The {first} {second} {third} ({first[0]}{second[0]}")
            answers.append(third[0])
        split = make_split(tokenizer, prompts, answers)
        start = _acronyms_start_token(tokenizer)
        if start is not None:
            split.tokens = torch.cat([torch.full((len(split), 1), start, dtype=torch.long), split.tokens], dim=1)
        return split


def is_gpt2_tokenizer(tokenizer) -> bool:
    """Whether this is GPT-2's tokenizer (50,257 tokens, "<|endoftext|>" last), under which tasks stay the paper's."""
    return len(tokenizer) == 50257 and tokenizer.convert_tokens_to_ids("<|endoftext|>") == 50256


def _acronyms_start_token(tokenizer) -> int | None:
    """The token before an acronyms prompt: "<|endoftext|>" if the vocabulary has it, else BOS, else None."""
    vocab = tokenizer.get_vocab()
    return vocab["<|endoftext|>"] if "<|endoftext|>" in vocab else tokenizer.bos_token_id


def split_acronyms(tokenizer) -> set[str]:
    """Letter triples "XYZ" that this tokenizer splits letter by letter after " (": " (", "X", "Y", "Z"."""
    triples = [
        a + b + c for a in string.ascii_uppercase for b in string.ascii_uppercase for c in string.ascii_uppercase
    ]
    paren = _encode(tokenizer, " (")
    letter = {x: _encode(tokenizer, x) for x in string.ascii_uppercase}
    ids = tokenizer([" (" + t for t in triples], add_special_tokens=False)["input_ids"]
    return {t for t, x in zip(triples, ids) if x == paren + letter[t[0]] + letter[t[1]] + letter[t[2]]}


def letter_plus_one_token_words(tokenizer) -> list[str]:
    """Words that tokenise as " X" + one token, where " X" and "X" are single tokens."""
    letters = {
        x for x in string.ascii_uppercase if len(_encode(tokenizer, " " + x)) == 1 and len(_encode(tokenizer, x)) == 1
    }
    ids = tokenizer([" " + w for w in ACRONYM_WORDS], add_special_tokens=False)["input_ids"]
    return [
        w
        for w, x in zip(ACRONYM_WORDS, ids)
        if w[0] in letters and len(x) == 2 and x[0] == _encode(tokenizer, " " + w[0])[0]
    ]


def split_letter_pairs(tokenizer) -> set[str]:
    """Letter pairs "XY" that stay two tokens after " (": " (XY" -> " (", "X", "Y"."""
    pairs = [a + b for a in string.ascii_uppercase for b in string.ascii_uppercase]
    paren = _encode(tokenizer, " (")
    ids = tokenizer([" (" + p for p in pairs], add_special_tokens=False)["input_ids"]
    return {
        p
        for p, x in zip(pairs, ids)
        if x == paren + _encode(tokenizer, p[0]) + _encode(tokenizer, p[1]) and len(x) == len(paren) + 2
    }


class IOI(Task):
    """ "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to" -> " [A]".

    Names, places and objects are single tokens after a space; A != B. No BOS.
    Correct: the argmax is the indirect object " [A]".
    """

    name = "ioi"
    default_n = 150
    ground_truths = {"authors": IOI_HEADS_AUTHORS, "wang2022": IOI_HEADS_WANG2022}

    def build(self, tokenizer, count, rng):
        names = one_token_words(tokenizer, IOI_NAMES)
        places = one_token_words(tokenizer, IOI_PLACES)
        objects = one_token_words(tokenizer, IOI_OBJECTS)
        n_possible = len(names) * (len(names) - 1) * len(places) * len(objects)
        prompts, answers = [], []
        for index in _sample_indices(rng, n_possible, count, self.name):
            index, obj = divmod(index, len(objects))
            index, place = divmod(index, len(places))
            a, b = divmod(index, len(names) - 1)
            b += b >= a  # B ranges over the names other than A
            A, B = names[a], names[b]
            prompts.append(f"Then, {B} and {A} went to the {places[place]}. {B} gave a {objects[obj]} to")
            answers.append(" " + A)
        return make_split(tokenizer, prompts, answers)


def ioi_subject_tokens(tokenizer, split: TaskSplit) -> torch.Tensor:
    """LongTensor [n]: the subject's name token of each IOI prompt (the name that is not the answer).

    Read off the prompt's tokens, whatever the template: of the name tokens in the prompt
    (IOI_NAMES after a space), the one that is not the indirect object. A prompt with other than
    exactly one such name is refused.
    """
    names = set(_single_tokens(tokenizer, [" " + w for w in one_token_words(tokenizer, IOI_NAMES)], "names"))
    subjects = []
    for i, (row, answer) in enumerate(zip(split.tokens.tolist(), split.answers.tolist())):
        others = {t for t in row if t in names and t != answer}
        if len(others) != 1 or answer not in row:
            raise ValueError(
                f"IOI prompt {i} ({split.prompts[i]!r}) does not name its indirect object and exactly "
                f"one other name; the subject token is defined only for IOI prompts"
            )
        subjects.append(others.pop())
    return torch.tensor(subjects, dtype=torch.long)


def letter_tokens(tokenizer, prefixes: tuple[str, ...] = ("",)) -> torch.Tensor:
    """LongTensor [k]: the capital letters "A".."Z", written after each of `prefixes`, that are one token each
    (by default the bare letters: the acronyms task's answers)."""
    ids = tokenizer([p + x for p in prefixes for x in string.ascii_uppercase], add_special_tokens=False)["input_ids"]
    return torch.tensor([x[0] for x in ids if len(x) == 1], dtype=torch.long)


# The IOI templates of Wang et al. (2022) as Edge Pruning trains on them (their `baba_templates`;
# the ABBA order swaps the first two names). The answer, " {A}", is left off each.
IOI_TEMPLATES = (
    "Then, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
    "Then, {B} and {A} had a lot of fun at the {PLACE}. {B} gave a {OBJECT} to",
    "Then, {B} and {A} were working at the {PLACE}. {B} decided to give a {OBJECT} to",
    "Then, {B} and {A} were thinking about going to the {PLACE}. {B} wanted to give a {OBJECT} to",
    "Then, {B} and {A} had a long argument, and afterwards {B} said to",
    "After {B} and {A} went to the {PLACE}, {B} gave a {OBJECT} to",
    "When {B} and {A} got a {OBJECT} at the {PLACE}, {B} decided to give it to",
    "When {B} and {A} got a {OBJECT} at the {PLACE}, {B} decided to give the {OBJECT} to",
    "While {B} and {A} were working at the {PLACE}, {B} gave a {OBJECT} to",
    "While {B} and {A} were commuting to the {PLACE}, {B} gave a {OBJECT} to",
    "After the lunch, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
    "Afterwards, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
    "Then, {B} and {A} had a long argument. Afterwards {B} said to",
    "The {PLACE} {B} and {A} went to had a {OBJECT}. {B} gave it to",
    "Friends {B} and {A} found a {OBJECT} at the {PLACE}. {B} gave it to",
)


class IOIMixed(Task):
    """IOI as Edge Pruning trains on it: both name orders and many templates, each prompt paired
    with a counterfactual.

    BABA: "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to" -> " [A]"
    ABBA: "Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to" -> " [A]"
    Templates: those of `IOI_TEMPLATES` (Wang et al.'s 15, in both orders) of the one token
    length most of them share under the tokenizer (a split must have one length; ties: the
    shorter), so 6 of the 15 with GPT-2's and with SmolLM2's tokenizer (15 tokens). Corrupted
    (`TaskSplit.corrupted`): the same sentence with its three names replaced by three other
    distinct names, as Wang et al.'s ABC distribution ("[C] and [D] went ... [E] gave ... to"):
    no name is repeated, so nothing tells the indirect object (Edge Pruning's own
    `corr_ioi_sentences` come in its data.zip, which the public snapshot read here does not hold,
    so that their corruption is this one is not checked). Names, places and objects are
    single tokens after a space (those of `ioi`); A != B. No BOS.
    Correct: the argmax is the indirect object " [A]".
    """

    name = "ioi-mixed"
    default_n = 150
    ground_truths = {"authors": IOI_HEADS_AUTHORS, "wang2022": IOI_HEADS_WANG2022}

    @staticmethod
    def templates(tokenizer) -> list[str]:
        """The templates used with this tokenizer, BABA order (the ABBA ones swap the first two names)."""
        names = one_token_words(tokenizer, IOI_NAMES)
        fill = dict(
            A=names[0],
            B=names[1],
            PLACE=one_token_words(tokenizer, IOI_PLACES)[0],
            OBJECT=one_token_words(tokenizer, IOI_OBJECTS)[0],
        )  # any single-token words: the same lengths
        length = {t: len(_encode(tokenizer, t.format(**fill))) for t in IOI_TEMPLATES}
        counts: dict[int, int] = {}
        for n in length.values():
            counts[n] = counts.get(n, 0) + 1
        best = min(counts, key=lambda n: (-counts[n], n))
        return [t for t in IOI_TEMPLATES if length[t] == best]

    def build(self, tokenizer, count, rng):
        names = one_token_words(tokenizer, IOI_NAMES)
        places = one_token_words(tokenizer, IOI_PLACES)
        objects = one_token_words(tokenizer, IOI_OBJECTS)
        templates = self.templates(tokenizer)
        n_possible = 2 * len(templates) * len(names) * (len(names) - 1) * len(places) * len(objects)
        prompts, answers, corrupted = [], [], []
        for index in _sample_indices(rng, n_possible, count, self.name):
            index, obj = divmod(index, len(objects))
            index, place = divmod(index, len(places))
            index, pair = divmod(index, len(names) * (len(names) - 1))
            template, abba = divmod(index, 2)
            a, b = divmod(pair, len(names) - 1)
            b += b >= a  # B ranges over the names other than A
            text = templates[template]
            if abba:
                text = text.replace("{B} and {A}", "{A} and {B}", 1)
            where = dict(PLACE=places[place], OBJECT=objects[obj])
            prompts.append(text.format(A=names[a], B=names[b], **where))
            answers.append(" " + names[a])
            c, d, e = rng.sample([x for i, x in enumerate(names) if i not in (a, b)], 3)
            first, second = ("{A}", "{B}") if abba else ("{B}", "{A}")  # the name slots, in reading order
            abc = text.replace(first, "{C}", 1).replace(second, "{D}", 1).replace("{B}", "{E}", 1)
            corrupted.append(abc.format(C=c, D=d, E=e, **where))
        return make_split(tokenizer, prompts, answers, corrupted=corrupted)


class GreaterThan(Task):
    """ "The [noun] lasted from the year XXYY to XX" -> a year ending greater than YY.

    Centuries XX in 11..17; start years XX02..XX98 that tokenise as " XX" + the tokens of "YY",
    without the first and the last such year of each century; nouns are single tokens. No BOS.
    Correct: the argmax is a year-ending token whose value is strictly greater than the start's.
    With GPT-2 the year ending is one two-digit token ("33".."99" for YY = 32). With a tokenizer
    that splits digits it is the tens digit, after start years ending in 9 ("4".."9" for YY = 39;
    see the module docstring).
    `answers` holds the smallest correct value.

    What accuracy cannot show: the largest year ending ("99" with GPT-2, "9" in the digit port)
    is later than every start year the task asks about, so a model that always answers it is
    right on every prompt of any prompt set; a start year with no later ending would have no
    correct answer at all, so no choice of start years changes this. The same constant answer
    also has the largest probability difference (1 on every prompt; Hanna et al.'s measure,
    `metrics.probability_difference`). What a constant answer cannot match is the full model:
    the measures relative to it, the normalised faithfulness of the probability difference
    (`metrics.normalised_faithfulness`, with the empty circuit as zero: a constant answer lands
    far from 1, above it when the full model is less sure) and the KL to the full model, tell a
    circuit that keeps the model's computation from one that outputs a late year. Report an
    accuracy beside the best constant answer's (`metrics.best_constant_answer`).
    """

    name = "greater-than"
    default_n = 250
    ground_truths = {"authors": GREATER_THAN_HEADS}

    def build(self, tokenizer, count, rng):
        endings, value_of = _year_endings(tokenizer)
        nouns = one_token_words(tokenizer, GREATER_THAN_NOUNS)
        years = _start_years(tokenizer, value_of, len(endings))
        prompts, answers, thresholds = [], [], []
        for index in _sample_indices(rng, len(nouns) * len(years), count, self.name):
            noun, (century, yy) = nouns[index // len(years)], years[index % len(years)]
            prompts.append(f"The {noun} lasted from the year {century}{yy:02d} to {century}")
            thresholds.append(value_of(yy))
            answers.append(endings[value_of(yy) + 1])
        accepted = torch.arange(len(endings))[None, :] > torch.tensor(thresholds)[:, None]  # [n, k]
        return make_split(tokenizer, prompts, answers, candidates=endings, accepted=accepted)


def _year_endings(tokenizer):
    """The single tokens a year ending can be, indexed by value, and value_of(YY) for a start year."""
    two_digit = [f"{v:02d}" for v in range(100)]
    ids = tokenizer(two_digit, add_special_tokens=False)["input_ids"]
    if all(len(x) == 1 for x in ids):
        return two_digit, lambda yy: yy
    digits = [str(d) for d in range(10)]
    digit_ids = [_encode(tokenizer, d) for d in digits]
    if all(len(x) == 1 for x in digit_ids) and all(
        x == digit_ids[v // 10] + digit_ids[v % 10] for v, x in enumerate(ids)
    ):
        return digits, lambda yy: yy // 10
    raise ValueError(
        "greater-than cannot be ported to this tokenizer: two-digit year endings such as '32' are "
        "neither single tokens nor two single-digit tokens"
    )


def _start_years(tokenizer, value_of, n_values: int) -> list[tuple[int, int]]:
    """(century, YY) pairs: " XXYY" tokenises as " XX" + "YY" and some ending is greater than YY.

    For the tens-digit port (n_values == 10) only YY ending in 9, so that no digit is ambiguous.
    """
    years = []
    for century in range(11, 18):
        valid = [
            yy
            for yy in range(2, 99)
            if value_of(yy) + 1 < n_values
            and (n_values != 10 or yy % 10 == 9)
            and _encode(tokenizer, f" {century}{yy:02d}")
            == _encode(tokenizer, f" {century}") + _encode(tokenizer, f"{yy:02d}")
        ]
        years += [(century, yy) for yy in valid[1:-1]]
    return years
