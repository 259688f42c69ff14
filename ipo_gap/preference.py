"""Preference models on a T5: the pairwise PM (eq. 5, A.2) and a pointwise Bradley-Terry RM.

A pairwise preference model r(x, y1, y2) in [0, 1] = P(y1 preferred over y2 | x) is a plain
`ipo_gap.t5.model.T5` plus a readout; it has no parameter of its own, so checkpoints, sharding
(`logical_axes`) and HF loading are those of any T5.

Input packing (`pack_pair`, `pack_single`). The already tokenized segments are packed at the
token level into ONE encoder input

    pairwise:  [x tokens] EOS [y1 tokens] A [y2 tokens] B PAD ... PAD
    pointwise: [x tokens] EOS [y tokens] EOS PAD ... PAD

Each segment contributes its real tokens (mask != 0, in order, left-aligned); all padding is moved
to the end. `Tokenizer.encode` ends every segment with EOS; a segment's trailing EOS is replaced
by its separator, and a segment without one (an unfinished sample cut at the length limit, an
empty segment) gets its separator appended, so every segment is followed by exactly one
separator. In the pairwise packing the two responses end with *different* separators, the
readout ids (A, B) = the PM's `cfg.pm_ids`, by default 3 and 4 (`PAIR_SEPARATORS`): T5 has
only relative positions, and with three identical separators a token can hardly tell which
response it belongs to; distinct markers
make the segments identifiable by one attention lookup (on the embedded task a toy PM learns
noticeably faster with them). They identify the segments only if no text contains them: every
tokenizer made by `Tokenizer.train` reserves ids 3 and 4 as control pieces that no text encodes
to (`tokenizer.PM_MARKER_PIECES`); in a loaded model such as T5's `spiece.model` they are
ordinary pieces (`Tokenizer.reserves_pm_markers` is False), and the study gives its PMs the
first two embedding rows past the tokenizer's pieces instead (`Tokenizer.pm_ids_for`).
Nothing is truncated: the static output length N must hold the worst case, sum over segments
of (length + 1); a shorter N raises `ValueError` at trace time (a data-dependent error cannot
be raised inside jit, and a silent cut could drop a response).

Readout (`pm_logit`). The decoder is fed only its start token; the scalar is read from its first
step's logits over the vocabulary as

    logit(r) = logits[A] - logits[B],   r = sigmoid(logit(r)),   (A, B) = cfg.pm_ids,

i.e. a two-way softmax between two fixed vocabulary entries ("A" = y1 preferred, "B" = y2
preferred), the way T5-based reward models and auto-raters are commonly read (score = logit of a
target token). By default ids 3 and 4, the reserved control pieces of a trained tokenizer,
present in every vocabulary with more than 4 pieces; rows past a loaded tokenizer's pieces
where it has none (see the packing above). Chosen over a learned head because it adds no
parameter (nothing to shard, initialise or convert), a PM initialised from a pretrained or SFT
T5 starts from its LM head, and the difference of two logits is invariant to the softmax normaliser.

Training (eq. 5). `pm_loss`: per example, with probability 1/2 the pair is presented as
(y_w, y_l) with target 1, otherwise as (y_l, y_w) with target 0; the loss is the binary
cross-entropy with log_sigmoid in float32. Its expectation over the coin is eq. (5).
`pm_loss_both_orders` computes that expectation exactly, both presentations of every pair in
one pass: twice the compute per pair, but on the embedded task a toy PM reaches in 600 steps a
validation accuracy (0.92 on its style features) that the coin version does not reach (0.66);
the study's PMs use it (`make_pm_train_step(kind="pairwise-both")`).

De-biased inference (`judge`, A.2): y1 is preferred iff r(x, y1, y2) - r(x, y2, y1) > 0; both
orders are scored in one forward pass (stacked along the batch). The comparison is made on the
logits, which sigmoid maps monotonically to r, so it equals A.2's rule in exact arithmetic and
does not turn two saturated float32 probabilities (both 1.0) into a spurious tie.

Pointwise option (`bt_reward`, `bt_loss`, `bt_judge`): r(x, y) is the same readout on the
packing [x] EOS [y] EOS; trained with -log sigmoid(r(x, y_w) - r(x, y_l)).

Shape legend: B batch, S prompt length, T response length, N packed length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ipo_gap.t5 import model as t5
from ipo_gap.tokenizer import EOS_ID, PAD_ID, PM_MARKER_IDS, UNK_ID

SEP_ID = EOS_ID  # separator after each packed segment (see module docstring)
# Ids 3 and 4 (`PM_MARKER_IDS`): A's logit votes for "y1 preferred" (pairwise) / a high reward
# (pointwise), B's for "y2 preferred" / a low reward; A and B also end y1 and y2 in a packing.
READOUT_A_ID, READOUT_B_ID = PM_MARKER_IDS
PAIR_SEPARATORS = (SEP_ID, READOUT_A_ID, READOUT_B_ID)

Metrics = dict[str, jax.Array]
LogitFn = Callable[[t5.T5, jax.Array, jax.Array], jax.Array]


class PreferenceBatch(NamedTuple):
    """Labelled pairs: prompts B x S, winners and losers B x T (equal T), 0/1 masks alike."""

    x: jax.Array
    x_mask: jax.Array
    y_w: jax.Array
    y_w_mask: jax.Array
    y_l: jax.Array
    y_l_mask: jax.Array


# --------------------------------------------------------------------------------------------
# Packing.


def packed_length(*segment_lengths: int) -> int:
    """The packed length N that holds any segments of these lengths (each + 1 separator)."""
    return sum(int(n) + 1 for n in segment_lengths)


def pack_segments(
    segments: Sequence[tuple[jax.Array, jax.Array]],
    *,
    length: int | None = None,
    separators: Sequence[int] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Packs (tokens_BxL, mask_BxL) segments into one left-aligned row per example.

    Each segment's real tokens (mask != 0) are written in order, a trailing SEP_ID (EOS)
    dropped, then the segment's separator (`separators[i]`, default SEP_ID for all); then the
    next segment starts. Positions after the last separator hold PAD_ID and mask 0.

    Args:
        segments: (tokens, mask) pairs, integer arrays of rank 2 with a common batch size.
        length: static N; defaults to `packed_length` of the segment lengths (the worst case).
        separators: one token id per segment (default: SEP_ID for every segment).

    Returns:
        (tokens_BxN int32, mask_BxN int32).

    Raises:
        ValueError: on bad shapes, or if `length` is shorter than the worst case.
    """
    if not segments:
        raise ValueError("pack_segments needs at least one segment")
    batch = segments[0][0].shape[0]
    for i, (tokens, mask) in enumerate(segments):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"segment {i}: tokens must be an integer [B, L] array, got shape "
                f"{tokens.shape} dtype {tokens.dtype}"
            )
        if mask.shape != tokens.shape:
            raise ValueError(f"segment {i}: mask shape {mask.shape} != tokens {tokens.shape}")
        if tokens.shape[0] != batch:
            raise ValueError(f"segment {i}: batch {tokens.shape[0]} != segment 0's {batch}")
    worst = packed_length(*(tokens.shape[1] for tokens, _ in segments))
    if length is None:
        length = worst
    elif length < worst:
        raise ValueError(
            f"packed length {length} is too short: segments of lengths "
            f"{[tokens.shape[1] for tokens, _ in segments]} need up to {worst} tokens "
            f"(each + 1 separator); packing never truncates"
        )
    rows_Bx1 = jnp.arange(batch)[:, None]
    out_BxN = jnp.full((batch, length), PAD_ID, jnp.int32)
    offset_B = jnp.zeros((batch,), jnp.int32)
    if separators is None:
        separators = [SEP_ID] * len(segments)
    for (tokens, mask), sep in zip(segments, separators, strict=True):
        real_BxL = mask != 0
        idx_L = jnp.arange(tokens.shape[1])
        last_B = jnp.max(jnp.where(real_BxL, idx_L, -1), axis=-1)
        # A segment's own trailing EOS is replaced by its separator (one separator each).
        trailing_BxL = (idx_L[None, :] == last_B[:, None]) & (tokens == SEP_ID)
        keep_BxL = real_BxL & ~trailing_BxL
        count_B = jnp.sum(keep_BxL, axis=-1, dtype=jnp.int32)
        rank_BxL = jnp.cumsum(keep_BxL, axis=-1, dtype=jnp.int32) - 1
        # Padding goes to index `length`, out of bounds, and is dropped by the scatter.
        pos_BxL = jnp.where(keep_BxL, offset_B[:, None] + rank_BxL, length)
        out_BxN = out_BxN.at[rows_Bx1, pos_BxL].set(tokens.astype(jnp.int32), mode="drop")
        out_BxN = out_BxN.at[rows_Bx1[:, 0], offset_B + count_B].set(sep, mode="drop")
        offset_B = offset_B + count_B + 1
    mask_BxN = (jnp.arange(length)[None, :] < offset_B[:, None]).astype(jnp.int32)
    return out_BxN, mask_BxN


