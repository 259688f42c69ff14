"""The ancestral sampler: determinism, greedy limit, EOS handling, exactness (chi-square)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FORWARD, tiny_config
from scipy import stats

from ipo_gap import sampling
from ipo_gap.t5 import model as t5
from ipo_gap.tokenizer import EOS_ID, PAD_ID


def _setup(B=4, S=6, **overrides):
    cfg = tiny_config(**overrides)
    model = t5.init(cfg, key=jax.random.key(0))
    src = jax.random.randint(jax.random.key(1), (B, S), 3, cfg.vocab_size)
    mask = (jnp.arange(S)[None] < jnp.array([S, 3, 5, 1][:B])[:, None]).astype(jnp.int32)
    return cfg, model, src * mask, mask


def _teacher_forced_logprobs(model, src, mask, tokens):
    logits = FORWARD(model, src, mask, t5.shift_right(tokens))
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def test_same_key_same_samples_and_different_keys_differ():
    _, model, src, mask = _setup()
    a = sampling.sample(model, src, mask, key=jax.random.key(3), max_len=12)
    b = sampling.sample(model, src, mask, key=jax.random.key(3), max_len=12)
    c = sampling.sample(model, src, mask, key=jax.random.key(4), max_len=12)
    for x, y in zip(a, b, strict=False):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.tokens, c.tokens)


def test_logprobs_are_the_policys_and_padding_after_eos():
    # A vocabulary of 8 makes EOS frequent, so rows stop at different lengths.
    _, model, src, mask = _setup(vocab_size=8)
    out = sampling.sample(model, src, mask, key=jax.random.key(5), max_len=10)
    tokens, logprobs, m = map(np.asarray, out)
    lengths = m.sum(1)
    assert len(set(lengths.tolist())) > 1, "rows should stop at different lengths"
    for row, n in zip(tokens, lengths, strict=False):
        if n < tokens.shape[1]:
            assert row[n - 1] == EOS_ID and (row[n:] == PAD_ID).all()
        assert EOS_ID not in row[: n - 1]
    assert (logprobs[m == 0] == 0).all()
    ref = np.asarray(_teacher_forced_logprobs(model, src, mask, out.tokens))
    np.testing.assert_allclose(logprobs[m == 1], ref[m == 1], atol=1e-5)


def test_given_encoder_output_gives_the_same_samples():
    _, model, src, mask = _setup()
    a = sampling.sample(model, src, mask, key=jax.random.key(3), max_len=12)
    enc = jax.jit(t5.encode)(model, src, mask)
    b = sampling.sample(model, src, mask, key=jax.random.key(3), max_len=12, enc=enc)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
    with pytest.raises(ValueError, match="does not match src"):
        sampling.sample(model, src, mask, key=jax.random.key(3), max_len=12, enc=enc[:, :2])


def test_temperature_to_zero_is_greedy():
    _, model, src, mask = _setup()
    greedy = sampling.sample(model, src, mask, key=jax.random.key(0), max_len=8, temperature=0.0)
    cold = sampling.sample(model, src, mask, key=jax.random.key(9), max_len=8, temperature=1e-4)
    np.testing.assert_array_equal(greedy.tokens, cold.tokens)
    # And greedy really is the argmax of the teacher-forced logits along its own path.
    logits = FORWARD(model, src, mask, t5.shift_right(greedy.tokens))
    m = np.asarray(greedy.mask) == 1
    np.testing.assert_array_equal(
        np.asarray(jnp.argmax(logits, -1))[m], np.asarray(greedy.tokens)[m]
    )


def test_top_k_and_top_p_truncate():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    k2 = sampling.process_logits(logits, temperature=1.0, top_k=2, top_p=1.0)
    assert np.isfinite(k2[0, :2]).all() and np.isneginf(k2[0, 2:]).all()
    p = sampling.process_logits(logits, temperature=1.0, top_k=0, top_p=0.7)
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is the first two tokens.
    assert np.isfinite(p[0, :2]).all() and np.isneginf(p[0, 2:]).all()
    p = sampling.process_logits(logits, temperature=1.0, top_k=0, top_p=0.5)
    assert np.isfinite(p[0, :1]).all() and np.isneginf(p[0, 1:]).all()
    t = sampling.process_logits(logits, temperature=2.0, top_k=0, top_p=1.0)
    np.testing.assert_allclose(t, logits / 2)
    _, model, src, mask = _setup()
    out = sampling.sample(model, src, mask, key=jax.random.key(0), max_len=6, top_k=1)
    greedy = sampling.sample(model, src, mask, key=jax.random.key(0), max_len=6, temperature=0.0)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_allclose(out.logprobs, 0.0, atol=1e-6)  # a point mass


def test_bad_arguments():
    _, model, src, mask = _setup()
    with pytest.raises(ValueError, match="max_len"):
        sampling.sample(model, src, mask, key=jax.random.key(0), max_len=0)
    with pytest.raises(ValueError, match="top_p"):
        sampling.sample(model, src, mask, key=jax.random.key(0), max_len=3, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sampling.sample(model, src, mask, key=jax.random.key(0), max_len=3, temperature=-1.0)
    with pytest.raises(ValueError, match="mask"):
        sampling.sample(model, src, mask[:, :2], key=jax.random.key(0), max_len=3)


def test_sample_frequencies_match_sequence_probabilities():
    """Chi-square: empirical frequencies of whole responses vs the model's own probabilities.

    Vocabulary of 5 (pad, eos, unk, a, b), responses of at most 3 tokens: every possible
    response is enumerated and its probability computed by teacher forcing.
    """
    cfg = tiny_config(vocab_size=5, d_model=16, d_ff=16, num_heads=2, d_kv=8)
    model = t5.init(cfg, key=jax.random.key(11))
    T, N = 3, 40_000
    src = jnp.array([[3, 4, 3]], jnp.int32)
    mask = jnp.ones_like(src)
    # Enumerate responses: sequences over {0,2,3,4} ending with EOS at length <= 3, or
    # length-3 sequences without EOS (truncated).
    non_eos = [0, 2, 3, 4]
    responses = []
    for n in range(T):
        for prefix in itertools.product(non_eos, repeat=n):
            responses.append(list(prefix) + [EOS_ID] + [PAD_ID] * (T - n - 1))
    responses += [list(p) for p in itertools.product(non_eos, repeat=T)]
    resp = jnp.array(responses, jnp.int32)
    resp_mask = sampling.response_mask(resp)
    k = resp.shape[0]
    lp = _teacher_forced_logprobs(model, jnp.repeat(src, k, 0), jnp.repeat(mask, k, 0), resp)
    probs = np.exp(np.asarray((lp * resp_mask).sum(1), np.float64))
    assert abs(probs.sum() - 1) < 1e-4, probs.sum()

    out = sampling.sample(
        model, jnp.repeat(src, N, 0), jnp.repeat(mask, N, 0), key=jax.random.key(2024), max_len=T
    )
    index = {tuple(r): i for i, r in enumerate(responses)}
    counts = np.zeros(k)
    for row in np.asarray(out.tokens):
        counts[index[tuple(row.tolist())]] += 1
    expected = probs / probs.sum() * N
    keep = expected >= 5  # chi-square validity; pool the rare cells
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    chi2 = ((obs - exp) ** 2 / exp).sum()
    p_value = stats.chi2.sf(chi2, len(obs) - 1)
    assert p_value > 1e-3, (chi2, p_value)
    # The test has power: a sampler at temperature 1.5 is rejected.
    hot = sampling.sample(
        model,
        jnp.repeat(src, N, 0),
        jnp.repeat(mask, N, 0),
        key=jax.random.key(2024),
        max_len=T,
        temperature=1.5,
    )
    hot_counts = np.zeros(k)
    for row in np.asarray(hot.tokens):
        hot_counts[index[tuple(row.tolist())]] += 1
    obs = np.append(hot_counts[keep], hot_counts[~keep].sum())[: len(exp)]
    assert stats.chi2.sf(((obs - exp) ** 2 / exp).sum(), len(obs) - 1) < 1e-6


def test_first_argmax_is_argmax_with_ties_infinities_and_nan():
    x = jnp.array(
        [
            [0.0, 2.0, 2.0, 1.0],  # tie: the first maximum
            [-jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf],  # all -inf: index 0
            [1.0, jnp.nan, 3.0, jnp.nan],  # NaN counts as the maximum, the first one
            [-1.0, -jnp.inf, jnp.inf, jnp.inf],
        ]
    )
    got = jax.jit(sampling.first_argmax)(x)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, jnp.argmax(x, axis=-1))
    y = jax.random.randint(jax.random.key(0), (64, 37), 0, 5).astype(jnp.float32)  # many ties
    np.testing.assert_array_equal(jax.jit(sampling.first_argmax)(y), jnp.argmax(y, axis=-1))


def test_categorical_draws_the_same_tokens_as_jax_random_categorical():
    """Same tokens as jax.random.categorical for every key (the sampler's draw)."""
    logits = 3.0 * jax.random.normal(jax.random.key(1), (8, 300))
    logits = logits.at[:, 1].set(-jnp.inf)  # as min_len masks EOS

    def both(k):
        return sampling.categorical(k, logits), jax.random.categorical(k, logits)

    ours, ref = jax.jit(jax.vmap(both))(jax.random.split(jax.random.key(2), 500))
    np.testing.assert_array_equal(ours, ref)
    assert not (ours == 1).any()
