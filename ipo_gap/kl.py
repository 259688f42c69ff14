"""KL(pi_theta || pi_sft) per response: the exact per-token estimator of App. D, and naive MC.

Definitions (paper, Appendix D; section 4.1 prints log pi_sft / pi_theta inside the
expectation, a sign slip: App. D is the definition used here). For a prompt x,

    KL(pi_theta || pi_ref)(x) = E_{y ~ pi_theta(.|x)} [log pi_theta(y|x) - log pi_ref(y|x)],

with log pi(y|x) = sum_t log pi(y_t | x, y_<t) over the response tokens (EOS included; a
response that reaches max_len without EOS is truncated and the sequence distribution is that of
the truncated sampler, which the chain rule below still covers). The paper draws ONE sample
y ~ pi_theta per prompt on 256 training prompts and, along that sample, sums the *exact*
full-vocabulary KL of the two next-token distributions:

    exact(y) = sum_t KL_t(y_<t),
    KL_t(y_<t) = sum_v pi_theta(v|x,y_<t) log [pi_theta(v|x,y_<t) / pi_ref(v|x,y_<t)].

The plain Monte-Carlo estimator, kept for comparison, is

    naive(y) = sum_t d_t,          d_t = log pi_theta(y_t|x,y_<t) - log pi_ref(y_t|x,y_<t).

Both are unbiased for the sequence KL: whether position t is part of the response (no EOS
before t) is a function of the prefix y_<t, and E[d_t | y_<t] = KL_t(y_<t).

Why the exact estimator has lower variance: it is the naive one Rao-Blackwellised over the next
token given the sampled prefix, i.e. each term d_t is replaced by its conditional expectation
given y_<t. Term by term, Var(KL_t) <= Var(d_t). For the last (or only) step this is the whole
story: at max_len = 1 the exact estimator is deterministic (variance 0), while naive(y) is a
random log-ratio. For longer responses the sum is not guaranteed to shrink in variance (KL_s for
s > t depends on y_t, so it can covary with d_t - KL_t), but in practice it does:

    Measured (tests/test_kl.py): random tiny T5s (vocab 8, d_model 16, max_len T = 3), policy
    and reference from different init keys, 3 prompts; the true KL, by enumerating all 400
    responses, is 2.254 / 1.826 / 3.129 nats. Per-sequence std over y ~ pi_theta (exact values,
    by enumeration): exact 0.73 / 0.38 / 0.75 vs naive 2.20 / 1.96 / 3.05, i.e. the naive
    variance is 9x / 27x / 16x larger. With 6,667 samples per prompt: exact 2.253 +- 0.009 /
    1.820 +- 0.005 / 3.140 +- 0.009, naive 2.272 +- 0.027 / 1.801 +- 0.024 / 3.173 +- 0.038
    (all within 1.3 SE of the truth). At max_len = 1 the exact estimate equals the true KL
    (0.926 / 0.743 / 1.294) on every sample to 1e-5. With App. D's 256 rows (pooled over the 3
    prompts, truth 2.403; the SE includes the spread between prompts): exact 2.369 +- 0.052
    vs naive 2.443 +- 0.160.

Numerics: log_softmax and the KL in float32 (float64 is kept under x64); padded positions are
selected away with jnp.where, never multiplied by 0, so inf/NaN logits there cannot leak. A
per-token KL is clamped at 0 (it is >= 0 in exact arithmetic; rounding can give -1e-9).

Shape legend as in ipo_gap/t5/model.py: B batch, S source length, T response length, V vocab.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from ipo_gap import sampling
from ipo_gap.logprobs import masked_sum, token_logprobs
from ipo_gap.t5 import model as t5


class KLEstimate(NamedTuple):
    """A mean over prompts with its standard error std(ddof=1) / sqrt(num) (NaN for num < 2)."""

    mean: jax.Array
    stderr: jax.Array
    num: int


class SequenceKL(NamedTuple):
    """Per-response quantities of one batch, each of shape [B] (float32)."""

    exact: jax.Array  # sum_t KL(pi_theta(.|x,y_<t) || pi_ref(.|x,y_<t))
    naive: jax.Array  # log pi_theta(y|x) - log pi_ref(y|x)
    policy_logp: jax.Array  # log pi_theta(y|x)
    ref_logp: jax.Array  # log pi_ref(y|x)


def _float_dtype(x: jax.Array) -> jnp.dtype:
    return jnp.promote_types(x.dtype, jnp.float32)


def exact_kl_per_token(policy_logits_BxTxV: jax.Array, ref_logits_BxTxV: jax.Array) -> jax.Array:
    """Full-vocabulary KL(softmax(policy) || softmax(ref)) at every position: kl_BxT >= 0.

    Raises:
        ValueError: unless both logits are [B, T, V] of the same shape.
    """
    if policy_logits_BxTxV.ndim != 3 or policy_logits_BxTxV.shape != ref_logits_BxTxV.shape:
        raise ValueError(
            f"policy logits {policy_logits_BxTxV.shape} and ref logits {ref_logits_BxTxV.shape} "
            f"must both be [B, T, V] of the same shape."
        )
    dtype = jnp.promote_types(_float_dtype(policy_logits_BxTxV), _float_dtype(ref_logits_BxTxV))
    logp_BxTxV = jax.nn.log_softmax(policy_logits_BxTxV.astype(dtype), axis=-1)
    logq_BxTxV = jax.nn.log_softmax(ref_logits_BxTxV.astype(dtype), axis=-1)
    p_BxTxV = jnp.exp(logp_BxTxV)
    # p log(p/q) -> 0 where p == 0 (a -inf policy logit): select, don't compute 0 * -inf.
    terms_BxTxV = jnp.where(p_BxTxV > 0, p_BxTxV * (logp_BxTxV - logq_BxTxV), 0.0)
    return jnp.maximum(jnp.sum(terms_BxTxV, axis=-1), 0.0)


def exact_kl_per_sequence(
    policy_logits_BxTxV: jax.Array, ref_logits_BxTxV: jax.Array, mask_BxT: jax.Array
) -> jax.Array:
    """App. D's estimator: the per-token exact KL summed over the response positions.

    Args:
        policy_logits_BxTxV: teacher-forced pi_theta logits along responses y ~ pi_theta.
        ref_logits_BxTxV: teacher-forced pi_ref logits along the same responses.
        mask_BxT: nonzero on response tokens up to and including EOS, zero on padding.

    Returns:
        kl_B: float32 per-sequence KL estimates; padded positions never contribute.

    Raises:
        ValueError: on mismatched shapes (the message names them).
    """
    if mask_BxT.shape != policy_logits_BxTxV.shape[:2]:
        raise ValueError(
            f"mask shape {mask_BxT.shape} must equal the [B, T] of the logits "
            f"{policy_logits_BxTxV.shape}."
        )
    return masked_sum(exact_kl_per_token(policy_logits_BxTxV, ref_logits_BxTxV), mask_BxT)


def naive_kl_per_sequence(
    policy_logp_BxT: jax.Array, ref_logp_BxT: jax.Array, mask_BxT: jax.Array
) -> jax.Array:
    """Plain Monte-Carlo estimator: sum over the response of log pi_theta(y_t) - log pi_ref(y_t).

    Raises:
        ValueError: unless the three arrays are [B, T] of the same shape.
    """
    if policy_logp_BxT.ndim != 2 or not (
        policy_logp_BxT.shape == ref_logp_BxT.shape == mask_BxT.shape
    ):
        raise ValueError(
            f"policy logp {policy_logp_BxT.shape}, ref logp {ref_logp_BxT.shape} and mask "
            f"{mask_BxT.shape} must all be [B, T] of the same shape."
        )
    dtype = jnp.promote_types(_float_dtype(policy_logp_BxT), _float_dtype(ref_logp_BxT))
    diff_BxT = policy_logp_BxT.astype(dtype) - ref_logp_BxT.astype(dtype)
    return masked_sum(diff_BxT, mask_BxT)


def kl_estimate(per_sequence_B: jax.Array) -> KLEstimate:
    """Mean over prompts and its standard error std(ddof=1) / sqrt(n)."""
    if per_sequence_B.ndim != 1 or per_sequence_B.shape[0] == 0:
        raise ValueError(f"per-sequence values must be a non-empty [B]; got {per_sequence_B.shape}")
    x = per_sequence_B.astype(_float_dtype(per_sequence_B))
    n = x.shape[0]
    stderr = jnp.std(x, ddof=1) / jnp.sqrt(n) if n > 1 else jnp.array(jnp.nan, x.dtype)
    return KLEstimate(mean=jnp.mean(x), stderr=stderr, num=n)


def teacher_forced_kl(
    policy: t5.T5,
    ref: t5.T5,
    src_BxS: jax.Array,
    src_mask_BxS: jax.Array,
    tokens_BxT: jax.Array,
    mask_BxT: jax.Array,
) -> SequenceKL:
    """Both estimators (and both sequence log-probs) along given responses.

    Each model is encoded once and decoded once (teacher forcing on shift_right(tokens)).
    Meaningful as KL estimates only for responses sampled from `policy` at temperature 1.
    """
    if tokens_BxT.shape != mask_BxT.shape or tokens_BxT.shape[0] != src_BxS.shape[0]:
        raise ValueError(
            f"tokens {tokens_BxT.shape}, mask {mask_BxT.shape} and src {src_BxS.shape} "
            f"disagree on [B, T] / B."
        )
    dec_in_BxT = t5.shift_right(tokens_BxT)
    policy_logits_BxTxV = t5.forward(policy, src_BxS, src_mask_BxS, dec_in_BxT)
    ref_logits_BxTxV = t5.forward(ref, src_BxS, src_mask_BxS, dec_in_BxT)
    policy_logp_BxT = token_logprobs(policy_logits_BxTxV, tokens_BxT)
    ref_logp_BxT = token_logprobs(ref_logits_BxTxV, tokens_BxT)
    return SequenceKL(
        exact=exact_kl_per_sequence(policy_logits_BxTxV, ref_logits_BxTxV, mask_BxT),
        naive=naive_kl_per_sequence(policy_logp_BxT, ref_logp_BxT, mask_BxT),
        policy_logp=masked_sum(policy_logp_BxT, mask_BxT),
        ref_logp=masked_sum(ref_logp_BxT, mask_BxT),
    )


@eqx.filter_jit
def sampled_kl(
    policy: t5.T5,
    ref: t5.T5,
    src_BxS: jax.Array,
    src_mask_BxS: jax.Array,
    *,
    key: jax.Array,
    max_len: int,
) -> SequenceKL:
    """The jitted core: y ~ pi_theta (sampler at its exact defaults), then teacher_forced_kl.

    One compiled program per (model config, batch shape, max_len): an evaluation loop over
    checkpoints compiles once. Teacher forcing encodes each model once; the sampler runs its
    own encoder pass of the policy (it is not handed `sampling.sample`'s `enc=`), an identical
    computation inside the same jitted program.
    """
    samples = sampling.sample(policy, src_BxS, src_mask_BxS, key=key, max_len=max_len)
    return teacher_forced_kl(policy, ref, src_BxS, src_mask_BxS, samples.tokens, samples.mask)


def estimate_kl(
    policy: t5.T5,
    ref: t5.T5,
    src_BxS: jax.Array,
    src_mask_BxS: jax.Array,
    *,
    key: jax.Array,
    max_len: int,
) -> dict[str, KLEstimate]:
    """KL(pi_theta || pi_ref) over prompts, one sample per prompt row (App. D uses 256 rows).

    Returns:
        {"exact": KLEstimate, "naive": KLEstimate}: means over the rows with standard errors.
    """
    per_seq = sampled_kl(policy, ref, src_BxS, src_mask_BxS, key=key, max_len=max_len)
    return {"exact": kl_estimate(per_seq.exact), "naive": kl_estimate(per_seq.naive)}
