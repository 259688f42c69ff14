"""Win-rate intervals and the report's verdicts (ipo_gap/eval.py, ipo_gap/report.py): each
verdict against a case worked out by hand."""

import math

import numpy as np
import pytest

from ipo_gap import report
from ipo_gap.eval import (
    Interval,
    clopper_pearson,
    outcome_values,
    outcomes,
    paired_difference,
    paired_interval,
)


def test_wilson_interval_stays_inside_0_1_and_is_never_empty():
    # 64 wins of 64: the normal approximation gave [1, 1]; Wilson's lower end is
    # 64 / (64 + 1.96^2) = 0.94337 (closed form at p = 1).
    all_won = Interval.of_judgements(np.ones(64))
    assert all_won.hi == 1.0 and all_won.lo == pytest.approx(64 / (64 + 1.96**2), rel=1e-12)
    one = Interval.of_judgements(np.r_[1.0, np.zeros(63)])
    assert 0 < one.lo < one.mean < one.hi < 1  # the normal approximation gave lo = -0.015
    # A middle value against the formula written out: p = 0.25, n = 100.
    z, n, p = 1.96, 100, 0.25
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    mid = Interval.of_judgements(np.r_[np.ones(25), np.zeros(75)])
    assert (mid.lo, mid.hi) == pytest.approx((centre - half, centre + half), rel=1e-12)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        Interval.of_judgements(np.array([0.5, 1.5]))


def test_outcomes_round_trip_and_refuse_other_values():
    judged = np.array([1.0, 0.0, 0.5, 1.0])
    assert outcomes(judged) == "WLTW"
    np.testing.assert_array_equal(outcome_values("WLTW"), judged)
    with pytest.raises(ValueError, match="not 0, 1/2 or 1"):
        outcomes(np.array([0.3]))
    with pytest.raises(ValueError, match="only W, T, L"):
        outcome_values("WX")


def test_paired_difference_is_the_mean_of_per_prompt_differences():
    # 40 differing prompts of 60: the normal interval of the paired mean.
    a, b = "W" * 30 + "T" * 10 + "L" * 20, "L" * 25 + "W" * 5 + "L" * 10 + "L" * 20
    d = paired_difference(a, b)
    values = outcome_values(a) - outcome_values(b)
    half = 1.96 * values.std(ddof=1) / math.sqrt(60)
    assert (d.mean, d.lo, d.hi, d.n) == pytest.approx(
        (values.mean(), values.mean() - half, values.mean() + half, 60)
    )
    same = paired_difference("WLT", "WLT")
    assert (same.mean, same.lo, same.hi) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference("WL", "W")


def test_few_differing_prompts_get_the_exact_sign_interval():
    """Close checkpoints sample alike: with few differing prompts the normal interval called
    3 of 3 in one direction separated (it had zero width); the exact interval agrees with
    the exact sign test (scipy's Clopper-Pearson, p-values)."""
    from scipy.stats import binomtest

    for k, m in ((0, 5), (4, 4), (5, 5), (6, 6), (3, 10), (20, 29)):
        ci = binomtest(k, m).proportion_ci(0.95, "exact")
        assert clopper_pearson(k, m) == pytest.approx((ci.low, ci.high), abs=1e-9)
    rest = "L" * 2042
    for wins in (3, 4, 5, 6, 8):
        d = paired_difference("W" * wins + rest, "L" * wins + rest)
        assert d.mean == pytest.approx(wins / (wins + 2042))
        separated = d.lo > 0
        assert separated == (binomtest(wins, wins).pvalue < 0.05), (wins, d)
    assert not paired_difference("WWW", "LLL").lo > 0
    half = paired_difference("T" * 7 + rest, "L" * 7 + rest)  # seven half-wins
    assert half.hi == pytest.approx(half.mean) and 0 < half.lo < half.mean
    # paired_interval takes any per-prompt differences (Fig. 9 pairs a checkpoint with an
    # interpolation of two): the same rule, and bad input named.
    assert paired_interval(np.array([0.5] * 4 + [0.0] * 96)) == paired_difference(
        "T" * 4 + "L" * 96, "L" * 100
    )
    for bad in (np.array([]), np.array([0.1, np.nan]), np.zeros((2, 2))):
        with pytest.raises(ValueError, match="finite 1-D"):
            paired_interval(bad)
    # Unequal sizes with few differing prompts: nine small wins against one large loss has a
    # negative mean; signs alone gave an interval above 0. Each sign keeps its own size, so
    # the interval holds the mean, and 0; so does every random mix of sizes and signs.
    for d in ([0.05] * 9 + [-1] + [0] * 200, [0.1] * 20 + [-0.9] * 6 + [0] * 100):
        iv = paired_interval(np.array(d))
        assert iv.mean < 0 and iv.lo <= iv.mean and iv.lo < 0 < iv.hi
    # A tiny difference against a claim never strengthens it: one W-vs-L prompt is not
    # separated, and neither is it beside a -1e-6; 5 W-vs-L beside a T-vs-W, or 7 beside 3
    # (an exact sign-flip test: p = 0.07), are not either; 9 of 9 still is.
    z = [0.0] * 200
    for d in ([1] + z, [1, -1e-6] + z, [1] * 5 + [-0.5] + z, [1] * 7 + [-0.5] * 3 + z):
        assert paired_interval(np.array(d)).lo < 0, d[:10]
    assert paired_interval(np.array([1] * 9 + z)).lo > 0
    rng = np.random.default_rng(0)
    for _ in range(300):
        m = int(rng.integers(1, 30))
        d = np.concatenate([rng.uniform(0.01, 1, m) * rng.choice([-1, 1], m), np.zeros(200)])
        iv = paired_interval(d)
        assert iv.lo - 1e-12 <= iv.mean <= iv.hi + 1e-12  # at k = 0 or m: the mean, rounded


def _peak(outcome_text, run="r"):
    v = outcome_values(outcome_text)
    ci = Interval.of_judgements(v)
    return report.Peak(run, 10, ci.mean, ci.lo, ci.hi, 1.0, outcome_text)


