"""SFT and preference-model trainers: the host loops around `make_sft_step` / `make_pm_train_step`.

Both read fixed-size batches in seeded epoch order (`sources.schedule_indices`), use Adam with
a linear warm-up to a constant learning rate, print progress lines (step, loss, rate, ETA) and
stop with `NonFiniteLossError` naming the step when the loss becomes NaN or inf.

`train_pm` evaluates the de-biased accuracy on a validation split every `eval_every` steps,
keeps the best parameters seen, and stops early at a validation plateau: no improvement for
`patience` evaluations (the paper: "stop at validation plateau").
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ipo_gap import hosts, preference, sharding
from ipo_gap.data import sources
from ipo_gap.sharding import place_like, to_device, to_host
from ipo_gap.train import steps
from ipo_gap.train.loop import (
    NonFiniteLossError,
    Progress,
    StepClock,
    check_finite_params,
    metrics_before,
    not_saved,
    rates,
)
from ipo_gap.train_state_io import CheckpointManager

TIMING_FIELDS = tuple(rates(1.0, 0))  # a metrics line's wall-clock fields
SEQ_FIELDS = ("src", "src_mask", "tgt", "tgt_mask")
PM_FIELDS = ("x", "x_mask", "y_w", "y_w_mask", "y_l", "y_l_mask")


def _adam_linear_warmup(learning_rate, warmup_steps) -> optax.GradientTransformation:
    """Adam whose step size follows `optax.linear_schedule(0, learning_rate, warmup_steps)`
    (constant when warmup_steps is 0), written so both may be traced arrays.

    The same float32 operations as a jitted `optax.adam` with that schedule (or with the
    constant), so the same bits: step size -((0 - lr) * (1 - min(count, w) * (1 / w)) + lr).
    The reciprocal is explicit because XLA rewrites optax's division by the constant w into
    a multiplication by 1 / w, which differs in the last bit for some counts (w = 100: 24 of
    the 100 warm-up steps).
    """

    def schedule(count):
        w = jnp.maximum(warmup_steps, 1)
        frac = 1 - jnp.clip(count, 0, w).astype(jnp.float32) * (1.0 / w.astype(jnp.float32))
        ramp = (0.0 - learning_rate) * frac + learning_rate
        return -jnp.where(warmup_steps > 0, ramp, learning_rate)

    return optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(schedule))


def adam_with_warmup(learning_rate: float, warmup_steps: int) -> optax.GradientTransformation:
    """optax Adam (b1 0.9, b2 0.999, eps 1e-8) with a linear warm-up, then constant.

    The learning rate and the warm-up length live in the optimizer state (float32 and int32
    arrays, `optax.inject_hyperparams`), not in the compiled step: the SFT and PM trainers
    compile one step per model and batch shape for every learning rate and warm-up (a sweep,
    or the golden and proxy PMs of one size). Same bits as `optax.adam` with
    `optax.linear_schedule(0, learning_rate, warmup_steps)`, or with the constant when
    warmup_steps is 0 (tests/test_trainers.py).
    """
    return optax.inject_hyperparams(_adam_linear_warmup)(
        learning_rate=float(learning_rate), warmup_steps=int(warmup_steps)
    )


@functools.cache
def _sft_step():
    """The SFT step for every learning rate and warm-up (they are read from the state)."""
    return steps.make_sft_step(adam_with_warmup(0.0, 0))


@functools.cache
def _pm_step(kind: str):
    """The PM step of `kind` for every learning rate and warm-up (read from the state)."""
    return preference.make_pm_train_step(adam_with_warmup(0.0, 0), kind)


class _Resumable:
    """Train states of a trainer every `every` steps in `directory` (orbax), and its resume.

    A state holds the trainer's arrays (model, optimizer state, ...) and JSON metadata: the
    settings that fix the run (`identity`: seed, learning rate, batch, steps), which must
    match on resume, and the trainer's host variables (`extra`, e.g. the PM's best step).
    Batches and keys derive from (seed, step), so a resumed run repeats the uninterrupted one
    bit for bit. On resume, the metrics file keeps its lines of the steps before the state
    (it must hold all of them). The last two states are kept. On an active mesh, the state
    is restored onto it (`sharding.restore_shardings`).
    """

    def __init__(self, directory, every: int, name: str, identity: dict, metrics_path):
        self.every, self.name, self.identity = every, name, identity
        self.manager = None
        if directory and every:
            if not metrics_path:
                raise ValueError(f"[{name}] checkpointing needs a metrics_path (the history)")
            self.manager = CheckpointManager(directory, max_to_keep=2)

    def restore(self, like, metrics_path, num_steps: int):
        """(arrays, extra metadata, step to continue at, the metrics rows of the steps before
        it), or None when nothing is saved."""
        if self.manager is None or self.manager.latest_step() is None:
            return None
        step = self.manager.latest_step()
        if step > num_steps:
            raise ValueError(
                f"[{self.name}] the train state in {self.manager.directory} is at step {step}, "
                f"past this run's {num_steps} steps"
            )
        meta = self.manager.restore_metadata(step)
        if meta.get("identity") != json.loads(json.dumps(self.identity)):
            raise ValueError(
                f"[{self.name}] the train state in {self.manager.directory} (step {step}) was "
                f"written by a run with {meta.get('identity')}; this run has {self.identity}: "
                "use the original settings, or delete that directory"
            )
        arrays = self.manager.restore(step, like, shardings=sharding.restore_shardings(like))
        rows = metrics_before(metrics_path, self.name, step)
        hosts.say(f"[{self.name}] resumed from its train state at step {step}")
        return arrays, meta.get("extra", {}), step, rows

    def maybe_save(self, step_done: int, arrays, extra: dict | None = None) -> None:
        if self.manager is None or step_done % self.every:
            return
        if step_done not in self.manager.all_steps():
            check_finite_params(arrays, self.name, step_done, not_saved(self.manager))
            meta = {"identity": self.identity, "extra": extra or {}}
            self.manager.save(step_done, arrays, metadata=meta, force=True)

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()


def _check_rows(data: dict[str, np.ndarray], fields: tuple[str, ...], what: str) -> int:
    missing = [f for f in fields if f not in data]
    if missing:
        raise ValueError(f"{what}: missing fields {missing}")
    rows = {f: len(data[f]) for f in fields}
    if len(set(rows.values())) != 1:
        raise ValueError(f"{what}: fields disagree on the number of rows: {rows}")
    return rows[fields[0]]


def _finite(loss: float, name: str, step: int) -> None:
    if not np.isfinite(loss):
        raise NonFiniteLossError(f"[{name}] loss is {loss} at step {step}; stopped")


def train_sft(
    model,
    data: dict[str, np.ndarray],
    *,
    num_steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    warmup_steps: int = 0,
    name: str = "sft",
    metrics_path: str | pathlib.Path | None = None,
    checkpoint_dir: str | pathlib.Path | None = None,
    checkpoint_every: int = 0,
    on_step=None,
):
    """Supervised fine-tuning on (src, tgt) rows; returns (model, history of losses).

    The model passed in is left intact: a copy is trained (the jitted step donates buffers).
    With `checkpoint_dir` and `checkpoint_every`, the train state is saved every that many
    steps and a killed run called again with the same arguments continues from its latest
    state, bit for bit (the history then includes the steps before the resume).
    """
    n = _check_rows(data, SEQ_FIELDS, name)
    model = sources.copy_arrays(model)
    optimizer = adam_with_warmup(learning_rate, warmup_steps)
    opt_state = place_like(optimizer.init(eqx.filter(model, eqx.is_array)), model)
    identity = {"seed": seed, "lr": learning_rate, "batch": batch_size, "warmup": warmup_steps}
    ckpt = _Resumable(checkpoint_dir, checkpoint_every, name, identity, metrics_path)
    start, history, resumed = 0, [], ckpt.restore((model, opt_state), metrics_path, num_steps)
    if resumed is not None:
        (model, opt_state), _, start, rows = resumed
        history = [r["loss"] for r in rows]
    step_fn = _sft_step()
    progress = Progress(num_steps, name)
    # One writer per multi-host job (`hosts`); every process computes the same rows.
    out = hosts.open_on_writer(metrics_path, "a" if resumed else "w")
    clock = StepClock()
    try:
        for step in range(start, num_steps):
            idx = sources.schedule_indices(seed, step, batch_size, n)
            batch = steps.SeqBatch(*(to_device(data[f][idx]) for f in SEQ_FIELDS))
            model, opt_state, m = step_fn(model, opt_state, batch)
            loss = float(m["loss"])
            _finite(loss, name, step)
            history.append(loss)
            timing = clock.lap(int(data["tgt_mask"][idx].sum()))
            if out is not None:
                out.write(json.dumps({"step": step, "loss": loss, **timing}) + "\n")
                out.flush()
            ckpt.maybe_save(step + 1, (model, opt_state))
            progress.update(step, loss, force=step == num_steps - 1)
            if on_step is not None:  # on_step(step) after the step and its save
                on_step(step)
    finally:
        ckpt.close()
        if out is not None:
            out.close()
    check_finite_params(model, name, num_steps, "the model is not returned")
    return model, history


# Rows per batch where a PM judges a whole dataset (validation, relabelling, test accuracy):
# `pair_logit_rows`, `judge_rows`, `pm_accuracy`. (The online stream and the win rates are
# judged at the study's `eval_batch`.)
JUDGE_BATCH = 256

# `preference.pair_logits_both_orders` in its two halves, so the rows can be cut in between.
_pack_both_orders = jax.jit(preference.pack_both_orders, static_argnames="markers")
_logits_both_orders = eqx.filter_jit(preference.logits_of_packed_pairs)


def pair_logit_rows(
    pm, x, xm, y1, m1, y2, m2, *, batch_size: int = JUDGE_BATCH, bucket: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """(logit r(x, y1, y2), logit r(x, y2, y1)) for every row: `preference.pair_logits_both_orders`
    for a whole dataset, with the work cut to the tokens that are there.

    The rows are packed at the worst-case length S + T1 + T2 + 3, sorted by their packed length,
    and scored in fixed-size batches (the last edge-padded), each cut to its longest row rounded
    up to a multiple of `bucket`: columns past a batch's longest row are padding in all of its
    rows and change nothing but floating-point summation order. On the embedded task the packed
    rows average about half the worst case, so the golden PM's judgements cost about half.
    Compilations: one per distinct cut length (at most worst / bucket + 1).
    """
    n = len(x)
    if n == 0:
        return np.zeros((0,), np.float32), np.zeros((0,), np.float32)
    arrays = [np.asarray(a) for a in (x, xm, y1, m1, y2, m2)]
    packed = [[], [], [], []]
    for idx, keep in sources.padded_batches(n, batch_size):
        rows = _pack_both_orders(*(to_device(a[idx]) for a in arrays), markers=pm.cfg.pm_ids)
        for out, a in zip(packed, rows, strict=True):
            out.append(to_host(a)[:keep])
    t12, m12, t21, m21 = (np.concatenate(p) for p in packed)
    worst = t12.shape[1]
    lengths = m12.sum(1)
    order = np.argsort(lengths, kind="stable")
    z12, z21 = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for idx, keep in sources.padded_batches(n, batch_size, order):
        cut = min(worst, -(-int(lengths[idx].max()) // bucket) * bucket)
        rows = (to_device(a[idx, :cut]) for a in (t12, m12, t21, m21))
        a12, a21 = _logits_both_orders(pm, *rows)
        z12[idx[:keep]], z21[idx[:keep]] = to_host(a12)[:keep], to_host(a21)[:keep]
    return z12, z21


def judge_rows(pm, x, xm, y1, m1, y2, m2, *, batch_size: int = JUDGE_BATCH) -> np.ndarray:
    """De-biased judgements P(y1 > y2) in {0, 0.5, 1} for every row (A.2's sign rule on
    `pair_logit_rows`)."""
    z12, z21 = pair_logit_rows(pm, x, xm, y1, m1, y2, m2, batch_size=batch_size)
    return np.asarray(preference.judge_from_logits(z12, z21))


_bt_judge = eqx.filter_jit(preference.bt_judge)


def bt_judge_rows(pm, x, xm, y1, m1, y2, m2, *, batch_size: int = JUDGE_BATCH) -> np.ndarray:
    """A pointwise (Bradley-Terry) PM's judgements P(y1 > y2) in {0, 0.5, 1} for every row
    (`preference.bt_judge`: r(x, y1) against r(x, y2)), in fixed-size batches."""
    arrays = [np.asarray(a) for a in (x, xm, y1, m1, y2, m2)]
    out = np.zeros(len(arrays[0]), np.float32)
    for idx, keep in sources.padded_batches(len(out), batch_size):
        judged = _bt_judge(pm, *(to_device(a[idx]) for a in arrays))
        out[idx[:keep]] = to_host(judged)[:keep]
    return out


def pm_accuracy(
    pm, data: dict[str, np.ndarray], *, batch_size: int = JUDGE_BATCH, kind: str = "pairwise"
) -> float:
    """Fraction of rows where the PM prefers y_w (a tie counts 1/2): the de-biased pairwise
    judge, or for `kind` "bt" the pointwise one (a PM is judged as it was trained)."""
    judge = bt_judge_rows if kind == "bt" else judge_rows
    judged = judge(pm, *(data[f] for f in PM_FIELDS), batch_size=batch_size)
    return float(np.mean(judged))


@dataclasses.dataclass
class PMResult:
    model: object
    best_step: int
    best_valid_accuracy: float
    stopped_early: bool
    history: list[dict]


def train_pm(
    model,
    train: dict[str, np.ndarray],
    valid: dict[str, np.ndarray],
    *,
    num_steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    warmup_steps: int = 0,
    eval_every: int = 100,
    patience: int = 3,
    name: str = "pm",
    metrics_path: str | pathlib.Path | None = None,
    kind: str = "pairwise",
    checkpoint_dir: str | pathlib.Path | None = None,
    checkpoint_every: int = 0,
    on_step=None,
) -> PMResult:
    """Trains a pairwise PM (eq. 5) on (x, y_w, y_l) rows, stopping at a validation plateau.

    Returns the best parameters by validation accuracy (evaluated every `eval_every` steps
    and at the end), the step they come from, and whether training stopped early. The model
    passed in is left intact (a copy is trained). `kind` is `make_pm_train_step`'s:
    "pairwise" (eq. 5 with a random order per example), "pairwise-both" (eq. 5 exactly, both
    orders; learns faster, see `preference.pm_loss_both_orders`) or "bt". `checkpoint_dir` /
    `checkpoint_every`: as `train_sft`'s; the state also holds the best parameters so far and
    the plateau count, so a resumed run stops where the uninterrupted one would.
    """
    n = _check_rows(train, PM_FIELDS, f"{name} train")
    _check_rows(valid, PM_FIELDS, f"{name} valid")
    model = sources.copy_arrays(model)
    optimizer = adam_with_warmup(learning_rate, warmup_steps)
    opt_state = place_like(optimizer.init(eqx.filter(model, eqx.is_array)), model)
    step_fn = _pm_step(kind)
    key = jax.random.key(seed)
    progress = Progress(num_steps, name)
    history: list[dict] = []
    best = (-1.0, -1, None)
    since_best = 0
    stopped_early = False
    identity = {
        "seed": seed,
        "lr": learning_rate,
        "batch": batch_size,
        "warmup": warmup_steps,
        "eval_every": eval_every,
        "patience": patience,
        "kind": kind,
    }
    if "pm_ids" in model.cfg.to_dict():  # ids it learns to read, other than the default
        identity["pm_ids"] = list(model.cfg.pm_ids)
    ckpt = _Resumable(checkpoint_dir, checkpoint_every, name, identity, metrics_path)
    # Before the first evaluation the best model slot holds the current one (best step -1).
    start, resumed = 0, ckpt.restore((model, opt_state, model), metrics_path, num_steps)
    if resumed is not None:
        (model, opt_state, best_model), extra, start, rows = resumed
        history = [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]
        best_model = best_model if extra["best_step"] >= 0 else None
        best, since_best = (extra["best_accuracy"], extra["best_step"], best_model), extra["since"]
        if since_best >= patience:  # saved at the plateau, killed before returning
            start, stopped_early = num_steps, True
    # One writer per multi-host job (`hosts`); every process computes the same rows.
    out = hosts.open_on_writer(metrics_path, "a" if resumed else "w")
    clock = StepClock()
    try:
        for step in range(start, num_steps):
            idx = sources.schedule_indices(seed, step, batch_size, n)
            batch = preference.PreferenceBatch(*(to_device(train[f][idx]) for f in PM_FIELDS))
            model, opt_state, m = step_fn(model, opt_state, batch, jax.random.fold_in(key, step))
            loss = float(m["loss"])
            _finite(loss, name, step)
            record = {"step": step, "loss": loss, "accuracy": float(m["accuracy"])}
            tokens = sum(int(train[f][idx].sum()) for f in ("x_mask", "y_w_mask", "y_l_mask"))
            if (step + 1) % eval_every == 0 or step == num_steps - 1:
                acc = pm_accuracy(model, valid, kind=kind)
                record["valid_accuracy"] = acc
                if acc > best[0]:
                    best, since_best = (acc, step + 1, sources.copy_arrays(model)), 0
                else:
                    since_best += 1
                hosts.say(f"[{name}] step {step + 1}: validation accuracy {acc:.4f}")
            timing = clock.lap(tokens)  # with the validation, if any
            history.append(record)  # the history stays a function of the seed: no timings
            if out is not None:
                out.write(json.dumps({**record, **timing}) + "\n")
                out.flush()
            best_arrays = model if best[2] is None else best[2]
            ckpt.maybe_save(
                step + 1,
                (model, opt_state, best_arrays),
                {"best_accuracy": best[0], "best_step": best[1], "since": since_best},
            )
            progress.update(step, loss, force=step == num_steps - 1)
            if on_step is not None:  # on_step(step) after the step and its save
                on_step(step)
            if since_best >= patience:
                hosts.say(f"[{name}] validation plateau: stopped at step {step + 1}")
                stopped_early = True
                break
    finally:
        ckpt.close()
        if out is not None:
            out.close()
    if best[2] is not None:
        check_finite_params(best[2], name, best[1], "the model is not returned")
    return PMResult(best[2], best[1], best[0], stopped_early, history)
