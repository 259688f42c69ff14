"""The T5 encoder-decoder: init, encode, teacher-forced decode, and one-step cached decode.

Forward passes are pure functions of (model, inputs); the KV cache is passed in and returned.
Blocks of a stack are stored stacked along a leading "layers" axis and run with lax.scan (or
unrolled, `cfg.scan_layers=False`). The relative position bias is computed once per stack and
shared by its layers; cross-attention has no position bias (as in T5).

Numerics: matmul inputs are cast to `cfg.compute_dtype` and every product accumulates in
float32 (t5/layers.py `product`); the residual stream, RMSNorm, softmax and logits are float32.

Shape legend (used in names like `logits_BxTxV`):
  B batch, S source (prompt) length, T target (response) length, D d_model, H heads,
  K head dim (d_kv), F d_ff, V vocab, L layers.

Token conventions (T5): pad 0, eos 1, unk 2; the decoder input is the target shifted right
with the start token 0 (= pad), see `shift_right`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.extend.random as jax_random_ext
import jax.numpy as jnp
import numpy as np

from ipo_gap.configs import T5Config
from ipo_gap.t5.layers import (
    MASK_VALUE,
    PARAM_AXES,
    Attention,
    GatedGeluMLP,
    PackedCrossAttention,
    PackedSelfAttention,
    RelativeBias,
    ReluMLP,
    RMSNorm,
    attend_one_heads,
    dense,
)

DECODER_START_ID = 0


class EncoderBlock(eqx.Module):
    ln_sa: RMSNorm
    sa: Attention
    ln_ff: RMSNorm
    mlp: GatedGeluMLP | ReluMLP


class DecoderBlock(eqx.Module):
    ln_sa: RMSNorm
    sa: Attention
    ln_ca: RMSNorm
    ca: Attention
    ln_ff: RMSNorm
    mlp: GatedGeluMLP | ReluMLP


class Stack(eqx.Module):
    # Arrays carry a leading L axis; `unstacked` makes it a tuple of L blocks (read-only use).
    layers: EncoderBlock | DecoderBlock | tuple
    rel: RelativeBias
    final_ln: RMSNorm


class T5(eqx.Module):
    """A T5 (v1.1 or original) encoder-decoder. Holds arrays and its static config only."""

    embedding: jax.Array  # V x D, shared by encoder and decoder
    encoder: Stack
    decoder: Stack
    lm_head: jax.Array | None  # D x V; None when tied to the embedding
    cfg: T5Config = eqx.field(static=True)


class DecodeCache(NamedTuple):
    """KV cache of one decoding run: self-attention K/V grow one position per step.

    K/V are tuples with one array per decoder layer (not stacked), so that a decode step
    updates each in place and reads it without slicing a stacked buffer.
    """

    self_k: tuple[jax.Array, ...]  # L x (B x H x T x K): heads-major, see `attend_one`
    self_v: tuple[jax.Array, ...]  # L x (B x H x T x K)
    cross_k: tuple[jax.Array, ...]  # L x (B x H x S x K), computed once from the encoder
    cross_v: tuple[jax.Array, ...]  # L x (B x H x S x K)
    src_mask: jax.Array  # B x S
    index: jax.Array  # int32 scalar: position of the next token to decode


def _mlp_init(cfg: T5Config, draw, lead):
    cls = GatedGeluMLP if cfg.feed_forward == "gated-gelu" else ReluMLP
    return cls.init(cfg.d_model, cfg.d_ff, draw=draw, lead=lead)


def _attention_init(cfg: T5Config, draw, lead):
    return Attention.init(cfg.d_model, cfg.num_heads, cfg.d_kv, draw=draw, lead=lead)


def _stack(cfg: T5Config, draw, decoder: bool) -> Stack:
    L = cfg.num_decoder_layers if decoder else cfg.num_encoder_layers
    lead, dt, eps = (L,), cfg.param_jnp_dtype, cfg.layer_norm_epsilon
    if decoder:
        layers = DecoderBlock(
            ln_sa=RMSNorm.init(cfg.d_model, eps, dt, lead),
            sa=_attention_init(cfg, draw, lead),
            ln_ca=RMSNorm.init(cfg.d_model, eps, dt, lead),
            ca=_attention_init(cfg, draw, lead),
            ln_ff=RMSNorm.init(cfg.d_model, eps, dt, lead),
            mlp=_mlp_init(cfg, draw, lead),
        )
    else:
        layers = EncoderBlock(
            ln_sa=RMSNorm.init(cfg.d_model, eps, dt, lead),
            sa=_attention_init(cfg, draw, lead),
            ln_ff=RMSNorm.init(cfg.d_model, eps, dt, lead),
            mlp=_mlp_init(cfg, draw, lead),
        )
    rel = RelativeBias.init(
        cfg.relative_attention_num_buckets,
        cfg.num_heads,
        cfg.relative_attention_max_distance,
        not decoder,
        cfg.d_model,
        draw=draw,
    )
    return Stack(layers=layers, rel=rel, final_ln=RMSNorm.init(cfg.d_model, eps, dt))


def _build(cfg: T5Config, draw) -> T5:
    lm_head = (
        None if cfg.tie_word_embeddings else draw((cfg.d_model, cfg.vocab_size), cfg.d_model**-0.5)
    )
    return T5(
        embedding=draw((cfg.vocab_size, cfg.d_model), 1.0),
        encoder=_stack(cfg, draw, decoder=False),
        decoder=_stack(cfg, draw, decoder=True),
        lm_head=lm_head,
        cfg=cfg,
    )


@eqx.filter_jit
def init(cfg: T5Config, *, key: jax.Array) -> T5:
    """Initialises a T5 with Mesh-TF T5's scheme (embedding N(0,1), fan-in scaled weights).

    All random parameters are consecutive slices of ONE standard-normal vector drawn with
    `key`, scaled per parameter: XLA compiles one threefry kernel instead of one per
    parameter, which on CPU cuts the compile time of `init` from tens of seconds to about
    one. Jitted: one compiled program per config. `init_by_counters` gives the same values
    without the vector (for sharded initialisation, see `sharding.init_model`).
    """
    sizes = []

    def count(shape, std):
        sizes.append(math.prod(shape))
        return jnp.zeros(shape, cfg.param_jnp_dtype)

    jax.eval_shape(lambda: _build(cfg, count))
    flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
    offset = 0

    def take(shape, std):
        nonlocal offset
        n = math.prod(shape)
        out = (std * flat[offset : offset + n].reshape(shape)).astype(cfg.param_jnp_dtype)
        offset += n
        return out

    return _build(cfg, take)


def counters_supported(key: jax.Array) -> bool:
    """Whether `init_by_counters` reproduces `init` for this key: threefry keys with JAX's
    partitionable threefry (the default since JAX 0.5), where element i of a random vector
    depends only on the key and i."""
    return (
        bool(jax.config.jax_threefry_partitionable)
        and str(jax.random.key_impl(key)) == "threefry2x32"
    )


def _counters_at(offset: int, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The 64-bit counters (hi, lo words, uint32) of elements [offset, offset + prod(shape)) of
    a flat vector, reshaped: what partitionable threefry feeds its hash for those elements.

    The element's index within `shape` fits in 32 bits (checked); adding the offset may carry
    into the high word, which is why the low word's overflow is tested explicitly.
    """
    n = math.prod(shape)
    if n >= 2**32:
        raise ValueError(f"a parameter of {n} elements is too large for 32-bit local counters")
    if not 0 <= offset <= 2**64 - n:  # the last element's counter is offset + n - 1
        raise ValueError(f"counter offset {offset} is outside [0, 2**64 - {n}]")
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    local = jnp.zeros(shape, jnp.uint32)
    for d, stride in enumerate(strides):
        local = local + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride)
    off_lo, off_hi = jnp.uint32(offset & 0xFFFFFFFF), jnp.uint32(offset >> 32)
    lo = local + off_lo
    hi = off_hi + (lo < off_lo).astype(jnp.uint32)  # the carry out of the low word
    return hi, lo


