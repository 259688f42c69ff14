"""The main job: the whole controlled study (NOTES.md, Fig. 2) -> figures and REPORT.md.

Stages (each resumable: a finished stage is skipped on re-run, a killed job continues from
the first unfinished stage or run): the embedded task and its tokenizer, SFT, golden PM,
D_golden, proxy PM, golden baseline policy, then the experiments of Fig. 1, 4/13, 5/12, 6-8, 9,
semi-online IPO and HyPO. Writes into --workdir: per-run metrics (JSON lines) and checkpoints
under runs/, one PNG per figure under figures/, and REPORT.md.

  python experiments/reproduce.py --preset=quick --workdir=/tmp/ipo_gap_quick

Presets (ipo_gap.study.PRESETS): micro (tests), quick (the whole study in <= 15 minutes on a
2-core CPU), standard (the paper's full grid and evaluation counts at toy sizes, about two
hours), paper (the paper's counts and model sizes, for accelerators).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time

from absl import app, flags, logging

from ipo_gap import report, study_experiments
from ipo_gap.study import PRESETS
from ipo_gap.study_runs import Study

TASKS = ("embedded",)

_PRESET = flags.DEFINE_enum("preset", "quick", sorted(PRESETS), "Study size preset.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/ipo_gap_study", "Output directory.")
_TASK = flags.DEFINE_enum("task", "embedded", TASKS, "Preference data of the study.")
_SEED = flags.DEFINE_integer("seed", None, "Override the preset's seed.")
_DOCS = flags.DEFINE_string(
    "copy_fig1_to", None, "Also copy Figure 1 here (the README's image is docs/fig1.png)."
)


def run(workdir: pathlib.Path, preset: str, seed: int | None = None) -> pathlib.Path:
    cfg = PRESETS[preset]
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "study_config.json"
    if config_path.exists():
        saved = json.loads(config_path.read_text())
        if saved != json.loads(json.dumps(cfg.to_dict())):
            raise ValueError(
                f"{workdir} holds a study with another configuration ({config_path}); "
                f"use a new --workdir or delete it"
            )
    else:
        config_path.write_text(json.dumps(cfg.to_dict(), indent=1))
    print(f"study {preset} in {workdir}: {cfg}", flush=True)
    start = time.time()
    study = Study(workdir, cfg)
    results = study_experiments.run_all(study)
    path = report.write(workdir, results, preset)
    print(f"study finished in {time.time() - start:.0f}s: {path}", flush=True)
    return path


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save and restore at INFO
        logging.set_verbosity(logging.WARNING)
    workdir = pathlib.Path(_WORKDIR.value)
    run(workdir, _PRESET.value, _SEED.value)
    if _DOCS.value:
        shutil.copy(workdir / "figures" / "fig1_online_vs_offline.png", _DOCS.value)


if __name__ == "__main__":
    app.run(main)
