"""Determinism check: a stage run twice, and once across a kill and resume, gives the same bits.

Runs --stage three times from the same --seed, each in a fresh subprocess of this binary:
`a` and `b` straight through (with different PYTHONHASHSEEDs, so nothing may depend on set or
dict-of-str iteration order), and `killed`, which is SIGKILLed once it reports step
--kill_after and then rerun to resume from its checkpoint and order log. It then compares `b`
and `killed` with `a`: the checkpoint step lists, every common checkpoint array bit for bit
(naming the first differing parameter) and the data-order logs hash for hash (naming the first
differing step), and prints a final PASS/FAIL line.

Stages:
  online_ipo   tiny T5 policy + PM, online IPO (OnlineSource), order log, checkpoints.

  python experiments/check_determinism.py --stage=online_ipo --workdir=/tmp/det --steps=8
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from ipo_gap import determinism
from ipo_gap.configs import T5Config
from ipo_gap.data import sources
from ipo_gap.data.order_log import OrderLog, pair_schema
from ipo_gap.t5 import model as t5
from ipo_gap.train import loop, steps
from ipo_gap.train_state_io import CheckpointManager

_STAGE = flags.DEFINE_enum("stage", "online_ipo", ["online_ipo"], "Stage to check.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_STEPS = flags.DEFINE_integer("steps", 8, "Training steps of the stage.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the stage.")
_CKPT_EVERY = flags.DEFINE_integer("checkpoint_every", 3, "Checkpoint interval (steps).")
_KILL_AFTER = flags.DEFINE_integer(
    "kill_after", None, "SIGKILL the `killed` run once it reports this step (default steps // 2)."
)
_CHILD = flags.DEFINE_bool("_child", False, "Internal: run the stage once in --workdir.")

STEP_LINE = "STEP {}"
DONE_LINE = "DONE"
RUNS = ("a", "b", "killed")

# Tiny T5 (the test suite's tiny_config with one layer per stack and a 16-token vocabulary).
TINY = T5Config(
    vocab_size=16,
    d_model=32,
    d_ff=48,
    num_heads=4,
    d_kv=8,
    num_encoder_layers=1,
    num_decoder_layers=1,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    name="tiny",
)


def run_online_ipo(workdir: pathlib.Path, *, num_steps: int, seed: int, checkpoint_every: int):
    """The toy online IPO run: resumes from `workdir` if it holds a checkpoint and a log.

    Prompts, model inits, sampling keys and the data order all derive from `seed`. Prints
    `STEP s` after each step and `DONE` at the end.
    """
    S, T, B, num_prompts = 6, 5, 4, 12
    key_sft, key_pm, key_sample = jax.random.split(jax.random.key(seed), 3)
    sft = t5.init(TINY, key=key_sft)
    pm = t5.init(TINY, key=key_pm)
    rng = np.random.default_rng([seed, 0])
    mask = (np.arange(S)[None] < rng.integers(2, S + 1, (num_prompts, 1))).astype(np.int32)
    prompts = rng.integers(3, TINY.vocab_size, (num_prompts, S)).astype(np.int32) * mask
    source = sources.OnlineSource(
        prompts, mask, pm, batch_size=B, seed=seed, key=key_sample, max_len=T
    )
    log_dir = workdir / "log"
    if (log_dir / "meta.json").exists():
        log = OrderLog.open(log_dir)
    else:
        log = OrderLog.create(
            log_dir,
            schema=pair_schema(S, T),
            batch_size=B,
            meta={"tokenizer_sha256": "0" * 64, "stage": "online_ipo", "seed": seed},
        )
    loop.train_policy(
        model=jax.tree.map(lambda x: jnp.array(x, copy=True), sft),
        ref_model=sft,
        source=source,
        num_steps=num_steps,
        hparams=steps.Hparams.make(1e-2, beta=0.5),
        loss="ipo",
        order_log=log,
        checkpoint_dir=workdir / "ckpt",
        checkpoint_every=checkpoint_every,
        checkpoint_meta={"stage": "online_ipo", "seed": seed, "model": TINY.to_dict()},
        on_step=lambda s, m, x: print(STEP_LINE.format(s), flush=True),
        name="online_ipo",
    )
    print(DONE_LINE, flush=True)


STAGES = {"online_ipo": run_online_ipo}


def _child_command(run_dir: pathlib.Path) -> list[str]:
    return [
        sys.executable,
        os.path.abspath(__file__),
        "--_child",
        f"--stage={_STAGE.value}",
        f"--workdir={run_dir}",
        f"--steps={_STEPS.value}",
        f"--seed={_SEED.value}",
        f"--checkpoint_every={_CKPT_EVERY.value}",
    ]


def run_child(run_dir: pathlib.Path, *, hash_seed: int, kill_after: int | None = None) -> str:
    """Runs the stage in a subprocess; with `kill_after`, SIGKILLs it after that step.

    Returns how it ended: 'done' or 'killed'. stdout and stderr are appended to
    run_dir/../<run>.{stdout,stderr}.log. Raises RuntimeError if it failed, or finished
    before it could be killed.
    """
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    env.setdefault("JAX_PLATFORMS", "cpu")
    out_path = run_dir.parent / f"{run_dir.name}.stdout.log"
    err_path = run_dir.parent / f"{run_dir.name}.stderr.log"
    with open(out_path, "a") as out, open(err_path, "a") as err:
        proc = subprocess.Popen(
            _child_command(run_dir), stdout=subprocess.PIPE, stderr=err, text=True, env=env
        )
        killed, lines = False, []
        for line in proc.stdout:
            out.write(line)
            out.flush()
            lines.append(line.strip())
            if kill_after is not None and line.strip() == STEP_LINE.format(kill_after):
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
        proc.stdout.close()
        rc = proc.wait()
    for line in lines:
        if "resumed" in line:
            print(f"  {run_dir.name}: {line}", flush=True)
    if killed and rc == -signal.SIGKILL:
        return "killed"
    if kill_after is not None:
        raise RuntimeError(
            f"run {run_dir} ended (rc {rc}) before it could be killed after step {kill_after}; "
            f"see {err_path}"
        )
    if rc != 0 or DONE_LINE not in lines:
        raise RuntimeError(f"run {run_dir} failed (rc {rc}); see {err_path}")
    return "done"


def _checkpoint_steps(directory: pathlib.Path) -> list[int]:
    with CheckpointManager(directory) as mngr:
        return mngr.all_steps()


def compare_runs(a: pathlib.Path, b: pathlib.Path, num_steps: int) -> list[str]:
    """Problems found comparing run `b` with run `a` (empty: bit-identical)."""
    problems = []
    steps_a, steps_b = _checkpoint_steps(a / "ckpt"), _checkpoint_steps(b / "ckpt")
    if steps_a != steps_b:
        problems.append(f"checkpoint steps differ: {a.name} {steps_a}, {b.name} {steps_b}")
    if not steps_a or steps_a[-1] != num_steps:
        problems.append(f"{a.name} has no final checkpoint (step {num_steps}): {steps_a}")
    for step in sorted(set(steps_a) & set(steps_b)):
        diffs = determinism.compare_checkpoints(a / "ckpt", b / "ckpt", step)
        if diffs:
            problems.append(
                f"checkpoint step {step}: {len(diffs)} arrays differ; first: {diffs[0]}"
            )
    first = determinism.compare_logs(a / "log", b / "log")
    if first is not None:
        problems.append(f"order logs differ first at step {first}")
    for run in (a, b):
        log = OrderLog.open(run / "log")
        if len(log) != num_steps:
            problems.append(f"{run.name}: order log has {len(log)} steps, expected {num_steps}")
        bad = log.verify()
        if bad is not None:
            problems.append(f"{run.name}: order log fails verification at step {bad}")
    return problems


def run(workdir: pathlib.Path, num_steps: int, kill_after: int) -> bool:
    if not 0 <= kill_after < num_steps - 1:
        raise ValueError(f"--kill_after must be in [0, {num_steps - 2}], got {kill_after}")
    workdir.mkdir(parents=True, exist_ok=True)
    dirs = {name: workdir / name for name in RUNS}
    for name, d in dirs.items():  # start clean: remove only what this binary writes
        shutil.rmtree(d, ignore_errors=True)
        for suffix in (".stdout.log", ".stderr.log"):
            (workdir / f"{name}{suffix}").unlink(missing_ok=True)
    print(f"stage {_STAGE.value}: {num_steps} steps, seed {_SEED.value}, in {workdir}", flush=True)
    run_child(dirs["a"], hash_seed=1)
    print("  a: done", flush=True)
    run_child(dirs["b"], hash_seed=2)
    print("  b: done", flush=True)
    run_child(dirs["killed"], hash_seed=3, kill_after=kill_after)
    print(f"  killed: SIGKILLed after step {kill_after}", flush=True)
    run_child(dirs["killed"], hash_seed=4)
    print("  killed: resumed and done", flush=True)
    ok = True
    for other in ("b", "killed"):
        problems = compare_runs(dirs["a"], dirs[other], num_steps)
        ok &= not problems
        if problems:
            print(f"a vs {other}: DIFFERENT")
            for p in problems:
                print(f"  {p}")
        else:
            print(f"a vs {other}: identical (checkpoints bit for bit, order logs hash for hash)")
    print(
        f"PASS: {_STAGE.value} is deterministic across runs and across a kill + resume"
        if ok
        else f"FAIL: {_STAGE.value} is not deterministic (see above)",
        flush=True,
    )
    return ok


def main(argv):
    del argv
    workdir = pathlib.Path(_WORKDIR.value)
    if _CHILD.value:
        workdir.mkdir(parents=True, exist_ok=True)
        STAGES[_STAGE.value](
            workdir, num_steps=_STEPS.value, seed=_SEED.value, checkpoint_every=_CKPT_EVERY.value
        )
        return
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore of the comparison at INFO
    kill_after = _KILL_AFTER.value if _KILL_AFTER.value is not None else _STEPS.value // 2
    if not run(workdir, _STEPS.value, kill_after):
        raise SystemExit(1)


if __name__ == "__main__":
    app.run(main)
