"""Preference models (packing, eq. 5 loss, A.2 de-biased judge, BT) and the policy classifier.

One small pairwise PM is trained once per module (a few hundred steps, one compiled step) on a
separable synthetic preference: the winner contains the "good" token, the loser does not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

from ipo_gap import classify, logprobs
from ipo_gap import preference as pref
from ipo_gap.t5 import model as t5
from ipo_gap.tokenizer import EOS_ID, PAD_ID

V, S, T = 32, 4, 6
GOOD = 5  # the preferred response contains this id; ordinary tokens are drawn from [6, V)
TRAIN_STEPS, TRAIN_BATCH = 400, 64

# One layer each, unrolled: compile time dominates on CPU, and one encoder layer suffices here
# (it learns within ~300 steps which segment a GOOD token sits in, from the EOS separators).
PM_CFG = tiny_config(
    vocab_size=V,
    num_encoder_layers=1,
    num_decoder_layers=1,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=32,
    scan_layers=False,
)


def _responses(rng, n, num_good):
    """n right-padded responses of 2..T-1 tokens + EOS; row i holds num_good[i] GOOD tokens."""
    lengths = rng.integers(3, T + 1, n)  # real tokens, EOS included
    pos = np.arange(T)[None, :]
    y = rng.integers(6, V, (n, T))
    priority = np.where(pos < lengths[:, None] - 1, rng.random((n, T)), np.inf)
    rank = np.argsort(np.argsort(priority, axis=1), axis=1)
    y = np.where(rank < num_good[:, None], GOOD, y)
    y = np.where(pos == lengths[:, None] - 1, EOS_ID, y)
    mask = (pos < lengths[:, None]).astype(np.int32)
    return (y * mask).astype(np.int32), mask


def make_pairs(rng, n) -> pref.PreferenceBatch:
    x_len = rng.integers(2, S + 1, n)
    pos = np.arange(S)[None, :]
    x = np.where(pos == x_len[:, None] - 1, EOS_ID, rng.integers(6, V, (n, S)))
    x_mask = (pos < x_len[:, None]).astype(np.int32)
    y_w, y_w_mask = _responses(rng, n, rng.integers(1, 3, n))
    y_l, y_l_mask = _responses(rng, n, np.zeros(n, int))
    arrays = ((x * x_mask).astype(np.int32), x_mask, y_w, y_w_mask, y_l, y_l_mask)
    return pref.PreferenceBatch(*(jnp.asarray(a) for a in arrays))


def _present(batch, first):
    """(x, x_mask, y1, y1_mask, y2, y2_mask) with the winner first where `first`."""
    f = jnp.asarray(first)[:, None]
    return (
        batch.x,
        batch.x_mask,
        jnp.where(f, batch.y_w, batch.y_l),
        jnp.where(f, batch.y_w_mask, batch.y_l_mask),
        jnp.where(f, batch.y_l, batch.y_w),
        jnp.where(f, batch.y_l_mask, batch.y_w_mask),
    )


def _train(kind, steps, seed):
    model = t5.init(PM_CFG, key=jax.random.key(seed))
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(model)
    step = pref.make_pm_train_step(optimizer, kind)
    rng, base = np.random.default_rng(seed), jax.random.key(seed + 100)
    for i in range(steps):
        batch = make_pairs(rng, TRAIN_BATCH)
        model, opt_state, metrics = step(model, opt_state, batch, jax.random.fold_in(base, i))
    return model, {k: float(v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def trained_pm():
    return _train("pairwise", TRAIN_STEPS, seed=0)


@jax.jit
def _judgements(model, bias, x, x_mask, y1, y1_mask, y2, y2_mask):
    """judge, judge_soft and both raw logits of a PM whose readout logit gets + bias."""

    def biased(m, tokens, mask):
        return pref.pm_logit(m, tokens, mask) + bias

    args = (model, x, x_mask, y1, y1_mask, y2, y2_mask)
    return (
        pref.judge(*args, logit_fn=biased),
        pref.judge_soft(*args, logit_fn=biased),
        pref.pair_logits_both_orders(*args, logit_fn=biased),
    )


# --------------------------------------------------------------------------------------------
# Training and de-biased judgement.


def test_trained_pm_judges_held_out_pairs(trained_pm):
    model, metrics = trained_pm
    assert metrics["loss"] < 0.4, metrics  # last training batch
    rng = np.random.default_rng(12345)  # fresh examples, never trained on
    held_out = make_pairs(rng, 512)
    first = rng.random(512) < 0.5
    prob, soft, _ = _judgements(model, 0.0, *_present(held_out, first))
    accuracy = float(jnp.mean(prob == first.astype(np.float32)))
    assert accuracy > 0.95, accuracy
    soft_accuracy = float(jnp.mean((soft > 0.5) == first))
    assert soft_accuracy > 0.95, soft_accuracy


def test_judge_cancels_planted_position_bias(trained_pm):
    model, _ = trained_pm
    pairs = make_pairs(np.random.default_rng(7), 512)  # 512 rows: reuses the compiled judge
    args = (pairs.x, pairs.x_mask, pairs.y_w, pairs.y_w_mask, pairs.y_l, pairs.y_l_mask)
    swapped = (pairs.x, pairs.x_mask, pairs.y_l, pairs.y_l_mask, pairs.y_w, pairs.y_w_mask)
    plain, _, (l12, l21) = _judgements(model, 0.0, *args)
    # A planted first-position bonus larger than any content logit: raw r favours whichever
    # response comes first, in both orders.
    bias = 1.0 + float(jnp.max(jnp.abs(jnp.concatenate([l12, l21]))))
    p12, soft12, (b12, b21) = _judgements(model, bias, *args)
    p21, soft21, _ = _judgements(model, bias, *swapped)
    r12, r21 = jax.nn.sigmoid(b12), jax.nn.sigmoid(b21)
    assert np.all(r12 > 0.5) and np.all(r21 > 0.5)
    assert np.mean(np.abs(r12 + r21 - 1.0) > 1e-3) > 0.9  # raw r is not order-consistent
    np.testing.assert_array_equal(p12, 1.0 - p21)  # the de-biased judge is
    np.testing.assert_array_equal(p12, plain)  # and the bias cancels exactly
    np.testing.assert_allclose(soft12, 1.0 - soft21, atol=1e-6)
    assert set(np.unique(p12)) <= {0.0, 0.5, 1.0}


def test_judge_from_logits_ties():
    out = pref.judge_from_logits(jnp.array([1.0, -2.0, 0.5]), jnp.array([0.0, 3.0, 0.5]))
    np.testing.assert_array_equal(out, [1.0, 0.0, 0.5])


@pytest.mark.slow  # trains a reward model: ~15 s; runs in CI
def test_bt_reward_model_trains_and_judges():
    model, metrics = _train("bt", 60, seed=3)
    assert metrics["accuracy"] > 0.95 and metrics["loss"] < 0.2, metrics
    pairs = make_pairs(np.random.default_rng(99), 256)
    first = np.random.default_rng(98).random(256) < 0.5

    @jax.jit
    def evaluate(model, *args):
        return pref.bt_judge(model, *args), pref.bt_judge_soft(model, *args)

    prob, soft = evaluate(model, *_present(pairs, first))
    assert float(jnp.mean(prob == first)) > 0.95
    np.testing.assert_array_equal(prob, jnp.where(soft > 0.5, 1.0, jnp.where(soft < 0.5, 0, 0.5)))


# --------------------------------------------------------------------------------------------
# Packing.


def _reference_pack(segments, length, separators=None):
    """Python reference of the documented packing rule (a trailing EOS becomes the separator)."""
    separators = separators or [EOS_ID] * len(segments)
    tokens = np.full((segments[0][0].shape[0], length), PAD_ID, np.int32)
    mask = np.zeros_like(tokens)
    for b in range(tokens.shape[0]):
        row = []
        for (seg_tokens, seg_mask), sep in zip(segments, separators, strict=True):
            real = [int(t) for t, m in zip(seg_tokens[b], seg_mask[b], strict=True) if m]
            row += [*(real[:-1] if real and real[-1] == EOS_ID else real), sep]
        tokens[b, : len(row)] = row
        mask[b, : len(row)] = 1
    return tokens, mask


def test_pack_pair_layout():
    x = jnp.array([[7, 8, EOS_ID, 0], [9, EOS_ID, 0, 0]])
    x_mask = (x != 0).astype(jnp.int32)
    y1 = jnp.array([[10, EOS_ID, 0], [11, 12, 13]])  # row 1 unfinished: no EOS
    y1_mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    y2 = jnp.array([[14, 15, EOS_ID], [0, 0, 0]])  # row 1 empty
    y2_mask = jnp.array([[1, 1, 1], [0, 0, 0]])
    tokens, mask = jax.jit(pref.pack_pair)(x, x_mask, y1, y1_mask, y2, y2_mask)
    assert tokens.shape == mask.shape == (2, 4 + 3 + 3 + 3) and tokens.dtype == jnp.int32
    np.testing.assert_array_equal(
        tokens,
        [
            [7, 8, 1, 10, 3, 14, 15, 4, 0, 0, 0, 0, 0],  # separators EOS, A (3), B (4)
            [9, 1, 11, 12, 13, 3, 4, 0, 0, 0, 0, 0, 0],
        ],
    )
    np.testing.assert_array_equal(mask.sum(-1), [8, 7])
    np.testing.assert_array_equal(mask, (jnp.arange(13)[None] < mask.sum(-1)[:, None]))
    # Left padding inside a segment is moved to the end as well.
    left = jnp.array([[0, 10, EOS_ID], [0, 0, 11]])
    tokens2, _ = jax.jit(pref.pack_single)(x, x_mask, left, (left != 0).astype(jnp.int32))
    np.testing.assert_array_equal(tokens2[:, :5], [[7, 8, 1, 10, 1], [9, 1, 11, 1, 0]])


def test_pack_pair_matches_reference_on_random_segments():
    rng = np.random.default_rng(0)
    batch = make_pairs(rng, 32)
    y1, y1_mask = np.array(batch.y_w), np.array(batch.y_w_mask)
    y1[::3] = rng.integers(6, V, (11, T))  # every third y1: full length, unfinished (no EOS)
    y1_mask[::3] = 1
    segments = [
        (np.array(batch.x), np.array(batch.x_mask)),
        (y1, y1_mask),
        (np.array(batch.y_l), np.array(batch.y_l_mask)),
    ]
    length = pref.packed_length(S, T, T) + 5
    got = jax.jit(pref.pack_pair, static_argnames="length")(
        *(jnp.asarray(a) for seg in segments for a in seg), length=length
    )
    want = _reference_pack(segments, length, pref.PAIR_SEPARATORS)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    for sep in pref.PAIR_SEPARATORS:  # exactly one separator per segment (ids differ)
        assert int(jnp.sum(got[0] == sep)) == 32


def test_a_marker_id_inside_a_segment_is_packed_as_unk():
    """A sampled response can hold a marker id; packed, it reads as UNK (id 2), so each row
    holds A and B once, where y1 and y2 end, for the default markers and a PM's own."""
    x = jnp.array([[7, 3, EOS_ID], [9, EOS_ID, 0]])
    x_mask = (x != 0).astype(jnp.int32)
    y1 = jnp.array([[10, 4, EOS_ID], [3, 11, 40]])
    y2 = jnp.array([[3, 4, EOS_ID], [12, 41, EOS_ID]])
    ones = jnp.ones_like(y1)
    tokens, _ = pref.pack_pair(x, x_mask, y1, ones, y2, ones)
    np.testing.assert_array_equal(
        tokens[:, :9], [[7, 2, 1, 10, 2, 3, 2, 2, 4], [9, 1, 2, 11, 40, 3, 12, 41, 4]]
    )
    tokens, _ = pref.pack_pair(x, x_mask, y1, ones, y2, ones, markers=(40, 41))
    np.testing.assert_array_equal(
        tokens[:, :9], [[7, 3, 1, 10, 4, 40, 3, 4, 41], [9, 1, 3, 11, 2, 40, 12, 2, 41]]
    )


