"""The host loop of policy training: source -> [order log] -> train step, with metrics.

`train_policy` runs the shared policy step over any source (online, semi-online, offline,
replayed, shuffled), optionally appending every batch to a data-order log *before* training on
it, and writes one JSON line of metrics per logging step plus a progress line with rate and ETA.
A NaN/inf loss stops the loop with `NonFiniteLossError` naming the step, the order log ends
with the batch whose loss that was (`_drop_logged_after`), and no checkpoint holds a state
after it; nor does any hold non-finite parameters (an update can poison them while its own
loss is finite: `check_finite_params` runs before every save and on the returned model).
A step's metrics are read after the next step is dispatched, so the host's work overlaps the
device's. `train_hypo` runs HyPO's step (offline pairs + on-policy KL term)
in the same loop.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ipo_gap import hosts, jsonl
from ipo_gap.data import sources
from ipo_gap.data.order_log import OrderLog, ReplayError
from ipo_gap.data.sources import PAIR_FIELDS
from ipo_gap.determinism import weights_checksum
from ipo_gap.sharding import place_like, restore_shardings, to_jit_arg
from ipo_gap.train import steps
from ipo_gap.train_state_io import CheckpointManager, TrainState, key_to_data


@functools.cache
def _default_policy_step(loss: str):
    """(optimizer, jitted step) with the default optimizer, built once per loss and process.

    jax.jit caches compilations per function object, so reusing one step across the runs of
    a sweep (hyper-parameters are traced arrays) compiles it once per batch shape.
    """
    optimizer = steps.make_optimizer()
    return optimizer, steps.make_policy_step(loss, optimizer)


@functools.cache
def _default_hypo_step(normalize: str):
    optimizer = steps.make_optimizer()
    return optimizer, steps.make_hypo_step(optimizer, normalize=normalize)


class NonFiniteLossError(FloatingPointError):
    """The loss (or the parameters) became NaN or inf; the run stopped and saved nothing
    after it.

    Attributes:
        step: the step whose loss (or update) was not finite, when known.
    """

    def __init__(self, message: str, *, step: int | None = None):
        super().__init__(message)
        self.step = step


def rates(seconds: float, tokens: int) -> dict:
    """A metrics line's timing fields: wall seconds since the previous line (the first step's
    include its compilation), the batch's response tokens, and both as rates."""
    per = 1.0 / seconds if seconds > 0 else float("inf")
    return {
        "seconds": seconds,
        "tokens": tokens,
        "steps_per_s": per,
        "tokens_per_s": tokens * per,
    }


class StepClock:
    """Wall time between a run's metrics lines: each `lap(tokens)` returns `rates` over the
    time since the previous lap (the first: since the clock was made, so with compilation)."""

    def __init__(self):
        self.last = time.perf_counter()

    def lap(self, tokens: int) -> dict:
        now = time.perf_counter()
        out = rates(now - self.last, tokens)
        self.last = now
        return out


def not_saved(manager: CheckpointManager) -> str:
    """`check_finite_params`' note before a save: nothing saved, and the last good state."""
    done = manager.all_steps()
    return "not saved; " + (f"the last checkpoint is step {max(done)}" if done else "no checkpoint")


@eqx.filter_jit
def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def check_finite_params(tree, name: str, step_done: int, note: str) -> None:
    """Raises `NonFiniteLossError` when any float array of `tree` (a model, a train state)
    holds NaN or inf after `step_done` steps. The losses check each step's loss; this catches
    an update that poisons the parameters while its loss is still finite (a NaN learning rate,
    an inf gradient), before a checkpoint or a returned model keeps them. One fused reduction
    over the parameters: run it where a state is saved or returned, not every step."""
    if not bool(_all_finite(tree)):
        raise NonFiniteLossError(
            f"[{name}] the parameters are NaN or inf after step {step_done - 1} (its loss was "
            f"finite: a non-finite update); stopped, {note}",
            step=step_done - 1,
        )


