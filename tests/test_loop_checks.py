"""The training loop refuses bad batches (naming run, step and field) and a resume from a
checkpoint written with another data source key."""

import json

import equinox as eqx
import jax
import numpy as np
import pytest
from conftest import tiny_config

from ipo_gap.data import sources
from ipo_gap.determinism import weights_checksum
from ipo_gap.t5 import model as t5
from ipo_gap.train import loop, steps
from ipo_gap.train_state_io import CheckpointManager, TrainState, key_to_data


def _data(cfg, n=16, S=6, T=5, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for f, L in (("prompt", S), ("y_w", T), ("y_l", T)):
        out[f] = rng.integers(3, cfg.vocab_size, (n, L)).astype(np.int32)
        out[f + "_mask"] = np.ones((n, L), np.int32)
    return out


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config(num_encoder_layers=1, num_decoder_layers=1)
    return cfg, t5.init(cfg, key=jax.random.key(0))


class Scripted:
    """A source that hands out given batches (the last one on step `bad_step`)."""

    def __init__(self, good, bad, bad_step):
        self.good, self.bad, self.bad_step = good, bad, bad_step

    def batch(self, step, policy=None):
        return self.bad if step == self.bad_step else self.good


def _train(model, source, num_steps=3, **kw):
    return loop.train_policy(
        model=sources.copy_arrays(model),
        ref_model=model,
        source=source,
        num_steps=num_steps,
        hparams=steps.Hparams.make(1e-3, 0.1),
        loss="ipo",
        name="checked",
        **kw,
    )


def test_bad_batches_are_named(setup):
    cfg, model = setup
    good = {k: v[:4] for k, v in _data(cfg).items()}
    longer = dict(good, y_w=np.pad(good["y_w"], ((0, 0), (0, 2))))
    longer["y_w_mask"] = np.pad(good["y_w_mask"], ((0, 0), (0, 2)))
    longer["y_l"], longer["y_l_mask"] = longer["y_w"], longer["y_w_mask"]
    cases = [
        (
            {k: v for k, v in good.items() if k != "y_l_mask"},
            0,
            r"step 0: .*lacks fields \['y_l_mask'\]",
        ),
        (dict(good, y_l=good["y_l"][:, :4]), 1, r"step 1: fields \['y_w', .*y_l \(4, 4\)"),
        (dict(good, prompt_mask=good["prompt_mask"][:3]), 0, r"must share one \[batch, length\]"),
        (
            longer,
            2,
            r"\[checked\] step 2: field 'y_w' has shape \(4, 7\) but this run's batches "
            r"are \(4, 5\)",
        ),
        (
            dict(good, y_l=good["y_l"] + cfg.vocab_size),
            1,
            rf"step 1: field 'y_l' .* vocabulary has {cfg.vocab_size}",
        ),
    ]
    for bad, at, match in cases:
        with pytest.raises(loop.BatchError, match=match):
            _train(model, Scripted(good, bad, at))
    _, _, hist = _train(model, Scripted(good, good, 0))  # the good batch trains
    assert len(hist) == 3


@pytest.mark.slow  # kept out of the default suite's 5 minutes; runs in CI
def test_checkpoint_records_the_source_key_and_resume_checks_it(setup, tmp_path):
    cfg, model = setup
    data = _data(cfg)
    src = sources.OfflineSource(data, batch_size=4, seed=7)
    _train(model, src, num_steps=2, checkpoint_dir=tmp_path, checkpoint_every=1)
    want = np.asarray(key_to_data(jax.random.key(7)))
    opt_state = steps.make_optimizer().init(eqx.filter(model, eqx.is_array))
    like = TrainState(model, opt_state, np.int32(0), np.zeros(2, np.uint32), np.int32(0))
    with CheckpointManager(tmp_path) as mngr:
        assert mngr.all_steps() == [1, 2]  # every state is kept by default
        state = mngr.restore(2, like)
    np.testing.assert_array_equal(np.asarray(state.rng), want)
    # The same source resumes (and finishes); another seed is refused, naming both keys.
    _, _, hist = _train(
        model,
        sources.OfflineSource(data, batch_size=4, seed=7),
        num_steps=4,
        checkpoint_dir=tmp_path,
        checkpoint_every=1,
        checkpoint_keep=2,
    )
    assert [h["step"] for h in hist] == [2, 3]
    with CheckpointManager(tmp_path) as mngr:
        assert mngr.all_steps() == [3, 4]  # checkpoint_keep=2: the older states are gone
    with pytest.raises(ValueError, match="another data stream"):
        _train(
            model,
            sources.OfflineSource(data, batch_size=4, seed=8),
            num_steps=5,
            checkpoint_dir=tmp_path,
        )
    assert loop.source_key_data(sources.LogReplay.__new__(sources.LogReplay)).tolist() == [0, 0]


def test_a_non_finite_loss_is_named_and_never_checkpointed(setup, tmp_path):
    """Metrics are read one step late (the host overlaps the device); the error still names
    the step whose loss is NaN, and no checkpoint is written after it."""
    cfg, model = setup
    good = {k: v[:4] for k, v in _data(cfg).items()}
    with pytest.raises(
        loop.NonFiniteLossError,
        match=r"\[checked\] loss is nan at step 1; stopped: .*step 0's.*; no checkpoint$",
    ):
        loop.train_policy(
            model=sources.copy_arrays(model),
            ref_model=model,
            source=Scripted(good, good, -1),
            num_steps=6,
            hparams=steps.Hparams.make(float("nan"), 0.1),  # step 0's update poisons step 1
            loss="ipo",
            name="checked",
            checkpoint_dir=tmp_path / "ckpt",
            checkpoint_every=3,
        )
    with CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.all_steps() == []


@pytest.mark.parametrize("every", [1, 0])
def test_poisoned_parameters_are_never_saved_or_returned(setup, tmp_path, every):
    """A NaN learning rate leaves step 0's loss finite but its update makes every parameter
    NaN. With a checkpoint after every step, the save of step 1 must refuse it (naming the
    step), leaving no checkpoint; without checkpoints, the poisoned model must not be
    returned."""
    cfg, model = setup
    good = {k: v[:4] for k, v in _data(cfg).items()}
    ckpt = {"checkpoint_dir": tmp_path / "ckpt", "checkpoint_every": 1} if every else {}
    with pytest.raises(loop.NonFiniteLossError, match=r"\[poisoned\] the parameters .* step 0"):
        loop.train_policy(
            model=sources.copy_arrays(model),
            ref_model=model,
            source=Scripted(good, good, -1),
            num_steps=1,
            hparams=steps.Hparams.make(float("nan"), 0.1),
            loss="ipo",
            name="poisoned",
            **ckpt,
        )
    if every:
        with CheckpointManager(tmp_path / "ckpt") as mngr:
            assert mngr.all_steps() == []


def test_metrics_lines_carry_rates(setup, tmp_path):
    cfg, model = setup
    good = {k: v[:4] for k, v in _data(cfg).items()}
    loop.train_policy(
        model=sources.copy_arrays(model),
        ref_model=model,
        source=Scripted(good, good, -1),
        num_steps=2,
        hparams=steps.Hparams.make(1e-3, 0.1),
        loss="ipo",
        metrics_path=tmp_path / "m.jsonl",
    )
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    tokens = int(good["y_w_mask"].sum() + good["y_l_mask"].sum())
    for r in rows:
        assert r["tokens"] == tokens and r["seconds"] > 0
        assert r["steps_per_s"] == pytest.approx(1 / r["seconds"])
        assert r["tokens_per_s"] == pytest.approx(tokens / r["seconds"])


def test_metrics_reach_the_disk_as_they_are_logged(setup, tmp_path):
    """Each logged line is on disk when the next step runs (a kill loses none: the file was
    buffered, and a killed run's resume found steps missing), and a fresh run empties an
    older run's file instead of appending to it."""
    cfg, model = setup
    good = {k: v[:4] for k, v in _data(cfg).items()}
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"step": 0, "loss": 123.0}) + "\n")  # an older run's line
    seen = []

    def on_step(step, _model, _metrics):  # step k runs after step k - 1's line is written
        seen.append([json.loads(x)["step"] for x in path.read_text().splitlines()])

    _train(model, Scripted(good, good, -1), num_steps=4, metrics_path=path, on_step=on_step)
    assert seen == [[], [0], [0, 1], [0, 1, 2]]
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[0]["loss"] != 123.0


