"""Where policy batches come from: offline datasets, online and semi-online sampling, log replay.

Every source returns, for a step, the same thing: a dict of numpy arrays in the order-log
schema (`order_log.pair_schema`: prompt, y_w, y_l with masks, judge_prob, logp_w, logp_l),
which the training loop logs and turns into a `PairBatch`. So online and offline training
differ only in this module, as the paper's tandem identity requires.

Determinism: what a source returns for step s is a function of (seed, s) and, for online
sources, of the policy's parameters at step s: the prompt order derives from (seed, epoch),
the sampling key is fold_in(key, s). A resumed run therefore needs only the step as its data
position, with one exception: `SemiOnlineSource` also needs its policy snapshot (see there).

`HypoSource` is the one source that returns two batches per step (HyPO: offline pairs plus
on-policy samples of the same prompts); it feeds `ipo_gap.train.loop.train_hypo`.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ipo_gap import preference, sampling
from ipo_gap.data.order_log import OrderLog, ReplayError
from ipo_gap.sharding import to_device, to_host

Batch = dict[str, np.ndarray]
PAIR_FIELDS = ("prompt", "prompt_mask", "y_w", "y_w_mask", "y_l", "y_l_mask")


class Source(Protocol):
    def batch(self, step: int, policy=None) -> Batch: ...


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of n examples in one epoch, a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def padded_batches(n: int, batch_size: int, order: np.ndarray | None = None):
    """Yields (idx, keep) covering rows 0..n-1 in fixed-size batches, one compilation for all.

    idx holds `batch_size` row indices (of `order`, default 0..n-1, taken in turn); the last
    batch is edge-padded by repeating its last row, and `keep` says how many rows are real.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.arange(n) if order is None else np.asarray(order)
    for lo in range(0, n, batch_size):
        yield order[np.minimum(np.arange(lo, lo + batch_size), n - 1)], min(batch_size, n - lo)


def schedule_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Example indices of a step: positions step*B .. step*B+B-1 of the epoch-shuffled stream."""
    pos = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(pos, n)
    perms = {e: epoch_permutation(seed, int(e), n) for e in np.unique(epochs)}
    return np.array([perms[e][o] for e, o in zip(epochs, offsets, strict=True)])


def arrays_sha256(arrays: Batch) -> str:
    """SHA-256 over named arrays (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


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

    def identity(self) -> dict:
        """What a checkpoint records of this source (compared on resume, `loop`). The
        `ref_per_token` record of cached references (`ref_cache.with_refs`) is not hashed
        with the data (checkpoints of older code hashed the same arrays without it): a
        per-token cache adds `ref_normalize: mean` instead."""
        if not hasattr(self, "_sha256"):
            self._sha256 = arrays_sha256(
                {k: v for k, v in self.data.items() if k != "ref_per_token"}
            )
        out = {
            "source": "offline",
            "batch_size": self.batch_size,
            "seed": self.seed,
            "data_sha256": self._sha256,
        }
        if np.any(self.data.get("ref_per_token", False)):
            out["ref_normalize"] = "mean"
        return out

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

    def identity(self) -> dict:
        """What a checkpoint records of this source besides its key (compared on resume)."""
        if not hasattr(self, "_sha256"):
            self._sha256 = arrays_sha256({"prompt": self.prompts, "mask": self.prompt_mask})
        return {
            "source": "online",
            "batch_size": self.batch_size,
            "seed": self.seed,
            "max_len": self.max_len,
            "prompts_sha256": self._sha256,
        }

    def batch(self, step: int, policy=None) -> Batch:
        if policy is None:
            raise ValueError("an online source needs the current policy")
        idx = schedule_indices(self.seed, step, self.batch_size, len(self.prompts))
        x, xm = to_device(self.prompts[idx]), to_device(self.prompt_mask[idx])
        out = _sample_and_rank(
            policy, self.pm, x, xm, jax.random.fold_in(self.key, step), self.max_len
        )
        return {k: to_host(v) for k, v in out.items()}


def copy_arrays(model):
    """A copy of every array leaf of `model` (the train step donates the policy's buffers)."""
    return jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, model)


