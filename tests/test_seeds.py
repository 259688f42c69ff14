"""SEEDS.md (ipo_gap/seeds.py): intervals over seeds and their verdict (the end-to-end
`reproduce.py --seeds` test is in test_study.py, where it reuses the micro study)."""

import math

import numpy as np
import pytest

from ipo_gap import seeds


def test_spread_is_the_student_t_interval():
    s = seeds.spread([1.0, 2.0, 3.0])
    # sd 1, n 3: half-width t_{0.975, 2} / sqrt(3), with t_{0.975, 2} = 4.302653 (tables).
    assert s.mean == 2.0 and s.n == 3
    assert s.hi - s.mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert s.mean - s.lo == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    two = seeds.spread([0.0, 1.0])  # t_{0.975, 1} = 12.7062: two seeds give wide intervals
    assert two.hi - two.mean == pytest.approx(12.7062 * math.sqrt(0.5) / math.sqrt(2), rel=1e-5)
    one = seeds.spread([0.4])
    assert one.mean == 0.4 and math.isnan(one.lo) and "no interval" in one.cell()
    with pytest.raises(ValueError, match="non-empty"):
        seeds.spread([])
    with pytest.raises(ValueError, match="finite"):
        seeds.spread([0.1, float("nan")])
    same = seeds.spread([0.05, 0.05, 0.05])  # zero width: no evidence, not "separated"
    assert same.identical and "no interval" in same.cell()
    assert "not separated" not in seeds.verdict(same) and "beats" not in seeds.verdict(same)
    assert "independent" in seeds.verdict(same)


def test_verdict_over_seeds_follows_the_interval_of_the_mean_difference():
    assert "online beats offline" in seeds.verdict(seeds.spread([0.10, 0.12, 0.11]))
    assert "offline beats online" in seeds.verdict(seeds.spread([-0.10, -0.12, -0.11]))
    # Two seeds with opposite verdicts (as measured on the quick preset): not separated.
    assert "not separated" in seeds.verdict(seeds.spread([0.09, -0.01]))
    assert "one seed" in seeds.verdict(seeds.spread([0.2]))


def _results(online_win, offline_wins):
    def run(name, wins):
        evals = [{"step": 0, "win_rate": 0.5, "win_lo": 0.4, "win_hi": 0.6, "kl": 0.0}]
        evals += [
            {"step": 10 * (k + 1), "win_rate": w, "win_lo": w - 0.02, "win_hi": w + 0.02, "kl": k}
            for k, w in enumerate(wins)
        ]
        return {"name": name, "evals": evals}

    online = run("online_ipo", [online_win - 0.1, online_win])
    offline = [run(f"offline_{i}", [w]) for i, w in enumerate(offline_wins)]
    return {
        "fig1": [online, *offline],
        "fig10": [{"model": "toy-s", "online": [online], "offline": offline}],
    }


def test_seeds_report_numbers(tmp_path):
    per_seed = {0: _results(0.70, [0.50, 0.55]), 3: _results(0.66, [0.60, 0.58])}
    text = seeds.write(tmp_path / "SEEDS.md", per_seed, "test").read_text()
    # Per seed: online peak - pooled offline peak = 0.70 - 0.55 and 0.66 - 0.60.
    assert "| 0 | 0.700 [0.680, 0.720] | 1.00 | 0.550 [0.530, 0.570] |" in text
    assert "+0.150" in text and "+0.060" in text
    mean = seeds.spread([0.15, 0.06])
    assert mean.mean == pytest.approx(0.105)
    assert f"| online - offline | {mean.cell()} |" in text
    assert mean.lo < 0 and "not separated over these seeds" in text  # two seeds: t = 12.7
    ratio0 = np.quantile([0.50, 0.55], 0.9) / np.quantile([0.60, 0.70], 0.9)
    assert f"{ratio0:.3f}" in text


