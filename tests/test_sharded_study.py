"""The study on a device mesh (`StudyConfig.mesh`, reproduce.py --mesh) = the study on one device.

A micro study runs SFT, the golden and proxy PMs, D_golden, the golden baseline and the online
IPO run with its evaluations twice in one 8-device subprocess: once on one device, once with
every model sharded over "data:4,model:2" and every batch over "data". Losses, evaluations
and the data-order log must agree up to float summation order, and the sharded models must
really be split over "model".
"""

import pytest
from conftest import run_with_devices

_SCRIPT = r"""
import dataclasses, hashlib, json, pathlib, sys, tempfile
import jax, numpy as np
sys.path.insert(0, "experiments")
import reproduce
from ipo_gap import sharding, study_experiments
from ipo_gap.data.order_log import OrderLog
from ipo_gap.study_runs import Study

def go(workdir, mesh):
    cfg = dataclasses.replace(reproduce.config("micro"), sft_steps=20, pm_steps=20, mesh=mesh)
    study = Study(workdir, cfg)
    with sharding.use_mesh(study.mesh):
        run = study_experiments._online(study, "ipo", "online_ipo")
        sft = study.sft()
        _, golden = study.golden_pm()
    read = lambda p: [json.loads(line) for line in open(p)]
    specs = [str(x.sharding.spec) if hasattr(x.sharding, "spec") else "single"
             for x in jax.tree.leaves(sft) + jax.tree.leaves(golden)]
    log = OrderLog.open(workdir / "runs" / "online_ipo" / "log")
    return {
        "sft": [r["loss"] for r in read(workdir / "sft" / "metrics.jsonl")],
        "golden": [r["loss"] for r in read(workdir / "golden_pm" / "metrics.jsonl") if "loss" in r],
        "proxy": [r["loss"] for r in read(workdir / "proxy_pm" / "metrics.jsonl") if "loss" in r],
        "online": run["losses"],
        "evals": run["evals"],
        "on_model": sum("model" in s for s in specs),
        "num_params": len(specs),
        "log_tokens": [
            hashlib.sha256(b"".join(np.asarray(b[f]).tobytes() for f in ("prompt", "y_w", "y_l")))
            .hexdigest() for _, b in log.iter_steps()
        ],
        "fallbacks": sharding.sharding_fallbacks(sft, mesh and sharding.make_mesh(mesh))
        if mesh else [],
    }

tmp = pathlib.Path(tempfile.mkdtemp())
one = go(tmp / "one", None)
meshed = go(tmp / "mesh", "data:4,model:2")

# The placement helpers themselves, and a killed SFT resumed on the mesh.
sys.path.insert(0, "tests")
from conftest import tiny_config
from ipo_gap.train.trainers import train_sft
rng = np.random.default_rng(0)
data = {f: rng.integers(3, 60, (32, 6)).astype(np.int32) for f in ("src", "tgt")}
data.update(src_mask=np.ones((32, 6), np.int32), tgt_mask=np.ones((32, 6), np.int32))
mesh = sharding.make_mesh("data:4,model:2")
with sharding.use_mesh(mesh):
    placed = {
        "batch": str(sharding.to_device(np.zeros((8, 3), np.int32)).sharding.spec),
        "odd_batch": str(sharding.to_device(np.zeros((3, 3), np.int32)).sharding.spec),
        "lm_head": str(sharding.init_model(tiny_config(), key=jax.random.key(0))
                       .lm_head.sharding.spec),
    }
    start = sharding.init_model(tiny_config(), key=jax.random.key(1))
    kw = dict(batch_size=8, learning_rate=1e-2, seed=0)
    want, _ = train_sft(start, data, num_steps=4, **kw)
    ck = dict(checkpoint_dir=tmp / "sft_state", checkpoint_every=2, metrics_path=tmp / "m.jsonl")
    train_sft(start, data, num_steps=3, **kw, **ck)
    got, _ = train_sft(start, data, num_steps=4, **kw, **ck)
    resume_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                      for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)))
    resumed_spec = str(got.lm_head.sharding.spec)
print(json.dumps({"one": one, "mesh": meshed, "devices": jax.device_count(), "placed": placed,
                  "resume_diff": resume_diff, "resumed_spec": resumed_spec}))
"""


def _rel(a, b):
    return abs(a - b) / max(1.0, abs(a))


@pytest.mark.slow  # two micro pipelines in an 8-device subprocess: ~4 min on 2 CPUs
def test_a_study_on_a_mesh_equals_the_study_on_one_device():
    res = run_with_devices(_SCRIPT, num_devices=8, timeout=900)
    one, mesh = res["one"], res["mesh"]
    assert res["devices"] == 8
    # Really sharded: the unsharded models hold no mesh axis, the sharded ones split their
    # attention, MLP and vocabulary weights over "model".
    assert one["on_model"] == 0
    assert mesh["on_model"] >= mesh["num_params"] // 3, mesh
    # Replicated only where the vocabulary (the trained tokenizer's) does not divide "model".
    assert all("vocab=" in f for f in mesh["fallbacks"]), mesh["fallbacks"]
    # Batches go over "data" (replicated when they do not divide); models over "model".
    assert res["placed"] == {
        "batch": "P('data', None)",
        "odd_batch": "P()",
        "lm_head": "P(None, 'model')",
    }, res["placed"]
    # A killed SFT resumes on the mesh (Adam's step count restored onto it, not one device)
    # and ends where the uninterrupted run does, still sharded.
    assert res["resume_diff"] <= 1e-6, res["resume_diff"]
    assert res["resumed_spec"] == "P(None, 'model')"
    for key in ("sft", "golden", "proxy", "online"):
        assert len(one[key]) == len(mesh[key]) > 0, key
        # Measured: SFT 5e-7, PMs 2e-7, online IPO 9e-6 (relative; IPO losses are ~25).
        worst = max(_rel(a, b) for a, b in zip(one[key], mesh[key], strict=True))
        assert worst < 1e-4, (key, worst)
    # The online stream (sampled by the sharded policy, judged by the sharded proxy PM) is the
    # same token for token.
    assert one["log_tokens"] == mesh["log_tokens"]
    assert len(one["evals"]) == len(mesh["evals"]) >= 2
    for e1, e2 in zip(one["evals"], mesh["evals"], strict=True):
        assert e1["step"] == e2["step"]
        # Win rates and accuracies count discrete outcomes on the same samples.
        for k in ("win_rate", "accuracy", "self_accuracy", "response_tokens"):
            assert e1[k] == e2[k], (e1["step"], k, e1[k], e2[k])
        for k in ("kl", "drift"):
            assert abs(e1[k] - e2[k]) <= 1e-4 * max(1.0, abs(e1[k])), (k, e1[k], e2[k])
