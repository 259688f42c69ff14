"""Alignment losses on sequence log-probs: IPO, DPO, SLiC, GPO(f), Bo2, SFT and HyPO's KL term.

All pairwise losses are functions of

    Delta = (log pi(y_w|x) - log pi_sft(y_w|x)) - (log pi(y_l|x) - log pi_sft(y_l|x)),

with sequence log-probs of shape [B] (see ``ipo_gap.logprobs.sequence_logprobs``). The same
function serves offline and online training: only where (y_w, y_l) come from differs.

Conventions:
    * Every loss returns ``(loss, metrics)``: a scalar batch mean and a dict of scalars.
      Pairwise metrics: "delta" (mean Delta), "logratio_w" / "logratio_l" (mean log-ratios of
      winner / loser against the reference), "accuracy" (the policy used as an implicit
      classifier, App. E: mean of 1 for Delta > 0, 1/2 for Delta == 0, 0 for Delta < 0, so a
      tie scores 1/2 as in evaluation, ``classify.classification_accuracy``; at initialisation,
      policy == reference, Delta == 0 and the accuracy is 1/2).
    * Computation is in at least float32 (bf16 inputs are promoted; float64 is kept).
    * ``beta`` must be > 0. A Python or NumPy scalar is checked at call time (``ValueError``).
      A JAX array (sweeps pass beta as a traced array so one compiled step serves every value)
      cannot be checked without checkify, so a non-positive or NaN array beta makes the loss
      *and its gradient* NaN, which the trainer's NaN guard catches; nothing silently trains.
    * Shapes are checked at trace time: rank-1, equal shapes, B > 0; otherwise ``ValueError``.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, jax.Array]


class PairLossFn(Protocol):
    """Signature shared by the registry's losses (what a train step calls)."""

    def __call__(
        self,
        logp_w: jax.Array,
        logp_l: jax.Array,
        ref_w: jax.Array,
        ref_l: jax.Array,
        *,
        beta: float | jax.Array,
    ) -> tuple[jax.Array, Metrics]: ...


# --------------------------------------------------------------------------------------------
# Validation helpers.


def _as_float(x: jax.Array | np.ndarray | float) -> jax.Array:
    """At least float32: bf16/fp16 promote to float32, float64 (x64 tests) is kept."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_vectors(**named: jax.Array) -> None:
    """Raises ValueError unless all arrays are rank-1 of one common, non-empty shape [B]."""
    shapes = {name: tuple(jnp.shape(x)) for name, x in named.items()}
    desc = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
    for name, shape in shapes.items():
        if len(shape) != 1:
            raise ValueError(f"{name} must be a rank-1 [B] array of sequence log-probs; {desc}.")
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shape mismatch (all must be the same [B]; no broadcasting): {desc}.")
    if next(iter(shapes.values()))[0] == 0:
        raise ValueError(f"empty batch (B == 0): {desc}.")


def _beta_and_scale(
    beta: float | jax.Array,
) -> tuple[float | jax.Array, float | jax.Array]:
    """Validates beta and returns (safe_beta, scale) with scale = 1 if beta > 0 else NaN.

    A concrete (Python/NumPy) beta <= 0 raises ValueError. A JAX array beta (possibly traced)
    cannot raise, so the caller multiplies its loss by ``scale``: NaN loss and NaN gradients when
    beta <= 0 or NaN. ``safe_beta`` replaces an invalid beta by 1 so no inf appears on the way.
    """
    if isinstance(beta, jax.Array):
        if beta.ndim != 0:
            raise ValueError(f"beta must be a scalar; got shape {beta.shape}.")
        beta = _as_float(beta)
        valid = beta > 0
        safe_beta = jnp.where(valid, beta, jnp.ones_like(beta))
        return safe_beta, jnp.where(valid, jnp.ones_like(beta), jnp.full_like(beta, jnp.nan))
    beta_np = np.asarray(beta)
    if beta_np.ndim != 0:
        raise ValueError(f"beta must be a scalar; got shape {beta_np.shape}.")
    if not beta_np > 0:  # also rejects NaN
        raise ValueError(f"beta must be > 0; got {beta!r}.")
    if isinstance(beta, (int, float)):  # keep Python scalars weakly typed (no dtype promotion)
        return float(beta), 1.0
    return _as_float(beta_np), 1.0


def _pair_delta(
    logp_w: jax.Array, logp_l: jax.Array, ref_w: jax.Array, ref_l: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Checks the four [B] inputs and returns (Delta_B, pairwise metrics)."""
    _check_vectors(logp_w=logp_w, logp_l=logp_l, ref_w=ref_w, ref_l=ref_l)
    logratio_w_B = _as_float(logp_w) - _as_float(ref_w)
    logratio_l_B = _as_float(logp_l) - _as_float(ref_l)
    delta_B = logratio_w_B - logratio_l_B
    # As evaluation scores a classifier (eval.pair_metrics): 1 if Delta > 0, 1/2 if 0, else 0.
    correct_B = jnp.where(delta_B > 0, 1.0, jnp.where(delta_B < 0, 0.0, 0.5))
    metrics = {
        "delta": jnp.mean(delta_B),
        "logratio_w": jnp.mean(logratio_w_B),
        "logratio_l": jnp.mean(logratio_l_B),
        "accuracy": jnp.mean(correct_B.astype(delta_B.dtype)),
    }
    return delta_B, metrics


