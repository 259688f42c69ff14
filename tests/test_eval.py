"""Evaluation pieces: the classifier margin and drift against a direct computation, the
Evaluator's reuse of the reference's log-probs on its fixed pairs, and the orientation of
every ordered quantity: the win rate (policy sample vs baseline sample), self-classification
(App. E.1) and the KL (policy || reference)."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import tiny_config
from test_preference import make_pairs

from ipo_gap import classify, kl
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
        train_pairs=_pairs(3, 5),
        max_len=4,
        key=jax.random.key(0),
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
    # The reference once per set of pairs (held-out, then training), the policy each time.
    assert [m is ref for m in seen] == [True, False, True, False, False, False]
    acc, drift = evaluation.pair_metrics(policy, ref, ev.pairs, batch_size=4)
    assert (first["accuracy"], first["drift"]) == (acc, drift)
    got = evaluation.pair_metrics_with_outcomes(policy, ref, ev.train_pairs, batch_size=4)
    want = (first["train_accuracy"], first["train_drift"], first["train_accuracy_outcomes"])
    assert want == got and len(got[2]) == 5
    assert got[1] != drift  # other pairs: not the held-out numbers under another name
    # Without training pairs nothing is reported under their names.
    bare = dataclasses.replace(ev, train_pairs=None)(policy)
    assert not [k for k in bare if k.startswith("train_")]
    assert {k: v for k, v in first.items() if not k.startswith("train_")} == bare


def _prompts(seed, n, length=5):
    x = np.random.default_rng(seed).integers(3, CFG.vocab_size, (n, length)).astype(np.int32)
    return x, np.ones_like(x)


def _evaluator(ref, pm, x, xm, base_y, base_ym, **overrides):
    kwargs = {
        "ref": ref,
        "golden_pm": pm,
        "eval_x": x,
        "eval_xm": xm,
        "base_y": base_y,
        "base_ym": base_ym,
        "kl_x": x,
        "kl_xm": xm,
        "pairs": _pairs(2, 7),
        "max_len": 4,
        "key": jax.random.key(0),
        "batch_size": 4,
        "num_self": 0,
    }
    return evaluation.Evaluator(**{**kwargs, **overrides})


def _token_sum(y, m):
    return np.sum(np.where(np.asarray(m) > 0, np.asarray(y), 0), axis=-1)


def test_win_rate_is_the_policy_sample_beating_the_baseline_sample(monkeypatch):
    """'W' means the policy's sample won. The judge is replaced by one that prefers the response
    with the larger sum of token ids (ties 1/2), or for a second, "proxy" PM the smaller sum.
    The baseline's samples are all id 2 (sum 8) on four prompts and all id 63 (sum 252, the
    most any 4-token response can have) on two, so the outcomes are lopsided and swapping the
    judge's arguments would turn each W into L: the win rate, its Wilson interval and the
    outcome string must equal a direct judgement of the policy's own samples (the win-rate key
    is split(key)[0]) against the baseline's, in that order."""
    policy, ref, golden, proxy = (t5.init(CFG, key=jax.random.key(k)) for k in (1, 2, 3, 4))
    x, xm = _prompts(1, 6)
    base_y = np.repeat(np.array([2, 2, 2, 2, 63, 63], np.int32)[:, None], 4, axis=1)
    base_ym = np.ones_like(base_y)
    sign = {id(golden): 1, id(proxy): -1}

    def judge(pm, x, xm, y1, m1, y2, m2, *, batch_size=256):
        d = sign[id(pm)] * (_token_sum(y1, m1) - _token_sum(y2, m2))
        return np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5))

    monkeypatch.setattr(evaluation, "judge_rows", judge)
    ev = _evaluator(ref, golden, x, xm, base_y, base_ym, other_judges={"proxy": proxy})
    got = ev(policy)

    k_win = jax.random.split(ev.key)[0]
    y, ym = evaluation.sample_rows(policy, x, xm, key=k_win, max_len=4, batch_size=4)
    policy_sum, base_sum = _token_sum(y, ym), _token_sum(base_y, base_ym)
    want = np.where(policy_sum > base_sum, 1.0, np.where(policy_sum < base_sum, 0.0, 0.5))
    want_win = evaluation.Interval.of_judgements(want)
    assert got["win_outcomes"] == evaluation.outcomes(want)
    assert (got["win_rate"], got["win_lo"], got["win_hi"]) == (
        want_win.mean,
        want_win.lo,
        want_win.hi,
    )
    assert got["proxy_win_rate"] == float(np.mean(1.0 - want))  # no ties: the sums differ
    # Not vacuous: the policy wins where the baseline is all 2s and loses where it is all 63s,
    # so the reversed order (1 - want) would give a different win rate and string.
    assert got["win_outcomes"] == "WWWWLL" and got["win_rate"] == 4 / 6


