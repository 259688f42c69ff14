"""A tiny synthetic task for smoke runs and the tandem check (until the embedded study task).

The prompt lists 2-5 words; the target response repeats them in reverse order. A preference
between two responses is defined by a hidden score: the number of positions at which the
response agrees with the reversed list, minus a penalty for extra words. It is a stand-in that
exercises the real path (SentencePiece tokenizer, T5 policy, pairwise PM); the study's embedded
task (with behaviour generators and a Goodhart-prone hidden reward) replaces it.
"""

from __future__ import annotations

import random

WORDS = (
    "apple river stone cloud green quick seven amber lemon tiger piano ocean silver "
    "forest candle rocket violet marble winter orange"
).split()  # noqa: SIM905


def make_examples(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """(prompt, reversed-words response) pairs."""
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 5))
        out.append(("reverse: " + " ".join(words), " ".join(reversed(words))))
    return out


def score(prompt: str, response: str) -> float:
    """Hidden quality of a response: matches of the reversed word list minus extra words."""
    target = prompt.split()[1:][::-1]
    got = response.split()
    matches = sum(a == b for a, b in zip(target, got, strict=False))
    return matches - 0.5 * max(0, len(got) - len(target))


def corrupt(rng: random.Random, response: str) -> str:
    """A worse variant of a response, never the response itself: a word dropped, two
    different words swapped, or a word replaced by another."""
    words = response.split()
    kind = rng.randrange(3)
    if kind == 0 and len(words) > 1:
        words.pop(rng.randrange(len(words)))
    elif kind == 1 and len(set(words)) > 1:
        i = rng.randrange(len(words))
        j = rng.choice([k for k, w in enumerate(words) if w != words[i]] or [i])
        words[i], words[j] = words[j], words[i]
    if " ".join(words) == response:  # kind 2, or a swap that found two equal words
        i = rng.randrange(len(words))
        words[i] = rng.choice([w for w in WORDS if w != words[i]])
    return " ".join(words)
