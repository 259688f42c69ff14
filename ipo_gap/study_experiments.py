"""The study's experiments, one function per figure group of the paper (NOTES.md).

Each function runs (or loads, when done) its policy runs through `Study.policy_run` and returns
their summaries: dicts with "name", "method", "evals" (list of evaluation dicts by step) and
"losses". `run_all` runs every group in the order the report uses them.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from ipo_gap import eval as evaluation
from ipo_gap import hosts, jsonl, parallel, sharding
from ipo_gap.data import embedded_task, ref_cache, sources
from ipo_gap.data.order_log import OrderLog, code_version
from ipo_gap.determinism import tree_bit_differences, tree_max_abs_diff
from ipo_gap.report import SHUFFLED_BO2, UNIFORM, UNIFORM_SWEEP, offline_same
from ipo_gap.study import load_model, relabel, savez_atomic, stage, study_config
from ipo_gap.study_runs import Study
from ipo_gap.train import trainers


def _offline(study: Study, data: dict, name: str) -> callable:
    """An offline source over `data` whose rows carry the SFT reference's log-probs.

    The reference log-probs are computed once per dataset and policy size and cached beside
    the study (`ref_cache<tag>/<name>.npz`, keyed by the reference's and the data's hashes,
    `ipo_gap.data.ref_cache`), so the runs of a sweep skip the reference forward pass.
    """

    def build():
        pairs = {k: v for k, v in data.items() if k in sources.PAIR_FIELDS}
        ref_w, ref_l = ref_cache.load_or_compute(
            study.workdir / f"ref_cache{study.tag}",
            study.sft(),
            pairs,
            tokenizer_sha256=study.prep.tokenizer.sha256,
            batch_size=study.cfg.eval_batch,
            name=name,
        )
        return ref_cache.with_refs(pairs, ref_w, ref_l)

    return lambda: sources.OfflineSource(
        study._memo(f"offline_{name}", build),
        batch_size=study.cfg.rl_batch,
        seed=study.data_seed("offline"),
    )


def _on_d_golden(study: Study) -> callable:
    """`_offline` over D_golden's train split (the offline sweep, Bo2, HyPO, other sizes)."""
    return _offline(study, study.d_golden()["train"], "d_golden")


def _online(study: Study, loss: str, name: str) -> dict:
    """An online run against the proxy PM with its data-order log (and mid-run snapshot)."""
    _, proxy = study.proxy_pm()
    return study.policy_run(
        name,
        method=f"online {loss}",
        loss=loss,
        log=True,
        source_fn=lambda: study.online_source(proxy),
        save_at=(mid_step(study),),
        proxy_judged=True,  # its win rate by the PM it optimises, too (over-optimisation)
    )