class SnapshotMissingError(RuntimeError):
    """A semi-online source was asked for a step whose policy snapshot it does not hold."""


class SemiOnlineSource:
    """Online sampling from a snapshot of the policy refreshed every `refresh_every` steps.

    Semi-online training (001, ref [9]): the two responses of step k are sampled, and ranked,
    exactly as `OnlineSource` does (same prompts, key fold_in(key, k), same judge), but by
    the policy *snapshot* taken at step floor(k / s) * s, i.e. snapshots are taken at steps
    0, s, 2s, ... from the policy the loop passes in (a copy: the step donates its buffers).

      * refresh_every = 1: the snapshot is always the current policy: exactly
        `OnlineSource`, batch for batch and bit for bit (no copy is made).
      * refresh_every = None or 0: never refreshed: every step samples the step-0 policy,
        i.e. offline training on pi_sft samples (freshly drawn each step, judged online).

    Resuming. The batch of step k depends on the parameters at step floor(k / s) * s, which
    a checkpoint of step k does not hold unless k is a refresh boundary. So either
      * checkpoint at refresh boundaries (`checkpoint_every` a multiple of s): a run resumed
        at a boundary takes its snapshot from the restored policy, as the original run did;
      * or save `state()` with the checkpoint and call `restore(...)` before resuming;
      * or, for refresh_every = None, pass the step-0 policy (pi_sft) as `initial_policy`.
    Otherwise `batch` raises `SnapshotMissingError` rather than sample from a wrong policy.
    A held snapshot is never replaced by the policy passed at its own boundary step (so a
    restored snapshot wins over the policy passed in when both are present).
    """

    def __init__(self, online: OnlineSource, *, refresh_every: int | None, initial_policy=None):
        if refresh_every is not None and (int(refresh_every) != refresh_every or refresh_every < 0):
            raise ValueError(
                f"refresh_every must be a positive int, 0 or None, got {refresh_every}"
            )
        self.online = online
        self.refresh_every = int(refresh_every) if refresh_every else None
        self._snapshot, self._snapshot_step = None, None
        if initial_policy is not None:
            self.restore(initial_policy, 0)

    def snapshot_step(self, step: int) -> int:
        """The step whose policy samples step `step`: floor(step / s) * s (0 if never refreshed)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        s = self.refresh_every
        return 0 if s is None else (step // s) * s

    def state(self):
        """(snapshot_step, snapshot parameters), or (None, None) before the first batch."""
        return self._snapshot_step, self._snapshot

    def restore(self, snapshot, snapshot_step: int) -> None:
        """Installs a saved snapshot (copied): the policy at refresh step `snapshot_step`."""
        if self.snapshot_step(snapshot_step) != snapshot_step:
            raise ValueError(
                f"step {snapshot_step} is not a refresh boundary (refresh_every="
                f"{self.refresh_every}); snapshots exist only at multiples of it"
            )
        self._snapshot, self._snapshot_step = copy_arrays(snapshot), snapshot_step

    def batch(self, step: int, policy=None) -> Batch:
        if self.refresh_every == 1:
            return self.online.batch(step, policy)
        want = self.snapshot_step(step)
        if self._snapshot_step != want:
            if step != want:
                raise SnapshotMissingError(
                    f"step {step} samples the policy of step {want}, which this source does not "
                    f"hold (it holds step {self._snapshot_step}); after a resume, restore() the "
                    f"snapshot, or checkpoint at multiples of refresh_every={self.refresh_every}"
                )
            if policy is None:
                raise ValueError("a semi-online source needs the policy at refresh steps")
            self._snapshot, self._snapshot_step = copy_arrays(policy), want
        return self.online.batch(step, self._snapshot)

    def identity(self) -> dict:
        return {**self.online.identity(), "refresh_every": self.refresh_every or 0}


class HypoSource:
    """HyPO's data (002, Algorithm 1): offline pairs plus on-policy samples of their prompts.

    `batch(step, policy)` returns (pairs, samples): `pairs` is `offline.batch(step)` (any pair
    source: `OfflineSource`, `LogReplay`, ...), and `samples` holds one response per pair
    prompt drawn from the current policy (exact sampler, temperature 1) with key
    fold_in(key, step): {"prompt", "prompt_mask", "y", "y_mask", "logp"} where "logp" is the
    sampling log-prob (logged, not trained on). A function of (seed, step, parameters), so a
    resumed run needs only the step.
    """

    def __init__(self, offline: Source, *, key: jax.Array, max_len: int):
        self.offline, self.key, self.max_len = offline, key, max_len

    def identity(self) -> dict:
        return {"source": "hypo", "max_len": self.max_len, "pairs": source_identity(self.offline)}

    def batch(self, step: int, policy=None) -> tuple[Batch, Batch]:
        if policy is None:
            raise ValueError("HyPO's on-policy samples need the current policy")
        pairs = self.offline.batch(step, policy)
        x, xm = to_device(pairs["prompt"]), to_device(pairs["prompt_mask"])
        s = sampling.sample(
            policy, x, xm, key=jax.random.fold_in(self.key, step), max_len=self.max_len
        )
        samples = {"prompt": x, "prompt_mask": xm, "y": s.tokens, "y_mask": s.mask}
        samples["logp"] = s.logprobs.sum(-1)
        return pairs, {k: to_host(v) for k, v in samples.items()}


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


def source_identity(source) -> dict:
    """JSON facts that pin a source's data stream apart from its key: its kind, batch size,
    and a fingerprint of its data (a dataset's arrays, the prompts, a replayed log's
    tokenizer and shape). Checkpoints record it and a resume compares it (`loop`)."""
    if hasattr(source, "identity"):
        return source.identity()
    inner = wrapped_source(source)  # a wrapper's stream is its source's
    return source_identity(inner) if inner is not None else {"source": type(source).__name__}


def wrapped_source(source):
    """The source a wrapper delegates to (its `online`, `offline` or `source`), or None."""
    for name in ("online", "offline", "source"):
        if getattr(source, name, None) is not None:
            return getattr(source, name)
    return None


def check_replay_covers(source, num_steps: int, name: str = "replay") -> None:
    """Raises ReplayError before any training if `source` (or a source it wraps) replays an
    order log with fewer than `num_steps` steps: the run would otherwise train up to the end
    of the log and stop there, with its work lost."""
    while source is not None:
        log = getattr(source, "log", None)
        if isinstance(source, (LogReplay, ShuffledReplay)) and log is not None:
            # A shuffled replay permutes the steps the log had when it was made.
            have = source.num_steps if isinstance(source, ShuffledReplay) else log.refresh()
            if num_steps > have:
                raise ReplayError(
                    f"[{name}] {num_steps} steps asked of a replay of the order log "
                    f"{log.directory}, which has {have}: step {have} is missing; nothing was "
                    "trained (replay at most as many steps as were logged)",
                    step=have,
                )
            return
        source = wrapped_source(source)


def _log_identity(log: OrderLog) -> dict:
    return {"batch_size": log.batch_size, "tokenizer_sha256": log.tokenizer_sha256}


def _check_replayable(log: OrderLog, tokenizer) -> None:
    """The log was recorded with `tokenizer` (its meta.json says so, and its hash chain starts
    from that tokenizer's genesis hash: step 0 verifies), so a replay that starts at a later
    step, whose chain check starts there, still reads ids of the right tokenizer."""
    log.check_tokenizer(tokenizer)  # a log of another tokenizer's ids is not replayed
    if len(log):
        try:
            log.read_verified(0)
        except ReplayError as e:
            raise ReplayError(
                f"order log {log.directory}: step 0 does not verify against the chain's start "
                f"for tokenizer {log.tokenizer_sha256} (meta.json's tokenizer or step 0 was "
                f"altered): {e}",
                step=0,
            ) from None


class LogReplay:
    """The logged stream of a run, in exact order, each step hash-verified before use.

    Steps are read through `OrderLog.iter_steps`, which fetches a chunk of steps per
    tensorstore read but verifies (and hands out) one step at a time, chained from step 0's
    genesis hash: nothing is trained on before its hash checks, and a bad step stops the run
    at that step. A request out of sequence (a resume) restarts the chain at that step.
    `tokenizer` (a `Tokenizer` or its SHA-256) must be the one the log was recorded with
    (`ReplayError` naming both hashes otherwise).
    """

    def __init__(self, log: OrderLog, *, tokenizer):
        _check_replayable(log, tokenizer)
        self.log = log
        self._next, self._steps = None, None

    def identity(self) -> dict:
        return {"source": "log replay", **_log_identity(self.log)}

    def batch(self, step: int, policy=None) -> Batch:
        if step >= len(self.log):
            raise ReplayError(
                f"replay needs step {step} but the log at {self.log.directory} "
                f"has {len(self.log)} steps",
                step=step,
            )
        if self._next != step:
            self._steps = self.log.iter_steps(step, len(self.log))
        got, batch = next(self._steps)
        assert got == step, (got, step)
        self._next = step + 1
        return batch


class ShuffledReplay:
    """The logged stream with its examples shuffled inside consecutive windows of `window` steps.

    An example is one logged row: a prompt, its two responses and the judgement (the paper's
    B_i, Fig. 3). The rows of each window's steps are permuted uniformly together and dealt
    back into batches in order, so a batch of a shuffled window mixes examples that different
    policy snapshots produced. window = 1 is the exact order (each step's own batch, its rows
    in their logged order: the replay equals the online run bit for bit); window >= the log's
    length is a uniform shuffle of all examples (the paper's D_online-shuffled, whose
    "examples are presented in a random order", Fig. 4); levels in between are App. G's
    Fig. 13. Each step read is hash-verified; `tokenizer` as in `LogReplay`.
    """

    def __init__(self, log: OrderLog, *, window: int, seed: int, tokenizer):
        _check_replayable(log, tokenizer)
        if window < 1:
            raise ValueError(f"shuffle window must be >= 1, got {window}")
        self.log, self.window, self.seed = log, window, seed
        self.num_steps, self.batch_size = len(log), log.batch_size
        self._block, self._window = None, {}

    def identity(self) -> dict:
        """Also the log's length and the chain hash of its last step where windows span
        steps: a window's permutation is drawn over all its rows (for a uniform shuffle,
        every row of the log), so steps already trained came from steps past the resume
        point, and from a permutation sized by the log's length; a resume on a log extended
        or regenerated beyond the checkpoint's step would deal other rows."""
        out = {
            "source": "shuffled replay",
            **_log_identity(self.log),
            "window": self.window,
            "seed": self.seed,
        }
        if self.window > 1:
            end = self.log.hash(self.num_steps - 1).hex() if self.num_steps else None
            out.update(log_steps=self.num_steps, log_end_hash=end)
        return out

    def source_rows(self, step: int) -> np.ndarray:
        """[batch_size, 2] int: the (log step, row) of each row of training step `step`."""
        block, offset = divmod(step, self.window)
        start = block * self.window
        size = min(self.window, self.num_steps - start)
        if step >= self.num_steps or size <= offset:
            raise ReplayError(
                f"replay needs step {step} but the log has {self.num_steps}", step=step
            )
        B = self.batch_size
        if self.window == 1:
            flat = np.arange(B)
        else:
            perm = np.random.default_rng([self.seed, block]).permutation(size * B)
            flat = perm[offset * B : (offset + 1) * B]
        return np.stack([start + flat // B, flat % B], axis=1)

    def batch(self, step: int, policy=None) -> Batch:
        """The rows `source_rows(step)` of the window's logged steps. A window's steps are
        read and verified together (one chain check over the window) when it is entered."""
        block = step // self.window
        if self._block != block:
            start = block * self.window
            stop = min(start + self.window, self.num_steps)
            if start >= stop:
                self.source_rows(step)  # raises the ReplayError naming the step
            self._block, self._window = block, dict(self.log.iter_steps(start, stop))
        rows = self.source_rows(step)
        if self.window == 1:
            return self._window[int(rows[0, 0])]
        return {
            k: np.stack([self._window[int(t)][k][r] for t, r in rows])
            for k in self._window[int(rows[0, 0])]
        }
