"""Speed benchmark of ipo_gap's T5, side by side with the PyTorch peer (../shared/bench).

Prints JSON lines. For each configuration of the peer benchmark (`toy`, and `small` = T5 v1.1
small; same batch, prompt and response lengths as the peer):
  fwd_bwd  teacher-forced forward + backward of the summed response log-probs (no optimizer):
           response tokens/s; FLOPs = 3 * fwd(B*Lp, B*Lr).
  sample   the jitted ancestral sampler at its exact defaults (temperature 1, no truncation),
           full-length responses (EOS forbidden before Lr, as the peer's min_new_tokens):
           generated tokens/s; FLOPs = fwd(B*Lp, B*Lr).
  ipo      one IPO train step on B pairs (policy fwd+bwd on y_w and y_l, reference forward
           in the step, Adam): response tokens/s (both responses). FLOPs = 4 * fwd(B*Lp,
           2B*Lr): ipo_gap encodes each prompt once per model. The peer encodes it once per
           response, 4 * fwd(2B*Lp, 2B*Lr), given as `peer_equivalent_gflops_per_s`; the
           comparable figure is tokens/s.
  kl       exact per-token KL along sampled responses (policy and reference teacher-forced,
           sum over the vocabulary): tokens/s; FLOPs = 2 * fwd(B*Lp, B*Lr).
The sampler and the KL read their models as an evaluation does (`t5.unstacked`, sliced once
per model outside the timed calls: unrolled layers' weights as per-layer arrays, attention
projections packed); the train steps read the stacked model.
FLOP model (the peer's, so the figures compare): attention-score matmuls, softmax, norms and
embedding gathers excluded; N_enc_tok = encoder non-embedding params + decoder cross-attention
K,V; N_dec_tok = the other decoder params + LM head; fwd(Te, Td) = 2 (N_enc_tok Te + N_dec_tok Td).
Achieved FLOP/s are reported as a fraction of a matmul peak measured here (best JAX fp32 GEMM
over n in {512, 1024}), measured before a round's first workload and after each one: this VM
drifts by tens of % within minutes, so each workload is divided by the higher of the two
calibrations beside it (the conservative fraction), named in its `peak_gflops`.

With --peer_python=PATH (a Python with torch and transformers, see ../shared/bench/README.md),
the peer's script runs next to ours for each configuration (with `--threads` set to the cores
this process may use, as XLA uses them), in --rounds rounds that alternate
who goes first (ours then the peer, then the peer then ours, ...), and a `compare` line gives
the median over rounds of each side's throughput and of the per-round ratio, with every
round's ratio. Where an issue set a target (`TARGET_RATIO`: sampling 3x the peer on toy and
1.5x on small, the IPO step 1.5x / 1.1x, the exact KL 1.2x), the line says whether the median
ratio meets it and what fraction of our measured peak the target throughput would take
(`target_needs_fraction_of_peak`, with the FLOP model above): how far the target lies from
what this CPU can give. Small's fwd_bwd line carries its target fraction (0.6).

Sampling also gets a roofline (`sample_roofline`): decoding is a chain of steps that
each must read every decoder weight and the K/V caches, so at small batches it can be bound by
memory, not FLOPs. A read bandwidth is measured before and after the sampler (`calib_stream`:
a jitted sum over as many bytes as the largest decode step reads) and the `sample` line gives
`roofline_s`, the least time any implementation could take here (encoder at the peak, each
step the longer of its bytes at the bandwidth and its FLOPs at the peak), and
`fraction_of_roofline`; the compare line gives `target_needs_fraction_of_roofline` (above 1:
the target is beyond this machine in these dtypes).

--compute_dtype=bfloat16 runs our workloads in bf16 compute (products read bf16 and accumulate
in float32; parameters stay float32 unless --param_dtype says otherwise). The matmul peak is
then calibrated on bf16 products with float32 accumulation, so fractions of the peak are of the
bf16 peak, and the peer runs under torch.autocast(bfloat16) (experiments/peer_autocast.py):
compare lines give `ours_dtype` and `peer_dtype`, and a ratio compares like with like. Usage:

  python experiments/bench.py --config=toy,small --peer_python=.peerenv/bin/python --rounds=4
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import subprocess
import time

import dtype_flag
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ipo_gap import kl, logprobs, sampling
from ipo_gap.configs import model_preset
from ipo_gap.t5 import model as t5
from ipo_gap.train import steps

_CONFIGS = flags.DEFINE_list("config", ["toy", "small"], "Configurations: toy, small.")
_BENCH = flags.DEFINE_list(
    "bench", ["fwd_bwd", "sample", "ipo", "kl"], "Workloads: fwd_bwd, sample, ipo, kl."
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
_ROUNDS = flags.DEFINE_integer(
    "rounds",
    1,
    "Rounds of (ours, peer), alternating which goes first; `compare` gives the median of the "
    "per-round ratios and each round's ratio (this VM's speed drifts by tens of %).",
)
_SCAN = flags.DEFINE_bool("scan_layers", None, "Override the preset's scan_layers.")
_COMPUTE = dtype_flag.COMPUTE_DTYPE
_PARAMS = flags.DEFINE_enum(
    "param_dtype", None, ["float32", "bfloat16"], "Override the presets' parameter dtype."
)
_PEER = flags.DEFINE_string("peer_python", None, "Python of the peer venv; runs the peer too.")
_PEER_AUTOCAST = str(pathlib.Path(__file__).resolve().parent / "peer_autocast.py")
_PEER_SCRIPT = flags.DEFINE_string(
    "peer_script",
    str(pathlib.Path(__file__).resolve().parents[2] / "shared/bench/peer_hf_t5.py"),
    "The peer's benchmark script.",
)

flags.register_validator(
    "config",
    lambda v: bool(v) and all(c in WORKLOADS for c in v),
    "--config: a comma-separated list of toy, small",
)
flags.register_validator(
    "bench",
    lambda v: bool(v) and all(b in BENCHES for b in v),
    "--bench: a comma-separated list of fwd_bwd, sample, ipo, kl",
)
flags.register_validator("repeats", lambda v: v >= 1, "--repeats must be >= 1")
flags.register_validator("warmup", lambda v: v >= 0, "--warmup must be >= 0")

# Workload shapes of ../shared/bench/peer_hf_t5.py.
WORKLOADS = {
    "toy": {"preset": "toy", "batch": 32, "prompt_len": 64, "response_len": 32},
    "small": {"preset": "small", "batch": 8, "prompt_len": 256, "response_len": 64},
}
_PEER_NAMES = {
    "fwd_bwd": None,
    "sample": "sample_generate",
    "ipo": "ipo_train_step",
    "kl": "exact_kl",
}


def emit(obj):
    print(json.dumps(obj), flush=True)


def token_param_counts(cfg) -> tuple[int, int]:
    """(N_enc_tok, N_dec_tok) of the peer's FLOP model."""
    D, F, H, K = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv
    attn = 4 * D * H * K
    mlp = (3 if cfg.feed_forward == "gated-gelu" else 2) * D * F
    rel = cfg.relative_attention_num_buckets * H
    enc = cfg.num_encoder_layers * (attn + mlp + 2 * D) + rel + D
    dec = cfg.num_decoder_layers * (2 * attn + mlp + 3 * D) + rel + D
    cross_kv = cfg.num_decoder_layers * 2 * D * H * K
    head = D * cfg.vocab_size
    return enc + cross_kv, dec - cross_kv + head


