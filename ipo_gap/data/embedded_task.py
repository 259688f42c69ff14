"""The embedded task: a small text world with hidden human preferences (no download needed).

A prompt is an instruction word and 2-5 topic words from a lexicon of a few hundred made-up
words, e.g. ``"explain: kamo tirelu bosa"``. A response is a short sequence of words.
A hidden reward R(x, y) scores a response (`hidden_reward`):

- coverage: +2 per topic word mentioned (divided by the number of topic words);
- order: +1 x (longest run of topic words in the prompt's order) / (number of topic words);
- length: -0.3 per word away from a target that depends on the instruction and topic count;
- repetition: -0.6 per repeated word; off-topic lexicon words: -0.25 each;
- style: +0.6 when the first word is the instruction's preferred opener (one of four courtesy
  words), +0.5 for each of the instruction's two liked filler words present, -0.5 for each
  occurrence of its two disliked fillers (`STYLE`; never stated in the prompt).

The simulated human prefers y1 to y2 with probability sigmoid((R(x,y1) - R(x,y2)) / T).

Behaviour generators of different care (`GENERATORS`) write the responses of D_initial: from
careless (random fillers, wrong order, rambling, repeats) to careful (all topic words in order,
near the target length). Why this task exhibits over-optimisation (Goodhart): the best
responses combine every feature at once (all topic words in order, exact length, no repeats,
the instruction's opener and liked fillers, none of the disliked ones), which no generator does
reliably, so they are rare under the SFT policy that imitates the pooled generators. The
features differ in how easily a small preference model learns them from pairs: style words and
openers are easy (a word-instruction interaction), length is harder (counting) and topic
coverage and repetition hardest (matching words across and within segments). A proxy PM that
learned "more liked fillers is better" but not the length and repetition penalties rewards
responses that repeat liked words or ramble, which generator pairs rarely show: a policy
optimised against it drifts there and the hidden reward falls.

Everything is a deterministic function of the seed (Python's `random.Random` seeded with
strings, never `hash()`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import random
from collections.abc import Callable

import numpy as np

from ipo_gap import hosts, jsonl

INSTRUCTIONS = {"list": (1, 0), "summarize": (1, 1), "explain": (2, 1), "expand": (2, 3)}
# target length in words = a * num_topics + b for INSTRUCTIONS[instruction] = (a, b).
OPENERS = ("please", "sure", "thanks", "okay")
FILLERS = ("the", "and", "also", "very", "so", "then", "maybe", "just", "well", "quite")
# instruction -> (preferred opener, liked fillers, disliked fillers)
STYLE = {
    "list": ("okay", ("then", "also"), ("very", "maybe")),
    "summarize": ("sure", ("so", "just"), ("well", "then")),
    "explain": ("please", ("so", "well"), ("just", "quite")),
    "expand": ("thanks", ("very", "quite"), ("so", "the")),
}
MAX_RESPONSE_WORDS = 12
TEMPERATURE = 0.5

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def make_lexicon(seed: int, size: int = 300) -> list[str]:
    """`size` distinct made-up topic words of 2-3 syllables, a function of `seed`; none is
    one of the task's own words (the opener "sure" is su+re: as a topic word it would be
    charged as a stray word where it opens a response, and count as a topic where a prompt
    lists it)."""
    rng = random.Random(f"lexicon-{seed}")
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    reserved = {*OPENERS, *FILLERS, *INSTRUCTIONS}
    words: set[str] = set()
    while len(words) < size:
        word = "".join(rng.choice(syllables) for _ in range(rng.choice((2, 2, 3))))
        if word not in reserved:
            words.add(word)
    return sorted(words)


@dataclasses.dataclass(frozen=True)
class Prompt:
    instruction: str
    topics: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"{self.instruction}: " + " ".join(self.topics)

    @staticmethod
    def parse(text: str) -> Prompt:
        head, _, rest = text.partition(": ")
        if head not in INSTRUCTIONS or not rest:
            raise ValueError(f"not an embedded-task prompt: {text!r}")
        return Prompt(head, tuple(rest.split()))


def target_length(prompt: Prompt) -> int:
    a, b = INSTRUCTIONS[prompt.instruction]
    return a * len(prompt.topics) + b


def hidden_opener(prompt: Prompt) -> str:
    return STYLE[prompt.instruction][0]


def _longest_ordered_run(topics: tuple[str, ...], words: list[str]) -> int:
    """Length of the longest common subsequence of the topic list and the response."""
    prev = [0] * (len(words) + 1)
    for t in topics:
        cur = [0] * (len(words) + 1)
        for j, w in enumerate(words):
            cur[j + 1] = prev[j] + 1 if t == w else max(prev[j + 1], cur[j])
        prev = cur
    return prev[-1]


def hidden_reward(prompt: Prompt, response: str, lexicon: frozenset[str]) -> float:
    """The hidden human reward R(x, y) (see the module docstring)."""
    words = response.split()
    k = len(prompt.topics)
    mentioned = sum(t in words for t in prompt.topics)
    r = 2.0 * mentioned / k
    r += 1.0 * _longest_ordered_run(prompt.topics, words) / k
    r -= 0.3 * abs(len(words) - target_length(prompt))
    r -= 0.6 * (len(words) - len(set(words)))
    r -= 0.25 * sum(w in lexicon and w not in prompt.topics for w in words)
    if words and words[0] == hidden_opener(prompt):
        r += 0.6
    _, liked, disliked = STYLE[prompt.instruction]
    r += 0.5 * sum(w in words for w in liked)
    r -= 0.5 * sum(w in disliked for w in words)
    return r


# R is linear in these features of (prompt, response): R = REWARD_WEIGHTS . reward_features.
REWARD_FEATURES = (
    "coverage",  # topic words mentioned / number of topic words
    "order",  # longest run of topic words in the prompt's order / number of topic words
    "length_gap",  # |words - target length|
    "repeats",  # words - distinct words
    "off_topic",  # lexicon words that are not topic words
    "opener",  # 1 when the first word is the instruction's preferred opener
    "liked",  # the instruction's liked fillers present
    "disliked",  # occurrences of its disliked fillers
)
REWARD_WEIGHTS = (2.0, 1.0, -0.3, -0.6, -0.25, 0.6, 0.5, -0.5)


def reward_features(prompt: Prompt, response: str, lexicon: frozenset[str]) -> np.ndarray:
    """The features `hidden_reward` weighs (`REWARD_FEATURES`), all readable from the text:
    hidden_reward = REWARD_WEIGHTS . reward_features, up to float rounding."""
    words = response.split()
    k = len(prompt.topics)
    _, liked, disliked = STYLE[prompt.instruction]
    return np.array(
        [
            sum(t in words for t in prompt.topics) / k,
            _longest_ordered_run(prompt.topics, words) / k,
            abs(len(words) - target_length(prompt)),
            len(words) - len(set(words)),
            sum(w in lexicon and w not in prompt.topics for w in words),
            float(bool(words) and words[0] == hidden_opener(prompt)),
            sum(w in words for w in liked),
            sum(w in disliked for w in words),
        ],
        np.float64,
    )


def human_preference(r1: float, r2: float, temperature: float = TEMPERATURE) -> float:
    """P(y1 preferred over y2) = sigmoid((R1 - R2) / T)."""
    z = (r1 - r2) / temperature
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


@dataclasses.dataclass(frozen=True)
class HiddenJudge:
    """The hidden humans judging a policy's responses against fixed baseline responses to the
    same prompts, one per prompt (in a study: the evaluation prompts and the golden baseline's
    samples, as the golden PM judges them).

    Called on token rows (`decode` turns them into texts), it gives per prompt the
    probability that the humans prefer the policy's response, human_preference(R(x, y),
    R(x, y_base)), and the response's hidden reward R(x, y). Their mean is the share of
    human raters who would prefer the policy's responses; p > 1/2 is the humans' majority
    verdict, which a golden PM that always sided with them would give
    (`eval.hidden_majority`).
    """

    reward: Callable[[str, str], float]  # R(prompt, response): `TaskData.reward`
    prompts: tuple[str, ...]
    base: tuple[float, ...]  # R(x, y_base) per prompt
    decode: Callable[[np.ndarray], list[str]]

    @classmethod
    def against(cls, task: TaskData, prompts, base_tokens, decode) -> HiddenJudge:
        base = decode(base_tokens)
        if len(base) != len(prompts):
            raise ValueError(f"{len(base)} baseline responses for {len(prompts)} prompts")
        r = tuple(task.reward(x, y) for x, y in zip(prompts, base, strict=True))
        return cls(task.reward, tuple(prompts), r, decode)

    def __call__(self, y, ym=None) -> tuple[np.ndarray, np.ndarray]:
        texts = self.decode(np.asarray(y))
        if len(texts) != len(self.prompts):
            raise ValueError(f"{len(texts)} responses for {len(self.prompts)} prompts")
        r = np.array([self.reward(x, t) for x, t in zip(self.prompts, texts, strict=True)])
        p = np.array([human_preference(a, b) for a, b in zip(r, self.base, strict=True)])
        return p, r


# ------------------------------------------------------------------------------------------
# Behaviour generators.


@dataclasses.dataclass(frozen=True)
class Generator:
    """A stochastic writer of responses; fields are probabilities / rates of its habits."""

    name: str
    include: float  # each topic word is mentioned with this probability
    keep_order: float  # probability that mentioned topics keep the prompt's order
    fillers: float  # mean number of filler words inserted
    stray: float  # mean number of random lexicon words inserted
    repeat: float  # probability of repeating one word
    length_noise: int  # the response is padded / cut by up to this many words
    opener: float  # probability of starting with the right hidden opener (else a random one)
    style: float  # probability that a filler is one of the instruction's liked fillers


GENERATORS = (
    Generator("careless", 0.45, 0.2, 3.0, 2.0, 0.5, 4, 0.1, 0.1),
    Generator("rambling", 0.75, 0.5, 5.0, 1.0, 0.6, 3, 0.25, 0.3),
    Generator("terse", 0.6, 0.7, 0.3, 0.2, 0.1, 2, 0.25, 0.3),
    Generator("careful", 0.95, 0.9, 1.0, 0.1, 0.05, 1, 0.5, 0.5),
)


def _poisson(rng: random.Random, mean: float) -> int:
    n, p, limit = 0, 1.0, math.exp(-mean)
    while True:
        p *= rng.random()
        if p <= limit:
            return n
        n += 1


def generate(rng: random.Random, gen: Generator, prompt: Prompt, lexicon: list[str]) -> str:
    """One response of generator `gen` to `prompt`."""
    topics = [t for t in prompt.topics if rng.random() < gen.include]
    if rng.random() >= gen.keep_order:
        rng.shuffle(topics)
    words = list(topics)
    liked = STYLE[prompt.instruction][1]

    def filler():
        return rng.choice(liked) if rng.random() < gen.style else rng.choice(FILLERS)

    for _ in range(_poisson(rng, gen.fillers)):
        words.insert(rng.randint(0, len(words)), filler())
    for _ in range(_poisson(rng, gen.stray)):
        words.insert(rng.randint(0, len(words)), rng.choice(lexicon))
    if words and rng.random() < gen.repeat:
        words.insert(rng.randint(0, len(words)), rng.choice(words))
    want = target_length(prompt) + rng.randint(-gen.length_noise, gen.length_noise)
    while len(words) < want:
        words.insert(rng.randint(0, len(words)), filler())
    if len(words) > want and rng.random() < 0.5:
        words = words[: max(want, 1)]
    opener = hidden_opener(prompt) if rng.random() < gen.opener else rng.choice(OPENERS)
    return " ".join([opener, *words][:MAX_RESPONSE_WORDS])


# ------------------------------------------------------------------------------------------
# The dataset.


def task_corpus(pairs: dict[str, list[dict]], prompts: dict[str, list[str]]):
    """Every string of a task's pairs and prompts, splits in sorted order (the tokenizer's
    training text: a fixed order gives the same SentencePiece model, hence the same SHA)."""
    for split in sorted(pairs):
        for p in pairs[split]:
            yield p["prompt"]
            yield p["chosen"]
            yield p["rejected"]
    for split in sorted(prompts):
        yield from prompts[split]


@dataclasses.dataclass
class TaskData:
    """Prompts and labelled pairs as strings, by split.

    pairs[split]: list of dicts {prompt, chosen, rejected, p_human, generators}; `chosen` was
    drawn as the winner from the simulated human (Bernoulli(p_human) over the two orders),
    `p_human` = P(chosen preferred). prompts[split]: prompt strings (RL training prompts,
    evaluation prompts).
    """

    seed: int
    lexicon: list[str]
    pairs: dict[str, list[dict]]
    prompts: dict[str, list[str]]

    def corpus(self):
        """Every string of the task (tokenizer training text), in a fixed order."""
        return task_corpus(self.pairs, self.prompts)

    def reward(self, prompt: str, response: str) -> float:
        return hidden_reward(Prompt.parse(prompt), response, frozenset(self.lexicon))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def random_prompt(rng: random.Random, lexicon: list[str]) -> Prompt:
    k = rng.randint(2, 5)
    return Prompt(rng.choice(sorted(INSTRUCTIONS)), tuple(rng.sample(lexicon, k)))


def make_pairs(rng: random.Random, prompts: list[Prompt], lexicon: list[str]) -> list[dict]:
    lex = frozenset(lexicon)
    out = []
    for prompt in prompts:
        g1, g2 = rng.choice(GENERATORS), rng.choice(GENERATORS)
        y1, y2 = generate(rng, g1, prompt, lexicon), generate(rng, g2, prompt, lexicon)
        p = human_preference(hidden_reward(prompt, y1, lex), hidden_reward(prompt, y2, lex))
        if rng.random() < p:
            out.append(
                {
                    "prompt": prompt.text,
                    "chosen": y1,
                    "rejected": y2,
                    "p_human": p,
                    "generators": [g1.name, g2.name],
                }
            )
        else:
            out.append(
                {
                    "prompt": prompt.text,
                    "chosen": y2,
                    "rejected": y1,
                    "p_human": 1 - p,
                    "generators": [g2.name, g1.name],
                }
            )
    return out


def make_task(
    seed: int,
    *,
    num_train: int,
    num_valid: int,
    num_test: int,
    num_rl_prompts: int,
    num_eval_prompts: int,
) -> TaskData:
    """The task's splits: train/valid/test pairs (human labels), RL and evaluation prompts.

    Prompts of different splits are distinct (no topic tuple repeats across splits).
    """
    lexicon = make_lexicon(seed)
    rng = random.Random(f"task-{seed}")
    sizes = {
        "train": num_train,
        "valid": num_valid,
        "test": num_test,
        "rl": num_rl_prompts,
        "eval": num_eval_prompts,
    }
    seen: set[tuple[str, ...]] = set()
    by_split: dict[str, list[Prompt]] = {}
    for split, n in sizes.items():
        items = []
        while len(items) < n:
            p = random_prompt(rng, lexicon)
            if p.topics not in seen:
                seen.add(p.topics)
                items.append(p)
        by_split[split] = items
    pairs = {s: make_pairs(rng, by_split[s], lexicon) for s in ("train", "valid", "test")}
    prompts = {s: [p.text for p in by_split[s]] for s in ("rl", "eval")}
    return TaskData(seed, lexicon, pairs, prompts)


def load_or_make(path: str | os.PathLike, seed: int, **sizes: int) -> TaskData:
    """The task cached as JSON at `path` (regenerated when missing or made with other sizes)."""
    path = pathlib.Path(path)
    key = {"seed": seed, **sizes}
    if hosts.exists(path):
        try:
            blob = json.loads(path.read_text())
            if blob.get("key") == key:
                return TaskData(**blob["data"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"{path}: not a task file of this code ({type(e).__name__}: {e}); it was cut "
                "or altered (delete it to regenerate the task from its seed)"
            ) from None
    task = make_task(seed, **sizes)
    path.parent.mkdir(parents=True, exist_ok=True)
    jsonl.write_atomic(path, json.dumps({"key": key, "data": task.to_json()}))
    return task


# ------------------------------------------------------------------------------------------
# A reference judge: what the human labels allow a judge that reads the right features.


def fit_logistic(x: np.ndarray, ridge: float = 1e-6, iterations: int = 50) -> np.ndarray:
    """The weights w that maximise sum log sigmoid(x_i . w) - ridge * n / 2 * |w|^2 (a row
    of `x` is winner's features - loser's; no intercept, so the judge is antisymmetric),
    by Newton's method in float64: deterministic, converged to ~1e-10 on the embedded task's
    pairs."""
    x = np.asarray(x, np.float64)
    n, d = x.shape
    lam = ridge * n
    w = np.zeros(d)
    for _ in range(iterations):
        z = x @ w
        s = 0.5 * (1.0 + np.tanh(-0.5 * z))  # sigmoid(-z), stable
        grad = x.T @ s - lam * w
        hess = (x * (s * (1.0 - s))[:, None]).T @ x + lam * np.eye(d)
        step = np.linalg.solve(hess, grad)
        w = w + step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w


def _pair_features(task: TaskData, split: str) -> tuple[np.ndarray, np.ndarray]:
    lex = frozenset(task.lexicon)
    rows = task.pairs[split]
    diff = np.zeros((len(rows), len(REWARD_FEATURES)))
    for i, r in enumerate(rows):
        prompt = Prompt.parse(r["prompt"])
        diff[i] = reward_features(prompt, r["chosen"], lex) - reward_features(
            prompt, r["rejected"], lex
        )
    return diff, np.array([r["p_human"] for r in rows])


def accuracy_vs_hidden_reward(p_human: np.ndarray, judged: np.ndarray) -> float:
    """How often verdicts agree with the hidden reward's own preference on labelled pairs:
    `judged` = P(the human-labelled winner wins) per pair, in {0, 1/2, 1}; the pair's
    `p_human` = P(that winner is preferred) > 1/2 says whether the hidden reward prefers it
    (human labels are samples, so it need not). The golden PM and the feature judge are both
    scored by it."""
    bayes = np.asarray(p_human) > 0.5
    return float(np.mean(np.where(bayes, judged, 1 - judged)))


def feature_judge(task: TaskData) -> dict:
    """A logistic regression on `REWARD_FEATURES` (winner's - loser's), fit to the train
    split's human labels, judged on the test split as the study judges its golden PM: its
    verdict per pair (1: the human-labelled winner, 1/2: a tie, 0: the loser) against the
    human labels and against the hidden reward (p_human > 1/2; Bayes-correct).

    It is a reference for the golden PM trained on the same labels: a judge that is told
    which features matter, but not how much, learns their weights from those labels. Its
    weights estimate REWARD_WEIGHTS / TEMPERATURE (the labels are Bernoulli draws with
    P = sigmoid(dR / T) and dR is linear in the features), and they are reported beside
    them."""
    x_train, _ = _pair_features(task, "train")
    w = fit_logistic(x_train)
    x_test, p_test = _pair_features(task, "test")
    z = x_test @ w
    judged = np.where(z > 0, 1.0, np.where(z < 0, 0.0, 0.5))
    return {
        "features": list(REWARD_FEATURES),
        "weights": [round(float(v), 4) for v in w],
        "true_weights_over_temperature": [v / TEMPERATURE for v in REWARD_WEIGHTS],
        "train_pairs": len(x_train),
        "test_pairs": len(x_test),
        "test_accuracy_vs_human_labels": float(judged.mean()),
        "test_accuracy_vs_hidden_reward": accuracy_vs_hidden_reward(p_test, judged),
    }