# --------------------------------------------------------------------------------------------
# Contrastive (pairwise) losses.


def ipo_loss(
    logp_w: jax.Array,
    logp_l: jax.Array,
    ref_w: jax.Array,
    ref_l: jax.Array,
    *,
    beta: float | jax.Array,
) -> tuple[jax.Array, Metrics]:
    """IPO (Azar et al. 2023, eq. 17): mean over the batch of (Delta - 1/(2 beta))^2.

    The paper's eq. (1) prints the target as beta/2. That is a misprint: it contradicts the
    paper's own remark that a bigger beta means stronger regularisation (a target beta/2 would
    *grow* the log-ratio gap with beta), and it contradicts Appendix B, which writes offline
    losses as f(beta * Delta) with f(z) = (z - 1/2)^2 for IPO:

        (beta * Delta - 1/2)^2 = beta^2 * (Delta - 1/(2 beta))^2,

    i.e. the target is 1/(2 beta). The two forms differ by the constant factor beta^2, which
    only rescales the gradient (an effective learning-rate change across a beta sweep). We use
    Azar et al.'s form (Delta - 1/(2 beta))^2, without the beta^2 factor; ``gpo_loss`` with
    f(z) = (z - 1/2)^2 gives the other one. The population minimiser (full-support mu) is
    pi*(y) ∝ pi_sft(y) exp(p(y ≻ mu) / beta) (Azar et al.; the paper's App. H).

    Args:
        logp_w: [B] policy sequence log-probs of the winners.
        logp_l: [B] policy sequence log-probs of the losers.
        ref_w: [B] reference (pi_sft) log-probs of the winners.
        ref_l: [B] reference log-probs of the losers.
        beta: regularisation strength > 0 (Python float or scalar array; see module docstring).

    Returns:
        (loss, metrics) with metrics delta, logratio_w, logratio_l, accuracy.
    """
    delta_B, metrics = _pair_delta(logp_w, logp_l, ref_w, ref_l)
    beta, scale = _beta_and_scale(beta)
    loss = jnp.mean(jnp.square(delta_B - 1.0 / (2.0 * beta)))
    return loss * scale, metrics


def dpo_loss(
    logp_w: jax.Array,
    logp_l: jax.Array,
    ref_w: jax.Array,
    ref_l: jax.Array,
    *,
    beta: float | jax.Array,
) -> tuple[jax.Array, Metrics]:
    """DPO (Rafailov et al. 2023): mean of -log sigmoid(beta * Delta).

    Uses ``jax.nn.log_sigmoid`` (stable for large |beta * Delta|). Args and returns as
    :func:`ipo_loss`.
    """
    delta_B, metrics = _pair_delta(logp_w, logp_l, ref_w, ref_l)
    beta, scale = _beta_and_scale(beta)
    loss = -jnp.mean(jax.nn.log_sigmoid(beta * delta_B))
    return loss * scale, metrics


def slic_loss(
    logp_w: jax.Array,
    logp_l: jax.Array,
    ref_w: jax.Array,
    ref_l: jax.Array,
    *,
    beta: float | jax.Array,
) -> tuple[jax.Array, Metrics]:
    """SLiC (Zhao et al. 2023) calibration hinge: mean of max(0, 1 - beta * Delta).

    Args and returns as :func:`ipo_loss`.
    """
    delta_B, metrics = _pair_delta(logp_w, logp_l, ref_w, ref_l)
    beta, scale = _beta_and_scale(beta)
    loss = jnp.mean(jax.nn.relu(1.0 - beta * delta_B))
    return loss * scale, metrics


