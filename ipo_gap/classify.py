"""The policy as a preference classifier (paper App. E) and the winner log-prob drift (Fig. 8).

A policy pi and its reference pi_sft define an implicit classifier of a pair (y1, y2):

    f(x, y1, y2) = log pi(y1|x)/pi(y2|x) - log pi_sft(y1|x)/pi_sft(y2|x)
                 = (logp1 - logp2) - (ref1 - ref2),

which predicts y1 preferred iff f > 0. App. E prints the second term without its log (a typo:
the DPO/IPO implicit reward is a log-ratio, and f must be the same Delta the losses use); the
log is restored here. Accuracies (Fig. 6-8, E.1) compare that prediction with judge labels.

Labels are judge probabilities: 1 (y1 preferred), 0 (y2 preferred) or 0.5 (a tie of the
de-biased judge, `ipo_gap.preference.judge`). Scoring: the prediction is p = 1[f > 0]
(0.5 when f == 0) and an example scores label * p + (1 - label) * (1 - p), the agreement when
each side breaks its ties by a fair coin. So a tie label counts 0.5 whatever the margin, a
decisive label counts 1 when predicted, 0 when contradicted, and 0.5 against a zero margin.
(Soft labels in [0, 1], e.g. `judge_soft`, give the expected agreement.)

Log-probs come from `pair_logprobs` / `policy_and_reference_logprobs`, which run the encoder
ONCE per model (x encoded once, y1 and y2 decoded stacked along the batch axis) and reduce
with `ipo_gap.logprobs.sequence_logprobs`. Everything here is a pure, jittable function;
sampling the policy's own pairs (self-classification, E.1) is the caller's job.

Shape legend: B batch, S prompt length, T response length, D model width.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ipo_gap import logprobs
from ipo_gap.t5 import model as t5
from ipo_gap.tokenizer import PAD_ID


class PairLogprobs(NamedTuple):
    """Sequence log-probs [B] of y1 and y2 under the policy and under the reference."""

    logp1: jax.Array
    logp2: jax.Array
    ref1: jax.Array
    ref2: jax.Array


def _float(x) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_vectors(**named) -> None:
    shapes = {name: jnp.shape(x) for name, x in named.items()}
    if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"expected rank-1 arrays of one shape [B]; got {shapes}")


def policy_margin(logp1, logp2, ref1, ref2) -> jax.Array:
    """f = (logp1 - logp2) - (ref1 - ref2), float32 [B] (App. E with the log restored)."""
    _check_vectors(logp1=logp1, logp2=logp2, ref1=ref1, ref2=ref2)
    return (_float(logp1) - _float(logp2)) - (_float(ref1) - _float(ref2))


def classification_accuracy(margin_B: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Mean agreement of the prediction 1[margin > 0] with judge labels in {0, 0.5, 1}.

    See the module docstring: a tie label (0.5) counts 0.5, a zero margin counts 0.5 against a
    decisive label. Returns a float32 scalar.
    """
    _check_vectors(margin=margin_B, labels=labels_B)
    margin_B, labels_B = _float(margin_B), _float(labels_B)
    pred_B = 0.5 * (jnp.sign(margin_B) + 1.0)
    return jnp.mean(labels_B * pred_B + (1.0 - labels_B) * (1.0 - pred_B))


def winner_logprob_drift(logp_w: jax.Array, ref_w: jax.Array) -> jax.Array:
    """Fig. 8 (bottom): mean(log pi(y_w|x) - log pi_sft(y_w|x)), float32 scalar."""
    _check_vectors(logp_w=logp_w, ref_w=ref_w)
    return jnp.mean(_float(logp_w) - _float(ref_w))


def self_classification_accuracy(logp1, logp2, ref1, ref2, labels_B) -> jax.Array:
    """E.1: accuracy of the policy's margin on pairs it sampled itself, labelled by a judge.

    Takes precomputed arrays: log-probs of the policy's own samples y1, y2 (e.g. from
    `policy_and_reference_logprobs`) and the judge's labels of (x, y1, y2).
    """
    return classification_accuracy(policy_margin(logp1, logp2, ref1, ref2), labels_B)


def _pad_to(tokens_BxT: jax.Array, mask_BxT: jax.Array, length: int):
    extra = length - tokens_BxT.shape[1]
    if extra == 0:
        return tokens_BxT, mask_BxT
    widths = ((0, 0), (0, extra))
    return (
        jnp.pad(tokens_BxT, widths, constant_values=PAD_ID),
        jnp.pad(mask_BxT, widths, constant_values=0),
    )


def pair_logprobs(
    model: t5.T5,
    x_BxS: jax.Array,
    x_mask: jax.Array,
    y1_BxT: jax.Array,
    y1_mask: jax.Array,
    y2_BxT: jax.Array,
    y2_mask: jax.Array,
    *,
    normalize: str = "sum",
) -> tuple[jax.Array, jax.Array]:
    """(log pi(y1|x), log pi(y2|x)), each [B], with one encoder pass.

    x is encoded once; its states are repeated for a single teacher-forced decode of y1 and y2
    stacked along the batch (2B rows). y1 and y2 may differ in length; the shorter is padded
    (its mask is 0 there, so its log-prob is unchanged).
    """
    batch = x_BxS.shape[0]
    if y1_BxT.shape[0] != batch or y2_BxT.shape[0] != batch:
        raise ValueError(
            f"batch sizes differ: x {x_BxS.shape}, y1 {y1_BxT.shape}, y2 {y2_BxT.shape}"
        )
    length = max(y1_BxT.shape[1], y2_BxT.shape[1])
    y1_BxT, y1_mask = _pad_to(y1_BxT, y1_mask, length)
    y2_BxT, y2_mask = _pad_to(y2_BxT, y2_mask, length)
    enc_BxSxD = t5.encode(model, x_BxS, x_mask)
    enc_2BxSxD = jnp.concatenate([enc_BxSxD, enc_BxSxD])
    src_mask_2BxS = jnp.concatenate([x_mask, x_mask])
    tgt_2BxT = jnp.concatenate([y1_BxT, y2_BxT])
    tgt_mask_2BxT = jnp.concatenate([y1_mask, y2_mask])
    logits = t5.decode(model, enc_2BxSxD, src_mask_2BxS, t5.shift_right(tgt_2BxT))
    logp_2B = logprobs.sequence_logprobs(logits, tgt_2BxT, tgt_mask_2BxT, normalize=normalize)
    return logp_2B[:batch], logp_2B[batch:]


def policy_and_reference_logprobs(
    policy: t5.T5,
    reference: t5.T5,
    x_BxS: jax.Array,
    x_mask: jax.Array,
    y1_BxT: jax.Array,
    y1_mask: jax.Array,
    y2_BxT: jax.Array,
    y2_mask: jax.Array,
    *,
    normalize: str = "sum",
) -> PairLogprobs:
    """Log-probs of y1, y2 under the policy and the reference: one encoder pass per model.

    The reference's outputs are wrapped in stop_gradient (it is never trained).
    """
    args = (x_BxS, x_mask, y1_BxT, y1_mask, y2_BxT, y2_mask)
    logp1, logp2 = pair_logprobs(policy, *args, normalize=normalize)
    ref1, ref2 = jax.lax.stop_gradient(pair_logprobs(reference, *args, normalize=normalize))
    return PairLogprobs(logp1, logp2, ref1, ref2)