def fwd_flops(cfg, t_enc: int, t_dec: int) -> float:
    n_enc, n_dec = token_param_counts(cfg)
    return 2.0 * (n_enc * t_enc + n_dec * t_dec)


def workload_flops(bench: str, cfg, w) -> float:
    """The FLOPs one call of our workload `bench` executes, by the FLOP model above: what
    `fraction_of_peak` divides by the peak."""
    B, Lp, Lr = w["batch"], w["prompt_len"], w["response_len"]
    return {
        "fwd_bwd": 3 * fwd_flops(cfg, B * Lp, B * Lr),
        "sample": fwd_flops(cfg, B * Lp, B * Lr),
        "ipo": 4 * fwd_flops(cfg, B * Lp, 2 * B * Lr),  # policy fwd+bwd, reference fwd
        "kl": 2 * fwd_flops(cfg, B * Lp, B * Lr),
    }[bench]


def decode_step_bytes(cfg, w) -> list[int]:
    """Bytes each of the Lr decode steps must read: every decoder weight it uses (N_dec_tok
    parameters, in the narrower of the parameter and compute dtypes: weights can be cast to
    the compute dtype once, before the loop), the cross-attention K/V cache (B x S x H x K
    per layer, twice) and the self-attention cache up to its position."""
    _, n_dec = token_param_counts(cfg)
    w_bytes = _weight_bytes(cfg)
    c_bytes = np.dtype(cfg.compute_jnp_dtype).itemsize
    B, Lp, Lr = w["batch"], w["prompt_len"], w["response_len"]
    kv_per_position = cfg.num_decoder_layers * 2 * B * cfg.num_heads * cfg.d_kv * c_bytes
    return [n_dec * w_bytes + kv_per_position * (Lp + t + 1) for t in range(Lr)]


