"""The study end to end at the micro preset, plus unit checks of eval and report helpers.

The end-to-end tests (marked slow: they run in CI, not in the default run) run
experiments/reproduce.py's `run` into a temporary workdir as its command line does by default,
one one-core worker per core (86-110 s as a fixture on the 2-core AMD VM, mostly compilation
of two policy sizes; in one process about 160 s on its own, as `--seeds` runs below). Then they
check every artefact, that the exact-order replays equal their online runs bit for bit, that
evaluation numbers are internally consistent, that a re-run skips every finished stage, and
that `--seeds` writes SEEDS.md from one study per seed.
"""

import dataclasses
import json
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_config

from ipo_gap import eval as evaluation
from ipo_gap import report, seeds, study, study_runs
from ipo_gap.data import sources
from ipo_gap.determinism import tree_max_abs_diff
from ipo_gap.study import load_model

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))

FIGURES = (
    "fig1_online_vs_offline.png",
    "fig4_13_replay_and_shuffle.png",
    "fig5_12_datasets.png",
    "fig6_7_8_classification.png",
    "fig9_best_of_2.png",
    "beyond_semi_online_hypo.png",
    "fig10_11_scaling.png",
    "fig10_sizes.png",
    "goodhart_proxy_vs_golden.png",
    "hidden_humans.png",
)


@pytest.fixture(scope="module")
def micro_study(tmp_path_factory):
    import reproduce

    workdir = tmp_path_factory.mktemp("micro")
    reproduce.run(workdir, "micro", jobs=reproduce.default_jobs(None))  # the CLI's default
    return workdir


def _summary(workdir, name):
    return json.loads((workdir / "runs" / name / "done.json").read_text())


def test_prompts_are_cut_to_the_longest_prompt():
    rng = np.random.default_rng(0)

    def prompts(n, longest):
        lengths = rng.integers(1, longest + 1, n)
        lengths[0] = longest
        mask = (np.arange(8)[None, :] < lengths[:, None]).astype(np.int32)
        return {"prompt": rng.integers(3, 50, (n, 8)) * mask, "prompt_mask": mask}

    a, b = prompts(10, 5), prompts(4, 3)
    before = [dict(x) for x in (a, b)]
    assert study._trim_prompts([a, b]) == 5
    for x, old in zip((a, b), before, strict=True):
        assert x["prompt"].shape == x["prompt_mask"].shape == (len(old["prompt"]), 5)
        np.testing.assert_array_equal(x["prompt"], old["prompt"][:, :5])
        assert not old["prompt_mask"][:, 5:].any()
    left_padded = {"prompt": np.ones((1, 3), int), "prompt_mask": np.array([[0, 1, 1]])}
    with pytest.raises(ValueError, match="right-padded"):
        study._trim_prompts([left_padded])


def test_evaluation_keys_are_shared_with_no_stage_of_any_seed():
    """The evaluator draws its win-rate samples, KL samples and self-classification samples
    from split(k)[0], split(k)[1] and fold_in(k, 2) of its purpose key k. None of those equals
    a stage's purpose key or root key, of its own seed or of any other: seeds 6 apart shared
    one when the evaluator's key was key(seed + 6) (its fold_in(., 2) was seed + 6's golden PM
    key), which the last assertion shows."""
    seeds = range(13)

    def bits(key):
        return tuple(np.asarray(jax.random.key_data(key)).tolist())

    stage_keys = {bits(jax.random.key(s)) for s in seeds} | {
        bits(study_runs.purpose_key(s, p)) for s in seeds for p in study_runs.PURPOSES
    }
    drawn = []
    for s in seeds:
        k = study_runs.purpose_key(s, "eval")
        drawn += [bits(k2) for k2 in jax.random.split(k)] + [bits(jax.random.fold_in(k, 2))]
    assert len(set(drawn)) == len(drawn) and not set(drawn) & stage_keys
    old = jax.random.fold_in(jax.random.key(0 + study_runs.PURPOSES["eval"]), 2)
    assert bits(old) == bits(study_runs.purpose_key(6, "golden_pm"))


def test_each_purpose_reads_its_own_data_order():
    """Every purpose of every seed has its own data seed, valid for numpy and jax.random.key;
    before ccf5c32 (2026-12-06) every stage read in `epoch_permutation(seed, ...)` order, so
    the golden PM, the proxy PM and offline IPO on D_golden read the same pairs in the same
    batches."""
    got = {(s, p): study_runs.data_seed(s, p) for s in range(13) for p in study_runs.PURPOSES}
    assert len(set(got.values())) == len(got)
    assert all(0 <= v < 2**31 for v in got.values())
    jax.random.key(max(got.values()))
    first = {
        p: tuple(sources.schedule_indices(study_runs.data_seed(0, p), 0, 32, 4000))
        for p in ("golden_pm", "proxy_pm", "offline")
    }
    assert len(set(first.values())) == 3
    assert first["golden_pm"] != tuple(sources.schedule_indices(0, 0, 32, 4000))


@pytest.mark.slow
def test_every_stage_records_the_order_of_its_purpose(micro_study):
    """SFT, both PMs, the baseline and every policy run record the data seed they read in
    (`study_runs.data_seed`): each stage its purpose's, every offline run (HyPO's pairs too)
    the offline one, which is neither PM's."""
    w, seed = micro_study, 0

    def done(d):
        return json.loads((d / "done.json").read_text())

    assert {done(d)["data_seed"] for d in w.glob("sft*")} == {study_runs.data_seed(seed, "sft")}
    for pm in ("golden_pm", "proxy_pm"):
        assert done(w / pm)["data_seed"] == study_runs.data_seed(seed, pm)
    assert done(w / "baseline")["data"]["seed"] == study_runs.data_seed(seed, "baseline")
    purpose = {"online": "online", "offline": "offline", "shuffled replay": "shuffle"}
    kinds = {}
    for d in sorted(w.glob("runs*/*/")):
        data = done(d)["data"]
        data = data.get("pairs", data)  # HyPO: its offline pairs
        kinds[data["source"]] = kinds.get(data["source"], 0) + 1
        if data["source"] in purpose:
            assert data["seed"] == study_runs.data_seed(seed, purpose[data["source"]]), d
    assert set(kinds) == {*purpose, "log replay"}, kinds
    pm_seeds = {done(w / pm)["data_seed"] for pm in ("golden_pm", "proxy_pm")}
    assert len(pm_seeds) == 2 and study_runs.data_seed(seed, "offline") not in pm_seeds


