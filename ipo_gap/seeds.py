"""SEEDS.md: the study's headline numbers over several seeds, with intervals over seeds.

One study's REPORT.md gives 95% intervals of evaluation noise only (a finite set of prompts
judged once); they say nothing about training noise, which on the quick preset moves online
IPO's peak win rate by more than its interval (README, "How firm are the numbers"). Runs of
the same study with different seeds (`reproduce.py --seeds=0,1,2`) measure both: per seed,
the Fig. 1 peaks and their difference; over seeds, the mean difference with a Student-t 95%
interval (n - 1 degrees of freedom), and the same for Fig. 10's ratios (offline and shuffled
/ online) and, paired by seed, for the change of the gap with size.

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

from ipo_gap import jsonl, report


@dataclasses.dataclass(frozen=True)
class Spread:
    """Mean of per-seed values with a Student-t 95% interval over seeds (nan for one seed)."""

    mean: float
    lo: float
    hi: float
    n: int

    def cell(self) -> str:
        if self.n < 2:
            return f"{self.mean:.3f} (one seed: no interval)"
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def spread(values: Sequence[float], level: float = 0.95) -> Spread:
    """Mean and the t-interval mean +- t_{(1+level)/2, n-1} * sd / sqrt(n) of `values`."""
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"spread needs a non-empty list of numbers, got {values!r}")
    mean = float(v.mean())
    if len(v) < 2:
        return Spread(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return Spread(mean, mean - half, mean + half, len(v))


def headline(results: Mapping) -> dict:
    """One study's numbers that the seeds compare: Fig. 1's peaks and Fig. 10's ratios."""
    fig1 = results["fig1"]
    on, off = report.peak([fig1[0]]), report.peak(fig1[1:])
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
    }


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
    if change.n < 2 or first is None or last is None:
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


def write(path: pathlib.Path, per_seed: Mapping[int, Mapping], preset: str) -> pathlib.Path:
    """Writes SEEDS.md for {seed: results of `study_experiments.run_all`}; returns its path."""
    if not per_seed:
        raise ValueError("no seeds to compare")
    heads = {seed: headline(res) for seed, res in sorted(per_seed.items())}
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
        'beats online" too easy.',
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
    ends = [seed for seed, h in heads.items() if h["online_peak_at_end"]]
    if ends:
        lines += [
            "",
            f"Online's peak is its last checkpoint at seed(s) {', '.join(map(str, ends))}: it "
            "may not have reached its peak there, which shortens those seeds' differences.",
        ]
    sizes = list(dict.fromkeys(m for h in heads.values() for m in h["ratios"]))  # study order
    if sizes:
        lines += [
            "",
            "## Fig. 10/11: best performance (90% quantile) / online's per policy size",
            "",
            "Within a seed every size shares the golden PM, the baseline and the evaluation "
            "prompts, so the change of the gap with size, |1 - r_first| - |1 - r_last| "
            "(> 0: narrows), is taken per seed and its mean given a t-interval over seeds.",
        ]
        for key, label in (("ratios", "offline"), ("shuffled_ratios", "shuffled")):
            size_rows = []
            for m in sizes:
                values = [h[key][m] for h in heads.values() if m in h[key]]
                if values:
                    per = " ".join(f"{v:.3f}" for v in values)
                    size_rows.append([m, per, spread(values).cell()])
            if not size_rows:
                continue
            lines += [
                "",
                report.table([f"size: {label} / online", "per seed", "mean [t 95% CI]"], size_rows),
            ]
            both = [h[key] for h in heads.values() if sizes[0] in h[key] and sizes[-1] in h[key]]
            if len(sizes) > 1 and both:
                changes = [narrowing(r, sizes[0], sizes[-1]) for r in both]
                change = spread(changes)
                moves = [ratio_change(r, sizes[0], sizes[-1]) for r in both]
                ends = [[r[m] for r in both] for m in (sizes[0], sizes[-1])]
                # an end whose seeds put its ratio on both sides of 1: its gap |1 - r| folds
                folded = [
                    m for m, v in zip((sizes[0], sizes[-1]), ends, strict=True) if straddles_one(v)
                ]
                lines += [
                    "",
                    f"{label.capitalize()}: change of the gap from {sizes[0]} to {sizes[-1]} "
                    f"per seed {' '.join(f'{c:+.3f}' for c in changes)}, mean "
                    f"{change.cell()}: {trend_verdict(change, *ends)}. The ratio itself moves "
                    f"{' '.join(f'{c:+.3f}' for c in moves)}, mean {spread(moves).cell()}"
                    + (
                        f"; the seeds put the ratio on both sides of 1 (or at 1) at"
                        f" {' and '.join(folded)}, where the gap |1 - r| folds."
                        if folded
                        else "."
                    ),
                ]
    path = pathlib.Path(path)
    jsonl.write_atomic(path, "\n".join(lines) + "\n")
    return path
