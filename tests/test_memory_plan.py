"""experiments/memory_plan.py: per-device memory of the study's programs on a mesh.

Each test runs in a subprocess with 8 simulated CPU devices (the plan compiles, never runs).
"""

import json
import subprocess
import sys

import pytest
from conftest import REPO, run_with_devices

_ARGS_SCRIPT = """
import dataclasses, json, math, sys
sys.path.insert(0, "experiments")
import jax
import memory_plan as mp
from ipo_gap import sharding
from ipo_gap.study import PRESETS

B, S, T = 8, 64, 32
out = {}
for remat in (False, True):
    cfg = dataclasses.replace(
        PRESETS["micro"], prompt_len=S, target_len=T, rl_batch=B, remat=remat
    )
    mesh = sharding.make_mesh("data:2,model:4")
    model_cfg = cfg.preset_model("toy-s", 384)
    programs = mp.policy_programs(cfg, model_cfg, mesh, "policy toy-s")
    next(programs)  # the SFT step
    next(programs)  # the reference's log-probs
    ipo = next(programs)
    model = mp.abstract_model(model_cfg, mesh)
    shard = lambda x: math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    arrays = [x for x in jax.tree.leaves(model) if isinstance(x, jax.ShapeDtypeStruct)]
    out[str(remat)] = {
        "plan": dataclasses.asdict(ipo),
        "params_per_device": sum(shard(x) for x in arrays),
        "params_whole": sum(x.size * x.dtype.itemsize for x in arrays),
    }
print(json.dumps(out))
"""


def test_the_plan_counts_each_devices_shards_and_remat_cuts_the_temporaries():
    """The IPO step's arguments on data:2,model:4 are exactly the per-device shards of the
    policy and both Adam moments, plus the batch's rows on one data shard, the reference's
    log-probs of those rows and the scalars the step reads (jit drops the unused lambda and
    the reference model, whose log-probs come in with the batch as the loop runs it); remat
    keeps fewer temporaries."""
    res = run_with_devices(_ARGS_SCRIPT, num_devices=8)
    B, S, T = 8, 64, 32
    for remat in ("False", "True"):
        r = res[remat]
        assert r["params_per_device"] < r["params_whole"] / 2  # sharded over model:4
        batch = (2 * S + 4 * T) * (B // 2) * 4  # int32 tokens and masks, half the rows
        refs = 2 * (B // 2) * 4  # float32 ref_w, ref_l of those rows
        scalars = 4 + 3 * 4 + 4  # Adam's count; lr, beta, warm-up; the step
        assert r["plan"]["arguments"] == 3 * r["params_per_device"] + batch + refs + scalars, r
    off, on = res["False"]["plan"], res["True"]["plan"]
    assert on["temporaries"] < 0.6 * off["temporaries"], (off, on)


@pytest.mark.slow  # compiles the micro study's nine programs on 8 simulated devices: ~40 s
def test_the_plan_binary_marks_what_does_not_fit(tmp_path):
    rows = tmp_path / "plan.jsonl"
    cmd = [
        sys.executable,
        "experiments/memory_plan.py",
        "--preset=micro",
        "--simulate_devices=8",
        "--mesh=data:2,model:4",
        "--sizes=toy-s",
        "--device_memory_gib=0.005",
        "--compute_dtype=bfloat16",
        f"--json={rows}",
    ]
    got = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    plans = [json.loads(line) for line in rows.read_text().splitlines()]
    programs = [p["program"] for p in plans]
    assert programs.count("PM train step (both orders)") == 2  # golden and proxy
    # The IPO step takes the reference's log-probs from their own program, as the loop runs
    # it; each PM judges at the study's dataset batch (256) and at micro's evaluation batch.
    assert "IPO step" in programs and "reference log-probs (training)" in programs
    judged = sorted((p["model"], p["batch"]) for p in plans if p["program"].startswith("PM judge"))
    assert judged == [("golden toy-s", 64), ("golden toy-s", 256)] + [
        ("proxy toy-s", 64),
        ("proxy toy-s", 256),
    ]
    assert len(plans) == 12
    lines = got.stdout.splitlines()
    assert "simulated: XLA's CPU compiler, an estimate" in lines[0]
    assert "compute bfloat16" in lines[0]  # the flag reaches every planned model
    for p in plans:
        assert p["total"] == p["arguments"] + p["outputs"] + p["temporaries"] > 0
        line = next(
            x
            for x in lines
            if x.startswith(p["program"]) and p["model"] in x and f" {p['batch']:5d} " in x
        )
        verdict = "DOES NOT FIT" if p["total"] > 0.005 * 2**30 else "fits alone"
        assert line.endswith(verdict), line
    assert any(line.endswith("DOES NOT FIT") for line in lines)
    assert any(line.endswith("fits alone") for line in lines)