def test_a_pm_marks_and_reads_its_own_pm_ids():
    """A PM whose config names other marker ids (embedding rows past a loaded tokenizer's
    pieces) ends y1 / y2 with them and reads its score from their logits, in training, in
    judging and in the trainers' dataset scoring, which all agree."""
    from ipo_gap.train import trainers

    cfg = PM_CFG.replace(vocab_size=V + 2, pm_ids=(V, V + 1))  # content ids lie in [6, V)
    model = t5.init(cfg, key=jax.random.key(3))
    batch = make_pairs(np.random.default_rng(1), 8)
    args = (batch.x, batch.x_mask, batch.y_w, batch.y_w_mask, batch.y_l, batch.y_l_mask)
    # Jitted, as every caller runs them (op by op, the test spent 10 s dispatching).
    tokens, mask = jax.jit(pref.pack_pair, static_argnames="markers")(*args, markers=cfg.pm_ids)
    assert int(jnp.sum(tokens == V)) == int(jnp.sum(tokens == V + 1)) == 8
    assert not jnp.isin(tokens, jnp.array([3, 4])).any()
    start = jnp.zeros((8, 1), jnp.int32)
    logits = jax.jit(t5.forward)(model, tokens, mask, start)[:, 0]
    pm_logit = jax.jit(pref.pm_logit)(model, tokens, mask)
    np.testing.assert_allclose(pm_logit, logits[:, V] - logits[:, V + 1], rtol=1e-6)
    both_orders = jax.jit(pref.pair_logits_both_orders)
    z12, z21 = both_orders(model, *args)
    np.testing.assert_allclose(z12, pm_logit, rtol=1e-5, atol=1e-6)
    r12, r21 = trainers.pair_logit_rows(model, *(np.asarray(a) for a in args), batch_size=8)
    np.testing.assert_allclose(r12, z12, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r21, z21, rtol=1e-4, atol=1e-5)
    same_weights = t5.init(cfg.replace(pm_ids=(3, 4)), key=jax.random.key(3))
    assert not np.allclose(both_orders(same_weights, *args)[0], z12)
    assert cfg.to_dict()["pm_ids"] == [V, V + 1] and "pm_ids" not in PM_CFG.to_dict()
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="pad, eos and unk"):
        PM_CFG.replace(pm_ids=(2, 5))
    with pytest.raises(ValueError, match="two different ints"):
        PM_CFG.replace(pm_ids=(5, 5))


