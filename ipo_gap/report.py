"""Figures and REPORT.md from the study's run summaries: numbers, and verdicts computed from them.

Every verdict is a rule applied to measured numbers (stated next to it), never a fixed text.
Two peaks are compared prompt by prompt: every checkpoint is judged on the same evaluation
prompts against the same baseline samples, so "online beats offline" requires the 95% interval
of the paired difference of their per-prompt judgements (`eval.paired_difference`) to lie
above 0; an interval that holds 0 is reported as "not separated at this sample size".
Summaries written before per-prompt outcomes were kept fall back to asking for disjoint 95%
intervals (stated in the verdict). A peak's own interval is that checkpoint's: picking the best
of many checkpoints is not accounted for in it. Where a result disagrees with the paper, the
report says so.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import statistics
from collections.abc import Sequence

import numpy as np

from ipo_gap import jsonl, plots
from ipo_gap.eval import (
    Interval,
    exact_branch_note,
    hidden_majority,
    outcome_values,
    paired_difference,
    paired_interval,
)


@dataclasses.dataclass(frozen=True)
class Peak:
    run: str
    step: int
    win: float
    lo: float
    hi: float
    kl: float
    outcomes: str | None = None  # that checkpoint's per-prompt `win_outcomes`, when recorded

    def cell(self) -> str:
        return f"{self.win:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def peak(runs: Sequence[dict]) -> Peak:
    """The evaluation with the highest win rate over the runs' checkpoints (step 0 excluded)."""
    best = None
    for r in runs:
        for e in r["evals"]:
            if e["step"] == 0:
                continue
            if not math.isfinite(e["win_rate"]):  # a NaN would never be replaced as the peak
                raise ValueError(f"run {r['name']}: win rate {e['win_rate']} at step {e['step']}")
            if best is None or e["win_rate"] > best.win:
                best = Peak(
                    r["name"],
                    e["step"],
                    e["win_rate"],
                    e["win_lo"],
                    e["win_hi"],
                    e["kl"],
                    e.get("win_outcomes"),
                )
    if best is None:
        raise ValueError("no evaluated checkpoints in runs " + ", ".join(r["name"] for r in runs))
    return best


def at_last_checkpoint(runs: Sequence[dict], p: Peak) -> bool:
    """Whether the peak is its run's final evaluation, or ties with it (the run may not
    have peaked yet)."""
    run = next(r for r in runs if r["name"] == p.run)
    last = run["evals"][-1]
    return p.step == last["step"] or last["win_rate"] >= p.win


def fig1_end_notes(online: dict, p_on: Peak, offline: Sequence[dict], p_off: Peak, preset: str):
    """Fig. 1's caveats where a peak is its run's last checkpoint (or level with it): that run
    may still have been rising, so its true peak may be higher. For online that understates
    online's lead; for the offline sweep's best run it overstates it."""
    text = ""
    if at_last_checkpoint([online], p_on):
        text += (
            (
                " Online's best checkpoint is its last"
                if p_on.step == online["evals"][-1]["step"]
                else f" Online's last checkpoint is level with its best (step {p_on.step})"
            )
            + ": it may not have reached its peak (a run with more online steps"
            + (", e.g. the standard preset," if preset in ("micro", "quick") else "")
            + " would show where it turns over), which favours offline in this comparison."
        )
    if at_last_checkpoint(offline, p_off):
        text += (
            f" Offline's best run ({p_off.run}) peaks at its last checkpoint, or level with it "
            f"(step {p_off.step}): it may not have reached its peak either, which favours "
            "online in this comparison."
        )
    return text


def interval_sign(d) -> int:
    """+1 when the interval lies above 0, -1 below, 0 when it holds 0."""
    return 1 if d.lo > 0 else -1 if d.hi < 0 else 0


def paired_outcomes(a: str | None, b: str | None) -> Interval | None:
    """a - b judged prompt by prompt (`eval.paired_difference`), or None unless both hold
    per-item outcomes over the same number of items (summaries of older code hold none)."""
    if a and b and len(a) == len(b):
        return paired_difference(a, b)
    return None


def separation(a: Peak, b: Peak, name_a: str = "a", name_b: str = "b") -> tuple[int, str]:
    """(+1: a above b, -1: below, 0: not separated) and the evidence, in words.

    Paired when both peaks carry per-prompt outcomes on the same prompts: the 95% interval of
    the mean difference of their judgements must exclude 0. Otherwise (older summaries) the
    two win-rate intervals must be disjoint, a stricter rule.
    """
    d = paired_outcomes(a.outcomes, b.outcomes)
    if d is not None:
        if a.outcomes == b.outcomes:
            return 0, f"the same judgement on every one of the {len(a.outcomes)} prompts"
        evidence = (
            f"paired difference {name_a} - {name_b} {d.mean:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}] "
            f"over the same {d.n} prompts"
            + exact_branch_note(outcome_values(a.outcomes) - outcome_values(b.outcomes))
        )
        return interval_sign(d), evidence
    if a.lo > b.hi:
        return 1, "95% intervals disjoint"
    if b.lo > a.hi:
        return -1, "95% intervals disjoint"
    return 0, "95% intervals overlap; no per-prompt outcomes to pair"


def compare(a: Peak, b: Peak, name_a: str, name_b: str) -> str:
    sign, evidence = separation(a, b, name_a, name_b)
    if sign > 0:
        return f"{name_a} is higher than {name_b} ({evidence})"
    if sign < 0:
        return f"{name_b} is higher than {name_a} ({evidence})"
    if a.win == b.win:
        return f"{name_a} and {name_b} are level ({evidence})"
    higher = name_a if a.win > b.win else name_b
    return f"{higher} is nominally higher, but not separated at this sample size ({evidence})"


def table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _peak_rows(groups: dict[str, Sequence[dict]]) -> list[list]:
    rows = []
    for label, runs in groups.items():
        p = peak(runs)
        rows.append([label, p.cell(), f"{p.kl:.2f}", p.step, p.run, len(runs)])
    return rows


PEAK_HEADER = [
    "method",
    "peak win rate [95% CI of that checkpoint]",
    "KL at peak",
    "step",
    "run",
    "runs pooled",
]


