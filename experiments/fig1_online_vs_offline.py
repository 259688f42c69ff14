"""Fig. 1: online IPO against the offline IPO sweep on D_golden, KL vs win rate.

The sweep is lr x beta, each offline run `offline_steps_factor` times online's steps.

Runs the pipeline (SFT, golden PM, D_golden, proxy PM, golden baseline), then this experiment,
and writes figures/fig1_online_vs_offline.png and a partial REPORT.md into --workdir. It is
`reproduce.py --experiments=fig1`: the same flags and stages, so a later `reproduce.py` on the
same --workdir reuses every finished stage.

  python experiments/fig1_online_vs_offline.py --preset=quick --workdir=/tmp/ipo_gap_quick
"""

import reproduce

if __name__ == "__main__":
    reproduce.only("fig1")