def _weight_bytes(cfg) -> int:
    """Bytes per weight a product must read at least: the narrower of the two dtypes."""
    return min(np.dtype(cfg.param_jnp_dtype).itemsize, np.dtype(cfg.compute_jnp_dtype).itemsize)


def sample_roofline(cfg, w, peak_gflops: float, stream_gb_per_s: float) -> dict:
    """A lower bound on the sampler's time on this machine: the roofline in its dtypes.

    The encoder runs once (its FLOPs at the matmul peak, or its weights at the read bandwidth,
    whichever takes longer); then each of the Lr decode steps must read its `decode_step_bytes`
    (no two steps can share a read: each needs the previous token) and do 2 N_dec_tok B FLOPs:
    a step takes at least the longer of its bytes at the read bandwidth and its FLOPs at the
    peak. Attention-score FLOPs and writes are left out, so the bound is optimistic (a time no
    implementation beats here).
    """
    n_enc, n_dec = token_param_counts(cfg)
    w_bytes = _weight_bytes(cfg)
    peak, bw = peak_gflops * 1e9, stream_gb_per_s * 1e9
    enc_s = max(2.0 * n_enc * w["batch"] * w["prompt_len"] / peak, n_enc * w_bytes / bw)
    step_flops_s = 2.0 * n_dec * w["batch"] / peak
    step_bytes = decode_step_bytes(cfg, w)
    return {
        "roofline_s": enc_s + sum(max(step_flops_s, b / bw) for b in step_bytes),
        "decode_bytes_per_step": statistics.mean(step_bytes),
        "memory_bound_steps": sum(b / bw > step_flops_s for b in step_bytes),
    }