def write(workdir: pathlib.Path, results: dict, preset: str) -> pathlib.Path:
    """Writes figures/*.png and REPORT.md into `workdir`; returns the report's path."""
    figs = workdir / "figures"
    fig1, fig4, fig5, fig9, beyond = (
        results.get(k) for k in ("fig1", "fig4", "fig5", "fig9", "beyond")
    )
    pipe = results["pipeline"]
    online, offline = fig1[0], fig1[1:]
    tandem, shuffled = (fig4[0], fig4[1:]) if fig4 else (None, [])
    ipo_runs = [online, *offline]
    missing = [k for k in ("fig4", "fig5", "fig9", "beyond", "fig10") if k not in results]
    plots.figure_kl_winrate(
        ipo_runs,
        figs / "fig1_online_vs_offline.png",
        "Fig. 1: online vs offline IPO (offline pooled over the sweep)",
        lines_for=["online ipo"],
    )
    if fig4:
        plots.figure_shuffle(
            online,
            [tandem, *shuffled],
            figs / "fig4_13_replay_and_shuffle.png",
            "Fig. 4 / 13: offline IPO on the online stream, exact and shuffled",
            offline=offline,
        )
    if fig5:
        plots.figure_kl_winrate(  # the same offline run as H2's table, named as there
            [online, dict(offline_same(offline, online), method=plots.OFFLINE_SAME), *fig5],
            figs / "fig5_12_datasets.png",
            "Fig. 5 / 12: offline IPO on datasets of online-policy samples",
            lines_for=[r["method"] for r in [online, *fig5]],
        )
    # The proxy's accuracy on held-out pairs (older summaries: on the valid split that chose
    # its checkpoint, an optimistic estimate).
    proxy_acc = pipe["proxy_pm"].get(
        "test_accuracy_vs_golden_labels", pipe["proxy_pm"]["valid_accuracy"]
    )
    proxy_split = "test" if "test_accuracy_vs_golden_labels" in pipe["proxy_pm"] else "valid"
    # Fig. 6-8 follow single runs at the default settings (the paper's words): online, the
    # offline run at online's lr and beta, and the uniformly shuffled replay (its "tandem").
    off_default = offline_same(offline, online)
    uniform = [r for r in shuffled if r["method"] == UNIFORM]
    h3_runs = [online, off_default, *uniform[:1]]
    plots.figure_classification(
        h3_runs,
        proxy_acc,
        figs / "fig6_7_8_classification.png",
        "Fig. 6-8: policies as classifiers on the online stream and on golden-labelled pairs "
        "(valid split; D_golden's training pairs dashed)",
        # the proxy PM is measured apart, on its own split
        proxy_label=f"proxy PM: its {proxy_split} split",
    )
    if fig9:
        plots.figure_kl_winrate(
            fig9,
            figs / "fig9_best_of_2.png",
            "Fig. 9: Best-of-2",
            lines_for=[r["method"] for r in fig9],
        )
    if beyond:
        plots.figure_kl_winrate(
            [online, *beyond],
            figs / "beyond_semi_online_hypo.png",
            "Semi-online IPO and HyPO",
            lines_for=[r["method"] for r in [online, *beyond]],
        )

    p_on, p_off = peak([online]), peak(offline)
    lines = [
        f"# The online-offline gap: report (preset `{preset}`)",
        "",
        "Every number below is measured by this run; verdicts are rules applied to them.",
        "Win rate: the policy's samples against the golden baseline's on the evaluation",
        "prompts, judged by the de-biased golden PM (ties 1/2), with Wilson 95% intervals.",
        "KL: exact KL(pi || pi_sft) along one sample per KL prompt (App. D).",
        "A peak is the best checkpoint over the pooled runs. Its interval is that",
        "checkpoint's and does not account for picking the best of many; pooling many",
        "offline runs picks a maximum of noisy estimates, which favours offline. Peaks are",
        "compared prompt by prompt (the same prompts and baseline samples for every",
        "checkpoint): a verdict names the paired difference and its 95% interval.",
        "The intervals hold the evaluation's sampling noise only, not the training's:",
        "one run per method and seed. Small presets are sensitive to it: a change of",
        "floating-point summation order alone can move a peak by more than its interval",
        "(README, 'How firm are the numbers'); rerun with other `--seed` values before",
        "trusting a verdict.",
        *(
            [
                "",
                f"**Partial report:** these experiments were not run: {', '.join(missing)} "
                "(`experiments/reproduce.py` runs them all; finished stages are reused).",
            ]
            if missing
            else []
        ),
        "",
        "## The pipeline (Fig. 2)",
        "",
    ]
    g, pr = pipe["golden_pm"], pipe["proxy_pm"]
    rows = [
        ["task", pipe.get("task", "embedded")],
        ["golden PM", f"{g['model']} ({g['params']:,} params)"],
        ["golden PM accuracy vs human labels (test)", f"{g['test_accuracy_vs_human_labels']:.3f}"],
    ]
    if "bayes_accuracy_vs_human_labels" in g:  # only the embedded task knows its humans
        rows += [
            [
                "  ceiling: Bayes accuracy vs human labels",
                f"{g['bayes_accuracy_vs_human_labels']:.3f}",
            ],
            [
                "golden PM accuracy vs the hidden reward (test)",
                f"{g['test_accuracy_vs_hidden_reward']:.3f}",
            ],
        ]
    if "feature_judge" in pipe:  # the embedded task, from 2026-12-07 on
        fj = pipe["feature_judge"]
        rows.append(
            [
                "  reference: logistic regression on the hidden reward's "
                f"{len(fj['features'])} text features, fit to the same human labels (test)",
                f"{fj['test_accuracy_vs_hidden_reward']:.3f} vs the hidden reward, "
                f"{fj['test_accuracy_vs_human_labels']:.3f} vs human labels",
            ]
        )
    rows += [
        [
            "D_golden agreement with the human labels",
            f"{pipe['d_golden_agreement_with_human_labels']:.3f}",
        ],
        ["proxy PM", f"{pr['model']} ({pr['params']:,} params)"],
        *(
            [["proxy PM accuracy vs golden labels (held-out test)", f"{proxy_acc:.3f}"]]
            if proxy_split == "test"
            else []
        ),
        [
            "proxy PM accuracy vs golden labels (valid: it chose the checkpoint)",
            f"{pr['valid_accuracy']:.3f}",
        ],
        ["truncated texts by split", str(pipe["truncated"])],
    ]
    if "pm_markers" in pipe:
        rows.append(["PM segment markers and readout ids", pipe["pm_markers"]])
    if "markers_sampled" in pipe:
        rows.append(["sampled responses containing a PM marker id", pipe["markers_sampled"]])
    if "prompt_width" in pipe:
        rows.append(["prompt width in tokens (the longest prompt)", str(pipe["prompt_width"])])
    if "mesh" in pipe:
        rows.append(["device mesh (devices)", f"{pipe['mesh']} ({pipe['devices']})"])
    if "execution" in pipe:
        rows.append(["stages ran", pipe["execution"]])
    if "code" in pipe:
        rows.append(["code that computed the results", pipe["code"]])
    if pipe.get("data"):  # a real dataset: what the loader read and the splits obtained
        data = pipe["data"]
        rows.append(["data read", data["summary"]])
        rows.append(
            ["splits obtained (requested)"]
            + [
                ", ".join(
                    f"{k} {data['obtained'][k]} ({data['requested'][k]})" for k in data["obtained"]
                )
            ]
        )
        # What the split left out (summaries of older code lack these counts).
        if "pairs_dropped_at_split_boundaries" in data:
            rows.append(
                [
                    "pairs dropped at split boundaries (past the size of a split)",
                    str(data["pairs_dropped_at_split_boundaries"]),
                ]
            )
        if "unused_prompts" in data:
            rows.append(
                [
                    "prompts in no pair split (win-rate prompts may be drawn from them)",
                    str(data["unused_prompts"]),
                ]
            )
    lines.append(table(["quantity", "value"], rows))
    if "test_pairs" in g:
        lines += ["", golden_caveat(g["test_accuracy_vs_human_labels"], g["test_pairs"])]
    lines += [
        "",
        "## H0 (Fig. 1): online vs offline, win rate against KL",
        "",
        "![fig1](figures/fig1_online_vs_offline.png)",
        "",
        table(PEAK_HEADER, _peak_rows({"online ipo": [online], "offline ipo": offline})),
        "",
        f"**Verdict:** {compare(p_on, p_off, 'online', 'offline')}. Online peaks at "
        f"KL {p_on.kl:.2f}, offline at KL {p_off.kl:.2f}."
        + fig1_end_notes(online, p_on, offline, p_off, preset),
    ]
    if any("proxy_win_rate" in e for e in online["evals"]):
        plots.figure_goodhart(
            online,
            figs / "goodhart_proxy_vs_golden.png",
            "Over-optimisation check: online IPO judged by the golden and the proxy PM"
            + ("\nand by the embedded task's hidden humans" if has_hidden(online) else ""),
        )
        lines += [
            "",
            "![goodhart](figures/goodhart_proxy_vs_golden.png)",
            "",
            f"**Over-optimisation (Goodhart):** {goodhart_verdict(online)}",
        ]
    every_run = [
        *ipo_runs,
        *([tandem, *shuffled] if fig4 else []),
        *(fig5 or []),
        *(fig9 or []),
        *(beyond or []),
    ]
    judged = [r for r in every_run if has_hidden(r)]
    if judged and len(judged) < len(every_run):  # a study begun by code before e129b3f
        lines += [
            "",
            "The hidden humans judged only some runs' checkpoints (evaluations of code before "
            "e129b3f carry no such judgement): not compared here. Missing: "
            + ", ".join(r["name"] for r in every_run if not has_hidden(r))
            + ".",
        ]
    elif judged:
        plots.figure_hidden(
            [as_hidden(r) for r in ipo_runs],
            every_run,
            figs / "hidden_humans.png",
            "Fig. 1 judged by the hidden humans (embedded task)",
        )
        lines += [
            "",
            "![hidden](figures/hidden_humans.png)",
            "",
            "**The hidden humans** (the embedded task's simulated humans, whose sampled labels "
            "the golden PM learned from; each checkpoint's win rate by them is the mean over "
            "prompts of the probability that they prefer its sample to the golden baseline's, "
            "i.e. the share of human raters who would, with a normal 95% interval; their "
            "majority verdict per prompt, which a golden PM that always sided with them would "
            "give, is whether that probability exceeds 1/2): "
            + hidden_verdict(
                online,
                offline,
                every_run,
                g.get("test_accuracy_vs_hidden_reward"),
                pipe.get("feature_judge", {}).get("test_accuracy_vs_hidden_reward"),
            ),
        ]
    if fig4:
        lines += [
            "",
            "## H1, coverage (Fig. 4, 13): offline on the online stream",
            "",
            "![fig4](figures/fig4_13_replay_and_shuffle.png)",
            "",
        ]
        rows = [_replay_row(r, online) for r in [tandem, *shuffled]]
        lines.append(
            table(
                [
                    "replay",
                    "max |param - online|",
                    "max |loss - online|",
                    "mean |loss - online|",
                    "peak win rate",
                ],
                rows,
            )
        )
        exact, how = tandem_identical(tandem)
        lines += [
            "",
            "**Verdict:** the exact-order replay is "
            + (
                f"{how} to the online run (parameters and every loss): offline training on "
                "the online data stream *is* online training."
                if exact
                else "NOT identical to the online run: the tandem identity failed here; see the "
                "table."
            ),
            *_uniform_verdict(shuffled, p_on),
            *_shuffle_vs_offline(shuffled, offline, online),
            *_level_verdict(shuffled, p_on),
        ]
    if fig5:
        lines += [
            "",
            "## H2, data quality (Fig. 5, 12): offline on online-policy samples",
            "",
            "![fig5](figures/fig5_12_datasets.png)",
            "",
            table(
                PEAK_HEADER,
                _peak_rows(
                    {
                        "online ipo": [online],
                        plots.OFFLINE_SAME: [offline_same(offline, online)],
                        **{r["method"]: [r] for r in fig5},
                    }
                ),
            ),
            "",
            f"**Verdict:** {h2_verdict(p_on, fig5)}",
        ]
    lines += [
        "",
        "## H3, classification (Fig. 6-8)",
        "",
        "![fig6](figures/fig6_7_8_classification.png)",
        "",
    ]
    opt = lambda e, k: f"{e[k]:.3f}" if k in e else "n/a"  # noqa: E731

    def stream(e: dict) -> str:
        if "stream_accuracy" not in e:
            return "n/a"
        return f"{e['stream_accuracy']:.3f} (window to step {e.get('stream_step', e['step'])})"

    checkpoints = _h3_checkpoints(online, off_default, uniform[:1])
    rows = [
        [
            f"{label} ({r['name']}, step {e['step']})",
            f"{e['accuracy']:.3f}",
            opt(e, "train_accuracy"),
            stream(e),
            opt(e, "self_accuracy"),
            f"{e['drift']:.2f}",
            f"{e['train_drift']:.2f}" if "train_drift" in e else "n/a",
            f"{e['win_rate']:.3f}",
        ]
        for label, r, e in checkpoints
    ]
    last = online["evals"][-1]
    proxy_stream = (
        dict(last, stream_accuracy=last["stream_proxy_accuracy"])
        if ("stream_proxy_accuracy" in last)
        else {}
    )
    rows.append(["proxy PM", f"{proxy_acc:.3f} ({proxy_split} split)", "", stream(proxy_stream)])
    rows[-1] += ["", "", "", ""]
    header = [
        "policy (run, checkpoint)",
        "accuracy on valid-split pairs (golden labels)",
        "accuracy on D_golden's training pairs",
        "accuracy on the online stream",
        "self-classification (E.1)",
        "drift of log pi(y_w), valid split",
        "drift on D_golden's training pairs",
        "win rate",
    ]
    lines.append(table(header, rows))
    read_at = [e["step"] for label, r, e in checkpoints if r is off_default]
    lines += [
        "",
        "The runs are single runs at the default settings, as the paper's Fig. 6-8: online, "
        "offline on D_golden at online's lr and beta"
        + (
            ", and offline on the online stream uniformly shuffled (the paper's tandem of Fig. 8)"
            if uniform
            else ""
        )
        + f". The offline run trains {off_default['evals'][-1]['step']} steps; it is read at "
        + (
            f"step {read_at[0]}, its checkpoint nearest online's {online['evals'][-1]['step']} "
            "steps (the paper's Fig. 6 trains both 4k steps), and at its end. "
            if len(read_at) > 1
            else "its end. "
        )
        + "Accuracy and drift on golden-labelled pairs of the valid split (held out from "
        "every run) and on as many of D_golden's own training pairs (the set the paper's Fig. 8 "
        "reads: those that offline runs on D_golden read first, so in-sample for every "
        "offline checkpoint after its first few steps; out of sample for online and the "
        "shuffled stream, whose pairs are their own samples, although on a real dataset "
        "online's prompts come from the same train split; n/a: an evaluation of older "
        "code). "
        "Online-stream accuracy: on the last 64 pairs of the online IPO run's stream before "
        "its k-th evaluation, relabelled by the golden PM, for every run's k-th checkpoint "
        "(Fig. 6): the window is named, since runs of other lengths meet other windows at a "
        "step. For online IPO (and its exact replay) that window is in-sample: the checkpoint "
        "has just trained on those pairs, under the proxy's labels (the paper reads its final "
        "policies on every window, in-sample throughout); a shuffled replay has seen part of "
        "it, offline on D_golden none of it. "
        "Self-classification: on pairs of the policy's own two samples per prompt, "
        "labelled by the golden PM (App. E.1).",
        "",
        f"Proxy PM accuracy on golden-labelled pairs ({proxy_split} split): {proxy_acc:.3f}. "
        "**Verdict:** " + classification_verdict(online, off_default, uniform[:1]),
    ]
    if fig9:
        lines += [
            "",
            "## H4, non-contrastive losses (Fig. 9): Best-of-2",
            "",
            "![fig9](figures/fig9_best_of_2.png)",
            "",
            table(PEAK_HEADER, _peak_rows({r["method"]: [r] for r in fig9})),
            "",
            f"**Verdict:** {bo2_verdict(fig9)}",
        ]
    if beyond:
        lines += [
            "",
            "## Beyond the paper: semi-online IPO and HyPO",
            "",
            "![beyond](figures/beyond_semi_online_hypo.png)",
            "",
            table(PEAK_HEADER, _peak_rows({r["method"]: [r] for r in [online, *beyond]})),
            "",
            f"**Verdict:** {beyond_verdict(p_on, beyond, online)}",
        ]
    if "fig10" in results:
        lines += scaling_section(results["fig10"], figs)
    path = workdir / "REPORT.md"
    jsonl.write_atomic(path, "\n".join(lines) + "\n")
    return path