def test_pack_pair_too_short_raises():
    x = jnp.ones((2, 4), jnp.int32)
    y = jnp.ones((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="too short"):
        pref.pack_pair(x, x, y, y, y, y, length=12)
    with pytest.raises(ValueError, match="mask shape"):
        pref.pack_pair(x, x[:, :3], y, y, y, y)


# --------------------------------------------------------------------------------------------
# Losses.


def test_bce_with_logits_closed_form():
    loss, metrics = pref.bce_with_logits(jnp.array([2.0, -1.0, 0.5]), jnp.array([1, 0, 0]))
    want = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(-1.0)), np.log1p(np.exp(0.5))])
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], 2 / 3, rtol=1e-6)
    assert loss.dtype == jnp.float32


def test_pm_loss_is_randomised_bce_and_deterministic():
    model = t5.init(PM_CFG, key=jax.random.key(5))  # untrained: moderate logits
    batch = make_pairs(np.random.default_rng(3), 64)

    @jax.jit
    def loss_and_logits(model, batch, key):
        """pm_loss, and the readout logits of the order the same key presents."""
        first = pref.random_order(key, batch.x.shape[0])
        return (
            pref.pm_loss(model, batch, key),
            first,
            pref.pm_logit(model, *pref.pack_pair(*_present(batch, first))),
        )

    key = jax.random.key(11)
    (loss, metrics), first, z = loss_and_logits(model, batch, key)
    first, z = np.asarray(first), np.asarray(z, np.float64)
    assert 0 < first.sum() < 64  # both orders occur
    np.testing.assert_allclose(metrics["winner_first"], first.mean())
    t = first.astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-z))
    want = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean((z > 0) == first), rtol=1e-6)
    (again, _), first_again, _ = loss_and_logits(model, batch, key)
    assert float(again) == float(loss)  # same key, same bits
    np.testing.assert_array_equal(first_again, first)
    (_, _), other, _ = loss_and_logits(model, batch, jax.random.key(12))
    assert np.any(np.asarray(other) != first)


