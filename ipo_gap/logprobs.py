"""Token and sequence log-probabilities, in float32, with explicit masks.

Every alignment loss in this study (IPO, DPO, SLiC, Bo2, HyPO) consumes *sequence* log-probs
log pi(y|x) = sum_t log pi(y_t | x, y_<t), summed over the response tokens that the mask keeps:
the EOS token is counted (the mask includes it), padding is not. This module is the one place
that turns decoder logits into those numbers, so the offline and the online paths cannot differ.

Length normalisation is an explicit option (``normalize="mean"``), applied identically wherever
it is used. A well-known peer (Hugging Face TRL) does not: its ``DPOTrainer`` with
``loss_type="ipo"`` divides the summed log-probs by the completion length (per-token means),
while its ``OnlineDPOTrainer`` with ``loss_type="ipo"`` uses plain sums, so its offline and online
"IPO" are two different objectives (the target 1/(2 beta) is on a different scale). The paper's
claim is "one loss, two samplers"; here the same ``normalize`` reaches both.

Shape legend: B batch, T target length, V vocabulary. Inputs are validated at trace time:
mismatched shapes or ranks raise ``ValueError`` naming the shapes; nothing broadcasts silently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NORMALIZE_MODES = ("sum", "mean")


def _float_dtype(x: jax.Array) -> jnp.dtype:
    """At least float32: bf16/fp16 are promoted, float64 (x64 tests) is kept."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _check_logits_targets(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> None:
    """Raises ValueError unless logits are [B, T, V] and targets are [B, T] with equal B, T."""
    if logits_BxTxV.ndim != 3:
        raise ValueError(f"logits must have rank 3 [B, T, V]; got shape {logits_BxTxV.shape}.")
    if targets_BxT.ndim != 2:
        raise ValueError(f"targets must have rank 2 [B, T]; got shape {targets_BxT.shape}.")
    if logits_BxTxV.shape[:2] != targets_BxT.shape:
        raise ValueError(
            f"logits shape {logits_BxTxV.shape} and targets shape {targets_BxT.shape} disagree "
            f"on [B, T]."
        )
    if not jnp.issubdtype(targets_BxT.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids; got dtype {targets_BxT.dtype}.")


def _check_mask(values_BxT: jax.Array, mask_BxT: jax.Array, what: str = "values") -> None:
    """Raises ValueError unless the mask has exactly the [B, T] shape of ``values_BxT``."""
    if values_BxT.ndim != 2:
        raise ValueError(f"{what} must have rank 2 [B, T]; got shape {values_BxT.shape}.")
    if mask_BxT.shape != values_BxT.shape:
        raise ValueError(
            f"mask shape {mask_BxT.shape} must equal {what} shape {values_BxT.shape} [B, T]; "
            f"no broadcasting."
        )


def token_logprobs(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Log-probability of each target token under the logits.

    Args:
        logits_BxTxV: next-token logits, any float dtype (computed in at least float32).
        targets_BxT: integer token ids in [0, V).

    Returns:
        logp_BxT: log softmax(logits)[b, t, targets[b, t]], float32 (float64 under x64 inputs).

    Raises:
        ValueError: on wrong ranks, mismatched [B, T], or non-integer targets.
    """
    _check_logits_targets(logits_BxTxV, targets_BxT)
    logits_BxTxV = logits_BxTxV.astype(_float_dtype(logits_BxTxV))
    logprobs_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    logp_BxTx1 = jnp.take_along_axis(logprobs_BxTxV, targets_BxT[..., None], axis=-1)
    return logp_BxTx1[..., 0]


def masked_sum(values_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Sum over T of the positions where the mask is nonzero.

    Masked-out positions are selected away with ``jnp.where`` (not multiplied by 0), so a NaN or
    inf at a padded position cannot leak into the sum.

    Args:
        values_BxT: per-token values.
        mask_BxT: nonzero (or True) where the token counts; same shape as ``values_BxT``.

    Returns:
        sum_B: per-row sums.
    """
    _check_mask(values_BxT, mask_BxT)
    keep_BxT = mask_BxT.astype(bool)
    return jnp.sum(jnp.where(keep_BxT, values_BxT, jnp.zeros_like(values_BxT)), axis=-1)


def masked_count(mask_BxT: jax.Array) -> jax.Array:
    """Number of kept positions per row, as float32 [B]."""
    if mask_BxT.ndim != 2:
        raise ValueError(f"mask must have rank 2 [B, T]; got shape {mask_BxT.shape}.")
    return jnp.sum(mask_BxT.astype(bool), axis=-1).astype(jnp.float32)


def masked_mean(values_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Mean over T of the kept positions; a row with no kept position gives 0 (not NaN).

    Args:
        values_BxT: per-token values.
        mask_BxT: nonzero (or True) where the token counts; same shape as ``values_BxT``.

    Returns:
        mean_B: per-row means.
    """
    total_B = masked_sum(values_BxT, mask_BxT)
    count_B = masked_count(mask_BxT).astype(total_B.dtype)
    return total_B / jnp.maximum(count_B, 1)


def sequence_logprobs(
    logits_BxTxV: jax.Array,
    targets_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    normalize: str = "sum",
) -> jax.Array:
    """Sequence log-probability log pi(y|x) from decoder logits.

    Args:
        logits_BxTxV: next-token logits for the response positions.
        targets_BxT: response token ids (EOS included, then padding).
        mask_BxT: nonzero on the response tokens *including EOS*, zero on padding.
        normalize: ``"sum"`` (the paper's definition, the default) or ``"mean"`` (divide by the
            number of kept tokens; a fully masked row gives 0). Whichever is chosen must be used
            for the policy and the reference, offline and online alike (see the module
            docstring for a peer whose offline and online "IPO" differ on exactly this).

    Returns:
        logp_B: float32 sequence log-probs (float64 under x64 inputs).

    Raises:
        ValueError: on shape/rank mismatches or an unknown ``normalize``.
    """
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {_NORMALIZE_MODES}; got {normalize!r}.")
    _check_logits_targets(logits_BxTxV, targets_BxT)
    _check_mask(targets_BxT, mask_BxT, what="targets")
    logp_BxT = token_logprobs(logits_BxTxV, targets_BxT)
    if normalize == "sum":
        return masked_sum(logp_BxT, mask_BxT)
    return masked_mean(logp_BxT, mask_BxT)


def token_entropy(logits_BxTxV: jax.Array) -> jax.Array:
    """Entropy of each next-token distribution, H = -sum_v p_v log p_v, in float32.

    Args:
        logits_BxTxV: next-token logits.

    Returns:
        entropy_BxT: per-position entropies (nats).
    """
    if logits_BxTxV.ndim != 3:
        raise ValueError(f"logits must have rank 3 [B, T, V]; got shape {logits_BxTxV.shape}.")
    logits_BxTxV = logits_BxTxV.astype(_float_dtype(logits_BxTxV))
    logprobs_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    probs_BxTxV = jnp.exp(logprobs_BxTxV)
    # p log p -> 0 where p == 0 (a -inf logit): select instead of multiplying 0 * -inf.
    plogp_BxTxV = jnp.where(probs_BxTxV > 0, probs_BxTxV * logprobs_BxTxV, 0.0)
    return -jnp.sum(plogp_BxTxV, axis=-1)


def sequence_entropy(
    logits_BxTxV: jax.Array, mask_BxT: jax.Array, *, normalize: str = "sum"
) -> jax.Array:
    """Per-token entropies summed (or averaged) over the kept positions.

    Args:
        logits_BxTxV: next-token logits.
        mask_BxT: nonzero on response tokens including EOS, zero on padding.
        normalize: ``"sum"`` or ``"mean"``, as in :func:`sequence_logprobs`.

    Returns:
        entropy_B: float32 per-sequence entropy of the next-token distributions along the
        given response (not the entropy of the sequence distribution itself).
    """
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {_NORMALIZE_MODES}; got {normalize!r}.")
    entropy_BxT = token_entropy(logits_BxTxV)
    _check_mask(entropy_BxT, mask_BxT, what="logits [B, T]")
    if normalize == "sum":
        return masked_sum(entropy_BxT, mask_BxT)
    return masked_mean(entropy_BxT, mask_BxT)