# The methods of the uniformly shuffled replays (`study_experiments.uniform_shuffles`): the
# run at online's lr and beta, and the other points of the offline grid.
UNIFORM = "offline ipo (shuffled uniform)"
UNIFORM_SWEEP = "offline ipo (shuffled uniform, lr x beta sweep)"
# Fig. 9's third run: offline Best-of-2 on the online Bo2 stream uniformly shuffled.
SHUFFLED_BO2 = "offline bo2 (shuffled uniform)"


def same_settings(r: dict, online: dict) -> bool:
    """Whether run `r` trained at online's learning rate and beta."""
    return all(math.isclose(r[k], online[k], rel_tol=1e-9) for k in ("lr", "beta"))


def _replay_label(r: dict, online: dict) -> str:
    """A replay's row label: its method, and its lr and beta where they are not online's."""
    if same_settings(r, online):
        return r["method"]
    return f"{r['method']}: lr {r['lr']:g}, beta {r['beta']:g}"


def tandem_identical(tandem: dict) -> tuple[bool, str]:
    """(whether the exact replay is the online run, in what sense): its parameters compared
    bit for bit (`param_leaves_differing_in_bits`) and every loss equal; a summary of older
    code holds only the largest parameter difference, a comparison by value (-0 = +0)."""
    losses = tandem["max_loss_dev_to_online"] == 0
    if "param_leaves_differing_in_bits" in tandem:
        return losses and tandem["param_leaves_differing_in_bits"] == 0, "bit-identical"
    same = tandem["max_param_diff_to_online"] == 0
    return losses and same, "identical by value (an older summary: no bit comparison)"


def _replay_row(r: dict, online: dict) -> list[str]:
    """Fig. 4's table row. The drift columns compare a replay with online step by step; a
    replay at another lr or beta gets none (its IPO loss is on another scale, 1/(2 beta)^2 at
    the start, and its parameters move at another rate: the gap would measure the settings,
    not the shuffle)."""
    drift = ("max_param_diff_to_online", "max_loss_dev_to_online", "mean_loss_dev_to_online")
    same = same_settings(r, online)
    cells = [f"{r[k]:.3g}" if same else "-" for k in drift]
    return [_replay_label(r, online), *cells, peak([r]).cell()]


def _uniform_verdict(shuffled: Sequence[dict], p_on: Peak) -> list[str]:
    """H1's verdict lines: the uniformly shuffled replay at online's lr and beta against
    online, and, where there is a sweep, the best over every uniformly shuffled run (the
    paper's Fig. 4 pools shuffled runs over lr and beta)."""
    first = [r for r in shuffled if r["method"] == UNIFORM]
    uniform = first + [r for r in shuffled if r["method"] == UNIFORM_SWEEP]
    if not first:
        return []
    same = compare(peak(first), p_on, "shuffled", "online")
    lines = [f"Uniform shuffle at online's lr and beta: {same}."]
    if len(uniform) > 1:
        pooled = compare(peak(uniform), p_on, "shuffled (best of the sweep)", "online")
        lines.append(
            f"Pooled over {len(uniform)} uniformly shuffled runs (lr x beta, as the paper's "
            f"Fig. 4; the best of many checkpoints, which favours the pool): {pooled}."
        )
    return lines


def _shuffle_vs_offline(shuffled: Sequence[dict], offline: Sequence[dict], online: dict):
    """H1's other half: the paper's Fig. 4 finds "little improvement on the offline
    performance" from offline on D_golden to offline on the shuffled online stream. Both at
    online's lr and beta, and both pools (the shuffled runs train as many steps as online,
    the offline ones `offline_steps_factor` times more)."""
    first = [r for r in shuffled if r["method"] == UNIFORM]
    pool = first + [r for r in shuffled if r["method"] == UNIFORM_SWEEP]
    if not first or not offline:
        return []
    same = compare(peak(first), peak([offline_same(offline, online)]), "shuffled", "offline")
    sign, _ = separation(peak(pool), peak(offline))
    pooled = compare(peak(pool), peak(offline), "shuffled (pooled)", "offline (pooled)")
    if sign > 0:
        end = (
            "Pooled, as the paper's Fig. 4 compares them: unlike the paper, which found little "
            "improvement from D_golden to the shuffled online stream, the shuffled stream is "
            "the better dataset for offline IPO here."
        )
    elif sign < 0:
        end = (
            "Pooled, as the paper's Fig. 4 compares them: unlike the paper, offline on "
            "D_golden is ahead of the shuffled online stream here."
        )
    else:
        end = (
            "Pooled, as the paper's Fig. 4 compares them: as the paper found, the shuffled "
            "online stream brings no measurable improvement."
        )
    if separation(peak(first), peak([offline_same(offline, online)]))[0] != sign:
        end += " (At online's lr and beta alone the comparison comes out otherwise.)"
    return [
        f"Against offline on D_golden (the paper's Fig. 4 draws both): at online's lr and "
        f"beta, {same}; over both pools (best checkpoints), {pooled}. {end}"
    ]


def _level_verdict(shuffled: Sequence[dict], p_on: Peak) -> list[str]:
    """Fig. 13: each windowed shuffle (w steps shuffled together) against online."""
    levels = [r for r in shuffled if r["method"] not in (UNIFORM, UNIFORM_SWEEP)]
    if not levels:
        return []
    label = lambda r: r["method"].removeprefix("offline ipo (shuffled ").rstrip(")")  # noqa: E731
    parts = [f"{label(r)}: {compare(peak([r]), p_on, label(r), 'online')}" for r in levels]
    return [
        "Shuffle levels (Fig. 13; the paper: performance holds for small windows, then falls "
        "towards the uniform shuffle's): " + "; ".join(parts) + "."
    ]