def test_a_hidden_judge_judges_the_win_rate_samples():
    """The hidden judge (the embedded task's humans in a study) is handed the very samples the
    golden PM judged (the win-rate key, split(key)[0]): here it prefers, per prompt, a larger
    sum of token ids than the baseline's with probability sum / (sum + base sum), and its
    reward is the sum. Its mean, normal interval, per-prompt values and mean reward are
    recorded; a judge that gives a value outside [0, 1] is refused by name; without one,
    nothing is recorded under its names."""
    policy, ref, pm = (t5.init(CFG, key=jax.random.key(k)) for k in (1, 2, 3))
    x, xm = _prompts(3, 6)
    base_y, base_ym = evaluation.sample_rows(ref, x, xm, key=jax.random.key(4), max_len=4)
    base_sum = _token_sum(base_y, base_ym).astype(np.float64)

    def hidden(y, ym):
        s = _token_sum(y, ym).astype(np.float64)
        return s / (s + base_sum), s

    ev = _evaluator(ref, pm, x, xm, base_y, base_ym, hidden=hidden)
    got = ev(policy)
    k_win = jax.random.split(ev.key)[0]
    y, ym = evaluation.sample_rows(policy, x, xm, key=k_win, max_len=4, batch_size=4)
    p, r = hidden(y, ym)
    want = evaluation.Interval.of(p)
    assert got["hidden_p"] == [round(float(v), 6) for v in p]
    assert (got["hidden_win_rate"], got["hidden_win_lo"], got["hidden_win_hi"]) == (
        want.mean,
        want.lo,
        want.hi,
    )
    assert got["hidden_reward"] == float(r.mean())
    assert len(set(got["hidden_p"])) > 1  # the samples differ: not a constant judge
    other = evaluation.sample_rows(policy, x, xm, key=jax.random.key(9), max_len=4)
    assert hidden(*other)[0].tolist() != p.tolist()  # another key's samples judge otherwise
    bad = dataclasses.replace(ev, hidden=lambda y, ym: (hidden(y, ym)[0] + 1, r))
    with pytest.raises(ValueError, match=r"a hidden judge must give.*probability in \[0, 1\]"):
        bad(policy)
    bare = dataclasses.replace(ev, hidden=None)(policy)
    assert not [k for k in bare if k.startswith("hidden")]
    assert bare == {k: v for k, v in got.items() if not k.startswith("hidden")}


def test_the_humans_majority_is_the_side_of_one_half():
    """p > 1/2 exactly when R(x, y) > R(x, y_base); sigmoid(0) = 1/2 exactly is a tie."""
    from ipo_gap.data.embedded_task import human_preference

    p = [human_preference(1.0, 0.5), human_preference(0.5, 1.0), human_preference(0.7, 0.7)]
    np.testing.assert_array_equal(evaluation.hidden_majority(p), [1.0, 0.0, 0.5])
    assert p[2] == 0.5 and min(p[0] - 0.5, 0.5 - p[1]) > 0.1


def test_self_classification_labels_the_pair_in_the_margins_order(monkeypatch):
    """App. E.1: the policy's margin f(x, y, y2) on two of its own samples is scored against
    the judge's label of (y, y2) in the same order. The judge is replaced by one that prefers
    the response with the larger log pi(y|x) - log pi_sft(y|x), i.e. the label is 1[f > 0]
    (1/2 at f = 0): the policy agrees with it on every pair, so the accuracy must be exactly 1.
    Labelling (y2, y) while scoring f(x, y, y2), or the reverse, would give 0."""
    policy, ref, pm = (t5.init(CFG, key=jax.random.key(k)) for k in (1, 2, 3))
    x, xm = _prompts(2, 6)
    base_y, base_ym = evaluation.sample_rows(ref, x, xm, key=jax.random.key(4), max_len=4)
    logprobs = jax.jit(classify.policy_and_reference_logprobs)
    calls = []

    def judge(pm, x, xm, y1, m1, y2, m2, *, batch_size=256):
        f = np.asarray(classify.policy_margin(*logprobs(policy, ref, x, xm, y1, m1, y2, m2)))
        calls.append(len(f))
        return np.where(f > 0, 1.0, np.where(f < 0, 0.0, 0.5))

    monkeypatch.setattr(evaluation, "judge_rows", judge)
    got = _evaluator(ref, pm, x, xm, base_y, base_ym, num_self=5)(policy)
    assert calls == [6, 5]  # the win rate on all 6 prompts, then 5 self-classification pairs
    assert got["self_accuracy"] == 1.0


def test_kl_rows_is_kl_of_the_policy_from_the_reference():
    """kl_rows(policy, ref) is App. D's KL(policy || ref): y ~ policy, and along it the exact
    KL of the policy's next-token distributions from the reference's. Per row it equals
    kl.sampled_kl(policy, ref) under the keys kl_rows uses (fold_in(key, b) for batch b), and
    differs from kl.sampled_kl(ref, policy) under the same keys (KL is not symmetric, and that
    one samples the reference)."""
    policy, ref = (t5.init(CFG, key=jax.random.key(k)) for k in (1, 2))
    x, xm = _prompts(3, 8)
    key = jax.random.key(5)
    got = evaluation.kl_rows(policy, ref, x, xm, key=key, max_len=4, batch_size=4)

    def direct(p, q):
        rows = [
            kl.sampled_kl(
                p, q, x[lo : lo + 4], xm[lo : lo + 4], key=jax.random.fold_in(key, b), max_len=4
            )
            for b, lo in enumerate((0, 4))
        ]
        return np.concatenate([np.asarray(r.exact) for r in rows])

    np.testing.assert_allclose(got, direct(policy, ref), rtol=1e-6, atol=1e-7)
    reverse = direct(ref, policy)
    assert np.abs(got - reverse).min() > 0.1, (got, reverse)  # measured: 0.15 to 0.95