def test_a_resume_cuts_the_metrics_back_to_its_checkpoint_and_refuses_a_gap(setup, tmp_path):
    """A killed attempt logged steps past its last checkpoint (and may have cut its last
    line): the resume drops them and logs those steps afresh, once each; a history with a
    step before the checkpoint missing is refused, naming the file and the step."""
    cfg, model = setup
    good = {k: v[:4] for k, v in _data(cfg).items()}
    path, ckpt = tmp_path / "m.jsonl", {"checkpoint_dir": tmp_path / "c", "checkpoint_every": 2}
    _train(model, Scripted(good, good, -1), num_steps=2, metrics_path=path, **ckpt)
    with path.open("a") as f:  # what the killed attempt logged after the checkpoint
        f.write(json.dumps({"step": 2, "loss": 123.0}) + '\n{"step": 3, "lo')
    _train(model, Scripted(good, good, -1), num_steps=4, metrics_path=path, **ckpt)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[2]["loss"] != 123.0
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] != 1))
    with pytest.raises(ValueError, match=r"\[checked\] .*m\.jsonl does not hold .* missing \[1\]"):
        _train(model, Scripted(good, good, -1), num_steps=6, metrics_path=path, **ckpt)


def test_each_trainer_compiles_its_step_once_for_a_committed_model(setup, monkeypatch):
    """A model loaded from a checkpoint is committed to its device, while `optimizer.init`
    draws Adam's step count uncommitted: the jitted step used to compile once for step 1 and
    again for step 2 on (every argument committed by then), ~6 s per trainer at toy sizes.
    `sharding.place_like` commits the count: one compilation per step function."""
    from ipo_gap import preference
    from ipo_gap.train import trainers

    cfg, model = setup
    model = jax.device_put(model, jax.devices()[0])  # as orbax restores it
    made = []

    def recording(make):
        def wrapped(*a, **k):
            made.append(make(*a, **k))
            return made[-1]

        return wrapped

    trainers._sft_step.cache_clear()  # built afresh below, through the recording makers
    trainers._pm_step.cache_clear()
    for owner, name in (
        (steps, "make_policy_step"),
        (steps, "make_sft_step"),
        (preference, "make_pm_train_step"),
    ):
        monkeypatch.setattr(owner, name, recording(getattr(owner, name)))
    data = {k: v[:8] for k, v in _data(cfg).items()}
    _train(model, Scripted(data, data, -1), num_steps=3, optimizer=steps.make_optimizer())
    sft = dict(
        zip(
            trainers.SEQ_FIELDS,
            (data["prompt"], data["prompt_mask"], data["y_w"], data["y_w_mask"]),
            strict=True,
        )
    )
    trainers.train_sft(model, sft, num_steps=3, batch_size=4, learning_rate=1e-3, seed=0)
    pm = dict(zip(trainers.PM_FIELDS, (data[f] for f in sources.PAIR_FIELDS), strict=True))
    trainers.train_pm(model, pm, pm, num_steps=3, batch_size=4, learning_rate=1e-3, seed=0)
    assert len(made) == 3
    assert [f._cache_size() for f in made] == [1, 1, 1]


