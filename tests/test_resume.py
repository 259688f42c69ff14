"""Pre-emption safety: SIGKILL an online run twice, resume, and get the uninterrupted run's bits."""

import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from ipo_gap.data.order_log import OrderLog
from ipo_gap.determinism import restore_raw
from ipo_gap.train_state_io import CheckpointManager

N = 8

DRIVER = """
import pathlib, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "tests")
from conftest import tiny_config
from ipo_gap.data import sources
from ipo_gap.data.order_log import OrderLog, pair_schema
from ipo_gap.t5 import model as t5
from ipo_gap.train import loop, steps

workdir = pathlib.Path(sys.argv[1])
S, T, B, N = 6, 5, 4, int(sys.argv[2])
cfg = tiny_config(num_encoder_layers=1, num_decoder_layers=1, vocab_size=16)
sft = t5.init(cfg, key=jax.random.key(0))
pm = t5.init(cfg, key=jax.random.key(1))
rng = np.random.default_rng(0)
mask = (np.arange(S)[None] < rng.integers(2, S + 1, (12, 1))).astype(np.int32)
prompts = rng.integers(3, cfg.vocab_size, (12, S)).astype(np.int32) * mask
source = sources.OnlineSource(prompts, mask, pm, batch_size=B, seed=3, key=jax.random.key(5),
                              max_len=T)
log_dir = workdir / "log"
if (log_dir / "meta.json").exists():
    log = OrderLog.open(log_dir)
else:
    log = OrderLog.create(log_dir, schema=pair_schema(S, T), batch_size=B,
                          meta={"tokenizer_sha256": "0" * 64})
policy = jax.tree.map(lambda x: jnp.array(x, copy=True), sft)
loop.train_policy(model=policy, ref_model=sft, source=source, num_steps=N,
                  hparams=steps.Hparams.make(1e-2, beta=0.5), loss="ipo", order_log=log,
                  checkpoint_dir=workdir / "ckpt", checkpoint_every=3,
                  on_step=lambda s, m, x: print(f"STEP {s}", flush=True))
print("DONE", flush=True)
"""


def _run(workdir, kill_after=None):
    """Runs the driver; with kill_after=k, SIGKILLs it once it reports step k."""
    workdir.mkdir(parents=True, exist_ok=True)
    err = open(workdir / "stderr.log", "a")  # noqa: SIM115  (a file: a chatty child never blocks)
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(workdir), str(N)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if kill_after is not None and line.strip() == f"STEP {kill_after}":
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=300)
    err.close()
    if kill_after is None:
        assert proc.returncode == 0 and "DONE" in lines, (workdir / "stderr.log").read_text()[
            -3000:
        ]
    else:
        assert proc.returncode == -signal.SIGKILL
    return lines


@pytest.mark.slow  # four subprocess runs, each compiling: ~1-2 min
def test_sigkill_twice_then_resume_is_bit_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(straight)
    kills = sorted(random.Random(0).sample(range(1, N - 1), 2))
    for k in kills:
        _run(killed, kill_after=k)
    lines = _run(killed)
    # The last run resumed from a checkpoint (at most 3 steps back: checkpoint_every=3).
    resumed = [line for line in lines if line.startswith("[policy] resumed")]
    assert len(resumed) == 1 and int(resumed[0].split()[-1]) >= kills[-1] - 2, lines
    # The data-order logs are identical, hash by hash.
    a, b = OrderLog.open(straight / "log"), OrderLog.open(killed / "log")
    assert len(a) == len(b) == N
    assert [a.hash(s) for s in range(N)] == [b.hash(s) for s in range(N)]
    assert a.verify() is None and b.verify() is None
    # The final parameters and optimizer state are identical, bit for bit.
    ma, mb = CheckpointManager(straight / "ckpt"), CheckpointManager(killed / "ckpt")
    assert ma.latest_step() == mb.latest_step() == N
    arrays_a = restore_raw(straight / "ckpt", N)
    arrays_b = restore_raw(killed / "ckpt", N)
    assert arrays_a.keys() == arrays_b.keys() and len(arrays_a) > 10
    for k in arrays_a:
        np.testing.assert_array_equal(arrays_a[k], arrays_b[k], err_msg=str(k))
