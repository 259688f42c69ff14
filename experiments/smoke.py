"""Smoke run: SFT a toy T5 policy for a few steps on a synthetic task, then sample from it.

Exercises the real path end to end on a CPU in about a minute: a SentencePiece tokenizer
trained on the task's text, a T5 v1.1 (toy-s preset), the jitted SFT step with optax Adam,
and the KV-cached ancestral sampler. The task: the prompt lists words, the response repeats
them in reverse order. Usage:

  python experiments/smoke.py --steps=150

With --distributed every process runs the same command and loads only its rows of each
global batch (`sharding.process_batch_slice`), which `sharding.shard_batch` assembles.
"""

from __future__ import annotations

import random
import time

import host_flags
import jax
import numpy as np
import optax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from ipo_gap import sampling, sharding
from ipo_gap.configs import model_preset
from ipo_gap.t5 import model as t5
from ipo_gap.tokenizer import Tokenizer
from ipo_gap.train.steps import SeqBatch, make_sft_step

_STEPS = flags.DEFINE_integer("steps", 150, "SFT steps.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Examples per step.")
_LR = flags.DEFINE_float("learning_rate", 3e-3, "Adam learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of data, init and sampling.")
_PRESET = flags.DEFINE_string("model", "toy-s", "Model preset (ipo_gap.configs).")
_MESH = flags.DEFINE_string("mesh", "data:-1", "Device mesh, e.g. 'data:4,model:2' (-1: all).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Multi-host: jax.distributed.initialize; every process runs this command and loads only "
    "its slice of each global batch (on Cloud TPU, SLURM or Open MPI the three flags below "
    "may be left unset).",
)

WORDS = (
    "apple river stone cloud green quick seven amber lemon tiger piano ocean silver "
    "forest candle rocket violet marble winter orange"
).split()


def make_examples(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 5))
        out.append(("reverse: " + " ".join(words), " ".join(reversed(words))))
    return out


def main(argv):
    del argv
    host_flags.initialize(_DISTRIBUTED.value)
    mesh = sharding.make_mesh(_MESH.value)
    rng = random.Random(_SEED.value)
    train = make_examples(rng, 4000)
    tok = Tokenizer.train((t for pair in train for t in pair), vocab_size=64)
    cfg = model_preset(_PRESET.value, vocab_size=tok.vocab_size)
    logging.info(
        "tokenizer %s, model %s: %d params, mesh %s",
        tok,
        cfg.name,
        cfg.num_params(),
        dict(mesh.shape),
    )
    key_init, key_sample = jax.random.split(jax.random.key(_SEED.value))
    model = sharding.shard_model(t5.init(cfg, key=key_init), mesh)
    optimizer = optax.adam(_LR.value)
    opt_state = optimizer.init(model)
    step_fn = make_sft_step(optimizer)
    src = tok.encode([p for p, _ in train], 16)
    tgt = tok.encode([r for _, r in train], 16)
    order = np.random.default_rng(_SEED.value).permutation(len(train))
    start = time.time()
    for step in range(_STEPS.value):
        idx = order[np.arange(step * _BATCH.value, (step + 1) * _BATCH.value) % len(train)]
        idx = idx[sharding.process_batch_slice(_BATCH.value)]  # this host's rows only
        batch = sharding.shard_batch(
            SeqBatch(src.ids[idx], src.mask[idx], tgt.ids[idx], tgt.mask[idx]), mesh
        )
        model, opt_state, metrics = step_fn(model, opt_state, batch)
        if step == 0:  # the rate excludes compilation
            print(
                f"step 1/{_STEPS.value}  loss {float(metrics['loss']):.3f}  "
                f"(compiled in {time.time() - start:.1f}s; global batch {batch[0].shape[0]}, "
                f"{len(idx)} rows loaded by this process)",
                flush=True,
            )
            start = time.time()
        elif step % 25 == 0 or step == _STEPS.value - 1:
            rate = step / (time.time() - start)
            print(
                f"step {step + 1}/{_STEPS.value}  loss {float(metrics['loss']):.3f}  "
                f"{rate:.1f} steps/s  ETA {(_STEPS.value - step - 1) / rate:.0f}s",
                flush=True,
            )
    tests = make_examples(random.Random(_SEED.value + 1), 4)
    enc = tok.encode([p for p, _ in tests], 16)
    # The few demo prompts, replicated on every device (every host passes them all).
    whole = NamedSharding(mesh, PartitionSpec())
    ids, mask = (jax.make_array_from_process_local_data(whole, x) for x in (enc.ids, enc.mask))
    out = sampling.sample(model, ids, mask, key=key_sample, max_len=16)
    tokens = multihost_utils.process_allgather(out.tokens, tiled=True)
    for (prompt, want), got in zip(tests, tok.decode(np.asarray(tokens)), strict=True):
        print(f"{prompt!r} -> sampled {got!r} (target {want!r})")


if __name__ == "__main__":
    app.run(main)