# --------------------------------------------------------------------------------------------
# Policy as classifier.


def test_margin_accuracy_and_drift_closed_forms():
    margin = classify.policy_margin(
        jnp.array([-1.0, -2.0]),
        jnp.array([-3.0, -1.0]),
        jnp.array([-2.0, -1.5]),
        jnp.array([-2.5, -1.0]),
    )
    np.testing.assert_allclose(margin, [(-1 + 3) - (-2 + 2.5), (-2 + 1) - (-1.5 + 1)])
    margins = jnp.array([1.0, -1.0, 2.0, 0.0, -3.0, 1.0, 0.0])
    labels = jnp.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5])
    # correct, correct, wrong, zero margin vs decisive (0.5), tie labels (0.5 each)
    np.testing.assert_allclose(
        classify.classification_accuracy(margins, labels), (1 + 1 + 0 + 0.5 + 1.5) / 7
    )
    np.testing.assert_allclose(
        classify.winner_logprob_drift(jnp.array([-1.0, -4.0]), jnp.array([-2.0, -2.0])), -0.5
    )
    np.testing.assert_allclose(
        classify.self_classification_accuracy(
            jnp.array([-1.0, -1.0]),
            jnp.array([-2.0, -2.0]),
            jnp.zeros(2),
            jnp.zeros(2),
            jnp.array([1.0, 0.0]),
        ),
        0.5,
    )
    with pytest.raises(ValueError):
        classify.classification_accuracy(jnp.zeros(3), jnp.zeros(4))


