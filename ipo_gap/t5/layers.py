"""T5 building blocks: RMSNorm, relative position bias, attention (with KV cache), feed-forward.

Each block is an `eqx.Module` holding only arrays (plus static hyper-parameters) and a pure
`__call__`. Weights are stored input-major (`x @ w`), the transpose of PyTorch's `nn.Linear`.
Logical axis names of every parameter are given by `PARAM_AXES`, keyed by the parameter's
field name; t5/model.py prefixes a "layers" axis for stacked blocks. Shape legend: see
t5/model.py.
"""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp

# Logical axis names of each parameter field (used by ipo_gap/sharding.py).
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embedding": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "scale": ("embed",),
    "rel_bias": ("relpos_buckets", "heads"),
    "q": ("embed", "heads", "kv"),
    "k": ("embed", "heads", "kv"),
    "v": ("embed", "heads", "kv"),
    "o": ("heads", "kv", "embed"),
    "wi": ("embed", "mlp"),
    "wi_0": ("embed", "mlp"),
    "wi_1": ("embed", "mlp"),
    "wo": ("mlp", "embed"),
}

# Added to attention logits of masked keys. Finite, so fully masked rows give a uniform
# softmax instead of NaN (their outputs are never used).
MASK_VALUE = -1e9


def product(eq: str, a: jax.Array, b: jax.Array, cd, out_dtype=None) -> jax.Array:
    """einsum(eq, a, b) on inputs cast to the compute dtype cd, accumulated in float32.

    Returns `out_dtype` (default: cd). Every matrix product of the model goes through here,
    so the compute dtype means one thing: what the products read. In float32 this is
    jnp.einsum itself. In a lower precision (bf16) the products read bf16 and accumulate in
    float32, as accelerators' matrix units do; the backward pass is written out (a custom
    VJP) so that its two products also read the compute dtype and accumulate in float32,
    where autodiff would meet a float32 cotangent and run them in float32. On a CPU with
    AMX-BF16 (Intel Xeon, measured) XLA runs bf16 products with float32 accumulation at
    ~5x its float32 speed, and bf16 products with bf16 output no faster than float32.
    """
    cd = jnp.dtype(cd)
    out_dtype = cd if out_dtype is None else jnp.dtype(out_dtype)
    a, b = a.astype(cd), b.astype(cd)
    if cd == jnp.float32:
        return _einsum_f32(eq, a, b, out_dtype)
    return _low_precision_product(eq, out_dtype, a, b)


def _einsum_f32(eq, a, b, dtype):
    return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _low_precision_product(eq, out_dtype, a, b):
    return _einsum_f32(eq, a, b, out_dtype)


def _low_precision_product_fwd(eq, out_dtype, a, b):
    return _einsum_f32(eq, a, b, out_dtype), (a, b)


def _low_precision_product_bwd(eq, out_dtype, residuals, ct):
    a, b = residuals
    operands, so = eq.replace(" ", "").split("->")
    sa, sb = operands.split(",")
    for name, s, others in (("first", sa, so + sb), ("second", sb, sa + so)):
        if not set(s) <= set(others):
            raise ValueError(
                f"product {eq!r}: an index of the {name} operand is summed away alone; "
                "its gradient is not a single product"
            )
    ct = ct.astype(a.dtype)  # the cotangent is rounded to the compute dtype, as the inputs
    return (
        _einsum_f32(f"{so},{sb}->{sa}", ct, b, a.dtype),
        _einsum_f32(f"{sa},{so}->{sb}", a, ct, b.dtype),
    )


_low_precision_product.defvjp(_low_precision_product_fwd, _low_precision_product_bwd)


def dense(x_NxD: jax.Array, w_DxO: jax.Array, cd, out_dtype=None) -> jax.Array:
    """x @ w over x's last axis and w's first, run as one 2-D matrix product (see `product`).

    x's leading axes are flattened into rows and w's trailing axes into columns; the result has
    shape x.shape[:-1] + w.shape[1:]. On a B x T x D input, XLA's CPU runtime computes the
    weight gradient of the 3-D einsum (a contraction over B and T) with transposed copies of
    both operands; the 2-D product does without. Measured on the 2-core CPU: T5 v1.1 small's
    feed-forward forward+backward at B 8, T 256 in 71 ms instead of 140 ms, with bit-identical
    results and gradients.
    """
    d = x_NxD.shape[-1]
    y = product("nd,do->no", x_NxD.reshape(-1, d), w_DxO.reshape(d, -1), cd, out_dtype)
    return y.reshape(*x_NxD.shape[:-1], *w_DxO.shape[1:])


