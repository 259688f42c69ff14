"""The shared policy step: one encoder pass for both responses, reference handling, sweeps."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FORWARD, tiny_config

from ipo_gap import logprobs
from ipo_gap.data.sources import copy_arrays
from ipo_gap.t5 import model as t5
from ipo_gap.train import steps


def _batch(cfg, B=4, S=6, T=5, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    prompt = jax.random.randint(ks[0], (B, S), 3, cfg.vocab_size)
    pmask = (jnp.arange(S)[None] < jnp.array([6, 3, 5, 2])[:B, None]).astype(jnp.int32)
    y_w = jax.random.randint(ks[1], (B, T), 3, cfg.vocab_size)
    y_l = jax.random.randint(ks[2], (B, T), 3, cfg.vocab_size)
    wmask = (jnp.arange(T)[None] < jnp.array([5, 2, 4, 3])[:B, None]).astype(jnp.int32)
    lmask = (jnp.arange(T)[None] < jnp.array([3, 5, 1, 4])[:B, None]).astype(jnp.int32)
    return steps.PairBatch(prompt * pmask, pmask, y_w * wmask, wmask, y_l * lmask, lmask)


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config(num_encoder_layers=1, num_decoder_layers=1)
    policy = t5.init(cfg, key=jax.random.key(0))
    ref = t5.init(cfg, key=jax.random.key(1))
    return cfg, policy, ref


def eqx_arrays(model):
    return eqx.filter(model, eqx.is_array)


def test_pair_logprobs_equal_separate_forwards(setup):
    cfg, policy, _ = setup
    b = _batch(cfg)
    lw, ll = jax.jit(steps.pair_logprobs)(policy, b)
    for y, m, got in ((b.y_w, b.y_w_mask, lw), (b.y_l, b.y_l_mask, ll)):
        logits = FORWARD(policy, b.prompt, b.prompt_mask, t5.shift_right(y))
        want = logprobs.sequence_logprobs(logits, y, m)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-6)


def test_policy_step_precomputed_reference_and_one_compile_per_sweep(setup):
    cfg, policy, ref = setup
    b = _batch(cfg)
    opt = steps.make_optimizer()
    step = steps.make_policy_step("ipo", opt)
    ref_w, ref_l = jax.jit(steps.pair_logprobs)(ref, b)
    cached = b._replace(ref_w=ref_w, ref_l=ref_l)
    results = []
    for batch in (b, cached):
        for lr, beta in ((1e-3, 0.1), (3e-4, 0.5)):
            hp = steps.Hparams.make(lr, beta)
            model, opt_state = copy_arrays(policy), opt.init(eqx_arrays(policy))
            model, opt_state, metrics = step(model, opt_state, ref, batch, hp, jnp.int32(0))
            results.append((model, metrics))
    # Same numbers whether the reference log-probs are computed in the step or cached.
    for (m1, x1), (m2, x2) in zip(results[:2], results[2:], strict=True):
        np.testing.assert_allclose(x1["loss"], x2["loss"], rtol=1e-5)
        for a, c in zip(jax.tree.leaves(m1), jax.tree.leaves(m2), strict=True):
            np.testing.assert_allclose(a, c, atol=1e-6)
    # Different hyper-parameters really change the update...
    assert float(jnp.abs(results[0][0].lm_head - results[1][0].lm_head).max()) > 1e-5
    # ...without recompiling: one program with computed refs, one with cached refs.
    assert step._cache_size() == 2


def test_ipo_step_reduces_the_loss_and_reaches_the_target(setup):
    cfg, policy, ref = setup
    b = _batch(cfg)
    opt = steps.make_optimizer()
    step = steps.make_policy_step("ipo", opt)
    hp = steps.Hparams.make(3e-3, beta=0.5)
    model, opt_state = copy_arrays(policy), opt.init(eqx_arrays(policy))
    losses = []
    for i in range(60):
        model, opt_state, metrics = step(model, opt_state, ref, b, hp, jnp.int32(i))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.05 * losses[0]
    # IPO drives Delta to its target 1/(2 beta) = 1.
    assert abs(float(metrics["delta"]) - 1.0) < 0.1


def test_warmup_scales_the_first_updates(setup):
    cfg, policy, ref = setup
    b = _batch(cfg)
    opt = steps.make_optimizer()
    step = steps.make_policy_step("dpo", opt)
    deltas = []
    for warmup in (0.0, 10.0):
        hp = steps.Hparams.make(1e-3, beta=0.1, warmup_steps=warmup)
        model, opt_state = copy_arrays(policy), opt.init(eqx_arrays(policy))
        new, _, _ = step(model, opt_state, ref, b, hp, jnp.int32(0))
        deltas.append(np.asarray(new.lm_head - policy.lm_head))
    # Adam's first update has the same direction; warm-up step 0 scales it by 1/10.
    # (atol: the deltas are differences of O(0.1) float32 weights.)
    np.testing.assert_allclose(deltas[1], deltas[0] / 10, atol=3e-8, rtol=1e-4)
    assert np.abs(deltas[0]).max() > 1e-4