def test_paired_comparison_separates_what_overlapping_intervals_cannot():
    """Online wins 30 more of 512 prompts than offline, and the two agree elsewhere: the win
    rates' own intervals overlap, the paired difference is clearly above 0."""
    base = "W" * 256 + "L" * 256
    online = _peak(base[:226] + "W" * 30 + base[256:], "online")
    offline = _peak(base[:226] + "L" * 30 + base[256:], "offline")
    assert online.lo < offline.hi  # the old rule: "not separated"
    text = report.compare(online, offline, "online", "offline")
    assert text.startswith(
        "online is higher than offline (paired difference online - offline +0.059"
    )
    assert report.separation(offline, online)[0] == -1
    # Without per-prompt outcomes (older summaries): the disjoint-interval rule, said so.
    bare = [report.Peak(p.run, p.step, p.win, p.lo, p.hi, p.kl) for p in (online, offline)]
    assert "no per-prompt outcomes to pair" in report.compare(*bare, "online", "offline")
    # Noise in both directions: not separated.
    mixed = _peak("WL" * 256, "a"), _peak("LW" * 128 + "WL" * 127 + "WW", "b")
    assert "b is nominally higher, but not separated at this sample size" in report.compare(
        *mixed, "a", "b"
    )
    # The same checkpoint outcomes (an exact replay): level.
    assert "are level (the same judgement on every one of the 512 prompts)" in report.compare(
        online, online, "replay", "online"
    )


def _run(method, outcome_texts):
    evals = [{"step": 0, "win_rate": 0.5, "win_lo": 0.4, "win_hi": 0.6, "kl": 0.0}]
    for k, text in enumerate(outcome_texts):
        p = _peak(text)
        evals.append(
            {
                "step": 10 * (k + 1),
                "win_rate": p.win,
                "win_lo": p.lo,
                "win_hi": p.hi,
                "kl": float(k + 1),
                "win_outcomes": text,
            }
        )
    return {"name": method.replace(" ", "_"), "method": method, "evals": evals}


def test_semi_online_trend_needs_a_strict_fall_and_a_separated_end():
    n = 400
    on = report.peak([_run("online ipo", ["W" * 300 + "L" * 100])])
    flat = [
        _run("semi-online ipo (s=10)", ["W" * 160 + "L" * 240]),
        _run("semi-online ipo (s=100)", ["W" * 160 + "L" * 240]),
        _run("semi-online ipo (s=inf)", ["W" * 159 + "L" * 241]),
    ]
    assert "does not fall monotonically with s" in report.beyond_verdict(on, flat)
    slight = [
        _run("semi-online ipo (s=10)", ["W" * 162 + "L" * 238]),
        _run("semi-online ipo (s=inf)", ["W" * 160 + "L" * 240]),
    ]
    assert "are not separated at this sample size" in report.beyond_verdict(on, slight)
    steep = [
        _run("semi-online ipo (s=10)", ["W" * 250 + "L" * 150]),
        _run("semi-online ipo (s=inf)", ["W" * 150 + "L" * 250]),
    ]
    text = report.beyond_verdict(on, steep)
    assert "falls as s grows, as expected if fresher samples help" in text
    assert len("W" * 250 + "L" * 150) == n


def test_beyond_compares_each_lower_kl_peak_with_online_curve_at_its_kl():
    """A semi-online run that stops at a smaller KL has a lower peak than online's even on
    online's own trade-off curve. Online wins prompts [0, 100) of 400 at KL 1 and [0, 300)
    at KL 2 (its peak): at KL 1.5 its curve is 0.5, per prompt 1 on [0, 100), 1/2 on
    [100, 300), 0 after. Peaks at KL 1.5 winning [0, 200) (paired mean exactly 0), [0, 300)
    (+0.25) and [0, 100) (-0.25) are level with, above and below it."""

    def wins(k):
        return "W" * k + "L" * (400 - k)

    def at_kl(method, k, kl=1.5):
        r = _run(method, [wins(k)])
        r["evals"][1]["kl"] = kl
        return r

    online = _run("online ipo", [wins(100), wins(300)])
    p_on = report.peak([online])
    assert (p_on.kl, p_on.win) == (2.0, 0.75)
    runs = [
        at_kl("semi-online ipo (s=100)", 200),
        at_kl("semi-online ipo (s=inf)", 300),
        at_kl("hypo", 100),
        at_kl("semi-online ipo (s=10)", 250, kl=2.5),  # beyond online's peak KL: not compared
    ]
    text = report.beyond_verdict(p_on, runs, online)
    assert "semi-online (s=100) at KL 1.50: 0.500 against online's 0.500, paired +0.000 [" in text
    assert "not separated from online's curve" in text
    assert "semi-online (s=inf) at KL 1.50: 0.750 against online's 0.500, paired +0.250" in text
    assert "hypo at KL 1.50: 0.250 against online's 0.500, paired -0.250" in text
    assert "semi-online (s=10) at KL" not in text
    assert (
        "semi-online (s=100), semi-online (s=inf) lie on or above online's curve: a lower peak "
        "there comes from reaching a smaller KL, not from a worse trade-off." in text
    )
    assert "hypo lies below it: a worse trade-off, not only a smaller KL." in text
    # Without the online run (older callers) the verdict compares peaks only.
    assert "At matched KL" not in report.beyond_verdict(p_on, runs)
    # A non-finite KL on online's curve: said, not raised (the peaks' verdict stands).
    online["evals"][1]["kl"] = float("nan")
    text = report.beyond_verdict(p_on, runs, online)
    assert "No matched-KL reading: a KL of online's checkpoints is not finite." in text
    assert "At matched KL" not in text and "Semi-online peak win rate" in text