def stream_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """Best read bandwidth (GB/s) of a jitted sum over a float32 array of `nbytes`, read again
    and again as a decode step re-reads its weights (from whatever cache level holds them)."""
    x = jnp.ones((max(nbytes // 4, 1),), jnp.float32)
    f = jax.jit(jnp.sum)
    return x.size * 4 / min(time_calls(lambda: f(x), 0, repeats)) / 1e9


@jax.jit
def peak_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """The calibration's product: a @ b accumulated in float32, as the model's products."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def matmul_peak(sizes=(512, 1024), repeats=10, dtype="float32") -> float:
    """Best GEMM GFLOP/s that JAX reaches here on `dtype` inputs accumulated in float32 (the
    model's products, t5/layers.py `product`)."""
    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
        b = jax.random.normal(jax.random.key(1), (n, n)).astype(dtype)
        peak_product(a, b).block_until_ready()
        for _ in range(repeats):
            t0 = time.perf_counter()
            peak_product(a, b).block_until_ready()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def time_calls(fn, warmup: int, repeats: int) -> list[float]:
    jax.block_until_ready(fn())  # compile
    for _ in range(warmup):
        jax.block_until_ready(fn())
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def _inputs(cfg, w, seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    src = jax.random.randint(k1, (w["batch"], w["prompt_len"]), 2, cfg.vocab_size)
    tgt = jax.random.randint(k2, (w["batch"], w["response_len"]), 2, cfg.vocab_size)
    return src, jnp.ones_like(src), tgt, jnp.ones_like(tgt)


def bench_fwd_bwd(cfg, model, w):
    src, src_mask, tgt, tgt_mask = _inputs(cfg, w, 1)

    def loss(m):
        logits = t5.forward(m, src, src_mask, t5.shift_right(tgt))
        return -logprobs.sequence_logprobs(logits, tgt, tgt_mask).sum()

    grad_fn = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    ts = time_calls(lambda: grad_fn(model), _WARMUP.value, _REPEATS.value)
    B, Lr = w["batch"], w["response_len"]
    return ts, {"response_tokens": B * Lr, "flops": workload_flops("fwd_bwd", cfg, w)}


def bench_sample(cfg, model, w):
    src, src_mask, _, _ = _inputs(cfg, w, 2)
    Lr = w["response_len"]
    calls = iter(range(10**6))
    policy = t5.unstacked(model)  # once per model, as an evaluation

    def run():
        out = sampling.sample(
            policy, src, src_mask, key=jax.random.key(next(calls)), max_len=Lr, min_len=Lr
        )
        return out

    ts = time_calls(run, _WARMUP.value, _REPEATS.value)
    out = run()
    assert int(out.mask.sum()) == w["batch"] * Lr, "responses must be full length"
    return ts, {"generated_tokens": w["batch"] * Lr, "flops": workload_flops("sample", cfg, w)}


def bench_ipo(cfg, model, w):
    """One IPO step (policy fwd+bwd on y_w and y_l, live reference, Adam), as the peer's."""
    src, src_mask, tgt, tgt_mask = _inputs(cfg, w, 3)
    tgt_l = jax.random.randint(jax.random.key(4), tgt.shape, 2, cfg.vocab_size)
    batch = steps.PairBatch(src, src_mask, tgt, tgt_mask, tgt_l, tgt_mask)
    optimizer = steps.make_optimizer()
    step_fn = steps.make_policy_step("ipo", optimizer)
    ref = model
    state = {"model": jax.tree.map(jnp.copy, model)}
    state["opt"] = optimizer.init(eqx.filter(state["model"], eqx.is_array))
    hp = steps.Hparams.make(1e-7, beta=0.1)

    def run():
        state["model"], state["opt"], m = step_fn(
            state["model"], state["opt"], ref, batch, hp, jnp.int32(0)
        )
        return m["loss"]

    ts = time_calls(run, _WARMUP.value, _REPEATS.value)
    B, Lp, Lr = w["batch"], w["prompt_len"], w["response_len"]
    return ts, {
        "response_tokens": 2 * B * Lr,
        "flops": workload_flops("ipo", cfg, w),
        # The peer's count: it encodes each prompt once per response (4 fwd of 2B pairs' rows).
        "peer_flops": 4 * fwd_flops(cfg, 2 * B * Lp, 2 * B * Lr),
    }


def bench_kl(cfg, model, w):
    """Exact KL along sampled responses: teacher-forced policy and reference, sum over V."""
    src, src_mask, _, _ = _inputs(cfg, w, 5)
    Lr = w["response_len"]
    ref = t5.init(cfg, key=jax.random.key(1))
    out = sampling.sample(model, src, src_mask, key=jax.random.key(6), max_len=Lr, min_len=Lr)
    fn = eqx.filter_jit(kl.teacher_forced_kl)
    policy, ref = t5.unstacked(model), t5.unstacked(ref)  # once per model, as an evaluation
    ts = time_calls(
        lambda: fn(policy, ref, src, src_mask, out.tokens, out.mask).exact,
        _WARMUP.value,
        _REPEATS.value,
    )
    return ts, {"tokens": w["batch"] * Lr, "flops": workload_flops("kl", cfg, w)}


BENCHES = {"fwd_bwd": bench_fwd_bwd, "sample": bench_sample, "ipo": bench_ipo, "kl": bench_kl}
# Our workload -> (the peer's bench name, the throughput field compared).
COMPARE = {
    "sample": ("sample_generate", "generated_tokens_per_s"),
    "ipo": ("ipo_train_step", "response_tokens_per_s"),
    "kl": ("exact_kl", "tokens_per_s"),
}
# The targets of the issues that asked for this benchmark: throughput as a multiple of the
# peer's (model core: sampling; training engine: IPO step and exact KL), and small's
# forward+backward as a fraction of the measured matmul peak.
TARGET_RATIO = {
    ("toy", "sample"): 3.0,
    ("small", "sample"): 1.5,
    ("toy", "ipo"): 1.5,
    ("small", "ipo"): 1.1,
    ("toy", "kl"): 1.2,
    ("small", "kl"): 1.2,
}
TARGET_FRACTION = {("small", "fwd_bwd"): 0.6}


def compare_line(name: str, bench: str, field: str, rounds: list[tuple[dict, dict]]):
    """The `compare` line of one workload over rounds of (ours, peer), or None when no round
    has both. With a target: whether the median ratio meets it, and the fraction of our
    measured matmul peak that the target throughput would take (median over rounds), which
    says how far the target lies from what the hardware can give."""
    peer_name = COMPARE[bench][0]
    pairs = [(o[bench], p[peer_name]) for o, p in rounds if bench in o and peer_name in p]
    if not pairs:
        return None
    ratios = [o[field] / p[field] for o, p in pairs]
    ratio = statistics.median(ratios)
    line = {
        "config": name,
        "bench": "compare",
        "what": f"{bench} {field}",
        "rounds": len(pairs),
        "ours": round(statistics.median(o[field] for o, _ in pairs), 1),
        "peer": round(statistics.median(p[field] for _, p in pairs), 1),
        "ratio": round(ratio, 2),
        "ratio_per_round": [round(x, 2) for x in ratios],
    }
    # Each side's precision ("float32", "bfloat16"; the peer's "fp32", "bf16-autocast").
    for side, rows in (("ours", [o for o, _ in pairs]), ("peer", [p for _, p in pairs])):
        found = {r["dtype"] for r in rows if "dtype" in r}
        if found:
            line[f"{side}_dtype"] = "/".join(sorted(found))
    target = TARGET_RATIO.get((name, bench))
    if target is not None:
        # Our GFLOP/s scale with our throughput: the target throughput needs target/ratio
        # times the GFLOP/s we reached, here as a fraction of the peak measured beside it.
        needs = [
            target * p[field] / o[field] * o["model_gflops_per_s"] / o["peak_gflops"]
            for o, p in pairs
        ]
        line["target_ratio"] = target
        line["meets_target"] = ratio >= target  # not the rounded ratio: 1.496 misses 1.5
        line["target_needs_fraction_of_peak"] = round(statistics.median(needs), 3)
        if all("roofline_s" in o for o, _ in pairs):
            # The target's time per call against the roofline's lower bound: above 1, the
            # target is faster than anything this machine can do in these dtypes.
            needs_roof = [
                o["roofline_s"] / (o["median_s"] * o[field] / (target * p[field])) for o, p in pairs
            ]
            line["target_needs_fraction_of_roofline"] = round(statistics.median(needs_roof), 3)
    return line


def run_peer(config: str, benches: list[str], compute_dtype: str = "float32") -> list[dict]:
    """The peer's lines for one configuration: its script as is in float32, or under
    torch.autocast(bfloat16) (experiments/peer_autocast.py) when ours computes in bf16."""
    peer_benches = [b for b in ("ipo", "sample", "kl") if _PEER_NAMES[b] and b in benches]
    if not peer_benches:
        return []
    wrapper = [] if compute_dtype == "float32" else [_PEER_AUTOCAST]
    cmd = [
        _PEER.value,
        *wrapper,
        _PEER_SCRIPT.value,
        "--config",
        config,
        "--bench",
        *peer_benches,
        "--repeats",
        str(_REPEATS.value),
        "--warmup",
        str(_WARMUP.value),
        # As many threads as XLA's CPU backend uses here (one per core this process may run
        # on); the peer's own default is 2, which matched only on 2-core machines.
        "--threads",
        str(len(os.sched_getaffinity(0))),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _calibration(name: str, round_: int, when: str, dtype: str = "float32") -> float:
    peak = matmul_peak(dtype=dtype)
    emit(
        {
            "config": name,
            "round": round_,
            "bench": "calib_matmul",
            "when": when,
            "best_gflops": round(peak, 1),
            "dtype": dtype,
        }
    )
    return peak


def _bandwidth(name: str, round_: int, when: str, nbytes: int) -> float:
    bw = stream_bandwidth(nbytes)
    emit(
        {
            "config": name,
            "round": round_,
            "bench": "calib_stream",
            "when": when,
            "bytes": nbytes,
            "best_gb_per_s": round(bw, 1),
        }
    )
    return bw


def _ours(name: str, cfg, model, w, round_: int) -> dict[str, dict]:
    """One round of our workloads, with a matmul calibration before the first and after each
    one; emits and returns lines. A workload's fraction of the peak is taken against the
    higher of the two calibrations beside it (this VM's speed drifts within minutes, and the
    higher peak gives the lower, conservative fraction)."""
    peak_before = _calibration(name, round_, "before", cfg.compute_dtype)
    ours = {}
    for bench in _BENCH.value:
        if bench == "sample":
            step_bytes = max(decode_step_bytes(cfg, w))
            bw_before = _bandwidth(name, round_, "before sample", step_bytes)
        ts, extra = BENCHES[bench](cfg, model, w)
        peak_after = _calibration(name, round_, f"after {bench}", cfg.compute_dtype)
        peak = max(peak_before, peak_after)
        med = statistics.median(ts)
        flops = extra.pop("flops")
        peer_flops = extra.pop("peer_flops", None)
        line = {
            "config": name,
            "round": round_,
            "bench": bench,
            "median_s": round(med, 5),
            "min_s": round(min(ts), 5),
            "repeats": len(ts),
            **{f"{k}_per_s": round(v / med, 1) for k, v in extra.items()},
            "model_gflops_per_s": round(flops / med / 1e9, 1),
            "fraction_of_peak": round(flops / med / 1e9 / peak, 3),
            **(
                {"peer_equivalent_gflops_per_s": round(peer_flops / med / 1e9, 1)}
                if peer_flops
                else {}
            ),
            "peak_gflops": round(peak, 1),
            "batch": w["batch"],
            "prompt_len": w["prompt_len"],
            "response_len": w["response_len"],
            "dtype": cfg.compute_dtype,
        }
        if (name, bench) in TARGET_FRACTION:
            line["target_fraction"] = TARGET_FRACTION[name, bench]
        if bench == "sample":
            bw = max(bw_before, _bandwidth(name, round_, "after sample", step_bytes))
            roof = sample_roofline(cfg, w, peak, bw)
            line.update(
                roofline_s=round(roof["roofline_s"], 5),
                fraction_of_roofline=round(roof["roofline_s"] / med, 3),
                stream_gb_per_s=round(bw, 1),
                decode_bytes_per_step=int(roof["decode_bytes_per_step"]),
                decode_steps_memory_bound=roof["memory_bound_steps"],
            )
        ours[bench] = line
        emit(line)
        peak_before = peak_after
    return ours


def _peer(name: str, round_: int, compute_dtype: str) -> dict[str, dict]:
    peer = {r.get("bench"): r for r in run_peer(name, _BENCH.value, compute_dtype)}
    for r in peer.values():
        emit({"peer": True, "round": round_, **r})
    return peer


def main(argv):
    del argv
    if _ROUNDS.value < 1:
        raise app.UsageError(f"--rounds must be >= 1, got {_ROUNDS.value}")
    emit(
        {
            "bench": "setup",
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "python": platform.python_version(),
        }
    )
    for name in _CONFIGS.value:
        w = WORKLOADS[name]
        cfg = model_preset(w["preset"])
        if _SCAN.value is not None:
            cfg = cfg.replace(scan_layers=_SCAN.value)
        if _COMPUTE.value is not None:
            cfg = cfg.replace(compute_dtype=_COMPUTE.value)
        if _PARAMS.value is not None:
            cfg = cfg.replace(param_dtype=_PARAMS.value)
        model = t5.init(cfg, key=jax.random.key(0))
        rounds = []  # (ours, peer) per round
        for r in range(_ROUNDS.value):
            # Alternate who goes first, so a drift of the machine's speed during a round
            # favours each side equally often.
            if _PEER.value and r % 2:
                peer = _peer(name, r, cfg.compute_dtype)
                ours = _ours(name, cfg, model, w, r)
            else:
                ours = _ours(name, cfg, model, w, r)
                peer = _peer(name, r, cfg.compute_dtype) if _PEER.value else {}
            rounds.append((ours, peer))
        for bench, (_, field) in COMPARE.items():
            line = compare_line(name, bench, field, rounds)
            if line is not None:
                emit(line)
        del model


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    app.run(main)
