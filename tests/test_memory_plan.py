"""experiments/memory_plan.py: per-device memory of the study's programs on a mesh.

Each test runs in a subprocess with 8 simulated CPU devices (the plan compiles, never runs).
"""

import json
import os
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


@pytest.mark.slow  # compiles the IPO step twice on 8 simulated devices: ~30 s
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


_BESIDE_SCRIPT = """
import json, sys
sys.path.insert(0, "experiments")
import memory_plan as mp
from ipo_gap import sharding
from ipo_gap.study import PRESETS

cfg = PRESETS["paper"]
held = mp.Beside(cfg, sharding.make_mesh("data:1,model:8"))
def beside(program, role, batch=256):
    plan = mp.Plan(program, role, batch, 0, 0, 0, 0.0)
    return held.add(plan, role).beside_of, held.add(plan, role).beside
out = {"bytes": held.bytes, "moments": held.moments, "order": held.order}
for program, role in [
    ("exact KL (policy + reference)", "xxl"), ("SFT step", "large"), ("SFT step", "xxl"),
    ("IPO step", "xl"), ("PM train step (both orders)", "golden"),
    ("sampling (evaluation batch)", "large"),
    ("PM judgement (both orders)", "golden"), ("PM judgement (both orders)", "proxy"),
]:
    out[program + " " + role] = beside(program, role)
try:
    beside("SFT step", "base")
except ValueError as e:
    out["not in the study"] = str(e)
print(json.dumps(out))
"""


def test_what_the_study_holds_beside_each_program():
    """The paper preset on data:1,model:8 (models as shapes, nothing compiled): the XXL
    policy's exact KL runs beside its Adam moments, both PMs and the SFT policies of the
    sizes trained before it (Large, XL); the first SFT beside its initial copy only; a PM's
    judgement at 256 pairs (the dataset and the evaluation batch) in its largest context:
    inside the XXL runs, whose win rates both judge (more than their validations hold); a
    size the study does not run is refused."""
    r = run_with_devices(_BESIDE_SCRIPT, num_devices=8)
    b, m = r["bytes"], r["moments"]
    assert r["order"] == ["large", "xl", "xxl"]
    assert b["golden"] == b["xxl"] and b["proxy"] == b["large"] < b["xl"] < b["xxl"]
    assert 2 * b["xxl"] <= m["xxl"] <= 2 * b["xxl"] + 64  # mu and nu, and Adam's count
    what, size = r["exact KL (policy + reference) xxl"]
    assert what == "golden PM, proxy PM, SFT large, SFT xl, Adam moments xxl"
    assert size == b["golden"] + b["proxy"] + b["large"] + b["xl"] + m["xxl"]
    assert r["SFT step large"] == ["large initial", b["large"]]
    what, size = r["SFT step xxl"]
    assert what == "golden PM, proxy PM, SFT large, SFT xl, xxl initial"
    assert r["IPO step xl"][0] == "golden PM, proxy PM, SFT large, SFT xl (reference)"
    what, size = r["sampling (evaluation batch) large"]  # a semi-online run holds a copy
    assert what == (
        "golden PM, proxy PM, Adam moments large, SFT large (reference), "
        "policy large sampling copy (semi-online)"
    )
    assert size == b["golden"] + 3 * b["large"] + m["large"]
    assert r["PM train step (both orders) golden"] == [
        "golden PM initial, golden PM best, SFT large",
        2 * b["golden"] + b["large"],
    ]
    what, size = r["PM judgement (both orders) golden"]
    assert what == "proxy PM, SFT large, SFT xl, policy xxl, Adam moments xxl, SFT xxl (reference)"
    assert size == b["proxy"] + b["large"] + b["xl"] + 2 * b["xxl"] + m["xxl"]
    what, size = r["PM judgement (both orders) proxy"]  # inside XXL's online run
    assert what == "golden PM, SFT large, SFT xl, policy xxl, Adam moments xxl, SFT xxl (reference)"
    assert size == b["golden"] + b["large"] + b["xl"] + 2 * b["xxl"] + m["xxl"]
    assert r["not in the study"].startswith("policy size 'base' is not one the study runs")


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
        limit = 0.005 * 2**30
        assert p["with_beside"] == p["total"] + p["beside"] and p["beside"] > 0, p
        if p["total"] > limit:
            verdict = "DOES NOT FIT"
        else:
            verdict = "fits alone only" if p["with_beside"] > limit else "fits"
        assert line.endswith(verdict) and p["verdict"] == verdict, line
    assert any(line.endswith("DOES NOT FIT") for line in lines)
    assert any(line.endswith("   fits") for line in lines)