def _size(model, params, ratio, n=100, key="offline", seed=None):
    """A policy size whose online run wins n/2 of n prompts and whose `key` run wins
    ratio * n/2 of them: a subset of online's wins, or, with a `seed`, prompts drawn at
    random (as two real policies, which win and lose on different prompts)."""
    on = "W" * (n // 2) + "L" * (n - n // 2)
    k = round(n / 2 * ratio)
    other = np.array(list("W" * k + "L" * (n - k)))
    if seed is not None:
        other = np.random.default_rng(seed).permutation(other)
    return {
        "model": model,
        "params": params,
        "online": [_run("online ipo", [on])],
        key: [_run("offline ipo", ["".join(other)])],
    }


@pytest.mark.parametrize(
    "ratios,word,ahead",
    [
        ((0.60, 0.80), "the gap narrows with size", False),
        ((1.04, 1.20), "the gap widens with size", True),
        ((0.8, 1.2), "the gap's change with size is not separated from 0", True),
    ],
)
def test_scaling_gap_is_the_distance_of_the_ratio_from_1(tmp_path, ratios, word, ahead):
    sizes = [_size("toy-s", 1e6, ratios[0]), _size("toy-m", 4e6, ratios[1])]
    text = "\n".join(report.scaling_section(sizes, tmp_path))
    assert f"Offline/online goes from {ratios[0]:.3f}" in text and word in text
    assert ("Offline is ahead of online at" in text) == ahead
    # The ratio's own change is given where it says more than the narrowing: where the ends
    # lie on both sides of 1 (0.8 -> 1.2: the gap stays, the ratio crosses), or an end's
    # resamples reach 1 (1.04 is a superset of online's wins: 1 exactly where its two extra
    # prompts are not drawn). Below 1 throughout it is the narrowing itself.
    assert ("The ratio itself moves" in text) == (ratios != (0.60, 0.80))
    assert "Shuffled/online" not in text  # no shuffled runs in the summary
    assert "Every size pools 1 offline run(s) (the study" in text
    # With each size's shuffled replay (the paper's "tandem"): its own ratio and trend.
    for s, r in zip(sizes, (0.9, 0.96), strict=True):
        s["shuffled"] = _size(s["model"], 0, r, key="shuffled")["shuffled"]
    text = "\n".join(report.scaling_section(sizes, tmp_path))
    assert "Shuffled/online goes from 0.900 (toy-s) to 0.960 (toy-m): the gap's change" in text
    # That change rests on 3 prompts of 100 (toy-m's shuffled run wins 3 more of online's
    # wins): the bootstrap draws are discrete, BCa alone would call it separated, the
    # percentile interval reaches 0, and the verdict needs both.
    (bca_lo, _), (pct_lo, _) = report.ratio_resamples(sizes, "shuffled").narrowing()
    assert bca_lo > 0 and pct_lo <= 0
    assert (tmp_path / "fig10_11_scaling.png").exists() and (tmp_path / "fig10_sizes.png").exists()


def test_fold_rule_needs_a_separated_gap_where_it_narrows_from_or_widens_to():
    """The gap |1 - r| folds at 1. A narrowing needs the first end's gap separated from 0
    (its ratio interval off 1), a widening the last end's; otherwise the narrowing's own
    separated sign stands."""
    rule = report._fold_rule
    for sign in (1, -1, 0):
        assert rule(sign, False, False) == sign
    assert rule(1, False, True) == 1 and rule(1, True, False) == 0 and rule(1, True, True) == 0
    assert rule(-1, True, False) == -1 and rule(-1, False, True) == 0 and rule(-1, True, True) == 0
    assert all(rule(0, f, last) == 0 for f in (False, True) for last in (False, True))


def test_scaling_trend_names_an_end_whose_ratio_interval_contains_1(tmp_path):
    """Offline at half online's q90 at the small size and level with it (prompts drawn at
    random) at the large one: the last end's interval contains 1, the report says so, and
    the narrowing from the small size's separated gap stands. Level at both ends: no claim.
    A narrowing from an end at 1 is refused (the fold rule's truth table, above)."""
    sizes = [_size("toy-s", 1e6, 0.5, 400, seed=1), _size("toy-m", 4e6, 1.0, 400, seed=2)]
    text = "\n".join(report.scaling_section(sizes, tmp_path))
    lo, hi = report.ratio_resamples(sizes, "offline").intervals()[-1]
    assert lo < 1 < hi
    assert "The ratio's interval contains 1 at toy-m, where the gap |1 - r| folds" in text
    assert "the gap narrows with size" in text and "The ratio itself moves +0.500" in text
    assert "cannot be said to" not in text
    level = [_size("toy-s", 1e6, 1.0, 400, seed=3), _size("toy-m", 4e6, 1.0, 400, seed=4)]
    text = "\n".join(report.scaling_section(level, tmp_path))
    assert "The ratio's interval contains 1 at toy-s and toy-m" in text
    assert "the gap's change with size is not separated from 0" in text
    # Reversed, level at the small size and half at the large: the gap widens from a gap
    # that is not separated from 0, which the verdict allows (it widens to toy-m's).
    text = "\n".join(report.scaling_section(sizes[::-1], tmp_path))
    assert "the gap widens with size" in text and "The ratio itself moves -0.500" in text
    # The fold's false claim: offline at 0.93 of online at toy-s, its interval holding 1, and
    # exactly online at toy-m (the same prompts won: ratio 1 in every resample). Resamples
    # of toy-s on both sides of 1 all count as a gap, so both intervals of the narrowing
    # exclude 0; the gap at toy-s is not separated from 0, and the verdict refuses.
    fold = [_size("toy-s", 1e6, 0.93, 400, seed=3), _size("toy-m", 4e6, 1.0, 400)]
    res = report.ratio_resamples(fold, "offline")
    (lo, _), (p_lo, _) = res.narrowing()
    assert lo > 0 and p_lo > 0 and res.intervals()[0][0] < 1 < res.intervals()[0][1]
    text = "\n".join(report.scaling_section(fold, tmp_path))
    assert "the gap's change with size is not separated from 0" in text
    assert "But the ratio's interval contains 1 at toy-s: the gap there is not separated" in text


def test_scaling_intervals_resample_the_prompts_alike_everywhere(tmp_path):
    """The ratios' bootstrap resamples the evaluation prompts, the same draw for every
    checkpoint, method and size: where offline is online with its wins on a fixed share of
    the prompts the ratio is exact; a small change on 512 prompts is not separated, which
    the fixed 0.02 threshold of older code called a narrowing; without per-prompt outcomes
    the old rule stands, and says there is no interval."""
    # Offline wins exactly the prompts online wins, at both sizes: ratio 1 in every draw.
    same = [_size("toy-s", 1e6, 1.0, n=64), _size("toy-m", 4e6, 1.0, n=64)]
    boot = report.bootstrap_ratios(same, "offline", draws=50)
    np.testing.assert_array_equal(boot, np.ones((50, 2)))
    # One draw by hand: weights w over prompts, ratio = (w . off) / (w . on) (one checkpoint).
    rng = np.random.default_rng(0)
    w = rng.multinomial(100, np.full(100, 1 / 100), size=1)[0] / 100
    sizes = [_size("toy-s", 1e6, 0.6), _size("toy-m", 4e6, 0.8)]
    on = outcome_values("W" * 50 + "L" * 50)
    offs = [outcome_values("W" * k + "L" * (100 - k)) for k in (30, 40)]
    boot = report.bootstrap_ratios(sizes, "offline", draws=1)
    np.testing.assert_allclose(boot[0], [w @ o / (w @ on) for o in offs], rtol=1e-12)
    # 0.70 -> 0.74 on 512 prompts: +0.04, not separated.
    small = [_size("toy-s", 1e6, 0.70, 512, seed=1), _size("toy-m", 4e6, 0.74, 512, seed=2)]
    text = "\n".join(report.scaling_section(small, tmp_path))
    assert "the gap's change with size is not separated from 0 at this sample size" in text
    assert "offline / online [95% BCa bootstrap]" in text
    for s in small:  # older summaries: no per-prompt outcomes
        for e in s["offline"][0]["evals"]:
            e.pop("win_outcomes", None)
    text = "\n".join(report.scaling_section(small, tmp_path))
    assert "the gap narrows with size (no interval: some checkpoint lacks per-prompt" in text
    # Sizes pooling different numbers of runs are named.
    small[1]["offline"] = small[1]["offline"] * 2
    assert "**The sizes pool different numbers of runs**" in "\n".join(
        report.scaling_section(small, tmp_path)
    )


def test_bca_interval_matches_scipy_and_corrects_the_percentile_interval():
    """On the mean of skewed (exponential) data, our BCa interval, from our own draws and
    jackknife, matches scipy's BCa to within Monte-Carlo error; the percentile interval of
    the same draws sits measurably lower, which is the bias BCa removes."""
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x = rng.exponential(size=60)
    n, draws = len(x), 40_000
    w = rng.multinomial(n, np.full(n, 1 / n), size=draws) / n
    boot = (w @ x)[:, None]
    jack = ((x.sum() - x) / (n - 1))[:, None]
    ours = report.bca_interval(boot, np.array([x.mean()]), jack)[0]
    ref = scipy_stats.bootstrap(
        (x,), np.mean, method="BCa", n_resamples=draws, random_state=np.random.default_rng(4)
    ).confidence_interval
    np.testing.assert_allclose(ours, [ref.low, ref.high], atol=0.01)
    pct = np.percentile(boot[:, 0], [2.5, 97.5])
    assert ours[0] - pct[0] > 0.02 and ours[1] - pct[1] > 0.02
    # Draws symmetric about the value with a symmetric jackknife: the percentile interval.
    sym = np.concatenate([boot, 2 * x.mean() - boot])
    even = np.concatenate([jack, 2 * jack.mean() - jack])
    np.testing.assert_allclose(
        report.bca_interval(sym, np.array([x.mean()]), even)[0],
        np.percentile(sym[:, 0], [2.5, 97.5]),
        rtol=1e-12,
    )


def test_ratio_resamples_jackknife_leaves_each_prompt_out():
    """`ratio_resamples`' point is the ratio of the 90% quantiles over checkpoints as
    judged, and its jackknife row j the same ratio recomputed, by brute force, without
    prompt j."""
    rng = np.random.default_rng(5)
    texts = lambda p: ["".join(rng.choice(list("WLT"), 24, p=p)) for _ in range(3)]  # noqa: E731
    sizes = [
        {
            "model": m,
            "params": 1,
            "online": [_run("online ipo", texts([0.5, 0.4, 0.1]))],
            "offline": [_run("offline ipo", texts([0.4, 0.5, 0.1]))],
        }
        for m in ("toy-s", "toy-m")
    ]
    res = report.ratio_resamples(sizes, "offline", draws=10)

    def ratio(s, keep):
        q = [
            np.quantile(
                [outcome_values(e["win_outcomes"])[keep].mean() for e in r[0]["evals"][1:]], 0.9
            )
            for r in (s["online"], s["offline"])
        ]
        return q[1] / q[0]

    everything = np.ones(24, bool)
    np.testing.assert_allclose(res.point, [ratio(s, everything) for s in sizes], rtol=1e-12)
    for j in range(24):
        keep = everything.copy()
        keep[j] = False
        np.testing.assert_allclose(res.jack[j], [ratio(s, keep) for s in sizes], rtol=1e-12)
    assert res.boot.shape == (10, 2) and res.intervals().shape == (2, 2)


def test_h1_compares_the_shuffle_at_online_settings_and_the_pooled_sweep():
    """The uniformly shuffled replay at online's lr and beta is compared prompt by prompt
    with online; with a sweep, so is the best checkpoint over all uniformly shuffled runs
    (the paper's pooled Fig. 4), and each sweep row names its lr and beta."""
    base = "W" * 200 + "L" * 200
    on = report.peak([_run("online ipo", [base])])
    same = dict(_run("offline ipo (shuffled uniform)", ["L" * 40 + base[40:]]), lr=1e-3, beta=0.1)
    level = _run("offline ipo (shuffled w4)", [base])  # not a uniform shuffle: not pooled
    lines = report._uniform_verdict([level, same], on)
    # d = -1 on 40 of 400 prompts: sd = sqrt((0.1 - 0.01) 400 / 399), 1.96 sd / 20 = 0.0294
    assert lines == [
        "Uniform shuffle at online's lr and beta: online is higher than shuffled (paired "
        "difference shuffled - online -0.100 [-0.129, -0.071] over the same 400 prompts)."
    ]
    sweep = dict(
        _run(
            "offline ipo (shuffled uniform, lr x beta sweep)", [base[:200] + "W" * 40 + base[240:]]
        ),
        lr=3e-3,
        beta=0.5,
    )
    lines = report._uniform_verdict([level, same, sweep], on)
    assert len(lines) == 2 and lines[1].startswith(
        "Pooled over 2 uniformly shuffled runs (lr x beta, as the paper's Fig. 4; the best of "
        "many checkpoints, which favours the pool): shuffled (best of the sweep) is higher "
        "than online (paired difference shuffled (best of the sweep) - online +0.100"
    )
    online = {"lr": 1e-3, "beta": 0.1}
    assert report._replay_label(same, online) == "offline ipo (shuffled uniform)"
    assert report._replay_label(sweep, online).endswith("sweep): lr 0.003, beta 0.5")
    # The drift columns compare with online step by step: a sweep run (another beta, so its
    # loss is on another scale) gets none.
    drift = {"max_param_diff_to_online": 0.03, "max_loss_dev_to_online": 15.0}
    drift["mean_loss_dev_to_online"] = 4.0
    assert report._replay_row(dict(same, **drift), online)[1:4] == ["0.03", "15", "4"]
    assert report._replay_row(dict(sweep, **drift), online)[1:4] == ["-", "-", "-"]
    # Distinct learning rates far below 1e-8 are still told apart.
    assert not report.same_settings({"lr": 1e-9, "beta": 0.1}, {"lr": 3e-9, "beta": 0.1})
    # A run whose method is not the one at online's settings is not taken as that run.
    assert report._uniform_verdict([sweep], on) == []


def test_h1_sets_the_shuffle_against_offline_and_names_each_shuffle_level():
    """The paper's Fig. 4 also compares the shuffled stream with offline on D_golden ("little
    improvement"): both at online's settings and pooled, paired; each windowed shuffle
    (Fig. 13) is compared with online."""
    base = "W" * 200 + "L" * 200
    online = dict(_run("online ipo", [base]), lr=1e-3, beta=0.1)
    offline = [
        dict(_run("offline ipo", ["L" * 60 + base[60:]]), name="off_a", lr=1e-3, beta=0.1),
        dict(_run("offline ipo", ["L" * 100 + base[100:]]), name="off_b", lr=3e-3, beta=0.1),
    ]
    shuffled = dict(_run(report.UNIFORM, ["L" * 40 + base[40:]]), lr=1e-3, beta=0.1)
    # shuffled - offline: +1 on 20 of 400 prompts (all 20 differing prompts): 0.05, with the
    # exact interval (fewer than 30 differ): 0.05 * (2 * 0.025 ** (1 / 20) - 1) = 0.033.
    (line,) = report._shuffle_vs_offline([shuffled], offline, online)
    assert "at online's lr and beta, shuffled is higher than offline (paired difference " in line
    assert "shuffled - offline +0.050 [+0.033, +0.050]" in line
    assert "over both pools (best checkpoints), shuffled (pooled) is higher" in line
    assert line.endswith("the shuffled stream is the better dataset for offline IPO here.")
    level = dict(shuffled, evals=offline[0]["evals"])  # the same judgements as offline
    (line,) = report._shuffle_vs_offline([level], offline, online)
    assert "shuffled and offline are level" in line
    assert line.endswith(
        "Pooled, as the paper's Fig. 4 compares them: as the paper found, the shuffled online "
        "stream brings no measurable improvement."
    )
    assert report._shuffle_vs_offline([], offline, online) == []
    w4 = _run("offline ipo (shuffled w4)", [base])
    (line,) = report._level_verdict([w4, shuffled], report.peak([online]))
    assert "w4: w4 and online are level" in line and "uniform)" not in line


def test_h4_compares_online_bo2_with_its_shuffled_stream():
    """Fig. 9's third run is offline Bo2 on the online Bo2 stream uniformly shuffled (the
    paper finds it on par with online); an exact-order replay (older summaries) is reported
    by its parameter difference."""
    base = "W" * 200 + "L" * 200
    on = _run("online bo2", [base])
    off = _run("offline bo2", ["L" * 100 + base[100:]])
    par = _run(report.SHUFFLED_BO2, ["L" * 2 + base[2:200] + "W" * 2 + base[202:]])
    text = report.bo2_verdict([on, off, par])
    assert text.startswith("online Bo2 is higher than offline Bo2 (paired difference")
    assert (
        "shuffled online stream is not separated from online, consistent with the paper's finding"
        in text
    )
    below = _run(report.SHUFFLED_BO2, ["L" * 60 + base[60:]])
    assert "online Bo2's peak stays above offline Bo2's on its own shuffled stream." in (
        report.bo2_verdict([on, off, below])
    )
    # The paper compares curves: a shuffled peak at KL 1 (0.35 [0.30, 0.40]) against online's
    # curve through (0, 0.2), (2, 0.6): 0.4 at KL 1, inside the interval; 0.45 would be out.
    for at_one, word in (
        (0.6, "not distinguishable from online's curve at that KL"),
        (0.7, "the curves differ"),
    ):
        curve = dict(on, evals=[{**on["evals"][0], "kl": 0.0, "win_rate": 0.2}])
        curve["evals"].append({**on["evals"][1], "kl": 2.0, "win_rate": at_one})
        low = dict(
            below,
            evals=[
                below["evals"][0],
                {**below["evals"][1], "kl": 1.0, "win_rate": 0.35, "win_lo": 0.30, "win_hi": 0.40},
            ],
        )
        text = report.bo2_verdict([curve, off, low])
        assert (
            f"online's curve (interpolated between its checkpoints) is at {(0.2 + at_one) / 2:.3f}"
            in text
        )
        assert word in text

    # With per-prompt judgements at online's bracketing checkpoints the check is paired:
    # online's judgements interpolated with the curve's weights (here 1/2, 1/2), taken from
    # the shuffled peak's. Online at KL 0 and 2 wins prompts [0, 100) and [0, 300) of 400;
    # the shuffled peak at KL 1 wins [0, 200): the mean difference is exactly 0, and online's
    # noise gives the interval its width, which holds 0. The shuffled peak winning only
    # [0, 120) is 0.2 below the curve, far outside it.
    def online_at(*points):  # (kl, step, prompts won of 400)
        return dict(on, evals=[on["evals"][0]] + [
            {**on["evals"][1], **_run("o", [wins(w)])["evals"][1], "kl": k, "step": st}
            for k, st, w in points
        ])  # fmt: skip

    def shuffled_at(kl, text):
        third = _run(report.SHUFFLED_BO2, [text])
        third["evals"][1]["kl"] = kl
        return third

    wins = lambda w: "W" * w + "L" * (400 - w)  # noqa: E731
    two = online_at((0.0, 10, 100), (2.0, 20, 300))
    for won, word, d in (
        (200, "not distinguishable from online's curve at that KL", 0.0),
        (120, "below online's curve at that KL; unlike the paper, the curves differ there.", -0.2),
    ):
        text = report.bo2_verdict([two, off, shuffled_at(1.0, wins(won))])
        v = outcome_values(wins(won)) - (outcome_values(wins(100)) + outcome_values(wins(300))) / 2
        ref = Interval.of(v)
        assert (
            f"the shuffled peak minus online's curve is {d:+.3f} [{ref.lo:+.3f}, {ref.hi:+.3f}]"
            in text
        )
        assert "online's evaluation noise is counted" in text and word in text
        assert "online's own uncertainty is not counted" not in text
    # At a checkpoint's own KL (weight 1 on it) and 4 prompts apart, all four the shuffled
    # run's: the normal interval would call it separated; the exact sign interval does not.
    at_ckpt = online_at((1.0, 10, 196), (2.0, 20, 300))
    text = report.bo2_verdict([at_ckpt, off, shuffled_at(1.0, wins(200))])
    exact = paired_interval(outcome_values(wins(200)) - outcome_values(wins(196)))
    assert Interval.of(outcome_values(wins(200)) - outcome_values(wins(196))).lo > 0
    assert exact.lo < 0 < exact.hi and f"+0.010 [{exact.lo:+.3f}, {exact.hi:+.3f}]" in text
    assert "not distinguishable from online's curve" in text
    # Judgements of another prompt count at a bracketing checkpoint of online's: no pairing,
    # the unpaired check of older summaries instead (never a broadcast over mismatched
    # prompts). Online's curve at KL 1 is 0.5, outside the shuffled peak's 0.375 [0.33, 0.42].
    uneven = online_at((0.0, 10, 100), (2.0, 20, 300))
    uneven["evals"][1]["win_outcomes"] = "W" * 75 + "L" * 225
    text = report.bo2_verdict([uneven, off, shuffled_at(1.0, wins(150))])
    assert "paired over the evaluation prompts" not in text
    assert text.endswith(
        "is at 0.500, outside the shuffled peak's 95% interval: unlike the paper, the curves "
        "differ at that KL."
    )
    exact = dict(_run("offline bo2 (exact order)", [base]), max_param_diff_to_online=0.0)
    assert report.bo2_verdict([on, off, exact]).endswith(
        "the exact-order Bo2 replay's max parameter difference to online: 0."
    )


def test_h3_reads_single_runs_at_the_default_settings():
    """Fig. 6-8 follow one run per method at the default settings: the offline run at
    online's lr and beta (not the best of the sweep), read after online's step count and at
    its end, and the uniformly shuffled replay."""
    online = dict(_run("online ipo", ["W", "W"]), lr=1e-3, beta=0.1)  # steps 10, 20
    best = dict(_run("offline ipo", ["W"] * 4), name="best", lr=3e-3, beta=0.1)
    default = dict(_run("offline ipo", ["L"] * 4), name="default", lr=1e-3, beta=0.1)
    assert report.offline_same([best, default], online) is default
    shuffled = _run(report.UNIFORM, ["L", "L"])
    rows = report._h3_checkpoints(online, default, [shuffled])
    assert [(label, r["name"], e["step"]) for label, r, e in rows] == [
        ("online", "online_ipo", 20),
        ("offline, near online's step count", "default", 20),
        ("offline, at its end", "default", 40),
        ("shuffled (tandem)", shuffled["name"], 20),
    ]
    short = dict(default, evals=default["evals"][:3])  # as long as online: one row
    assert [label for label, _, _ in report._h3_checkpoints(online, short, [])] == [
        "online",
        "offline, at its end",
    ]

    # No checkpoint at online's step (the standard preset: online ends at 400, offline is
    # evaluated at 250, 500, ...): the nearest one, the earlier on a tie.
    def at(steps):
        return [{**default["evals"][1], "step": k} for k in [0, *steps]]

    for online_end, steps, want in ((400, [250, 500, 750], 500), (20, [10, 30, 50], 10)):
        on = dict(online, evals=at([online_end]))
        rows = report._h3_checkpoints(on, dict(default, evals=at(steps)), [])
        assert [e["step"] for _, _, e in rows] == [online_end, want, steps[-1]]


def test_h3_verdict_contrasts_the_runs_and_correlates_within_each():
    """Fig. 7's verdict: offline more accurate and the weaker policy (paired) is the paper's
    finding; each run's own r over its checkpoints is reported beside the pooled r, which
    mixes the runs' levels (here: both runs rise together, r = +1 within each, yet the
    pooled r is negative)."""

    def run(name, points, outcomes):
        r = _run(name, outcomes)
        for e, (acc, win) in zip(r["evals"][1:], points, strict=True):
            e["accuracy"], e["win_rate"] = acc, win
            right = round(acc * 200)  # the same 200 pairs, the first ones classified right
            e["accuracy_outcomes"] = "W" * right + "L" * (200 - right)
        r["evals"][0]["accuracy"] = 0.5
        return r

    base = "W" * 200 + "L" * 200
    online = run("online ipo", [(0.60, 0.50), (0.65, 0.55), (0.70, 0.60)], [base] * 3)
    offline = run(
        "offline ipo", [(0.75, 0.30), (0.80, 0.35), (0.85, 0.40)], ["L" * 80 + base[80:]] * 3
    )
    text = report.classification_verdict(online, offline)
    assert text.startswith(
        "offline's last checkpoint classifies 0.850 of the valid-split pairs (golden labels) "
        "right, online's 0.700 (paired difference offline - online +0.150 ["
    )
    assert "as the paper found, the more accurate classifier is the weaker policy" in text
    assert "r = online +1.00, offline +1.00 (successive states" in text
    pooled = np.corrcoef([0.6, 0.65, 0.7, 0.75, 0.8, 0.85], [0.5, 0.55, 0.6, 0.3, 0.35, 0.4])
    assert f"checkpoints r = {pooled[0, 1]:+.2f}, which mixes" in text and pooled[0, 1] < 0
    # Online the more accurate and the better policy: unlike the paper.
    swapped = run(
        "offline ipo", [(0.5, 0.30), (0.52, 0.35), (0.55, 0.40)], ["L" * 80 + base[80:]] * 3
    )
    assert "unlike the paper, online is both the more accurate classifier" in (
        report.classification_verdict(online, swapped)
    )
    # Not separated policies: said so.
    level = run("offline ipo", [(0.75, 0.6), (0.8, 0.6), (0.85, 0.6)], [base] * 3)
    assert "not separated at this sample size" in report.classification_verdict(online, level)
    # Accuracies 0.705 vs 0.700 (1 pair of 200 differs): not separated, no claim on accuracy.
    close = run(
        "offline ipo", [(0.70, 0.30), (0.70, 0.35), (0.705, 0.40)], ["L" * 80 + base[80:]] * 3
    )
    text = report.classification_verdict(online, close)
    assert "the two classifiers' accuracies are not separated" in text
    assert "as the paper found" not in text
    # Evaluations of older code have no per-pair results: no claim either.
    old = dict(
        offline,
        evals=[{k: v for k, v in e.items() if k != "accuracy_outcomes"} for e in offline["evals"]],
    )
    text = report.classification_verdict(online, old)
    assert "no per-pair results to compare (an older evaluation)" in text
    assert "as the paper found" not in text
    short = dict(online, evals=online["evals"][:3])  # two checkpoints: no r
    assert "r = online n/a, offline +1.00" in report.classification_verdict(short, offline)
    assert "training pairs" not in text  # none measured: no sentence on them


def test_h3_verdict_contrasts_the_classifiers_on_d_golden_training_pairs_too():
    """Where the evaluations carry D_golden's training pairs (the paper's Fig. 8 set), the
    verdict gives the paired contrast on them beside the held-out one, with its own sign:
    here the two runs tie on the valid split and offline leads by 30 of 100 training pairs,
    and in the other direction online leads."""

    def run(name, train):
        r = _run(name, ["W" * 200 + "L" * 200] * 2)
        for e in r["evals"]:
            e["accuracy"] = 0.5
            e["accuracy_outcomes"] = "W" * 50 + "L" * 50
            e["train_accuracy"] = train.count("W") / len(train)
            e["train_accuracy_outcomes"] = train
        return r

    online = run("online ipo", "W" * 50 + "L" * 50)
    offline = run("offline ipo", "W" * 80 + "L" * 20)
    text = report.classification_verdict(online, offline)
    d = paired_difference("W" * 80 + "L" * 20, "W" * 50 + "L" * 50)
    assert (
        f"offline classifies 0.800 right and online 0.500 (paired difference offline - online "
        f"+0.300 [{d.lo:+.3f}, {d.hi:+.3f}] over the same 100 pairs): offline the more accurate "
        "classifier there, as the paper found." in text
    )
    assert d.lo > 0
    assert "online the more accurate classifier there, unlike the paper." in (
        report.classification_verdict(offline, online)
    )
    level = run("offline ipo", "W" * 51 + "L" * 49)
    assert "the two not separated there." in report.classification_verdict(online, level)


def test_pool_bias_is_what_copies_of_online_would_score():
    """A 90% quantile over more checkpoints lies nearer their best. Online wins 0.2, 0.4,
    ..., 1.0 at its 5 checkpoints: q90 = 0.8 + 0.6 * 0.2 = 0.92 (linear, position 3.6); three
    copies (15 checkpoints, position 12.6 among three 1.0s at the top) give 1.0: 1.087."""
    wins = ["W" * k + "L" * (5 - k) for k in (1, 2, 3, 4, 5)]
    size = {"model": "toy-s", "online": [_run("online ipo", wins)]}
    size["offline"] = [_run("offline ipo", ["L" * 5] * 5) for _ in range(3)]
    assert "would score 1.087 at toy-s (3 copies)" in report._pool_bias([size])
    size["offline"] = size["offline"][:1]  # as many checkpoints as online: no bias to state
    assert report._pool_bias([size]) == ""


def test_nan_judgements_and_win_rates_are_refused_not_carried():
    """A NaN judgement gave a mean NaN with the interval [0, 1]; a NaN win rate met first was
    never replaced as the peak."""
    with pytest.raises(ValueError, match="values in \\[0, 1\\]"):
        Interval.of_judgements(np.array([1.0, np.nan, 0.0]))
    r = _run("online ipo", ["WL", "WW"])
    r["evals"][1]["win_rate"] = float("nan")
    with pytest.raises(ValueError, match="win rate nan at step"):
        report.peak([r])
    assert math.isnan(report.ratio(0.3, 0.0)) and report.ratio(0.3, 0.6) == 0.5


def test_the_tandem_verdict_compares_bits_where_the_summary_has_them():
    """A replay whose parameters differ from online's only as -0 against +0 has a largest
    difference of 0: with the bit record it is not called identical; an older summary,
    without the record, is called identical by value, and says so."""
    signed_zero = {
        "max_param_diff_to_online": 0.0,
        "max_loss_dev_to_online": 0.0,
        "param_leaves_differing_in_bits": 1,
    }
    assert report.tandem_identical(signed_zero) == (False, "bit-identical")
    assert report.tandem_identical({**signed_zero, "param_leaves_differing_in_bits": 0}) == (
        True,
        "bit-identical",
    )
    old = {"max_param_diff_to_online": 0.0, "max_loss_dev_to_online": 0.0}
    same, how = report.tandem_identical(old)
    assert same and "by value" in how
    assert not report.tandem_identical({**old, "max_loss_dev_to_online": 1e-7})[0]


def test_fig1_names_a_peak_at_its_runs_end_with_the_side_it_favours():
    """Online rising to its end understates its lead; the offline sweep's best run at its end
    overstates it; a run that turned over gives no note."""

    def run(name, wins):
        evals = [
            {"step": 10 * k, "win_rate": w, "win_lo": w - 0.1, "win_hi": w + 0.1, "kl": k}
            for k, w in enumerate([0.5, *wins])
        ]
        return {"name": name, "evals": evals}

    def peak(runs):
        return report.peak(runs)

    rising, turned = run("online", [0.6, 0.7]), run("online", [0.7, 0.6])
    off_end = [run("offline_a", [0.55, 0.60]), run("offline_b", [0.58, 0.50])]
    off_mid = [run("offline_a", [0.62, 0.60]), run("offline_b", [0.58, 0.50])]
    both = report.fig1_end_notes(rising, peak([rising]), off_end, peak(off_end), "quick")
    assert "Online's best checkpoint is its last" in both and "e.g. the standard preset" in both
    assert "which favours offline in this comparison" in both
    assert "Offline's best run (offline_a) peaks at its last checkpoint, or level with it " in both
    assert "(step 20)" in both and "which favours online in this comparison" in both
    only_off = report.fig1_end_notes(turned, peak([turned]), off_end, peak(off_end), "standard")
    assert "Online" not in only_off and "Offline's best run (offline_a)" in only_off
    assert report.fig1_end_notes(turned, peak([turned]), off_mid, peak(off_mid), "quick") == ""
    level = run("online", [0.7, 0.7])  # a tie with the last checkpoint counts as at the end
    note = report.fig1_end_notes(level, peak([level]), off_mid, peak(off_mid), "standard")
    assert "Online's last checkpoint is level with its best (step 10)" in note
    assert "standard preset" not in note


def test_an_exact_sign_interval_says_it_is_given_the_count_of_differing_prompts():
    """8 of 512 prompts differ, all for online: the exact branch's upper end is the mean itself
    (the share of differing prompts is taken as fixed), and the verdict's words say so; with 30
    differing prompts the normal interval needs no such note."""
    base = "W" * 256 + "L" * 256
    online = _peak(base[:248] + "W" * 8 + base[256:], "online")
    offline = _peak(base[:248] + "L" * 8 + base[256:], "offline")
    d = paired_difference(online.outcomes, offline.outcomes)
    assert d.hi == pytest.approx(d.mean) and d.lo > 0
    text = report.compare(online, offline, "online", "offline")
    assert (
        "over the same 512 prompts; only 8 of the 512 differ: exact on their signs, given" in text
    )
    many = _peak(base[:226] + "W" * 30 + base[256:], "online")
    fewer = _peak(base[:226] + "L" * 30 + base[256:], "offline")
    assert "only" not in report.compare(many, fewer, "online", "offline")


def _hidden_run(name, golden_texts, hidden_ps, method=None):
    """A run whose k-th checkpoint past step 0 has golden outcomes golden_texts[k] and the
    hidden humans' per-prompt probabilities hidden_ps[k]."""
    run = _run(method or name, golden_texts)
    run["name"] = name
    n = len(golden_texts[0])
    for e, p in zip(run["evals"], [np.full(n, 0.5), *hidden_ps], strict=True):
        h = Interval.of(p)
        e.update(
            hidden_p=list(p),
            hidden_win_rate=h.mean,
            hidden_win_lo=h.lo,
            hidden_win_hi=h.hi,
            hidden_reward=0.0,
        )
    return run


def test_spearman_is_pearson_of_average_ranks_and_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    assert report.spearman([(1, 10), (2, 20), (3, 35)]) == pytest.approx(1.0)
    assert report.spearman([(1, 3), (2, 2), (3, 1)]) == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 40).astype(float)  # ties share their average rank
    y = x + rng.normal(0, 2, 40)
    want = scipy_stats.spearmanr(x, y).statistic
    assert report.spearman(list(zip(x, y, strict=True))) == pytest.approx(want, abs=1e-12)