def to_pair_batch(batch: dict[str, np.ndarray]) -> steps.PairBatch:
    """A PairBatch; cached reference log-probs (ref_w/ref_l columns) are carried when present.

    Without them, `train_policy` computes them per batch (`steps.with_reference`). Cached
    references are not bit-identical to those computed live (batch shapes differ, so float32
    rounding does): a bit-exact tandem replay uses the same reference path as the run it
    replays.
    """
    refs = {}
    if "ref_w" in batch and "ref_l" in batch:
        refs = {"ref_w": to_jit_arg(batch["ref_w"]), "ref_l": to_jit_arg(batch["ref_l"])}
    return steps.PairBatch(*(to_jit_arg(batch[f]) for f in PAIR_FIELDS), **refs)


class BatchError(ValueError):
    """A batch that disagrees with the run: missing fields, inconsistent or changed shapes,
    token ids outside the model's vocabulary."""


def check_pair_batch(
    batch: dict,
    *,
    step: int,
    name: str,
    vocab_size: int,
    expect: dict | None = None,
    normalize: str = "sum",
) -> dict[str, tuple]:
    """Checks a pair batch before it is trained on; returns its field shapes.

    Raises BatchError naming the run, the step and the field when a field is missing, the
    prompt and response fields disagree on the batch or length, a shape differs from the
    run's first batch (`expect`: a source whose batches disagree with its configuration), or
    a token id lies outside [0, vocab_size) (a tokenizer of another model: JAX would clamp
    the embedding lookup and train on garbage silently), or cached reference log-probs
    (`ref_cache.with_refs`) were normalised otherwise than the run's loss (`normalize`; a
    batch without the `ref_per_token` record counts as "sum").
    """
    where = f"[{name}] step {step}"
    missing = [f for f in PAIR_FIELDS if f not in batch]
    if missing:
        raise BatchError(f"{where}: the batch lacks fields {missing} (has {sorted(batch)})")
    if "ref_w" in batch:
        per_token = np.asarray(batch.get("ref_per_token", False))
        if np.any(per_token != (normalize == "mean")):
            have = "mean" if np.any(per_token) else "sum"
            raise BatchError(
                f"{where}: the batch's cached reference log-probs were computed with "
                f"normalize={have!r} but this run's loss uses normalize={normalize!r}: the "
                f"log-ratios would mix the two (cache them with normalize={normalize!r})"
            )
    shapes = {f: tuple(np.shape(batch[f])) for f in PAIR_FIELDS}
    groups = (("prompt", "prompt_mask"), ("y_w", "y_w_mask", "y_l", "y_l_mask"))
    for group in groups:
        if len({shapes[f] for f in group}) != 1 or len(shapes[group[0]]) != 2:
            raise BatchError(
                f"{where}: fields {list(group)} must share one [batch, length] shape, got "
                + ", ".join(f"{f} {shapes[f]}" for f in group)
            )
    if shapes["prompt"][0] != shapes["y_w"][0]:
        raise BatchError(
            f"{where}: prompt batch {shapes['prompt'][0]} != response batch {shapes['y_w'][0]}"
        )
    if expect is not None:
        for f in PAIR_FIELDS:
            if shapes[f] != expect[f]:
                raise BatchError(
                    f"{where}: field {f!r} has shape {shapes[f]} but this run's batches are "
                    f"{expect[f]} (the source disagrees with the run's batch size or lengths)"
                )
    for f in ("prompt", "y_w", "y_l"):
        a = np.asarray(batch[f])
        if a.size and (a.min() < 0 or a.max() >= vocab_size):
            raise BatchError(
                f"{where}: field {f!r} holds token ids in [{a.min()}, {a.max()}] but the model's "
                f"vocabulary has {vocab_size} (tokenizer of another model?)"
            )
    return shapes