def mid_step(study: Study) -> int:
    """The paper's 800-of-4k step, scaled: a fifth of the online run."""
    return max(1, study.cfg.rl_steps // 5)


def _replay(
    study: Study,
    online_name: str,
    name: str,
    method: str,
    loss: str,
    window=None,
    lr: float | None = None,
    beta: float | None = None,
):
    """Offline training on the online run's logged stream (exact order, or shuffled), at the
    online run's lr and beta unless given."""
    log_dir = study.runs_dir / online_name / "log"
    online = study.runs_dir / online_name

    def source_fn():
        log, tok = OrderLog.open(log_dir), study.prep.tokenizer
        if window is None:
            return sources.LogReplay(log, tokenizer=tok)
        return sources.ShuffledReplay(
            log, window=window, seed=study.data_seed("shuffle"), tokenizer=tok
        )

    def extra(model, hist):
        ref = load_model(online, study.policy_cfg)
        online_losses = json.loads((online / "done.json").read_text())["losses"]
        dev = [abs(a - h["loss"]) for a, h in zip(online_losses, hist, strict=True)]
        differing = tree_bit_differences(model, ref)
        return {
            "max_param_diff_to_online": tree_max_abs_diff(model, ref),
            # Leaves whose bits differ (-0 against +0 too), and the first of them.
            "param_leaves_differing_in_bits": len(differing),
            "first_param_leaf_differing": differing[0] if differing else None,
            "max_loss_dev_to_online": max(dev),
            "mean_loss_dev_to_online": float(np.mean(dev)),
        }

    return study.policy_run(
        name, method=method, loss=loss, lr=lr, beta=beta, source_fn=source_fn, extra=extra
    )


def fig1_runs(study: Study) -> list[tuple[str, Callable[[], dict]]]:
    """Online IPO and the offline IPO sweep on D_golden (lr x beta, run 5x longer)."""
    out = [("online_ipo", lambda: _online(study, "ipo", "online_ipo"))]
    n = study.cfg.rl_steps * study.cfg.offline_steps_factor
    for lr in study.cfg.offline_lrs:
        for beta in study.cfg.offline_betas:
            name = f"offline_ipo_lr{lr:g}_b{beta:g}"
            out.append(
                (
                    name,
                    lambda name=name, lr=lr, beta=beta: study.policy_run(
                        name,
                        method="offline ipo",
                        lr=lr,
                        beta=beta,
                        num_steps=n,
                        source_fn=_on_d_golden(study),
                    ),
                )
            )
    return out


def fig1(study: Study) -> list[dict]:
    return [fn() for _, fn in fig1_runs(study)]


def fig4_runs(study: Study) -> list[tuple[str, Callable[[], dict]]]:
    """Exact-order replay (tandem), uniform shuffle and shuffle levels of the online stream."""
    exact = "offline ipo (exact order)"
    out = [("tandem_ipo", lambda: _replay(study, "online_ipo", "tandem_ipo", exact, "ipo"))]
    for w in study.cfg.shuffle_levels:
        if w >= study.cfg.rl_steps:  # a window over the whole stream: the uniform shuffle
            continue
        label = f"w{w}"
        name = f"shuffled_ipo_{label}"
        out.append(
            (
                name,
                lambda name=name, label=label, w=w: _replay(
                    study, "online_ipo", name, f"offline ipo (shuffled {label})", "ipo", window=w
                ),
            )
        )
    return [*out, *uniform_shuffles(study, study.cfg.offline_lrs, study.cfg.offline_betas)]


def fig4(study: Study) -> list[dict]:
    return [fn() for _, fn in fig4_runs(study)]


def fig9_runs(study: Study) -> list[tuple[str, Callable[[], dict]]]:
    """Best-of-2: online, offline on D_golden, and offline on the online stream uniformly
    shuffled (the paper's Fig. 9 "tandem", D_online-shuffled: an exact-order replay would
    only repeat the online run, as `tandem_ipo` shows for IPO)."""
    return [
        ("online_bo2", lambda: _online(study, "bo2", "online_bo2")),
        (
            "offline_bo2",
            lambda: study.policy_run(
                "offline_bo2",
                method="offline bo2",
                loss="bo2",
                source_fn=_on_d_golden(study),
            ),
        ),
        (
            "shuffled_bo2_uniform",
            lambda: _replay(
                study,
                "online_bo2",
                "shuffled_bo2_uniform",
                SHUFFLED_BO2,
                "bo2",
                window=study.cfg.rl_steps,
            ),
        ),
    ]


def fig9(study: Study) -> list[dict]:
    return [fn() for _, fn in fig9_runs(study)]


def beyond_runs(study: Study) -> list[tuple[str, Callable[[], dict]]]:
    """Semi-online IPO (refresh every s steps; 0 = never) and HyPO on D_golden."""
    out = []
    for s in study.cfg.semi_online_refresh:
        label = "inf" if s == 0 else str(s)
        name = f"semi_online_ipo_s{label}"
        out.append(
            (
                name,
                lambda name=name, label=label, s=s: study.policy_run(
                    name,
                    method=f"semi-online ipo (s={label})",
                    source_fn=lambda: sources.SemiOnlineSource(
                        study.online_source(study.proxy_pm()[1]), refresh_every=s or None
                    ),
                ),
            )
        )
    out.append(
        (
            "hypo",
            lambda: study.policy_run(
                "hypo",
                method="hypo",
                loss="dpo",
                hypo=True,
                source_fn=lambda: sources.HypoSource(
                    _on_d_golden(study)(),
                    key=study.key("hypo"),
                    max_len=study.cfg.target_len,
                ),
            ),
        )
    )
    return out


def beyond(study: Study) -> list[dict]:
    return [fn() for _, fn in beyond_runs(study)]


def _sampled_dataset(study: Study, name: str, policy_a, policy_b) -> dict:
    """Prompts of D_golden's train split, y1 ~ policy_a(), y2 ~ policy_b(), golden labels
    (the policies are loaded only when the dataset is not saved yet).

    As many prompts as the offline run on it consumes (rl_steps x rl_batch: one epoch), the
    first ones of D_golden's train split.
    """
    path = study.workdir / f"{name}.npz"
    if not hosts.exists(path):
        d = study.d_golden()["train"]
        n = min(len(d["prompt"]), study.cfg.rl_steps * study.cfg.rl_batch)
        x, xm = d["prompt"][:n], d["prompt_mask"][:n]
        k1, k2 = jax.random.split(jax.random.fold_in(study.key("datasets"), hash_name(name)))
        kw = {"max_len": study.cfg.target_len, "batch_size": study.cfg.eval_batch}
        y1, m1 = evaluation.sample_rows(policy_a(), x, xm, key=k1, **kw)
        y2, m2 = evaluation.sample_rows(policy_b(), x, xm, key=k2, **kw)
        judged = trainers.judge_rows(study.golden_pm()[1], x, xm, y1, m1, y2, m2)
        pairs = {
            "prompt": x,
            "prompt_mask": xm,
            "y_w": y1,
            "y_w_mask": m1,
            "y_l": y2,
            "y_l_mask": m2,
        }
        savez_atomic(path, **relabel(pairs, judged))  # y_w = the golden PM's winner
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def hash_name(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % (2**31)


def fig5_runs(study: Study) -> list[tuple[str, Callable[[], dict]]]:
    """Offline IPO on datasets of online-policy samples (D_4k-vs-4k, D_sft-vs-800, D_800-vs-4k)."""
    specs = {  # the two sampling policies: "final" / "mid" checkpoints of the online run
        "d_final_vs_final": ("final", "final"),
        "d_sft_vs_mid": ("sft", "mid"),
        "d_mid_vs_final": ("mid", "final"),
    }

    def policy(which):
        run = study.runs_dir / "online_ipo"
        if which == "sft":
            return study.sft()
        path = run if which == "final" else run / f"step_{mid_step(study)}"
        # Loaded for one dataset and dropped after it (memoised, the two checkpoints stayed on
        # the device through every later stage: found by counting live arrays, see
        # experiments/memory_plan.py).
        return load_model(path, study.policy_cfg)

    def one(name, a, b):
        _online(study, "ipo", "online_ipo")
        data = _sampled_dataset(study, name, lambda: policy(a), lambda: policy(b))
        return study.policy_run(
            f"offline_ipo_{name}",
            method=f"offline ipo on {name}",
            source_fn=_offline(study, data, name),
        )

    return [
        (f"offline_ipo_{name}", lambda name=name, a=a, b=b: one(name, a, b))
        for name, (a, b) in specs.items()
    ]


def fig5(study: Study) -> list[dict]:
    return [fn() for _, fn in fig5_runs(study)]


def variants(study: Study) -> dict[str, Study]:
    """The other policy sizes of Fig. 10 (`Study.variant`), by model name (memoised, so the
    variants keep their caches across calls)."""
    return study._memo(
        "variants",
        lambda: {
            m: study.variant(m)
            for m in study.cfg.scaling_models
            if m not in (study.cfg.policy_model, study.cfg.policy_checkpoint)
        },
    )


def uniform_shuffles(study: Study, lrs, betas) -> list[tuple[str, Callable[[], dict]]]:
    """Offline on a size's online IPO stream uniformly shuffled: the paper's D_online-shuffled,
    which Fig. 10/11 call "tandem" (here, `tandem_ipo` is the exact-order replay). First the
    run at the online lr and beta (`shuffled_ipo_uniform`, method `UNIFORM`), then one per
    other point of the grid `lrs` x `betas` (method `UNIFORM_SWEEP`): the paper's Fig. 4
    pools shuffled runs over learning rates and betas, as Fig. 1 pools the offline sweep."""
    cfg = study.cfg

    def run(name, method, lr=None, beta=None):
        return name, lambda: _replay(
            study, "online_ipo", name, method, "ipo", cfg.rl_steps, lr=lr, beta=beta
        )

    out = [run("shuffled_ipo_uniform", UNIFORM)]
    for lr in lrs:
        for beta in betas:
            if (lr, beta) != (cfg.rl_lr, cfg.rl_beta):
                name = f"shuffled_ipo_uniform_lr{lr:g}_b{beta:g}"
                out.append(run(name, UNIFORM_SWEEP, lr, beta))
    return out


def variant_runs(s: Study) -> list[tuple[str, Callable[[], dict]]]:
    """A policy size's runs: online IPO, offline IPO on D_golden at each beta at the online lr,
    and offline on its online stream uniformly shuffled at the same betas and lr."""
    n = s.cfg.rl_steps * s.cfg.offline_steps_factor
    out = [("online_ipo", lambda: _online(s, "ipo", "online_ipo"))]
    for beta in s.cfg.offline_betas:
        name = f"offline_ipo_lr{s.cfg.rl_lr:g}_b{beta:g}"
        out.append(
            (
                name,
                lambda name=name, beta=beta: s.policy_run(
                    name,
                    method="offline ipo",
                    beta=beta,
                    num_steps=n,
                    source_fn=_on_d_golden(s),
                ),
            )
        )
    return out + uniform_shuffles(s, (s.cfg.rl_lr,), s.cfg.offline_betas)


def fig10_lrs(study: Study) -> tuple[float, ...]:
    """The learning rates Fig. 10 pools at the main size: the online one, as at every other
    size (`variant_runs`), so that each size's quantile is taken over the same grid (the
    offline betas at the online lr); the whole sweep if the online lr is not in it."""
    cfg = study.cfg
    return (cfg.rl_lr,) if cfg.rl_lr in cfg.offline_lrs else tuple(cfg.offline_lrs)


def fig10(study: Study) -> list[dict]:
    """Policy sizes (Fig. 10, 11, 14): online IPO, offline IPO on D_golden and offline on the
    online stream uniformly shuffled (the paper's "tandem" of these figures) per size.

    Every size pools its offline and its shuffled runs at the online learning rate and the
    offline betas: the other sizes run just those, and the main size's other learning rates
    (Fig. 1's and Fig. 4's sweeps) are left out here (`fig10_lrs`), since a 90% quantile over
    a larger or different pool would shift the ratio by the pool's make-up, not by size.
    Returns per size: the runs and the parameter count; the report takes the 90% quantile of
    win rates over each method's checkpoints.
    """
    out = []
    others = variants(study)
    for model in study.cfg.scaling_models:
        if model in others:
            s = others[model]
            online, *rest = [fn() for _, fn in variant_runs(s)]
        else:
            s = study
            lrs = fig10_lrs(s)
            online, *sweep = fig1(study)
            rest = [r for r in sweep if any(math.isclose(r["lr"], lr) for lr in lrs)]
            rest += [fn() for _, fn in uniform_shuffles(s, lrs, s.cfg.offline_betas)]
        shuffled = [r for r in rest if r["method"] in (UNIFORM, UNIFORM_SWEEP)]
        offline = [r for r in rest if r["method"] not in (UNIFORM, UNIFORM_SWEEP)]
        out.append(
            {
                "model": model,
                "params": s.policy_cfg.num_params(),
                "sft_loss": json.loads((s.workdir / f"sft{s.tag}" / "done.json").read_text())[
                    "final_loss"
                ],
                "online": [online],
                "offline": offline,
                "shuffled": shuffled,
            }
        )
    return out


class NotReproduced(RuntimeError):
    """A final policy does not give the valid-split results its study recorded."""


def _run_summary(workdir: pathlib.Path, name: str) -> dict:
    return json.loads((workdir / "runs" / name / "done.json").read_text())


def classify_final_training_pairs(workdir: pathlib.Path) -> dict:
    """Fig. 8 on D_golden's training pairs for a finished study of code whose evaluations
    lacked them (before 63ab5ac): the final policies of online IPO and of the offline run at
    online's lr and beta (REPORT.md's H3 contrast) classify the pairs `Study.evaluator` gives
    newer evaluations (`Study.train_pairs_order`).

    Returns {"online": {...}, "offline": {...}, "difference": [mean, lo, hi, n]}: per run its
    name, last evaluated step, `train_accuracy`, `train_drift`, `train_accuracy_outcomes`, and
    the paired difference offline - online (`eval.paired_difference`). A final policy is
    trusted only if it classifies the valid-split pairs exactly as its last evaluation
    recorded, per pair (`NotReproduced` otherwise: another kind of CPU, more than one core, or
    code older than per-pair results). Reads the study's files, writes none.
    """
    workdir = pathlib.Path(workdir)
    s = Study(workdir, study_config(workdir))
    ev = s.evaluator()
    online = _run_summary(workdir, "online_ipo")
    names = sorted(p.parent.name for p in (workdir / "runs").glob("offline_ipo_lr*/done.json"))
    if not names:
        raise FileNotFoundError(f"{workdir / 'runs'}: no finished offline_ipo_lr* run")
    offline = offline_same([_run_summary(workdir, n) for n in names], online)
    out = {}
    for label, run in (("online", online), ("offline", offline)):
        model = load_model(workdir / "runs" / run["name"], s.policy_cfg)
        _, _, valid = ev.classify_pairs(model, "pairs")
        if valid != run["evals"][-1].get("accuracy_outcomes"):
            raise NotReproduced(
                f"{workdir / 'runs' / run['name']}: its final policy classifies the valid-split "
                "pairs otherwise than its last evaluation recorded (another kind of CPU, more "
                "than one core, or an evaluation of code without per-pair results): not measured"
            )
        acc, drift, outcomes = ev.classify_pairs(model, "train_pairs")
        out[label] = {
            "run": run["name"],
            "step": run["evals"][-1]["step"],
            "train_accuracy": acc,
            "train_drift": drift,
            "train_accuracy_outcomes": outcomes,
        }
    d = evaluation.paired_difference(
        out["offline"]["train_accuracy_outcomes"], out["online"]["train_accuracy_outcomes"]
    )
    out["difference"] = [d.mean, d.lo, d.hi, d.n]
    return out


def _pm_markers(study: Study) -> str:
    """What the golden and proxy PMs mark the ends of y1 and y2 with (`T5Config.pm_ids`)."""
    notes = {
        which: study.prep.tokenizer.pm_marker_note(cfg.pm_ids)
        for which, cfg in (("golden", study.golden_cfg), ("proxy", study.proxy_cfg))
    }
    if notes["golden"] == notes["proxy"]:
        return notes["golden"]
    return "; ".join(f"{which} PM: {note}" for which, note in notes.items())


def pipeline_summary(study: Study) -> dict:
    """Accuracies of the golden and proxy PMs, and the SFT evaluation."""

    def fn(d):
        golden, _ = study.golden_pm()
        proxy, _ = study.proxy_pm()
        return {
            "golden_pm": golden,
            "proxy_pm": proxy,
            "sft": study.sft_eval(),
            "truncated": study.prep.truncated,
            "pm_markers": _pm_markers(study),
            "prompt_width": study.prep.prompt_width,
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind} visible",
            "mesh": study.cfg.mesh or "none (one device)",
            "task": study.cfg.task,
            "data": getattr(study.prep.task, "report", None),
            "d_golden_agreement_with_human_labels": float(
                study.d_golden()["train"]["agree_human"].mean()
            ),
            # The embedded task's reference for the golden PM: a judge told which features
            # the hidden reward weighs, fit to the same human labels (<1 s).
            **(
                {"feature_judge": embedded_task.feature_judge(study.prep.task)}
                if isinstance(study.prep.task, embedded_task.TaskData)
                else {}
            ),
        }

    return stage(study.workdir / "pipeline", fn)


def _ref_cache(s: Study) -> None:
    """D_golden's reference log-probs under `s`'s SFT policy, cached for the runs on it."""
    _on_d_golden(s)()


# The study's experiments, by their report section: Fig. 1, 4/13, 5/12, 9, semi-online and
# HyPO, 10/11/14 (Fig. 6-8 read Fig. 1's and 4's runs). Fig. 1's runs are what every other
# experiment is compared with, so every selection includes them.
EXPERIMENTS = ("fig1", "fig4", "fig5", "fig9", "beyond", "fig10")


def experiments(selected=None) -> tuple[str, ...]:
    """`EXPERIMENTS` restricted to `selected` (None or empty: all), always with fig1."""
    if not selected:
        return EXPERIMENTS
    unknown = sorted(set(selected) - set(EXPERIMENTS))
    if unknown:
        raise ValueError(f"unknown experiments {unknown}; choose from {', '.join(EXPERIMENTS)}")
    return tuple(e for e in EXPERIMENTS if e == "fig1" or e in selected)


def tasks(study: Study, selected=None) -> list[parallel.Task]:
    """`all_tasks`, or only what the `selected` experiments need (`experiments`): their runs,
    the stages those runs wait for, and the pipeline summary."""
    graph = all_tasks(study)
    chosen = experiments(selected)
    if chosen == EXPERIMENTS:
        return graph
    runs = {
        "fig1": fig1_runs,
        "fig4": fig4_runs,
        "fig5": fig5_runs,
        "fig9": fig9_runs,
        "beyond": beyond_runs,
    }
    want = {"pipeline"} | {f"runs/{n}" for e in chosen if e in runs for n, _ in runs[e](study)}
    if "fig10" in chosen:
        main = uniform_shuffles(study, fig10_lrs(study), study.cfg.offline_betas)
        want |= {f"runs/{n}" for n, _ in main}  # (Fig. 1's runs are chosen anyway)
        for s in variants(study).values():
            want |= {f"runs{s.tag}/{n}" for n, _ in variant_runs(s)}
    after = {t.name: t.after for t in graph}
    todo = list(want)
    while todo:  # and everything they wait for
        for dep in after[todo.pop()]:
            if dep not in want:
                want.add(dep)
                todo.append(dep)
    return [t for t in graph if t.name in want]


def all_tasks(study: Study) -> list[parallel.Task]:
    """Every stage and run of the study as a task graph, in priority order (`parallel.run`).

    A task is named after the directory it fills (`sft`, `runs/offline_ipo_lr0.0005_b0.1`,
    `runs_toy-m/online_ipo`, ...). Every policy run needs its size's online IPO run, because
    its evaluations measure accuracy on that run's stream (Fig. 6); the replays need the run
    they replay. Long chains go first: the golden PM and the other sizes' SFT start together.
    """
    out: list[parallel.Task] = []

    def add(name, fn, *after):
        out.append(parallel.Task(name, tuple(after), fn))

    others = variants(study)
    add("golden_pm", study.golden_pm)
    add("sft", study.sft)
    for s in others.values():
        add(f"sft{s.tag}", s.sft)
    # D_golden before the golden baseline: D_golden -> proxy PM -> online runs is the
    # critical chain at quick (scheduling the baseline first started the online runs ~40 s
    # later there), though at micro the baseline's chain is the longer one (~10 s).
    add("d_golden", study.d_golden, "golden_pm")
    add("proxy_pm", study.proxy_pm, "d_golden")
    add("baseline", study.baseline, "sft", "golden_pm")
    add("eval_sft", study.sft_eval, "baseline", "d_golden")
    add("ref_cache", lambda: _ref_cache(study), "sft", "d_golden")
    add("pipeline", lambda: pipeline_summary(study), "eval_sft", "proxy_pm")
    # Longest first, so that no long run is left for one worker at the end: the other sizes'
    # runs (toy-m's offline runs take about 3x a toy-s one), then Best-of-2 online and HyPO
    # (about 2x), the offline sweep, and the short replays last.
    f1, f4, f5, f9, bey = (
        f(study) for f in (fig1_runs, fig4_runs, fig5_runs, fig9_runs, beyond_runs)
    )
    groups = [(study, f1[:1])]
    groups += [(s, variant_runs(s)) for s in others.values()]
    groups += [(study, f9[:1] + bey[-1:] + f1[1:] + f9[1:2] + f5 + bey[:-1] + f9[2:] + f4)]
    for s in others.values():
        add(f"eval_sft{s.tag}", s.sft_eval, f"sft{s.tag}", "baseline", "d_golden")
        add(f"ref_cache{s.tag}", lambda s=s: _ref_cache(s), f"sft{s.tag}", "d_golden")
    replays = {"tandem_ipo": "online_ipo", "shuffled_bo2_uniform": "online_bo2"}
    for s, runs in groups:
        r = f"runs{s.tag}"
        base = (f"eval_sft{s.tag}", f"ref_cache{s.tag}", "proxy_pm")
        for name, fn in runs:
            after = base if name == "online_ipo" else (*base, f"{r}/online_ipo")
            if name in replays:
                after += (f"{r}/{replays[name]}",)
            add(f"{r}/{name}", fn, *after)
    return out


def worker(workdir: str):
    """A worker's task runner (`parallel`): the study in `workdir` (its saved config)."""
    logging.set_verbosity(logging.WARNING)  # orbax logs every save and restore at INFO
    # Workers compile the same train steps and samplers: the first one to compile a function
    # leaves it in the study's compilation cache and the others load it. A size limit turns
    # on the cache's file lock, so no worker reads an entry that another is still writing.
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(workdir) / "jax_cache"))
    jax.config.update("jax_compilation_cache_max_size", 4 << 30)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    study = Study(workdir, study_config(pathlib.Path(workdir)))
    by_name = {t.name: t.fn for t in all_tasks(study)}
    return lambda name: by_name[name]()


