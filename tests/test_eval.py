"""Evaluation pieces: the classifier margin and drift against a direct computation, and the
Evaluator's reuse of the reference's log-probs on its fixed pairs."""

import jax
import numpy as np
from conftest import tiny_config
from test_preference import make_pairs

from ipo_gap import classify
from ipo_gap import eval as evaluation
from ipo_gap.data import ref_cache, sources
from ipo_gap.t5 import model as t5

CFG = tiny_config(num_encoder_layers=1, num_decoder_layers=1)


def _pairs(seed, n):
    batch = make_pairs(np.random.default_rng(seed), n)
    return {f: np.asarray(a) for f, a in zip(sources.PAIR_FIELDS, batch, strict=True)}


def test_margins_and_drift_match_the_direct_computation():
    """Per model, one jitted log-prob program over fixed-size batches (the last one padded):
    the margins and drifts match one unbatched computation of both models' log-probs,
    and a cached reference gives the same bits as a recomputed one."""
    policy, ref = (t5.init(CFG, key=jax.random.key(k)) for k in (1, 2))
    pairs = _pairs(0, 13)  # not a multiple of the batch size
    lp = jax.jit(classify.policy_and_reference_logprobs)(policy, ref, *pairs.values())
    want_margin = classify.policy_margin(lp.logp1, lp.logp2, lp.ref1, lp.ref2)
    margin, drift = evaluation.margins_and_drift(policy, ref, pairs, batch_size=4)
    np.testing.assert_allclose(margin, want_margin, rtol=0, atol=1e-5)
    np.testing.assert_allclose(drift, lp.logp1 - lp.ref1, rtol=0, atol=1e-5)
    assert np.abs(margin).min() > 1e-3  # decisive margins: the accuracy below is not ties
    refs = ref_cache.compute_reference_logprobs(ref, pairs, batch_size=4)
    cached = evaluation.margins_and_drift(policy, ref, pairs, batch_size=4, ref_logps=refs)
    np.testing.assert_array_equal(cached[0], margin)
    np.testing.assert_array_equal(cached[1], drift)
    acc, mean_drift = evaluation.pair_metrics(policy, ref, pairs, batch_size=4)
    assert acc == np.mean(want_margin > 0)
    assert mean_drift == float(np.mean(drift))


def test_the_evaluator_computes_the_reference_on_its_pairs_once(monkeypatch):
    policy, ref, pm = (t5.init(CFG, key=jax.random.key(k)) for k in (1, 2, 3))
    rng = np.random.default_rng(1)
    x = rng.integers(3, CFG.vocab_size, (6, 5)).astype(np.int32)
    xm = np.ones_like(x)
    base_y, base_ym = evaluation.sample_rows(ref, x, xm, key=jax.random.key(4), max_len=4)
    ev = evaluation.Evaluator(
        ref=ref,
        golden_pm=pm,
        eval_x=x,
        eval_xm=xm,
        base_y=base_y,
        base_ym=base_ym,
        kl_x=x,
        kl_xm=xm,
        pairs=_pairs(2, 7),
        max_len=4,
        seed=0,
        batch_size=4,
        num_self=0,
    )
    seen = []
    rows = ref_cache.compute_reference_logprobs
    monkeypatch.setattr(
        ref_cache,
        "compute_reference_logprobs",
        lambda m, *a, **k: seen.append(m) or rows(m, *a, **k),
    )
    first, second = ev(policy), ev(policy)
    assert first == second
    assert [m is ref for m in seen] == [True, False, False]  # ref once, the policy each time
    acc, drift = evaluation.pair_metrics(policy, ref, ev.pairs, batch_size=4)
    assert (first["accuracy"], first["drift"]) == (acc, drift)