def _batch_checker(name: str, normalize: str = "sum"):
    """check(pairs, step, model): `check_pair_batch` against the run's first batch and the
    run's log-prob normalisation."""
    shapes: dict[str, tuple] = {}

    def check(pairs, step, model):
        shapes.update(
            check_pair_batch(
                pairs,
                step=step,
                name=name,
                vocab_size=model.cfg.vocab_size,
                expect=shapes or None,
                normalize=normalize,
            )
        )

    return check


def source_key_data(source) -> jax.Array:
    """Raw key data identifying a source's randomness (its key, else its seed; a wrapped
    source's otherwise; zeros for a source with neither, e.g. an exact log replay). Stored
    in checkpoints as `TrainState.rng` and compared on resume."""
    if getattr(source, "key", None) is not None:
        return key_to_data(source.key)
    if getattr(source, "seed", None) is not None:
        return key_to_data(jax.random.key(int(source.seed)))
    inner = sources.wrapped_source(source)
    return source_key_data(inner) if inner is not None else jnp.zeros((2,), jnp.uint32)


def differences(then: dict, now: dict, keys, words=("then", "now")) -> list[str]:
    """'key: <then> then, <now> now' for each of `keys` whose values differ, in key order; a key
    whose two values are dicts is named field by field ('key.field: ...'). For the refusals
    of a resume, which name what differs."""
    out = []
    for k in sorted(keys):
        a, b = then.get(k), now.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            fields = sorted(j for j in a.keys() | b.keys() if a.get(j) != b.get(j))
            out += [f"{k}.{j}: {a.get(j)!r} {words[0]}, {b.get(j)!r} {words[1]}" for j in fields]
        else:
            out.append(f"{k}: {a!r} {words[0]}, {b!r} {words[1]}")
    return out


def _check_resume_source(name, manager, step, meta, identity, log) -> None:
    """Refuses a resume on another data stream than the checkpoint's: a source whose kind,
    batch size or data differ (`sources.source_identity`), or an order log whose chain hash
    at the checkpoint's last step is not the one trained on. Checkpoints of older code
    carry neither record and are not checked here (their source key still is)."""
    where = f"[{name}] the checkpoint in {manager.directory} (step {step})"
    saved = meta.get("data_source")
    now = json.loads(json.dumps(identity)) if identity is not None else None
    if saved is not None and now is not None and saved != now:
        diff = "; ".join(differences(saved, now, saved.keys() | now.keys()))
        raise ValueError(
            f"{where} was written with another data source ({diff}): resuming would continue "
            "on another data stream (use the original data, or a new checkpoint directory)"
        )
    if "log_hash" in meta and log is not None and step > 0:
        try:
            have = log.hash(step - 1).hex()
        except ReplayError:
            have = None
        if have != meta["log_hash"]:
            raise ValueError(
                f"{where} trained on a stream whose chain hash at step {step - 1} is "
                f"{meta['log_hash']}; the order log {log.directory} "
                + (f"has {have} there" if have else f"has only {len(log)} steps")
                + ": it is another run's log, or was cut or altered (use the checkpoint's own "
                "log, or a new checkpoint directory)"
            )


def check_resume_meta(name, manager, step, saved, current) -> None:
    """Refuses a resume whose `checkpoint_meta` (e.g. the run's learning rate and beta)
    differs from the one saved with the checkpoint, in any key both hold: it would continue
    another run's state under this run's settings."""
    now = json.loads(json.dumps(current or {}))
    diff = "; ".join(differences(saved, now, now.keys() & saved.keys()))
    if diff:
        raise ValueError(
            f"[{name}] the checkpoint in {manager.directory} (step {step}) was written by a "
            f"run with other settings ({diff}): resuming would continue it under this run's "
            "(use the original settings, or a new checkpoint directory)"
        )


