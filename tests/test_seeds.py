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