@pytest.mark.parametrize("committed", [False, True])
def test_computed_and_cached_references_share_one_compiled_step(setup, committed):
    """Online and replayed batches carry no reference log-probs, offline ones carry cached
    ones. `train_policy` computes the missing ones before the step (`steps.with_reference`)
    and places cached ones as computed ones would be, so every data source runs ONE compiled
    policy step (the step used to compile a second program for batches without them, ~5 s
    per loss and model at toy sizes). Same numbers too: a batch whose cached references are
    the computed ones trains to the same bits."""
    cfg, model = setup
    if committed:
        model = jax.device_put(model, jax.devices()[0])  # as orbax restores it
    plain = {k: v[:4] for k, v in _data(cfg, seed=3).items()}
    refs = steps.reference_pair_logprobs(model, loop.to_pair_batch(plain), normalize="sum")
    cached = {**plain, "ref_w": np.asarray(refs[0]), "ref_l": np.asarray(refs[1])}
    loop._default_policy_step.cache_clear()  # a fresh step: count only this test's programs
    _, step_fn = loop._default_policy_step("ipo")
    a, _, ha = _train(model, Scripted(plain, plain, -1))
    b, _, hb = _train(model, Scripted(cached, cached, -1))
    assert step_fn._cache_size() == 1
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # kept out of the default suite's 5 minutes; runs in CI
def test_resume_refuses_another_data_stream_or_a_finished_checkpoint(setup, tmp_path):
    """A checkpoint records its source (kind, batch size, data fingerprint) and the chain
    hash of the log it trained on; a resume with another batch size, other data or another
    log is refused, naming the difference, and so is one asking for fewer steps."""
    from ipo_gap.data.order_log import OrderLog, pair_schema

    META = {"tokenizer_sha256": "0" * 64}  # noqa: N806
    cfg, model = setup
    data = _data(cfg)
    ck = tmp_path / "ck"
    log_a = OrderLog.create(tmp_path / "a", schema=pair_schema(6, 5), batch_size=2, meta=META)
    kw = {"checkpoint_dir": ck, "checkpoint_every": 1}
    src = sources.OfflineSource(data, batch_size=2, seed=7)
    _train(model, src, num_steps=2, order_log=log_a, **kw)
    meta = CheckpointManager(ck).restore_metadata(2)
    assert meta["data_source"] == src.identity() and meta["log_hash"] == log_a.hash(1).hex()
    # Another batch size, other data under the same seed: refused, naming what differs.
    with pytest.raises(ValueError, match=r"another data source \(batch_size: 2 then, 4 now"):
        _train(model, sources.OfflineSource(data, batch_size=4, seed=7), num_steps=3, **kw)
    other = dict(data, y_w=data["y_w"][::-1].copy())
    with pytest.raises(ValueError, match=r"another data source \(data_sha256: "):
        _train(model, sources.OfflineSource(other, batch_size=2, seed=7), num_steps=3, **kw)
    # Another run's log (same source, its own two steps logged elsewhere): refused.
    log_b = OrderLog.create(tmp_path / "b", schema=pair_schema(6, 5), batch_size=2, meta=META)
    _train(model, sources.OfflineSource(other, batch_size=2, seed=7), num_steps=2, order_log=log_b)
    with pytest.raises(ValueError, match="it is another run's log, or was cut or altered"):
        _train(model, src, num_steps=3, order_log=log_b, **kw)
    # Fewer steps than the checkpoint holds: refused (it would be returned as a 1-step run).
    with pytest.raises(ValueError, match="at step 2, past this run's 1 steps"):
        _train(model, src, num_steps=1, **kw)
    # The checkpoint's own source and log resume.
    _, _, hist = _train(model, src, num_steps=3, order_log=OrderLog.open(tmp_path / "a"), **kw)
    assert [h["step"] for h in hist] == [2]