def test_hidden_verdict_pairs_the_golden_peaks_by_the_humans():
    """Online's golden peak (step 10) beats offline's on 30 of 40 prompts by the golden PM;
    the humans' probabilities at those checkpoints differ by +0.2 on every prompt (agree),
    or by -0.2 (the other way), or by 0 (not separated). Offline's second run peaks by the
    humans at a checkpoint the golden PM ranks low, and the rank correlation over the six
    checkpoints is worked out by hand."""
    n = 40
    on_text, off_text, low = "W" * 30 + "L" * 10, "L" * 30 + "W" * 10, "L" * 40

    def case(d_at_peaks):
        online = _hidden_run("online", [on_text, low], [np.full(n, 0.6), np.full(n, 0.3)])
        off_peak = np.full(n, 0.6 - d_at_peaks)
        a = _hidden_run("off_a", [off_text, low], [off_peak, np.full(n, 0.2)], "offline ipo")
        b = _hidden_run("off_b", [low, low], [np.full(n, 0.1), np.full(n, 0.7)], "offline ipo")
        return report.hidden_verdict(online, [a, b], [online, a, b])

    agree = case(0.2)
    assert "online - offline = +0.200 [+0.200, +0.200]" in agree
    assert "the humans agree with the golden PM's verdict" in agree
    assert "the other way" in case(-0.2) and "do not separate them" in case(0.0)
    # By the humans: online's best is its step 10 (0.6), offline's off_b step 20 (0.7).
    assert "online's best checkpoint is step 10" in agree
    assert "offline's off_b step 20" in agree and "-0.100 [-0.100, -0.100], offline above" in agree
    # Golden win rates 0.75, 0, 0.25, 0, 0, 0; the humans' probabilities 0.6, 0.3, 0.4, 0.2,
    # 0.1, 0.7 on every prompt, so their majority verdicts' win rates are 1, 0, 0, 0, 0, 1.
    want = report.spearman([(0.75, 1), (0, 0), (0.25, 0), (0, 0), (0, 0), (0, 1)])
    assert "Over the 6 checkpoints" in agree and f"correlation {want:.3f}" in agree
    assert 0 < want < 1
    # Online's peak wins 30 prompts by the golden PM, all 40 by the humans' majority (p 0.6):
    # they agree on 30 of 40; offline's peak wins 10, the majority none (p 0.4): 30 of 40.
    assert "sides with the humans' majority on 0.750 of online's and 0.750 of offline's" in agree
    assert "test split" not in agree  # no test-split agreement given
    online = _hidden_run("online", [on_text, low], [np.full(n, 0.6), np.full(n, 0.3)])
    a = _hidden_run("off_a", [off_text, low], [np.full(n, 0.4), np.full(n, 0.2)], "offline ipo")
    text = report.hidden_verdict(online, [a], [online, a], 0.655)
    assert "0.750 of offline's (on the test split's pairs" in text
    assert "agrees with the hidden reward on 0.655)." in text
    text = report.hidden_verdict(online, [a], [online, a], 0.655, 0.994)
    assert (
        "agrees with the hidden reward on 0.655, where a logistic judge on the hidden reward's "
        "text features, fit to the same human labels, agrees on 0.994)." in text
    )


