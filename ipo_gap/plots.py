"""One function per figure of the study, from run summaries (matplotlib, Agg backend).

A run summary is a dict with "method" and "evals" (list of {step, kl, win_rate, win_lo, win_hi,
accuracy, drift}); the SFT start (step 0) is the first evaluation of every run. Axes follow
the paper: KL(pi_theta || pi_sft) on x, win rate against the golden baseline on y, one colour
per method, 95% intervals as error bars.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from ipo_gap import jsonl  # noqa: E402
from ipo_gap.eval import hidden_majority  # noqa: E402

_COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]

# One colour per method in every figure: the study's recurring methods have their own;
# the others (shuffle levels, Fig. 5's datasets, semi-online periods) take the colours
# left, in their order within the figure.
TANDEM = "tandem: offline on the shuffled online stream"
OFFLINE_SAME = "offline ipo on D_golden (same lr, beta)"  # the sweep's run at online's settings
METHOD_COLORS = {
    "online ipo": _COLORS[0],
    "offline ipo": _COLORS[1],
    OFFLINE_SAME: _COLORS[1],
    "offline ipo (shuffled uniform)": _COLORS[2],
    "offline ipo (shuffled uniform, lr x beta sweep)": "#98df8a",  # light green
    TANDEM: _COLORS[2],
    "offline ipo (exact order)": _COLORS[7],
    "online bo2": _COLORS[9],
    "offline bo2": _COLORS[3],
    "offline bo2 (shuffled uniform)": _COLORS[8],
    "hypo": _COLORS[4],
}
_REST = [_COLORS[5], _COLORS[6], "#1f1f1f", "#aec7e8", "#ffbb78", "#ff9896", "#c5b0d5",
         "#c49c94", "#f7b6d2", "#dbdb8d"]  # fmt: skip


def _color(methods: list[str], method: str) -> str:
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    others = [m for m in methods if m not in METHOD_COLORS]
    return _REST[others.index(method) % len(_REST)]


def _methods(runs: Sequence[dict]) -> list[str]:
    out: list[str] = []
    for r in runs:
        if r["method"] not in out:
            out.append(r["method"])
    return out


def kl_winrate(ax, runs: Sequence[dict], *, lines_for: Sequence[str] = ()) -> None:
    """KL vs win rate: every evaluation as a point with its interval, one colour per method.

    Methods in `lines_for` (single runs, e.g. online) are joined by lines in step order;
    others (pooled sweeps) are points.
    """
    methods = _methods(runs)
    labelled = set()
    for r in runs:
        ev = r["evals"]
        kl = np.array([e["kl"] for e in ev])
        win = np.array([e["win_rate"] for e in ev])
        err = np.array(
            [[e["win_rate"] - e["win_lo"] for e in ev], [e["win_hi"] - e["win_rate"] for e in ev]]
        )
        c = _color(methods, r["method"])
        label = None if r["method"] in labelled else r["method"]
        labelled.add(r["method"])
        style = "-o" if r["method"] in lines_for else "o"
        ax.errorbar(
            kl,
            win,
            yerr=err,
            fmt=style,
            color=c,
            ms=4,
            lw=1.2,
            alpha=0.8,
            elinewidth=0.6,
            capsize=0,
            label=label,
        )
    ax.set_xlabel(r"KL($\pi_\theta\,\|\,\pi_{sft}$) (nats)")
    ax.set_ylabel("win rate vs golden baseline")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save(fig, path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    jsonl.write_file_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


def figure_kl_winrate(runs, path, title, lines_for=()) -> pathlib.Path:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    kl_winrate(ax, runs, lines_for=lines_for)
    ax.set_title(title, fontsize=10)
    return save(fig, path)


def judged_by(evals: Sequence[dict], judge: str) -> list[dict]:
    """The evaluations with each win rate and its interval the one `judge` gave the same
    samples ("proxy": the proxy PM's `proxy_win_rate`; "hidden": the hidden humans')."""
    return [
        dict(
            e,
            win_rate=e[f"{judge}_win_rate"],
            win_lo=e[f"{judge}_win_lo"],
            win_hi=e[f"{judge}_win_hi"],
            win_outcomes=None,  # the golden PM's: not this judge's
        )
        for e in evals
    ]


def figure_goodhart(online: dict, path, title) -> pathlib.Path:
    """Over-optimisation check: the online run's win rate at each checkpoint judged by the golden PM
    and by the proxy PM it was trained against (the same samples), against KL; on the
    embedded task also by its hidden humans."""
    ev = [e for e in online["evals"] if "proxy_win_rate" in e]
    runs = [
        {"method": "judged by the golden PM", "evals": ev},
        {"method": "judged by the proxy PM (its training signal)", "evals": judged_by(ev, "proxy")},
    ]
    if all("hidden_win_rate" in e for e in ev):
        runs.append(
            {
                "method": "judged by the hidden humans (P(preferred))",
                "evals": judged_by(ev, "hidden"),
            }
        )
    fig, ax = plt.subplots(figsize=(6, 4.2))
    kl_winrate(ax, runs, lines_for=[r["method"] for r in runs])
    ax.set_title(title, fontsize=10)
    return save(fig, path)


def figure_hidden(hidden_ipo: Sequence[dict], runs: Sequence[dict], path, title) -> pathlib.Path:
    """The embedded task's hidden humans as the judge (against the golden baseline's samples on
    the evaluation prompts). Left, titled `title`: Fig. 1 by them (`hidden_ipo`: online and
    the offline sweep with each checkpoint's win rate the humans' mean probability of
    preferring its samples). Right: every checkpoint past step 0 of `runs`, its win rate by
    the golden PM (x) against the humans' majority verdict's (y, `eval.hidden_majority`: the
    win rate a golden PM that always sided with the humans would give, on the same scale), one
    colour per method, with the diagonal where such a golden PM's checkpoints would lie."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 5.2))
    kl_winrate(a1, hidden_ipo, lines_for=["online ipo"])
    a1.set_ylabel("hidden humans' win rate (mean P(preferred))")
    a1.set_title(title, fontsize=10)
    methods = _methods(runs)
    for m in methods:
        ev = [e for r in runs if r["method"] == m for e in r["evals"] if e["step"]]
        a2.scatter(
            [e["win_rate"] for e in ev],
            [float(hidden_majority(e["hidden_p"]).mean()) for e in ev],
            s=12,
            color=_color(methods, m),
            alpha=0.8,
            label=m,
        )
    lo, hi = (min(a2.get_xlim()[0], a2.get_ylim()[0]), max(a2.get_xlim()[1], a2.get_ylim()[1]))
    a2.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--", label="golden PM = humans' majority")
    a2.set_xlabel("golden PM's win rate")
    a2.set_ylabel("humans' majority verdict's win rate")
    a2.set_title("every checkpoint: the golden PM against the humans' majority", fontsize=10)
    a2.grid(alpha=0.3)
    a2.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    return save(fig, path)