def test_a_shuffled_replay_resumes_only_on_the_whole_log_it_shuffled(setup, tmp_path):
    """A uniform shuffle deals rows from every step of the log, through a permutation sized
    by its length: a checkpoint at step 2 already trained on rows of later steps, so a
    resume on the log grown by a step is refused, naming the length and the end hash; on
    the log it shuffled it resumes."""
    from ipo_gap.data.order_log import OrderLog, pair_schema

    sha = "0" * 64
    cfg, model = setup
    data = _data(cfg)
    log = OrderLog.create(
        tmp_path / "log", schema=pair_schema(6, 5), batch_size=2, meta={"tokenizer_sha256": sha}
    )
    _train(model, sources.OfflineSource(data, batch_size=2, seed=7), num_steps=4, order_log=log)
    shuffled = lambda: sources.ShuffledReplay(log, window=100, seed=1, tokenizer=sha)  # noqa: E731
    kw = {"checkpoint_dir": tmp_path / "ck", "checkpoint_every": 1}
    _train(model, shuffled(), num_steps=2, **kw)
    grown = OrderLog.open(tmp_path / "log")
    grown.append(4, grown.read(0))
    log = OrderLog.open(tmp_path / "log")
    with pytest.raises(
        ValueError, match=r"another data source \(log_end_hash: .*log_steps: 4 then, 5 now"
    ):
        _train(model, shuffled(), num_steps=3, **kw)
    grown.truncate(4)
    log = OrderLog.open(tmp_path / "log")
    _, _, hist = _train(model, shuffled(), num_steps=3, **kw)
    assert [h["step"] for h in hist] == [2]


