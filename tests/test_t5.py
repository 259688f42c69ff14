"""Invariants of the T5 model: cached = teacher-forced decoding, causality, padding, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FORWARD, tiny_config

from ipo_gap.configs import MODEL_PRESETS, T5Config, model_preset
from ipo_gap.t5 import model as t5
from ipo_gap.t5.layers import relative_position_bucket


def _inputs(cfg, B=3, S=7, T=9, seed=1):
    k1, k2 = jax.random.split(jax.random.key(seed))
    src = jax.random.randint(k1, (B, S), 3, cfg.vocab_size)
    lengths = jnp.array([S, 4, 2][:B])
    mask = (jnp.arange(S)[None] < lengths[:, None]).astype(jnp.int32)
    src = src * mask
    tgt = jax.random.randint(k2, (B, T), 3, cfg.vocab_size)
    return src, mask, tgt


VARIANTS = [{}, {"feed_forward": "relu", "tie_word_embeddings": True}, {"scan_layers": False}]


@pytest.mark.parametrize(
    "overrides, atol",
    [(v, 1e-5) for v in VARIANTS] + [({"compute_dtype": "bfloat16"}, 0.1)],
    ids=["v1.1", "original", "unrolled", "bf16"],
)
def test_cached_decode_equals_teacher_forced(overrides, atol):
    """In bf16 compute each path rounds its products after summing in its own order: equal
    to bf16 precision (about 0.03 here; a wrong cache position or mask is off by ~1)."""
    cfg = tiny_config(**overrides)
    model = t5.init(cfg, key=jax.random.key(0))
    src, mask, tgt = _inputs(cfg)
    dec_in = t5.shift_right(tgt)
    logits = jax.jit(t5.forward)(model, src, mask, dec_in)
    enc = jax.jit(t5.encode)(model, src, mask)
    cache = jax.jit(t5.init_cache, static_argnums=3)(model, enc, mask, dec_in.shape[1])
    step = jax.jit(t5.decode_step)
    cached = []
    for t in range(dec_in.shape[1]):
        out, cache = step(model, cache, dec_in[:, t])
        cached.append(out)
    np.testing.assert_allclose(np.stack(cached, 1), logits, atol=atol, rtol=0)
    assert int(cache.index) == dec_in.shape[1]
    assert float(jnp.std(logits)) > 0.1  # not a degenerate model
    # The cache is full: a further step has no slot. Jitted, its logits are NaN (writing
    # would have overwritten the last position); eagerly, it raises.
    past, _ = step(model, cache, dec_in[:, 0])
    assert np.isnan(np.asarray(past)).all()
    with pytest.raises(ValueError, match=f"cache holds {dec_in.shape[1]} positions"):
        t5.decode_step(model, cache, dec_in[:, 0])


def test_scan_and_unrolled_layers_agree():
    cfg = tiny_config()
    model = t5.init(cfg, key=jax.random.key(0))
    unrolled = t5.T5(
        model.embedding, model.encoder, model.decoder, model.lm_head, cfg.replace(scan_layers=False)
    )
    src, mask, tgt = _inputs(cfg)
    a = FORWARD(model, src, mask, t5.shift_right(tgt))
    b = FORWARD(unrolled, src, mask, t5.shift_right(tgt))
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_remat_gives_the_same_values_and_keeps_fewer_activations():
    """T5Config.remat recomputes each block in the backward pass: loss and gradients equal
    the stored-activation ones to rounding (not bit for bit: XLA fuses the recomputation
    differently), and the compiled step keeps far fewer temporaries."""
    import equinox as eqx

    cfg = tiny_config(num_encoder_layers=4, num_decoder_layers=4)
    model = t5.init(cfg, key=jax.random.key(0))
    remat = t5.T5(
        model.embedding, model.encoder, model.decoder, model.lm_head, cfg.replace(remat=True)
    )
    src = jax.random.randint(jax.random.key(1), (8, 96), 3, cfg.vocab_size)
    mask = jnp.ones_like(src)
    tgt = jax.random.randint(jax.random.key(2), (8, 32), 3, cfg.vocab_size)

    def loss(m):
        logits = t5.forward(m, src, mask, t5.shift_right(tgt))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], -1))

    grad = jax.jit(jax.value_and_grad(loss))
    (l0, g0), (l1, g1) = grad(model), grad(remat)
    assert float(l0) == float(l1)  # the forward pass is the same program
    g0, g1 = (jax.tree.leaves(eqx.filter(g, eqx.is_array)) for g in (g0, g1))
    for a, b in zip(g0, g1, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    temp = [grad.lower(m).compile().memory_analysis().temp_size_in_bytes for m in (model, remat)]
    assert temp[1] < 0.6 * temp[0], temp


def test_remat_is_left_out_of_a_config_dict_when_off():
    cfg = tiny_config()
    assert "remat" not in cfg.to_dict()  # configs of older code hash the same
    on = cfg.replace(remat=True)
    assert on.to_dict()["remat"] is True and T5Config.from_dict(on.to_dict()) == on
    with pytest.raises(ValueError, match="remat must be a bool"):
        tiny_config(remat=1)
    with pytest.raises(ValueError, match="remat needs scan_layers=True"):
        tiny_config(remat=True, scan_layers=False)


def test_decoder_is_causal():
    cfg = tiny_config()
    model = t5.init(cfg, key=jax.random.key(0))
    src, mask, tgt = _inputs(cfg)
    dec_in = t5.shift_right(tgt)
    base = FORWARD(model, src, mask, dec_in)
    changed = dec_in.at[:, 5].set((dec_in[:, 5] + 1) % cfg.vocab_size)
    after = FORWARD(model, src, mask, changed)
    np.testing.assert_allclose(after[:, :5], base[:, :5], atol=1e-6, rtol=0)
    assert float(jnp.abs(after[:, 5:] - base[:, 5:]).max()) > 1e-3


def test_padding_in_source_is_ignored():
    cfg = tiny_config()
    model = t5.init(cfg, key=jax.random.key(0))
    src, mask, tgt = _inputs(cfg)
    dec_in = t5.shift_right(tgt)
    base = FORWARD(model, src, mask, dec_in)
    garbage = jnp.where(mask == 0, 17, src)  # change only padded positions
    np.testing.assert_allclose(FORWARD(model, garbage, mask, dec_in), base, atol=1e-6)
    # ...while a real token does matter.
    real = src.at[0, 0].set((src[0, 0] + 1) % cfg.vocab_size)
    assert float(jnp.abs(FORWARD(model, real, mask, dec_in)[0] - base[0]).max()) > 1e-4


def test_relative_position_buckets_match_reference_definition():
    # Reference values computed by hand from the Mesh-TF definition (num_buckets 32,
    # max_distance 128): bidirectional uses 16 buckets per direction, 8 exact.
    rel = jnp.array([-200, -128, -20, -8, -7, -1, 0, 1, 7, 8, 20, 128, 200])
    bi = relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    # distance d >= 8: 8 + int(log(d/8)/log(16) * 8); d=20 -> 8+int(2.643) = 10; d=128 -> 16->15.
    np.testing.assert_array_equal(bi, [15, 15, 10, 8, 7, 1, 0, 17, 23, 24, 26, 31, 31])
    causal = relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    # causal: 32 buckets for the past, 16 exact; future positions all map to 0.
    # d=20 -> 16 + int(log(20/16)/log(8) * 16) = 16 + int(1.717) = 17.
    np.testing.assert_array_equal(causal, [31, 31, 17, 8, 7, 1, 0, 0, 0, 0, 0, 0, 0])


def test_param_counts_and_axes():
    assert MODEL_PRESETS["small"].num_params() == 76_961_152  # google/t5-v1_1-small
    assert MODEL_PRESETS["toy"].num_params() == 5_246_208  # ../shared/bench toy config
    sizes = [MODEL_PRESETS[n].num_params() for n in ("toy-s", "toy-m", "toy-l")]
    assert all(3 < b / a < 5 for a, b in zip(sizes[:-1], sizes[1:], strict=False))
    for overrides in VARIANTS[:2]:
        cfg = tiny_config(**overrides)
        model = t5.init(cfg, key=jax.random.key(0))
        assert t5.num_params(model) == cfg.num_params()
        axes = t5.logical_axes(model)
        leaves = jax.tree.leaves(axes)
        assert len(leaves) == len(jax.tree.leaves(model))
        assert axes.encoder.layers.sa.q.names == ("layers", "embed", "heads", "kv")
        assert axes.embedding.names == ("vocab", "embed")


def test_init_by_counters_equals_init_bit_for_bit():
    """The per-element counter init (what sharding.init_model jits with out_shardings) draws
    exactly `init`'s values, for both variants; the sharded placement is tested in
    test_sharding.py."""
    for overrides in VARIANTS[:2]:
        cfg = tiny_config(**overrides)
        key = jax.random.key(3)
        assert t5.counters_supported(key)
        want, got = t5.init(cfg, key=key), t5.init_by_counters(cfg, key=key)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("offset", [0, 5, 2**32 - 5, 2**32, 2**33 + 7, 3 * 2**32 - 1])
@pytest.mark.parametrize("shape", [(16,), (3, 5), (2, 3, 4)])
def test_counters_carry_into_the_high_word_as_jax_does(offset, shape):
    """A parameter past element 2**32 of the model's normal vector (a model over 4G
    parameters, e.g. XXL at 4.9G ... 11B) needs the low word's carry: the counters equal the
    64-bit index split in words (numpy uint64) and jax's own partitionable counters
    (`iota_2x32_shape` of the whole vector, sliced: XLA computes only the slice)."""
    from jax._src.random.prng import iota_2x32_shape  # the convention jax.random follows

    n = int(np.prod(shape))
    hi, lo = (np.asarray(a) for a in t5._counters_at(offset, shape))
    index = np.uint64(offset) + np.arange(n, dtype=np.uint64)
    np.testing.assert_array_equal(hi.ravel(), (index >> np.uint64(32)).astype(np.uint32))
    np.testing.assert_array_equal(lo.ravel(), (index & np.uint64(0xFFFFFFFF)).astype(np.uint32))
    jax_hi, jax_lo = jax.jit(
        lambda: tuple(a[offset : offset + n] for a in iota_2x32_shape((offset + n,)))
    )()
    np.testing.assert_array_equal(hi.ravel(), np.asarray(jax_hi))
    np.testing.assert_array_equal(lo.ravel(), np.asarray(jax_lo))


def test_normal_at_is_one_vector_across_the_carry():
    """Drawing elements [2**32 - 5, 2**32 + 5) at once or from any split point gives the same
    values (a parameter straddling the boundary is drawn as one slice of the vector), and the
    high word matters: they differ from elements [0, 5) and [2**33 - 5, 2**33 + 5)."""
    key_data = jax.random.key_data(jax.random.key(11))
    start = 2**32 - 5
    whole = np.asarray(t5._normal_at(key_data, start, (10,)))
    for i in (1, 5, 6, 9):
        part = np.asarray(t5._normal_at(key_data, start + i, (10 - i,)))
        np.testing.assert_array_equal(part, whole[i:])
    same_low_words = np.asarray(t5._normal_at(key_data, 0, (5,)))  # hi 0, lo 0..4
    assert not np.any(same_low_words == whole[5:])  # hi 1, lo 0..4
    assert not np.any(np.asarray(t5._normal_at(key_data, start + 2**32, (10,))) == whole)
    with pytest.raises(ValueError, match="outside"):
        t5._counters_at(2**64 - 3, (4,))


def test_bf16_params_and_compute():
    cfg = tiny_config(param_dtype="bfloat16", compute_dtype="bfloat16")
    model = t5.init(cfg, key=jax.random.key(0))
    assert model.encoder.layers.sa.q.dtype == jnp.bfloat16
    ref = t5.init(
        cfg.replace(param_dtype="float32", compute_dtype="float32"), key=jax.random.key(0)
    )
    src, mask, tgt = _inputs(cfg)
    lo = FORWARD(model, src, mask, t5.shift_right(tgt))
    hi = FORWARD(ref, src, mask, t5.shift_right(tgt))
    assert lo.dtype == jnp.float32  # logits are always float32
    # bf16 has ~3 significant digits: close but not equal.
    err = float(jnp.abs(lo - hi).max() / jnp.abs(hi).max())
    assert 0 < err < 0.1


def test_bad_inputs_raise_clear_errors():
    cfg = tiny_config()
    model = t5.init(cfg, key=jax.random.key(0))
    src, mask, tgt = _inputs(cfg)
    with pytest.raises(ValueError, match="src_mask shape"):
        t5.encode(model, src, mask[:, :-1])
    with pytest.raises(ValueError, match="integer array"):
        t5.encode(model, src.astype(jnp.float32), mask)
    enc = jnp.zeros(src.shape + (cfg.d_model,))
    with pytest.raises(ValueError, match="batch"):
        t5.decode(model, enc, mask, tgt[:2])
    with pytest.raises(ValueError, match="must be a positive int"):
        T5Config(
            vocab_size=0,
            d_model=8,
            d_ff=8,
            num_heads=1,
            d_kv=8,
            num_encoder_layers=1,
            num_decoder_layers=1,
        )
    with pytest.raises(ValueError, match="feed_forward"):
        tiny_config(feed_forward="swish")
    with pytest.raises(ValueError, match="unknown model preset"):
        model_preset("huge")


def test_unstacked_models_compute_what_the_stacked_model_does_and_scanned_stacks_stay_stacked():
    """`t5.unstacked` hands each layer's weights to a program as their own arrays, with the
    attention projections packed (q, k, v in one product; cross-attention's k, v in one):
    teacher-forced logits, the exact KL and the sampler agree with the stacked model's to
    float32 rounding (a packed product may sum in another order: its bits can differ by the
    shape and the CPU). A config that scans its layers comes back as it is; scanning
    per-layer blocks is refused."""
    from ipo_gap import kl, sampling
    from ipo_gap.t5 import layers

    cfg = tiny_config(scan_layers=False, num_encoder_layers=3)
    policy, ref = t5.init(cfg, key=jax.random.key(0)), t5.init(cfg, key=jax.random.key(1))
    flat = t5.unstacked(policy)
    assert isinstance(flat.encoder.layers, tuple) and len(flat.encoder.layers) == 3
    assert flat.decoder.layers[1].mlp.wo.shape == policy.decoder.layers.mlp.wo.shape[1:]
    assert t5.unstacked(flat).encoder.layers[0].mlp.wo is flat.encoder.layers[0].mlp.wo
    assert t5.unstacked(flat).decoder.layers[0].sa.qkv is flat.decoder.layers[0].sa.qkv
    # The packed weights are the layer's own, in the order q, k, v.
    sa, ca = flat.decoder.layers[1].sa, flat.decoder.layers[1].ca
    assert isinstance(sa, layers.PackedSelfAttention)
    assert isinstance(ca, layers.PackedCrossAttention)
    stacked = policy.decoder.layers
    for i, name in enumerate("qkv"):
        assert bool(jnp.array_equal(sa.qkv[:, i], getattr(stacked.sa, name)[1]))
    for i, name in enumerate("kv"):
        assert bool(jnp.array_equal(ca.kv[:, i], getattr(stacked.ca, name)[1]))
    assert bool(jnp.array_equal(ca.q, stacked.ca.q[1]))
    src = jax.random.randint(jax.random.key(2), (3, 7), 5, cfg.vocab_size)
    src_mask = jnp.ones_like(src).at[1, 5:].set(0)
    tgt = jax.random.randint(jax.random.key(3), (3, 5), 5, cfg.vocab_size)
    fwd = jax.jit(t5.forward)
    a, b = fwd(policy, src, src_mask, tgt), fwd(flat, src, src_mask, tgt)
    assert a.dtype == b.dtype
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    kl_fn = jax.jit(kl.teacher_forced_kl)
    mask = jnp.ones_like(tgt)
    ka = kl_fn(policy, ref, src, src_mask, tgt, mask)
    kb = kl_fn(flat, t5.unstacked(ref), src, src_mask, tgt, mask)
    for x, y in zip(ka, kb, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
    sa = sampling.sample(policy, src, src_mask, key=jax.random.key(4), max_len=6)
    sb = sampling.sample(flat, src, src_mask, key=jax.random.key(4), max_len=6)
    assert bool(jnp.array_equal(sa.tokens, sb.tokens)) and bool(jnp.array_equal(sa.mask, sb.mask))
    np.testing.assert_allclose(sb.logprobs, sa.logprobs, rtol=1e-5, atol=1e-5)
    scanned = t5.init(tiny_config(), key=jax.random.key(0))
    assert t5.unstacked(scanned) is scanned
    scanning = t5.T5(flat.embedding, flat.encoder, flat.decoder, flat.lm_head, tiny_config())
    with pytest.raises(ValueError, match="run unrolled only"):
        fwd(scanning, src, src_mask, tgt)


def test_stacks_up_to_eight_layers_run_unrolled_deeper_ones_scan():
    """The execution choice (`configs.UNROLL_MAX_LAYERS`): the public presets and a loaded
    Hugging Face config unroll stacks of up to 8 layers (T5 v1.1 small) and scan deeper ones
    (base, large, ...); remat always scans."""
    from ipo_gap import checkpoint
    from ipo_gap.configs import UNROLL_MAX_LAYERS

    assert UNROLL_MAX_LAYERS == 8
    assert not model_preset("small").scan_layers and model_preset("base").scan_layers
    assert all(model_preset(n).scan_layers for n in ("large", "xl", "xxl"))
    hf = {"vocab_size": 64, "d_model": 32, "d_ff": 48, "num_heads": 4, "d_kv": 8,
          "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}  # fmt: skip
    for layers, scans in ((8, False), (9, True)):
        assert (
            checkpoint.hf_config_to_t5(hf | {"num_layers": layers}, has_lm_head=True).scan_layers
            == scans
        )
    assert checkpoint.hf_config_to_t5(
        hf | {"num_layers": 2}, has_lm_head=True, remat=True
    ).scan_layers
