"""Matrix products (t5/layers.py `product`): float32 accumulation in every compute dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FORWARD, tiny_config

from ipo_gap import logprobs
from ipo_gap.t5 import model as t5
from ipo_gap.t5.layers import product

BF16 = jnp.bfloat16
# Every equation the model uses, with operand shapes.
EQUATIONS = [
    ("nd,do->no", (6, 16), (16, 12)),
    ("btd,dhk->bthk", (2, 5, 16), (16, 3, 4)),
    ("bqd,dhk->bhqk", (2, 5, 16), (16, 3, 4)),
    ("bhqk,bhtk->bhqt", (2, 3, 5, 4), (2, 3, 7, 4)),
    ("bhqt,bhtk->bhqk", (2, 3, 5, 7), (2, 3, 7, 4)),
    ("bhqk,hkd->bqd", (2, 3, 5, 4), (3, 4, 16)),
    ("bd,dhk->bhk", (2, 16), (16, 3, 4)),
    ("bhk,bhtk->bht", (2, 3, 4), (2, 3, 7, 4)),
    ("bht,bhtk->bhk", (2, 3, 7), (2, 3, 7, 4)),
    ("bhk,hkd->bd", (2, 3, 4), (3, 4, 16)),
]


def _operands(sa, sb, seed=0):
    ka, kb = jax.random.split(jax.random.key(seed))
    return jax.random.normal(ka, sa), jax.random.normal(kb, sb)


def _ulp_bf16(x):
    """bf16's spacing at |x| (8 significant bits)."""
    x = np.abs(np.asarray(x, np.float32))
    return 2.0 ** (np.floor(np.log2(np.maximum(x, 1e-30))) - 7)


@pytest.mark.parametrize("eq,sa,sb", EQUATIONS, ids=[e for e, _, _ in EQUATIONS])
def test_float32_product_is_the_einsum_bit_for_bit(eq, sa, sb):
    a, b = _operands(sa, sb)
    np.testing.assert_array_equal(product(eq, a, b, jnp.float32), jnp.einsum(eq, a, b))


@pytest.mark.parametrize("eq,sa,sb", EQUATIONS, ids=[e for e, _, _ in EQUATIONS])
def test_bf16_product_is_the_float32_product_of_bf16_inputs_rounded_once(eq, sa, sb):
    """Inputs rounded to bf16, products accumulated in float32, the sum rounded once: the
    result is within one bf16 step of the exact float32 product of the rounded inputs (a bf16
    accumulator would drift by many steps over these sums), and float32 when asked."""
    a, b = _operands(sa, sb, seed=1)
    exact = jnp.einsum(eq, a.astype(BF16).astype(jnp.float32), b.astype(BF16).astype(jnp.float32))
    out = product(eq, a, b, BF16)
    assert out.dtype == BF16
    assert np.all(np.abs(np.asarray(out, np.float32) - exact) <= _ulp_bf16(exact))
    out32 = product(eq, a, b, BF16, jnp.float32)
    assert out32.dtype == jnp.float32
    np.testing.assert_allclose(out32, exact, rtol=1e-5, atol=1e-5)


def test_bf16_product_accumulates_in_float32():
    """1 + 255 * 2^-8 in bf16 steps: a bf16 running sum of 1.0 then 255 terms of 2^-8 never
    leaves 1.0 (each term is half a step at 1, rounded to even), float32 gets 1.99609375."""
    a = jnp.ones((1, 256), BF16)
    b = jnp.concatenate([jnp.ones((1, 1)), jnp.full((255, 1), 2.0**-8)]).astype(BF16)
    out = product("nd,do->no", a, b, BF16, jnp.float32)
    assert float(out[0, 0]) == 1.0 + 255 * 2.0**-8