def test_the_change_of_the_gap_with_size_is_paired_by_seed(tmp_path):
    """Each seed's sizes share one golden PM, baseline and prompts: the ratios of both
    seeds move together (per-size intervals overlap), but the gap narrows by the same
    amount in each, which the paired change shows; sizes stay in the study's order."""

    def sized(offset, online_win=0.70):
        res = _results(online_win, [0.55])
        online = res["fig1"][0]

        def run(w):
            return [
                {"name": "o", "evals": [{"step": 0, "win_rate": 0.5}, {"step": 10, "win_rate": w}]}
            ]

        rel = (("toy-s", 0.60), ("toy-m", 0.70), ("toy-l", 0.80 + offset / 10))
        res["fig10"] = [
            {"model": m, "online": [online], "offline": run(online_win * (r + offset)),
             "shuffled": run(online_win * (r + offset + 0.1))}
            for m, r in rel
        ]  # fmt: skip
        return res

    text = seeds.write(
        tmp_path / "SEEDS.md", {0: sized(0.0), 1: sized(0.05), 2: sized(-0.04)}, "t"
    ).read_text()
    assert text.index("| toy-s |") < text.index("| toy-m |") < text.index("| toy-l |")
    assert (
        "Offline: change of the gap from toy-s to toy-l per seed 0: +0.203, 1: +0.208, 2: +0.199"
        in text
    )
    assert "the gap narrows with size over seeds" in text
    # ... where the unpaired per-size intervals overlap (online's q90 is 0.69 here).
    ratio = lambda r, o: 0.70 * (r + o) / 0.69  # noqa: E731
    small = seeds.spread([ratio(0.60, o) for o in (0.0, 0.05, -0.04)])
    large = seeds.spread([ratio(0.80 + o / 10, o) for o in (0.0, 0.05, -0.04)])
    per_seed = ", ".join(f"{s}: {ratio(0.60, o):.3f}" for s, o in enumerate((0.0, 0.05, -0.04)))
    assert small.hi > large.lo and f"| toy-s | {per_seed} | {small.cell()} |" in text
    # All ratios below 1: the ratio's own change is the gap's narrowing, said so rather than
    # repeated, and no fold.
    assert (
        "0: +0.203, 1: +0.208, 2: +0.199, mean 0.203 [0.192, 0.215]: the gap narrows with size "
        "over seeds (the t-interval of the change is > 0). Every seed's ratio lies below 1 at "
        "both sizes, so the ratio itself moves by the same amounts." in text
    )
    assert "The ratio itself moves" not in text and "folds" not in text
    # All above 1 (offline ahead of online at every size): the same amounts, sign flipped.
    ahead = seeds.write(tmp_path / "SEEDS.md", {0: sized(0.40), 1: sized(0.45)}, "t").read_text()
    assert ratio(0.60, 0.40) > 1 and "Offline: change of the gap from toy-s to toy-l" in ahead
    assert (
        "Every seed's ratio lies above 1 at both sizes, so the ratio itself moves by the same "
        "amounts, sign flipped." in ahead
    )
    assert "Shuffled: change of the gap from toy-s to toy-l" in text
    assert (
        "Online's peak is its run's last checkpoint at seed(s) 0, 1, 2: it may not have reached "
        "its peak there, which biases those seeds' differences against online." in text
    )
    # A seed whose toy-l offline run passes online: |1 - r| folds, the report says so, and
    # the ratio's own change is r_last - r_first per seed.
    text = seeds.write(tmp_path / "SEEDS.md", {0: sized(0.0), 1: sized(0.2)}, "t").read_text()
    moves = [ratio(0.80 + o / 10, o) - ratio(0.60, o) for o in (0.0, 0.2)]
    assert ratio(0.82, 0.2) > 1 > ratio(0.80, 0.0)
    assert f"The ratio itself moves 0: {moves[0]:+.3f}, 1: {moves[1]:+.3f}" in text
    assert (
        "the seeds put the ratio on both sides of 1 (or at 1) at toy-l, where the gap |1 - r| folds"
        in text
    )
    # A seed without Fig. 10 is left out of the paired change by name; the others keep theirs.
    bare = _results(0.70, [0.55])
    del bare["fig10"]
    text = seeds.write(tmp_path / "SEEDS.md", {0: sized(0.0), 1: bare, 2: sized(0.05)}, "t")
    text = text.read_text()
    assert "toy-l per seed 0: +0.203, 2: +0.208, mean" in text
    assert "Seed(s) 1 lack a finite ratio at toy-s or toy-l and are left out (n = 2)." in text