def _weights_record(ref_model, source) -> dict:
    """Checksums (`determinism.weights_checksum`) of the frozen models a policy run trains
    against: the reference policy, and the preference model that judges an online source's
    pairs (found through wrappers, `sources.wrapped_source`) where there is one."""
    record = {"reference": weights_checksum(ref_model)}
    while source is not None:
        if getattr(source, "pm", None) is not None:
            record["judge"] = weights_checksum(source.pm)
            break
        source = sources.wrapped_source(source)
    return record


def _check_resume_weights(name, manager, step, saved: dict | None, now: dict | None) -> None:
    """Refuses a resume whose reference policy or judge differs from the checkpoint's (it would
    continue the run against other models; upstream stages that reran with other settings,
    or another --sft_checkpoint, do that). Checkpoints of older code carry no record."""
    if not saved or not now:
        return
    what = {"reference": "reference policy", "judge": "judging preference model"}
    diff = [
        f"the {what.get(k, k)}'s (checksum {saved.get(k)} then, {now.get(k)} now)"
        for k in sorted(saved.keys() | now.keys())
        if saved.get(k) != now.get(k)
    ]
    if diff:
        raise ValueError(
            f"[{name}] the checkpoint in {manager.directory} (step {step}) was trained against "
            f"other weights: {'; '.join(diff)}; resuming would continue it against these "
            "(use the models it was trained with, or a new checkpoint directory)"
        )


def _with_settings(meta: dict | None, loss: str, hparams: steps.Hparams, **more) -> dict:
    """`checkpoint_meta` plus the run's own loss and hyper-parameters, so that a resume under
    another learning rate, beta, warm-up or lambda is refused (`check_resume_meta`) even
    where the caller records none of them (checkpoints of older code lack the key and are
    not checked on it)."""
    values = {k: float(v) for k, v in hparams._asdict().items()}
    return {**(meta or {}), "train_settings": {"loss": loss, **values, **more}}


def metrics_before(metrics_path, name: str, step: int, every: int = 1) -> list[dict]:
    """A resume's history: the rows of `metrics_path` before the checkpoint's `step`, written
    back (a killed attempt logged steps past its checkpoint, which the resume redoes; a line
    cut by the kill is dropped), refused, naming the file and the missing steps, where one
    logged step (every `every`) before it is missing. Every process of a multi-host job reads
    and checks the file (all refuse alike) and meets at the rewrite's barrier."""
    path = pathlib.Path(metrics_path)
    rows = [r for r in jsonl.read_rows(path, cut_tail_ok=True) if r["step"] < step]
    want = list(range(0, step, every))
    have = [r["step"] for r in rows]
    if have != want:
        gone = sorted(set(want) - set(have))
        raise ValueError(
            f"[{name}] {path} does not hold the steps before the checkpoint's step {step} "
            f"(every {every}): "
            + (f"missing {gone[:5]}" if gone else f"it holds steps {have[:8]}...")
            + "; the resumed run's history would have a gap (resume with that run's "
            "metrics file, or start over in a new checkpoint directory)"
        )
    jsonl.write_rows(path, rows)
    return rows


def _open_metrics(metrics_path, name: str, start_step: int, log_every: int, check: bool):
    """The run's metrics file opened for appending (on the writer; None elsewhere or without
    a path), cut back to the steps before `start_step`: emptied on a fresh start, where an
    older run's lines would sit before this run's; on a resume (`check`) by
    `metrics_before`; a caller's own `start_step` without a checkpoint keeps the earlier
    lines unchecked."""
    if not metrics_path:
        return None
    if check:
        metrics_before(metrics_path, name, start_step, log_every)
    else:
        path = pathlib.Path(metrics_path)
        rows = [r for r in jsonl.read_rows(path, cut_tail_ok=True) if r["step"] < start_step]
        jsonl.write_rows(path, rows)
    return hosts.open_on_writer(metrics_path, "a")


