"""The tandem identity: offline training on the online run's logged stream is the online run."""

import json
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from conftest import REPO, tiny_config

from ipo_gap.data import sources
from ipo_gap.data.order_log import OrderLog, OrderLogError, ReplayError, pair_schema
from ipo_gap.t5 import model as t5
from ipo_gap.train import loop, steps

S, T, B, N = 6, 5, 4, 4
TOK = "0" * 64  # the logs' tokenizer SHA-256


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    cfg = tiny_config(num_encoder_layers=1, num_decoder_layers=1, vocab_size=16)
    sft = t5.init(cfg, key=jax.random.key(0))
    pm = t5.init(cfg, key=jax.random.key(1))
    rng = np.random.default_rng(0)
    mask = (np.arange(S)[None] < rng.integers(2, S + 1, (12, 1))).astype(np.int32)
    prompts = rng.integers(3, cfg.vocab_size, (12, S)).astype(np.int32) * mask
    source = sources.OnlineSource(
        prompts, mask, pm, batch_size=B, seed=3, key=jax.random.key(5), max_len=T
    )
    directory = tmp_path_factory.mktemp("tandem") / "log"
    log = OrderLog.create(
        directory, schema=pair_schema(S, T), batch_size=B, meta={"tokenizer_sha256": TOK}
    )
    hp = steps.Hparams.make(1e-2, beta=0.5)
    online, _, hist = loop.train_policy(
        model=sources.copy_arrays(sft),
        ref_model=sft,
        source=source,
        num_steps=N,
        hparams=hp,
        loss="ipo",
        order_log=log,
    )
    return sft, online, hist, directory, hp