def test_the_gap_over_seeds_narrows_only_from_a_separated_gap():
    """REPORT.md's fold rule over seeds: first-size ratios 0.90, 1.10, 0.92, 1.08 (on both
    sides of 1) and last-size ratios at 1 give per-seed narrowings 0.10, 0.10, 0.08, 0.08, a
    t-interval above 0, yet the gap folds where it would narrow from; the same narrowings
    from ratios near 0.5 stand, and so do ratios all below 1 whose mean's t-interval holds 1
    (no seed folds: |1 - r| is 1 - r in each). A widening needs the last size unfolded."""
    change = seeds.spread([0.10, 0.10, 0.08, 0.08])
    assert change.lo > 0
    at_one, low, ones = [0.90, 1.10, 0.92, 1.08], [0.5, 0.52, 0.48, 0.5], [1.0] * 4
    refused = seeds.trend_verdict(change, at_one, ones)
    assert refused.startswith("the gap's change with size is not separated from 0 over these")
    assert "the seeds put the first size's ratio on both sides of 1 (or at 1)" in refused
    assert seeds.trend_verdict(change, low, ones).startswith("the gap narrows with size")
    spread_low = [0.2, 0.5, 0.99, 0.3]
    assert seeds.spread(spread_low).hi > 1 and not seeds.straddles_one(spread_low)
    assert seeds.trend_verdict(change, spread_low, ones).startswith("the gap narrows with size")
    widens = seeds.spread([-0.10, -0.10, -0.08, -0.08])
    assert "the last size's ratio on both sides" in seeds.trend_verdict(widens, low, at_one)
    assert seeds.trend_verdict(widens, at_one, low).startswith("the gap widens with size")
    assert seeds.straddles_one([0.5, float("nan")]) and seeds.straddles_one([1.0, 0.5])


def _with_online(res, wins):
    """`res` with online's checkpoints set to `wins` (steps 10, 20, ...)."""
    online = res["fig1"][0]
    online["evals"] = online["evals"][:1] + [
        {"step": 10 * (k + 1), "win_rate": w, "win_lo": w - 0.02, "win_hi": w + 0.02, "kl": k}
        for k, w in enumerate(wins)
    ]
    return res


def test_a_peak_at_its_last_checkpoint_is_named_with_the_direction_of_its_bias(tmp_path):
    """Online peaking early and offline's best run at its end: only the offline note, which
    biases the difference in favour of online (offline may still have been rising)."""
    res = _with_online(_results(0.70, [0.50]), [0.72, 0.70])
    res["fig1"][1]["evals"].append({"step": 20, "win_rate": 0.58, "win_lo": 0.56,
                                    "win_hi": 0.60, "kl": 2.0})  # fmt: skip
    text = seeds.write(tmp_path / "SEEDS.md", {4: res}, "t").read_text()
    assert "Online's peak" not in text
    assert (
        "The offline sweep's peak is its run's last checkpoint at seed(s) 4: it may not have "
        "reached its peak there, which biases those seeds' differences in favour of online." in text
    )
    # An offline run that peaked before its end gives no note either.
    res["fig1"][1]["evals"].append({"step": 30, "win_rate": 0.52, "win_lo": 0.50,
                                    "win_hi": 0.54, "kl": 3.0})  # fmt: skip
    text = seeds.write(tmp_path / "SEEDS.md", {4: res}, "t").read_text()
    assert "last checkpoint" not in text


def test_a_seed_without_a_ratio_is_named_not_shifted(tmp_path):
    """A seed without Fig. 10, and one whose online win rates are all 0 (a NaN ratio): each
    per-seed value keeps its seed's label, and the means leave the others out by name."""
    ok = _results(0.70, [0.50, 0.55])
    no_fig10 = _results(0.60, [0.50])
    del no_fig10["fig10"]
    zero = _with_online(_results(0.0, [0.50]), [0.0, 0.0])
    zero["fig10"][0]["online"] = [zero["fig1"][0]]
    also = _results(0.66, [0.60, 0.58])
    text = seeds.write(tmp_path / "SEEDS.md", {0: ok, 1: no_fig10, 2: zero, 3: also}, "t")
    text = text.read_text()
    r0 = np.quantile([0.50, 0.55], 0.9) / np.quantile([0.60, 0.70], 0.9)
    r3 = np.quantile([0.60, 0.58], 0.9) / np.quantile([0.56, 0.66], 0.9)
    mean = seeds.spread([r0, r3])
    assert (
        f"| toy-s | 0: {r0:.3f}, 1: -, 2: nan, 3: {r3:.3f} | {mean.cell()} (n = 2; not finite "
        "at seed(s) 2) |" in text
    )
    assert "nan [" not in text and "contains 0" in text  # Fig. 1's verdict over 4 seeds


