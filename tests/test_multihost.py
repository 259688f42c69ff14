"""The study across processes (multi-host) = the study in one process.

Two processes with 4 simulated CPU devices each join one `jax.distributed` job (gloo
collectives over localhost) and run a micro study's SFT, golden and proxy PMs, D_golden, golden
baseline, online IPO with its evaluations, and the exact-order replay of its logged stream, on
one "data:4,model:2" mesh that spans both processes. A third process runs the same on one device.

Checked: losses agree with the one-device run up to float summation order, the online stream
is the same token for token, evaluations count the same outcomes, the replay is still
bit-identical to the online run; both processes end holding the same values, and every file is
written once (process 0 writes; no metrics line appears twice).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO

_SCRIPT = r"""
import dataclasses, hashlib, json, pathlib, sys
process_id, num_processes, port, workdir, out = sys.argv[1:]
process_id, num_processes = int(process_id), int(num_processes)
from ipo_gap import sharding
if num_processes > 1:
    sharding.initialize_distributed(True, f"localhost:{port}", num_processes, process_id)
import jax, numpy as np
sys.path.insert(0, "experiments")
import reproduce
from ipo_gap import study_experiments
from ipo_gap.data.order_log import OrderLog
from ipo_gap.study_runs import Study

mesh = "data:4,model:2" if num_processes > 1 else None
cfg = dataclasses.replace(reproduce.config("micro"), sft_steps=20, pm_steps=20, mesh=mesh)
workdir = pathlib.Path(workdir)
study = Study(workdir, cfg)
with sharding.use_mesh(study.mesh):
    online = study_experiments._online(study, "ipo", "online_ipo")
    tandem = study_experiments._replay(
        study, "online_ipo", "tandem_ipo", "offline ipo (exact order)", "ipo")
    sft = study.sft()
lines = lambda p: [json.loads(line) for line in open(p)]
log = OrderLog.open(workdir / "runs" / "online_ipo" / "log")
result = {
    "processes": jax.process_count(),
    "devices": jax.device_count(),
    "sharded_over_processes": sum(not x.is_fully_addressable for x in jax.tree.leaves(sft)),
    "sft": [r["loss"] for r in lines(workdir / "sft" / "metrics.jsonl")],
    "golden": [r["loss"] for r in lines(workdir / "golden_pm" / "metrics.jsonl") if "loss" in r],
    "proxy": [r["loss"] for r in lines(workdir / "proxy_pm" / "metrics.jsonl") if "loss" in r],
    "online": online["losses"],
    "online_steps": [r["step"] for r in lines(workdir / "runs/online_ipo/metrics.jsonl")],
    "evals": online["evals"],
    "eval_steps": [r["step"] for r in lines(workdir / "runs/online_ipo/evals.jsonl")],
    "tandem": tandem["losses"],
    "tandem_param_diff": tandem["max_param_diff_to_online"],
    "log_tokens": [
        hashlib.sha256(b"".join(np.asarray(b[f]).tobytes() for f in ("prompt", "y_w", "y_l")))
        .hexdigest() for _, b in log.iter_steps()
    ],
    "leftover_temporaries": sorted(str(p) for p in workdir.rglob("*.tmp")),
}
pathlib.Path(out).write_text(json.dumps(result))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(tmp_path, name, num_processes, devices_each, script=_SCRIPT):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_each}"
    port = str(_free_port())
    procs, outs = [], []
    for i in range(num_processes):
        out = tmp_path / f"{name}_{i}.json"
        log = open(tmp_path / f"{name}_{i}.log", "w")  # noqa: SIM115
        args = [str(i), str(num_processes), port, str(tmp_path / name), str(out)]
        cmd = [sys.executable, "-c", script, *args]
        procs.append((subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=log), log))
        outs.append(out)
    return procs, outs


def _collect(procs, outs, tmp_path, name, timeout):
    for i, (p, log) in enumerate(procs):
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            tail = (tmp_path / f"{name}_{i}.log").read_text()[-4000:]
            raise AssertionError(f"{name} process {i} failed ({rc}):\n{tail}")
    return [json.loads(o.read_text()) for o in outs]


def _rel(a, b):
    return abs(a - b) / max(1.0, abs(a))


