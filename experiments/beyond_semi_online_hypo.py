"""Beyond the paper: semi-online IPO (samples from a copy of the policy refreshed every s steps)
and HyPO (DPO on D_golden plus an on-policy KL term).

Runs the pipeline (SFT, golden PM, D_golden, proxy PM, golden baseline) and Fig. 1's runs
(every figure compares with them), then this experiment, and writes
figures/beyond_semi_online_hypo.png and a partial REPORT.md into --workdir. It is `reproduce.py
--experiments=beyond`: the same flags and stages, so a later `reproduce.py` on the same
--workdir reuses every finished stage.

  python experiments/beyond_semi_online_hypo.py --preset=quick --workdir=/tmp/ipo_gap_quick
"""

import reproduce

if __name__ == "__main__":
    reproduce.only("beyond")
