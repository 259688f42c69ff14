"""Semi-online sampling: refresh every step = online, never = pi_sft samples, s in between."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from ipo_gap.data import sources
from ipo_gap.t5 import model as t5
from ipo_gap.train import loop, steps

S, T, B, N = 6, 5, 4, 6


class Recorder:
    """A source wrapper that keeps every batch it hands out."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def batch(self, step, policy=None):
        out = self.inner.batch(step, policy)
        self.batches.append(out)
        return out


def _same_batch(a, b):
    assert a.keys() == b.keys()
    return all(np.array_equal(a[k], b[k]) for k in a)


def _setup():
    cfg = tiny_config(num_encoder_layers=1, num_decoder_layers=1, vocab_size=16)
    sft = t5.init(cfg, key=jax.random.key(0))
    pm = t5.init(cfg, key=jax.random.key(1))
    rng = np.random.default_rng(0)
    mask = (np.arange(S)[None] < rng.integers(2, S + 1, (12, 1))).astype(np.int32)
    prompts = rng.integers(3, cfg.vocab_size, (12, S)).astype(np.int32) * mask

    def online():
        return sources.OnlineSource(
            prompts, mask, pm, batch_size=B, seed=3, key=jax.random.key(5), max_len=T
        )

    return cfg, sft, online


@pytest.fixture(scope="module")
def setup():
    """Source-level fixtures: policies[k] stands for the policy in force at step k.

    Distinct random inits (no training, so no train-step compilation): what matters here is
    which policy a step samples, not how it got there. The loop-level runs are in the slow test.
    """
    cfg, sft, online = _setup()
    policies = [sources.copy_arrays(sft)] + [
        t5.init(cfg, key=jax.random.key(100 + k)) for k in range(1, N)
    ]
    online_src = online()
    batches = [online_src.batch(k, policies[k]) for k in range(N)]
    return {"sft": sft, "online": online, "policies": policies, "batches": batches}


def test_refresh_every_step_is_online_batch_for_batch(setup):
    semi = sources.SemiOnlineSource(setup["online"](), refresh_every=1)
    for k in range(N):
        assert _same_batch(semi.batch(k, setup["policies"][k]), setup["batches"][k])


def test_refresh_every_3_samples_the_snapshot_of_its_block(setup):
    """Steps 0..2 use the step-0 policy, steps 3..5 the step-3 policy (fed the live policy)."""
    policies, online = setup["policies"], setup["online"]()
    semi = sources.SemiOnlineSource(setup["online"](), refresh_every=3)
    got = [semi.batch(k, policies[k]) for k in range(N)]
    assert [semi.snapshot_step(k) for k in range(N)] == [0, 0, 0, 3, 3, 3]
    frozen = [online.batch(k, setup["sft"]) for k in range(N)]
    for k in range(3):
        assert _same_batch(got[k], frozen[k])
        assert _same_batch(got[k], online.batch(k, policies[0]))
    for k in range(3, N):
        assert _same_batch(got[k], online.batch(k, policies[3]))
        assert not _same_batch(got[k], frozen[k])  # the snapshot was refreshed at step 3
    # Steps 1, 2, 4, 5 are not the online run's (it samples the live policy).
    for k in (1, 2, 4, 5):
        assert not _same_batch(got[k], setup["batches"][k])


def test_never_refreshed_samples_the_initial_policy(setup):
    policies, online = setup["policies"], setup["online"]()
    for refresh in (None, 0):
        semi = sources.SemiOnlineSource(setup["online"](), refresh_every=refresh)
        for k in range(N):
            assert semi.snapshot_step(k) == 0
            assert _same_batch(semi.batch(k, policies[k]), online.batch(k, setup["sft"]))
    # The snapshot is a copy: deleting the step-0 policy's buffers (as donation does) is safe.
    step0 = sources.copy_arrays(setup["sft"])
    semi = sources.SemiOnlineSource(setup["online"](), refresh_every=None)
    semi.batch(0, step0)
    for leaf in jax.tree.leaves(eqx.filter(step0, eqx.is_array)):
        leaf.delete()
    assert _same_batch(semi.batch(1, policies[1]), online.batch(1, setup["sft"]))