def test_a_seed_without_fig1_peaks_is_named(tmp_path):
    res = _results(0.70, [])
    with pytest.raises(ValueError, match="seed 7: its results give no Fig. 1 peaks"):
        seeds.write(tmp_path / "SEEDS.md", {0: _results(0.7, [0.5]), 7: res}, "t")


def _judged(name, outcomes_by_step, method=None, lr=1e-3, beta=0.1, acc=None, train_acc=None):
    """A run whose checkpoints carry per-prompt outcomes (W/T/L strings)."""
    from ipo_gap.eval import outcome_values

    evals = [{"step": 0, "win_rate": 0.5, "win_lo": 0.4, "win_hi": 0.6, "kl": 0.0}]
    for k, text in enumerate(outcomes_by_step):
        w = float(outcome_values(text).mean())
        e = {"step": 10 * (k + 1), "win_rate": w, "win_lo": w - 0.05, "win_hi": w + 0.05}
        evals.append(e | {"kl": float(k + 1), "win_outcomes": text})
    if acc is not None:
        evals[-1]["accuracy_outcomes"] = acc
    if train_acc is not None:
        evals[-1]["train_accuracy_outcomes"] = train_acc
    return {"name": name, "method": method or name, "lr": lr, "beta": beta, "evals": evals}