def pack_pair(
    x_BxS,
    x_mask,
    y1_BxT,
    y1_mask,
    y2_BxT,
    y2_mask,
    *,
    length: int | None = None,
    markers: tuple[int, int] = PM_MARKER_IDS,
):
    """Packs (x, y1, y2) as [x] EOS [y1] A [y2] B PAD... (A, B = `markers`: the PM's
    `cfg.pm_ids`, by default 3 and 4).

    A marker id inside a segment is packed as UNK_ID, so A and B occur once each, where
    they end y1 and y2. No text encodes to a reserved marker, but a policy samples any id of
    its vocabulary (0.01-0.03% of the study's online responses hold one), and a PM read such a
    marker as the end of its response. Where the markers are ordinary pieces (a checkpoint
    without spare rows), their text is read as UNK too.

    Returns:
        (tokens_BxN, mask_BxN) with N = `length` or S + T1 + T2 + 3.
    """
    ids = jnp.asarray(markers, jnp.int32)

    def unmarked(tokens):
        return jnp.where(jnp.isin(tokens, ids), UNK_ID, tokens)

    x_BxS, y1_BxT, y2_BxT = (unmarked(t) for t in (x_BxS, y1_BxT, y2_BxT))
    return pack_segments(
        [(x_BxS, x_mask), (y1_BxT, y1_mask), (y2_BxT, y2_mask)],
        length=length,
        separators=(SEP_ID, *markers),
    )