def _drop_logged_after(order_log: OrderLog | None, err: NonFiniteLossError, name: str) -> None:
    """After a non-finite loss at step t, cuts the order log back so that it ends with step
    t's batch, the one whose loss was not finite. The loop reads step t's loss only once step
    t+1 is dispatched, so step t+1's batch was already logged; nothing was trained on it. (The
    batches before it may already come from a broken policy: a loss turns non-finite a step
    after the update that broke the parameters. A resume starts from a checkpoint, which
    never holds non-finite parameters, and regenerates and re-checks every later step.)

    In a multi-host job process 0 cuts the log and every process waits for it (all of them
    raise at the same step: the loss is global)."""
    if order_log is None or err.step is None:
        return
    keep = err.step + 1
    if hosts.is_writer() and len(order_log) > keep:
        order_log.truncate(keep)
        hosts.say(
            f"[{name}] order log {order_log.directory} cut back to {keep} steps: it ends with "
            f"the batch of step {err.step}, whose loss was not finite"
        )
    if hosts.process_count() > 1:
        hosts.sync(f"{name}: order log cut after step {err.step}")
        if not hosts.is_writer():
            order_log.refresh()


def _logged_fields(order_log: OrderLog, batch: dict) -> dict:
    """The fields of the log's schema (derived columns such as cached refs are not logged)."""
    return {k: batch[k] for k in order_log.schema}


class Progress:
    """Prints `step, loss, rate, ETA` lines at most every `every_s` seconds (on process 0 of a
    multi-host job only: `hosts.say`)."""

    def __init__(self, total: int, name: str, every_s: float = 5.0, stream=None):
        self.total, self.name, self.every_s, self.stream = total, name, every_s, stream
        self.start = time.perf_counter()
        self.last = 0.0
        self.first_step_done = None

    def update(self, step: int, loss: float, force: bool = False):
        now = time.perf_counter()
        if self.first_step_done is None:  # rates exclude compilation
            self.first_step_done = (now, step)
            hosts.say(
                f"[{self.name}] step {step + 1}/{self.total}  loss {loss:.4f}  (first step, "
                f"with compilation: {now - self.start:.1f}s)",
                self.stream,
            )
            self.last = now
            return
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        t0, s0 = self.first_step_done
        # (two calls can read the same time on a coarse clock)
        rate = (step - s0) / (now - t0) if step > s0 and now > t0 else float("nan")
        eta = (self.total - step - 1) / rate if rate == rate and rate > 0 else float("nan")
        rate_s = f"{rate:.2f}" if rate == rate else "?"
        eta_s = f"{eta:.0f}s" if eta == eta else "?"
        hosts.say(
            f"[{self.name}] step {step + 1}/{self.total}  loss {loss:.4f}  "
            f"{rate_s} steps/s  ETA {eta_s}",
            self.stream,
        )