def _h3_checkpoints(online: dict, off_default: dict, shuffled: Sequence[dict]):
    """(label, run, evaluation) rows of H3's table: online's and the shuffled replay's last
    checkpoints, and the default offline run at its checkpoint nearest online's step count
    (the earlier on a tie) and at its end."""
    last = online["evals"][-1]["step"]
    out = [("online", online, online["evals"][-1])]
    evals = [e for e in off_default["evals"] if e["step"] > 0]
    near = min(evals, key=lambda e: (abs(e["step"] - last), e["step"]))
    if near is not off_default["evals"][-1]:
        out.append(("offline, near online's step count", off_default, near))
    out.append(("offline, at its end", off_default, off_default["evals"][-1]))
    out += [("shuffled (tandem)", r, r["evals"][-1]) for r in shuffled]
    return out


def bo2_verdict(fig9: Sequence[dict]) -> str:
    """H4: online vs offline Best-of-2, and the third run: the uniformly shuffled replay of
    the online Bo2 stream, which the paper found on par with online (its "data coverage
    might play a bigger role here"); an exact-order replay in summaries of older code."""
    b_on, b_off, b_third = (peak([r]) for r in fig9)
    text = compare(b_on, b_off, "online Bo2", "offline Bo2") + "; "
    third = fig9[2]
    if third["method"] != SHUFFLED_BO2:  # older code: the exact-order replay
        return text + (
            "the exact-order Bo2 replay's max parameter difference to online: "
            f"{third['max_param_diff_to_online']:.3g}."
        )
    sign, _ = separation(b_third, b_on)
    said = compare(b_third, b_on, "shuffled Bo2", "online Bo2")
    if sign == 0:
        end = (
            "offline Bo2 on the shuffled online stream is not separated from online, "
            "consistent with the paper's finding (on par), though not separated is not shown equal"
        )
    elif sign > 0:
        end = "offline Bo2 on the shuffled online stream is above online (the paper: on par)"
    else:
        end = "online Bo2's peak stays above offline Bo2's on its own shuffled stream"
    text += f"{said}: {end}."
    if sign < 0 and b_on.kl > b_third.kl:  # the paper compares trade-off curves, not peaks
        at, d = _paired_against_curve(b_third, fig9[0]["evals"])
        text += (
            f" The paper compares trade-off curves: online's peak lies at KL {b_on.kl:.2f}, "
            f"the shuffled run's at KL {b_third.kl:.2f}, where online's curve (interpolated "
            f"between its checkpoints) is at {at:.3f}"
        )
        if d is not None:
            side = "above" if d.lo > 0 else "below"
            text += (
                f"; paired over the evaluation prompts (online's judgements interpolated "
                f"alike, so online's evaluation noise is counted; not the KLs' noise, nor the "
                f"choice of the shuffled run's best checkpoint), the shuffled peak minus "
                f"online's curve is {d.mean:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]: "
                + (
                    "not distinguishable from online's curve at that KL (consistent with the "
                    "paper's same curve), so online's higher peak may come from reaching a "
                    "larger KL."
                    if interval_sign(d) == 0
                    else f"{side} online's curve at that KL; unlike the paper, the curves differ"
                    " there"
                    + (
                        " (though a straight line between checkpoints lies below a curve that"
                        " flattens, which favours the shuffled run)."
                        if d.lo > 0
                        else "."
                    )
                )
            )
        else:  # summaries of older code: no per-prompt judgements to pair
            close = b_third.lo <= at <= b_third.hi
            text += ", " + (
                "inside the shuffled peak's 95% interval: not distinguishable from online's "
                "curve at that KL (consistent with the paper's same curve; online's own "
                "uncertainty is not counted), so online's higher peak may come from reaching a "
                "larger KL."
                if close
                else "outside the shuffled peak's 95% interval: unlike the paper, the curves "
                "differ at that KL."
            )
    return text


def _curve_at(evals: Sequence[dict], kl: float) -> tuple[float, np.ndarray | None]:
    """A run's win rate at `kl`, linear between the two checkpoints that bracket it by KL
    (the nearer end outside them; KL ties in step order), and its per-prompt judgements
    interpolated with the same weights (None where a checkpoint with weight lacks them, or
    two cover different prompt counts)."""
    if not all(math.isfinite(e["kl"]) for e in evals):
        raise ValueError(f"KL {[e['kl'] for e in evals]}: a checkpoint's KL is not finite")
    pts = sorted(evals, key=lambda e: (e["kl"], e["step"]))
    j = int(np.searchsorted([e["kl"] for e in pts], kl))
    a, b = pts[max(j - 1, 0)], pts[min(j, len(pts) - 1)]
    t = (kl - a["kl"]) / (b["kl"] - a["kl"]) if b["kl"] > a["kl"] else 0.0
    win = (1 - t) * a["win_rate"] + t * b["win_rate"]
    used = [(e, w) for e, w in ((a, 1 - t), (b, t)) if w > 0]  # a weight-0 end need not judge
    if any(e.get("win_outcomes") is None for e, _ in used):
        return win, None
    values = [outcome_values(e["win_outcomes"]) for e, _ in used]
    if len({len(v) for v in values}) > 1:
        return win, None
    return win, sum(w * v for (_, w), v in zip(used, values, strict=True))


def _paired_against_curve(p: Peak, evals: Sequence[dict]) -> tuple[float, Interval | None]:
    """A run's curve at p's KL (`_curve_at`), and p minus that curve paired over the
    evaluation prompts (None where either lacks per-prompt judgements)."""
    at, curve = _curve_at(evals, p.kl)
    mine = None if p.outcomes is None else outcome_values(p.outcomes)
    if curve is not None and mine is not None and len(mine) == len(curve) > 0:
        return at, paired_interval(mine - curve)
    return at, None


def matched_kl(p: Peak, p_on: Peak, online: dict) -> tuple[float, Interval | None] | None:
    """p against online's trade-off curve at p's KL (`_paired_against_curve`), where p lies
    at a smaller KL than online's peak; None otherwise, or where a KL of online's checkpoints
    is not finite (no curve to read)."""
    if p.kl >= p_on.kl or not kls_finite(online):
        return None
    return _paired_against_curve(p, online["evals"])


def kls_finite(run: dict) -> bool:
    return all(math.isfinite(e["kl"]) for e in run["evals"])


def offline_same(offline: Sequence[dict], online: dict) -> dict:
    """The offline sweep run with online's lr and beta (else the first)."""
    for r in offline:
        if same_settings(r, online):
            return r
    return offline[0]


def goodhart_verdict(online: dict) -> str:
    """Does the online run over-optimise its proxy PM? Its win rate judged by the proxy (the
    signal it trains on) against the golden PM's judgement of the same samples; on the
    embedded task, then, do both PMs get over-optimised against the hidden humans
    (`_hidden_goodhart`)?"""
    ev = [e for e in online["evals"] if "proxy_win_rate" in e]
    first, last = ev[0], ev[-1]
    top = max(ev, key=lambda e: e["win_rate"])
    if last["win_rate"] >= top["win_rate"]:  # a tie with an earlier peak: it peaks at the end
        top = last
    text = (
        f"judged by the proxy PM, online IPO's win rate goes from {first['proxy_win_rate']:.3f} "
        f"(step {first['step']}) to {last['proxy_win_rate']:.3f} (step {last['step']}, KL "
        f"{last['kl']:.2f}); judged by the golden PM, from {first['win_rate']:.3f} to "
        f"{last['win_rate']:.3f}, with its peak {top['win_rate']:.3f} at step {top['step']}. "
    )
    rising = last["proxy_win_lo"] > first["proxy_win_hi"]
    if top is last:
        text += (
            "No over-optimisation of the proxy within this run: the golden win rate peaks at "
            "the last checkpoint (a longer run, to a larger KL, would show whether it turns "
            "over)."
        )
    elif rising and top["win_lo"] > last["win_hi"]:
        text += (
            "The proxy's win rate rose (intervals disjoint) while the golden one fell from its "
            "peak (intervals disjoint): the policy over-optimises the proxy PM."
        )
    else:
        text += (
            "The golden win rate ends below its peak but the fall, or the proxy's rise, is not "
            "separated by the 95% intervals: no clear over-optimisation at this sample size."
        )
    return text + (" " + _hidden_goodhart(ev) if has_hidden(online) else "")


def has_hidden(run: dict) -> bool:
    """Whether every checkpoint of the run past step 0 was also judged by the task's hidden
    humans (the embedded task, from e129b3f on; `eval.Evaluator.hidden`). Step 0, the SFT
    policy's evaluation, is a stage of its own, which a study begun by older code keeps."""
    ev = [e for e in run["evals"] if e["step"]]
    return bool(ev) and all("hidden_p" in e for e in ev)


def as_hidden(run: dict) -> dict:
    """The run with each checkpoint's win rate judged by the hidden humans in place of the
    golden PM (for the figures' KL vs win-rate axes; a checkpoint they did not judge is
    left out)."""
    return dict(run, evals=plots.judged_by([e for e in run["evals"] if "hidden_p" in e], "hidden"))


def majority_win_rate(e: dict) -> float:
    """The humans' majority verdict's win rate at a checkpoint (`eval.hidden_majority`): what
    a golden PM that always sided with the humans would score, on the golden PM's scale."""
    return float(hidden_majority(e["hidden_p"]).mean())


def _eval_of(runs: Sequence[dict], run: str, step: int) -> dict:
    r = next(r for r in runs if r["name"] == run)
    return next(e for e in r["evals"] if e["step"] == step)


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v), np.float64)
    ranks[order] = np.arange(1, len(v) + 1)
    for value in np.unique(v):
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(points: Sequence[tuple[float, float]]) -> float:
    """Spearman's rank correlation of (x, y) points: Pearson's r of their average ranks."""
    xy = np.array(points, np.float64).reshape(-1, 2)
    return _pearson(list(zip(_ranks(xy[:, 0]), _ranks(xy[:, 1]), strict=True)))