# Initialisers receive `draw(shape, std) -> array`, a source of N(0, std^2) arrays (see
# t5/model.py: all draws of a model are slices of one random vector, which compiles fast), and
# `lead`, the shape of leading stacking axes (the layers of a stack).


class RMSNorm(eqx.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias; computed in float32."""

    scale: jax.Array  # D
    eps: float = eqx.field(static=True)

    @staticmethod
    def init(d_model: int, eps: float, dtype, lead=()) -> RMSNorm:
        return RMSNorm(scale=jnp.ones((*lead, d_model), dtype), eps=eps)

    def __call__(self, x_BxTxD: jax.Array, compute_dtype) -> jax.Array:
        x = x_BxTxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (self.scale.astype(jnp.float32) * x).astype(compute_dtype)


def relative_position_bucket(
    relative_position, *, bidirectional: bool, num_buckets: int, max_distance: int
):
    """Maps key_pos - query_pos to a bucket id, exactly as Mesh TensorFlow / HF T5.

    Half the buckets (per direction) are exact small distances, the rest log-spaced up to
    max_distance; the decoder (bidirectional=False) only sees the past.
    """
    relative_position = jnp.asarray(relative_position, jnp.int32)
    bucket = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float32 log as in the reference; clamp avoids log(0) on the (unused) small branch.
    large = max_exact + (
        jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, distance, large)


class RelativeBias(eqx.Module):
    """Learned relative position bias, computed once per stack and shared by its layers."""

    rel_bias: jax.Array  # num_buckets x H
    bidirectional: bool = eqx.field(static=True)
    max_distance: int = eqx.field(static=True)

    @staticmethod
    def init(num_buckets, num_heads, max_distance, bidirectional, d_model, *, draw):
        table = draw((num_buckets, num_heads), d_model**-0.5)
        return RelativeBias(rel_bias=table, bidirectional=bidirectional, max_distance=max_distance)

    def __call__(self, query_pos_Q: jax.Array, key_pos_T: jax.Array) -> jax.Array:
        """Returns the bias HxQxT (float32) for the given query and key positions."""
        buckets_QxT = relative_position_bucket(
            key_pos_T[None, :] - query_pos_Q[:, None],
            bidirectional=self.bidirectional,
            num_buckets=self.rel_bias.shape[0],
            max_distance=self.max_distance,
        )
        return jnp.transpose(self.rel_bias.astype(jnp.float32)[buckets_QxT], (2, 0, 1))


class Attention(eqx.Module):
    """Multi-head attention without 1/sqrt(K) scaling and without biases (T5)."""

    q: jax.Array  # D x H x K
    k: jax.Array  # D x H x K
    v: jax.Array  # D x H x K
    o: jax.Array  # H x K x D

    @staticmethod
    def init(d_model, num_heads, d_kv, *, draw, lead=()) -> Attention:
        shape = (*lead, d_model, num_heads, d_kv)
        # Mesh-TF T5 initialisation (the 1/sqrt(K) scaling lives in q's init, not the logits).
        return Attention(
            q=draw(shape, (d_model * d_kv) ** -0.5),
            k=draw(shape, d_model**-0.5),
            v=draw(shape, d_model**-0.5),
            o=draw((*lead, num_heads, d_kv, d_model), (num_heads * d_kv) ** -0.5),
        )

    def project_kv(self, x_BxTxD: jax.Array, cd) -> tuple[jax.Array, jax.Array]:
        """Keys and values, heads-major: (B x H x T x K, B x H x T x K).

        Projected as B x T x H x K and then transposed: an einsum straight into B x H x T x K
        rounds the sampler's log-probs differently in the last bits (measured on toy)."""
        k = product("btd,dhk->bthk", x_BxTxD, self.k, cd)
        v = product("btd,dhk->bthk", x_BxTxD, self.v, cd)
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def attend(self, x_BxQxD, k_BxHxTxK, v_BxHxTxK, bias, cd) -> jax.Array:
        """Queries from x attend to the given keys/values; bias broadcasts to BxHxQxT.

        The products run heads-major (B x H x Q x K times B x H x T x K): on the 2-core CPU
        this measured 3x faster forward and 1.45x faster forward+backward than the same
        einsums on B x T x H x K operands (T5 v1.1 small's encoder attention, B 8, T 256),
        with bit-identical results and gradients.
        """
        q_BxHxQxK = product("bqd,dhk->bhqk", x_BxQxD, self.q, cd)
        return attend_heads(q_BxHxQxK, k_BxHxTxK, v_BxHxTxK, bias, self.o, cd)

    def attend_one(self, x_Bx1xD, k_BxHxTxK, v_BxHxTxK, bias, cd) -> jax.Array:
        """`attend` for a single query position (decoding), on a heads-major K/V cache."""
        q_BxHxK = product("bd,dhk->bhk", x_Bx1xD[:, 0], self.q, cd)
        return attend_one_heads(q_BxHxK, k_BxHxTxK, v_BxHxTxK, bias, self.o, cd)

    def step_projections(self, x_Bx1xD, cd) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Self-attention projections of one decoding position: (q B x H x K, k and v
        B x H x 1 x K for the cache)."""
        q_BxHxK = product("bd,dhk->bhk", x_Bx1xD[:, 0], self.q, cd)
        return (q_BxHxK, *self.project_kv(x_Bx1xD, cd))

    def self_attend(self, x_BxTxD, bias, cd) -> jax.Array:
        """Self-attention of x (teacher-forced: every position at once)."""
        return self(x_BxTxD, x_BxTxD, bias, cd)

    def __call__(self, x_BxQxD, kv_BxTxD, bias, cd) -> jax.Array:
        k, v = self.project_kv(kv_BxTxD, cd)
        return self.attend(x_BxQxD, k, v, bias, cd)


def attend_heads(q_BxHxQxK, k_BxHxTxK, v_BxHxTxK, bias, o_HxKxD, cd) -> jax.Array:
    """Attention of projected heads-major queries over keys/values, then the output
    projection: B x Q x D. The logits and softmax are float32."""
    logits = product("bhqk,bhtk->bhqt", q_BxHxQxK, k_BxHxTxK, cd, jnp.float32)
    weights = jax.nn.softmax(logits + bias, axis=-1)
    out = product("bhqt,bhtk->bhqk", weights, v_BxHxTxK, cd)
    return product("bhqk,hkd->bqd", out, o_HxKxD, cd)


def attend_one_heads(q_BxHxK, k_BxHxTxK, v_BxHxTxK, bias, o_HxKxD, cd) -> jax.Array:
    """`attend_heads` for a single query position, on a heads-major K/V cache: B x 1 x D.

    The cache is B x H x T x K so that both products are batched matrix-vector products
    over (B, H) with a contiguous T x K operand. On the 2-core CPU this measured 2-3x
    faster per call than the B x T x H x K layout (reduced elementwise or by dot_general),
    whose second product reduces over a strided T axis.
    """
    logits_BxHxT = product("bhk,bhtk->bht", q_BxHxK, k_BxHxTxK, cd, jnp.float32)
    weights = jax.nn.softmax(logits_BxHxT + bias[:, :, 0, :], axis=-1)
    out_BxHxK = product("bht,bhtk->bhk", weights, v_BxHxTxK, cd)
    return product("bhk,hkd->bd", out_BxHxK, o_HxKxD, cd)[:, None, :]


def _heads_major(y_BxTxNxHxK: jax.Array) -> tuple[jax.Array, ...]:
    """The N projections of a packed product, each B x H x T x K."""
    y = y_BxTxNxHxK.transpose(2, 0, 3, 1, 4)
    return tuple(y[i] for i in range(y.shape[0]))


class PackedSelfAttention(eqx.Module):
    """Self-attention for programs that only read a model (`t5.unstacked`): q, k and v
    packed into one D x 3 x H x K array, so that one matrix product projects all three.

    On 2 cores of an AMD EPYC Zen 4, T5 v1.1 small's encoder projections (B 8, T 256) take
    13.5 ms packed against 16.7 ms as three products, and its exact KL 1.61-1.62 s against
    1.79 s; toy's sampler 154-193 ms against 176-219 ms. A packed product computes every
    output as the separate one does, but XLA may pick another kernel for its wider shape and
    sum in another order: on that CPU, in float32, teacher-forced logits kept their bits for
    toy, small and toy-s/m/l, decode steps too except toy-m's (32 rows), and the quick study's
    every summary, evaluation and figure stayed byte for byte; in bf16 compute the last bits
    move. tests/test_t5.py holds the two paths to float32 rounding. Not for training: a
    packed product's input gradient would sum its cotangent in another order.
    """

    qkv: jax.Array  # D x 3 x H x K
    o: jax.Array  # H x K x D

    @staticmethod
    def of(a: Attention) -> PackedSelfAttention:
        return PackedSelfAttention(qkv=jnp.stack([a.q, a.k, a.v], axis=1), o=a.o)

    def self_attend(self, x_BxTxD, bias, cd) -> jax.Array:
        q, k, v = _heads_major(dense(x_BxTxD, self.qkv, cd))
        return attend_heads(q, k, v, bias, self.o, cd)

    def step_projections(self, x_Bx1xD, cd) -> tuple[jax.Array, jax.Array, jax.Array]:
        q, k, v = _heads_major(dense(x_Bx1xD, self.qkv, cd))
        return q[:, :, 0], k, v


class PackedCrossAttention(eqx.Module):
    """Cross-attention for read-only programs (`t5.unstacked`): k and v packed into one
    D x 2 x H x K array, projected from the encoder output by one product; q stays apart
    (it reads the decoder's stream). Numerics as `PackedSelfAttention`'s."""

    q: jax.Array  # D x H x K
    kv: jax.Array  # D x 2 x H x K
    o: jax.Array  # H x K x D

    @staticmethod
    def of(a: Attention) -> PackedCrossAttention:
        return PackedCrossAttention(q=a.q, kv=jnp.stack([a.k, a.v], axis=1), o=a.o)

    def project_kv(self, x_BxTxD, cd) -> tuple[jax.Array, jax.Array]:
        return _heads_major(dense(x_BxTxD, self.kv, cd))

    # The queries, attention and output projection are Attention's own: they read only
    # q, o and project_kv.
    attend = Attention.attend
    attend_one = Attention.attend_one
    __call__ = Attention.__call__


class GatedGeluMLP(eqx.Module):
    """T5 v1.1 feed-forward: wo(gelu_tanh(x wi_0) * (x wi_1))."""

    wi_0: jax.Array  # D x F
    wi_1: jax.Array  # D x F
    wo: jax.Array  # F x D

    @staticmethod
    def init(d_model, d_ff, *, draw, lead=()) -> GatedGeluMLP:
        return GatedGeluMLP(
            wi_0=draw((*lead, d_model, d_ff), d_model**-0.5),
            wi_1=draw((*lead, d_model, d_ff), d_model**-0.5),
            wo=draw((*lead, d_ff, d_model), d_ff**-0.5),
        )

    def __call__(self, x_BxTxD, cd) -> jax.Array:
        # The gate in float32, rounded once as wo's input: in bf16 compute, XLA would round
        # after each of GELU's ~10 elementwise ops (measured: 18% of toy's exact KL in bf16).
        gate = jax.nn.gelu(dense(x_BxTxD, self.wi_0, cd, jnp.float32), approximate=True)
        return dense(gate * dense(x_BxTxD, self.wi_1, cd, jnp.float32), self.wo, cd)


class ReluMLP(eqx.Module):
    """Original T5 feed-forward: wo(relu(x wi))."""

    wi: jax.Array  # D x F
    wo: jax.Array  # F x D

    @staticmethod
    def init(d_model, d_ff, *, draw, lead=()) -> ReluMLP:
        return ReluMLP(
            wi=draw((*lead, d_model, d_ff), d_model**-0.5),
            wo=draw((*lead, d_ff, d_model), d_ff**-0.5),
        )

    def __call__(self, x_BxTxD, cd) -> jax.Array:
        return dense(jax.nn.relu(dense(x_BxTxD, self.wi, cd, jnp.float32)), self.wo, cd)