def train_policy(
    *,
    model,
    ref_model,
    source,
    num_steps: int,
    hparams: steps.Hparams,
    loss: str,
    optimizer=None,
    opt_state=None,
    start_step: int = 0,
    order_log: OrderLog | None = None,
    metrics_path: str | pathlib.Path | None = None,
    log_every: int = 1,
    name: str = "policy",
    on_step: Callable[[int, Any, dict], None] | None = None,
    checkpoint_dir: str | pathlib.Path | None = None,
    checkpoint_every: int = 0,
    checkpoint_meta: dict | None = None,
    checkpoint_keep: int | None = None,
):
    """Trains `model` for steps [start_step, num_steps) on `source`.

    Each step: batch = source.batch(step, model); if `order_log` is given the batch is
    appended to it (hash-chained) before the update; then the jitted policy step. The same
    program runs for every source, so an offline run on a replayed log repeats the online
    run's updates exactly (on CPU: bit for bit).

    Checkpoints (`checkpoint_dir`): the train state (model, optimizer state, step, data
    position) is saved every `checkpoint_every` steps and at the end. If the directory
    already holds a checkpoint, training resumes from the latest one. `checkpoint_keep`
    keeps only the newest that many states (None: all of them, e.g. for
    `experiments/check_determinism.py`, which compares every step). The log may then be
    ahead of the checkpoint (a crash between logging and saving): each already-logged step is
    regenerated and must hash-equal the logged batch (else `DeterminismError` names the step
    and field) before training on it, which is a rollback of the log with a verified
    re-append. Batches are a function of (seed, step, parameters), so resuming continues the
    run bit for bit.

    on_step(step, model, metrics) runs after each step is dispatched, with the model after
    that step and its metrics as device arrays (reading one waits for the step).

    Returns (model, opt_state, history) where history is the list of per-step metrics.
    """
    if optimizer is None:  # the default: one compiled step per loss for the whole process
        optimizer, step_fn = _default_policy_step(loss)
    else:
        step_fn = steps.make_policy_step(loss, optimizer)

    check = _batch_checker(name)
    sources.check_replay_covers(source, num_steps, name)

    def next_batch(step, model):
        batch = source.batch(step, model)
        check(batch, step, model)
        if order_log is not None:
            if step < len(order_log):  # logged before a crash: must regenerate equal
                order_log.compare_step(step, _logged_fields(order_log, batch))
            else:
                if hosts.is_writer():  # every process holds the batch; process 0 logs it
                    order_log.append(step, _logged_fields(order_log, batch))
                if hosts.process_count() > 1:  # the step is on disk before anyone reads it
                    hosts.sync(f"{name}: logged step {step}")
                    if not hosts.is_writer():
                        order_log.refresh()
        return batch

    def update(model, opt_state, batch, step):
        # References computed or cached reach the step alike: one compiled step for both.
        pairs = steps.with_reference(to_pair_batch(batch), ref_model)
        return step_fn(model, opt_state, ref_model, pairs, hparams, np.int32(step))

    return _run(
        model=model,
        opt_state=opt_state,
        optimizer=optimizer,
        next_batch=next_batch,
        update=update,
        count_tokens=lambda b: int(b["y_w_mask"].sum() + b["y_l_mask"].sum()),
        num_steps=num_steps,
        start_step=start_step,
        metrics_path=metrics_path,
        log_every=log_every,
        name=name,
        on_step=on_step,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        checkpoint_meta=_with_settings(checkpoint_meta, loss, hparams),
        checkpoint_keep=checkpoint_keep,
        weights=lambda: _weights_record(ref_model, source),
        rng_data=source_key_data(source),
        identity=sources.source_identity(source),
        log=order_log if order_log is not None else getattr(source, "log", None),
        written_log=order_log,
    )


def to_seq_batch(samples: dict[str, np.ndarray]) -> steps.SeqBatch:
    return steps.SeqBatch(
        *(to_jit_arg(samples[f]) for f in ("prompt", "prompt_mask", "y", "y_mask"))
    )