def _hidden_diff(a: dict, b: dict) -> np.ndarray:
    """Per prompt, the humans' probability of preferring a's sample minus b's (`hidden_p`)."""
    return np.array(a["hidden_p"]) - np.array(b["hidden_p"])


def _fig1_peaks(online: dict, offline: Sequence[dict], by_humans: bool):
    """Fig. 1's two peaks, online's and the pooled offline sweep's, chosen by the golden PM
    or (`by_humans`) by the hidden humans' win rate: (peak online, peak offline, their
    evaluations)."""
    view = as_hidden if by_humans else (lambda r: r)
    p_on, p_off = peak([view(online)]), peak([view(r) for r in offline])
    return (
        p_on,
        p_off,
        _eval_of([online], p_on.run, p_on.step),
        _eval_of(offline, p_off.run, p_off.step),
    )


def _hidden_fig1(online: dict, offline: Sequence[dict], by_humans: bool) -> Interval | None:
    if not (has_hidden(online) and all(has_hidden(r) for r in offline)):
        return None
    _, _, a, b = _fig1_peaks(online, offline, by_humans)
    return paired_interval(_hidden_diff(a, b))


def hidden_at_peaks(online: dict, offline: Sequence[dict]) -> Interval | None:
    """Fig. 1's comparison judged by the hidden humans: online - offline, prompt by prompt, of
    their probabilities of preferring each peak checkpoint's sample to the baseline's, at the
    peaks the golden PM chose (`peak`). None where the runs carry no hidden judgements."""
    return _hidden_fig1(online, offline, by_humans=False)


def hidden_own_peaks(online: dict, offline: Sequence[dict]) -> Interval | None:
    """Fig. 1 as the hidden humans would draw it: online - offline, prompt by prompt, at the
    peaks the humans choose (each run's best checkpoint by their win rate; offline pooled).
    None where the runs carry no hidden judgements."""
    return _hidden_fig1(online, offline, by_humans=True)


def golden_agreement(e: dict) -> float | None:
    """The share of a checkpoint's win-rate comparisons on which the golden PM's judgement
    (W/T/L) equals the hidden humans' majority verdict (`eval.hidden_majority`): the golden
    PM's accuracy on that policy's samples against the baseline's (None without per-prompt
    outcomes)."""
    if not e.get("win_outcomes"):
        return None
    return float(np.mean(outcome_values(e["win_outcomes"]) == hidden_majority(e["hidden_p"])))


def _hidden_cell(e: dict) -> str:
    lo, hi = max(0.0, e["hidden_win_lo"]), min(1.0, e["hidden_win_hi"])
    return f"{e['hidden_win_rate']:.3f} [{lo:.3f}, {hi:.3f}]"


def hidden_verdict(
    online: dict,
    offline: Sequence[dict],
    every_run: Sequence[dict],
    test_agreement: float | None = None,
    reference_agreement: float | None = None,
) -> str:
    """H0 judged by the embedded task's hidden humans, past both PMs (whose verdicts are the
    study's): (1) the peaks the golden PM chose, online's and offline's, compared by the
    humans prompt by prompt (`hidden_p`: each prompt's probability that they prefer the
    checkpoint's sample to the baseline's), with the golden PM's agreement with the humans'
    majority on each (`golden_agreement`); (2) the peaks the humans would choose, compared the
    same way; (3) how well the golden PM ranks checkpoints as the humans' majority does:
    Spearman's rank correlation of its win rate and the majority's (`majority_win_rate`, the
    same scale) over every checkpoint past step 0 of `every_run` (1 for a golden PM that
    always sided with the humans). `test_agreement`: the golden PM's accuracy against the
    hidden reward on the test split's pairs (the pipeline's), set beside (1)'s;
    `reference_agreement`: the feature judge's on the same pairs (`embedded_task.feature_judge`,
    what the golden PM's labels allow)."""
    p_on, p_off, e_on, e_off = _fig1_peaks(online, offline, by_humans=False)
    golden_sign, _ = separation(p_on, p_off)

    def paired(a: dict, b: dict) -> tuple[Interval, str]:
        diff = _hidden_diff(a, b)
        d = paired_interval(diff)
        return d, f"{d.mean:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]" + exact_branch_note(diff)

    d, d_text = paired(e_on, e_off)
    sign = interval_sign(d)
    if sign == 0:
        agree = "the humans do not separate them"
    elif sign == golden_sign:
        agree = "the humans agree with the golden PM's verdict"
    elif golden_sign == 0:
        agree = "the humans separate them where the golden PM did not"
    else:
        agree = "the humans rank them the other way from the golden PM"
    text = (
        f"at the peaks the golden PM chose, the hidden humans prefer online's samples (step "
        f"{p_on.step}) to the golden baseline's with probability {_hidden_cell(e_on)} and "
        f"offline's ({p_off.run}, step {p_off.step}) with {_hidden_cell(e_off)}; paired over "
        f"the same {d.n} prompts, online - offline = {d_text}: {agree}."
    )
    g_on, g_off = golden_agreement(e_on), golden_agreement(e_off)
    if g_on is not None and g_off is not None:
        text += (
            f" On those comparisons the golden PM sides with the humans' majority on "
            f"{g_on:.3f} of online's and {g_off:.3f} of offline's"
            + (
                f" (on the test split's pairs of D_initial's responses it agrees with the hidden "
                f"reward on {test_agreement:.3f}"
                + (
                    f", where a logistic judge on the hidden reward's text features, fit to the "
                    f"same human labels, agrees on {reference_agreement:.3f}"
                    if reference_agreement is not None
                    else ""
                )
                + ")"
                if test_agreement is not None
                else ""
            )
            + "."
        )
    h_on, h_off, he_on, he_off = _fig1_peaks(online, offline, by_humans=True)
    d2, d2_text = paired(he_on, he_off)
    side = {1: "online above offline", -1: "offline above online", 0: "not separated"}
    text += (
        f" Chosen by the humans themselves, online's best checkpoint is step {h_on.step} "
        f"(KL {h_on.kl:.2f}, {h_on.win:.3f}) and offline's {h_off.run} step {h_off.step} (KL "
        f"{h_off.kl:.2f}, {h_off.win:.3f}): {d2_text}, {side[interval_sign(d2)]} (each the "
        "best of its checkpoints, as the golden PM's peaks are)."
    )
    points = [
        (e["win_rate"], majority_win_rate(e)) for r in every_run for e in r["evals"] if e["step"]
    ]
    rho = spearman(points)
    return text + (
        f" Over the {len(points)} checkpoints of this report's runs, the golden PM's win rates "
        f"rank them as the humans' majority verdicts do (the win rate a golden PM that always "
        f"sided with the humans would give) with Spearman's rank correlation {rho:.3f} "
        "(1: the same order)."
    )


def _hidden_goodhart(ev: Sequence[dict]) -> str:
    """The online run's checkpoints `ev` judged by the embedded task's hidden humans: from
    their best checkpoint to the last, their win rate's paired change, beside the golden
    PM's over the same checkpoints. Where the humans' falls and the golden PM's rises (both
    intervals excluding 0), the golden PM no longer tracks the humans there. The best of the
    checkpoints is picked after the fact, which biases the fall from it downwards, as the
    report says."""
    first, last = ev[0], ev[-1]
    top = max(ev, key=lambda e: e["hidden_win_rate"])
    if last["hidden_win_rate"] >= top["hidden_win_rate"]:  # a tie with an earlier peak: the end
        top = last
    text = (
        f"Judged by the hidden humans, from {first['hidden_win_rate']:.3f} to "
        f"{last['hidden_win_rate']:.3f}, with its peak {top['hidden_win_rate']:.3f} at step "
        f"{top['step']}"
    )
    if top is last:
        return text + ", its last checkpoint: no fall by the humans within this run."
    diff = _hidden_diff(last, top)
    d = paired_interval(diff)
    g = paired_outcomes(last.get("win_outcomes"), top.get("win_outcomes"))
    text += (
        f"; from there to the end the humans' win rate changes by {d.mean:+.3f} [{d.lo:+.3f}, "
        f"{d.hi:+.3f}]"
        + exact_branch_note(diff)
        + (f" and the golden PM's by {g.mean:+.3f} [{g.lo:+.3f}, {g.hi:+.3f}]" if g else "")
        + " (paired over the prompts; the humans' peak is the best of the run's checkpoints, "
        "which biases the fall from it downwards)"
    )
    if d.hi < 0 and g is not None and g.lo > 0:
        return text + (
            ": the golden PM's win rate rises while the humans' falls, so past step "
            f"{top['step']} the golden PM, which the run's proxy PM was trained to imitate, no "
            "longer tracks the humans."
        )
    if d.hi < 0:
        return text + ": the humans' win rate falls from its peak."
    return text + ": the humans' fall from their peak is not separated."


def h2_verdict(p_on: Peak, datasets: Sequence[dict]) -> str:
    """H2: does offline IPO on datasets of online-policy samples (golden labels) reach online?
    The paper found it does not: better data alone does not close the gap."""
    name = lambda r: r["method"].removeprefix("offline ipo on ")  # noqa: E731
    below, above, tied = [], [], []
    for r in datasets:
        sign, _ = separation(peak([r]), p_on)
        (below if sign < 0 else above if sign > 0 else tied).append(name(r))
    parts = [f"{name(r)}: {compare(peak([r]), p_on, 'offline', 'online')}" for r in datasets]
    if not datasets:
        return "no dataset runs."
    if len(below) == len(datasets):
        end = (
            "Every dataset of online-policy samples leaves offline IPO below online, as the "
            "paper found: better data alone does not close the gap."
        )
    elif above:
        end = (
            f"Offline on {', '.join(above)} is above online: unlike the paper, better data "
            "closes the gap here."
        )
    else:
        end = (
            f"Not separated from online: {', '.join(tied)} (the paper found these below "
            "online); more evaluation prompts would tell."
        )
    return "; ".join(parts) + ". " + end