def test_every_paired_finding_is_taken_as_the_report_takes_it(tmp_path):
    """Per seed, each finding is the paired difference of the peaks REPORT.md compares; the
    table stars the seeds whose interval excludes 0, counts them each way, and gives the mean
    over seeds a t-interval. The exact replay's identity is listed by seed."""
    from ipo_gap import report as rep
    from ipo_gap.eval import paired_difference

    def study(shift):
        n = 40
        on = "W" * (24 + shift) + "L" * (n - 24 - shift)
        off = "W" * 20 + "L" * 20
        online = _judged(
            "online_ipo",
            ["W" * 10 + "L" * 30, on],
            acc="W" * 30 + "L" * 10,
            train_acc="W" * 20 + "L" * 10,
        )
        offline = [  # on D_golden's training pairs offline leads by 5 of 20, off_b would by 0
            _judged("off_a", [off], acc="W" * 36 + "L" * 4, train_acc="W" * 25 + "L" * 5),
            _judged("off_b", ["W" * 18 + "L" * 22], lr=5e-3, train_acc="W" * 20 + "L" * 10),
        ]
        tandem = {"name": "tandem", "method": "tandem", "max_loss_dev_to_online": 0.0,
                  "param_leaves_differing_in_bits": 0, "evals": online["evals"]}  # fmt: skip
        shuffled = _judged("shuf", ["W" * 14 + "L" * 26], method=rep.UNIFORM)
        sweep = _judged("shuf_b", ["W" * 22 + "L" * 18], method=rep.UNIFORM_SWEEP)
        bo2 = [_judged("b_on", ["W" * 30 + "L" * 10]), _judged("b_off", ["W" * 5 + "L" * 35]),
               _judged("b_sh", ["W" * 29 + "L" * 11], method=rep.SHUFFLED_BO2)]  # fmt: skip
        beyond = [
            _judged("s10", ["W" * 25 + "L" * 15], method="semi-online ipo (s=10)"),
            _judged("sinf", ["W" * 12 + "L" * 28], method="semi-online ipo (s=inf)"),
            _judged("s50", ["W" * 20 + "L" * 20], method="semi-online ipo (s=50)"),
            _judged("hypo", ["W" * 2 + "L" * 38], method="hypo"),
        ]
        return {"fig1": [online, *offline], "fig4": [tandem, shuffled, sweep], "fig9": bo2,
                "beyond": beyond}  # fmt: skip

    per_seed = {0: study(0), 1: study(6), 2: study(-3)}
    f = seeds.findings(per_seed[1])
    on, off = per_seed[1]["fig1"][0], per_seed[1]["fig1"][1]
    expect = paired_difference(on["evals"][-1]["win_outcomes"], off["evals"][-1]["win_outcomes"])
    assert f["fig1"][1] == expect and expect.mean == pytest.approx(10 / 40)
    assert f["shuffled_vs_online"][1].mean == pytest.approx((14 - 30) / 40)  # shuffled - online
    assert f["shuffled_vs_offline"][1].mean == pytest.approx((22 - 20) / 40)  # best of each pool
    assert f["bo2_online_vs_offline"][1].mean == pytest.approx(25 / 40)
    assert f["bo2_shuffled_vs_online"][1].mean == pytest.approx(-1 / 40)
    assert f["classifier"][1].mean == pytest.approx(6 / 40)  # off_a (online's lr), not off_b
    assert f["classifier_train"][1].mean == pytest.approx(5 / 30)  # off_b's would be 0
    assert "on 30 pairs: offline - online" in f["classifier_train"][0]
    assert f["semi_online"][0].endswith("s=10 - s=inf")
    assert f["semi_online"][1].mean == pytest.approx(13 / 40)
    assert f["hypo"][1].mean == pytest.approx((2 - 30) / 40)
    # s=inf peaks at KL 1, where online's curve is its KL-1 checkpoint (10 of 40 won).
    assert f["semi_stale_matched_kl"][1].mean == pytest.approx((12 - 10) / 40)
    assert "(s=inf) on online's trade-off curve" in f["semi_stale_matched_kl"][0]
    # As REPORT.md reads it: only a peak at a smaller KL than online's peak is compared, even
    # where online's curve reaches further (here on to KL 3, past its peak at KL 2).
    past = dict(per_seed[1])
    online = past["fig1"][0]
    tail = {**online["evals"][-1], "step": 30, "kl": 3.0, "win_outcomes": "W" * 5 + "L" * 35}
    online = dict(online, evals=[*online["evals"], dict(tail, win_rate=5 / 40)])
    sinf = _judged("sinf", ["L" * 40, "W" * 12 + "L" * 28], method="semi-online ipo (s=inf)")
    sinf["evals"][2]["kl"] = 2.5  # its peak, between online's peak KL and online's last KL
    past["fig1"] = [online, *past["fig1"][1:]]
    past["beyond"] = [r if r["name"] != "sinf" else sinf for r in past["beyond"]]
    assert "semi_stale_matched_kl" not in seeds.findings(past)
    text = rep.beyond_verdict(rep.peak([online]), past["beyond"], online)
    assert "semi-online (s=inf) at KL" not in text and "semi-online (s=10) at KL" in text
    text = seeds.write(tmp_path / "SEEDS.md", per_seed, "t").read_text()
    diffs = [paired_difference(per_seed[s]["fig1"][0]["evals"][-1]["win_outcomes"],
                               "W" * 20 + "L" * 20) for s in (0, 1, 2)]  # fmt: skip
    stars = ["*" if rep.interval_sign(d) else "" for d in diffs]
    assert stars == ["", "*", ""]  # 4 of 4 and 1 of 1 differing prompts: not separated
    cells = ", ".join(
        f"{s}: {d.mean:+.3f}{st}" for s, d, st in zip((0, 1, 2), diffs, stars, strict=True)
    )
    mean = seeds.spread([d.mean for d in diffs])
    assert f"| {f['fig1'][0]} | {cells} | 1 / 0 / 2 | {mean.cell()} |" in text
    assert "| 0 / 3 / 0 |" in text  # HyPO below online in every seed
    assert "The exact-order replay against the online run (Fig. 3-4): bit-identical at seed(s) " \
        "0, 1, 2." in text  # fmt: skip


