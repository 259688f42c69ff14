"""Win-rate intervals and the report's verdicts (ipo_gap/eval.py, ipo_gap/report.py): each
verdict against a case worked out by hand."""

import numpy as np
import pytest

from ipo_gap import report
from ipo_gap.eval import Interval, outcome_values, outcomes, paired_difference


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
    d = paired_difference("WWLT", "LWLL")  # differences 1, 0, 0, 1/2
    values = np.array([1.0, 0.0, 0.0, 0.5])
    half = 1.96 * values.std(ddof=1) / 2
    assert (d.mean, d.lo, d.hi, d.n) == pytest.approx((0.375, 0.375 - half, 0.375 + half, 4))
    same = paired_difference("WLT", "WLT")
    assert (same.mean, same.lo, same.hi) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference("WL", "W")


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


@pytest.mark.parametrize(
    "ratios,word,ahead",
    [((0.60, 0.80), "narrows", False), ((1.04, 1.20), "widens", True), ((0.8, 1.2), "stays", True)],
)
def test_scaling_gap_is_the_distance_of_the_ratio_from_1(tmp_path, ratios, word, ahead):
    def size(model, params, ratio):
        on = "W" * 50 + "L" * 50
        off = "W" * round(50 * ratio) + "L" * (100 - round(50 * ratio))
        return {
            "model": model,
            "params": params,
            "online": [_run("online ipo", [on])],
            "offline": [_run("offline ipo", [off])],
        }

    sizes = [size("toy-s", 1e6, ratios[0]), size("toy-m", 4e6, ratios[1])]
    text = "\n".join(report.scaling_section(sizes, tmp_path))
    assert f"Offline/online goes from {ratios[0]:.3f}" in text and f"the gap {word}" in text
    assert ("Offline is ahead of online at" in text) == ahead
    assert "shuffled" not in text.split("**Verdict:**")[1]  # no shuffled runs in the summary
    # With each size's shuffled replay (the paper's "tandem"): its own ratio and trend.
    for s, r in zip(sizes, (0.9, 0.96), strict=True):
        s["shuffled"] = [
            _run(
                "offline ipo (shuffled uniform)",
                ["W" * round(50 * r) + "L" * (100 - round(50 * r))],
            )
        ]
    text = "\n".join(report.scaling_section(sizes, tmp_path))
    assert "Shuffled/online goes from 0.900 (toy-s) to 0.960 (toy-m): the gap narrows" in text
    assert (tmp_path / "fig10_11_scaling.png").exists()


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