def _normal_at(key_data: jax.Array, offset: int, shape: tuple[int, ...]) -> jax.Array:
    """Elements [offset, offset + prod(shape)) of `jax.random.normal(key, (N,))` (any N past
    them; partitionable threefry), reshaped, computed elementwise from their 64-bit counters.

    The same bit-level steps as `jax.random.normal`: 32 random bits -> a float in [1, 2) from
    the top 23 bits -> uniform on [nextafter(-1, 0), 1) -> sqrt(2) erfinv. Every element is a
    function of its own index, so XLA's partitioner computes each shard where it lives.
    """
    hi, lo = _counters_at(offset, shape)
    bits1, bits2 = jax_random_ext.threefry2x32_p.bind(key_data[0], key_data[1], hi, lo)
    bits = bits1 ^ bits2
    one_bits = jnp.uint32(np.array(1.0, np.float32).view(np.uint32))
    floats = jax.lax.bitcast_convert_type((bits >> jnp.uint32(9)) | one_bits, jnp.float32)
    floats = floats - jnp.float32(1.0)
    lo_val = np.nextafter(np.float32(-1.0), np.float32(0.0), dtype=np.float32)
    width = np.float32(1.0) - lo_val
    uniform = jax.lax.max(jnp.float32(lo_val), floats * width + lo_val)
    return jnp.float32(np.sqrt(2)) * jax.lax.erf_inv(uniform)


