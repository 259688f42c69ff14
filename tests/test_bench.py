"""experiments/bench.py: its comparison with the peer and its JSON lines.

The benchmark measures speed, so nothing here times anything; these tests check that what it
prints is computed right. The end-to-end test runs it on the `toy` configuration with a stand-in
peer (a script that prints lines in the format of ../shared/bench/peer_hf_t5.py), so the
comparison path runs without torch.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, "experiments")
import bench  # noqa: E402


def _ours(bench_name, per_s, gflops, peak):
    field = bench.COMPARE[bench_name][1]
    return {field: per_s, "model_gflops_per_s": gflops, "peak_gflops": peak}


def _peer(bench_name, per_s):
    return {bench.COMPARE[bench_name][1]: per_s}


def _round(bench_name, ours_per_s, gflops, peak, peer_per_s):
    peer_name = bench.COMPARE[bench_name][0]
    ours = {bench_name: _ours(bench_name, ours_per_s, gflops, peak)}
    return ours, {peer_name: _peer(bench_name, peer_per_s)}


def test_compare_line_takes_medians_and_says_what_the_target_needs():
    rounds = [
        _round("sample", 300.0, 30.0, 100.0, 200.0),
        _round("sample", 100.0, 10.0, 50.0, 100.0),
        _round("sample", 400.0, 40.0, 100.0, 100.0),
        ({}, {"sample_generate": _peer("sample", 100.0)}),  # ours missing: not a round
    ]
    line = bench.compare_line("toy", "sample", "generated_tokens_per_s", rounds)
    assert line["rounds"] == 3
    assert line["ratio_per_round"] == [1.5, 1.0, 4.0]
    assert line["ratio"] == 1.5  # the median ratio, not the ratio of the medians
    assert (line["ours"], line["peer"]) == (300.0, 100.0)
    assert line["target_ratio"] == 3.0 and line["meets_target"] is False
    # 3x the peer's 200 tokens/s = 600, twice our 300: 60 of 100 GFLOP/s; 300 = 3x: 30/50;
    # 300 = 0.75x ours: 30/100. Median of (0.6, 0.6, 0.3).
    assert line["target_needs_fraction_of_peak"] == 0.6


def test_compare_line_meets_a_target_and_skips_workloads_without_a_peer():
    rounds = [_round("ipo", 330.0, 50.0, 100.0, 100.0)]
    line = bench.compare_line("small", "ipo", "response_tokens_per_s", rounds)
    assert line["ratio"] == 3.3 and line["target_ratio"] == 1.1 and line["meets_target"]
    # Judged on the median itself, not its two-decimal rounding: 1.0996 misses 1.1.
    close = bench.compare_line(
        "small", "ipo", "response_tokens_per_s", [_round("ipo", 109.96, 50.0, 100.0, 100.0)]
    )
    assert close["ratio"] == 1.1 and close["meets_target"] is False
    assert bench.compare_line("small", "kl", "tokens_per_s", rounds) is None


def test_sample_roofline_by_hand():
    """The roofline of a small made-up sampler, worked by hand."""
    from ipo_gap.configs import model_preset

    cfg = model_preset("toy")  # fp32: 4 bytes per parameter and per cached value
    n_enc, n_dec = bench.token_param_counts(cfg)
    w = {"batch": 2, "prompt_len": 3, "response_len": 2}
    hk = cfg.num_heads * cfg.d_kv  # 256
    # Memory-bound everywhere: a peak so high that FLOPs take no time, 1 GB/s.
    roof = bench.sample_roofline(cfg, w, 1e12, 1.0)
    kv = [2 * 2 * 2 * hk * (3 + t) * 4 for t in (1, 2)]  # layers x (K, V) x B x HK x pos
    steps = [4 * n_dec + b for b in kv]
    assert bench.decode_step_bytes(cfg, w) == steps
    assert roof["decode_bytes_per_step"] == sum(steps) / 2
    assert roof["roofline_s"] == pytest.approx((4 * n_enc + sum(steps)) / 1e9)
    assert roof["memory_bound_steps"] == 2
    # Compute-bound everywhere: 1 GFLOP/s, infinite bandwidth.
    roof = bench.sample_roofline(cfg, w, 1.0, 1e12)
    assert roof["roofline_s"] == pytest.approx(2 * (n_enc * 2 * 3 + 2 * n_dec * 2) / 1e9)
    assert roof["memory_bound_steps"] == 0


def test_sample_roofline_reads_weights_and_caches_in_the_narrower_dtype():
    """bf16 compute: the K/V caches hold bf16 and each step can read the weights in bf16
    (cast once before the loop) even from float32 parameters: 2 bytes each."""
    from ipo_gap.configs import model_preset

    n_enc, n_dec = bench.token_param_counts(model_preset("toy"))
    w = {"batch": 2, "prompt_len": 3, "response_len": 2}
    hk = 256
    kv = [2 * 2 * 2 * hk * (3 + t) * 2 for t in (1, 2)]
    for params in ("float32", "bfloat16"):
        cfg = model_preset("toy").replace(compute_dtype="bfloat16", param_dtype=params)
        assert bench.decode_step_bytes(cfg, w) == [2 * n_dec + b for b in kv]
        roof = bench.sample_roofline(cfg, w, 1e12, 1.0)
        assert roof["roofline_s"] == pytest.approx((2 * n_enc + 4 * n_dec + sum(kv)) / 1e9)


def test_flop_model_counts_what_the_programs_execute():
    """`workload_flops` against XLA's own count of the compiled programs (toy's widths, one
    layer per stack, 2 rows of 8 + 8 tokens): the model leaves out attention scores, softmax,
    norms and Adam's elementwise update, so XLA counts a little more, never less. The IPO
    step encodes each prompt once per model: the peer's count, which encodes it once per
    response, lies above what XLA counts."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from ipo_gap import kl, logprobs
    from ipo_gap.configs import model_preset
    from ipo_gap.t5 import model as t5
    from ipo_gap.train import steps

    cfg = model_preset("toy").replace(num_encoder_layers=1, num_decoder_layers=1)
    w = {"batch": 2, "prompt_len": 8, "response_len": 8}
    model = t5.init(cfg, key=jax.random.key(0))
    src, sm, tgt, tm = bench._inputs(cfg, w, 1)

    def xla_flops(lowered):
        lowered = getattr(lowered, "lowered", lowered)  # equinox wraps jax's Lowered
        return lowered.compile().cost_analysis()["flops"]

    def loss(m):
        logits = t5.forward(m, src, sm, t5.shift_right(tgt))
        return -logprobs.sequence_logprobs(logits, tgt, tm).sum()

    opt = steps.make_optimizer()
    ipo_args = (
        model,
        opt.init(eqx.filter(model, eqx.is_array)),
        model,
        steps.PairBatch(src, sm, tgt, tm, tgt[:, ::-1], tm),
        steps.Hparams.make(1e-7, beta=0.1),
        jnp.int32(0),
    )
    counted = {
        "fwd_bwd": xla_flops(eqx.filter_jit(eqx.filter_value_and_grad(loss)).lower(model)),
        "ipo": xla_flops(steps.make_policy_step("ipo", opt).lower(*ipo_args)),
        "kl": xla_flops(eqx.filter_jit(kl.teacher_forced_kl).lower(model, model, src, sm, tgt, tm)),
    }
    for name, flops in counted.items():
        assert 1.0 <= flops / bench.workload_flops(name, cfg, w) <= 1.2, name
    B, Lp, Lr = w["batch"], w["prompt_len"], w["response_len"]
    assert 4 * bench.fwd_flops(cfg, 2 * B * Lp, 2 * B * Lr) > 1.1 * counted["ipo"]