def train_hypo(
    *,
    model,
    ref_model,
    source,
    num_steps: int,
    hparams: steps.Hparams,
    optimizer=None,
    opt_state=None,
    start_step: int = 0,
    normalize: str = "sum",
    metrics_path: str | pathlib.Path | None = None,
    log_every: int = 1,
    name: str = "hypo",
    on_step: Callable[[int, Any, dict], None] | None = None,
    checkpoint_dir: str | pathlib.Path | None = None,
    checkpoint_every: int = 0,
    checkpoint_meta: dict | None = None,
    checkpoint_keep: int | None = None,
):
    """HyPO training (002, Algorithm 1) for steps [start_step, num_steps): `train_policy`'s loop.

    Each step: (pairs, samples) = source.batch(step, model) (a `sources.HypoSource`: offline
    pairs and one on-policy sample per prompt), then `steps.make_hypo_step`'s update with
    `hparams.beta` for DPO and `hparams.lam` for the KL term. Metrics, progress, the NaN
    guard and checkpoint/resume are those of `train_policy`; the batches are a function of
    (seed, step, parameters), so resuming from a checkpoint continues the run exactly. No
    order log: its schema holds pairs only (the offline pair stream is already replayable).

    Returns (model, opt_state, history) where history is the list of per-step metrics.
    """
    if optimizer is None:
        optimizer, step_fn = _default_hypo_step(normalize)
    else:
        step_fn = steps.make_hypo_step(optimizer, normalize=normalize)

    check = _batch_checker(name, normalize)
    sources.check_replay_covers(source, num_steps, name)

    def next_batch(step, model):
        batch = source.batch(step, model)
        check(batch[0], step, model)  # (pairs, on-policy samples)
        return batch

    def update(model, opt_state, batch, step):
        pairs, samples = batch
        return step_fn(
            model,
            opt_state,
            ref_model,
            to_pair_batch(pairs),
            to_seq_batch(samples),
            hparams,
            np.int32(step),
        )

    def count_tokens(batch):
        pairs, samples = batch
        return int(pairs["y_w_mask"].sum() + pairs["y_l_mask"].sum() + samples["y_mask"].sum())

    return _run(
        model=model,
        opt_state=opt_state,
        optimizer=optimizer,
        next_batch=next_batch,
        update=update,
        count_tokens=count_tokens,
        num_steps=num_steps,
        start_step=start_step,
        metrics_path=metrics_path,
        log_every=log_every,
        name=name,
        on_step=on_step,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        checkpoint_meta=_with_settings(checkpoint_meta, "hypo", hparams, normalize=normalize),
        checkpoint_keep=checkpoint_keep,
        weights=lambda: _weights_record(ref_model, source),
        rng_data=source_key_data(source),
        identity=sources.source_identity(source),
        log=getattr(getattr(source, "offline", None), "log", None),
    )