def init_by_counters(cfg: T5Config, *, key: jax.Array) -> T5:
    """`init`'s parameters, bit for bit, each drawn from its own element counters instead of
    sliced from one vector (see `_normal_at`; requires `counters_supported(key)`).

    Not jitted here: jit it with `out_shardings` (as `sharding.init_model` does) and no device
    ever holds more than its shards of the model, where `init` holds the whole vector (and
    its temporaries) on one device. Compiles one threefry kernel per parameter array.
    """
    if not counters_supported(key):
        raise ValueError(
            "init_by_counters needs a threefry key and jax_threefry_partitionable=True; "
            f"got {jax.random.key_impl(key)}, partitionable="
            f"{jax.config.jax_threefry_partitionable}"
        )
    key_data = jax.random.key_data(key)
    offset = 0

    def draw(shape, std):
        nonlocal offset
        # The barrier keeps XLA from folding std into _normal_at's sqrt(2) (a different
        # rounding); `init` multiplies a materialised vector, so must we.
        normal = jax.lax.optimization_barrier(_normal_at(key_data, offset, tuple(shape)))
        out = (std * normal).astype(cfg.param_jnp_dtype)
        offset += math.prod(shape)
        return out

    return _build(cfg, draw)


def num_params(model: T5) -> int:
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))


@dataclasses.dataclass(frozen=True)
class Axes:
    """Logical axis names of one parameter (a pytree leaf, unlike a tuple)."""

    names: tuple[str | None, ...]


def logical_axes(model: T5):
    """A pytree like `model` whose leaves are the `Axes` of each parameter."""

    def axes_of(path, leaf):
        names = [getattr(p, "name", None) for p in path]
        field = names[-1]
        if field not in PARAM_AXES:
            raise KeyError(f"no logical axes for parameter {jax.tree_util.keystr(path)}")
        axes = PARAM_AXES[field]
        if "layers" in names:
            axes = ("layers",) + axes
        if len(axes) != leaf.ndim:
            raise ValueError(
                f"parameter {jax.tree_util.keystr(path)} has shape {leaf.shape} "
                f"but logical axes {axes}"
            )
        return Axes(axes)

    return jax.tree_util.tree_map_with_path(axes_of, model)