def _record_execution(study: Study, jobs: int) -> float:
    """Adds this (re)start's mode to `execution.jsonl` before any stage runs, so that a
    killed start's is recorded too; returns the start's time, which names its row for
    `_close_execution`."""
    path = study.workdir / "execution.jsonl"
    started = time.time()
    rows = jsonl.read_rows(path, cut_tail_ok=True)
    jsonl.write_rows(path, rows + [{"jobs": jobs, "started": started, "code": code_version()}])
    return started


# What a start that trains nothing still writes: the report, its figures, the compilation
# cache and this record. Any other file written during a start is a result it computed.
_REPORT_OUTPUTS = frozenset({"REPORT.md", "SEEDS.md", "execution.jsonl", "figures", "jax_cache"})


def _wrote_results(workdir: pathlib.Path, since: float) -> bool:
    """Whether any file of the study's results (stages, runs, caches) was written at or after
    `since` (a time from the same clock; a file system keeps mtimes to the second or finer)."""
    for root, dirs, files in os.walk(workdir):
        if pathlib.Path(root) == workdir:
            dirs[:] = [d for d in dirs if d not in _REPORT_OUTPUTS]
            files = [f for f in files if f not in _REPORT_OUTPUTS]
        for f in files:
            try:
                if os.stat(os.path.join(root, f)).st_mtime >= since - 1:
                    return True
            except FileNotFoundError:  # a temporary file renamed meanwhile
                continue
    return False