def test_pair_logprobs_match_teacher_forcing_with_one_encoder_pass(monkeypatch):
    policy = t5.init(PM_CFG, key=jax.random.key(0))
    reference = t5.init(PM_CFG, key=jax.random.key(1))
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.integers(3, V, (3, 5)), jnp.int32)
    x_mask = jnp.array([[1] * 5, [1] * 3 + [0] * 2, [1] * 2 + [0] * 3], jnp.int32)
    y1 = jnp.asarray(rng.integers(3, V, (3, 6)), jnp.int32)
    y1_mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5], jnp.int32)
    y2 = jnp.asarray(rng.integers(3, V, (3, 4)), jnp.int32)  # a different T
    y2_mask = jnp.array([[1] * 4, [1] * 2 + [0] * 2, [1] * 3 + [0]], jnp.int32)
    data = (x, x_mask, y1, y1_mask, y2, y2_mask)

    calls = {"encode": 0, "decode": 0}
    for name in calls:
        original = getattr(t5, name)

        def counted(*a, _name=name, _original=original):
            calls[_name] += 1
            return _original(*a)

        monkeypatch.setattr(t5, name, counted)
    jax.eval_shape(classify.policy_and_reference_logprobs, policy, reference, *data)
    assert calls == {"encode": 2, "decode": 2}  # one encoder and one decoder pass per model
    monkeypatch.undo()

    def direct(model):
        """Independent path: x encoded once per response, each response teacher-forced."""
        y2_padded = jnp.pad(y2, ((0, 0), (0, 2)))
        y2_mask_padded = jnp.pad(y2_mask, ((0, 0), (0, 2)))
        y_2B = jnp.concatenate([y1, y2_padded])
        y_mask_2B = jnp.concatenate([y1_mask, y2_mask_padded])
        logits = t5.forward(
            model, jnp.concatenate([x, x]), jnp.concatenate([x_mask, x_mask]), t5.shift_right(y_2B)
        )
        logp_2B = logprobs.sequence_logprobs(logits, y_2B, y_mask_2B)
        return logp_2B[:3], logp_2B[3:]

    @jax.jit
    def both(policy, reference):
        got = classify.policy_and_reference_logprobs(policy, reference, *data)
        return got, (*direct(policy), *direct(reference))

    got, want = both(policy, reference)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(np.asarray(got.logp1) - np.asarray(got.ref1)) > 1e-3)  # two models