def _run_layers(layers, carry, xs, fn, scan: bool, remat: bool = False):
    """carry, ys = fold of fn(carry, layer_i, xs_i) over the stacked layers; with `remat`,
    each fn is `jax.checkpoint`ed: its activations are recomputed in the backward pass from
    its inputs (`T5Config.remat`)."""
    if remat:
        fn = _rematerialized(fn, prevent_cse=not scan)
    if scan:
        if isinstance(layers, tuple):
            raise ValueError(
                "per-layer blocks (`unstacked`) run unrolled only: this config scans its layers"
            )
        params, static = eqx.partition(layers, eqx.is_array)

        def body(c, inp):
            p, x = inp
            return fn(c, eqx.combine(p, static), x)

        return jax.lax.scan(body, carry, (params, xs))
    ys = []
    for i, layer_i in enumerate(unstack_layers(layers)):
        carry, y = fn(carry, layer_i, jax.tree.map(lambda a, i=i: a[i], xs))
        ys.append(y)
    if ys[0] is None:
        return carry, None
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _rematerialized(fn, prevent_cse: bool):
    """fn(carry, layer, x) under `jax.checkpoint` (the layer's static fields kept out of it).
    Inside a scan, CSE cannot merge the recomputation into the forward pass, so it is allowed
    there (faster), as `jax.checkpoint` advises."""

    def wrapped(carry, layer, x):
        params, static = eqx.partition(layer, eqx.is_array)
        run = lambda c, p, x_: fn(c, eqx.combine(p, static), x_)  # noqa: E731
        return jax.checkpoint(run, prevent_cse=prevent_cse)(carry, params, x)

    return wrapped


def _key_mask_bias(mask_BxS: jax.Array) -> jax.Array:
    """B x 1 x 1 x S additive bias: 0 on real keys, MASK_VALUE on padding."""
    return jnp.where(mask_BxS.astype(bool), 0.0, MASK_VALUE)[:, None, None, :]


def _check_tokens(name: str, tokens, ndim: int = 2):
    if tokens.ndim != ndim or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be an integer array of rank {ndim}, "
            f"got shape {tokens.shape} dtype {tokens.dtype}"
        )


def encode(model: T5, src_BxS: jax.Array, src_mask_BxS: jax.Array) -> jax.Array:
    """Runs the encoder; returns the final hidden states BxSxD (float32)."""
    _check_tokens("src_BxS", src_BxS)
    if src_mask_BxS.shape != src_BxS.shape:
        raise ValueError(f"src_mask shape {src_mask_BxS.shape} != src shape {src_BxS.shape}")
    cfg, cd = model.cfg, model.cfg.compute_jnp_dtype
    x = model.embedding[src_BxS].astype(jnp.float32)
    pos_S = jnp.arange(src_BxS.shape[1])
    bias = model.encoder.rel(pos_S, pos_S)[None] + _key_mask_bias(src_mask_BxS)

    def block(x, layer: EncoderBlock, _):
        h = layer.ln_sa(x, cd)
        x = x + layer.sa.self_attend(h, bias, cd).astype(jnp.float32)
        x = x + layer.mlp(layer.ln_ff(x, cd), cd).astype(jnp.float32)
        return x, None

    x, _ = _run_layers(model.encoder.layers, x, None, block, cfg.scan_layers, cfg.remat)
    return model.encoder.final_ln(x, jnp.float32)


def _logits(model: T5, h_BxTxD: jax.Array) -> jax.Array:
    cd = model.cfg.compute_jnp_dtype
    if model.lm_head is None:  # original T5: tied head with d_model**-0.5 output scaling
        h = (h_BxTxD * model.cfg.d_model**-0.5).astype(cd)
        return dense(h, model.embedding.T, cd, jnp.float32)
    return dense(h_BxTxD, model.lm_head, cd, jnp.float32)


def shift_right(targets_BxT: jax.Array) -> jax.Array:
    """Decoder inputs for teacher forcing: [start, y_0, ..., y_{T-2}]."""
    start = jnp.full_like(targets_BxT[:, :1], DECODER_START_ID)
    return jnp.concatenate([start, targets_BxT[:, :-1]], axis=1)