def pack_single(x_BxS, x_mask, y_BxT, y_mask, *, length: int | None = None):
    """Packs (x, y) as [x] EOS [y] EOS PAD... for the pointwise reward model."""
    return pack_segments([(x_BxS, x_mask), (y_BxT, y_mask)], length=length)


# --------------------------------------------------------------------------------------------
# Readout.


def pm_logit(model: t5.T5, tokens_BxN: jax.Array, mask_BxN: jax.Array) -> jax.Array:
    """logit(r) = first-step decoder logits[A] - logits[B], float32 [B], where (A, B) is the
    model's `cfg.pm_ids` (`READOUT_A_ID`, `READOUT_B_ID` by default).

    For a pairwise packing this is logit r(x, y1, y2); for a single packing, the BT reward.
    """
    a, b = model.cfg.pm_ids
    if model.cfg.vocab_size <= max(a, b):
        raise ValueError(f"vocab_size {model.cfg.vocab_size} has no readout ids {a}, {b}")
    start_Bx1 = jnp.full((tokens_BxN.shape[0], 1), t5.DECODER_START_ID, jnp.int32)
    logits_BxV = t5.forward(model, tokens_BxN, mask_BxN, start_Bx1)[:, 0, :]
    logits_BxV = logits_BxV.astype(jnp.float32)
    return logits_BxV[:, a] - logits_BxV[:, b]


def pm_prob(model: t5.T5, tokens_BxN: jax.Array, mask_BxN: jax.Array) -> jax.Array:
    """r = sigmoid(pm_logit), float32 [B]."""
    return jax.nn.sigmoid(pm_logit(model, tokens_BxN, mask_BxN))


# --------------------------------------------------------------------------------------------
# Pairwise training (eq. 5).


def bce_with_logits(logit_B: jax.Array, target_B: jax.Array) -> tuple[jax.Array, Metrics]:
    """Binary cross-entropy -mean(t log sigmoid(z) + (1 - t) log sigmoid(-z)), float32.

    Metrics: "accuracy" = mean((z > 0) == (t > 0.5)) (the raw, order-dependent prediction),
    "logit" = mean z.
    """
    z_B = logit_B.astype(jnp.float32)
    t_B = target_B.astype(jnp.float32)
    nll_B = -(t_B * jax.nn.log_sigmoid(z_B) + (1.0 - t_B) * jax.nn.log_sigmoid(-z_B))
    correct_B = (z_B > 0) == (t_B > 0.5)
    metrics = {"accuracy": jnp.mean(correct_B.astype(jnp.float32)), "logit": jnp.mean(z_B)}
    return jnp.mean(nll_B), metrics


