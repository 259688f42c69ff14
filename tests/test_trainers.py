"""SFT and PM trainers: plateau stopping, the both-orders eq. (5) loss, NaN and bad-input errors."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from test_preference import make_pairs

from ipo_gap import preference as pref
from ipo_gap.t5 import model as t5
from ipo_gap.train import trainers
from ipo_gap.train.loop import NonFiniteLossError
from ipo_gap.train.trainers import (
    PM_FIELDS,
    judge_rows,
    pair_logit_rows,
    pm_accuracy,
    train_pm,
    train_sft,
)

CFG = tiny_config(num_encoder_layers=1, num_decoder_layers=1, scan_layers=False)


def _pm_data(seed, n):
    batch = make_pairs(np.random.default_rng(seed), n)
    return {f: np.asarray(a) for f, a in zip(PM_FIELDS, batch, strict=True)}


def test_pm_loss_both_orders_is_the_expectation_of_eq5():
    model = t5.init(CFG, key=jax.random.key(0))
    batch = make_pairs(np.random.default_rng(0), 8)
    loss, metrics = eqx.filter_jit(pref.pm_loss_both_orders)(model, batch)
    z_wl, z_lw = eqx.filter_jit(pref.pair_logits_both_orders)(model, *batch)
    want = 0.5 * (-jax.nn.log_sigmoid(z_wl) - jax.nn.log_sigmoid(-z_lw))
    np.testing.assert_allclose(loss, want.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        metrics["debiased_accuracy"], pref.judge_from_logits(z_wl, z_lw).mean(), rtol=1e-6
    )


def test_pair_logit_rows_cut_to_the_real_tokens_equal_the_full_width():
    """Sorting rows by packed length and cutting each batch to its longest row changes no
    logit beyond rounding (here: none at all), even with columns of padding in every row."""
    model = t5.init(CFG, key=jax.random.key(3))
    batch = make_pairs(np.random.default_rng(3), 37)  # not a multiple of the batch size
    args = [np.pad(np.asarray(a), ((0, 0), (0, 5))) for a in batch]  # 5 all-padding columns
    z12, z21 = eqx.filter_jit(pref.pair_logits_both_orders)(model, *args)
    r12, r21 = pair_logit_rows(model, *args, batch_size=8, bucket=4)
    np.testing.assert_allclose(r12, z12, atol=1e-5)
    np.testing.assert_allclose(r21, z21, atol=1e-5)
    np.testing.assert_array_equal(
        judge_rows(model, *args, batch_size=8), pref.judge_from_logits(z12, z21)
    )
    empty = pair_logit_rows(model, *(a[:0] for a in args))
    assert [e.shape for e in empty] == [(0,), (0,)]


def test_a_pointwise_pm_is_validated_by_its_own_judge():
    """train_pm(kind="bt") chooses its checkpoint by the Bradley-Terry judge (r(x, y_w)
    against r(x, y_l)), not the pairwise judge of packed pairs, which reads a BT model's
    readout on an input it never saw (it did until 2026-12-07)."""
    model = t5.init(CFG, key=jax.random.key(5))
    train, valid = _pm_data(5, 32), _pm_data(6, 37)  # 37: not a multiple of the batch
    args = [valid[f] for f in PM_FIELDS]
    direct = np.asarray(eqx.filter_jit(pref.bt_judge)(model, *args))
    np.testing.assert_array_equal(trainers.bt_judge_rows(model, *args, batch_size=8), direct)
    res = train_pm(
        model, train, valid, num_steps=2, batch_size=8, learning_rate=0.0, seed=0, kind="bt"
    )
    assert res.best_valid_accuracy == pytest.approx(float(direct.mean()))
    assert pm_accuracy(model, valid, kind="bt") == pytest.approx(float(direct.mean()))


@pytest.mark.slow  # kept out of the default suite's 5 minutes; runs in CI
def test_pm_plateau_stops_early_and_keeps_the_best():
    model = t5.init(CFG, key=jax.random.key(1))
    train, valid = _pm_data(1, 64), _pm_data(2, 32)
    # learning rate 0: validation accuracy never improves after the first evaluation.
    res = train_pm(
        model,
        train,
        valid,
        num_steps=100,
        batch_size=16,
        learning_rate=0.0,
        seed=0,
        eval_every=5,
        patience=2,
        kind="pairwise-both",
    )
    assert res.stopped_early and res.best_step == 5
    assert len(res.history) == 15  # evaluations at 5 (best), 10, 15 -> two without improvement
    assert res.best_valid_accuracy == pytest.approx(pm_accuracy(model, valid))


@pytest.mark.slow  # a training run (~10-17 s on 2 cores): in CI's slow suite
def test_pm_learns_the_good_token_task_with_both_orders():
    model = t5.init(
        CFG.replace(relative_attention_num_buckets=32, relative_attention_max_distance=32),
        key=jax.random.key(2),
    )
    res = train_pm(
        model,
        _pm_data(3, 2048),
        _pm_data(4, 256),
        num_steps=150,
        batch_size=64,
        learning_rate=3e-3,
        seed=0,
        eval_every=50,
        patience=5,
        kind="pairwise-both",
    )
    assert res.best_valid_accuracy > 0.9


def _sft_data(n=32, S=6, T=5, V=64):
    rng = np.random.default_rng(0)
    return {
        "src": rng.integers(3, V, (n, S)).astype(np.int32),
        "src_mask": np.ones((n, S), np.int32),
        "tgt": rng.integers(3, V, (n, T)).astype(np.int32),
        "tgt_mask": np.ones((n, T), np.int32),
    }


@pytest.mark.slow  # kept out of the default suite's 5 minutes; runs in CI
def test_sft_reduces_loss_and_stops_on_nan():
    model = t5.init(CFG, key=jax.random.key(3))
    data = _sft_data()
    _, hist = train_sft(model, data, num_steps=30, batch_size=32, learning_rate=1e-2, seed=0)
    assert hist[-1] < hist[0] - 0.5  # memorising 32 fixed rows
    model = t5.init(CFG, key=jax.random.key(3))
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        train_sft(model, data, num_steps=5, batch_size=8, learning_rate=float("nan"), seed=0)
    # One step: its loss is finite, its update is not; the poisoned model is not returned.
    with pytest.raises(NonFiniteLossError, match="parameters are NaN or inf after step 0"):
        train_sft(model, data, num_steps=1, batch_size=8, learning_rate=float("nan"), seed=0)


def test_bad_input_names_the_problem():
    model = t5.init(CFG, key=jax.random.key(4))
    data = _sft_data()
    with pytest.raises(ValueError, match="missing fields \\['tgt_mask'\\]"):
        train_sft(
            model,
            {k: v for k, v in data.items() if k != "tgt_mask"},
            num_steps=1,
            batch_size=4,
            learning_rate=1e-3,
            seed=0,
        )
    bad = dict(data, tgt=data["tgt"][:5])
    with pytest.raises(ValueError, match="disagree on the number of rows"):
        train_sft(model, bad, num_steps=1, batch_size=4, learning_rate=1e-3, seed=0)
    with pytest.raises(ValueError, match="pm valid: missing fields"):
        train_pm(
            model,
            _pm_data(5, 16),
            {"x": jnp.zeros((2, 2))},
            num_steps=1,
            batch_size=4,
            learning_rate=1e-3,
            seed=0,
        )


def _same_arrays(a, b) -> bool:
    xs, ys = jax.tree.leaves(eqx.filter(a, eqx.is_array)), jax.tree.leaves(b)
    return len(xs) == len(ys) and all(np.array_equal(x, y) for x, y in zip(xs, ys, strict=True))


@pytest.mark.slow  # three SFT runs compiled anew (~20 s on 2 cores): in CI's slow suite
def test_sft_resumes_from_its_train_state_bit_for_bit(tmp_path, capsys):
    """A run killed after step 5 with states every 2 steps (the last at 4), called again,
    ends with the parameters and losses of an uninterrupted run, each step logged once."""
    data = _sft_data()
    model = t5.init(CFG, key=jax.random.key(5))
    common = {"batch_size": 8, "learning_rate": 1e-2, "seed": 0}
    want, want_hist = train_sft(model, data, num_steps=8, **common)
    ckpt = {"checkpoint_dir": tmp_path / "state", "checkpoint_every": 2}
    metrics = tmp_path / "metrics.jsonl"
    train_sft(model, data, num_steps=5, metrics_path=metrics, **common, **ckpt)
    capsys.readouterr()
    got, hist = train_sft(model, data, num_steps=8, metrics_path=metrics, **common, **ckpt)
    assert "[sft] resumed from its train state at step 4" in capsys.readouterr().out
    assert hist == want_hist
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(8))
    assert _same_arrays(got, want)
    with pytest.raises(ValueError, match="train state .* was written by a run with"):
        train_sft(
            model,
            data,
            num_steps=8,
            metrics_path=metrics,
            **dict(common, learning_rate=2e-2),
            **ckpt,
        )
    with pytest.raises(ValueError, match="at step 8, past this run's 6 steps"):
        train_sft(model, data, num_steps=6, metrics_path=metrics, **common, **ckpt)
    with pytest.raises(ValueError, match="needs a metrics_path"):
        train_sft(model, data, num_steps=8, **common, **ckpt)


@pytest.mark.slow  # three PM runs with evaluations (~30 s on 2 cores): in CI's slow suite
def test_pm_resumes_with_its_best_model_and_plateau_count(tmp_path, capsys):
    model = t5.init(CFG, key=jax.random.key(6))
    train, valid = _pm_data(6, 64), _pm_data(7, 32)
    common = {
        "batch_size": 16,
        "learning_rate": 3e-3,
        "seed": 0,
        "eval_every": 4,
        "patience": 5,
        "kind": "pairwise-both",
    }
    want = train_pm(model, train, valid, num_steps=12, **common)
    ckpt = {"checkpoint_dir": tmp_path / "state", "checkpoint_every": 3}
    metrics = tmp_path / "metrics.jsonl"
    train_pm(model, train, valid, num_steps=7, metrics_path=metrics, **common, **ckpt)
    capsys.readouterr()
    got = train_pm(model, train, valid, num_steps=12, metrics_path=metrics, **common, **ckpt)
    assert "resumed from its train state at step 6" in capsys.readouterr().out
    assert got.history == want.history and len(got.history) == 12
    assert (got.best_step, got.best_valid_accuracy) == (want.best_step, want.best_valid_accuracy)
    assert _same_arrays(got.model, want.model)
    # A state saved at the plateau (killed before returning): the resumed run stops there.
    flat = dict(common, learning_rate=0.0, eval_every=2, patience=2)
    ckpt = {
        "checkpoint_dir": tmp_path / "flat",
        "checkpoint_every": 2,
        "metrics_path": tmp_path / "flat.jsonl",
    }
    first = train_pm(model, train, valid, num_steps=50, **flat, **ckpt)
    assert first.stopped_early and first.best_step == 2 and len(first.history) == 6
    capsys.readouterr()
    again = train_pm(model, train, valid, num_steps=50, **flat, **ckpt)
    out = capsys.readouterr().out
    assert "resumed from its train state at step 6" in out and "step 7/" not in out
    assert again.stopped_early and again.best_step == 2 and again.history == first.history
    assert again.best_valid_accuracy == first.best_valid_accuracy
    assert _same_arrays(again.model, first.model)


@pytest.mark.parametrize("lr,warmup", [(1e-3, 100), (3e-4, 5), (0.0123, 7), (1e-3, 0)])
def test_adam_with_warmup_equals_optax_adam_with_a_linear_schedule(lr, warmup):
    """The learning rate and warm-up are state arrays, yet every update equals a jitted
    `optax.adam(optax.linear_schedule(0, lr, warmup))` (or `optax.adam(lr)`) bit for bit,
    through the warm-up and past it."""
    import optax

    params = {"a": jnp.linspace(-1.0, 1.0, 7), "b": jnp.ones((2, 3))}
    ref = optax.adam(optax.linear_schedule(0.0, lr, warmup) if warmup else lr)
    ours = trainers.adam_with_warmup(lr, warmup)

    @jax.jit
    def both(state_ref, state_ours, k):
        grads = jax.tree.map(lambda x: jnp.sin(x * (k + 1.0)) + 0.1, params)
        u_ref, state_ref = ref.update(grads, state_ref, params)
        u_ours, state_ours = ours.update(grads, state_ours, params)
        return u_ref, u_ours, state_ref, state_ours

    state_ref, state_ours = ref.init(params), ours.init(params)
    for k in range(warmup + 3):
        u_ref, u_ours, state_ref, state_ours = both(state_ref, state_ours, jnp.float32(k))
        for a, b in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u_ours), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"count {k}")
        assert float(np.max(np.abs(np.asarray(u_ours["a"])))) > 0 or k == 0


def test_one_compiled_step_serves_every_learning_rate_and_warmup():
    """SFT and PM steps read the learning rate and warm-up from the optimizer state: runs
    with other values (a sweep; the golden and proxy PMs of one size) reuse one compiled
    step, and the values still act (another learning rate gives other parameters)."""
    trainers._sft_step.cache_clear()
    trainers._pm_step.cache_clear()
    model = t5.init(CFG, key=jax.random.key(5))
    data = _sft_data(n=16)
    a, _ = train_sft(model, data, num_steps=3, batch_size=8, learning_rate=1e-3, seed=0)
    b, _ = train_sft(
        model, data, num_steps=3, batch_size=8, learning_rate=3e-3, seed=0, warmup_steps=2
    )
    assert trainers._sft_step()._cache_size() == 1
    assert not _same_arrays(a, b)
    train, valid = _pm_data(1, 16), _pm_data(2, 8)
    kw = {"num_steps": 2, "batch_size": 8, "seed": 0, "eval_every": 2, "kind": "pairwise-both"}
    pa = train_pm(model, train, valid, learning_rate=1e-3, warmup_steps=0, **kw)
    pb = train_pm(model, train, valid, learning_rate=3e-4, warmup_steps=5, **kw)
    assert trainers._pm_step("pairwise-both")._cache_size() == 1
    assert not _same_arrays(pa.model, pb.model)
