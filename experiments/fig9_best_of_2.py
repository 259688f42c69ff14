"""Fig. 9: Best-of-2 (SFT on the winner) online, offline and in tandem (offline on the online
Bo2 run's stream uniformly shuffled: the paper's D_online-shuffled).

Runs the pipeline (SFT, golden PM, D_golden, proxy PM, golden baseline) and Fig. 1's runs
(every figure compares with them), then this experiment, and writes figures/fig9_best_of_2.png
and a partial REPORT.md into --workdir. It is `reproduce.py --experiments=fig9`: the same flags
and stages, so a later `reproduce.py` on the same --workdir reuses every finished stage.

  python experiments/fig9_best_of_2.py --preset=quick --workdir=/tmp/ipo_gap_quick
"""

import reproduce

if __name__ == "__main__":
    reproduce.only("fig9")