def test_after_a_non_finite_loss_the_log_ends_with_that_step(setup, tmp_path):
    """Step 1's loss is NaN (step 0's update is), and the loop reads it after step 2's batch
    is made and logged: that batch, from the broken policy, is cut, so the log ends with the
    batch the loss went non-finite on, whose chain still verifies."""
    from ipo_gap.data.order_log import OrderLog, pair_schema

    cfg, model = setup
    data = _data(cfg)
    log = OrderLog.create(
        tmp_path / "log",
        schema=pair_schema(6, 5),
        batch_size=2,
        meta={"tokenizer_sha256": "0" * 64},
    )
    seen = []

    class Counting(sources.OfflineSource):
        def batch(self, step, policy=None):
            seen.append(step)
            return super().batch(step, policy)

    with pytest.raises(loop.NonFiniteLossError, match=r"loss is nan at step 1") as e:
        loop.train_policy(
            model=sources.copy_arrays(model),
            ref_model=model,
            source=Counting(data, batch_size=2, seed=3),
            num_steps=6,
            hparams=steps.Hparams.make(float("nan"), 0.1),
            loss="ipo",
            name="checked",
            order_log=log,
        )
    assert e.value.step == 1 and seen == [0, 1, 2]  # step 2's batch was made and logged
    reopened = OrderLog.open(tmp_path / "log")
    assert len(reopened) == 2 and reopened.verify() is None
    np.testing.assert_array_equal(
        reopened.read(1)["y_w"], sources.OfflineSource(data, batch_size=2, seed=3).batch(1)["y_w"]
    )


def test_a_replay_longer_than_its_log_is_refused_before_training(setup, tmp_path):
    from ipo_gap.data.order_log import OrderLog, ReplayError, pair_schema

    cfg, model = setup
    log = OrderLog.create(
        tmp_path / "log",
        schema=pair_schema(6, 5),
        batch_size=2,
        meta={"tokenizer_sha256": "0" * 64},
    )
    _train(model, sources.OfflineSource(_data(cfg), batch_size=2, seed=1), order_log=log)
    metrics = tmp_path / "metrics.jsonl"
    for src in (
        sources.LogReplay(OrderLog.open(tmp_path / "log"), tokenizer="0" * 64),
        sources.ShuffledReplay(
            OrderLog.open(tmp_path / "log"), window=2, seed=0, tokenizer="0" * 64
        ),
    ):
        with pytest.raises(ReplayError, match=r"\[checked\] 4 steps asked .* which has 3: step 3"):
            _train(model, src, num_steps=4, metrics_path=metrics)
        assert not metrics.exists() or metrics.read_text() == ""  # nothing trained
        _, _, hist = _train(model, src, num_steps=3)  # the logged length replays
        assert len(hist) == 3


def test_resume_refuses_other_run_settings(setup, tmp_path):
    """`checkpoint_meta` (the study passes the run's name, loss, lr, beta) is saved with each
    train state; a resume under other values of the same keys is refused, naming them."""
    cfg, model = setup
    src = sources.OfflineSource(_data(cfg), batch_size=2, seed=1)
    kw = {"checkpoint_dir": tmp_path / "ck", "checkpoint_every": 1}
    _train(model, src, num_steps=2, checkpoint_meta={"lr": 1e-3, "beta": 0.1}, **kw)
    with pytest.raises(ValueError, match=r"other settings \(beta: 0.1 then, 0.5 now\)"):
        _train(model, src, num_steps=3, checkpoint_meta={"lr": 1e-3, "beta": 0.5}, **kw)
    _, _, hist = _train(model, src, num_steps=3, checkpoint_meta={"lr": 1e-3, "beta": 0.1}, **kw)
    assert [h["step"] for h in hist] == [2]


def test_resume_refuses_other_hyper_parameters_the_caller_did_not_record(setup, tmp_path):
    """The loop records the run's loss and traced hyper-parameters itself: a resume under
    another warm-up (which no caller's meta held) or loss is refused, naming the field."""
    cfg, model = setup
    src = sources.OfflineSource(_data(cfg), batch_size=2, seed=1)
    kw = {"checkpoint_dir": tmp_path / "ck", "checkpoint_every": 1, "model": model}
    run = lambda hp, loss="ipo": loop.train_policy(  # noqa: E731
        ref_model=model, source=src, num_steps=3, hparams=hp, loss=loss, name="hp", **kw
    )
    kw["model"] = sources.copy_arrays(model)
    loop.train_policy(
        ref_model=model,
        source=src,
        num_steps=2,
        hparams=steps.Hparams.make(1e-3, 0.1),
        loss="ipo",
        name="hp",
        **kw,
    )
    with pytest.raises(ValueError, match=r"train_settings.warmup_steps: 0.0 then, 10.0 now"):
        run(steps.Hparams.make(1e-3, 0.1, warmup_steps=10))
    with pytest.raises(ValueError, match=r"train_settings.loss: 'ipo' then, 'dpo' now"):
        run(steps.Hparams.make(1e-3, 0.1), loss="dpo")
    _, _, hist = run(steps.Hparams.make(1e-3, 0.1))
    assert [h["step"] for h in hist] == [2]