def _close_execution(study: Study, started: float) -> None:
    """At the end of a start: marks its row `ran: false` when it wrote no result (every stage
    was done already, e.g. a rerun that rebuilds the report), so that its --jobs does not
    make the report call the study mixed. A killed start keeps its row as it was: it counts."""
    path = study.workdir / "execution.jsonl"
    rows = jsonl.read_rows(path, cut_tail_ok=True)
    if hosts.is_writer():  # process 0 decides; every process meets write_rows' barrier
        for row in rows:
            if row.get("started") == started:
                # The earlier of this host's clock and the file system's (the record's
                # mtime): a file server whose clock lags cannot hide a start's results.
                since = min(started, os.stat(path).st_mtime) if path.exists() else started
                row["ran"] = _wrote_results(study.workdir, since)
    jsonl.write_rows(path, rows)


def _starts_that_ran(study: Study) -> list[dict]:
    """The (re)starts recorded in `execution.jsonl` that may have computed results (all but
    those `_close_execution` found wrote none; the first, if none did)."""
    rows = jsonl.read_rows(study.workdir / "execution.jsonl", cut_tail_ok=True)
    return [r for r in rows if r.get("ran", True)] or rows[:1]


def _execution(study: Study) -> str:
    """How the study's stages ran, over `_starts_that_ran`."""
    modes = list(dict.fromkeys(r["jobs"] for r in _starts_that_ran(study)))
    say = {0: "in one process"}
    text = ", then ".join(say.get(j, f"{j} one-core worker processes") for j in modes)
    if 0 in modes and len(modes) > 1:
        text += " (mixed: a stage's last bits depend on its threads; see ipo_gap.parallel)"
    return text


