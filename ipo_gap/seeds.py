"""SEEDS.md: the study's headline numbers over several seeds, with intervals over seeds.

One study's REPORT.md gives 95% intervals of evaluation noise only (a finite set of prompts
judged once); they say nothing about training noise, which on the quick preset moves online
IPO's peak win rate by more than its interval (README, "How firm are the numbers"). Runs of
the same study with different seeds (`reproduce.py --seeds=0,1,2`) measure both: per seed,
the Fig. 1 peaks and their difference; over seeds, the mean difference with a Student-t 95%
interval (n - 1 degrees of freedom), and the same for Fig. 10's ratios (offline and shuffled
/ online) and, paired by seed, for the change of the gap with size, and for every other
paired finding of REPORT.md (`findings`).

The verdict over seeds is a rule on those numbers: "online beats offline" requires the lower
end of the t-interval of the mean difference (online peak - offline peak) to exceed 0.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from ipo_gap import eval as evaluation
from ipo_gap import jsonl, report


@dataclasses.dataclass(frozen=True)
class Spread:
    """Mean of per-seed values with a Student-t 95% interval over seeds (nan for one seed)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def identical(self) -> bool:
        """Two or more seeds with one value: a zero-width interval that is no evidence (seeds
        that agree to the bit are not independent draws of the training noise)."""
        return self.n >= 2 and self.lo == self.hi

    def cell(self) -> str:
        if self.n < 2:
            return f"{self.mean:.3f} (one seed: no interval)"
        if self.identical:
            return f"{self.mean:.3f} (the same in all {self.n} seeds: no interval)"
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def spread(values: Sequence[float], level: float = 0.95) -> Spread:
    """Mean and the t-interval mean +- t_{(1+level)/2, n-1} * sd / sqrt(n) of `values`.

    Raises:
        ValueError: on no values or a non-finite one (`finite` sorts those out by seed).
    """
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"spread needs a non-empty list of numbers, got {values!r}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"spread needs finite numbers, got {values!r}")
    mean = float(v.mean())
    if len(v) < 2:
        return Spread(mean, math.nan, math.nan, 1)
    if np.all(v == v[0]):  # no spread (the float mean and sd of equal values can round off)
        return Spread(float(v[0]), float(v[0]), float(v[0]), len(v))
    half = float(stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return Spread(mean, mean - half, mean + half, len(v))


def finite(by_seed: Mapping[int, float]) -> tuple[list[float], list[int]]:
    """The finite per-seed values in seed order, and the seeds whose value is not finite (a
    NaN ratio where online's win rates are all 0): those are left out of the mean, by name."""
    kept = [v for v in by_seed.values() if math.isfinite(v)]
    return kept, [seed for seed, v in by_seed.items() if not math.isfinite(v)]


def per_seed_cell(
    by_seed: Mapping[int, float], seeds: Sequence[int], fmt: str = ".3f", starred=()
) -> str:
    """Each seed's value labelled by its seed, with a star for the seeds in `starred`; a seed
    without one shows "-"."""
    return ", ".join(
        f"{seed}: {format(by_seed[seed], fmt)}{'*' if seed in starred else ''}"
        if seed in by_seed
        else f"{seed}: -"
        for seed in seeds
    )


def headline(results: Mapping) -> dict:
    """One study's numbers that the seeds compare: Fig. 1's peaks, Fig. 10's ratios and every
    paired finding (`findings`)."""
    fig1 = results.get("fig1") or []
    try:
        on, off = report.peak(fig1[:1]), report.peak(fig1[1:])
    except ValueError as e:
        raise ValueError(f"its results give no Fig. 1 peaks: {e}") from e
    ratios = {key: {} for key in ("offline", "shuffled")}  # by size, in the study's order
    for s in results.get("fig10", []):
        for key in ratios:
            if key in s:
                q_on = report.quantile_win(s["online"])
                ratios[key][s["model"]] = report.ratio(report.quantile_win(s[key]), q_on)
    return {
        "online": on,
        "offline": off,
        "difference": on.win - off.win,
        "ratios": ratios["offline"],
        "shuffled_ratios": ratios["shuffled"],
        "online_peak_at_end": report.at_last_checkpoint([fig1[0]], on),
        "offline_peak_at_end": report.at_last_checkpoint(fig1[1:], off),
        "findings": findings(results),
        "levels": classifier_levels(results),
        "tandem": tandem(results),
    }


def _offline_last(results: Mapping) -> dict:
    """The last evaluation of the offline sweep's run at online's lr and beta: the checkpoint
    REPORT.md's H3 verdict compares with online's last."""
    fig1 = results["fig1"]
    return report.offline_same(fig1[1:], fig1[0])["evals"][-1]


# (field of an evaluation, its label in SEEDS.md, format)
LEVELS = (
    ("accuracy", "accuracy, valid-split pairs (held out)", ".3f"),
    ("train_accuracy", "accuracy, D_golden's training pairs (Fig. 8's set)", ".3f"),
    ("drift", "drift of log pi(y_w), valid-split pairs", "+.2f"),
    ("train_drift", "drift of log pi(y_w), D_golden's training pairs", "+.2f"),
)


def classifier_levels(results: Mapping) -> dict[str, float]:
    """Fig. 6-8's levels of one study: {"<online|offline> <field>": value} for each of
    `LEVELS` that both last checkpoints (online's, `_offline_last`) recorded (evaluations of older
    code lack the training pairs)."""
    last_on, out = results["fig1"][0]["evals"][-1], {}
    if not any(field in last_on for field, _, _ in LEVELS):  # evaluations without pairs
        return out
    last_off = _offline_last(results)
    for field, _, _ in LEVELS:
        if field in last_on and field in last_off:
            out[f"online {field}"] = float(last_on[field])
            out[f"offline {field}"] = float(last_off[field])
    return out


def _paired(a: report.Peak, b: report.Peak) -> evaluation.Interval | None:
    """a - b over the same prompts, as REPORT.md compares them (None for older summaries)."""
    return report.paired_outcomes(a.outcomes, b.outcomes)


def findings(results: Mapping) -> dict[str, tuple[str, evaluation.Interval | None]]:
    """Every paired comparison behind a REPORT.md verdict that the README's results table
    reads, each as {key: (label, paired difference with its 95% interval or None)}, chosen
    as REPORT.md chooses them. A finding whose runs the study lacks is left out."""
    fig1 = results["fig1"]
    online, offline = fig1[0], fig1[1:]
    p_on, out = report.peak([online]), {}
    out["fig1"] = (
        "online IPO's peak above the pooled offline sweep's (Fig. 1): online - offline",
        _paired(p_on, report.peak(offline)),
    )
    hidden = report.hidden_at_peaks(online, offline)
    if hidden is not None:  # the embedded task: its hidden humans judge the same two peaks
        out["fig1_hidden"] = (
            "the same two peaks judged by the embedded task's hidden humans (Fig. 1): "
            "online - offline",
            hidden,
        )
        out["fig1_hidden_own"] = (
            "the peaks the hidden humans would choose, online's and the pooled offline "
            "sweep's (Fig. 1 by them): online - offline",
            report.hidden_own_peaks(online, offline),
        )
    shuffled = results.get("fig4", [])[1:]
    first = [r for r in shuffled if r["method"] == report.UNIFORM]
    pool = first + [r for r in shuffled if r["method"] == report.UNIFORM_SWEEP]
    if first:
        out["shuffled_vs_online"] = (
            "the uniformly shuffled online stream below online (Fig. 4), at online's lr and "
            "beta: shuffled - online",
            _paired(report.peak(first), p_on),
        )
        out["shuffled_vs_offline"] = (
            "the shuffled stream no better than D_golden (Fig. 4), best checkpoints of both "
            "pools: shuffled - offline",
            _paired(report.peak(pool), report.peak(offline)),
        )
    fig9 = results.get("fig9")
    if fig9:
        b_on, b_off, b_third = (report.peak([r]) for r in fig9)
        out["bo2_online_vs_offline"] = (
            "online Bo2 above offline Bo2 on D_golden (Fig. 9): online - offline",
            _paired(b_on, b_off),
        )
        if fig9[2]["method"] == report.SHUFFLED_BO2:
            out["bo2_shuffled_vs_online"] = (
                "offline Bo2 on the shuffled online Bo2 stream on par with online Bo2 "
                "(Fig. 9): shuffled - online",
                _paired(b_third, b_on),
            )
    last_on, last_off = online["evals"][-1], None
    for key, field, text in (
        (
            "classifier",
            "accuracy_outcomes",
            "offline the better classifier (Fig. 6-8), last checkpoints at online's lr and "
            "beta on {n} golden-labelled valid-split pairs: offline - online",
        ),
        (
            "classifier_train",
            "train_accuracy_outcomes",
            "offline the better classifier on D_golden's own training pairs (Fig. 8's set), "
            "last checkpoints at online's lr and beta on {n} pairs: offline - online",
        ),
    ):  # evaluations of older code lack per-pair results, or D_golden's training pairs
        if not last_on.get(field):
            continue
        last_off = last_off or _offline_last(results)
        d = report.paired_outcomes(last_off.get(field), last_on.get(field))
        if d is not None:
            out[key] = (text.format(n=d.n), d)
    beyond = results.get("beyond", [])
    semi = sorted(
        (
            (report._refresh_period(r["method"]), r)
            for r in beyond
            if r["method"].startswith("semi")
        ),
        key=lambda period_run: period_run[0],
    )  # by growing s, infinity last
    if len(semi) >= 2:
        (s_fresh, fresh), (s_stale, stale) = semi[0], semi[-1]
        out["semi_online"] = (
            f"fresher samples help (semi-online, beyond the paper): s={s_fresh:g} - s={s_stale:g}",
            _paired(report.peak([fresh]), report.peak([stale])),
        )
    if semi:  # the stalest run's peak against online's trade-off curve, as REPORT.md reads it
        s_stale, stale = semi[-1]
        read = report.matched_kl(report.peak([stale]), p_on, online)
        if read is not None and read[1] is not None:
            out["semi_stale_matched_kl"] = (
                f"the stalest semi-online run (s={s_stale:g}) on online's trade-off curve "
                "(beyond the paper), at its peak's KL: its peak - online's curve there",
                read[1],
            )
    hypo = [r for r in beyond if r["method"].startswith("hypo")]
    if hypo:
        out["hypo"] = (
            "HyPO against online IPO (beyond the paper): HyPO - online",
            _paired(report.peak(hypo[:1]), p_on),
        )
    return out


def tandem(results: Mapping) -> str | None:
    """Whether the exact-order replay is the online run ("bit-identical", ...), or None."""
    fig4 = results.get("fig4")
    if not fig4:
        return None
    same, sense = report.tandem_identical(fig4[0])
    return sense if same else "differs"


def narrowing(ratios: Mapping[str, float], first: str, last: str) -> float:
    """REPORT.md's change of the gap with size: |1 - r_first| - |1 - r_last| (> 0 narrows)."""
    return float(report.gap_narrowing(ratios[first], ratios[last]))


def ratio_change(ratios: Mapping[str, float], first: str, last: str) -> float:
    """The ratio's own change with size, r_last - r_first: unlike the gap it does not fold
    at 1, so where seeds put a ratio on both sides of 1 it is the one to read."""
    return ratios[last] - ratios[first]


def _by_interval(s: Spread, one: str, above: str, below: str, neither: str) -> str:
    """The words for a t-interval over seeds: one seed, wholly above 0, below 0, or neither."""
    if s.n < 2:
        return one
    if s.identical:
        return (
            f"the same value in all {s.n} seeds, so no interval over seeds: are the seeds "
            "independent?"
        )
    return {1: above, -1: below, 0: neither}[report.interval_sign(s)]


def straddles_one(values: Sequence[float]) -> bool:
    """Whether per-seed ratios lie on both sides of 1 (or at 1, or NaN): there the mean of
    |1 - r| over seeds folds, as REPORT.md's bootstrap does where a ratio's interval holds
    1. It reads each seed's point ratio, not its evaluation interval: seeds each within
    noise of 1 but on one side count as unfolded, so the rule refuses less than REPORT.md's."""
    return not report.one_side_of_1(values)


def trend_verdict(
    change: Spread,
    first: Sequence[float] | None = None,
    last: Sequence[float] | None = None,
) -> str:
    """The gap's change over seeds; with the end sizes' per-seed ratios, REPORT.md's fold rule
    (`report._fold_rule`): "narrows" needs the first size's gap |1 - r| unfolded (its seeds'
    ratios on one side of 1), "widens" the last size's. With every seed on one side at both
    ends, |1 - r| is linear in r and the change's t-interval is the ratio change's, up to
    sign."""
    text = _by_interval(
        change,
        "one seed: no interval over seeds",
        "the gap narrows with size over seeds (the t-interval of the change is > 0)",
        "the gap widens with size over seeds (the t-interval of the change is < 0)",
        "the gap's change with size is not separated from 0 over these seeds",
    )
    if change.n < 2 or change.identical or first is None or last is None:
        return text
    sign = report.interval_sign(change)
    if report._fold_rule(sign, straddles_one(first), straddles_one(last)) == sign:
        return text
    return (
        "the gap's change with size is not separated from 0 over these seeds: the t-interval "
        f"of the change is {'> 0' if sign > 0 else '< 0'}, but the seeds put the "
        f"{'first' if sign > 0 else 'last'} size's ratio on both sides of 1 (or at 1), so the "
        f"gap it would {'narrow from' if sign > 0 else 'widen to'} is not separated from 0"
    )


def verdict(diff: Spread) -> str:
    return _by_interval(
        diff,
        "one seed: no interval over seeds; run more seeds",
        "online beats offline over seeds (the t-interval of the mean difference is > 0)",
        "offline beats online over seeds (the t-interval of the mean difference is < 0)",
        "not separated over these seeds: the t-interval of the mean difference contains 0 "
        "(run more seeds, or a larger preset)",
    )


def _headlines(per_seed: Mapping[int, Mapping]) -> dict[int, dict]:
    heads = {}
    for seed, res in sorted(per_seed.items()):
        try:
            heads[seed] = headline(res)
        except (KeyError, ValueError) as e:
            raise ValueError(f"seed {seed}: {e!s}") from e
    return heads


def _at_end_notes(heads: Mapping[int, dict]) -> list[str]:
    """Where a Fig. 1 peak is its run's last checkpoint, the run may still have been rising:
    its true peak may be higher, which biases that seed's difference against its method."""
    notes = []
    for key, who, direction in (
        ("online_peak_at_end", "Online's peak", "against online"),
        ("offline_peak_at_end", "The offline sweep's peak", "in favour of online"),
    ):
        ends = [seed for seed, h in heads.items() if h[key]]
        if ends:
            notes.append(
                f"{who} is its run's last checkpoint at seed(s) {', '.join(map(str, ends))}: it "
                f"may not have reached its peak there, which biases those seeds' differences "
                f"{direction}."
            )
    return notes


def _findings_section(heads: Mapping[int, dict]) -> list[str]:
    """Every paired finding per seed and over seeds: each seed's paired difference (a star
    where its 95% interval excludes 0), how many seeds separate it each way, and the mean
    over seeds with its t-interval."""
    seeds = list(heads)
    keys = list(dict.fromkeys(k for h in heads.values() for k in h["findings"]))
    rows = []
    for key in keys:
        label = next(h["findings"][key][0] for h in heads.values() if key in h["findings"])
        by_seed = {
            seed: h["findings"][key][1]
            for seed, h in heads.items()
            if key in h["findings"] and h["findings"][key][1] is not None
        }
        if not by_seed:
            continue
        signs = {seed: report.interval_sign(d) for seed, d in by_seed.items()}
        means = {seed: d.mean for seed, d in by_seed.items()}
        cells = per_seed_cell(means, seeds, "+.3f", [seed for seed, v in signs.items() if v])
        counts = (
            f"{sum(v > 0 for v in signs.values())} / {sum(v < 0 for v in signs.values())} / "
            f"{sum(v == 0 for v in signs.values())}"
        )
        mean = spread(list(means.values()))
        rows.append([label, cells, counts, mean.cell(), _by_interval(mean, *_FINDING_WORDS)])
    if not rows:
        return []
    same = {seed: h["tandem"] for seed, h in heads.items() if h["tandem"] is not None}
    lines = [
        "",
        "## Every paired finding, per seed and over seeds",
        "",
        "Each cell is a seed's paired difference over the same prompts (or pairs), as its "
        "REPORT.md computes it; * marks a seed whose 95% interval excludes 0. The counts are "
        "the seeds whose interval lies above 0 / below 0 / holds 0. The mean over seeds has a "
        "Student-t 95% interval (training noise included). These are several findings at 95% "
        "each, not corrected for multiplicity.",
        "",
        report.table(
            [
                "finding: difference",
                "per seed",
                "seeds above / below / neither",
                "mean [t 95% CI]",
                "over seeds",
            ],
            rows,
        ),  # fmt: skip
    ]
    if same:
        kinds = sorted(set(same.values()))
        lines += [
            "",
            "The exact-order replay against the online run (Fig. 3-4): "
            + "; ".join(
                f"{kind} at seed(s) {', '.join(str(s) for s, v in same.items() if v == kind)}"
                for kind in kinds
            )
            + ".",
        ]
    return lines


def _levels_section(heads: Mapping[int, dict]) -> list[str]:
    """Fig. 6-8's levels per seed and their means over seeds (`classifier_levels`): the
    paired findings give the offline - online differences, this gives what they are
    differences of."""
    seeds = list(heads)
    rows = []
    for field, label, fmt in LEVELS:
        for who in ("online", "offline"):
            key = f"{who} {field}"
            by_seed = {seed: h["levels"][key] for seed, h in heads.items() if key in h["levels"]}
            if by_seed:
                rows.append(
                    [f"{who}: {label}", per_seed_cell(by_seed, seeds, fmt), _mean_cell(by_seed)]
                )
    if not rows:
        return []
    return [
        "",
        "## Fig. 6-8: the classifiers' levels, per seed and over seeds",
        "",
        "Online IPO and the offline sweep's run at online's lr and beta, each at its last "
        "checkpoint, as REPORT.md's H3 table gives them: the share of golden-labelled pairs "
        "each policy classifies right (its log pi(y_w) - log pi(y_l) above the SFT policy's; "
        "a tie counts half) and the mean change of log pi(y_w) from the SFT policy, on the "
        "valid split (held out) and on D_golden's own training pairs (Fig. 8's set, in-sample "
        "for offline). "
        'Means over the seeds with the number ("-": none), with Student-t 95% intervals.',
        "",
        report.table(["quantity", "per seed", "mean [t 95% CI]"], rows),
    ]


_FINDING_WORDS = (
    "one seed: no interval",
    "above 0 over seeds",
    "below 0 over seeds",
    "not separated from 0 over seeds",
)


def _mean_cell(by_seed: Mapping[int, float]) -> str:
    """The t-interval cell over the finite values, naming the seeds left out."""
    values, dropped = finite(by_seed)
    if not values:
        return "no finite value"
    cell = spread(values).cell()
    if dropped:
        cell += f" (n = {len(values)}; not finite at seed(s) {', '.join(map(str, dropped))})"
    return cell


def write(path: pathlib.Path, per_seed: Mapping[int, Mapping], preset: str) -> pathlib.Path:
    """Writes SEEDS.md for {seed: results of `study_experiments.run_all`}; returns its path."""
    if not per_seed:
        raise ValueError("no seeds to compare")
    heads = _headlines(per_seed)
    seeds = list(heads)
    rows = []
    for seed, h in heads.items():
        on, off = h["online"], h["offline"]
        rows.append(
            [
                seed,
                on.cell(),
                f"{on.kl:.2f}",
                off.cell(),
                f"{off.kl:.2f}",
                f"{h['difference']:+.3f}",
                report.compare(on, off, "online", "offline"),
            ]
        )
    diff = spread([h["difference"] for h in heads.values()])
    on_all = spread([h["online"].win for h in heads.values()])
    off_all = spread([h["offline"].win for h in heads.values()])
    lines = [
        f"# ipo_gap study over seeds ({preset} preset, seeds {', '.join(map(str, heads))})",
        "",
        "Each seed is a whole study (its own task sample, models, runs and evaluation "
        "prompts' samples). Per seed, the intervals are evaluation noise only (REPORT.md); "
        "over seeds, the Student-t 95% interval of the mean holds training noise too. Each "
        "seed's win rates are against its own golden baseline, judged by its own golden PM: "
        "the mean peaks average different references, while each difference is paired "
        "within its seed. Each peak is a maximum over checkpoints (offline: over the whole "
        "pooled sweep), so the difference compares two selected maxima and leans towards the "
        'larger pool, offline: "online beats offline" is then conservative, "offline '
        'beats online" too easy. This file gives three verdicts at 95% each (Fig. 1, and the '
        "offline and shuffled gaps' change with size), not corrected for multiplicity.",
        "",
        "## Fig. 1: online vs offline IPO, peak win rate against the golden baseline",
        "",
        report.table(
            [
                "seed",
                "online peak [95% CI]",
                "KL",
                "offline peak [95% CI]",
                "KL",
                "online - offline",
                "verdict of this seed",
            ],
            rows,
        ),
        "",
        report.table(
            ["over seeds", "mean [t 95% CI]"],
            [
                ["online peak", on_all.cell()],
                ["offline peak (pooled sweep)", off_all.cell()],
                ["online - offline", diff.cell()],
            ],
        ),
        "",
        f"**Verdict over seeds:** {verdict(diff)}.",
    ]
    for note in _at_end_notes(heads):
        lines += ["", note]
    lines += _findings_section(heads)
    lines += _levels_section(heads)
    sizes = list(dict.fromkeys(m for h in heads.values() for m in h["ratios"]))  # study order
    if sizes:
        lines += [
            "",
            "## Fig. 10/11: best performance (90% quantile) / online's per policy size",
            "",
            "Within a seed every size shares the golden PM, the baseline and the evaluation "
            "prompts, so the change of the gap with size, |1 - r_first| - |1 - r_last| "
            "(> 0: narrows), is taken per seed and its mean given a t-interval over seeds. "
            'Per seed, "-" marks a seed without that number; means are over the seeds with a '
            "finite one.",
        ]
        for key, label in (("ratios", "offline"), ("shuffled_ratios", "shuffled")):
            size_rows = []
            for m in sizes:
                by_seed = {seed: h[key][m] for seed, h in heads.items() if m in h[key]}
                if by_seed:
                    size_rows.append([m, per_seed_cell(by_seed, seeds), _mean_cell(by_seed)])
            if not size_rows:
                continue
            lines += [
                "",
                report.table([f"size: {label} / online", "per seed", "mean [t 95% CI]"], size_rows),
            ]
            # Paired by seed: the seeds with a finite ratio at both end sizes.
            both = {
                seed: h[key]
                for seed, h in heads.items()
                if all(math.isfinite(h[key].get(m, math.nan)) for m in (sizes[0], sizes[-1]))
            }
            if len(sizes) > 1 and both:
                changes = {s: narrowing(r, sizes[0], sizes[-1]) for s, r in both.items()}
                change = spread(list(changes.values()))
                moves = {s: ratio_change(r, sizes[0], sizes[-1]) for s, r in both.items()}
                ends = [[r[m] for r in both.values()] for m in (sizes[0], sizes[-1])]
                # an end whose seeds put its ratio on both sides of 1: its gap |1 - r| folds
                folded = [
                    m for m, v in zip((sizes[0], sizes[-1]), ends, strict=True) if straddles_one(v)
                ]
                left_out = [seed for seed in seeds if seed not in both]
                if report.one_side_of_1(ends[0] + ends[1]):  # |1 - r| linear: moves = +-changes
                    side = "below" if ends[0][0] < 1 else "above"
                    sign = (
                        "the same amounts" if side == "below" else "the same amounts, sign flipped"
                    )
                    moves_text = (
                        f"Every seed's ratio lies {side} 1 at both sizes, so the ratio itself "
                        f"moves by {sign}"
                    )
                else:
                    moves_text = (
                        f"The ratio itself moves {per_seed_cell(moves, list(both), '+.3f')}, "
                        f"mean {spread(list(moves.values())).cell()}"
                    )
                lines += [
                    "",
                    f"{label.capitalize()}: change of the gap from {sizes[0]} to {sizes[-1]} "
                    f"per seed {per_seed_cell(changes, list(both), '+.3f')}, mean "
                    f"{change.cell()}: {trend_verdict(change, *ends)}. {moves_text}"
                    + (
                        f"; the seeds put the ratio on both sides of 1 (or at 1) at"
                        f" {' and '.join(folded)}, where the gap |1 - r| folds."
                        if folded
                        else "."
                    )
                    + (
                        f" Seed(s) {', '.join(map(str, left_out))} lack a finite ratio at "
                        f"{sizes[0]} or {sizes[-1]} and are left out (n = {len(both)})."
                        if left_out
                        else ""
                    ),
                ]
    path = pathlib.Path(path)
    jsonl.write_atomic(path, "\n".join(lines) + "\n")
    return path