def random_order(key: jax.Array, batch_size: int) -> jax.Array:
    """Bool [B]: True where the winner is presented first (target 1); each a fair coin."""
    return jax.random.bernoulli(key, 0.5, (batch_size,))


def pm_loss(
    model: t5.T5, batch: PreferenceBatch, key: jax.Array, *, length: int | None = None
) -> tuple[jax.Array, Metrics]:
    """Eq. (5) with the order randomised per example by `random_order(key, B)`.

    Winner first: target 1 on r(x, y_w, y_l); loser first: target 0 on r(x, y_l, y_w). The
    loss is the BCE on the readout logit (see `bce_with_logits`); metrics add "winner_first",
    the fraction presented winner-first.
    """
    if batch.y_w.shape != batch.y_l.shape:
        raise ValueError(f"y_w {batch.y_w.shape} and y_l {batch.y_l.shape} must share [B, T]")
    first_B = random_order(key, batch.y_w.shape[0])
    sel = first_B[:, None]
    y1, y2 = jnp.where(sel, batch.y_w, batch.y_l), jnp.where(sel, batch.y_l, batch.y_w)
    m1 = jnp.where(sel, batch.y_w_mask, batch.y_l_mask)
    m2 = jnp.where(sel, batch.y_l_mask, batch.y_w_mask)
    tokens, mask = pack_pair(
        batch.x, batch.x_mask, y1, m1, y2, m2, length=length, markers=model.cfg.pm_ids
    )
    loss, metrics = bce_with_logits(pm_logit(model, tokens, mask), first_B)
    return loss, {**metrics, "winner_first": jnp.mean(first_B.astype(jnp.float32))}


def pm_loss_both_orders(
    model: t5.T5, batch: PreferenceBatch, key: jax.Array | None = None, *, length=None
) -> tuple[jax.Array, Metrics]:
    """Eq. (5) exactly: 1/2 BCE(r(x, y_w, y_l), 1) + 1/2 BCE(r(x, y_l, y_w), 0) per example.

    Both presentations of every pair in one forward pass on 2B rows: the expectation over
    `pm_loss`'s coin, without its variance (`key` is unused). Each pair is seen in both orders in
    the same step, so the gradient contrasts the two responses directly.
    """
    del key
    if batch.y_w.shape != batch.y_l.shape:
        raise ValueError(f"y_w {batch.y_w.shape} and y_l {batch.y_l.shape} must share [B, T]")
    z_wl, z_lw = pair_logits_both_orders(
        model,
        batch.x,
        batch.x_mask,
        batch.y_w,
        batch.y_w_mask,
        batch.y_l,
        batch.y_l_mask,
        length=length,
    )
    ones = jnp.ones_like(z_wl)
    loss, metrics = bce_with_logits(
        jnp.concatenate([z_wl, z_lw]), jnp.concatenate([ones, 0 * ones])
    )
    judged = judge_from_logits(z_wl, z_lw)
    return loss, {**metrics, "debiased_accuracy": jnp.mean(judged)}


# --------------------------------------------------------------------------------------------
# De-biased inference (A.2).


