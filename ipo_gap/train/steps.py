"""Jitted train steps, built by `make_*_step` factories.

This slice holds the supervised (SFT) step; the shared policy step of every alignment loss
(the training-engine issue) joins it here.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import optax

from ipo_gap import logprobs, losses
from ipo_gap.t5 import model as t5


class SeqBatch(NamedTuple):
    """Prompts and one response each: B x S prompt tokens/mask, B x T target tokens/mask."""

    src: jax.Array
    src_mask: jax.Array
    tgt: jax.Array
    tgt_mask: jax.Array


def sft_loss_fn(model: t5.T5, batch: SeqBatch):
    """Token-averaged cross-entropy of the responses (per-sequence mean, then batch mean)."""
    logits = t5.forward(model, batch.src, batch.src_mask, t5.shift_right(batch.tgt))
    logp = logprobs.sequence_logprobs(logits, batch.tgt, batch.tgt_mask, normalize="mean")
    return losses.sft_loss(logp)


def make_sft_step(optimizer: optax.GradientTransformation):
    """Returns a jitted step(model, opt_state, batch) -> (model, opt_state, metrics).

    The model and optimizer state passed in are donated (their buffers are reused).
    """

    @eqx.filter_jit(donate="all")
    def step(model, opt_state, batch: SeqBatch):
        (loss, metrics), grads = eqx.filter_value_and_grad(sft_loss_fn, has_aux=True)(model, batch)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        return model, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **metrics}

    return step