def decode(
    model: T5, enc_BxSxD: jax.Array, src_mask_BxS: jax.Array, dec_in_BxT: jax.Array
) -> jax.Array:
    """Teacher-forced decoder: logits BxTxV (float32) for the decoder inputs (see shift_right)."""
    _check_tokens("dec_in_BxT", dec_in_BxT)
    if enc_BxSxD.shape[:2] != src_mask_BxS.shape:
        raise ValueError(
            f"encoder output {enc_BxSxD.shape} does not match src_mask {src_mask_BxS.shape}"
        )
    if enc_BxSxD.shape[0] != dec_in_BxT.shape[0]:
        raise ValueError(
            f"batch of encoder output {enc_BxSxD.shape} != decoder inputs {dec_in_BxT.shape}"
        )
    cfg, cd = model.cfg, model.cfg.compute_jnp_dtype
    T = dec_in_BxT.shape[1]
    x = model.embedding[dec_in_BxT].astype(jnp.float32)
    pos_T = jnp.arange(T)
    causal_TxT = jnp.where(pos_T[None, :] <= pos_T[:, None], 0.0, MASK_VALUE)
    self_bias = (model.decoder.rel(pos_T, pos_T) + causal_TxT)[None]
    cross_bias = _key_mask_bias(src_mask_BxS)

    def block(x, layer: DecoderBlock, _):
        h = layer.ln_sa(x, cd)
        x = x + layer.sa.self_attend(h, self_bias, cd).astype(jnp.float32)
        x = x + layer.ca(layer.ln_ca(x, cd), enc_BxSxD, cross_bias, cd).astype(jnp.float32)
        x = x + layer.mlp(layer.ln_ff(x, cd), cd).astype(jnp.float32)
        return x, None

    x, _ = _run_layers(model.decoder.layers, x, None, block, cfg.scan_layers, cfg.remat)
    return _logits(model, model.decoder.final_ln(x, jnp.float32))


def forward(model: T5, src_BxS, src_mask_BxS, dec_in_BxT) -> jax.Array:
    """encode + teacher-forced decode: logits BxTxV."""
    return decode(model, encode(model, src_BxS, src_mask_BxS), src_mask_BxS, dec_in_BxT)


def unstack_layers(layers) -> tuple:
    """Per-layer blocks of a stack: static slices of the stacked arrays (a tuple is kept).

    The sampler unstacks the decoder once, before its loop, so that no decode step slices
    the stacked weights again.
    """
    if isinstance(layers, tuple):
        return layers
    num = jax.tree.leaves(layers)[0].shape[0]
    return tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(num))


def unstacked(model: T5) -> T5:
    """The model for programs that only read it (scoring, sampling, the exact KL): each
    stack's layers as a tuple of per-layer blocks (`unstack_layers`), with each block's
    attention projections packed (`PackedSelfAttention`: q, k, v in one product;
    `PackedCrossAttention`: k and v in one). Called outside jit, once per model, it hands the
    compiled program each layer's weights as their own arrays, where unrolled layers would
    otherwise copy them out of the stacked parameters on every call. The same computation,
    to float32 rounding: a packed product may sum in another order (see
    `PackedSelfAttention` for where the bits were measured to stay). A config that scans its
    layers is returned as it is (lax.scan reads the stacked arrays); train steps take the
    stacked model, whose gradients and optimizer state keep the stacked layout.
    """
    if model.cfg.scan_layers:
        return model

    def packed(block):
        if isinstance(block.sa, PackedSelfAttention):  # already unstacked
            return block
        block = eqx.tree_at(lambda b: b.sa, block, PackedSelfAttention.of(block.sa))
        if isinstance(block, DecoderBlock):
            block = eqx.tree_at(lambda b: b.ca, block, PackedCrossAttention.of(block.ca))
        return block

    return eqx.tree_at(
        lambda m: (m.encoder.layers, m.decoder.layers),
        model,
        tuple(
            tuple(packed(b) for b in unstack_layers(stack.layers))
            for stack in (model.encoder, model.decoder)
        ),
    )


