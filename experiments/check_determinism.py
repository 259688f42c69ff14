"""Determinism check: a stage run twice, and once across a kill and resume, gives the same bits.

Runs --stage three times from the same --seed, each in a fresh subprocess of this binary:
`a` and `b` straight through (with different PYTHONHASHSEEDs, so nothing may depend on set or
dict-of-str iteration order), and `killed`, which is SIGKILLed once it reports step
--kill_after and then rerun to resume from its checkpoint and order log. It then compares `b`
and `killed` with `a`: the checkpoint step lists, every common checkpoint array bit for bit
(naming the first differing parameter) and the data-order logs hash for hash (naming the first
differing step), and prints a final PASS/FAIL line.

Stages (each a tiny T5 on seeded random tokens, through the same code as the study's stages):
  online_ipo   online IPO (OnlineSource: sampling + PM judging), order log, train states.
  offline_ipo  offline IPO on a fixed pair dataset (OfflineSource), order log, train states.
  sft          SFT (trainers.train_sft), train states, the returned model and the metrics.
  pm           pairwise PM training (trainers.train_pm, random order per example, validation),
               train states, the returned best model and the metrics.
For the trainers (sft, pm), which keep their last two train states, the returned model is saved
in final/ and compared too, and every run's per-step losses must agree exactly.

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

from ipo_gap import determinism, jsonl
from ipo_gap.configs import T5Config
from ipo_gap.data import sources
from ipo_gap.data.order_log import OrderLog, pair_schema
from ipo_gap.t5 import model as t5
from ipo_gap.train import loop, steps, trainers
from ipo_gap.train_state_io import CheckpointManager

_STAGE = flags.DEFINE_enum(
    "stage", "online_ipo", ["online_ipo", "offline_ipo", "sft", "pm"], "Stage to check."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_STEPS = flags.DEFINE_integer("steps", 8, "Training steps of the stage.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the stage.")
_CKPT_EVERY = flags.DEFINE_integer("checkpoint_every", 3, "Checkpoint interval (steps).")
_KILL_AFTER = flags.DEFINE_integer(
    "kill_after", None, "SIGKILL the `killed` run once it reports this step (default steps // 2)."
)
_CHILD = flags.DEFINE_bool("_child", False, "Internal: run the stage once in --workdir.")
flags.register_validator("steps", lambda v: v >= 3, "--steps must be >= 3 (a kill, then a resume)")
flags.register_validator(
    "checkpoint_every", lambda v: v >= 1, "--checkpoint_every must be >= 1 (the kill resumes)"
)

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


S, T, B = 6, 5, 4  # prompt and response lengths, batch


def _tokens(rng, n: int, length: int, min_len: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """n right-padded random token rows (ids >= 3) and their masks."""
    mask = (np.arange(length)[None] < rng.integers(min_len, length + 1, (n, 1))).astype(np.int32)
    return rng.integers(3, TINY.vocab_size, (n, length)).astype(np.int32) * mask, mask


def _pairs(rng, n: int) -> dict[str, np.ndarray]:
    x, xm = _tokens(rng, n, S)
    (yw, ywm), (yl, ylm) = _tokens(rng, n, T, 1), _tokens(rng, n, T, 1)
    return {"x": x, "x_mask": xm, "y_w": yw, "y_w_mask": ywm, "y_l": yl, "y_l_mask": ylm}


def _say_step(step, *_):
    print(STEP_LINE.format(step), flush=True)


def run_online_ipo(workdir: pathlib.Path, *, num_steps: int, seed: int, checkpoint_every: int):
    """The toy online IPO run: resumes from `workdir` if it holds a checkpoint and a log.

    Prompts, model inits, sampling keys and the data order all derive from `seed`. Prints
    `STEP s` after each step and `DONE` at the end.
    """
    key_sft, key_pm, key_sample = jax.random.split(jax.random.key(seed), 3)
    pm = t5.init(TINY, key=key_pm)
    prompts, mask = _tokens(np.random.default_rng([seed, 0]), 12, S)
    source = sources.OnlineSource(
        prompts, mask, pm, batch_size=B, seed=seed, key=key_sample, max_len=T
    )
    _policy_run(workdir, "online_ipo", source, key_sft, num_steps, seed, checkpoint_every)


def run_offline_ipo(workdir: pathlib.Path, *, num_steps: int, seed: int, checkpoint_every: int):
    """Offline IPO on 20 seeded random pairs (epoch-shuffled), logged like the online run."""
    p = _pairs(np.random.default_rng([seed, 1]), 20)
    data = {k.replace("x", "prompt") if k.startswith("x") else k: v for k, v in p.items()}
    source = sources.OfflineSource(data, batch_size=B, seed=seed)
    _policy_run(
        workdir, "offline_ipo", source, jax.random.key(seed), num_steps, seed, checkpoint_every
    )


def _save_final(workdir: pathlib.Path, model, num_steps: int) -> None:
    with CheckpointManager(workdir / "final") as mngr:
        mngr.save(num_steps, model, force=True)


def _trainer_kwargs(workdir: pathlib.Path, num_steps: int, seed: int, checkpoint_every: int):
    """The arguments `train_sft` and `train_pm` share here: run length, batch, rate, seed,
    metrics, resumable train states and the step announcements the killer waits for."""
    return {
        "num_steps": num_steps,
        "batch_size": B,
        "learning_rate": 1e-2,
        "seed": seed,
        "metrics_path": workdir / "metrics.jsonl",
        "checkpoint_dir": workdir / "ckpt",
        "checkpoint_every": checkpoint_every,
        "on_step": _say_step,
    }


def run_sft(workdir: pathlib.Path, *, num_steps: int, seed: int, checkpoint_every: int):
    """SFT of a tiny T5 on 24 seeded random (prompt, response) rows."""
    rng = np.random.default_rng([seed, 2])
    (src, src_m), (tgt, tgt_m) = _tokens(rng, 24, S), _tokens(rng, 24, T, 1)
    model, _ = trainers.train_sft(
        t5.init(TINY, key=jax.random.key(seed)),
        {"src": src, "src_mask": src_m, "tgt": tgt, "tgt_mask": tgt_m},
        name="sft",
        **_trainer_kwargs(workdir, num_steps, seed, checkpoint_every),
    )
    _save_final(workdir, model, num_steps)
    print(DONE_LINE, flush=True)


def run_pm(workdir: pathlib.Path, *, num_steps: int, seed: int, checkpoint_every: int):
    """Pairwise PM training (random order per example) on 24 seeded random pairs, validated
    every 2 steps on 8 more (no early stop)."""
    rng = np.random.default_rng([seed, 3])
    result = trainers.train_pm(
        t5.init(TINY, key=jax.random.key(seed)),
        _pairs(rng, 24),
        _pairs(rng, 8),
        eval_every=2,
        patience=num_steps,
        name="pm",
        **_trainer_kwargs(workdir, num_steps, seed, checkpoint_every),
    )
    _save_final(workdir, result.model, num_steps)
    print(DONE_LINE, flush=True)


def _policy_run(workdir, stage, source, key_sft, num_steps, seed, checkpoint_every):
    """train_policy from a tiny SFT init with an order log and train states; resumes."""
    sft = t5.init(TINY, key=key_sft)
    log_dir = workdir / "log"
    if (log_dir / "meta.json").exists():
        log = OrderLog.open(log_dir)
    else:
        log = OrderLog.create(
            log_dir,
            schema=pair_schema(S, T),
            batch_size=B,
            meta={"tokenizer_sha256": "0" * 64, "stage": stage, "seed": seed},
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
        checkpoint_meta={"stage": stage, "seed": seed, "model": TINY.to_dict()},
        on_step=_say_step,
        name=stage,
    )
    print(DONE_LINE, flush=True)


STAGES = {
    "online_ipo": run_online_ipo,
    "offline_ipo": run_offline_ipo,
    "sft": run_sft,
    "pm": run_pm,
}


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
    # Policy stages save a train state at the end; the trainers keep their last two states
    # and the child saves the returned model in final/.
    final = "final" if (a / "final").exists() else "ckpt"
    for sub in dict.fromkeys(("ckpt", final)):
        steps_a, steps_b = _checkpoint_steps(a / sub), _checkpoint_steps(b / sub)
        if steps_a != steps_b:
            problems.append(f"{sub} steps differ: {a.name} {steps_a}, {b.name} {steps_b}")
        if sub == final and (not steps_a or steps_a[-1] != num_steps):
            problems.append(f"{a.name} has no final {sub} (step {num_steps}): {steps_a}")
        for step in sorted(set(steps_a) & set(steps_b)):
            diffs = determinism.compare_checkpoints(a / sub, b / sub, step)
            if diffs:
                problems.append(f"{sub} step {step}: {len(diffs)} arrays differ; first: {diffs[0]}")
    if (a / "metrics.jsonl").exists():  # the trainers' per-step losses (timings aside)
        losses = [
            [(r["step"], r["loss"]) for r in jsonl.read_rows(run / "metrics.jsonl")]
            for run in (a, b)
        ]
        if losses[0] != losses[1] or len(losses[0]) != num_steps:
            bad = next((x for x, y in zip(*losses, strict=False) if x != y), None)
            problems.append(
                f"metrics differ: {len(losses[0])} vs {len(losses[1])} steps, first {bad}"
            )
    if not (a / "log").exists():
        return problems
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
    ckpt = dirs["killed"] / "ckpt"
    saved = CheckpointManager(ckpt).latest_step() if ckpt.exists() else None
    if saved is None:  # the rerun would start over: no resume would be checked
        raise ValueError(
            f"the run killed after step {kill_after} had saved no checkpoint (every "
            f"{_CKPT_EVERY.value} steps): nothing to resume from; use a later --kill_after or a "
            "smaller --checkpoint_every"
        )
    print(f"  killed: its last checkpoint is step {saved}", flush=True)
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
