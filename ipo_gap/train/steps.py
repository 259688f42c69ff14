"""Jitted train steps, built by `make_*_step` factories.

ONE policy step serves every alignment algorithm and every data source (DESIGN.md): online,
offline, replayed or shuffled batches all arrive as a `PairBatch`, and the loss is chosen by
name. Values a sweep varies (learning rate, beta, lambda) enter as arrays in `Hparams`, so a
sweep compiles once. The optimizer is Adam (optax.scale_by_adam) with optional global-norm
clipping; the learning rate and its linear warm-up are applied inside the step from `Hparams`.

HyPO (002, Algorithm 1) has its own step, `make_hypo_step`: the same DPO objective on offline
pairs plus lambda times HyPO's KL surrogate on on-policy samples (a `SeqBatch`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ipo_gap import classify, logprobs, losses
from ipo_gap.sharding import place_like
from ipo_gap.t5 import model as t5


class SeqBatch(NamedTuple):
    """Prompts and one response each: B x S prompt tokens/mask, B x T target tokens/mask."""

    src: jax.Array
    src_mask: jax.Array
    tgt: jax.Array
    tgt_mask: jax.Array


class PairBatch(NamedTuple):
    """Prompts with a preferred (y_w) and a dispreferred (y_l) response.

    ref_w / ref_l: the reference policy's sequence log-probs [B], when precomputed (offline
    datasets cache them); None means the step computes them with the reference model.
    """

    prompt: jax.Array
    prompt_mask: jax.Array
    y_w: jax.Array
    y_w_mask: jax.Array
    y_l: jax.Array
    y_l_mask: jax.Array
    ref_w: jax.Array | None = None
    ref_l: jax.Array | None = None


class Hparams(NamedTuple):
    """Traced hyper-parameters (float32 scalars): one compiled step serves a whole sweep."""

    learning_rate: jax.Array
    beta: jax.Array
    warmup_steps: jax.Array
    lam: jax.Array

    @staticmethod
    def make(learning_rate, beta=0.1, warmup_steps=0, lam=0.0) -> Hparams:
        f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        return Hparams(f(learning_rate), f(beta), f(warmup_steps), f(lam))


def make_optimizer(clip_norm: float | None = None) -> optax.GradientTransformation:
    """Adam moments (b1 0.9, b2 0.999, eps 1e-8) with optional clipping; no learning rate.

    The step multiplies the result by -learning_rate * warm-up factor (see `apply_updates`).
    """
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    return optax.chain(*parts, optax.scale_by_adam())


def apply_updates(model, opt_state, grads, optimizer, hp: Hparams, step):
    """One optimizer update with lr * min(1, (step + 1) / warmup_steps)."""
    updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    warm = jnp.minimum(1.0, (step + 1.0) / jnp.maximum(hp.warmup_steps, 1.0))
    scale = -hp.learning_rate * warm
    updates = jax.tree.map(lambda u: (scale * u).astype(u.dtype), updates)
    return eqx.apply_updates(model, updates), opt_state


def pair_logprobs(model: t5.T5, batch: PairBatch, normalize: str = "sum"):
    """(log pi(y_w|x), log pi(y_l|x)) with one encoder pass (see classify.pair_logprobs)."""
    return classify.pair_logprobs(
        model,
        batch.prompt,
        batch.prompt_mask,
        batch.y_w,
        batch.y_w_mask,
        batch.y_l,
        batch.y_l_mask,
        normalize=normalize,
    )


# One compiled program per (model structure, batch shape, normalize): the reference cache and
# the policy loop share it.
reference_pair_logprobs = jax.jit(pair_logprobs, static_argnames="normalize")


def with_reference(batch: PairBatch, ref_model: t5.T5, normalize: str = "sum") -> PairBatch:
    """`batch` with the reference's log-probs filled in: computed when absent, and cached
    ones (host arrays from a reference cache) placed where computed ones would be.

    The policy loop calls this before every step, so online, replayed and offline batches all
    reach the step with ref_w/ref_l set the same way: one compiled policy step per loss and
    batch shape serves every data source (a batch without them, or with them committed
    elsewhere, would compile a second program).
    """
    if batch.ref_w is None:
        ref_w, ref_l = reference_pair_logprobs(ref_model, batch, normalize=normalize)
        return batch._replace(ref_w=ref_w, ref_l=ref_l)
    refs = {f: jnp.asarray(getattr(batch, f)) for f in ("ref_w", "ref_l")}
    return batch._replace(**place_like(refs, ref_model))


def sft_loss_fn(model: t5.T5, batch: SeqBatch):
    """Token-averaged cross-entropy of the responses (per-sequence mean, then batch mean)."""
    logits = t5.forward(model, batch.src, batch.src_mask, t5.shift_right(batch.tgt))
    logp = logprobs.sequence_logprobs(logits, batch.tgt, batch.tgt_mask, normalize="mean")
    return losses.sft_loss(logp)


def make_sft_step(optimizer: optax.GradientTransformation):
    """Returns a jitted step(model, opt_state, batch) -> (model, opt_state, metrics).

    `optimizer` includes its learning rate (e.g. optax.adam(3e-4)). The model and optimizer
    state passed in are donated (their buffers are reused).
    """

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(model, opt_state, batch: SeqBatch):
        (loss, metrics), grads = eqx.filter_value_and_grad(sft_loss_fn, has_aux=True)(model, batch)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        return model, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

    return step


def _pair_objective(loss_fn, model, ref_model, batch: PairBatch, hp: Hparams, *, normalize):
    """A pairwise loss of the policy against the reference: (value, metrics incl. "loss")."""
    logp_w, logp_l = pair_logprobs(model, batch, normalize)
    if batch.ref_w is None:
        ref_w, ref_l = pair_logprobs(ref_model, batch, normalize)
        ref_w, ref_l = jax.lax.stop_gradient((ref_w, ref_l))
    else:
        ref_w, ref_l = batch.ref_w, batch.ref_l
    value, metrics = loss_fn(logp_w, logp_l, ref_w, ref_l, beta=hp.beta)
    return value, {"loss": value, **metrics}


def make_policy_step(loss: str, optimizer: optax.GradientTransformation, *, normalize: str = "sum"):
    """The policy step shared by every algorithm and data source.

    Returns a jitted step(model, opt_state, ref_model, batch, hp, step) ->
    (model, opt_state, metrics). `ref_model` (the SFT policy) is only used when the batch
    carries no precomputed reference log-probs; it is never updated. The model and optimizer
    state are donated.
    """
    objective = functools.partial(_pair_objective, losses.get_loss(loss), normalize=normalize)

    def step(model, opt_state, ref_model, batch: PairBatch, hp: Hparams, step):
        (_, metrics), grads = eqx.filter_value_and_grad(objective, has_aux=True)(
            model, ref_model, batch, hp
        )
        model, opt_state = apply_updates(model, opt_state, grads, optimizer, hp, step)
        return model, opt_state, {**metrics, "grad_norm": optax.tree.norm(grads)}

    # Every argument is a pytree of arrays (the model's config is static treedef data), so
    # plain jax.jit applies; only the model and optimizer state are donated.
    return jax.jit(step, donate_argnums=(0, 1))


def sequence_logprob(model: t5.T5, batch: SeqBatch) -> jax.Array:
    """log pi(tgt|src) summed over the response tokens, [B] float32."""
    logits = t5.forward(model, batch.src, batch.src_mask, t5.shift_right(batch.tgt))
    return logprobs.sequence_logprobs(logits, batch.tgt, batch.tgt_mask, normalize="sum")


def hypo_kl_term(model: t5.T5, ref_model: t5.T5, samples: SeqBatch):
    """HyPO's l_kl on on-policy samples: (mean logp * sg(logp - ref), {"kl_mc": ...}).

    Its gradient is an unbiased estimate of grad KL(pi || ref) when `samples` are drawn from
    `model` at temperature 1 (see `losses.hypo_kl_loss`). Always summed log-probs: the
    score-function identity holds for log pi(y|x), not for a length-normalised score.
    """
    logp = sequence_logprob(model, samples)
    ref = jax.lax.stop_gradient(sequence_logprob(ref_model, samples))
    return losses.hypo_kl_loss(logp, ref)


def make_hypo_step(optimizer: optax.GradientTransformation, *, normalize: str = "sum"):
    """HyPO (002, Algorithm 1): DPO on offline pairs + lambda * KL surrogate on samples.

    Returns a jitted step(model, opt_state, ref_model, pairs, samples, hp, step) ->
    (model, opt_state, metrics), where `pairs` is a `PairBatch` of offline pairs and
    `samples` a `SeqBatch` (prompt, prompt_mask, y, y_mask) of responses sampled from `model`
    itself (one per prompt; `ipo_gap.data.sources.HypoSource`). The loss is

        dpo(pairs; beta = hp.beta) + hp.lam * mean_y[log pi(y|x) * sg(log pi(y|x)/pi_ref(y|x))]

    (Algorithm 1 writes sums and ascends l_dpo - lambda l_kl with l_dpo the log-likelihood;
    this is its negation with batch means). `normalize` applies to the DPO log-probs only; the
    KL term always uses summed log-probs (`hypo_kl_term`). The update is the policy step's
    (Adam, lr and warm-up from `hp`). Metrics: "loss" (the total), "dpo_loss", "kl_loss" (the
    surrogate's value, not a KL), "kl_mc" (naive MC sequence-KL estimate on the samples), the
    DPO pair metrics, and "grad_norm". The model and optimizer state are donated.

    With hp.lam = 0 this is the DPO policy step up to float rounding: same loss and metrics,
    parameters ~1 ulp apart after a few steps on CPU (tests/test_hypo.py). The two are
    different XLA programs, which fuse and order float ops differently; computing
    g_dpo + lam * g_kl as two gradients, or skipping the KL backward under a lax.cond, did not
    make them bit-identical either.
    """
    dpo = functools.partial(_pair_objective, losses.get_loss("dpo"), normalize=normalize)

    def objective(model, ref_model, pairs: PairBatch, samples: SeqBatch, hp: Hparams):
        dpo_value, metrics = dpo(model, ref_model, pairs, hp)
        kl_value, kl_metrics = hypo_kl_term(model, ref_model, samples)
        value = dpo_value + hp.lam * kl_value
        metrics = {**metrics, **kl_metrics, "dpo_loss": dpo_value, "kl_loss": kl_value}
        return value, {**metrics, "loss": value}

    def step(model, opt_state, ref_model, pairs: PairBatch, samples: SeqBatch, hp: Hparams, step):
        (_, metrics), grads = eqx.filter_value_and_grad(objective, has_aux=True)(
            model, ref_model, pairs, samples, hp
        )
        model, opt_state = apply_updates(model, opt_state, grads, optimizer, hp, step)
        return model, opt_state, {**metrics, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1))
