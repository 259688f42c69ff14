"""Can the proxy PM be over-optimised? Online IPO pushed further than the study's run.

The study's online IPO run stops at `rl_steps`; at the presets' sizes its golden-judged win rate
was still rising there (REPORT.md, "Over-optimisation"), so whether the embedded task lets a
policy exploit its proxy PM (Goodhart) is not shown by the study itself. This binary continues
the question on a finished study's pipeline (its SFT policy, proxy PM, golden PM, golden
baseline and evaluation prompts, all reused as they are): online IPO against the proxy PM for
`--steps` steps (default 5x the preset's) at each `--betas` value, evaluated `--evals` times,
every checkpoint's samples judged by the golden PM and by the proxy PM it trains against (and,
on the embedded task, by its hidden humans: `eval.Evaluator.hidden`).
The runs draw the study's online prompts with its online keys, so at the study's lr and beta a
run continues the study's online IPO run: its first `rl_steps` losses must equal that run's, bit
for bit, which the binary checks and prints.

Each run is a resumable stage of the study (`runs/goodhart_ipo_lr<lr>_b<beta>_n<steps>/`, the
same layout as every run, so a killed run restarts and a finished one is read back); the study's
own results and report are untouched. It prints, per run, the golden and proxy win rate and
KL at each checkpoint (and the hidden humans' win rate, where judged) and REPORT.md's
over-optimisation verdict (which calls it only when the
proxy's rise and the golden win rate's fall from its peak both lie outside the 95% intervals),
and draws `figures/goodhart_<run>.png`. Run it on one core, as the study's workers run, to keep
the study's bits:

  taskset -c 0 python experiments/goodhart_long_online.py --workdir=DIR --betas=0.1
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib

import jax
import numpy as np
from absl import app, flags, logging

from ipo_gap import eval as evaluation
from ipo_gap import jsonl, plots, report, study
from ipo_gap.eval import Interval, paired_interval
from ipo_gap.study_runs import Study
from ipo_gap.t5 import model as t5

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "a study whose pipeline has run (reproduce.py)", required=True
)
_BETAS = flags.DEFINE_list("betas", None, "IPO betas, one run each (default: the preset's)")
_LR = flags.DEFINE_float("lr", None, "learning rate (default: the preset's rl_lr)")
_STEPS = flags.DEFINE_integer("steps", None, "online steps per run (default: 5 x rl_steps)")
_EVALS = flags.DEFINE_integer("evals", 20, "evaluations per run, evenly spaced")


def run_name(lr: float, beta: float, steps: int) -> str:
    return f"goodhart_ipo_lr{lr:g}_b{beta:g}_n{steps}"


def long_online(s: Study, lr: float, beta: float, steps: int, evals: int) -> dict:
    """One online IPO run against the study's proxy PM, judged by both PMs (a stage)."""
    if steps < 1 or evals < 1:
        raise ValueError(f"--steps ({steps}) and --evals ({evals}) must be positive")
    if not (lr > 0 and beta > 0):
        raise ValueError(f"--lr ({lr}) and every --betas value ({beta}) must be positive")
    longer = copy.copy(s)  # the same stages and caches; only the evaluation count differs
    longer.cfg = dataclasses.replace(s.cfg, num_evals=evals)
    _, proxy = s.proxy_pm()
    return longer.policy_run(
        run_name(lr, beta, steps),
        method="online ipo",
        lr=lr,
        beta=beta,
        num_steps=steps,
        source_fn=lambda: s.online_source(proxy),  # the study's online prompts and keys
        proxy_judged=True,
    )


def continuation(workdir: pathlib.Path, name: str) -> str:
    """Whether the run's first steps are the study's online IPO run's, loss for loss (they
    draw the same prompts with the same keys; at the study's lr and beta they must be equal
    bit for bit, on the kind of CPU and core count that ran the study)."""
    mine = jsonl.read_rows(workdir / "runs" / name / "metrics.jsonl")
    path = workdir / "runs" / "online_ipo" / "metrics.jsonl"
    if not path.exists():
        return f"the study's online run is absent ({path}): no continuation check"
    theirs = jsonl.read_rows(path)
    n = min(len(mine), len(theirs))
    for a, b in zip(mine[:n], theirs[:n], strict=True):
        if json.dumps(a["loss"]) != json.dumps(b["loss"]):
            return (
                f"departs from the study's online run at step {a['step']} (loss {a['loss']!r} "
                f"against {b['loss']!r}): expected at another lr or beta, otherwise a "
                "determinism failure or another kind of CPU"
            )
    return f"its first {n} steps' losses equal the study's online run's, bit for bit"