def _markers_sampled(study: Study) -> str:
    """How many responses of the online runs' logged streams contain a preference model's
    marker id (`T5Config.pm_ids`): the policy can sample any id of its vocabulary (no text
    encodes to a reserved marker, so only sampling can produce one); the PMs pack it as UNK
    (`preference.pack_pair`; before 2026-12-06 they read it as the end of its response)."""
    ids = np.unique([*study.proxy_cfg.pm_ids, *study.golden_cfg.pm_ids])
    runs = total = hits = 0
    for d in sorted(study.workdir.glob("runs*/online_*/log")):
        runs += 1
        for _, b in OrderLog.open(d).iter_steps(verify=False):
            for y in ("y_w", "y_l"):
                inside = np.isin(b[y], ids) & (b[f"{y}_mask"] > 0)
                hits += int(inside.any(-1).sum())
                total += len(b[y])
    if not runs:
        return "no online run logged"
    share = f" ({hits / total:.2%})" if hits else ""
    return f"{hits:,} of {total:,} responses{share}, in {runs} online runs' logs"


def _code_name(code: dict | None) -> str:
    if code is None:
        return "not recorded (a start of older code)"
    name = f"ipo_gap {code.get('ipo_gap') or '(version unknown)'}"
    if code.get("git_commit"):
        name += f" at commit {code['git_commit'][:10]}"
        if code.get("git_dirty"):
            name += " with uncommitted changes"
    else:
        name += " (not in a git checkout)"
    return name