def beyond_verdict(p_on: Peak, runs: Sequence[dict], online: dict | None = None) -> str:
    """Semi-online and HyPO against online, and whether semi-online's peak falls as its
    refresh period s grows (s = 1 is online; s = infinity learns from pi_sft's samples);
    given the online run, each lower-KL peak against online's curve (`_matched_kl_note`)."""
    if not runs:
        return "no runs."
    parts = [
        f"{r['method']}: {compare(peak([r]), p_on, r['method'].split(' (')[0], 'online')}"
        for r in runs
    ]
    semi = sorted(
        (_refresh_period(r["method"]), peak([r])) for r in runs if r["method"].startswith("semi")
    )  # by growing s, infinity last
    text = "; ".join(parts) + "."
    if len(semi) >= 2:
        wins = [p.win for _, p in semi]
        fresh, stale = (f"s={s:g}" for s in (semi[0][0], semi[-1][0]))
        sign, evidence = separation(semi[0][1], semi[-1][1], fresh, stale)
        ends = f"{fresh} against {stale}: {evidence}"
        if all(a > b for a, b in zip(wins, wins[1:], strict=False)):
            trend = (
                f"falls as s grows, as expected if fresher samples help ({ends})"
                if sign > 0
                else "falls as s grows by its point estimates, but the freshest and the stalest"
                f" are not separated at this sample size ({ends})"
            )
        else:
            trend = f"does not fall monotonically with s ({ends})"
        by_s = ", ".join(f"s={s:g} {p.win:.3f}" for s, p in semi)
        text += f" Semi-online peak win rate by refresh period ({by_s}): it {trend}."
    if online is not None:
        text += _matched_kl_note(p_on, online, runs)
    return text


def _matched_kl_note(p_on: Peak, online: dict, runs: Sequence[dict]) -> str:
    """Each run whose peak lies at a smaller KL than online's, against online's trade-off
    curve at that KL (paired over the prompts): a lower peak reached at a smaller KL may lie
    on online's curve, as the paper's comparisons of curves (not peaks) would see it."""
    parts, level, below = [], [], []
    if not kls_finite(online):
        return " (No matched-KL reading: a KL of online's checkpoints is not finite.)"
    for r in runs:
        p = peak([r])
        if (read := matched_kl(p, p_on, online)) is None:
            continue
        at, d = read
        name = r["method"].replace("semi-online ipo (", "semi-online (")
        if d is None:  # summaries of older code: no per-prompt judgements to pair
            parts.append(f"{name} {p.win:.3f} at KL {p.kl:.2f}, online's curve {at:.3f} there")
            continue
        sign = interval_sign(d)
        (below if sign < 0 else level).append(name)
        word = {1: "above", -1: "below", 0: "not separated from"}[sign]
        parts.append(
            f"{name} at KL {p.kl:.2f}: {p.win:.3f} against online's {at:.3f}, paired "
            f"{d.mean:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}], {word} online's curve"
        )
    if not parts:
        return ""
    text = (
        " At matched KL (the trade-off view the paper takes: each peak at a smaller KL than "
        "online's against online's curve there, interpolated linearly between its checkpoints "
        "with its per-prompt judgements, so online's evaluation noise is counted, not the KLs' "
        "noise nor the choice of each run's best checkpoint; a straight line between "
        "checkpoints lies below a curve that flattens, which favours the other run): "
        + "; ".join(parts)
        + "."
    )
    if level:
        text += (
            f" {', '.join(level)} {'lie' if len(level) > 1 else 'lies'} on or above online's "
            "curve: a lower peak there comes from reaching a smaller KL, not from a worse "
            "trade-off."
        )
    if below:
        text += (
            f" {', '.join(below)} {'lie' if len(below) > 1 else 'lies'} below it: a worse "
            "trade-off, not only a smaller KL."
        )
    return text


def _refresh_period(method: str) -> float:
    """s of a method named "semi-online ipo (s=10)" (s=inf: never refreshed)."""
    return float(method.rsplit("s=", 1)[1].rstrip(")"))


def _pearson(points: Sequence[tuple[float, float]]) -> float:
    """Pearson's r of (x, y) points; nan for fewer than 3 or a constant coordinate."""
    if len(points) < 3:
        return float("nan")
    xy = np.array(points, np.float64).T
    if np.ptp(xy[0]) == 0 or np.ptp(xy[1]) == 0:
        return float("nan")
    return float(np.corrcoef(xy)[0, 1])


def classification_verdict(online: dict, offline: dict, shuffled: Sequence[dict] = ()) -> str:
    """H3 (Fig. 7): does a policy's accuracy as a classifier explain the gap? The paper:
    offline becomes the more accurate classifier yet stays the weaker policy, and accuracy
    and win rate show little positive correlation. Here: the contrast of the two runs (last
    checkpoints' accuracy, point estimates; peak win rates, paired), each run's own
    correlation over its checkpoints (successive states of one run, not independent samples,
    so no interval), and the pooled one, which mixes the runs' levels with their trends."""
    runs = [("online", online), ("offline", offline), *(("shuffled", r) for r in shuffled)]
    points = lambda r: [(e["accuracy"], e["win_rate"]) for e in r["evals"] if e["step"]]  # noqa: E731
    said = lambda r: "n/a" if math.isnan(r) else f"{r:+.2f}"  # noqa: E731
    within = ", ".join(f"{label} {said(_pearson(points(r)))}" for label, r in runs)
    pooled = said(_pearson(points(online) + points(offline)))
    last_on, last_off = online["evals"][-1], offline["evals"][-1]
    acc_on, acc_off = last_on["accuracy"], last_off["accuracy"]
    p_on, p_off = peak([online]), peak([offline])
    sign, evidence = separation(p_on, p_off, "online", "offline")
    contrast = _accuracy_contrast(last_off, last_on, "accuracy_outcomes")
    if contrast is not None:
        acc_sign, acc_evidence = interval_sign(contrast[0]), contrast[1]
    else:  # evaluations of older code kept no per-pair results
        acc_sign, acc_evidence = 0, "no per-pair results to compare (an older evaluation)"
    text = (
        f"offline's last checkpoint classifies {acc_off:.3f} of the valid-split pairs (golden "
        f"labels) right, online's {acc_on:.3f} ({acc_evidence}); their peak win rates are "
        f"{p_off.win:.3f} and {p_on.win:.3f} ({evidence}): "
    )
    if acc_sign > 0 and sign > 0:
        text += (
            "as the paper found, the more accurate classifier is the weaker policy, so accuracy "
            "does not explain the gap."
        )
    elif acc_sign > 0 and sign == 0:
        text += (
            "offline is the more accurate classifier, as in the paper, but the two policies "
            "are not separated at this sample size."
        )
    elif acc_sign < 0 and sign > 0:
        text += (
            "unlike the paper, online is both the more accurate classifier and the better policy."
        )
    elif acc_sign == 0 and sign > 0:
        text += (
            "online is the better policy, but the two classifiers' accuracies are not "
            "separated on these pairs: no evidence either way on the paper's contrast."
        )
    else:
        text += "the runs do not show the paper's contrast (offline more accurate, online better)."
    return (
        text
        + _train_pairs_contrast(last_on, last_off)
        + (
            f" Within each run, accuracy and win rate over its checkpoints correlate with r = "
            f"{within} (successive states of one run: no interval; n/a under 3 checkpoints or "
            f"for a constant); pooled over online's and offline's checkpoints r = {pooled}, which "
            "mixes the two runs' levels with their trends. The paper found little positive "
            "correlation."
        )
    )


def _accuracy_contrast(last_off: dict, last_on: dict, field: str) -> tuple[Interval, str] | None:
    """Offline - online accuracy pair by pair from two evaluations' per-pair results `field`,
    with its words, or None where either lacks them (evaluations of older code)."""
    pairs_off, pairs_on = last_off.get(field), last_on.get(field)
    d = paired_outcomes(pairs_off, pairs_on)
    if d is None:
        return None
    return d, (
        f"paired difference offline - online {d.mean:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}] "
        f"over the same {d.n} pairs"
        + exact_branch_note(outcome_values(pairs_off) - outcome_values(pairs_on))
    )


def _train_pairs_contrast(last_on: dict, last_off: dict) -> str:
    """The classifier contrast of `classification_verdict` again on D_golden's training pairs
    (the paper's Fig. 8 set), "" where an evaluation lacks them (older code)."""
    contrast = _accuracy_contrast(last_off, last_on, "train_accuracy_outcomes")
    if contrast is None:
        return ""
    d, evidence = contrast
    said = {
        1: "offline the more accurate classifier there, as the paper found",
        -1: "online the more accurate classifier there, unlike the paper",
        0: "the two not separated there",
    }[interval_sign(d)]
    return (
        f" On D_golden's own training pairs (the paper's Fig. 8 set: those offline read "
        f"first, in-sample for it), offline classifies {last_off['train_accuracy']:.3f} "
        f"right and online {last_on['train_accuracy']:.3f} ({evidence}): {said}."
    )


def ratio(a: float, online: float) -> float:
    """a / online, NaN (printed as such) where online's win rate is 0."""
    return a / online if online else float("nan")