def gpo_loss(
    logp_w: jax.Array,
    logp_l: jax.Array,
    ref_w: jax.Array,
    ref_l: jax.Array,
    *,
    beta: float | jax.Array,
    f: Callable[[jax.Array], jax.Array],
) -> tuple[jax.Array, Metrics]:
    """Generalised preference optimisation (Tang et al. 2024b; App. B): mean of f(beta * Delta).

    f should be convex. f(z) = -log sigmoid(z) is DPO, max(0, 1 - z) is SLiC, and
    (z - 1/2)^2 is IPO *times beta^2* (see :func:`ipo_loss`).

    Args:
        logp_w, logp_l, ref_w, ref_l, beta: as :func:`ipo_loss`.
        f: elementwise scalar function, applied to the [B] array beta * Delta; must return [B].

    Returns:
        (loss, metrics) as :func:`ipo_loss`.

    Raises:
        ValueError: as :func:`ipo_loss`, or if f does not return the [B] shape it was given.
    """
    delta_B, metrics = _pair_delta(logp_w, logp_l, ref_w, ref_l)
    beta, scale = _beta_and_scale(beta)
    values_B = f(beta * delta_B)
    if jnp.shape(values_B) != delta_B.shape:
        raise ValueError(
            f"f must be elementwise: given shape {delta_B.shape}, returned {jnp.shape(values_B)}."
        )
    return jnp.mean(values_B) * scale, metrics


# --------------------------------------------------------------------------------------------
# Non-contrastive losses and HyPO's KL term.


def sft_loss(logp: jax.Array) -> tuple[jax.Array, Metrics]:
    """Supervised fine-tuning: negative mean sequence log-likelihood, -mean(logp).

    Args:
        logp: [B] sequence log-probs of the target responses.

    Returns:
        (loss, {"logp": mean logp}).
    """
    _check_vectors(logp=logp)
    logp_B = _as_float(logp)
    return -jnp.mean(logp_B), {"logp": jnp.mean(logp_B)}


def bo2_loss(logp_w: jax.Array) -> tuple[jax.Array, Metrics]:
    """Best-of-2 (paper eq. 3): SFT on the winner of each pair, -mean(log pi(y_w|x)).

    Args:
        logp_w: [B] sequence log-probs of the winners.

    Returns:
        (loss, {"logp_w": mean winner log-prob}).
    """
    _check_vectors(logp_w=logp_w)
    logp_B = _as_float(logp_w)
    return -jnp.mean(logp_B), {"logp_w": jnp.mean(logp_B)}


def hypo_kl_loss(logp: jax.Array, ref: jax.Array) -> tuple[jax.Array, Metrics]:
    """HyPO's on-policy KL term: mean(logp * stop_gradient(logp - ref)).

    For y ~ pi_theta (on-policy samples), the *gradient* of this surrogate is an unbiased
    score-function estimate of grad_theta KL(pi_theta || pi_ref):

        grad KL = E_{y~pi}[grad log pi(y) * (log pi(y) - log pi_ref(y))]
                  (+ E_{y~pi}[grad log pi(y)] = 0).

    Its *value* is not the KL (nor an estimate of it); the metric "kl_mc" = mean(logp - ref) is
    the naive Monte-Carlo sequence-KL estimate on the same samples, for logging only. The caller
    weights this term by lambda and adds it to the offline DPO loss (HyPO, Algorithm 1).

    Args:
        logp: [B] policy sequence log-probs of samples drawn from the policy.
        ref: [B] reference sequence log-probs of the same samples.

    Returns:
        (surrogate, {"kl_mc": mean(logp - ref)}).
    """
    _check_vectors(logp=logp, ref=ref)
    logp_B = _as_float(logp)
    logratio_B = logp_B - _as_float(ref)
    surrogate = jnp.mean(logp_B * jax.lax.stop_gradient(logratio_B))
    return surrogate, {"kl_mc": jnp.mean(logratio_B)}


# --------------------------------------------------------------------------------------------
# Registry (what a train step looks up by name).


def _bo2_pairwise(
    logp_w: jax.Array,
    logp_l: jax.Array,
    ref_w: jax.Array,
    ref_l: jax.Array,
    *,
    beta: float | jax.Array,
) -> tuple[jax.Array, Metrics]:
    """Bo2 in the pairwise signature: loss ignores logp_l, refs and beta; metrics include them."""
    del beta  # Bo2 has no regularisation strength.
    _, pair_metrics = _pair_delta(logp_w, logp_l, ref_w, ref_l)
    loss, metrics = bo2_loss(logp_w)
    return loss, {**pair_metrics, **metrics}


LOSSES: types.MappingProxyType[str, PairLossFn] = types.MappingProxyType(
    {"ipo": ipo_loss, "dpo": dpo_loss, "slic": slic_loss, "bo2": _bo2_pairwise}
)


def get_loss(name: str) -> PairLossFn:
    """Looks up a pairwise loss by name.

    All returned functions share the signature ``(logp_w, logp_l, ref_w, ref_l, *, beta)`` and
    return ``(loss, metrics)`` with at least delta, logratio_w, logratio_l and accuracy.
    (HyPO is not here: it is dpo on offline pairs plus lambda * :func:`hypo_kl_loss` on
    on-policy samples, assembled by the train step.)

    Args:
        name: one of "ipo", "dpo", "slic", "bo2".

    Raises:
        ValueError: for an unknown name.
    """
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}.") from None