def _code(study: Study) -> str:
    """Which code computed the study's results: the versions of `_starts_that_ran`, in order.
    A finished stage is reused by later starts, so a study resumed under newer code mixes
    versions; the report says so. A start's uncommitted changes are not identified further."""
    names = list(dict.fromkeys(_code_name(r.get("code")) for r in _starts_that_ran(study)))
    if len(names) == 1:
        return names[0]
    return (
        ", then ".join(names) + " (mixed: each stage was computed by the code of the start "
        "that ran it, and a later start reuses finished stages)"
    )


def run_all(study: Study, jobs: int = 0, selected=None) -> dict[str, list[dict]]:
    """Every stage of the study, on `study.mesh` (the config's `mesh`) when it has one; with
    `selected`, only the pipeline and those experiments (`experiments`: Fig. 1 always).

    jobs > 0: first every stage and run on that many worker processes of one CPU core each
    (`parallel`; needs the study's config saved in `workdir/study_config.json`), then their
    results are collected here. jobs = 0: everything in this process.
    """
    chosen = experiments(selected)
    if jobs and study.mesh is not None:
        raise ValueError(
            f"jobs={jobs} runs stages in one-core CPU workers; a study on a mesh "
            f"({study.cfg.mesh}) runs in one process (jobs=0)"
        )
    started = _record_execution(study, jobs)
    if jobs:
        parallel.run(tasks(study, chosen), f"{__name__}:worker", [str(study.workdir)], jobs=jobs)
    collect = {
        "fig1": fig1,
        "fig4": fig4,
        "fig5": fig5,
        "fig9": fig9,
        "beyond": beyond,
        "fig10": fig10,
    }
    with sharding.use_mesh(study.mesh):
        study.baseline()
        results = {e: collect[e](study) for e in chosen}
        _close_execution(study, started)
        summary = dict(
            pipeline_summary(study),
            markers_sampled=_markers_sampled(study),
            execution=_execution(study),
            code=_code(study),
        )
        return {"pipeline": summary, **results}
