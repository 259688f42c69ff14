"""The reference log-prob cache: equals live computation, is reused, and is never used stale."""

import dataclasses
import json
import logging
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from ipo_gap.data import ref_cache, sources
from ipo_gap.t5 import model as t5
from ipo_gap.train import steps

S, T, N, B = 6, 5, 10, 4
TOK = "ab" * 32


@pytest.fixture(scope="module")
def setup():
    # Unrolled layers: the policy step compiles about twice as fast as scanned on CPU.
    cfg = tiny_config(num_encoder_layers=1, num_decoder_layers=1, vocab_size=16, scan_layers=False)
    ref = t5.init(cfg, key=jax.random.key(0))
    rng = np.random.default_rng(0)

    def tokens(length):
        mask = (np.arange(length)[None] < rng.integers(1, length + 1, (N, 1))).astype(np.int32)
        return rng.integers(3, cfg.vocab_size, (N, length)).astype(np.int32) * mask, mask

    data = {}
    for name, length in (("prompt", S), ("y_w", T), ("y_l", T)):
        data[name], data[f"{name}_mask"] = tokens(length)
    return cfg, ref, data


# All N rows in one batch (the cache evaluates padded batches of B rows).
_pair_logprobs = jax.jit(steps.pair_logprobs, static_argnames="normalize")


def _direct(model, data, normalize="sum"):
    batch = steps.PairBatch(*(jnp.asarray(data[f]) for f in ref_cache.PAIR_FIELDS))
    w, l = _pair_logprobs(model, batch, normalize=normalize)
    return np.asarray(w), np.asarray(l)