def figure_shuffle(
    online: dict, replays: Sequence[dict], path, title, offline: Sequence[dict] = ()
) -> pathlib.Path:
    """Fig. 4/13: KL vs win rate, and the training loss over steps, online vs replays, with
    the `offline` sweep on D_golden as points (as the paper's Fig. 4 draws Fig. 1's runs).

    Replays of a sweep (method naming a "sweep") are points on the left and left out of the
    loss panel, whose other runs share online's lr and beta (a loss of another beta is on
    another scale); so are the offline runs."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = [online, *replays]
    single = [r for r in runs if "sweep" not in r["method"]]
    drawn = [*runs, *offline]
    kl_winrate(a1, drawn, lines_for=[r["method"] for r in single])
    methods = _methods(drawn)  # one colour per method in both panels
    for r in single:
        loss = np.asarray(r["losses"])
        k = max(1, len(loss) // 30)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        a2.plot(
            np.arange(len(smooth)) + k - 1,
            smooth,
            color=_color(methods, r["method"]),
            label=r["method"],
            lw=1.2,
            ls="--" if "exact" in r["method"] else "-",
        )
    # Below the panel: the offline sweep stretches the KL axis and fills its corners.
    a1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2)
    a2.set_xlabel("step")
    a2.set_ylabel(f"IPO loss (moving mean over {k} steps)")
    a2.set_yscale("log")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save(fig, path)


def _stream_step(e: dict) -> int:
    """The online step ending the stream window an evaluation was measured on (summaries of
    older code lack it: there, the run's own step)."""
    return e.get("stream_step", e["step"])


def figure_classification(
    runs: Sequence[dict], proxy_accuracy: float, path, title, proxy_label: str = "proxy PM"
) -> pathlib.Path:
    """Fig. 6-8: accuracy on the online stream (with the proxy PM's on the same pairs), on
    golden-labelled valid-split pairs and on D_golden's training pairs (dashed) over steps,
    accuracy vs win rate (each run's trained checkpoints, the points of the H3 verdict's
    correlations, and their shared SFT start once), winner log-prob drift (both pair sets)."""
    fig, (a0, a1, a2, a3) = plt.subplots(1, 4, figsize=(19, 4.2))
    methods = _methods(runs)
    for r in runs:
        c = _color(methods, r["method"])
        steps = [e["step"] for e in r["evals"]]
        stream = [e for e in r["evals"] if "stream_accuracy" in e]
        a0.plot(
            [_stream_step(e) for e in stream],
            [e["stream_accuracy"] for e in stream],
            "-o",
            color=c,
            ms=3,
            label=r["method"],
        )
        a1.plot(steps, [e["accuracy"] for e in r["evals"]], "-o", color=c, ms=3, label=r["method"])
        trained = [e for e in r["evals"] if e["step"] > 0]
        a2.plot(
            [e["accuracy"] for e in trained],
            [e["win_rate"] for e in trained],
            "o",
            color=c,
            ms=4,
            label=r["method"],
        )
        a3.plot(steps, [e["drift"] for e in r["evals"]], "-o", color=c, ms=3, label=r["method"])
        train = [e for e in r["evals"] if "train_accuracy" in e]  # older summaries lack it
        if train:  # dashed: D_golden's training pairs, the paper's Fig. 8 set
            t_steps = [e["step"] for e in train]
            a1.plot(t_steps, [e["train_accuracy"] for e in train], "--", color=c, lw=1)
            a3.plot(t_steps, [e["train_drift"] for e in train], "--", color=c, lw=1)
    proxy_stream = [e for e in runs[0]["evals"] if "stream_proxy_accuracy" in e]
    a0.plot(
        [_stream_step(e) for e in proxy_stream],
        [e["stream_proxy_accuracy"] for e in proxy_stream],
        "k:o",
        ms=3,
        label="proxy PM",
    )
    start = next((e for e in runs[0]["evals"] if e["step"] == 0), None)
    if start is not None:  # every run starts from the same SFT policy: one point, not one per run
        a2.plot(start["accuracy"], start["win_rate"], "k*", ms=9, label="SFT (step 0)")
    a1.axhline(proxy_accuracy, color="k", ls=":", label=proxy_label)
    a0.set(
        xlabel="online step ending the stream window\n(each run's k-th checkpoint on window k)",
        ylabel="accuracy on the online stream (golden labels)",
    )
    # The proxy's line is measured on its own split (named by `proxy_label`), not on the
    # policies' valid-split pairs: the axis says so rather than claiming one split for both.
    a1.set(xlabel="step", ylabel="accuracy (golden labels)")
    a1.set_title(
        f"policies: valid-split pairs (solid), D_golden's training pairs (dashed); {proxy_label}",
        fontsize=8,
    )
    a2.set(
        xlabel="accuracy on valid-split pairs (golden labels)", ylabel="win rate vs golden baseline"
    )
    a3.set(xlabel="step", ylabel=r"E[log $\pi$(y_w) - log $\pi_{sft}$(y_w)]")
    a3.set_title("valid-split pairs (solid), D_golden's training pairs (dashed)", fontsize=8)
    for a in (a0, a1, a2, a3):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save(fig, path)


def figure_bars(
    labels: Sequence[str], values: Sequence[float], path, title, ylabel: str
) -> pathlib.Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(
        range(len(values)), values, color=[_COLORS[i % len(_COLORS)] for i in range(len(values))]
    )
    ax.set_xticks(range(len(values)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return save(fig, path)


def figure_scaling(
    params: Sequence[int],
    names: Sequence[str],
    ratios: Sequence[float],
    path,
    shuffled_ratios: Sequence[float] | None = None,
    intervals=None,
    shuffled_intervals=None,
) -> pathlib.Path:
    """Fig. 11: offline's best performance normalised by online's, against policy size (and,
    given, offline on the online stream shuffled: the paper's "tandem"), with each ratio's
    95% interval ((sizes, 2) lower and upper ends) drawn from end to end where given."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        params,
        [1.0] * len(params),
        "-o",
        color=METHOD_COLORS["online ipo"],
        label="online ipo (= 1)",
    )
    series = [(ratios, intervals, METHOD_COLORS["offline ipo"], "offline ipo")]
    if shuffled_ratios is not None:
        series.append(
            (shuffled_ratios, shuffled_intervals, METHOD_COLORS[TANDEM], "offline ipo, shuffled")
        )
    for values, iv, color, label in series:
        ax.plot(params, values, "-o", color=color, label=label)
        if iv is not None:  # the interval's own ends: a BCa interval need not hold its point
            lo, hi = np.asarray(iv, np.float64).T
            ax.vlines(params, lo, hi, color=color)
            ax.plot(params, lo, "_", params, hi, "_", color=color, ms=8)
    # The sizes are the ticks, each named with its parameter count: a log axis spanning less
    # than a decade or two labels its minor ticks, and their labels overlapped (3x10^5 on
    # 4x10^5), while names written beside the points were cut at the frame.
    ax.set_xscale("log")
    ax.set_xticks(params, [f"{n}\n{p:,}" for p, n in zip(params, names, strict=True)])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.margins(x=0.12)
    ax.set_xlabel("policy parameters")
    ax.set_ylabel("best performance / online's (90% quantile)")
    ax.set_title("Fig. 11: scaling the policy", fontsize=10)
    ax.grid(alpha=0.3)
    # Below the axes: inside, it covered online's line at the largest size.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3)
    return save(fig, path)


def figure_sizes(sizes: Sequence[dict], path) -> pathlib.Path:
    """Fig. 10: KL vs win rate per policy size (one panel each, shared axes): online as a
    line, the offline pool and the shuffled-stream pool (the paper's "tandem") as points."""
    fig, axes = plt.subplots(
        1, len(sizes), figsize=(5 * len(sizes), 4.2), sharex=True, sharey=True, squeeze=False
    )
    for ax, s in zip(axes[0], sizes, strict=True):
        runs = [*s["online"], *s["offline"]]
        runs += [dict(r, method=TANDEM) for r in s.get("shuffled", [])]
        kl_winrate(ax, runs, lines_for=[r["method"] for r in s["online"]])
        ax.set_title(f"{s['model']} ({s['params']:,} params)", fontsize=9)
    fig.suptitle("Fig. 10: KL vs win rate per policy size", fontsize=10)
    return save(fig, path)