def hidden_of(s: Study, e: dict, policy) -> tuple[np.ndarray, float]:
    """The embedded task's own verdict on a checkpoint, past both PMs: per evaluation prompt
    the hidden humans' probability of preferring its win-rate sample to the golden baseline's
    (`Study.hidden_judge`), and the samples' mean hidden reward R. Read from its evaluation
    `e`; an evaluation of older code, without them, is redone: the policy's win-rate samples
    drawn again with the evaluator's key (the samples its golden win rate judged)."""
    if "hidden_p" in e:
        return np.array(e["hidden_p"]), e["hidden_reward"]
    ev = s.evaluator()
    y, ym = evaluation.sample_rows(
        t5.unstacked(policy),  # as the evaluator samples
        ev.eval_x,
        ev.eval_xm,
        key=jax.random.split(ev.key)[0],
        max_len=ev.max_len,
        batch_size=ev.batch_size,
    )
    p, r = s.hidden_judge()(y, ym)
    return p, float(np.mean(r))


def _cell(d: Interval, lo=-np.inf, hi=np.inf) -> str:
    return f"{d.mean:.3f} [{max(lo, d.lo):.3f}, {min(hi, d.hi):.3f}]"


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every restore at INFO
        logging.set_verbosity(logging.WARNING)
    workdir = pathlib.Path(_WORKDIR.value)
    s = Study(workdir, study.study_config(workdir))
    cfg = s.cfg
    lr = cfg.rl_lr if _LR.value is None else _LR.value
    steps = _STEPS.value or 5 * cfg.rl_steps
    try:
        betas = [float(b) for b in (_BETAS.value or [cfg.rl_beta])]
    except ValueError:
        raise app.UsageError(f"--betas must be numbers, got {_BETAS.value}") from None
    finals = {}
    for beta in betas:
        r = long_online(s, lr, beta, steps, _EVALS.value)
        name = run_name(lr, beta, steps)
        hidden = report.has_hidden(r)
        print(
            f"\n{name}: step, KL, golden win rate [95%], proxy win rate [95%]"
            + (", hidden humans' win rate [95%]" if hidden else "")
        )
        for e in r["evals"]:
            if "proxy_win_rate" in e:
                print(
                    f"  {e['step']:6d}  {e['kl']:6.2f}  {e['win_rate']:.3f} "
                    f"[{e['win_lo']:.3f}, {e['win_hi']:.3f}]  {e['proxy_win_rate']:.3f} "
                    f"[{e['proxy_win_lo']:.3f}, {e['proxy_win_hi']:.3f}]"
                    + (
                        f"  {e['hidden_win_rate']:.3f} [{e['hidden_win_lo']:.3f}, "
                        f"{e['hidden_win_hi']:.3f}]"
                        if hidden
                        else ""
                    )
                )
        print("  " + report.goodhart_verdict(r))
        print("  " + continuation(s.workdir, name))
        path = s.workdir / "figures" / f"{name}.png"  # name begins "goodhart_"
        plots.figure_goodhart(r, path, f"Over-optimisation: {name}")
        print(f"  figure: {path}")
        finals[name] = (r["evals"][-1], s.workdir / "runs" / name)
    if s.cfg.task != "embedded":
        return
    print(
        "\nthe hidden humans' verdict (embedded task): final policies' win-rate samples "
        "against the golden baseline's, P(preferred) = sigmoid((R - R_base) / T)"
    )
    print(
        "  policy: golden win rate, hidden humans' win rate [95%], minus the SFT policy's "
        "(paired over the prompts) [95%], mean R, KL"
    )
    rows = [("SFT (step 0)", s.sft_eval(), s.sft())]
    online = s.workdir / "runs" / "online_ipo"
    if (online / "done.json").exists():
        e = json.loads((online / "done.json").read_text())["evals"][-1]
        rows.append(("the study's online_ipo (final)", e, study.load_model(online, s.policy_cfg)))
    rows += [(n, e, study.load_model(d, s.policy_cfg)) for n, (e, d) in finals.items()]
    sft_p = None
    for label, e, policy in rows:
        p, r = hidden_of(s, e, policy)
        sft_p = p if sft_p is None else sft_p
        print(
            f"  {label}: {e['win_rate']:.3f}, {_cell(Interval.of(p), 0, 1)}, "
            f"{_cell(paired_interval(p - sft_p))}, R {r:+.2f}, KL {e['kl']:.2f}"
        )


if __name__ == "__main__":
    app.run(main)