@pytest.mark.slow  # three short runs and their resumes: ~20 s
def test_resume_refuses_another_reference_or_judge(setup, tmp_path):
    """A checkpoint records checksums of the reference policy and of the preference model that
    judges its online pairs; a resume against another of either is refused, naming it (an
    upstream stage rerun under other settings would otherwise continue the run silently)."""
    cfg, model = setup
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, cfg.vocab_size, (8, 6)).astype(np.int32)
    mask = np.ones_like(prompts)
    pm, other = (t5.init(cfg, key=jax.random.key(k)) for k in (1, 2))

    def online(judge):
        return sources.SemiOnlineSource(  # the judge is found inside a wrapper too
            sources.OnlineSource(
                prompts, mask, judge, batch_size=2, seed=3, key=jax.random.key(5), max_len=4
            ),
            refresh_every=1,
        )

    def run(num_steps, ref, judge):
        return loop.train_policy(
            model=sources.copy_arrays(model),
            ref_model=ref,
            source=online(judge),
            num_steps=num_steps,
            hparams=steps.Hparams.make(1e-3, 0.1),
            loss="ipo",
            name="frozen",
            checkpoint_dir=tmp_path / "ck",
            checkpoint_every=1,
        )

    run(1, model, pm)
    saved = CheckpointManager(tmp_path / "ck").restore_metadata(1)["weights"]
    assert saved == {"reference": weights_checksum(model), "judge": weights_checksum(pm)}
    with pytest.raises(ValueError, match=r"\[frozen\] .*other weights: the reference policy's"):
        run(2, other, pm)
    with pytest.raises(ValueError, match=r"other weights: the judging preference model's"):
        run(2, model, other)
    _, _, hist = run(2, model, pm)
    assert [h["step"] for h in hist] == [1]


def test_cached_references_of_another_normalisation_are_refused(setup):
    """`ref_cache.with_refs` records how its reference log-probs were normalised; HyPO with
    per-token ("mean") DPO log-probs refuses sequence-sum references, and the policy loop
    (sums) refuses per-token ones, at step 0, before any update."""
    from ipo_gap.data import ref_cache

    cfg, model = setup
    data = _data(cfg)
    refs = np.zeros(len(data["prompt"]), np.float32)
    summed = ref_cache.with_refs(data, refs, refs)
    per_token = ref_cache.with_refs(data, refs, refs, normalize="mean")
    with pytest.raises(loop.BatchError, match=r"\[hypo\] step 0: .*normalize='sum' but this run"):
        loop.train_hypo(
            model=sources.copy_arrays(model),
            ref_model=model,
            source=sources.HypoSource(
                sources.OfflineSource(summed, batch_size=2, seed=0),
                key=jax.random.key(0),
                max_len=4,
            ),
            num_steps=1,
            hparams=steps.Hparams.make(1e-3, 0.1, lam=0.1),
            normalize="mean",
        )
    with pytest.raises(
        loop.BatchError, match=r"normalize='mean' but this run's loss uses normalize='sum'"
    ):
        _train(model, sources.OfflineSource(per_token, batch_size=2, seed=0), num_steps=1)
    batch = sources.OfflineSource(per_token, batch_size=2, seed=0).batch(0)
    loop.check_pair_batch(batch, step=0, name="x", vocab_size=cfg.vocab_size, normalize="mean")
    with pytest.raises(ValueError, match="normalize must be one of"):
        ref_cache.with_refs(data, refs, refs, normalize="token")


def test_the_normalisation_record_leaves_an_offline_source_identity_as_it_was(setup):
    """Checkpoints of older code hashed the cached references without `ref_per_token`: the
    record is left out of the data hash (a summed cache's identity is the old one), and a
    per-token cache is named instead."""
    from ipo_gap.data import ref_cache

    cfg, _ = setup
    data = _data(cfg)
    refs = np.arange(len(data["prompt"]), dtype=np.float32)
    old = {**data, "ref_w": refs, "ref_l": refs}  # what with_refs returned before
    new = ref_cache.with_refs(data, refs, refs)
    ident = lambda d: sources.OfflineSource(d, batch_size=2, seed=0).identity()  # noqa: E731
    assert ident(new) == ident(old)
    per_token = ident(ref_cache.with_refs(data, refs, refs, normalize="mean"))
    assert per_token == {**ident(old), "ref_normalize": "mean"}