def quantile_win(runs: Sequence[dict], q: float = 0.9) -> float:
    """The q-quantile of win rates over all checkpoints of the runs (step 0 excluded)."""
    return float(np.quantile(_checkpoint_wins(runs), q))


BOOTSTRAP_DRAWS = 2000


def _outcome_matrix(runs: Sequence[dict]) -> np.ndarray | None:
    """(checkpoints, prompts) judgements of the runs' evaluations (step 0 excluded), or None
    where one lacks per-prompt outcomes (summaries of older code)."""
    texts = [e.get("win_outcomes") for r in runs for e in r["evals"] if e["step"] > 0]
    if not texts or not all(texts) or len({len(t) for t in texts}) != 1:
        return None
    return np.stack([outcome_values(t) for t in texts])


def _size_outcomes(sizes: Sequence[dict], key: str) -> list[tuple] | None:
    """Per size, (online, `key`) outcome matrices over the same prompts; None without
    per-prompt outcomes everywhere or where the prompt counts differ."""
    mats = [(_outcome_matrix(s["online"]), _outcome_matrix(s[key])) for s in sizes]
    if any(m is None for pair in mats for m in pair):
        return None
    if len({m.shape[1] for pair in mats for m in pair}) != 1:
        return None
    return mats


def _ratios(mats: list[tuple], wins, q: float) -> np.ndarray | None:
    """(rows, sizes): q-quantile ratio of each size's pair, where `wins(mat)` gives the
    (rows, checkpoints) win rates under each row's reweighting of the prompts; None where
    online's quantile is 0 in some row (no ratio there)."""
    rows = []
    for on, other in mats:
        q_on = np.quantile(wins(on), q, axis=1)
        if np.any(q_on <= 0):
            return None
        rows.append(np.quantile(wins(other), q, axis=1) / q_on)
    return np.stack(rows, axis=1)


def bootstrap_ratios(
    sizes: Sequence[dict], key: str, draws: int = BOOTSTRAP_DRAWS, seed: int = 0, q: float = 0.9
) -> np.ndarray | None:
    """(draws, sizes): the q-quantile ratio `key` / online per size, with the evaluation
    prompts resampled with replacement. Every checkpoint of every method and size is judged
    on the same prompts against the same baseline samples, so each draw resamples them all
    alike (a fixed seed: the same draws for "offline" and "shuffled"). It holds evaluation
    noise only, not training noise. None without per-prompt outcomes everywhere, or where
    online's quantile is 0 in a resample (no ratio there)."""
    mats = _size_outcomes(sizes, key)
    return None if mats is None else _bootstrap(mats, draws, seed, q)


def _bootstrap(mats: list[tuple], draws: int, seed: int, q: float) -> np.ndarray | None:
    n = mats[0][0].shape[1]
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=draws) / n
    return _ratios(mats, lambda m: weights @ m.T, q)


