"""Where policy batches come from: offline datasets, online sampling, and log replay.

Every source returns, for a step, the same thing: a dict of numpy arrays in the order-log
schema (`order_log.pair_schema`: prompt, y_w, y_l with masks, judge_prob, logp_w, logp_l),
which the training loop logs and turns into a `PairBatch`. So online and offline training
differ only in this module, as the paper's tandem identity requires.

Determinism: what a source returns for step s is a function of (seed, s) and, for online
sources, of the policy's parameters at step s: the prompt order derives from (seed, epoch),
the sampling key is fold_in(key, s). A resumed run therefore needs only the step as its data
position.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from ipo_gap import preference, sampling
from ipo_gap.data.order_log import OrderLog, ReplayError

Batch = dict[str, np.ndarray]
PAIR_FIELDS = ("prompt", "prompt_mask", "y_w", "y_w_mask", "y_l", "y_l_mask")


class Source(Protocol):
    def batch(self, step: int, policy=None) -> Batch: ...


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of n examples in one epoch, a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def schedule_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Example indices of a step: positions step*B .. step*B+B-1 of the epoch-shuffled stream."""
    pos = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(pos, n)
    perms = {e: epoch_permutation(seed, int(e), n) for e in np.unique(epochs)}
    return np.array([perms[e][o] for e, o in zip(epochs, offsets, strict=True)])


class OfflineSource:
    """A fixed dataset of labelled pairs, read in seeded epoch-shuffled order."""

    def __init__(self, data: Batch, *, batch_size: int, seed: int):
        missing = [f for f in PAIR_FIELDS if f not in data]
        if missing:
            raise ValueError(f"offline dataset lacks fields {missing}")
        sizes = {k: len(v) for k, v in data.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"offline dataset fields disagree on the number of rows: {sizes}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.num_examples = next(iter(sizes.values()))
        if self.num_examples < batch_size:
            raise ValueError(f"dataset of {self.num_examples} pairs < batch size {batch_size}")

    def batch(self, step: int, policy=None) -> Batch:
        idx = schedule_indices(self.seed, step, self.batch_size, self.num_examples)
        out = {k: v[idx] for k, v in self.data.items()}
        B = self.batch_size
        out.setdefault("judge_prob", np.ones(B, np.float32))
        out.setdefault("logp_w", np.zeros(B, np.float32))
        out.setdefault("logp_l", np.zeros(B, np.float32))
        return out


class OnlineSource:
    """Two responses per prompt sampled from the current policy, ranked by a pairwise PM.

    The prompts of a step come from the seeded prompt schedule; the two samples use
    fold_in(key, step) split in two; the de-biased judge (A.2) decides which is y_w (on a
    tie, the first sample). Logged with it: the judge's probability and both sampling
    log-probs.
    """

    def __init__(
        self,
        prompts: np.ndarray,
        prompt_mask: np.ndarray,
        pm,
        *,
        batch_size: int,
        seed: int,
        key: jax.Array,
        max_len: int,
    ):
        if prompts.shape != prompt_mask.shape:
            raise ValueError(f"prompts {prompts.shape} and mask {prompt_mask.shape} differ")
        self.prompts, self.prompt_mask, self.pm = prompts, prompt_mask, pm
        self.batch_size, self.seed, self.key, self.max_len = batch_size, seed, key, max_len

    def batch(self, step: int, policy=None) -> Batch:
        if policy is None:
            raise ValueError("an online source needs the current policy")
        idx = schedule_indices(self.seed, step, self.batch_size, len(self.prompts))
        x, xm = jnp.asarray(self.prompts[idx]), jnp.asarray(self.prompt_mask[idx])
        out = _sample_and_rank(
            policy, self.pm, x, xm, jax.random.fold_in(self.key, step), self.max_len
        )
        return {k: np.asarray(v) for k, v in out.items()}


@jax.jit
def _rank(pm, x, xm, y1, m1, lp1, y2, m2, lp2):
    prob = preference.judge(pm, x, xm, y1, m1, y2, m2)
    first = (prob >= 0.5)[:, None]
    pick = lambda a, b: jnp.where(first, a, b)  # noqa: E731
    return {
        "prompt": x,
        "prompt_mask": xm,
        "y_w": pick(y1, y2),
        "y_w_mask": pick(m1, m2),
        "y_l": pick(y2, y1),
        "y_l_mask": pick(m2, m1),
        "judge_prob": jnp.maximum(prob, 1 - prob).astype(jnp.float32),
        "logp_w": jnp.where(first[:, 0], lp1, lp2),
        "logp_l": jnp.where(first[:, 0], lp2, lp1),
    }


def _sample_and_rank(policy, pm, x, xm, key, max_len):
    k1, k2 = jax.random.split(key)
    s1 = sampling.sample(policy, x, xm, key=k1, max_len=max_len)
    s2 = sampling.sample(policy, x, xm, key=k2, max_len=max_len)
    return _rank(
        pm, x, xm, s1.tokens, s1.mask, s1.logprobs.sum(-1), s2.tokens, s2.mask, s2.logprobs.sum(-1)
    )


class LogReplay:
    """The logged stream of a run, in exact order, each step hash-verified before use."""

    def __init__(self, log: OrderLog):
        self.log = log
        self._prev_step, self._prev_hash = None, None

    def batch(self, step: int, policy=None) -> Batch:
        if step >= len(self.log):
            raise ReplayError(
                f"replay needs step {step} but the log at {self.log.directory} "
                f"has {len(self.log)} steps",
                step=step,
            )
        prev = self._prev_hash if self._prev_step == step - 1 else None
        batch, digest = self.log.read_verified(step, prev)
        self._prev_step, self._prev_hash = step, digest
        return batch


class ShuffledReplay:
    """The logged stream with steps shuffled inside consecutive windows of `window` steps.

    window = 1 is the exact order; window >= the log's length is a uniform shuffle of all
    steps (the paper's D_online-shuffled, Fig. 4); levels in between are App. G's Fig. 13.
    Each step read is hash-verified.
    """

    def __init__(self, log: OrderLog, *, window: int, seed: int):
        if window < 1:
            raise ValueError(f"shuffle window must be >= 1, got {window}")
        self.log, self.window, self.seed = log, window, seed
        self.num_steps = len(log)

    def source_step(self, step: int) -> int:
        block, offset = divmod(step, self.window)
        start = block * self.window
        size = min(self.window, self.num_steps - start)
        if size <= 0:
            raise ReplayError(
                f"replay needs step {step} but the log has {self.num_steps}", step=step
            )
        perm = np.random.default_rng([self.seed, block]).permutation(size)
        return start + int(perm[offset])

    def batch(self, step: int, policy=None) -> Batch:
        src = self.source_step(step)
        batch, _ = self.log.read_verified(src, None)
        return batch