def test_resume_needs_the_snapshot(setup):
    policies, online = setup["policies"], setup["online"]()
    semi = sources.SemiOnlineSource(setup["online"](), refresh_every=3)
    # A fresh source (as after a resume at step 4) cannot know the step-3 policy.
    with pytest.raises(sources.SnapshotMissingError, match="step 4 samples the policy of step 3"):
        semi.batch(4, policies[4])
    with pytest.raises(ValueError, match="not a refresh boundary"):
        semi.restore(policies[4], 4)
    # Restoring the saved snapshot continues exactly; resuming at a boundary needs nothing.
    semi.restore(policies[3], 3)
    assert semi.state()[0] == 3
    assert _same_batch(semi.batch(4, policies[4]), online.batch(4, policies[3]))
    fresh = sources.SemiOnlineSource(setup["online"](), refresh_every=3)
    assert _same_batch(fresh.batch(3, policies[3]), online.batch(3, policies[3]))
    # Never refreshed: the initial policy (pi_sft) given up front serves any step.
    never = sources.SemiOnlineSource(
        setup["online"](), refresh_every=None, initial_policy=setup["sft"]
    )
    assert _same_batch(never.batch(5, policies[5]), online.batch(5, setup["sft"]))
    with pytest.raises(ValueError, match="refresh_every"):
        sources.SemiOnlineSource(setup["online"](), refresh_every=-1)


def _train(sft, source, num_steps, **kw):
    return loop.train_policy(
        model=sources.copy_arrays(sft),
        ref_model=sft,
        source=source,
        num_steps=num_steps,
        hparams=steps.Hparams.make(1e-2, beta=0.5),
        loss="ipo",
        **kw,
    )


@pytest.mark.slow  # five short training runs, each compiling its step: ~1 min
def test_semi_online_training_runs(tmp_path):
    """Through loop.train_policy: s = 1 is the online run bit for bit; s = 3 samples its
    snapshots; a run checkpointed at a refresh boundary resumes exactly."""
    _, sft, online = _setup()
    policies = [sources.copy_arrays(sft)]
    rec_online = Recorder(online())
    final, _, hist = _train(
        sft, rec_online, N, on_step=lambda s, m, x: policies.append(sources.copy_arrays(m))
    )
    assert float(jnp.abs(final.lm_head - sft.lm_head).max()) > 1e-4  # it trained

    rec = Recorder(sources.SemiOnlineSource(online(), refresh_every=1))
    model, _, hist1 = _train(sft, rec, N)
    for a, b in zip(rec_online.batches, rec.batches, strict=True):
        assert _same_batch(a, b)
    assert [h["loss"] for h in hist1] == [h["loss"] for h in hist]
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(final), strict=True):
        np.testing.assert_array_equal(a, b)

    # s = 3: steps 0..2 sample pi_sft, steps 3..5 the policy trained for 3 steps.
    semi_policies = [sources.copy_arrays(sft)]
    rec3 = Recorder(sources.SemiOnlineSource(online(), refresh_every=3))
    model3, _, hist3 = _train(
        sft, rec3, N, on_step=lambda s, m, x: semi_policies.append(sources.copy_arrays(m))
    )
    reference = online()
    for k in range(N):
        snapshot = semi_policies[3 * (k // 3)]
        assert _same_batch(rec3.batches[k], reference.batch(k, snapshot))
        if k in (1, 2, 4, 5):
            assert not _same_batch(rec3.batches[k], rec_online.batches[k])
    for k in range(3, N):
        assert not _same_batch(rec3.batches[k], reference.batch(k, sft))

    # Checkpoint every 3 steps (= refresh_every), stop at 3, resume with a fresh source.
    ckpt = tmp_path / "ckpt"
    kw = {"checkpoint_dir": ckpt, "checkpoint_every": 3}
    _train(sft, sources.SemiOnlineSource(online(), refresh_every=3), 3, **kw)
    resumed, _, hist_r = _train(sft, sources.SemiOnlineSource(online(), refresh_every=3), N, **kw)
    assert [h["step"] for h in hist_r] == [3, 4, 5]
    assert [h["loss"] for h in hist_r] == [h["loss"] for h in hist3[3:]]
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(model3), strict=True):
        np.testing.assert_array_equal(a, b)
