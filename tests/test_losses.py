"""Tests for ipo_gap.logprobs and ipo_gap.losses: closed forms, gradients, masks, and theory.

The theory tests use tabular bandits: one prompt, K responses, a policy is softmax(theta) over
the responses and pi_ref = pi_sft is fixed. Expected losses are exact sums over all pairs
(y, y') ~ mu x mu and both labellings, weighted by their probabilities (no sampling), minimised
by jitted full-batch gradient descent.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipo_gap import classify
from ipo_gap import logprobs as lp
from ipo_gap import losses as L

# A small hand-checkable batch: log-ratios w = [.5, -.5, .5], l = [-1, 1, -2], Delta = [1.5, -1.5,
# 2.5].
LOGP_W = [-1.0, -2.0, -0.5]
LOGP_L = [-3.0, -1.0, -4.0]
REF_W = [-1.5, -1.5, -1.0]
REF_L = [-2.0, -2.0, -2.0]
DELTA = [1.5, -1.5, 2.5]
BETA = 0.5


def _batch(dtype=jnp.float32):
    return tuple(jnp.asarray(x, dtype) for x in (LOGP_W, LOGP_L, REF_W, REF_L))


# --------------------------------------------------------------------------------------------
# Closed forms.


def test_pairwise_losses_match_hand_computed_values():
    batch = _batch()
    ipo, metrics = L.ipo_loss(*batch, beta=BETA)
    # Target 1/(2 beta) = 1: squares 0.25, 6.25, 2.25.
    np.testing.assert_allclose(ipo, (0.25 + 6.25 + 2.25) / 3, rtol=1e-6)
    dpo, _ = L.dpo_loss(*batch, beta=BETA)
    want = np.mean([math.log1p(math.exp(-BETA * d)) for d in DELTA])
    np.testing.assert_allclose(dpo, want, rtol=1e-6)
    slic, _ = L.slic_loss(*batch, beta=BETA)
    np.testing.assert_allclose(slic, (0.25 + 1.75 + 0.0) / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["delta"], 2.5 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["logratio_w"], 0.5 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["logratio_l"], -2.0 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], 2.0 / 3, rtol=1e-6)


def test_ipo_target_is_one_over_two_beta_at_a_beta_other_than_one_half():
    """At BETA = 0.5 the target 1/(2 beta) equals 2 beta = 1, so the check above would pass a
    loss written with target 2 beta. At beta = 0.1 the target 1/(2 beta) = 5, while 2 beta would
    be 0.2 and the misprinted beta/2 0.05, and the three give different losses.

    Delta = [1.5, -1.5, 2.5]: target 5 gives squares 12.25, 42.25, 6.25, mean 60.75 / 3 = 20.25.
    Target 0.2 would give (1.69 + 2.89 + 5.29) / 3 = 3.29; target 0.05 would give
    (2.1025 + 2.4025 + 6.0025) / 3 = 3.5025.
    """
    batch = _batch()
    beta = 0.1
    loss, _ = L.ipo_loss(*batch, beta=beta)
    np.testing.assert_allclose(loss, 20.25, rtol=1e-6)
    for wrong in (3.29, 3.5025):  # targets 2 beta and beta / 2
        assert abs(float(loss) - wrong) > 10.0
    # A traced beta (how sweeps pass it) gives the same value.
    np.testing.assert_allclose(L.ipo_loss(*batch, beta=jnp.float32(beta))[0], 20.25, rtol=1e-6)
    # Appendix B's form f(beta Delta), f(z) = (z - 1/2)^2: beta Delta = [.15, -.15, .25], minus
    # 1/2 squared: .1225, .4225, .0625, mean .2025 = beta^2 * 20.25.
    gpo, _ = L.gpo_loss(*batch, beta=beta, f=lambda z: (z - 0.5) ** 2)
    np.testing.assert_allclose(gpo, 0.2025, rtol=1e-6)


def test_logged_accuracy_scores_a_tie_one_half():
    """The logged training accuracy scores Delta == 0 as 1/2, as evaluation does
    (classify.classification_accuracy, eval.pair_metrics). At initialisation the policy is the
    reference, every Delta is exactly 0, and every loss logs accuracy 1/2 (scoring ties 0 would
    log 0). Delta = [1.5, 0, 2.5] logs (1 + 1/2 + 1) / 3 = 5/6 (not 2/3), Delta = [-1, 0, 0]
    logs (0 + 1/2 + 1/2) / 3 = 1/3 (not 0)."""
    logp_w, logp_l, _, _ = _batch()
    for name in L.LOSSES:
        _, metrics = L.get_loss(name)(logp_w, logp_l, logp_w, logp_l, beta=BETA)
        assert float(metrics["delta"]) == 0.0
        np.testing.assert_allclose(metrics["accuracy"], 0.5, rtol=0)
    zeros = jnp.zeros(3)
    for delta, want in (([1.5, 0.0, 2.5], 5 / 6), ([-1.0, 0.0, 0.0], 1 / 3)):
        delta = jnp.asarray(delta)
        _, metrics = L.ipo_loss(delta, zeros, zeros, zeros, beta=BETA)
        np.testing.assert_allclose(metrics["accuracy"], want, rtol=1e-6)
        # The same number evaluation gives this margin against labels "y_w wins".
        np.testing.assert_allclose(
            metrics["accuracy"], classify.classification_accuracy(delta, jnp.ones(3)), rtol=1e-6
        )


def test_gpo_recovers_dpo_slic_and_beta_squared_ipo():
    batch = _batch()
    gpo_dpo, _ = L.gpo_loss(*batch, beta=BETA, f=lambda z: -jax.nn.log_sigmoid(z))
    gpo_slic, _ = L.gpo_loss(*batch, beta=BETA, f=lambda z: jax.nn.relu(1 - z))
    gpo_ipo, _ = L.gpo_loss(*batch, beta=BETA, f=lambda z: (z - 0.5) ** 2)
    np.testing.assert_allclose(gpo_dpo, L.dpo_loss(*batch, beta=BETA)[0], rtol=1e-6)
    np.testing.assert_allclose(gpo_slic, L.slic_loss(*batch, beta=BETA)[0], rtol=1e-6)
    # Appendix B's f(beta Delta) form of IPO is beta^2 times Azar et al.'s form.
    np.testing.assert_allclose(gpo_ipo, BETA**2 * L.ipo_loss(*batch, beta=BETA)[0], rtol=1e-6)


def test_non_contrastive_losses_and_hypo_value():
    logp_w, _, ref_w, _ = _batch()
    np.testing.assert_allclose(L.bo2_loss(logp_w)[0], 3.5 / 3, rtol=1e-6)
    np.testing.assert_allclose(L.sft_loss(logp_w)[0], 3.5 / 3, rtol=1e-6)
    value, metrics = L.hypo_kl_loss(logp_w, ref_w)
    # logp * (logp - ref) = (-1)(.5) + (-2)(-.5) + (-.5)(.5).
    np.testing.assert_allclose(value, (-0.5 + 1.0 - 0.25) / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["kl_mc"], 0.5 / 3, rtol=1e-6)


def test_dpo_is_stable_for_huge_margins():
    logp_w = jnp.array([0.0, 0.0])
    logp_l = jnp.array([-1e4, 1e4])
    zeros = jnp.zeros(2)
    loss, _ = L.dpo_loss(logp_w, logp_l, zeros, zeros, beta=1.0)
    np.testing.assert_allclose(loss, 1e4 / 2, rtol=1e-6)  # -log sigmoid(-1e4) = 1e4, finite.


def test_registry():
    batch = _batch()
    for name in ("ipo", "dpo", "slic", "bo2"):
        loss, metrics = L.get_loss(name)(*batch, beta=BETA)
        assert loss.shape == () and jnp.isfinite(loss)
        assert {"delta", "logratio_w", "logratio_l", "accuracy"} <= set(metrics)
    np.testing.assert_allclose(L.get_loss("bo2")(*batch, beta=BETA)[0], 3.5 / 3, rtol=1e-6)
    assert L.get_loss("ipo") is L.ipo_loss
    with pytest.raises(ValueError, match="unknown loss"):
        L.get_loss("ppo")


def test_bf16_inputs_are_computed_in_float32():
    batch = _batch(jnp.bfloat16)
    loss, _ = L.ipo_loss(*batch, beta=BETA)
    assert loss.dtype == jnp.float32
    logits = jnp.zeros((1, 2, 3), jnp.bfloat16)
    assert lp.token_logprobs(logits, jnp.zeros((1, 2), jnp.int32)).dtype == jnp.float32


# --------------------------------------------------------------------------------------------
# Gradients against central finite differences (float64).


def _fd_grad(fn, x, eps=1e-6):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = eps
        grad[i] = (float(fn(jnp.asarray(x + e))) - float(fn(jnp.asarray(x - e)))) / (2 * eps)
    return grad


@pytest.mark.parametrize("name", ["ipo", "dpo", "slic", "gpo", "bo2", "sft"])
def test_gradients_match_finite_differences(name):
    with jax.enable_x64(True):
        _, logp_l, ref_w, ref_l = _batch(jnp.float64)
        pair = {
            "ipo": L.ipo_loss,
            "dpo": L.dpo_loss,
            "slic": L.slic_loss,  # Delta stays away from the kink at beta * Delta = 1.
            "gpo": lambda *a, beta: L.gpo_loss(*a, beta=beta, f=lambda z: jnp.exp(-z) + z**2),
        }
        if name in pair:

            def fn(x):
                return pair[name](x, logp_l, ref_w, ref_l, beta=BETA)[0]
        else:

            def fn(x):
                return {"bo2": L.bo2_loss, "sft": L.sft_loss}[name](x)[0]

        x = np.asarray(LOGP_W, np.float64)
        grad = jax.grad(fn)(jnp.asarray(x))
        assert grad.dtype == jnp.float64
        np.testing.assert_allclose(grad, _fd_grad(fn, x), rtol=1e-6, atol=1e-8)
        assert np.abs(grad).max() > 1e-3  # not vacuous


def test_hypo_gradient_is_kl_gradient_but_value_is_not_kl():
    """E_{y~pi}[grad hypo_kl(y)] = grad KL(pi || ref) exactly; the value differs from KL."""
    k = 6
    key_t, key_r = jax.random.split(jax.random.key(0))
    theta = jax.random.normal(key_t, (k,))
    logref = jax.nn.log_softmax(jax.random.normal(key_r, (k,)))

    def kl(th):
        logp = jax.nn.log_softmax(th)
        return jnp.sum(jnp.exp(logp) * (logp - logref))

    def expected_surrogate(th):
        logp = jax.nn.log_softmax(th)
        per_y = jax.vmap(lambda a, b: L.hypo_kl_loss(a[None], b[None])[0])(logp, logref)
        # The sampling distribution is not differentiated through (samples are data).
        return jnp.sum(jax.lax.stop_gradient(jnp.exp(logp)) * per_y)

    np.testing.assert_allclose(
        jax.grad(expected_surrogate)(theta), jax.grad(kl)(theta), rtol=1e-5, atol=1e-6
    )
    assert abs(float(expected_surrogate(theta)) - float(kl(theta))) > 0.1


# --------------------------------------------------------------------------------------------
# Validation.


def test_loss_shape_and_beta_errors():
    batch = _batch()
    with pytest.raises(ValueError, match=r"shape mismatch.*\(3,\).*\(2,\)"):
        L.ipo_loss(batch[0], batch[1][:2], batch[2], batch[3], beta=BETA)
    with pytest.raises(ValueError, match="rank-1"):
        L.dpo_loss(batch[0][:, None], *batch[1:], beta=BETA)
    with pytest.raises(ValueError, match="empty batch"):
        L.slic_loss(*(x[:0] for x in batch), beta=BETA)
    with pytest.raises(ValueError, match="empty batch"):
        L.bo2_loss(jnp.zeros((0,)))
    with pytest.raises(ValueError, match="shape mismatch"):
        L.hypo_kl_loss(jnp.zeros(3), jnp.zeros(4))
    for bad in (0.0, -1.0, float("nan"), 0):
        with pytest.raises(ValueError, match="beta must be > 0"):
            L.ipo_loss(*batch, beta=bad)
    with pytest.raises(ValueError, match="beta must be a scalar"):
        L.dpo_loss(*batch, beta=jnp.ones(3))
    with pytest.raises(ValueError, match="elementwise"):
        L.gpo_loss(*batch, beta=BETA, f=jnp.sum)
    # Raised at trace time under jit too, with a traced beta.
    with pytest.raises(ValueError, match=r"shape mismatch.*\(3,\).*\(2,\)"):
        jax.jit(lambda a, b, beta: L.ipo_loss(a, b, a, a, beta=beta))(
            batch[0], batch[1][:2], jnp.float32(BETA)
        )


def test_array_beta_is_traced_and_invalid_beta_gives_nan_loss_and_grad():
    batch = _batch()

    @jax.jit
    def loss_and_grad(beta):
        return jax.value_and_grad(lambda w: L.ipo_loss(w, *batch[1:], beta=beta)[0])(batch[0])

    loss, grad = loss_and_grad(jnp.float32(BETA))
    np.testing.assert_allclose(loss, L.ipo_loss(*batch, beta=BETA)[0], rtol=1e-6)
    assert jnp.all(jnp.isfinite(grad))
    for bad in (0.0, -0.5, float("nan")):
        loss, grad = loss_and_grad(jnp.float32(bad))
        assert jnp.isnan(loss) and jnp.all(jnp.isnan(grad))


def test_logprob_shape_errors():
    logits = jnp.zeros((2, 4, 6))
    targets = jnp.zeros((2, 4), jnp.int32)
    mask = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"\(2, 4, 6\).*\(2, 3\)"):
        lp.sequence_logprobs(logits, targets[:, :3], mask[:, :3])
    with pytest.raises(ValueError, match=r"mask shape \(2, 3\).*\(2, 4\)"):
        lp.sequence_logprobs(logits, targets, mask[:, :3])
    with pytest.raises(ValueError, match=r"mask shape \(1, 4\)"):
        lp.sequence_logprobs(logits, targets, mask[:1])  # would broadcast; must not
    with pytest.raises(ValueError, match="rank 3"):
        lp.token_logprobs(logits[0], targets)
    with pytest.raises(ValueError, match="rank 2"):
        lp.token_logprobs(logits, targets[0])
    with pytest.raises(ValueError, match="integer"):
        lp.token_logprobs(logits, targets.astype(jnp.float32))
    with pytest.raises(ValueError, match="normalize"):
        lp.sequence_logprobs(logits, targets, mask, normalize="avg")
    with pytest.raises(ValueError, match=r"mask shape \(2, 1\)"):
        jax.jit(lp.sequence_logprobs)(logits, targets, mask[:, :1])


# --------------------------------------------------------------------------------------------
# Sequence log-probs and masks.


def _toy_sequence():
    key_l, key_t = jax.random.split(jax.random.key(1))
    logits = jax.random.normal(key_l, (2, 4, 6)) * 3
    targets = jax.random.randint(key_t, (2, 4), 0, 6)
    # Row 0: 3 tokens (the 3rd is EOS), 1 pad. Row 1: 2 tokens (EOS at t=1), 2 pads.
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.int32)
    return logits, targets, mask


def test_sequence_logprobs_sum_and_mean_match_numpy():
    logits, targets, mask = _toy_sequence()
    x = np.asarray(logits, np.float64)
    logsm = x - np.log(np.exp(x).sum(-1, keepdims=True))
    tok = np.take_along_axis(logsm, np.asarray(targets)[..., None], -1)[..., 0]
    want_sum = np.array([tok[0, :3].sum(), tok[1, :2].sum()])
    got_sum = lp.sequence_logprobs(logits, targets, mask)
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5)
    got_mean = lp.sequence_logprobs(logits, targets, mask, normalize="mean")
    np.testing.assert_allclose(got_mean, want_sum / np.array([3, 2]), rtol=1e-5)
    assert got_sum.dtype == jnp.float32
    # EOS is counted: dropping it from the mask removes exactly its token log-prob.
    no_eos = mask.at[0, 2].set(0)
    np.testing.assert_allclose(
        got_sum[0] - lp.sequence_logprobs(logits, targets, no_eos)[0], tok[0, 2], rtol=1e-5
    )


def test_padding_is_ignored_in_value_and_gradient():
    logits, targets, mask = _toy_sequence()
    pad = ~mask.astype(bool)
    junk_logits = jnp.where(pad[..., None], jnp.inf, logits)  # even inf / NaN at pads
    junk_logits = junk_logits.at[1, 3, 0].set(jnp.nan)
    junk_targets = jnp.where(pad, 5, targets)
    for normalize in ("sum", "mean"):
        np.testing.assert_array_equal(
            lp.sequence_logprobs(junk_logits, junk_targets, mask, normalize=normalize),
            lp.sequence_logprobs(logits, targets, mask, normalize=normalize),
        )
    grad = jax.grad(lambda lg: jnp.sum(lp.sequence_logprobs(lg, targets, mask)))(logits)
    assert jnp.all(grad[pad] == 0) and jnp.abs(grad[~pad]).max() > 0
    # Bool masks behave like int masks; a fully padded row gives 0 for both normalisations.
    np.testing.assert_array_equal(
        lp.sequence_logprobs(logits, targets, mask.astype(bool)),
        lp.sequence_logprobs(logits, targets, mask),
    )
    empty = jnp.zeros_like(mask)
    for normalize in ("sum", "mean"):
        np.testing.assert_array_equal(
            lp.sequence_logprobs(logits, targets, empty, normalize=normalize), [0.0, 0.0]
        )


def test_token_and_sequence_entropy():
    logits, _, mask = _toy_sequence()
    x = np.asarray(logits, np.float64)
    logsm = x - np.log(np.exp(x).sum(-1, keepdims=True))
    want = -(np.exp(logsm) * logsm).sum(-1)
    np.testing.assert_allclose(lp.token_entropy(logits), want, rtol=1e-5)
    uniform = jnp.zeros((1, 2, 7))
    np.testing.assert_allclose(lp.token_entropy(uniform), np.full((1, 2), math.log(7)), rtol=1e-6)
    # A -inf logit (p = 0) contributes 0, not NaN.
    np.testing.assert_allclose(
        lp.token_entropy(jnp.array([[[0.0, 0.0, -jnp.inf]]])), [[math.log(2)]], rtol=1e-6
    )
    np.testing.assert_allclose(
        lp.sequence_entropy(logits, mask), [want[0, :3].sum(), want[1, :2].sum()], rtol=1e-5
    )


# --------------------------------------------------------------------------------------------
# Theory on tabular bandits.


def _pair_table(mu, pref):
    """All (winner, loser, weight): pairs (y, y') ~ mu x mu, labelled y > y' w.p. P(y > y')."""
    k = len(mu)
    i, j = (a.ravel() for a in np.meshgrid(np.arange(k), np.arange(k), indexing="ij"))
    winners = np.concatenate([i, j])
    losers = np.concatenate([j, i])
    weights = np.concatenate([mu[i] * mu[j] * pref[i, j], mu[i] * mu[j] * pref[j, i]])
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-12)
    return jnp.asarray(winners), jnp.asarray(losers), jnp.asarray(weights, jnp.float32)


def _minimise_expected_loss(loss_fn, logref, mu, pref, *, beta, lr, steps):
    """Full-batch gradient descent on the exact expected loss, from theta = log pi_sft."""
    winners, losers, weights = _pair_table(mu, pref)

    def expected_loss(theta):
        logp = jax.nn.log_softmax(theta)

        def one(a, b, c, d):
            return loss_fn(a[None], b[None], c[None], d[None], beta=beta)[0]

        per_pair = jax.vmap(one)(logp[winners], logp[losers], logref[winners], logref[losers])
        return jnp.sum(weights * per_pair)

    grad_fn = jax.grad(expected_loss)

    @jax.jit
    def run(theta):
        return jax.lax.fori_loop(0, steps, lambda _, th: th - lr * grad_fn(th), theta)

    theta = run(logref)
    return theta, float(jnp.abs(grad_fn(theta)).max())


def _bandit(k, seed):
    rng = np.random.default_rng(seed)
    logref = jax.nn.log_softmax(jnp.asarray(rng.normal(size=k), jnp.float32))
    mu = rng.dirichlet(2.0 * np.ones(k))
    a = rng.normal(size=(k, k))
    pref = 1.0 / (1.0 + np.exp(-(a - a.T)))  # random, P + P^T = 1, not Bradley-Terry
    return rng, logref, mu, pref


def _tilt(logref, scores):
    p = np.exp(np.asarray(logref, np.float64) + scores)
    return p / p.sum()


@pytest.mark.parametrize("beta", [0.5, 0.25])
def test_offline_ipo_population_optimum_matches_theory(beta):
    """Full-support mu: argmin E[IPO] = pi_sft exp(p(y > mu) / beta) / Z (Azar et al.; App. H).

    A target t in (Delta - t)^2 has optimum pi_sft exp(2 t p(y > mu)) / Z, so 1/(2 beta) gives
    the theory's exp(p / beta). At beta = 1/2 the wrong target 2 beta coincides with it; at
    beta = 1/4 it would give exp(p) instead of exp(4 p), which the run rules out.
    """
    _, logref, mu, pref = _bandit(5, seed=0)
    theta, grad_norm = _minimise_expected_loss(
        L.ipo_loss, logref, mu, pref, beta=beta, lr=0.5 / mu.max(), steps=3000
    )
    pi = np.asarray(jax.nn.softmax(theta))
    win_vs_mu = pref @ mu  # p(y > mu) = E_{y' ~ mu} P(y > y')
    theory = _tilt(logref, win_vs_mu / beta)
    err = np.abs(pi - theory).max()
    assert grad_norm < 1e-5 and err < 1e-3, (err, grad_norm)
    # Not vacuous: the optimum moved away from pi_sft, and the misprinted target beta/2 (whose
    # optimum is pi_sft exp(beta p(y > mu)) / Z) would be measurably wrong.
    assert np.abs(theory - np.exp(logref)).max() > 0.02
    assert np.abs(pi - _tilt(logref, beta * win_vs_mu)).max() > 0.02
    if beta != 0.5:  # so is the target 2 beta, with optimum pi_sft exp(4 beta p(y > mu)) / Z
        assert np.abs(pi - _tilt(logref, 4 * beta * win_vs_mu)).max() > 0.02


def test_offline_dpo_bradley_terry_optimum_matches_theory():
    """BT preferences, full-support mu: argmin E[DPO] = pi_sft exp(r / beta) / Z (unique here)."""
    beta = 0.5
    rng, logref, mu, _ = _bandit(5, seed=1)
    reward = rng.normal(size=5)
    pref = 1.0 / (1.0 + np.exp(-(reward[:, None] - reward[None, :])))
    theta, grad_norm = _minimise_expected_loss(
        L.dpo_loss, logref, mu, pref, beta=beta, lr=4.0 / mu.max(), steps=4000
    )
    pi = np.asarray(jax.nn.softmax(theta))
    err = np.abs(pi - _tilt(logref, reward / beta)).max()
    assert grad_norm < 1e-5 and err < 1e-3, (err, grad_norm)
    assert np.abs(pi - np.exp(logref)).max() > 0.05


def test_ipo_unsupported_response_not_driven_to_theory():
    """mu(z) = 0: theta_z gets exactly zero gradient, so pi(z) moves only through normalisation.

    Gradient descent also keeps the sum of the supported logits fixed (the loss is invariant to
    shifting them together), which pins the value pi(z) reaches; the theory value
    pi_sft(z) exp(p(z > mu) / beta) / Z is not reached. On the supported responses the
    conditional distribution still matches the theory.
    """
    beta = 0.5
    k, z = 5, 0
    _, logref, mu, pref = _bandit(k, seed=2)
    mu[z] = 0.0
    mu /= mu.sum()
    pref[z, :] = 0.9  # z is the best response: it beats everything 90% of the time
    pref[:, z] = 0.1
    pref[z, z] = 0.5
    theta, grad_norm = _minimise_expected_loss(
        L.ipo_loss, logref, mu, pref, beta=beta, lr=0.5 / mu.max(), steps=3000
    )
    assert grad_norm < 1e-5
    # The unsupported logit is untouched: its log-ratio to pi_sft's logit is unchanged (0).
    assert float(theta[z]) == float(logref[z])

    win_vs_mu = pref @ mu
    pi = np.asarray(jax.nn.softmax(theta), np.float64)
    theory = _tilt(logref, win_vs_mu / beta)
    gap = theory[z] - pi[z]
    assert gap > 0.08, (pi[z], theory[z])  # measured: pi(z) = 0.1285 vs theory 0.2354
    # In this instance the best response even *loses* mass (pi_sft(z) = 0.1405): raising the
    # supported logits around their conserved mean raises their total mass (Jensen).
    assert pi[z] < float(jnp.exp(logref[z]))

    # What GD does reach: supported logits = log pi_sft + p(y > mu)/beta + c, with c fixed by
    # the conserved sum of supported logits; the unsupported logit stays at log pi_sft(z).
    supp = np.arange(k) != z
    scores = win_vs_mu / beta
    predicted_theta = np.asarray(logref, np.float64).copy()
    predicted_theta[supp] += scores[supp] - scores[supp].mean()
    predicted = np.exp(predicted_theta) / np.exp(predicted_theta).sum()
    assert np.abs(pi - predicted).max() < 1e-3, np.abs(pi - predicted).max()
    conditional = pi[supp] / pi[supp].sum()
    np.testing.assert_allclose(conditional, theory[supp] / theory[supp].sum(), atol=1e-3)