def test_the_classifiers_levels_are_the_last_checkpoints_at_onlines_settings(tmp_path):
    """SEEDS.md's Fig. 6-8 levels: online's and the offline run at online's lr and beta (not
    another sweep run), each at its last checkpoint, per seed with a t-interval over seeds; a
    seed whose evaluations lack a field (older code: no training pairs) shows "-" and is left
    out of that mean."""

    def study(on_acc, off_acc, train=None):
        online = _judged("online_ipo", ["W" * 6 + "L" * 4, "W" * 7 + "L" * 3])
        offline = [
            _judged("off_other", ["W" * 5 + "L" * 5], lr=5e-3),
            _judged("off_same", ["W" * 4 + "L" * 6]),
        ]
        online["evals"][1] |= {"accuracy": 0.99, "drift": 9.0}  # not the last checkpoint
        online["evals"][-1] |= {"accuracy": on_acc, "drift": -2.0}
        offline[0]["evals"][-1] |= {"accuracy": 0.01, "drift": 5.0, "train_accuracy": 0.0,
                                    "train_drift": 5.0}  # fmt: skip
        offline[1]["evals"][-1] |= {"accuracy": off_acc, "drift": -0.5}
        if train:
            online["evals"][-1] |= {"train_accuracy": train[0], "train_drift": -1.0}
            offline[1]["evals"][-1] |= {"train_accuracy": train[1], "train_drift": 0.25}
        return {"fig1": [online, *offline]}

    per_seed = {
        0: study(0.6, 0.7, (0.7, 0.9)),
        1: study(0.65, 0.8, (0.72, 0.96)),
        5: study(0.7, 0.75),
    }
    assert seeds.classifier_levels(per_seed[1]) == {
        "online accuracy": 0.65, "offline accuracy": 0.8, "online train_accuracy": 0.72,
        "offline train_accuracy": 0.96, "online drift": -2.0, "offline drift": -0.5,
        "online train_drift": -1.0, "offline train_drift": 0.25,
    }  # fmt: skip
    assert "online train_accuracy" not in seeds.classifier_levels(per_seed[5])
    text = seeds.write(tmp_path / "SEEDS.md", per_seed, "t").read_text()
    acc = seeds.spread([0.7, 0.8, 0.75])
    assert (
        f"| offline: accuracy, valid-split pairs (held out) | 0: 0.700, 1: 0.800, 5: 0.750 | "
        f"{acc.cell()} |" in text
    )
    train = seeds.spread([0.9, 0.96])
    assert (
        f"| offline: accuracy, D_golden's training pairs (Fig. 8's set) | 0: 0.900, 1: 0.960, "
        f"5: - | {train.cell()} |" in text
    )
    assert "| online: drift of log pi(y_w), valid-split pairs | 0: -2.00, 1: -2.00, 5: -2.00 |" \
        " -2.000 (the same in all 3 seeds: no interval) |" in text  # fmt: skip


def test_the_hidden_humans_finding_is_fig1s_peaks_judged_by_them():
    """With the hidden humans' per-prompt probabilities on every checkpoint (the embedded
    task), SEEDS.md's finding is Fig. 1's two golden-chosen peaks compared by them, as
    REPORT.md compares them; without them there is no such finding."""
    from ipo_gap import report as rep
    from ipo_gap.eval import Interval

    online = _judged("online_ipo", ["W" * 10 + "L" * 30, "W" * 30 + "L" * 10])
    offline = [_judged("off_a", ["W" * 20 + "L" * 20]), _judged("off_b", ["W" * 5 + "L" * 35])]
    results = {"fig1": [online, *offline]}
    assert "fig1_hidden" not in seeds.findings(results)
    rng = np.random.default_rng(0)
    for run in (online, *offline):
        for e in run["evals"]:
            e["hidden_p"] = list(rng.uniform(0.2, 0.8, 40))
    online["evals"][-1]["hidden_p"] = list(np.array(offline[0]["evals"][-1]["hidden_p"]) - 0.1)
    for run in (online, *offline):
        for e in run["evals"]:
            h = Interval.of(e["hidden_p"])
            e.update(hidden_win_rate=h.mean, hidden_win_lo=h.lo, hidden_win_hi=h.hi)
    label, d = seeds.findings(results)["fig1_hidden"]
    assert "hidden humans" in label and d == rep.hidden_at_peaks(online, offline)
    assert d.mean == pytest.approx(-0.1) and d.hi < 0  # online's peak is step 20, off_a's 10
    # The humans' own peaks: the checkpoints with the highest mean probability.
    label, d = seeds.findings(results)["fig1_hidden_own"]
    best = [
        max((e for e in r["evals"] if e["step"]), key=lambda e: np.mean(e["hidden_p"]))
        for r in (online, *offline)
    ]
    off_best = max(best[1:], key=lambda e: np.mean(e["hidden_p"]))
    want = np.mean(np.array(best[0]["hidden_p"]) - np.array(off_best["hidden_p"]))
    assert "would choose" in label and d.mean == pytest.approx(want)