def test_compare_line_names_each_sides_dtype():
    ours, peer = _round("kl", 300.0, 30.0, 100.0, 200.0)
    assert "ours_dtype" not in bench.compare_line("toy", "kl", "tokens_per_s", [(ours, peer)])
    ours["kl"]["dtype"], peer["exact_kl"]["dtype"] = "bfloat16", "bf16-autocast"
    line = bench.compare_line("toy", "kl", "tokens_per_s", [(ours, peer)])
    assert (line["ours_dtype"], line["peer_dtype"]) == ("bfloat16", "bf16-autocast")


def test_matmul_peak_calibrates_the_models_kind_of_product():
    """The calibration times products like the model's: inputs in the dtype, a float32 sum
    (a bf16 result would time XLA's slow path on AMX CPUs), and it runs in both dtypes."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (64, 64))
    b = jax.random.normal(jax.random.key(1), (64, 64))
    lo = bench.peak_product(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
    assert lo.dtype == jnp.float32
    exact = a.astype(jnp.bfloat16).astype(jnp.float32) @ b.astype(jnp.bfloat16).astype(jnp.float32)
    assert float(jnp.abs(lo - exact).max()) < 1e-4 * float(jnp.abs(exact).max())
    for dtype in ("float32", "bfloat16"):
        assert bench.matmul_peak(sizes=(64,), repeats=1, dtype=dtype) > 0


_FAKE_PEER_MODULE = textwrap.dedent(
    """
    import json, sys
    import torch

    def emit(obj):
        print(json.dumps(obj), flush=True)

    def main():
        emit({"bench": "exact_kl", "dtype": "fp32", "argv": sys.argv[1:],
              "autocast": torch.is_autocast_enabled("cpu"),
              "product": str((torch.ones(2, 2) @ torch.ones(2, 2)).dtype)})
        emit({"note": "no bench"})
    """
)


def test_peer_autocast_runs_the_peer_in_bf16_and_says_so(tmp_path):
    """experiments/peer_autocast.py runs the peer's main under CPU autocast (its products in
    bf16) with the peer's flags, and tags the peer's result lines. Needs a Python with torch:
    $PEER_PYTHON, else the peer venv of ../shared/bench/README.md (.peerenv) when present."""
    python = os.environ.get("PEER_PYTHON") or ".peerenv/bin/python"
    if not os.path.exists(python):
        pytest.skip(f"no peer Python with torch at {python} (set PEER_PYTHON)")
    peer = tmp_path / "peer.py"
    peer.write_text(_FAKE_PEER_MODULE)
    cmd = [python, "experiments/peer_autocast.py", str(peer), "--config", "toy"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    first, second = (json.loads(s) for s in out.splitlines())
    assert first["dtype"] == "bf16-autocast" and first["autocast"] is True
    assert first["product"] == "torch.bfloat16" and first["argv"] == ["--config", "toy"]
    assert second == {"note": "no bench"}


def test_compare_line_says_what_the_target_needs_of_the_roofline():
    ours, peer = _round("sample", 300.0, 30.0, 100.0, 200.0)
    ours["sample"].update(median_s=2.0, roofline_s=0.5)
    line = bench.compare_line("toy", "sample", "generated_tokens_per_s", [(ours, peer)])
    # 3x the peer's 200 = 600 tokens/s, twice our 300: 1.0 s per call, 0.5 of it the roofline.
    assert line["target_needs_fraction_of_roofline"] == 0.5
    ours["sample"]["roofline_s"] = 1.5
    line = bench.compare_line("toy", "sample", "generated_tokens_per_s", [(ours, peer)])
    assert line["target_needs_fraction_of_roofline"] == 1.5  # faster than the machine can go
    del ours["sample"]["roofline_s"]
    line = bench.compare_line("toy", "sample", "generated_tokens_per_s", [(ours, peer)])
    assert "target_needs_fraction_of_roofline" not in line


_FAKE_PEER = textwrap.dedent(
    """
    import json, sys
    args = sys.argv[1:]
    cfg = args[args.index("--config") + 1]
    names = {"ipo": ("ipo_train_step", "response_tokens_per_s"),
             "sample": ("sample_generate", "generated_tokens_per_s"),
             "kl": ("exact_kl", "tokens_per_s")}
    i = args.index("--bench") + 1
    while i < len(args) and not args[i].startswith("--"):
        name, field = names[args[i]]
        print(json.dumps({"config": cfg, "bench": name, field: 1000.0}))
        i += 1
    """
)


@pytest.mark.slow
def test_bench_runs_every_workload_and_compares_with_a_peer(tmp_path):
    peer = tmp_path / "peer.py"
    peer.write_text(_FAKE_PEER)
    cmd = [sys.executable, "experiments/bench.py", "--config=toy", "--repeats=1", "--warmup=0"]
    cmd += ["--rounds=2", f"--peer_python={sys.executable}", f"--peer_script={peer}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900).stdout
    lines = [json.loads(s) for s in out.splitlines() if s.startswith("{")]
    calib = [x for x in lines if x.get("bench") == "calib_matmul"]
    # Per round: one before, one after each of the four workloads.
    assert [x["when"] for x in calib[:5]] == ["before"] + [
        f"after {b}" for b in ("fwd_bwd", "sample", "ipo", "kl")
    ]
    ours = [x for x in lines if x.get("bench") in bench.BENCHES and not x.get("peer")]
    assert sorted(x["bench"] for x in ours) == sorted(list(bench.BENCHES) * 2)
    for x in ours:
        peaks = [c["best_gflops"] for c in calib if c["round"] == x["round"]]
        assert x["peak_gflops"] in [round(p, 1) for p in peaks]
        assert (
            0
            < x["fraction_of_peak"]
            == pytest.approx(x["model_gflops_per_s"] / x["peak_gflops"], abs=2e-3)
        )
        # Only the IPO step does less work than the peer's for the same step (see its docstring).
        assert ("peer_equivalent_gflops_per_s" in x) == (x["bench"] == "ipo")
        if x["bench"] == "ipo":
            assert x["peer_equivalent_gflops_per_s"] > x["model_gflops_per_s"]
    streams = [x for x in lines if x.get("bench") == "calib_stream"]
    assert [x["when"] for x in streams] == ["before sample", "after sample"] * 2
    for x in (o for o in ours if o["bench"] == "sample"):
        bws = [c["best_gb_per_s"] for c in streams if c["round"] == x["round"]]
        assert x["stream_gb_per_s"] == max(bws)
        assert 0 < x["roofline_s"] < x["median_s"]  # a lower bound
        assert x["fraction_of_roofline"] == pytest.approx(x["roofline_s"] / x["median_s"], abs=2e-3)
    compare = {x["what"].split()[0]: x for x in lines if x.get("bench") == "compare"}
    assert sorted(compare) == ["ipo", "kl", "sample"]
    assert "target_needs_fraction_of_roofline" in compare["sample"]
    for name, x in compare.items():
        field = bench.COMPARE[name][1]
        mine = [o[field] for o in ours if o["bench"] == name]  # in round order
        assert [o["round"] for o in ours if o["bench"] == name] == [0, 1]
        assert x["rounds"] == 2 and x["peer"] == 1000.0
        assert x["ratio_per_round"] == pytest.approx([m / 1000.0 for m in mine], abs=0.01)
        median = (mine[0] + mine[1]) / 2 / 1000.0
        assert x["meets_target"] == (median >= bench.TARGET_RATIO["toy", name])


@pytest.mark.slow
def test_bench_in_bf16_calibrates_and_reports_bf16():
    cmd = [sys.executable, "experiments/bench.py", "--config=toy", "--repeats=1", "--warmup=0"]
    cmd += ["--bench=sample,kl", "--compute_dtype=bfloat16"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900).stdout
    lines = [json.loads(s) for s in out.splitlines() if s.startswith("{")]
    calib = [x for x in lines if x.get("bench") == "calib_matmul"]
    assert len(calib) == 3 and all(x["dtype"] == "bfloat16" for x in calib)
    ours = {x["bench"]: x for x in lines if x.get("bench") in ("sample", "kl")}
    assert sorted(ours) == ["kl", "sample"]
    assert all(x["dtype"] == "bfloat16" for x in ours.values())
    from ipo_gap.configs import model_preset

    cfg = model_preset("toy").replace(compute_dtype="bfloat16")
    w = bench.WORKLOADS["toy"]
    steps = bench.decode_step_bytes(cfg, w)
    assert ours["sample"]["decode_bytes_per_step"] == int(sum(steps) / len(steps))
    assert 0 < ours["sample"]["roofline_s"] < ours["sample"]["median_s"]


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--config=tiny", "--config: a comma-separated list of toy, small"),
        ("--bench=fwd", "--bench: a comma-separated list of fwd_bwd, sample, ipo, kl"),
        ("--repeats=0", "--repeats must be >= 1"),
    ],
)
def test_bad_flags_are_named_before_any_work(flag, message):
    """A mistyped workload or configuration was a KeyError after the matmul calibration."""
    script = os.path.join(os.path.dirname(bench.__file__), "bench.py")
    got = subprocess.run(
        [sys.executable, script, flag], capture_output=True, text=True, timeout=600
    )
    assert got.returncode != 0 and message in got.stderr
    assert "matmul" not in got.stdout  # nothing measured