@pytest.mark.parametrize("eq,sa,sb", EQUATIONS, ids=[e for e, _, _ in EQUATIONS])
def test_bf16_product_gradients(eq, sa, sb):
    """The written-out VJP: gradients in the operands' dtypes, and equal to float32 autodiff of
    the same function to bf16 precision (its products read bf16 inputs and cotangents)."""
    a, b = _operands(sa, sb, seed=2)
    w = jax.random.normal(jax.random.key(3), jnp.einsum(eq, a, b).shape)

    def f(a, b, cd):
        return jnp.sum(w * product(eq, a, b, cd, jnp.float32) ** 2)

    ga, gb = jax.grad(f, argnums=(0, 1))(a.astype(BF16), b.astype(BF16), BF16)
    ra, rb = jax.grad(f, argnums=(0, 1))(
        a.astype(BF16).astype(jnp.float32), b.astype(BF16).astype(jnp.float32), jnp.float32
    )
    assert ga.dtype == gb.dtype == BF16
    for g, r in ((ga, ra), (gb, rb)):
        err = float(jnp.abs(g.astype(jnp.float32) - r).max() / jnp.abs(r).max())
        assert err < 2e-2, (eq, err)
    # float32 operands with a bf16 compute dtype: float32 gradients (master weights).
    g32 = jax.grad(f, argnums=1)(a, b, BF16)
    assert g32.dtype == jnp.float32


def test_gradient_of_an_operand_index_summed_alone_is_refused():
    a, b = jnp.ones((2, 3), BF16), jnp.ones((3, 4), BF16)
    assert product("nd,do->o", a, b, BF16).shape == (4,)  # forward is fine
    with pytest.raises(ValueError, match="'nd,do->o'.*first operand"):
        jax.grad(lambda a: product("nd,do->o", a, b, BF16).astype(jnp.float32).sum())(a)


@pytest.mark.slow  # trains two models side by side: ~29 s
def test_bf16_compute_model_trains_close_to_float32():
    """A whole model in bf16 compute with float32 parameters: float32 gradients that point
    where the float32 model's do (cosine > 0.99 per parameter, measured ~0.999)."""
    cfg = tiny_config()
    model = t5.init(cfg, key=jax.random.key(0))
    low = t5.T5(
        model.embedding,
        model.encoder,
        model.decoder,
        model.lm_head,
        cfg.replace(compute_dtype="bfloat16"),
    )
    k1, k2 = jax.random.split(jax.random.key(4))
    src = jax.random.randint(k1, (3, 7), 3, cfg.vocab_size)
    tgt = jax.random.randint(k2, (3, 5), 3, cfg.vocab_size)
    ones = jnp.ones_like

    def loss(m):
        logits = t5.forward(m, src, ones(src), t5.shift_right(tgt))
        return -logprobs.sequence_logprobs(logits, tgt, ones(tgt)).sum()

    g_hi = jax.grad(loss)(model)
    g_lo = jax.grad(loss)(low)
    pairs = zip(jax.tree.leaves(g_hi), jax.tree.leaves(g_lo), strict=True)
    for hi, lo in pairs:
        assert lo.dtype == jnp.float32
        hi, lo = np.ravel(hi), np.ravel(lo)
        cos = hi @ lo / (np.linalg.norm(hi) * np.linalg.norm(lo) + 1e-30)
        assert cos > 0.99
    lo_logits = FORWARD(low, src, ones(src), t5.shift_right(tgt))
    hi_logits = FORWARD(model, src, ones(src), t5.shift_right(tgt))
    assert 0 < float(jnp.abs(lo_logits - hi_logits).max()) < 0.1 * float(jnp.abs(hi_logits).max())


def test_bf16_backward_products_read_bf16():
    """The speed of the bf16 path: every product of the backward pass, as of the forward,
    reads bf16 operands and accumulates in float32 (autodiff alone would meet a float32
    cotangent and run the backward's products in float32)."""
    a, b = _operands((6, 16), (16, 12))

    def f(a, b):
        return product("nd,do->no", a, b, BF16, jnp.float32).sum()

    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(a, b)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3  # forward, and one per operand
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [BF16, BF16]
        assert e.params["preferred_element_type"] == jnp.float32