@pytest.mark.slow  # two processes x 4 simulated devices, then one device: ~5 min on 2 CPUs
def test_a_study_across_two_processes_equals_the_study_in_one(tmp_path):
    multi = _collect(*_launch(tmp_path, "multi", 2, 4), tmp_path, "multi", timeout=1200)
    (one,) = _collect(*_launch(tmp_path, "one", 1, 1), tmp_path, "one", timeout=600)
    p0, p1 = multi
    assert p0["processes"] == p1["processes"] == 2 and p0["devices"] == 8
    assert one["processes"] == 1 and one["sharded_over_processes"] == 0
    # The SFT policy really spans both processes (sharded over "model", no process holds it).
    assert p0["sharded_over_processes"] > 0
    # Every process ends with the same values (the files they read are process 0's).
    for key in ("sft", "golden", "proxy", "online", "evals", "tandem", "log_tokens"):
        assert p0[key] == p1[key], key
    # Process 0 writes each file once: one metrics line per step, one eval line per evaluation.
    assert p0["online_steps"] == list(range(len(p0["online"])))
    # (the summary's evaluations start with the SFT policy's, step 0, which is not a line)
    assert p0["eval_steps"] == [e["step"] for e in p0["evals"]][1:] and len(p0["eval_steps"]) >= 2
    assert p0["leftover_temporaries"] == []
    for key in ("sft", "golden", "proxy", "online"):
        assert len(one[key]) == len(p0[key]) > 0, key
        worst = max(_rel(a, b) for a, b in zip(one[key], p0[key], strict=True))
        assert worst < 1e-4, (key, worst)
    # Sampled on the mesh across hosts, judged by the sharded proxy PM: the same stream.
    assert p0["log_tokens"] == one["log_tokens"]
    for e1, e2 in zip(one["evals"], p0["evals"], strict=True):
        for k in ("win_rate", "accuracy", "self_accuracy", "response_tokens"):
            assert e1[k] == e2[k], (e1["step"], k, e1[k], e2[k])
        for k in ("kl", "drift"):
            assert abs(e1[k] - e2[k]) <= 1e-4 * max(1.0, abs(e1[k])), (k, e1[k], e2[k])
    # The exact replay of the logged stream is the online run, across hosts too.
    assert p0["tandem"] == p0["online"]
    assert p0["tandem_param_diff"] == 0.0


@pytest.mark.slow  # two processes x 2 simulated devices, then one process: about a minute
def test_smoke_across_two_processes_loads_each_hosts_rows_and_equals_one_process(tmp_path):
    """`smoke.py --distributed`: each process loads only its rows of the global batch
    (`process_batch_slice`), so two processes train on the same global batches as one
    process with all four devices: the same losses, the same samples. (It passed every
    process the whole batch, which `shard_batch` took as that host's rows: a global batch
    twice as large, each row repeated, which the losses alone would not show.)"""
    flags = ["experiments/smoke.py", "--steps=3", "--batch_size=8", "--mesh=data:-1"]

    def launch(num_processes, devices_each):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_each}"
        port = _free_port()
        extra = lambda i: (  # noqa: E731
            ["--distributed", f"--coordinator_address=localhost:{port}"]
            + [f"--num_processes={num_processes}", f"--process_id={i}"]
            if num_processes > 1
            else []
        )
        procs = [
            subprocess.Popen(
                [sys.executable, *flags, *extra(i)],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(num_processes)
        ]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        for p, out in zip(procs, outs, strict=True):
            assert p.returncode == 0, out[-3000:]
        return outs

    lines = lambda out: [x for x in out.splitlines() if " loss " in x or "-> sampled" in x]  # noqa: E731
    strip = lambda x: x.split("  (")[0].split("  loss ")[1].split()[0] if " loss " in x else x  # noqa: E731
    two = launch(2, 2)
    (one,) = launch(1, 4)
    assert "global batch 8, 4 rows loaded by this process" in two[0]
    assert "global batch 8, 8 rows loaded by this process" in one
    assert lines(two[0]) and len(lines(two[0])) == len(lines(one))
    for a, b, c in zip(lines(two[0]), lines(two[1]), lines(one), strict=True):
        assert strip(a) == strip(b) == strip(c), (a, b, c)


_PLACE_SCRIPT = r"""
import json, sys
process_id, num_processes, port, workdir, out = sys.argv[1:]
from ipo_gap import sharding
sharding.initialize_distributed(True, f"localhost:{port}", int(num_processes), int(process_id))
import jax, numpy as np
from jax.experimental import multihost_utils as mu
gathered = []
original = mu.process_allgather
def counting(x, tiled=False):
    gathered.append(sum(np.asarray(a).nbytes for a in jax.tree.leaves(x)))
    return original(x, tiled=tiled)
mu.process_allgather = counting
from ipo_gap import checkpoint
from ipo_gap.t5 import model as t5
mesh = sharding.make_mesh("data:4,model:2")
fixture = "tests/fixtures/hf_t5_v11"
_, loaded = checkpoint.load_hf_t5(fixture, mesh=mesh)
local_cfg, local = checkpoint.load_hf_t5(fixture)  # this process's devices only
placed = sharding.shard_model(local, mesh)
during = list(gathered)
leaves = lambda m: jax.tree.leaves(m)
result = {
    "gathers_while_placing": len(during),
    "spans_processes": sum(not x.is_fully_addressable for x in leaves(loaded)),
    "loaded_equal": all(np.array_equal(sharding.to_host(a), np.asarray(b))
                        for a, b in zip(leaves(loaded), leaves(local))),
    "placed_equal": all(np.array_equal(sharding.to_host(a), np.asarray(b))
                        for a, b in zip(leaves(placed), leaves(local))),
}
open(out, "w").write(json.dumps(result))
"""


@pytest.mark.slow  # two processes x 4 simulated devices: about a minute
def test_placing_a_model_across_processes_gathers_nothing(tmp_path):
    """load_hf_t5(mesh=...) and shard_model on a mesh spanning two processes: each process
    builds its own shards; jax.device_put onto such a sharding all-gathered every parameter
    (whole, once per process, onto every device) to check the processes agree."""
    procs, outs = _launch(tmp_path, "place", 2, 4, script=_PLACE_SCRIPT)
    for r in _collect(procs, outs, tmp_path, "place", timeout=300):
        assert r["spans_processes"] > 0, r
        assert r["gathers_while_placing"] == 0, r
        assert r["loaded_equal"] and r["placed_equal"], r