def test_exact_replay_is_bit_identical(online_run):
    sft, online, hist, directory, hp = online_run
    log = OrderLog.open(directory)
    assert len(log) == N
    offline, _, hist_off = loop.train_policy(
        model=sources.copy_arrays(sft),
        ref_model=sft,
        source=sources.LogReplay(log, tokenizer=TOK),
        num_steps=N,
        hparams=hp,
        loss="ipo",
    )
    assert [h["loss"] for h in hist] == [h["loss"] for h in hist_off]
    for a, b in zip(
        jax.tree.leaves(eqx.filter(online, eqx.is_array)),
        jax.tree.leaves(eqx.filter(offline, eqx.is_array)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    # The run really trained (the identity is not between two unchanged models).
    assert float(jnp.abs(online.lm_head - sft.lm_head).max()) > 1e-4


def test_shuffled_replay_deals_the_same_examples_in_another_order(online_run):
    """Examples (rows), not batches, are shuffled: a uniform shuffle deals every logged row
    exactly once and mixes rows of different steps in one batch; a window of w steps deals
    only its own rows; window 1 is the logged order; each batch holds the logged rows."""
    sft, online, _, directory, hp = online_run
    log = OrderLog.open(directory)
    logged = dict(log.iter_steps(0, N))
    shuffled = sources.ShuffledReplay(log, window=N, seed=2, tokenizer=TOK)
    dealt = np.concatenate([shuffled.source_rows(s) for s in range(N)])
    every = sorted((t, r) for t in range(N) for r in range(B))
    assert sorted(map(tuple, dealt.tolist())) == every
    assert any(len(set(shuffled.source_rows(s)[:, 0].tolist())) > 1 for s in range(N))
    assert dealt.tolist() != [[t, r] for t, r in every]
    for s in range(N):
        got = shuffled.batch(s)
        for i, (t, r) in enumerate(shuffled.source_rows(s)):
            for k in logged[t]:
                np.testing.assert_array_equal(got[k][i], logged[t][k][r])
    pairs = sources.ShuffledReplay(log, window=2, seed=2, tokenizer=TOK)
    for s in range(N):
        window = {2 * (s // 2), 2 * (s // 2) + 1}
        assert set(pairs.source_rows(s)[:, 0].tolist()) <= window
    # Past the log's end, in a last window cut short or one longer than the log: named.
    for window in (3, N + 2):
        with pytest.raises(ReplayError, match=f"replay needs step {N} but the log has {N}"):
            sources.ShuffledReplay(log, window=window, seed=2, tokenizer=TOK).batch(N)
    exact = sources.ShuffledReplay(log, window=1, seed=1, tokenizer=TOK)
    for s in range(N):
        assert exact.source_rows(s).tolist() == [[s, r] for r in range(B)]
        assert all(np.array_equal(exact.batch(s)[k], logged[s][k]) for k in logged[s])
    model, _, _ = loop.train_policy(
        model=sources.copy_arrays(sft),
        ref_model=sft,
        source=shuffled,
        num_steps=N,
        hparams=hp,
        loss="ipo",
    )
    assert float(jnp.abs(model.lm_head - online.lm_head).max()) > 0


def test_replay_refuses_an_altered_log(online_run, tmp_path):
    sft, _, _, directory, hp = online_run
    import shutil

    altered = tmp_path / "altered"
    shutil.copytree(directory, altered)
    arr = ts.open(
        {"driver": "zarr", "kvstore": {"driver": "file", "path": str(altered / "fields" / "y_w")}}
    ).result()
    value = arr[2, 0, 0].read().result()
    arr[2, 0, 0].write(value + 1).result()
    log = OrderLog.open(altered)
    with pytest.raises(ReplayError, match="step 2") as err:
        loop.train_policy(
            model=sources.copy_arrays(sft),
            ref_model=sft,
            source=sources.LogReplay(log, tokenizer=TOK),
            num_steps=N,
            hparams=hp,
            loss="ipo",
        )
    assert err.value.step == 2 and err.value.field == "y_w"


def test_replay_sources_refuse_another_tokenizers_log(online_run):
    log = OrderLog.open(online_run[3])
    other = "1" * 64
    with pytest.raises(ReplayError, match=f"tokenizer sha256 {TOK}, got {other}"):
        sources.LogReplay(log, tokenizer=other)
    with pytest.raises(ReplayError, match="tokenizer mismatch"):
        sources.ShuffledReplay(log, window=2, seed=0, tokenizer=other)


@pytest.mark.slow  # trains an SFT policy and a PM, then 2 x 6 policy steps: ~1-2 min
def test_tandem_check_binary_passes(tmp_path):
    def run(*extra, workdir=tmp_path):
        return subprocess.run(
            [
                sys.executable,
                "experiments/tandem_check.py",
                f"--workdir={workdir}",
                *extra,
                "--steps=6",
                "--prep_steps=30",
                "--batch_size=4",
                "--shuffle_levels=all",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )

    proc = run()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASS: the offline replay is bit-identical" in proc.stdout
    assert (tmp_path / "tandem_report.json").exists()
    first = (tmp_path / "tandem_report.json").read_text()
    rep = json.loads(first)
    assert rep["param_leaves_differing_in_bits"] == 0 and rep["param_leaves_differing"] == []
    assert rep["max_param_diff"] == 0.0
    uniform = rep["shuffle_all"]
    assert len(uniform["per_step_loss"]) == len(uniform["per_step_param_distance_to_online"]) == 6
    assert uniform["per_step_param_distance_to_online"][-1] == uniform["param_distance_to_online"]
    assert uniform["per_step_loss"][-1] == uniform["final_loss"]
    assert len(rep["online_per_step_loss"]) == 6
    assert (tmp_path / "tandem_shuffle.png").read_bytes()[:4] == b"\x89PNG"
    again = run()  # the SFT policy and PM are reused from the workdir, the result is the same
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("done already: skipped") == 2
    assert (tmp_path / "tandem_report.json").read_text() == first
    # Given SFT and PM directories (the first run's) in a new workdir: nothing is trained.
    given = [f"--{w}_dir={d}" for w in ("sft", "pm") for d in tmp_path.glob(f"{w}_toy-s_*")]
    other = tmp_path / "given"
    third = run(*given, workdir=other)
    assert len(given) == 2 and third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "SFT:" not in third.stdout and not list(other.glob("sft_*"))
    assert (other / "tandem_report.json").read_text() == first


@pytest.mark.slow  # kept out of the default suite's 5 minutes; runs in CI
def test_offline_run_with_cached_refs_logs_only_the_schema(online_run, tmp_path):
    from ipo_gap.data import ref_cache

    sft, _, _, directory, hp = online_run
    data = {
        k: np.concatenate([b[k] for _, b in OrderLog.open(directory).iter_steps()])
        for k in sources.PAIR_FIELDS
    }
    ref_w, ref_l = ref_cache.compute_reference_logprobs(sft, data, batch_size=B)
    source = sources.OfflineSource(ref_cache.with_refs(data, ref_w, ref_l), batch_size=B, seed=0)
    log = OrderLog.create(
        tmp_path / "offline_log",
        schema=pair_schema(S, T),
        batch_size=B,
        meta={"tokenizer_sha256": TOK},
    )
    _, _, hist = loop.train_policy(
        model=sources.copy_arrays(sft),
        ref_model=sft,
        source=source,
        num_steps=2,
        hparams=hp,
        loss="ipo",
        order_log=log,
    )
    assert len(log) == 2 and "ref_w" not in log.read(0)
    # At step 0 the policy is the reference: Delta = 0, so the IPO loss is (1/(2 beta))^2 = 1.
    assert abs(hist[0]["loss"] - 1.0) < 1e-4


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--steps=0", "--steps must be >= 1"),
        ("--shuffle_levels=2,foo", "--shuffle_levels: each level is a window"),
        ("--sft_dir=/nonexistent", "--sft_dir must be a directory written by"),
    ],
)
def test_tandem_check_refuses_bad_flags_before_training(tmp_path, flag, message):
    proc = subprocess.run(
        [sys.executable, "experiments/tandem_check.py", f"--workdir={tmp_path}", flag],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_a_replay_checks_the_chain_start_of_the_recorded_tokenizer(online_run, tmp_path):
    """meta.json names the tokenizer, and the hash chain starts from that tokenizer's genesis
    hash. An edited meta.json no longer matches its recorded checksum and the log does not
    open; one rewritten together with its checksum opens, but a replay refuses it at once,
    also one that would start at a later step (whose own chain check starts there)."""
    import hashlib
    import shutil

    _, _, _, directory, _ = online_run
    copy = tmp_path / "log"
    shutil.copytree(directory, copy)
    meta_path = copy / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer_sha256"] = "1" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(OrderLogError, match=r"meta.json: altered since the log was created"):
        OrderLog.open(copy)
    digest = hashlib.sha256(meta_path.read_bytes()).hexdigest()
    (copy / "meta.json.sha256").write_text(digest + "\n")
    for make in (
        lambda log: sources.LogReplay(log, tokenizer="1" * 64),
        lambda log: sources.ShuffledReplay(log, window=2, seed=0, tokenizer="1" * 64),
    ):
        with pytest.raises(ReplayError, match="step 0 does not verify against the chain's start"):
            make(OrderLog.open(copy))
    sources.LogReplay(OrderLog.open(directory), tokenizer=TOK).batch(2)  # the original reads