@pytest.mark.slow
def test_micro_study_artefacts(micro_study):
    w = micro_study
    for f in FIGURES:
        png = w / "figures" / f
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f
    text = (w / "REPORT.md").read_text()
    for f in FIGURES:
        assert f"figures/{f}" in text
    # Every section after the pipeline's (H0-H5 and beyond the paper) ends in a verdict.
    sections = text.split("\n## ")[2:]
    online = json.loads((w / "runs" / "online_ipo" / "done.json").read_text())
    assert all(0 <= e["proxy_win_rate"] <= 1 for e in online["evals"] if e["step"])
    assert "**Over-optimisation (Goodhart):**" in text
    assert len(sections) == 7 and all("**Verdict:**" in sec for sec in sections), [
        sec.splitlines()[0] for sec in sections if "**Verdict:**" not in sec
    ]
    for stage in ("sft", "golden_pm", "proxy_pm", "baseline", "eval_sft", "pipeline"):
        assert (w / stage / "done.json").exists(), stage
    assert (w / "sft_toy-m" / "done.json").exists()  # the second policy size (Fig. 10)
    assert (w / "runs_toy-m" / "shuffled_ipo_uniform" / "done.json").exists()
    assert "| shuffled q90 | shuffled / online [95% BCa bootstrap] |" in text
    assert "Shuffled/online goes from" in text
    cfg = study.PRESETS["micro"]
    for stage, lr in (("golden_pm", cfg.pm_lr_golden), ("proxy_pm", cfg.pm_lr)):
        assert json.loads((w / stage / "done.json").read_text())["learning_rate"] == lr, stage
    assert cfg.pm_lr_golden != cfg.pm_lr
    proxy = json.loads((w / "proxy_pm" / "done.json").read_text())
    assert 0 <= proxy["test_accuracy_vs_golden_labels"] <= 1 and proxy["test_pairs"] > 0
    assert "| proxy PM accuracy vs golden labels (held-out test) |" in text
    assert "| sampled responses containing a PM marker id |" in text
    assert "| code that computed the results | ipo_gap " in text
    pipe = json.loads((w / "pipeline" / "done.json").read_text())
    fj = pipe["feature_judge"]  # the golden PM's reference, on the same labels and test pairs
    assert fj["train_pairs"] == study.PRESETS["micro"].num_train
    assert fj["test_pairs"] == pipe["golden_pm"]["test_pairs"]
    assert (
        "reference: logistic regression on the hidden reward's 8 text features, fit to the same "
        f"human labels (test) | {fj['test_accuracy_vs_hidden_reward']:.3f} vs the hidden reward"
        in text
    )
    prep = study.prepare(w, study.PRESETS["micro"])
    longest = max(
        p["prompt_mask"].sum(1).max() for p in [*prep.pairs.values(), *prep.prompts.values()]
    )
    assert pipe["prompt_width"] == prep.prompt_width == longest <= study.PRESETS["micro"].prompt_len
    assert (w / "runs_toy-m" / "online_ipo" / "done.json").exists()
    runs = sorted(p.name for p in (w / "runs").iterdir())
    assert {
        "online_ipo",
        "tandem_ipo",
        "shuffled_ipo_uniform",
        "online_bo2",
        "offline_bo2",
        "shuffled_bo2_uniform",
        "hypo",
    } <= set(runs)
    for name in runs:
        lines = (w / "runs" / name / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == _summary(w, name)["steps"], name
        assert all(np.isfinite(json.loads(x)["loss"]) for x in lines)


@pytest.mark.slow
def test_pm_test_accuracies_are_the_test_splits_judged_afresh(micro_study):
    """The golden and proxy PMs' held-out accuracies in their done.json equal the test split
    judged here again from the saved models (the study judges it once with the golden PM, in
    d_golden_test.npz, for both)."""
    from ipo_gap.study_runs import Study
    from ipo_gap.train import trainers

    s = Study(micro_study, study.PRESETS["micro"])
    golden_summary, golden = s.golden_pm()
    proxy_summary, proxy = s.proxy_pm()
    test = s.prep.pairs["test"]
    judged = trainers.judge_rows(golden, *study.pm_rows(test).values())
    assert golden_summary["test_accuracy_vs_human_labels"] == float(judged.mean())
    assert golden_summary["test_pairs"] == len(test["prompt"]) == proxy_summary["test_pairs"]
    relabelled = study.relabel(test, judged)
    by_proxy = trainers.judge_rows(proxy, *study.pm_rows(relabelled).values())
    assert proxy_summary["test_accuracy_vs_golden_labels"] == float(by_proxy.mean())
    with np.load(micro_study / "d_golden_test.npz") as z:
        np.testing.assert_array_equal(z["agree_human"], judged)
        np.testing.assert_array_equal(z["y_w"], relabelled["y_w"])


@pytest.mark.slow
def test_the_hidden_humans_judge_every_checkpoint_of_the_embedded_task(micro_study):
    """Every evaluation of an embedded-task study carries the hidden humans' judgement of its
    win-rate samples. The golden baseline's own samples get exactly 1/2 on every prompt, and
    the judge's prompt texts decode from the evaluator's prompt rows in order; the final online
    policy's win-rate samples, drawn again here with the evaluator's key and judged afresh,
    give what its run recorded; the report reads them."""
    from ipo_gap.study_runs import Study
    from ipo_gap.t5 import model as t5

    s = Study(micro_study, study.PRESETS["micro"])
    judge, ev = s.hidden_judge(), s.evaluator()
    p, _ = judge(ev.base_y, ev.base_ym)
    assert p.tolist() == [0.5] * s.cfg.num_eval_prompts
    # The judge's prompt texts are the evaluator's prompt rows, in order (none is truncated
    # at the micro preset), so each response is scored against the prompt it answered.
    assert s.prep.truncated["eval"] == 0
    tok = s.prep.tokenizer
    assert [" ".join(t.split()) for t in tok.decode(ev.eval_x)] == [
        " ".join(t.split()) for t in judge.prompts
    ]
    for done in (micro_study / "runs").glob("*/done.json"):
        for e in json.loads(done.read_text())["evals"]:
            assert len(e["hidden_p"]) == s.cfg.num_eval_prompts, (done, e["step"])
            assert e["hidden_win_lo"] <= e["hidden_win_rate"] <= e["hidden_win_hi"]
    online = _summary(micro_study, "online_ipo")
    policy = load_model(micro_study / "runs" / "online_ipo", s.policy_cfg)
    y, ym = evaluation.sample_rows(
        t5.unstacked(policy),
        ev.eval_x,
        ev.eval_xm,
        key=jax.random.split(ev.key)[0],
        max_len=ev.max_len,
        batch_size=ev.batch_size,
    )
    p, r = judge(y, ym)
    last = online["evals"][-1]
    assert last["hidden_p"] == [round(float(v), 6) for v in p]
    assert last["hidden_reward"] == float(np.mean(r))
    assert len(set(last["hidden_p"])) > 1
    text = (micro_study / "REPORT.md").read_text()
    assert "**The hidden humans**" in text and "figures/hidden_humans.png" in text
    assert (micro_study / "figures" / "hidden_humans.png").stat().st_size > 0


@pytest.mark.slow
def test_exact_replays_equal_the_online_runs(micro_study):
    """The exact-order replay is the online run, bit for bit; Fig. 9's Best-of-2 "tandem" is
    the paper's D_online-shuffled (the online Bo2 stream uniformly shuffled), which is not."""
    t, o = _summary(micro_study, "tandem_ipo"), _summary(micro_study, "online_ipo")
    assert t["max_param_diff_to_online"] == 0.0
    assert t["param_leaves_differing_in_bits"] == 0 and t["first_param_leaf_differing"] is None
    assert t["max_loss_dev_to_online"] == 0.0
    assert t["losses"] == o["losses"]
    # Same parameters -> same evaluations, bit for bit. The online runs' checkpoints are
    # also judged by their proxy PM (proxy_win_*), which the replays do not measure.
    assert all("proxy_win_rate" in e for e in o["evals"][1:])
    proxy_free = [{k: v for k, v in e.items() if not k.startswith("proxy_")} for e in o["evals"]]
    assert t["evals"] == proxy_free
    text = (micro_study / "REPORT.md").read_text()
    assert "bit-identical" in text
    sh, bo2 = _summary(micro_study, "shuffled_bo2_uniform"), _summary(micro_study, "online_bo2")
    assert sh["method"] == report.SHUFFLED_BO2 and len(sh["losses"]) == len(bo2["losses"])
    assert sh["max_param_diff_to_online"] > 0 and sh["losses"] != bo2["losses"]
    assert "shuffled Bo2" in text.split("## H4")[1]


@pytest.mark.slow
def test_a_shuffle_of_the_sweep_trains_at_its_own_lr_and_beta(micro_study):
    """A uniformly shuffled replay of the lr x beta sweep (micro's grid is one point, so one is
    run here by hand) trains at its own beta, where `shuffled_ipo_uniform` trains at online's,
    and the H1 verdict pools the two."""
    from ipo_gap import study_experiments as se
    from ipo_gap.study_runs import Study

    s = Study(micro_study, study.PRESETS["micro"])
    name = f"shuffled_ipo_uniform_lr{s.cfg.rl_lr:g}_b0.5"
    try:
        r = se._replay(s, "online_ipo", name, se.UNIFORM_SWEEP, "ipo", s.cfg.rl_steps, beta=0.5)
    finally:  # not a stage of the micro study: the task-graph test lists the fixture's stages
        shutil.rmtree(micro_study / "runs" / name, ignore_errors=True)
    same = _summary(micro_study, "shuffled_ipo_uniform")
    assert (r["lr"], r["beta"], same["beta"]) == (s.cfg.rl_lr, 0.5, s.cfg.rl_beta)
    # IPO's loss at step 0 (policy = reference) is (1/(2 beta))^2 per pair, on any batch.
    assert r["losses"][0] == pytest.approx(1.0) and same["losses"][0] == pytest.approx(25.0)
    assert r["max_param_diff_to_online"] > 0
    p_on = report.peak([_summary(micro_study, "online_ipo")])
    lines = report._uniform_verdict([same, r], p_on)
    assert len(lines) == 2 and lines[1].startswith("Pooled over 2 uniformly shuffled runs")


@pytest.mark.slow
def test_goodhart_binary_continues_the_online_run_and_judges_by_both_pms(micro_study):
    """experiments/goodhart_long_online.py runs online IPO longer on a finished study's
    pipeline. At the study's lr and beta it draws the same prompts with the same keys, so its
    first rl_steps losses are the online run's bit for bit (it runs on one core, as the
    study's workers did); at another beta it departs at step 0, where IPO's loss is
    (1/(2 beta))^2. Every checkpoint is judged by both PMs, and the run is a stage of its own
    that a rerun reads back."""
    import os

    cfg = study.PRESETS["micro"]
    steps = 2 * cfg.rl_steps
    one_core = {min(os.sched_getaffinity(0))}
    script = pathlib.Path(__file__).resolve().parents[1] / "experiments/goodhart_long_online.py"
    names = [f"goodhart_ipo_lr{cfg.rl_lr:g}_b{b:g}_n{steps}" for b in (cfg.rl_beta, 0.5)]
    betas = f"--betas={cfg.rl_beta:g},0.5"

    argv = [str(script), f"--workdir={micro_study}", betas, f"--steps={steps}", "--evals=2"]
    pinned = (  # one core before JAX is imported, as `parallel`'s workers pin themselves
        f"import os, runpy, sys; os.sched_setaffinity(0, {one_core}); sys.argv = {argv}; "
        f"runpy.run_path(sys.argv[0], run_name='__main__')"
    )

    def run():
        return subprocess.run([sys.executable, "-c", pinned], capture_output=True, text=True)

    try:
        out = run()
        assert out.returncode == 0, out.stderr[-3000:]
        same, _, other = out.stdout.partition(names[1])
        assert f"its first {cfg.rl_steps} steps' losses equal the study's online run's" in same
        assert "departs from the study's online run at step 0 (loss 1.0 against 25.0" in other
        assert cfg.rl_beta == 0.1  # (1/(2 beta))^2 = 25 at step 0; beta 0.5 gives 1
        for name in names:
            r = _summary(micro_study, name)
            assert [e["step"] for e in r["evals"]] == [0, steps // 2, steps]
            for e in r["evals"][1:]:
                assert 0 <= e["proxy_win_lo"] <= e["proxy_win_rate"] <= e["proxy_win_hi"] <= 1
            assert len(r["losses"]) == steps
            assert (micro_study / "figures" / f"{name}.png").stat().st_size > 0
        # The hidden humans' verdict on the final policies, for the embedded task.
        table = out.stdout.split("the hidden humans' verdict")[1].splitlines()[2:]
        assert [line.split(":")[0].strip() for line in table] == [
            "SFT (step 0)",
            "the study's online_ipo (final)",
            *names,
        ]
        for line in table:
            mean, lo, hi = (
                float(x) for x in re.findall(r"(\d\.\d+) \[(\d\.\d+), (\d\.\d+)\]", line)[0]
            )
            assert 0 <= lo <= mean <= hi <= 1
        assert ", 0.000 [0.000, 0.000], R " in table[0]  # the SFT policy minus itself
        again = run()  # finished stages are read back, not trained again
        assert again.returncode == 0 and "step 1/" not in again.stdout + again.stderr

        def printed(o):  # the binary's report, without progress and stage lines ("[name] ...")
            return [line for line in o.stdout.splitlines() if not line.startswith("[")]

        assert printed(again) == printed(out)
    finally:  # not stages of the micro study: the task-graph test lists the fixture's stages
        for name in names:
            shutil.rmtree(micro_study / "runs" / name, ignore_errors=True)
            (micro_study / "figures" / f"{name}.png").unlink(missing_ok=True)


class _KilledAt:
    """An online source that dies at `step` (a stand-in for a killed job)."""

    def __init__(self, source, step):
        self.source, self.step = source, step

    def batch(self, step, policy=None):
        if step == self.step:
            raise KeyboardInterrupt(f"killed at step {step}")
        return self.source.batch(step, policy)


@pytest.mark.slow
def test_a_killed_run_resumes_inside_the_run(micro_study):
    """With checkpoint_every, a run killed mid-way continues from its last train state and ends
    bit for bit where an uninterrupted run ends: parameters, losses, evaluations, data log."""
    from ipo_gap.data.order_log import OrderLog
    from ipo_gap.study_runs import Study

    s = Study(micro_study, dataclasses.replace(study.PRESETS["micro"], checkpoint_every=2))
    _, proxy = s.proxy_pm()
    kw = {"method": "online ipo", "log": True}
    whole = s.policy_run("resume_whole", source_fn=lambda: s.online_source(proxy), **kw)
    with pytest.raises(KeyboardInterrupt):  # dies at step 5: train state of step 4 kept
        s.policy_run("resume_cut", source_fn=lambda: _KilledAt(s.online_source(proxy), 5), **kw)
    d = micro_study / "runs" / "resume_cut"
    assert not (d / "done.json").exists() and (d / "train_state").exists()
    assert len(OrderLog.open(d / "log")) == 5  # steps 0..4 logged: one past the train state
    lr = s.cfg.rl_lr * 2  # the same run under another learning rate: refused, nothing changed
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"run with other settings \(lr: 0.0003 then, 0.0006 now"):
        s.policy_run("resume_cut", source_fn=lambda: s.online_source(proxy), lr=lr, **kw)
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    with open(d / "metrics.jsonl", "a") as f:  # a kill during an append cuts the last line
        f.write('{"step": 5, "lo')
    cut = s.policy_run("resume_cut", source_fn=lambda: s.online_source(proxy), **kw)
    assert cut["losses"] == whole["losses"] and len(cut["losses"]) == s.cfg.rl_steps
    assert cut["evals"] == whole["evals"]
    a = load_model(micro_study / "runs" / "resume_whole", s.policy_cfg)
    b = load_model(d, s.policy_cfg)
    assert tree_max_abs_diff(a, b) == 0.0
    la, lb = OrderLog.open(micro_study / "runs" / "resume_whole" / "log"), OrderLog.open(d / "log")
    assert len(la) == len(lb) == s.cfg.rl_steps and la.hash(len(la) - 1) == lb.hash(len(lb) - 1)
    assert not (d / "train_state").exists()  # a finished run drops its train states


@pytest.mark.slow
def test_a_killed_golden_baseline_resumes_from_its_train_state(micro_study, tmp_path, monkeypatch):
    """With checkpoint_every, the golden baseline (the paper preset's longest online run)
    continues from its train state after a kill, and ends with the same samples, bit for
    bit, as an uninterrupted baseline run in this same process. (Not the fixture's own
    baseline: that one trained in a worker pinned to one core, and XLA splits work by its
    thread count, which on some CPUs moves the last bits: on an AMD EPYC Zen 3 this test's
    process wrote step 3's loss 23.241774 where the worker wrote 23.241764.)"""
    from ipo_gap.study_runs import Study

    work = tmp_path / "w"
    shutil.copytree(micro_study, work, ignore=shutil.ignore_patterns("baseline", "runs*"))
    cfg = dataclasses.replace(study.PRESETS["micro"], checkpoint_every=2)
    uninterrupted = tmp_path / "u"
    shutil.copytree(work, uninterrupted)
    Study(uninterrupted, cfg).baseline()
    real = Study.online_source
    monkeypatch.setattr(
        Study,
        "online_source",
        lambda self, pm, purpose="online": _KilledAt(real(self, pm, purpose), 3),
    )
    with pytest.raises(KeyboardInterrupt):  # dies at step 3: the train state of step 2 kept
        Study(work, cfg).baseline()
    d = work / "baseline"
    assert (d / "train_state").exists() and not (d / "done.json").exists()
    monkeypatch.setattr(Study, "online_source", real)
    Study(work, cfg).baseline()
    assert not (d / "train_state").exists()
    whole = uninterrupted / "baseline"
    for name in ("y", "y_mask"):
        with np.load(d / "samples.npz") as a, np.load(whole / "samples.npz") as b:
            np.testing.assert_array_equal(a[name], b[name])
    losses = lambda p: [r["loss"] for r in map(json.loads, p.read_text().splitlines())]  # noqa: E731
    assert losses(d / "metrics.jsonl") == losses(whole / "metrics.jsonl")
    assert json.loads((d / "done.json").read_text()) == json.loads(
        (whole / "done.json").read_text()
    )


@pytest.mark.slow
def test_a_run_whose_loss_turns_nan_is_never_evaluated_at_that_step(micro_study):
    """The loop reads a step's loss one step later; the study checks it itself before it
    evaluates or keeps a policy, so no evaluation of a NaN policy is written."""
    from ipo_gap import study_experiments
    from ipo_gap.study_runs import Study
    from ipo_gap.train import loop as train_loop

    s = Study(micro_study, study.PRESETS["micro"])
    assert s.eval_steps(4)[0] == 2  # step 1 is the first NaN step, and it is evaluated
    with pytest.raises(train_loop.NonFiniteLossError, match="at step 1; stopped before eval"):
        s.policy_run(
            "nan_run",
            method="offline ipo",
            lr=float("nan"),
            num_steps=4,
            source_fn=study_experiments._on_d_golden(s),
        )
    d = micro_study / "runs" / "nan_run"
    assert not (d / "evals.jsonl").exists() or not (d / "evals.jsonl").read_text().strip()


@pytest.mark.slow
def test_the_training_pairs_of_fig8_are_the_first_pairs_offline_reads(micro_study):
    """The classifier's D_golden training pairs are the pairs the offline runs on D_golden
    (the sweep, Bo2, HyPO) are served in their first steps, in order, so that every offline
    checkpoint after those steps has trained on all of them; and they are not the valid
    split's pairs."""
    from ipo_gap import study_experiments as se
    from ipo_gap.study_runs import Study

    s = Study(micro_study, study.PRESETS["micro"])
    ev, source = s.evaluator(), se._on_d_golden(s)()
    n, b = study.PRESETS["micro"].num_acc_pairs, source.batch_size
    served = [source.batch(t) for t in range(-(-n // b))]
    for f in sources.PAIR_FIELDS:
        want = np.concatenate([batch[f] for batch in served])[:n]
        np.testing.assert_array_equal(ev.train_pairs[f], want)
    assert not np.array_equal(ev.train_pairs["y_w"], ev.pairs["y_w"])
    # A random sample of D_golden, not its first rows (the first offline steps' draw).
    assert not np.array_equal(ev.train_pairs["y_w"], s.d_golden()["train"]["y_w"][:n])


@pytest.mark.slow
def test_training_pairs_measured_afterwards_equal_the_evaluations(
    micro_study, tmp_path, monkeypatch
):
    """experiments/classify_training_pairs.py (`study_experiments.classify_final_training_pairs`),
    for studies of code whose evaluations lacked D_golden's training pairs, measures the final
    policies of online IPO and of the offline run at online's lr and beta: on a study that
    recorded them it must give the recorded numbers bit for bit. It runs as its docstring
    says, pinned to one core as the study's workers were (a two-thread process may round
    differently: see the README's "Bits"), here over two seeds' workdirs that are both the
    micro study. It refuses a policy whose valid-split results differ from the recorded ones."""
    from ipo_gap import parallel
    from ipo_gap import study_experiments as se

    for seed in (0, 1):
        (tmp_path / f"seed_{seed}").symlink_to(micro_study)
    binary = "experiments/classify_training_pairs.py"
    argv = [binary, f"--workdir={tmp_path}", "--seeds=0,1", f"--out={tmp_path / 'out.json'}"]
    pinned = (  # the taskset of the binary's docstring, without needing taskset
        f"import os, runpy, sys; os.sched_setaffinity(0, {{{parallel.cores()[0]}}}); "
        f"sys.argv = {argv!r}; runpy.run_path({binary!r}, run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", pinned],
        cwd=pathlib.Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = json.loads((tmp_path / "out.json").read_text())
    got = both["0"]
    assert both["1"] == got
    online = _summary(micro_study, "online_ipo")
    sweep = [_summary(micro_study, p.name) for p in (micro_study / "runs").glob("offline_ipo_lr*")]
    offline = report.offline_same(sweep, online)
    assert got["offline"]["run"] == offline["name"] != "online_ipo"
    for label, run in (("online", online), ("offline", offline)):
        last = run["evals"][-1]
        for k in ("train_accuracy", "train_drift", "train_accuracy_outcomes"):
            assert got[label][k] == last[k], (label, k)
    d = evaluation.paired_difference(
        offline["evals"][-1]["train_accuracy_outcomes"],
        online["evals"][-1]["train_accuracy_outcomes"],
    )
    assert got["difference"] == [d.mean, d.lo, d.hi, d.n]
    sign = report.interval_sign(d)
    assert (
        f"over 2 seeds: offline - online {seeds.spread([d.mean, d.mean]).cell()} (mean, "
        f"Student-t 95%); separated offline's way in {2 * (sign > 0)}, online's in "
        f"{2 * (sign < 0)}" in proc.stdout
    )
    # A recorded result the final policy does not reproduce: refused, nothing measured.
    real = se._run_summary

    def altered(workdir, name):
        out = real(workdir, name)
        if name == "online_ipo":
            text = out["evals"][-1]["accuracy_outcomes"]
            flipped = {"W": "L", "L": "W", "T": "W"}[text[0]]
            out["evals"][-1]["accuracy_outcomes"] = flipped + text[1:]
        return out

    monkeypatch.setattr(se, "_run_summary", altered)
    with pytest.raises(se.NotReproduced, match="online_ipo: its final policy classifies"):
        se.classify_final_training_pairs(micro_study)


@pytest.mark.slow
def test_evaluations_are_consistent(micro_study):
    sft = json.loads((micro_study / "eval_sft" / "done.json").read_text())
    assert sft["kl"] == 0.0  # KL of the reference against itself is exactly 0
    assert sft["accuracy"] == 0.5 and sft["drift"] == 0.0  # f = 0 for pi = pi_sft: all ties
    assert sft["self_accuracy"] == 0.5  # the same holds on the policy's own samples
    assert sft["train_accuracy"] == 0.5 and sft["train_drift"] == 0.0  # D_golden's own pairs
    # Fig. 6: every run's k-th checkpoint is measured on the same stream window k; the proxy
    # PM's accuracy there is a property of the window, so it is equal across runs.
    online = _summary(micro_study, "online_ipo")["evals"][1:]
    offline = _summary(micro_study, "offline_bo2")["evals"][1:]
    assert len(online) == len(offline) == 2
    for a, b in zip(online, offline, strict=True):
        assert a["stream_proxy_accuracy"] == b["stream_proxy_accuracy"]
        assert a["stream_step"] == b["stream_step"] == a["step"]
        assert 0.0 <= a["stream_accuracy"] <= 1.0 and 0.0 <= b["self_accuracy"] <= 1.0
    # The offline sweep runs longer than online: its k-th checkpoint, at a later step of its
    # own, is measured on (and plotted at) window k, which ends at online's k-th step.
    sweep = next(micro_study.glob("runs/offline_ipo_lr*"))
    longer = _summary(micro_study, sweep.name)["evals"][1:]
    assert [e["stream_step"] for e in longer] == [e["step"] for e in online]
    assert all(e["step"] > e["stream_step"] for e in longer)
    # The offline runs on D_golden share one cache of the reference's log-probs.
    assert (micro_study / "ref_cache" / "d_golden.npz").exists()
    assert (micro_study / "ref_cache_toy-m" / "d_golden.npz").exists()
    for name in ("online_ipo", "offline_bo2", "hypo"):
        for e in _summary(micro_study, name)["evals"]:
            assert 0.0 <= e["win_lo"] <= e["win_rate"] <= e["win_hi"] <= 1.0
            # The per-prompt outcomes behind the win rate (the report pairs checkpoints on them).
            assert len(e["win_outcomes"]) == e["win_n"]
            assert e["win_rate"] == evaluation.outcome_values(e["win_outcomes"]).mean()
            assert e["kl"] >= 0.0 and 0.0 <= e["accuracy"] <= 1.0
            # The classifier on as many of D_golden's training pairs as of the valid split.
            train = e["train_accuracy_outcomes"]
            assert len(train) == len(e["accuracy_outcomes"]) == study.PRESETS["micro"].num_acc_pairs
            assert e["train_accuracy"] == evaluation.outcome_values(train).mean()


@pytest.mark.slow
def test_rerun_skips_finished_stages(micro_study, capsys):
    import reproduce

    before = (micro_study / "runs" / "online_ipo" / "done.json").read_text()
    reproduce.run(micro_study, "micro")
    out = capsys.readouterr().out
    assert "[online_ipo] done already: skipped" in out and "[baseline] done already" in out
    assert "[sft] step" not in out and "first step, with compilation" not in out  # no training
    assert (micro_study / "runs" / "online_ipo" / "done.json").read_text() == before
    with pytest.raises(ValueError, match="another configuration"):
        reproduce.run(micro_study, "micro", seed=99)


@pytest.mark.slow  # one more micro study, in one process (~2.7 min on 2 cores); seed 0 is copied
def test_reproduce_seeds_runs_one_study_per_seed(micro_study, tmp_path):
    import reproduce

    shutil.copytree(micro_study, tmp_path / "many" / "seed_0")
    path = reproduce.run_seeds(tmp_path / "many", "micro", [0, 1])
    text = path.read_text()
    diffs = {}
    for s in (0, 1):
        d = tmp_path / "many" / f"seed_{s}"
        assert json.loads((d / "study_config.json").read_text())["seed"] == s
        assert (d / "REPORT.md").exists()
        runs = {p.parent.name: json.loads(p.read_text()) for p in (d / "runs").glob("*/done.json")}
        offline = [r for n, r in runs.items() if n.startswith("offline_ipo_lr")]
        diffs[s] = report.peak([runs["online_ipo"]]).win - report.peak(offline).win
        assert f"| {s} |" in text and f"{diffs[s]:+.3f}" in text
    assert f"| online - offline | {seeds.spread(list(diffs.values())).cell()} |" in text
    # Every paired finding of the micro study, per seed (the README's results table reads it).
    assert "## Every paired finding, per seed and over seeds" in text
    for label in ("(Fig. 1): online - offline | 0: ", "HyPO - online | 0: "):
        assert label in text, label
    assert (
        "The exact-order replay against the online run (Fig. 3-4): bit-identical at seed(s) 0, 1."
        in text
    )
    with pytest.raises(ValueError, match="a seed twice"):
        reproduce.run_seeds(tmp_path / "many", "micro", [1, 1])


@pytest.mark.slow
def test_the_task_graph_holds_every_stage(micro_study):
    """`study_experiments.tasks` (the --jobs graph) names every stage that the run made, and
    nothing else: a stage missing from it would run in the parent's gathering pass, outside
    the workers (and still leave its done.json, so this catches it)."""
    from ipo_gap import parallel, study_experiments
    from ipo_gap.study_runs import Study

    s = Study(micro_study, study.PRESETS["micro"])
    tasks = study_experiments.tasks(s)
    parallel.check_graph(tasks)
    stages = {
        str(p.parent.relative_to(micro_study))
        for p in micro_study.rglob("done.json")
        if not p.parent.name.startswith("resume_")  # made by test_a_killed_run_...
    }
    files = {"d_golden", "ref_cache", "ref_cache_toy-m"}  # tasks that write files, not stages
    assert {t.name for t in tasks} - files == stages
    assert (micro_study / "ref_cache_toy-m").is_dir()
    assert (micro_study / "d_golden_train.npz").exists()


@pytest.mark.slow
def test_selected_experiments_run_only_what_they_need(micro_study, tmp_path):
    """A per-figure binary (`reproduce.only`, --experiments) runs the pipeline, Fig. 1's runs
    and its own, with every stage they wait for; its report says what is missing."""

    from ipo_gap import parallel, study_experiments
    from ipo_gap.study_runs import Study

    s = Study(micro_study, study.PRESETS["micro"])
    every = {t.name for t in study_experiments.tasks(s)}
    fig5 = study_experiments.tasks(s, ["fig5"])
    parallel.check_graph(fig5)  # closed: every dependency is in the selection
    names = {t.name for t in fig5}
    want = {f"runs/{n}" for n, _ in study_experiments.fig5_runs(s) + study_experiments.fig1_runs(s)}
    assert want <= names and {"pipeline", "golden_pm", "proxy_pm", "baseline"} <= names
    assert not {n for n in names if "tandem" in n or "bo2" in n or "hypo" in n or "toy-m" in n}
    fig10 = study_experiments.tasks(s, ["fig10"])
    parallel.check_graph(fig10)
    # Each size's online run, its uniformly shuffled replay (the paper's "tandem" of Fig. 10/11)
    # and the main size's offline sweep.
    want = {"runs_toy-m/online_ipo", "runs_toy-m/shuffled_ipo_uniform", "runs/shuffled_ipo_uniform"}
    assert want <= {t.name for t in fig10}
    assert not {t.name for t in fig10 if "w2" in t.name or "bo2" in t.name}
    assert {t.name for t in study_experiments.tasks(s, [])} == every
    with pytest.raises(ValueError, match="unknown experiments \\['fig7'\\]"):
        study_experiments.tasks(s, ["fig7"])
    # The Best-of-2 binary on a finished study: every stage is reused, the report is partial.
    copy = tmp_path / "study"
    shutil.copytree(micro_study, copy)
    (copy / "REPORT.md").unlink()
    proc = subprocess.run(
        [sys.executable, "experiments/fig9_best_of_2.py", "--preset=micro", f"--workdir={copy}"],
        cwd=pathlib.Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 1/" not in proc.stdout + proc.stderr  # nothing trained again
    text = (copy / "REPORT.md").read_text()
    assert "## H4, non-contrastive losses" in text and "## H0 (Fig. 1)" in text
    assert "## H1" not in text and "## H5" not in text
    assert "not run: fig4, fig5, beyond, fig10" in text


@pytest.mark.slow  # two micro studies in one-core workers (about 5 minutes on 2 cores)
def test_workers_give_the_same_bits_for_any_number_of_jobs(tmp_path):
    """--jobs=1 and --jobs=2 (each stage in a worker of one core) give the same study, bit for
    bit: which worker ran a stage, and when, does not matter. The exact replay still equals
    its online run, and the report says how the stages ran."""
    import reproduce

    from ipo_gap import parallel

    if len(parallel.cores()) < 2:
        pytest.skip("needs 2 CPU cores")
    small = {"scaling_models": ("toy-s",)}
    one = tmp_path / "one"
    two = tmp_path / "two"
    reproduce.run(one, "micro", jobs=1, **small)
    reproduce.run(two, "micro", jobs=2, **small)
    done = sorted(str(p.relative_to(one)) for p in one.rglob("done.json"))
    assert done == sorted(str(p.relative_to(two)) for p in two.rglob("done.json"))
    assert len(done) >= 15
    for rel in done:
        assert (one / rel).read_text() == (two / rel).read_text(), rel  # losses, evals, ...
    for name in ("online_ipo", "offline_bo2", "hypo"):
        a = load_model(one / "runs" / name, load_cfg(one))
        b = load_model(two / "runs" / name, load_cfg(one))
        assert tree_max_abs_diff(a, b) == 0.0, name
    assert _summary(two, "tandem_ipo")["max_param_diff_to_online"] == 0.0
    for f in FIGURES:
        assert (two / "figures" / f).exists(), f
    text = (two / "REPORT.md").read_text()
    assert "| stages ran | 2 one-core worker processes |" in text


def load_cfg(workdir):
    from ipo_gap.study_runs import Study

    return Study(workdir, study.study_config(workdir)).policy_cfg


def test_a_stage_drops_its_train_states_only_after_done_json(tmp_path):
    """A kill between the two leaves a finished stage (a re-run drops the states), never a
    stage whose train states are gone but whose summary is missing (it would train again)."""
    d = tmp_path / "sft"

    def fails(directory):
        (directory / study.TRAIN_STATE).mkdir()
        raise KeyboardInterrupt  # killed during the stage

    with pytest.raises(KeyboardInterrupt):
        study.stage(d, fails)
    assert (d / study.TRAIN_STATE).exists() and not (d / "done.json").exists()

    def finishes(directory):
        assert not (directory / "done.json").exists()
        return {"steps": 3}

    assert study.stage(d, finishes) == {"steps": 3}
    assert (d / "done.json").exists() and not (d / study.TRAIN_STATE).exists()
    (d / study.TRAIN_STATE).mkdir()  # as if killed right after done.json was written
    assert study.stage(d, fails) == {"steps": 3}  # skipped: fn is not called
    assert not (d / study.TRAIN_STATE).exists()


def test_interval_and_peak_and_verdicts():
    iv = evaluation.Interval.of(np.array([1.0, 0.0, 0.5, 1.0]))
    assert iv.mean == 0.625 and iv.n == 4
    half = 1.96 * np.std([1.0, 0.0, 0.5, 1.0], ddof=1) / 2
    assert np.isclose(iv.hi - iv.mean, half) and np.isclose(iv.mean - iv.lo, half)

    def ev(step, w, lo, hi, kl):
        return {"step": step, "win_rate": w, "win_lo": lo, "win_hi": hi, "kl": kl}

    runs = [
        {"name": "a", "evals": [ev(0, 0.5, 0.4, 0.6, 0), ev(5, 0.7, 0.65, 0.75, 1.0)]},
        {"name": "b", "evals": [ev(0, 0.9, 0.8, 1.0, 0), ev(5, 0.6, 0.5, 0.7, 2.0)]},
    ]
    p = report.peak(runs)
    assert (p.run, p.step, p.win, p.kl) == ("a", 5, 0.7, 1.0)  # step 0 (SFT) is excluded
    low = report.Peak("c", 1, 0.55, 0.5, 0.6, 0.3)
    assert "online is higher" in report.compare(p, low, "online", "offline")
    assert "offline is higher" in report.compare(low, p, "online", "offline")
    overlap = report.Peak("d", 1, 0.68, 0.6, 0.76, 0.3)
    assert "overlap" in report.compare(p, overlap, "online", "offline")


def test_h2_and_beyond_verdicts_follow_the_intervals():
    def run(method, w, lo, hi):
        ev = {"step": 5, "win_rate": w, "win_lo": lo, "win_hi": hi, "kl": 1.0}
        return {"name": method, "method": method, "evals": [ev]}

    on = report.Peak("online", 5, 0.7, 0.65, 0.75, 1.0)
    below = [run("offline ipo on d_a", 0.5, 0.45, 0.55), run("offline ipo on d_b", 0.6, 0.55, 0.64)]
    assert "as the paper found" in report.h2_verdict(on, below)
    tied = [*below, run("offline ipo on d_c", 0.68, 0.62, 0.74)]
    text = report.h2_verdict(on, tied)
    assert "Not separated from online: d_c " in text and "as the paper found" not in text
    above = [*below, run("offline ipo on d_d", 0.85, 0.8, 0.9)]
    assert "Offline on d_d is above online: unlike the paper" in report.h2_verdict(on, above)

    semi = [
        run(f"semi-online ipo (s={s})", w, w - 0.02, w + 0.02)
        for s, w in (("inf", 0.4), ("10", 0.69), ("50", 0.5))
    ]  # out of order: sorted by s
    text = report.beyond_verdict(on, [*semi, run("hypo", 0.8, 0.76, 0.84)])
    assert "(s=10 0.690, s=50 0.500, s=inf 0.400): it falls as s grows" in text
    assert "hypo: hypo is higher than online" in text
    assert "semi-online ipo (s=inf): online is higher" in text
    semi[0] = run("semi-online ipo (s=inf)", 0.6, 0.58, 0.62)
    assert "does not fall monotonically" in report.beyond_verdict(on, semi)


def test_goodhart_verdict_needs_separated_intervals():
    def ev(step, gold, proxy, half=0.02):
        return {
            "step": step,
            "kl": step / 10,
            "win_rate": gold,
            "win_lo": gold - half,
            "win_hi": gold + half,
            "proxy_win_rate": proxy,
            "proxy_win_lo": proxy - half,
            "proxy_win_hi": proxy + half,
        }

    over = {"evals": [ev(10, 0.5, 0.5), ev(20, 0.7, 0.7), ev(30, 0.55, 0.9)]}
    text = report.goodhart_verdict(over)
    assert "from 0.500 (step 10) to 0.900 (step 30" in text and "peak 0.700 at step 20" in text
    assert "over-optimises the proxy PM" in text
    still_rising = {"evals": [ev(10, 0.5, 0.5), ev(20, 0.7, 0.7)]}
    assert "No over-optimisation of the proxy within this run" in report.goodhart_verdict(
        still_rising
    )
    noisy = {"evals": [ev(10, 0.5, 0.5), ev(20, 0.7, 0.7), ev(30, 0.68, 0.9)]}
    assert "no clear over-optimisation" in report.goodhart_verdict(noisy)
    # A last checkpoint level with an earlier peak is a peak at the end, not a fall.
    level = {"evals": [ev(10, 0.5, 0.5), ev(20, 0.7, 0.7), ev(30, 0.7, 0.9)]}
    text = report.goodhart_verdict(level)
    assert (
        "peak 0.700 at step 30" in text
        and "No over-optimisation of the proxy within this run" in text
    )
    run = {"name": "on", "evals": level["evals"]}
    assert report.at_last_checkpoint([run], report.peak([run]))


def test_golden_caveat_flags_a_golden_pm_at_chance():
    # 0.507 on 300 labels: interval [0.450, 0.564] holds 0.5 -> flagged.
    weak = report.golden_caveat(0.507, 300)
    assert "[0.450, 0.564]" in weak and "not distinguishable from chance" in weak
    # 0.629 on 500 labels: [0.587, 0.671] -> better than chance, no caveat.
    strong = report.golden_caveat(0.629, 500)
    assert "[0.587, 0.671]" in strong and "Caveat" not in strong


def test_a_run_resumes_only_on_its_own_order_log(tmp_path):
    """`study_runs._check_log_meta`: a log whose meta.json states another run's settings is
    refused, naming each differing field (inside the configs too); the step count may differ
    (a run may be extended), and keys a log of older code lacks are not compared."""
    from ipo_gap.data.order_log import OrderLog, pair_schema
    from ipo_gap.study_runs import _check_log_meta

    cfg = study.PRESETS["micro"]
    want = {
        "tokenizer_sha256": "a" * 64,
        "run": "online_ipo",
        "loss": "ipo",
        "lr": 1e-3,
        "beta": 0.1,
        "num_steps": 10,
        "study": cfg.to_dict(),
    }
    log = OrderLog.create(tmp_path / "log", schema=pair_schema(4, 3), batch_size=2, meta=want)
    _check_log_meta(log, want)
    _check_log_meta(log, dict(want, num_steps=20))
    with pytest.raises(ValueError, match=r"\(beta: 0.1 in the log, 0.5 in this run\)"):
        _check_log_meta(log, dict(want, beta=0.5))
    other = dict(want, study=dataclasses.replace(cfg, rl_batch=cfg.rl_batch + 1).to_dict())
    with pytest.raises(ValueError, match=rf"study.rl_batch: {cfg.rl_batch} in the log, "):
        _check_log_meta(log, other)
    # A model config written before a T5Config field was added: completed with its default.
    model = tiny_config().to_dict()
    older_model = {k: v for k, v in model.items() if k != "compute_dtype"}
    meta = dict(want, model=older_model)
    log = OrderLog.create(tmp_path / "m", schema=pair_schema(4, 3), batch_size=2, meta=meta)
    _check_log_meta(log, dict(want, model=model))
    with pytest.raises(ValueError, match=r"model.d_model: "):
        _check_log_meta(log, dict(want, model=dict(model, d_model=model["d_model"] + 1)))
    old = {k: v for k, v in want.items() if k not in ("run", "lr", "beta", "num_steps")}
    older = OrderLog.create(tmp_path / "old", schema=pair_schema(4, 3), batch_size=2, meta=old)
    _check_log_meta(older, dict(want, lr=5.0))  # an older log does not state its lr


def test_the_uniform_shuffle_is_swept_like_the_offline_runs(tmp_path):
    """The paper's Fig. 4 pools offline runs on the shuffled online stream over lr and beta:
    at the quick preset, the main size's uniform shuffle runs on the whole offline grid (one
    run per point, the online lr and beta being `shuffled_ipo_uniform`), another size's on
    its offline betas at the online lr; each waits for its own size's online run, and
    --experiments=fig10 selects all of them."""
    from ipo_gap import study_experiments
    from ipo_gap.study_runs import Study

    cfg = study.PRESETS["quick"]
    s = Study(tmp_path, cfg)
    graph = {t.name: t.after for t in study_experiments.all_tasks(s)}
    grid = [(lr, b) for lr in cfg.offline_lrs for b in cfg.offline_betas]
    assert (cfg.rl_lr, cfg.rl_beta) in grid
    want = {"runs/shuffled_ipo_uniform"} | {
        f"runs/shuffled_ipo_uniform_lr{lr:g}_b{b:g}"
        for lr, b in grid
        if (lr, b) != (cfg.rl_lr, cfg.rl_beta)
    }
    want |= {"runs_toy-m/shuffled_ipo_uniform"} | {
        f"runs_toy-m/shuffled_ipo_uniform_lr{cfg.rl_lr:g}_b{b:g}"
        for b in cfg.offline_betas
        if b != cfg.rl_beta
    }
    got = {n for n in graph if "shuffled_ipo_uniform" in n}
    assert got == want and len(got) == len(grid) + len(cfg.offline_betas)
    for n in got:
        assert f"{n.split('/')[0]}/online_ipo" in graph[n]
    # Fig. 10 pools every size over the same grid (the offline betas at the online lr), so
    # --experiments=fig10 selects only those of the main size's shuffles.
    assert study_experiments.fig10_lrs(s) == (cfg.rl_lr,)
    selected = {t.name for t in study_experiments.tasks(s, ["fig10"])}
    at_rl_lr = {n for n in want if n.startswith("runs_toy-m/") or f"lr{cfg.rl_lr:g}_" in n}
    assert at_rl_lr | {"runs/shuffled_ipo_uniform"} <= selected
    assert not (want - at_rl_lr - {"runs/shuffled_ipo_uniform"}) & selected
    assert "runs/shuffled_ipo_w4" not in selected
    other = Study(tmp_path / "other", dataclasses.replace(cfg, rl_lr=7e-4))  # not in the grid
    assert study_experiments.fig10_lrs(other) == cfg.offline_lrs