def test_goodhart_verdict_names_a_rising_golden_and_a_falling_human_win_rate():
    """Online's golden outcomes improve from step 10 to 30 on 30 of 40 prompts while the
    humans' probabilities fall by 0.1 on every prompt from their peak at step 10: the PMs are
    over-optimised against the humans. Where the golden PM's do not change, the humans' fall
    is named alone; a humans' peak at the end, or level with it there, is no fall."""
    n = 40

    def online(ps, golden=("W" * 10 + "L" * 30, "W" * 20 + "L" * 20, "W" * 30 + "L" * 10)):
        run = _hidden_run("online", list(golden), [np.full(n, v) for v in ps])
        for e in run["evals"][1:]:  # as in a study: step 0 is not judged by the proxy
            e.update(proxy_win_rate=e["win_rate"], proxy_win_lo=0.0, proxy_win_hi=1.0)
        return run

    text = report.goodhart_verdict(online([0.6, 0.55, 0.5]))
    assert (
        "Judged by the hidden humans, from 0.600 to 0.500, with its peak 0.600 at step 10" in text
    )
    assert "changes by -0.100 [-0.100, -0.100] and the golden PM's by +0.500" in text
    assert "past step 10 the golden PM, which the run's proxy PM was trained to imitate, no " \
        "longer tracks the humans." in text  # fmt: skip
    same_golden = ("W" * 30 + "L" * 10,) * 3
    alone = report.goodhart_verdict(online([0.6, 0.55, 0.5], same_golden))
    assert alone.endswith("the humans' win rate falls from its peak.")
    for ps in ([0.6, 0.6, 0.6], [0.4, 0.5, 0.6]):  # level with the peak at the end, or rising
        text = report.goodhart_verdict(online(ps))
        assert "peak 0.600 at step 30, its last checkpoint: no fall by the humans" in text
    noisy = online([0.6, 0.55, 0.5])
    noisy["evals"][-1]["hidden_p"] = list(np.r_[np.full(20, 0.1), np.full(20, 1.0)])
    noisy["evals"][-1]["hidden_win_rate"] = 0.55
    assert report.goodhart_verdict(noisy).endswith("is not separated.")