@dataclasses.dataclass(frozen=True)
class RatioResamples:
    """The q-quantile ratio `key` / online per size: on the prompts as judged (`point`,
    (sizes,)), in bootstrap resamples of them (`boot`, (draws, sizes), `bootstrap_ratios`)
    and with each prompt left out in turn (`jack`, (prompts, sizes)): what BCa intervals
    need."""

    point: np.ndarray
    boot: np.ndarray
    jack: np.ndarray

    def intervals(self, level: float = 0.95) -> np.ndarray:
        """(sizes, 2): each ratio's BCa interval."""
        return bca_interval(self.boot, self.point, self.jack, level)

    def narrowing(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """The BCa and the percentile interval of the gap's narrowing
        |1 - r_first| - |1 - r_last|. |1 - r| folds at r = 1: where a ratio's interval
        contains 1, resamples at and across 1 all count as a gap, which pulls that end's
        gap away from 0 (`_fold_rule` says what a verdict may claim there)."""
        return self._of(lambda t: gap_narrowing(t[..., 0], t[..., -1]), level)

    def unfolded(self) -> bool:
        """Whether every value at both ends (point, resamples, jackknife) lies on one side
        of 1: then the narrowing is the ratio's change up to sign, draw by draw, and says it
        all."""
        return one_side_of_1(np.concatenate([self.point[None], self.boot, self.jack])[:, [0, -1]])

    def percentiles(self, level: float = 0.95) -> np.ndarray:
        """(sizes, 2): each ratio's percentile interval (`intervals` gives BCa's)."""
        return np.percentile(self.boot, [50 * (1 - level), 50 * (1 + level)], axis=0).T

    def change(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """The BCa and the percentile interval of the ratio's own change r_last - r_first:
        smooth everywhere, no fold at 1."""
        return self._of(lambda t: t[..., -1] - t[..., 0], level)

    def _of(self, stat, level: float) -> tuple[np.ndarray, np.ndarray]:
        """The BCa and the percentile interval of a statistic of the sizes' ratios."""
        draws = stat(self.boot)
        bca = bca_interval(draws[:, None], stat(self.point)[None], stat(self.jack)[:, None], level)
        tails = 50 * (1 - level), 50 * (1 + level)
        return bca[0], np.percentile(draws, tails)


def gap_narrowing(first, last):
    """How much the gap |1 - r| closes from the first size's ratio to the last's (> 0:
    narrows); floats or arrays."""
    return np.abs(1 - first) - np.abs(1 - last)


def one_side_of_1(values) -> bool:
    """Whether every value lies strictly on one side of 1 (NaN: no): there |1 - r| is linear
    in r, and a change of the gap is a change of the ratio, up to sign."""
    v = np.asarray(values, np.float64)
    return bool(np.all(v < 1) or np.all(v > 1))


def ratio_resamples(
    sizes: Sequence[dict], key: str, draws: int = BOOTSTRAP_DRAWS, seed: int = 0, q: float = 0.9
) -> RatioResamples | None:
    """`RatioResamples` of `key` / online; None where `bootstrap_ratios` is."""
    mats = _size_outcomes(sizes, key)  # parsed once for the three
    boot = None if mats is None else _bootstrap(mats, draws, seed, q)
    if boot is None:
        return None
    n = mats[0][0].shape[1]
    point = _ratios(mats, lambda m: m.mean(axis=1)[None], q)
    jack = _ratios(mats, lambda m: (m.sum(axis=1)[None] - m.T) / (n - 1), q)
    if point is None or jack is None:
        return None
    return RatioResamples(point[0], boot, jack)


_NORMAL = statistics.NormalDist()


def bca_interval(
    boot: np.ndarray, point: np.ndarray, jack: np.ndarray, level: float = 0.95
) -> np.ndarray:
    """(k, 2): Efron's bias-corrected and accelerated bootstrap interval of each of k
    statistics, from their bootstrap draws (draws, k), their values on the data (k,) and
    their jackknife values (n, k). The percentile interval's levels are moved by the median
    bias z0 (the share of draws below the value, ties counted half) and the acceleration a
    (the jackknife's skewness): a percentile interval of a skewed statistic, such as a high
    quantile over checkpoints, sits off-centre; BCa corrects that to second order. With
    draws symmetric about the value and a = 0 it is the percentile interval."""
    draws = boot.shape[0]
    out = np.empty((boot.shape[1], 2))
    for i in range(boot.shape[1]):
        col, value = boot[:, i], point[i]
        share = (np.sum(col < value) + 0.5 * np.sum(col == value)) / draws
        z0 = _NORMAL.inv_cdf(min(max(share, 0.5 / draws), 1 - 0.5 / draws))
        d = jack[:, i].mean() - jack[:, i]
        ss = float(np.sum(d**2))
        a = float(np.sum(d**3)) / (6 * ss**1.5) if ss > 0 else 0.0
        levels = []
        for tail in ((1 - level) / 2, (1 + level) / 2):
            z = z0 + _NORMAL.inv_cdf(tail)
            denom = 1 - a * z
            levels.append(_NORMAL.cdf(z0 + z / denom) if denom > 0 else float(tail > 0.5))
        out[i] = np.quantile(col, levels)
    return out


def _gap_trend(
    label: str, ratios: Sequence[float], sizes: Sequence[dict], res: RatioResamples | None
) -> str:
    """How `label`/online moves from the smallest to the largest size. The gap is
    |1 - ratio| whichever side is ahead: a ratio above 1 that grows is the other method
    pulling further ahead of online, not the gap narrowing. With `res` (`ratio_resamples`)
    the narrowing's 95% intervals, BCa and percentile, must both exclude 0 for "narrows" or
    "widens": BCa corrects the percentile interval's skew where the draws are smooth, and
    can claim too much where a change rests on a handful of prompts (discrete draws), where
    the percentile interval does not. |1 - r| folds at 1: where an end's ratio interval
    contains 1 the verdict may be withheld (`_fold_rule`). Unless every value at both ends
    lies on one side of 1 (`RatioResamples.unfolded`), the ratio's own change r_last -
    r_first, smooth everywhere, is given beside it."""
    d = gap_narrowing(ratios[0], ratios[-1])
    ahead = [s["model"] for s, r in zip(sizes, ratios, strict=True) if r > 1]
    text = (
        f"{label.capitalize()}/online goes from {ratios[0]:.3f} ({sizes[0]['model']}) to "
        f"{ratios[-1]:.3f} ({sizes[-1]['model']}): "
    )
    if res is not None:
        (lo, hi), (p_lo, p_hi) = res.narrowing()
        (c_lo, c_hi), (cp_lo, cp_hi) = res.change()
        bca, pct = res.intervals(), res.percentiles()  # each once: BCa loops over the sizes
        first, last = (any(a <= 1 <= b for a, b in (bca[i], pct[i])) for i in (0, -1))
        sign = 1 if min(lo, p_lo) > 0 else -1 if max(hi, p_hi) < 0 else 0
        held = _fold_rule(sign, first, last)
        word = {
            1: "the gap narrows with size",
            -1: "the gap widens with size",
            0: "the gap's change with size is not separated from 0 at this sample size",
        }[held]
        text += (
            f"{word} (narrowing {d:+.3f}; 95% bootstrap intervals over the evaluation "
            f"prompts: BCa [{lo:+.3f}, {hi:+.3f}], percentile [{p_lo:+.3f}, {p_hi:+.3f}]; "
            "separated only where both exclude 0"
            + (
                ")."
                if res.unfolded()
                else f". The ratio itself moves {ratios[-1] - ratios[0]:+.3f}, BCa "
                f"[{c_lo:+.3f}, {c_hi:+.3f}], percentile [{cp_lo:+.3f}, {cp_hi:+.3f}])."
            )
        )
        at_one = [sizes[i]["model"] for i, at in ((0, first), (-1, last)) if at]
        if held != sign:
            end, verb = (
                (sizes[0]["model"], "narrow from")
                if sign > 0
                else (sizes[-1]["model"], "have widened to")
            )
            text += (
                f" But the ratio's interval contains 1 at {end}: the gap there is not separated"
                f" from 0, so it cannot be said to {verb} there."
            )
        elif at_one:
            text += (
                f" The ratio's interval contains 1 at {' and '.join(at_one)}, where the gap"
                " |1 - r| folds: resamples at and across 1 all count as a gap there."
            )
    else:
        text += (
            "the gap "
            + ("narrows" if d > 0.02 else "widens" if d < -0.02 else "stays about the same")
            + " with size (no interval: some checkpoint lacks per-prompt outcomes, or online's"
            " quantile is 0 in a resample; read a small change as no change)."
        )
    return text + (
        f" {label.capitalize()} is ahead of online at {', '.join(ahead)}." if ahead else ""
    )


def _fold_rule(sign: int, first_at_one: bool, last_at_one: bool) -> int:
    """The gap's verdict (1 narrows, -1 widens, 0 neither) from the narrowing's separated
    sign and whether each end's ratio interval (BCa or percentile) contains 1. A gap narrows
    from a gap, and widens to one: "narrows" needs the first end's gap separated from 0, and
    "widens" the last end's. The fold then errs only on the side of no claim: at an end whose
    interval contains 1, resamples at and across 1 all count as a gap, which pulls the
    narrowing towards "narrows" at the first end (refused there) and towards "widens" at the
    last (refused there); at the other end it pulls against the claim."""
    if sign > 0 and first_at_one or sign < 0 and last_at_one:
        return 0
    return sign


def _intervals(res: RatioResamples | None) -> np.ndarray | None:
    """(sizes, 2): each size's 95% BCa interval, or None."""
    return None if res is None else res.intervals()


def _ratio_cell(ratio: float, intervals: np.ndarray | None, i: int) -> str:
    if intervals is None:
        return f"{ratio:.3f}"
    lo, hi = intervals[i]
    return f"{ratio:.3f} [{lo:.3f}, {hi:.3f}]"


def _pools(sizes: Sequence[dict], shuffled: bool) -> str:
    """What each size's quantile pools, from the summaries themselves."""
    counts = [
        (len(s["online"]), len(s["offline"]), len(s["shuffled"]) if shuffled else 0) for s in sizes
    ]
    if len(set(counts)) == 1:
        _, n_off, n_sh = counts[0]
        text = (
            f"Every size pools {n_off} offline run(s)"
            + (f" and {n_sh} shuffled run(s)" if shuffled else "")
            + " (the study runs them at the online lr and the offline betas at every size)."
        )
    else:
        text = (
            "**The sizes pool different numbers of runs** (online, offline, shuffled: "
            + "; ".join(f"{s['model']} {c}" for s, c in zip(sizes, counts, strict=True))
            + "), so their quantiles are taken over different pools: compare sizes with care."
        )
    return text + _pool_bias(sizes)


def _checkpoint_wins(runs: Sequence[dict]) -> list[float]:
    return [e["win_rate"] for r in runs for e in r["evals"] if e["step"] > 0]


def _pool_bias(sizes: Sequence[dict], q: float = 0.9) -> str:
    """The ratio that k copies of a size's own online curve would score (k = the offline
    pool's checkpoints / online's): a q-quantile over more checkpoints lies nearer their
    best, so it biases each ratio towards the pooled method, by an amount that depends on
    that size's curve (and so moves the trend across sizes too)."""
    parts = []
    for s in sizes:
        wins = _checkpoint_wins(s["online"])
        k = len(_checkpoint_wins(s["offline"])) / max(len(wins), 1)
        if not wins or k <= 1 or k != int(k):
            return ""
        copies = np.quantile(np.tile(wins, int(k)), q) / np.quantile(wins, q)
        parts.append(f"{copies:.3f} at {s['model']} ({int(k)} copies)")
    return (
        " A 90% quantile over more checkpoints lies nearer their best: the pools hold more"
        " checkpoints than online's run, so each ratio is biased towards the pooled method."
        " Copies of a size's own online curve, as many as its offline pool's runs, would score "
        + ", ".join(parts)
        + "; the bias differs between sizes, so it moves the trend too."
    )


def scaling_section(sizes: Sequence[dict], figs: pathlib.Path) -> list[str]:
    """Fig. 10, 11, 14: best performance (90% quantile) per method and size, / online's:
    offline IPO on D_golden, and offline on the online stream uniformly shuffled (the paper's
    "tandem" of Fig. 10/11) where the summary has it; Fig. 10's KL vs win rate per size."""
    shuffled = all("shuffled" in s for s in sizes)
    boot = ratio_resamples(sizes, "offline")
    boot_sh = ratio_resamples(sizes, "shuffled") if shuffled else None
    iv, iv_sh = _intervals(boot), _intervals(boot_sh)
    rows, ratios, ratios_shuffled = [], [], []
    for i, s in enumerate(sizes):
        on, off = quantile_win(s["online"]), quantile_win(s["offline"])
        ratios.append(ratio(off, on))
        row = [
            f"{s['model']} ({s['params']:,})",
            f"{s['sft_loss']:.3f}" if "sft_loss" in s else "-",
            f"{on:.3f}",
            f"{off:.3f}",
            _ratio_cell(ratio(off, on), iv, i),
            len(s["offline"]),
        ]
        if shuffled:
            sh = quantile_win(s["shuffled"])
            ratios_shuffled.append(ratio(sh, on))
            row += [f"{sh:.3f}", _ratio_cell(ratio(sh, on), iv_sh, i), len(s["shuffled"])]
        rows.append(row)
    plots.figure_scaling(
        [s["params"] for s in sizes],
        [s["model"] for s in sizes],
        ratios,
        figs / "fig10_11_scaling.png",
        shuffled_ratios=ratios_shuffled or None,
        intervals=iv,
        shuffled_intervals=iv_sh,
    )
    plots.figure_sizes(sizes, figs / "fig10_sizes.png")
    if len(ratios) < 2:
        trend = "only one policy size was run: no trend."
    else:
        trend = (
            _gap_trend("offline", ratios, sizes, boot)
            + " The paper (Fig. 11): the offline gap closes with size, but more slowly than"
            " the shuffled one."
            + (
                " "
                + _gap_trend("shuffled", ratios_shuffled, sizes, boot_sh)
                + " The paper: with the online data shuffled, the gap shrinks with size on two"
                " of its three tasks, faster than offline's."
                if shuffled
                else ""
            )
            + " The intervals hold the evaluation's noise only (one training run per method"
            " and size)."
        )
    header = [
        "policy (params)",
        "SFT loss",
        "online q90",
        "offline q90",
        "offline / online" + (" [95% BCa bootstrap]" if boot is not None else ""),
        "offline runs",
    ]
    if shuffled:
        header += [
            "shuffled q90",
            "shuffled / online" + (" [95% BCa bootstrap]" if boot_sh is not None else ""),
            "shuffled runs",
        ]
    return [
        "",
        "## H5, scale (Fig. 10, 11, 14): policy sizes",
        "",
        "![fig10](figures/fig10_sizes.png)",
        "",
        "![fig11](figures/fig10_11_scaling.png)",
        "",
        "Best performance = 90% quantile of win rates over all checkpoints of a method's "
        "runs at a size, normalised by online's. Shuffled: offline IPO on that size's online "
        'stream uniformly shuffled (the paper\'s "tandem" of Fig. 10/11). '
        + _pools(sizes, shuffled)
        + " SFT loss: the SFT loss of each size's starting policy "
        "(mean of its last 20 steps; SFT learning rate scaled by 1/width).",
        "",
        table(header, rows),
        "",
        f"**Verdict:** {trend}",
    ]


def golden_caveat(accuracy: float, n: int) -> str:
    """A line on whether the golden PM learned the human labels at all: its held-out accuracy
    with a normal 95% interval; at chance, every win rate below measures agreement with an
    arbitrary function, not with human preferences."""
    half = 1.96 * math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / max(n, 1))
    text = (
        f"Golden PM on {n} held-out human labels: {accuracy:.3f} "
        f"[{accuracy - half:.3f}, {accuracy + half:.3f}]."
    )
    if accuracy - half <= 0.5:
        return text + (
            " **Caveat: not distinguishable from chance.** The golden PM did not learn the "
            "human preferences, so the win rates and verdicts below compare policies under an "
            "arbitrary learned function: they test the pipeline, not the paper's hypotheses "
            "about human preferences (a larger or pretrained golden PM is needed)."
        )
    return text + " Better than chance: the golden labels carry the human signal."
