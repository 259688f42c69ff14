"""Fig. 10 / 11 / 14: policy sizes (the preset's scaling_models): online IPO, offline IPO and
offline on the online stream uniformly shuffled (the paper's "tandem") per size; best
performance = 90% quantile of win rates, normalised by online, with bootstrap intervals.

Runs the pipeline (SFT, golden PM, D_golden, proxy PM, golden baseline) and Fig. 1's runs
(every figure compares with them), then this experiment, and writes figures/fig10_sizes.png
(KL vs win rate per size), figures/fig10_11_scaling.png and a partial REPORT.md into
--workdir. It is `reproduce.py
--experiments=fig10`: the same flags and stages, so a later `reproduce.py` on the same
--workdir reuses every finished stage.

  python experiments/fig10_11_14_scaling.py --preset=quick --workdir=/tmp/ipo_gap_quick
"""

import reproduce

if __name__ == "__main__":
    reproduce.only("fig10")
