"""Fig. 4 / 13: offline IPO on the online run's logged stream, in exact order (the tandem
identity: bit-identical on CPU), uniformly shuffled and shuffled in windows; with Fig. 1's runs
also Fig. 6-8 (policies as classifiers).

Runs the pipeline (SFT, golden PM, D_golden, proxy PM, golden baseline) and Fig. 1's runs
(every figure compares with them), then this experiment, and writes
figures/fig4_13_replay_and_shuffle.png (and fig6_7_8_classification.png) and a partial
REPORT.md into --workdir. It is `reproduce.py --experiments=fig4`: the same flags and stages,
so a later `reproduce.py` on the same --workdir reuses every finished stage.

  python experiments/fig4_13_replay_and_shuffle.py --preset=quick --workdir=/tmp/ipo_gap_quick
"""

import reproduce

if __name__ == "__main__":
    reproduce.only("fig4")