def init_cache(
    model: T5, enc_BxSxD: jax.Array, src_mask_BxS: jax.Array, max_len: int, layers=None
) -> DecodeCache:
    """An empty cache for `max_len` decoder positions, with cross-attention K/V precomputed.

    `layers`: the decoder's blocks from `unstack_layers` (computed here when not given).
    """
    cfg, cd = model.cfg, model.cfg.compute_jnp_dtype
    layers = unstack_layers(model.decoder.layers) if layers is None else layers
    B = enc_BxSxD.shape[0]
    cross = [layer.ca.project_kv(enc_BxSxD, cd) for layer in layers]
    shape = (B, cfg.num_heads, max_len, cfg.d_kv)
    zeros = tuple(jnp.zeros(shape, cd) for _ in layers)
    return DecodeCache(
        self_k=zeros,
        self_v=tuple(jnp.zeros(shape, cd) for _ in layers),
        cross_k=tuple(k for k, _ in cross),
        cross_v=tuple(v for _, v in cross),
        src_mask=src_mask_BxS,
        index=jnp.zeros((), jnp.int32),
    )


def decode_step(model: T5, cache: DecodeCache, token_B: jax.Array, layers=None):
    """Feeds one decoder input token per row; returns (logits BxV float32, updated cache).

    The first call feeds DECODER_START_ID; the logits it returns are those of the first
    response token, as column 0 of `decode`'s teacher-forced logits: to float32 rounding (1e-6)
    in float32 compute; in bf16 compute each path rounds its products to bf16 after summing
    in another order, so they agree to bf16 precision only (0.027 measured on a tiny model's
    logits of up to 3.7). Layers are
    unrolled; pass `layers=unstack_layers(model.decoder.layers)` computed once outside a
    decoding loop to keep weight slicing out of it.

    A cache holds `max_len` positions (`init_cache`). A step past them has no slot for its
    keys and values: with a concrete `cache.index` it raises; under jit (a traced index) its
    logits are NaN, where writing would have overwritten the last position silently.
    """
    _check_tokens("token_B", token_B, ndim=1)
    cd = model.cfg.compute_jnp_dtype
    layers = unstack_layers(model.decoder.layers) if layers is None else layers
    t = cache.index
    max_len = cache.self_k[0].shape[2]
    if not isinstance(t, jax.core.Tracer) and int(t) >= max_len:
        raise ValueError(
            f"decode_step at position {int(t)}: the cache holds {max_len} positions "
            "(init_cache's max_len); start a longer cache"
        )
    x = model.embedding[token_B][:, None, :].astype(jnp.float32)
    pos_T = jnp.arange(max_len)
    causal_T = jnp.where(pos_T <= t, 0.0, MASK_VALUE)
    self_bias = (model.decoder.rel(t[None], pos_T) + causal_T)[None]  # 1 x H x 1 x T
    cross_bias = _key_mask_bias(cache.src_mask)
    self_k, self_v = list(cache.self_k), list(cache.self_v)
    for i, layer in enumerate(layers):
        h = layer.ln_sa(x, cd)
        q, k_new, v_new = layer.sa.step_projections(h, cd)
        self_k[i] = jax.lax.dynamic_update_slice(self_k[i], k_new, (0, 0, t, 0))
        self_v[i] = jax.lax.dynamic_update_slice(self_v[i], v_new, (0, 0, t, 0))
        sa = attend_one_heads(q, self_k[i], self_v[i], self_bias, layer.sa.o, cd)
        x = x + sa.astype(jnp.float32)
        x = x + layer.ca.attend_one(
            layer.ln_ca(x, cd), cache.cross_k[i], cache.cross_v[i], cross_bias, cd
        ).astype(jnp.float32)
        x = x + layer.mlp(layer.ln_ff(x, cd), cd).astype(jnp.float32)
    logits = _logits(model, model.decoder.final_ln(x, jnp.float32))[:, 0]
    logits = jnp.where(t < max_len, logits, jnp.nan)  # past the cache: see the docstring
    return logits, cache._replace(self_k=tuple(self_k), self_v=tuple(self_v), index=t + 1)