def _run(
    *,
    model,
    opt_state,
    optimizer,
    next_batch,
    update,
    count_tokens,
    num_steps,
    start_step,
    metrics_path,
    log_every,
    name,
    on_step,
    checkpoint_dir,
    checkpoint_every,
    checkpoint_meta,
    checkpoint_keep,
    rng_data,
    identity=None,
    log=None,
    written_log=None,
    weights=None,
):
    """The host loop shared by `train_policy` and `train_hypo` (see `train_policy`).

    `rng_data` (`source_key_data`) is saved as the checkpoint's `rng`; resuming from a
    checkpoint written with another source key or seed is refused (it would continue the run
    on another data stream).

    next_batch(step, model) -> batch; update(model, opt_state, batch, step) -> (model,
    opt_state, metrics); count_tokens(batch) -> int. `log` is the order log the run's
    stream is checked against on resume (its own, or the one it replays); `written_log` the
    one it appends to, if any (`_drop_logged_after` cuts it after a non-finite loss).
    `weights()` gives the checksums of the frozen models the run trains against
    (`_weights_record`), saved with each checkpoint and compared on resume.
    """
    if opt_state is None:
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    opt_state = place_like(opt_state, model)
    manager = (
        CheckpointManager(checkpoint_dir, max_to_keep=checkpoint_keep) if checkpoint_dir else None
    )
    resumed = manager is not None and manager.latest_step() is not None
    frozen = weights() if (manager is not None and weights is not None) else None
    if resumed:
        template = TrainState(
            model, opt_state, jnp.int32(0), jnp.zeros_like(rng_data), jnp.int32(0)
        )
        restored = manager.restore(
            manager.latest_step(), template, shardings=restore_shardings(template)
        )
        if not np.array_equal(np.asarray(restored.rng), np.asarray(rng_data)):
            raise ValueError(
                f"[{name}] the checkpoint in {manager.directory} (step "
                f"{manager.latest_step()}) was written by a run whose data source had key data "
                f"{np.asarray(restored.rng).tolist()}; this run's is "
                f"{np.asarray(rng_data).tolist()}: resuming would continue on another data "
                "stream (use the original seed, or a new checkpoint directory)"
            )
        model, opt_state = restored.model, restored.opt_state
        start_step = int(restored.data_position)
        saved_meta = manager.restore_metadata(manager.latest_step())
        _check_resume_source(name, manager, start_step, saved_meta, identity, log)
        check_resume_meta(name, manager, start_step, saved_meta, checkpoint_meta)
        _check_resume_weights(name, manager, start_step, saved_meta.get("weights"), frozen)
        if start_step > num_steps:
            raise ValueError(
                f"[{name}] the checkpoint in {manager.directory} is at step {start_step}, past "
                f"this run's {num_steps} steps: it would be returned, and saved again, as the "
                f"result of a {num_steps}-step run (ask for >= {start_step} steps, or use a new "
                "checkpoint directory)"
            )
        hosts.say(f"[{name}] resumed from {manager.directory} at step {start_step}")
    out = _open_metrics(metrics_path, name, start_step, log_every, check=resumed)

    def save(step_done: int):
        check_finite_params((model, opt_state), name, step_done, not_saved(manager))
        if out is not None:  # the metrics on disk reach the checkpoint before it is written
            out.flush()
            os.fsync(out.fileno())
        state = TrainState(
            model,
            opt_state,
            jnp.int32(step_done),
            rng_data,
            jnp.int32(step_done),
        )
        meta = dict(checkpoint_meta or {})
        if identity is not None:
            meta["data_source"] = identity
        if frozen is not None:
            meta["weights"] = frozen
        if log is not None and step_done > 0:
            meta["log_hash"] = log.hash(step_done - 1).hex()  # the stream trained on so far
        if step_done not in manager.all_steps():
            manager.save(step_done, state, metadata=meta, force=True)

    history = []
    progress = Progress(num_steps, name)
    clock = StepClock()

    def finish(step, device_metrics, tokens):
        # Reads a dispatched step's metrics (waiting for it), checks the loss, records it.
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        if not np.isfinite(metrics["loss"]):
            done = manager.all_steps() if manager is not None else []
            raise NonFiniteLossError(
                f"[{name}] loss is {metrics['loss']} at step {step}; stopped: the parameters "
                f"it was computed with came from an earlier update (step {step - 1}'s, or "
                "before, if that one's loss was finite and its update broke them); "
                + (f"the last checkpoint is step {max(done)}" if done else "no checkpoint"),
                step=step,
            )
        metrics.update(step=step, **clock.lap(tokens))
        history.append(metrics)
        if out is not None and step % log_every == 0:
            out.write(json.dumps(metrics) + "\n")
            out.flush()  # a kill loses no logged step (the checkpoint also syncs it)
        progress.update(step, metrics["loss"], force=step == num_steps - 1)

    # Step k's metrics are read after step k + 1 is dispatched, so the host's work for the
    # next batch (and jit dispatch) overlaps the device's compute; checkpoints and the end of
    # the run wait for the step first, so no checkpoint holds a state with a non-finite loss.
    pending = None
    try:
        for step in range(start_step, num_steps):
            batch = next_batch(step, model)
            model, opt_state, metrics = update(model, opt_state, batch, step)
            if pending is not None:
                finish(*pending)
            pending = (step, metrics, count_tokens(batch))
            if on_step is not None:
                on_step(step, model, metrics)
            if manager is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
                finish(*pending)
                pending = None
                save(step + 1)
        if pending is not None:
            finish(*pending)
        if manager is not None:
            save(num_steps)
        else:
            check_finite_params(model, name, num_steps, "the model is not returned")
    except NonFiniteLossError as e:
        _drop_logged_after(written_log, e, name)
        raise
    finally:
        if out is not None:
            out.close()
        if manager is not None:
            manager.close()
    return model, opt_state, history
