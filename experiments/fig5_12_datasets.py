"""Fig. 5 / 12: offline IPO on datasets of online-policy samples labelled by the golden PM
(D_final-vs-final, D_sft-vs-mid, D_mid-vs-final; the paper's D_4k-vs-4k, D_sft-vs-800,
D_800-vs-4k at the preset's step counts).

Runs the pipeline (SFT, golden PM, D_golden, proxy PM, golden baseline) and Fig. 1's runs
(every figure compares with them), then this experiment, and writes
figures/fig5_12_datasets.png and a partial REPORT.md into --workdir. It is `reproduce.py
--experiments=fig5`: the same flags and stages, so a later `reproduce.py` on the same --workdir
reuses every finished stage.

  python experiments/fig5_12_datasets.py --preset=quick --workdir=/tmp/ipo_gap_quick
"""

import reproduce

if __name__ == "__main__":
    reproduce.only("fig5")
