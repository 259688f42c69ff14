"""Fig. 8's classifier on D_golden's training pairs, for finished studies whose evaluations
lack it.

Evaluations since 0d15c70 classify, at every checkpoint, as many of D_golden's training pairs
as of the valid split: those the offline runs on D_golden read first (`Study.train_pairs_order`),
the set the paper's Fig. 8 reads. A study of older code kept its runs' final policies; this
binary measures them on the same pairs (`study_experiments.classify_final_training_pairs`):
online IPO's and the offline run at online's lr and beta (REPORT.md's H3 contrast). It prints
per study both accuracies and winner drifts and the paired difference offline - online
(`eval.paired_difference`), and over seeds the mean difference with a Student-t interval
(`seeds.spread`), as SEEDS.md gives it for newer studies.

Before it trusts a final policy it measures it again on the valid-split pairs and refuses
unless that reproduces the per-pair results the study recorded at its last checkpoint, bit for
bit (which needs the kind of CPU that ran the study, and one core as the study's workers had).
It reads the study's files and writes none of them.

  taskset -c 0 python experiments/classify_training_pairs.py --workdir=DIR --seeds=0,1,2
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags, logging

from ipo_gap import report, seeds
from ipo_gap import study_experiments as se
from ipo_gap.eval import Interval

_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "a finished study, or with --seeds the workdir holding seed_<s>/",
    required=True,
)
_SEEDS = flags.DEFINE_list("seeds", None, "the seeds of a `reproduce.py --seeds` workdir")
_OUT = flags.DEFINE_string("out", None, "also write the results as JSON here")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every restore at INFO
        logging.set_verbosity(logging.WARNING)
    root = pathlib.Path(_WORKDIR.value)
    if _SEEDS.value:
        try:
            studies = {int(x): root / f"seed_{int(x)}" for x in _SEEDS.value}
        except ValueError:
            raise app.UsageError(f"--seeds must be integers, got {_SEEDS.value}") from None
    else:
        studies = {None: root}
    results = {}
    for seed, workdir in studies.items():
        r = results[seed] = se.classify_final_training_pairs(workdir)
        on, off = r["online"], r["offline"]
        mean, lo, hi, n = r["difference"]
        print(
            f"{workdir}: on {n} of D_golden's training pairs offline ({off['run']}, step "
            f"{off['step']}) classifies {off['train_accuracy']:.3f} right, online ({on['run']}, "
            f"step {on['step']}) {on['train_accuracy']:.3f}: offline - online {mean:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}]; winner drift offline {off['train_drift']:+.2f}, online "
            f"{on['train_drift']:+.2f}",
            flush=True,
        )
    if len(results) > 1:
        diffs = [r["difference"][0] for r in results.values()]
        signs = [report.interval_sign(Interval(*r["difference"])) for r in results.values()]
        above, below = signs.count(1), signs.count(-1)
        print(
            f"over {len(diffs)} seeds: offline - online {seeds.spread(diffs).cell()} (mean, "
            f"Student-t 95%); separated offline's way in {above}, online's in {below}"
        )
        for label in ("offline", "online"):
            for key in ("train_accuracy", "train_drift"):
                values = [r[label][key] for r in results.values()]
                print(f"  {label} {key}: {seeds.spread(values).cell()}")
    if _OUT.value:
        pathlib.Path(_OUT.value).write_text(
            json.dumps({str(k): v for k, v in results.items()}, indent=1)
        )


if __name__ == "__main__":
    app.run(main)