class _Counter:
    """Wraps compute_reference_logprobs, counting calls."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self._real = ref_cache.compute_reference_logprobs
        monkeypatch.setattr(ref_cache, "compute_reference_logprobs", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._real(*args, **kwargs)


def _load(cache_dir, model, data, tok=TOK, normalize="sum"):
    return ref_cache.load_or_compute(
        cache_dir, model, data, tokenizer_sha256=tok, normalize=normalize, batch_size=B
    )


def _sidecar(cache_dir):
    with open(ref_cache.cache_paths(cache_dir)[1]) as f:
        return json.load(f)


def test_cached_values_equal_direct_and_second_call_reads_the_cache(setup, tmp_path, monkeypatch):
    _, ref, data = setup
    counter = _Counter(monkeypatch)
    ref_w, ref_l = _load(tmp_path, ref, data)
    assert counter.calls == 1 and ref_w.shape == ref_l.shape == (N,)  # N % B != 0: padded
    want_w, want_l = _direct(ref, data)
    np.testing.assert_allclose(ref_w, want_w, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ref_l, want_l, rtol=1e-6, atol=1e-6)
    side = _sidecar(tmp_path)
    assert side["reference_fingerprint"] == ref_cache.model_fingerprint(ref)
    assert side["tokenizer_sha256"] == TOK and side["normalize"] == "sum"
    assert side["num_rows"] == N and side["data_sha256"] == ref_cache.data_fingerprint(data)
    # Second call: the cache is read, the model never runs, the files are not rewritten.
    npz, js = ref_cache.cache_paths(tmp_path)
    mtimes = os.stat(npz).st_mtime_ns, os.stat(js).st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("the reference model was run despite a current cache")

    monkeypatch.setattr(ref_cache, "compute_reference_logprobs", boom)
    again_w, again_l = _load(tmp_path, ref, data)
    np.testing.assert_array_equal(again_w, ref_w)
    np.testing.assert_array_equal(again_l, ref_l)
    assert (os.stat(npz).st_mtime_ns, os.stat(js).st_mtime_ns) == mtimes
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _perturbed_model(model):
    return eqx.tree_at(lambda m: m.lm_head, model, model.lm_head.at[0, 0].add(0.5))


@pytest.mark.parametrize("change", ["model", "tokenizer", "normalize", "token"])
def test_a_stale_cache_is_detected_and_recomputed(setup, tmp_path, monkeypatch, caplog, change):
    _, ref, data = setup
    _load(tmp_path, ref, data)
    old = _sidecar(tmp_path)
    model, tok, normalize, new_data = ref, TOK, "sum", data
    if change == "model":
        model, key = _perturbed_model(ref), "reference_fingerprint"
    elif change == "tokenizer":
        tok, key = "cd" * 32, "tokenizer_sha256"
    elif change == "normalize":
        normalize, key = "mean", "normalize"
    else:
        new_data = {k: v.copy() for k, v in data.items()}
        new_data["y_l"][3, 0] = (new_data["y_l"][3, 0] + 1) % 16 or 3
        key = "data_sha256"
    counter = _Counter(monkeypatch)
    with caplog.at_level(logging.WARNING):
        ref_w, ref_l = _load(tmp_path, model, new_data, tok=tok, normalize=normalize)
    assert counter.calls == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "STALE" in warnings[0] and key in warnings[0], warnings
    others = [k for k in ref_cache.KEY_FIELDS if k != key]
    assert not any(f"{k}:" in warnings[0] for k in others), warnings  # names only what differs
    new = _sidecar(tmp_path)
    assert new[key] != old[key] and all(new[k] == old[k] for k in others)
    want_w, want_l = _direct(model, new_data)
    if normalize == "mean":  # per-token: the sum over the response's length
        want_w, want_l = want_w / data["y_w_mask"].sum(1), want_l / data["y_l_mask"].sum(1)
    np.testing.assert_allclose(ref_w, want_w, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ref_l, want_l, rtol=1e-6, atol=1e-6)
    if change in ("model", "token"):  # the values really moved
        assert (
            np.abs(ref_w - _direct(ref, data)[0]).max()
            + np.abs(ref_l - _direct(ref, data)[1]).max()
            > 1e-4
        )
    # The recomputed cache is current for the new setting.
    _load(tmp_path, model, new_data, tok=tok, normalize=normalize)
    assert counter.calls == 1


def test_arrays_without_their_sidecar_are_not_used(setup, tmp_path, monkeypatch):
    _, ref, data = setup
    _load(tmp_path, ref, data)
    npz, js = ref_cache.cache_paths(tmp_path)
    # A sidecar vouching for arrays written under another key (e.g. a concurrent writer).
    side = _sidecar(tmp_path)
    np.savez(npz, ref_w=np.zeros(N, np.float32), ref_l=np.zeros(N, np.float32), key="{}")
    counter = _Counter(monkeypatch)
    ref_w, _ = _load(tmp_path, ref, data)
    assert counter.calls == 1 and np.abs(ref_w).min() > 0
    os.remove(js)
    _load(tmp_path, ref, data)
    assert counter.calls == 2 and _sidecar(tmp_path) == side


def test_model_fingerprint(setup):
    cfg, ref, _ = setup
    fp = ref_cache.model_fingerprint(ref)
    assert fp == ref_cache.model_fingerprint(jax.tree.map(lambda x: jnp.array(x, copy=True), ref))
    assert fp != ref_cache.model_fingerprint(_perturbed_model(ref))
    assert fp != ref_cache.model_fingerprint(t5.init(cfg, key=jax.random.key(1)))
    renamed = dataclasses.replace(ref, cfg=cfg.replace(name="other"))
    assert fp != ref_cache.model_fingerprint(renamed)


@pytest.mark.slow  # compiles two policy steps: ~20 s; runs in CI
def test_cached_refs_give_the_same_update_as_live_refs(setup, tmp_path):
    cfg, ref, data = setup
    ref_w, ref_l = _load(tmp_path, ref, data)
    policy = t5.init(cfg, key=jax.random.key(7))  # differs from ref: the refs matter
    source = sources.OfflineSource(ref_cache.with_refs(data, ref_w, ref_l), batch_size=B, seed=1)
    batch = source.batch(2)
    cached = ref_cache.pair_batch(batch)
    live = ref_cache.pair_batch({k: v for k, v in batch.items() if k not in ("ref_w", "ref_l")})
    assert cached.ref_w is not None and live.ref_w is None
    optimizer = steps.make_optimizer()
    step_fn = steps.make_policy_step("ipo", optimizer)
    hp = steps.Hparams.make(1e-2, beta=0.5)

    def update(b):
        model = jax.tree.map(lambda x: jnp.array(x, copy=True), policy)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        model, _, metrics = step_fn(model, opt_state, ref, b, hp, jnp.int32(0))
        return eqx.filter(model, eqx.is_array), metrics

    m_cached, met_cached = update(cached)
    m_live, met_live = update(live)
    np.testing.assert_allclose(met_cached["loss"], met_live["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(m_cached), jax.tree.leaves(m_live), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(met_cached["grad_norm"], met_live["grad_norm"], rtol=1e-6)
    # Wrong refs give another loss: the cached values really entered the step.
    _, met_wrong = update(cached._replace(ref_w=cached.ref_w + 1.0))
    assert abs(float(met_wrong["loss"]) - float(met_live["loss"])) > 1e-3