_LIVE_SCRIPT = """
import dataclasses, json, sys
sys.path.insert(0, "experiments")
import jax
import numpy as np
import memory_plan as mp
from ipo_gap import eval as evaluation
from ipo_gap import sharding, study_experiments
from ipo_gap.study import PRESETS
from ipo_gap.study_runs import Study
from ipo_gap.train import trainers

seen = {"kl": {}, "validation": {}, "win": {}}

def copies(rows):  # d_model -> live float32 arrays shaped like an embedding of `rows`
    out = {}
    for a in jax.live_arrays():
        if a.ndim == 2 and a.shape[0] == rows and a.dtype == np.float32:
            out[a.shape[1]] = out.get(a.shape[1], 0) + 1
    return out

def hook(module, name, kind):
    orig = getattr(module, name)
    def wrapped(model, *args, **kwargs):
        now, d = copies(model.embedding.shape[0]), str(model.cfg.d_model)
        if now not in seen[kind].setdefault(d, []):  # every distinct set of copies
            seen[kind][d].append(now)
        return orig(model, *args, **kwargs)
    setattr(module, name, wrapped)

hook(evaluation, "kl_rows", "kl")
hook(trainers, "pm_accuracy", "validation")
hook(evaluation, "judge_rows", "win")  # win rates and E.1 labels, inside the runs
cfg = dataclasses.replace(PRESETS["micro"], golden_model="toy-m")
study_experiments.run_all(Study(sys.argv[1], cfg), jobs=0)
held = mp.Beside(cfg, sharding.make_mesh("data:1"))
want = {"kl": {}, "validation": {}, "win": {}}
for size in held.order:  # exact KL: the policy and its reference are its arguments
    plan = mp.Plan("exact KL (policy + reference)", size, 0, 0, 0, 0, 0.0)
    d = str(cfg.preset_model(size, 8).d_model)
    want["kl"][d] = held.add(plan, size).beside + 2 * held.bytes[size]
for pm, m in (("golden", cfg.golden_model), ("proxy", cfg.policy_model)):
    d = str(cfg.preset_model(m, 8).d_model)  # the PM in training is the argument
    want["validation"][d] = sum(b for _, b in held._pm_training(pm, moments=True))
    want["validation"][d] += held.bytes[pm]
    plan = mp.Plan("PM judgement (both orders)", pm, cfg.eval_batch, 0, 0, 0, 0.0)
    want["win"][d] = held.add(plan, pm).beside + held.bytes[pm]
size_bytes = {str(cfg.preset_model(m, 8).d_model): held.bytes[m] for m in held.order}
print(json.dumps({"seen": seen, "want": want, "size_bytes": size_bytes}))
"""


@pytest.mark.slow  # a micro study in one process: about 3 minutes on 2 cores
def test_beside_is_what_a_one_process_study_holds(tmp_path):
    """`Beside` against the live arrays of a micro study run in one process (as on an
    accelerator): at the fullest exact KL of each policy size's runs, the fullest validation
    of each PM and its fullest judgement of a run's samples, the copies of each model alive
    (counted by their embedding arrays; Adam's moments are two) weigh what the plan's
    arguments and `Beside` say (golden PM toy-m, policies toy-s and toy-m: a variant's runs
    hold the main size's SFT policy, and the main size's semi-online run its sampling copy).
    Two online checkpoints that Fig. 5's datasets had loaded stayed cached through every
    later run until this test found them."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _LIVE_SCRIPT, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    size_bytes = r["size_bytes"]
    for kind in ("kl", "validation", "win"):
        assert sorted(r["seen"][kind]) == sorted(r["want"][kind]), r
        for d, want in r["want"][kind].items():  # the fullest moment of each
            got = max(
                sum(n * size_bytes[str(e)] for e, n in now.items()) for now in r["seen"][kind][d]
            )
            assert abs(got - want) <= 64, (kind, d, r["seen"][kind][d], got, want)  # Adam's count