def pair_logits_both_orders(
    model: t5.T5,
    x_BxS,
    x_mask,
    y1_BxT,
    y1_mask,
    y2_BxT,
    y2_mask,
    *,
    logit_fn: LogitFn = pm_logit,
    length: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(logit r(x, y1, y2), logit r(x, y2, y1)), each [B], from ONE forward on 2B rows."""
    packed = pack_both_orders(
        x_BxS, x_mask, y1_BxT, y1_mask, y2_BxT, y2_mask, length=length, markers=model.cfg.pm_ids
    )
    return logits_of_packed_pairs(model, *packed, logit_fn=logit_fn)


def pack_both_orders(
    x_BxS, x_mask, y1_BxT, y1_mask, y2_BxT, y2_mask, *, length=None, markers=PM_MARKER_IDS
):
    """(t12, m12, t21, m21): `pack_pair` of (x, y1, y2) and of (x, y2, y1), both length N."""
    if length is None:
        length = packed_length(x_BxS.shape[1], y1_BxT.shape[1], y2_BxT.shape[1])
    kw = {"length": length, "markers": markers}
    t12, m12 = pack_pair(x_BxS, x_mask, y1_BxT, y1_mask, y2_BxT, y2_mask, **kw)
    t21, m21 = pack_pair(x_BxS, x_mask, y2_BxT, y2_mask, y1_BxT, y1_mask, **kw)
    return t12, m12, t21, m21


def logits_of_packed_pairs(
    model: t5.T5, t12_BxN, m12_BxN, t21_BxN, m21_BxN, *, logit_fn: LogitFn = pm_logit
) -> tuple[jax.Array, jax.Array]:
    """The two orders' logits of `pack_both_orders`' rows, from ONE forward on 2B rows (the
    rows may be cut to any common width N' <= N: columns past every row's end are padding)."""
    logit_2B = logit_fn(
        model, jnp.concatenate([t12_BxN, t21_BxN]), jnp.concatenate([m12_BxN, m21_BxN])
    )
    batch = t12_BxN.shape[0]
    return logit_2B[:batch], logit_2B[batch:]


def judge_from_logits(logit12_B: jax.Array, logit21_B: jax.Array) -> jax.Array:
    """A.2's sign rule: 1 if r(x,y1,y2) > r(x,y2,y1), 0 if <, 0.5 on ties (float32 [B])."""
    diff_B = logit12_B.astype(jnp.float32) - logit21_B.astype(jnp.float32)
    return 0.5 * (jnp.sign(diff_B) + 1.0)


def judge(
    model: t5.T5,
    x_BxS,
    x_mask,
    y1_BxT,
    y1_mask,
    y2_BxT,
    y2_mask,
    *,
    logit_fn: LogitFn = pm_logit,
    length: int | None = None,
) -> jax.Array:
    """De-biased preference of y1 over y2 (A.2): float32 [B] in {0, 0.5, 1}.

    1 if r(x, y1, y2) > r(x, y2, y1), 0 if <, 0.5 on an exact tie. Order-invariant by
    construction: judge(x, y1, y2) == 1 - judge(x, y2, y1), whatever position bias r has.

    Args:
        model: the pairwise PM (a T5).
        x_BxS, x_mask, y1_BxT, y1_mask, y2_BxT, y2_mask: tokenized prompt and responses.
        logit_fn: the raw scorer (model, tokens_BxN, mask_BxN) -> logit r, default `pm_logit`.
        length: static packed length (default: the worst case).
    """
    logit12_B, logit21_B = pair_logits_both_orders(
        model, x_BxS, x_mask, y1_BxT, y1_mask, y2_BxT, y2_mask, logit_fn=logit_fn, length=length
    )
    return judge_from_logits(logit12_B, logit21_B)


def judge_soft(
    model: t5.T5,
    x_BxS,
    x_mask,
    y1_BxT,
    y1_mask,
    y2_BxT,
    y2_mask,
    *,
    logit_fn: LogitFn = pm_logit,
    length: int | None = None,
) -> jax.Array:
    """Order-symmetrised (r(x, y1, y2) + 1 - r(x, y2, y1)) / 2 in [0, 1], float32 [B].

    For analyses (calibration, soft labels); arguments as `judge`. judge_soft(x, y1, y2) ==
    1 - judge_soft(x, y2, y1), and (in exact arithmetic) it is > 1/2 exactly where `judge` is 1.
    """
    logit12_B, logit21_B = pair_logits_both_orders(
        model, x_BxS, x_mask, y1_BxT, y1_mask, y2_BxT, y2_mask, logit_fn=logit_fn, length=length
    )
    return 0.5 * (jax.nn.sigmoid(logit12_B) + jax.nn.sigmoid(-logit21_B))


# --------------------------------------------------------------------------------------------
# Pointwise Bradley-Terry reward model.


def bt_reward(model: t5.T5, x_BxS, x_mask, y_BxT, y_mask) -> jax.Array:
    """Scalar reward r(x, y) [B]: the readout on the packing [x] EOS [y] EOS."""
    return pm_logit(model, *pack_single(x_BxS, x_mask, y_BxT, y_mask))


def _pad_right(tokens_BxT, mask_BxT, length: int):
    widths = ((0, 0), (0, length - tokens_BxT.shape[1]))
    return (
        jnp.pad(tokens_BxT, widths, constant_values=PAD_ID),
        jnp.pad(mask_BxT, widths, constant_values=0),
    )


def _bt_rewards_pair(model, x, x_mask, y1, y1_mask, y2, y2_mask):
    """(r(x, y1), r(x, y2)) from one forward on 2B rows (the shorter response is padded)."""
    length = max(y1.shape[1], y2.shape[1])
    y1, y1_mask = _pad_right(y1, y1_mask, length)
    y2, y2_mask = _pad_right(y2, y2_mask, length)
    tokens, mask = pack_single(
        jnp.concatenate([x, x]),
        jnp.concatenate([x_mask, x_mask]),
        jnp.concatenate([y1, y2]),
        jnp.concatenate([y1_mask, y2_mask]),
    )
    reward_2B = pm_logit(model, tokens, mask)
    return reward_2B[: x.shape[0]], reward_2B[x.shape[0] :]


def bt_loss(model: t5.T5, batch: PreferenceBatch) -> tuple[jax.Array, Metrics]:
    """Bradley-Terry loss -mean log sigmoid(r(x, y_w) - r(x, y_l)), float32.

    Metrics: "accuracy" = mean(r_w > r_l), "margin" = mean(r_w - r_l).
    """
    if batch.y_w.shape != batch.y_l.shape:
        raise ValueError(f"y_w {batch.y_w.shape} and y_l {batch.y_l.shape} must share [B, T]")
    r_w, r_l = _bt_rewards_pair(
        model, batch.x, batch.x_mask, batch.y_w, batch.y_w_mask, batch.y_l, batch.y_l_mask
    )
    margin_B = r_w - r_l
    loss = -jnp.mean(jax.nn.log_sigmoid(margin_B))
    metrics = {
        "accuracy": jnp.mean((margin_B > 0).astype(jnp.float32)),
        "margin": jnp.mean(margin_B),
    }
    return loss, metrics


def bt_judge_soft(model: t5.T5, x_BxS, x_mask, y1_BxT, y1_mask, y2_BxT, y2_mask) -> jax.Array:
    """P(y1 preferred) = sigmoid(r(x, y1) - r(x, y2)) under the BT model, float32 [B]."""
    r1, r2 = _bt_rewards_pair(model, x_BxS, x_mask, y1_BxT, y1_mask, y2_BxT, y2_mask)
    return jax.nn.sigmoid(r1 - r2)


def bt_judge(model: t5.T5, x_BxS, x_mask, y1_BxT, y1_mask, y2_BxT, y2_mask) -> jax.Array:
    """sigmoid(r1 - r2) thresholded at 1/2: 1, 0, or 0.5 on an exact tie r1 == r2."""
    r1, r2 = _bt_rewards_pair(model, x_BxS, x_mask, y1_BxT, y1_mask, y2_BxT, y2_mask)
    return judge_from_logits(r1, r2)


# --------------------------------------------------------------------------------------------
# Train step.

PM_KINDS = ("pairwise", "pairwise-both", "bt")


def make_pm_train_step(optimizer: optax.GradientTransformation, kind: str = "pairwise"):
    """Returns a jitted step(model, opt_state, batch, key) -> (model, opt_state, metrics).

    kind "pairwise" trains with `pm_loss` (the key draws the presentation order),
    "pairwise-both" with `pm_loss_both_orders` (both orders of every pair; the study's PMs),
    "bt" with `bt_loss` (the key is unused by the last two). The model and optimizer state
    are donated; the batch and key are not (a T5 has only array leaves, so plain `jax.jit`
    applies). Metrics: the loss's
    metrics plus "loss" and "grad_norm".
    """
    if kind not in PM_KINDS:
        raise ValueError(f"unknown PM kind {kind!r}; known: {PM_KINDS}")

    def loss_fn(model, batch, key):
        if kind == "pairwise":
            return pm_loss(model, batch, key)
        if kind == "pairwise-both":
            return pm_loss_both_orders(model, batch)
        return bt_loss(model, batch)

    def step(model, opt_state, batch: PreferenceBatch, key: jax.Array):
        value_and_grad = eqx.filter_value_and_grad(loss_fn, has_aux=True)
        (loss, metrics), grads = value_and_grad(model, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        return model, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

    return jax.jit(step, donate_argnums=(0, 1))
