"""The main job: the whole controlled study (NOTES.md, Fig. 2) -> figures and REPORT.md.

Stages (each resumable: a finished stage is skipped on re-run, a killed job continues from
the first unfinished stage or run, and inside it from its last train state when
--checkpoint_every is set): the embedded task and its tokenizer, SFT, golden PM,
D_golden, proxy PM, golden baseline policy, then the experiments of Fig. 1, 4/13, 5/12, 6-8, 9,
semi-online IPO and HyPO, and the policy sizes of Fig. 10/11/14. Writes into --workdir: per-run
metrics (JSON lines) and checkpoints under runs/, one PNG per figure under figures/, and
REPORT.md.

  python experiments/reproduce.py --preset=quick --workdir=/tmp/ipo_gap_quick

On a CPU host the stages run side by side in worker processes of one core each (--jobs, one
per core by default; ipo_gap.parallel): the golden PM trains while the other policy sizes run
SFT, the offline sweep's runs train two at a time, and so on. Every jobs >= 1 gives the same
bits; --jobs=0 runs everything in this process (last bits differ: XLA splits matmuls by thread).

On a host with several devices, --mesh=data:4,model:2 shards every model and batch of the
study (ipo_gap.sharding); the mesh is recorded in the study's config. Across hosts, run the
same command on every host with --distributed (ipo_gap.hosts: process 0 writes the files, so
--workdir must be shared by all hosts).

Presets (ipo_gap.study.PRESETS): micro (tests), quick (the whole study in <= 15 minutes on a
2-core CPU), standard (the paper's full grid and evaluation counts at toy sizes; 99 minutes measured
end to end on a 2-core Intel Xeon, see the README), paper (the paper's counts and model sizes,
for accelerators, with --remat on: experiments/memory_plan.py says what a mesh needs).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import shutil
import time

import dtype_flag
import host_flags
import jax
from absl import app, flags, logging

from ipo_gap import hosts, jsonl, parallel, report, sharding, study_experiments
from ipo_gap import seeds as seeds_report
from ipo_gap.data import preference_data
from ipo_gap.study import PRESETS, check_inputs, for_task, old_defaults, with_new_defaults
from ipo_gap.study_runs import Study

TASKS = ("embedded", *preference_data.TASKS)

_PRESET = flags.DEFINE_enum("preset", "quick", sorted(PRESETS), "Study size preset.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/ipo_gap_study", "Output directory.")
_TASK = flags.DEFINE_enum(
    "task",
    "embedded",
    TASKS,
    "Preference data: the embedded task (generated), or a real dataset read from --data_dir "
    "(see the README's dataset table).",
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder with the task's files (real tasks).")
_SKIP_BAD = flags.DEFINE_bool(
    "skip_bad_records",
    False,
    "Count, report and skip malformed dataset records instead of stopping at the first one.",
)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer_model",
    None,
    "A SentencePiece .model (e.g. T5's spiece.model); default: one trained on the task's text.",
)
_POLICY_CKPT = flags.DEFINE_string(
    "policy_checkpoint",
    None,
    "Hugging Face T5 directory (config.json + *.safetensors) that starts the policy and the "
    "proxy PM, e.g. google/t5-v1_1-large; default: a random init of the preset's size.",
)
_GOLDEN_CKPT = flags.DEFINE_string(
    "golden_checkpoint", None, "Hugging Face T5 directory that starts the golden PM."
)
_SCALING = flags.DEFINE_list(
    "scaling_models",
    None,
    "Policy sizes of Fig. 10-11: preset names, or Hugging Face T5 directories when the study "
    "starts from --policy_checkpoint (default: the preset's sizes; with --policy_checkpoint, "
    "that checkpoint only).",
)
_SEED = flags.DEFINE_integer("seed", None, "Override the preset's seed.")
_SEEDS = flags.DEFINE_list(
    "seeds",
    None,
    "Run the whole study once per seed (in --workdir/seed_<s>/) and write --workdir/SEEDS.md: "
    "the headline numbers per seed and their mean with a t-interval over seeds, which holds "
    "training noise (one study's intervals hold evaluation noise only).",
)
_CKPT_EVERY = flags.DEFINE_integer(
    "checkpoint_every",
    None,
    "Save the train state of SFT, the PMs and each policy run every this many steps, so a "
    "killed job resumes inside the stage it was in (default: the preset's; 0 = off, a killed "
    "stage restarts).",
)
_MESH = flags.DEFINE_string(
    "mesh",
    None,
    "Device mesh for every model and batch, e.g. 'data:4,model:2' or 'data:-1' (all devices "
    "on the data axis); default: one device. Recorded in the study's config.",
)
_COMPUTE = dtype_flag.COMPUTE_DTYPE
_REMAT = flags.DEFINE_bool(
    "remat",
    None,
    "Recompute each model block's activations in the backward pass (jax.checkpoint): far "
    "less accelerator memory at long sequences for about a third more compute; the same "
    "values to rounding, not the same bits (default: the preset's, on for paper). Recorded "
    "in the study's config. experiments/memory_plan.py shows what a mesh needs either way.",
)
_JOBS = flags.DEFINE_integer(
    "jobs",
    None,
    "Worker processes of one CPU core each that run independent stages side by side "
    "(ipo_gap.parallel); 0 = every stage in this process. Default: one per core on a CPU "
    "host without --mesh, else 0. The results are the same bits for every jobs >= 1.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Multi-host: jax.distributed.initialize before anything else; every process runs this "
    "same command (on Cloud TPU, SLURM or Open MPI the three flags below may be left unset).",
)
_EXPERIMENTS = flags.DEFINE_list(
    "experiments",
    [],
    "Run only these experiments, besides the pipeline and Fig. 1 (which every other one is "
    f"compared with): some of {', '.join(study_experiments.EXPERIMENTS[1:])} (fig4: Fig. 4/13 "
    "and, with Fig. 1, Fig. 6-8; fig5: Fig. 5/12; fig9: Best-of-2; beyond: semi-online and "
    "HyPO; fig10: policy sizes, Fig. 10/11/14). Empty: all. The per-figure binaries beside "
    "this one set it.",
)
_DOCS = flags.DEFINE_string(
    "copy_fig1_to", None, "Also copy Figure 1 here (the README's image is docs/fig1.png)."
)


def config(preset: str, *, seed: int | None = None, **overrides):
    """The preset's StudyConfig for a task (`study.for_task`) with flag overrides (None =
    not given); paths are made absolute so the saved config names the files used."""
    task = overrides.pop("task", None) or "embedded"
    if task == "embedded":
        given = [f"--{k}" for k in ("data_dir", "skip_bad_records") if overrides.get(k)]
        if given:  # silently ignored, they would still be saved in the study's config
            raise ValueError(
                f"{' and '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to a real "
                f"dataset (--task="
                f"{'|'.join(preference_data.TASKS)}); the embedded task is generated"
            )
    cfg = for_task(PRESETS[preset], task)
    if seed is not None:
        overrides["seed"] = seed
    for name in ("data_dir", "tokenizer_model", "policy_checkpoint", "golden_checkpoint"):
        if overrides.get(name):
            overrides[name] = str(pathlib.Path(overrides[name]).resolve())
    if overrides.get("scaling_models"):
        overrides["scaling_models"] = tuple(
            str(pathlib.Path(m).resolve()) if pathlib.Path(m).is_dir() else m
            for m in overrides["scaling_models"]
        )
    elif overrides.get("policy_checkpoint"):
        overrides["scaling_models"] = (overrides["policy_checkpoint"],)
    if overrides.get("mesh"):  # recorded resolved ("data:-1" -> "data:8"), so it is checked
        known = (sharding.DATA_AXIS, sharding.MODEL_AXIS)
        unknown = [a for a in sharding.parse_mesh_spec(overrides["mesh"]) if a not in known]
        if unknown:  # no rule maps onto it: every array would be replicated along it
            raise ValueError(
                f"--mesh={overrides['mesh']}: axis {unknown[0]!r} is not one the study shards "
                f"over ({', '.join(known)}: sharding.LOGICAL_RULES)"
            )
        mesh = sharding.make_mesh(overrides["mesh"])
        overrides["mesh"] = ",".join(f"{name}:{size}" for name, size in mesh.shape.items())
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def default_jobs(mesh: str | None) -> int:
    """One worker per core on a CPU host (`ipo_gap.parallel`), 0 (one process) on a mesh or
    an accelerator."""
    if mesh or jax.default_backend() != "cpu":
        return 0
    return len(parallel.cores())


def run(
    workdir: pathlib.Path,
    preset: str,
    seed: int | None = None,
    jobs: int = 0,
    selected=None,
    **overrides,
) -> pathlib.Path:
    """Runs (or resumes) the study in `workdir`; returns the path of its REPORT.md. jobs and
    selected (experiments; None: all): see `study_experiments.run_all`."""
    return _run(workdir, preset, seed, jobs, selected, **overrides)[0]


def run_seeds(
    workdir: pathlib.Path,
    preset: str,
    seeds: list[int],
    jobs: int = 0,
    selected=None,
    **overrides,
) -> pathlib.Path:
    """Runs the study once per seed in `workdir/seed_<s>/`; returns the path of SEEDS.md."""
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds has a seed twice: {seeds}")
    per_seed = {
        s: _run(workdir / f"seed_{s}", preset, s, jobs, selected, **overrides)[1] for s in seeds
    }
    path = seeds_report.write(workdir / "SEEDS.md", per_seed, preset)
    hosts.say(f"{len(seeds)} seeds compared: {path}")
    return path


def _run(
    workdir: pathlib.Path,
    preset: str,
    seed: int | None = None,
    jobs: int = 0,
    selected=None,
    **overrides,
):
    study_experiments.experiments(selected)  # unknown names fail before any work
    cfg = config(preset, seed=seed, **overrides)
    check_inputs(cfg)  # a mistyped flag must not bind the workdir to it
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "study_config.json"
    if hosts.exists(config_path):
        saved = with_new_defaults(json.loads(config_path.read_text()))
        asked = json.loads(json.dumps(cfg.to_dict()))
        if saved != asked:
            differ = ", ".join(
                f"{k}: saved {saved.get(k)!r}, asked {asked.get(k)!r}"
                for k in sorted(set(saved) | set(asked))
                if saved.get(k) != asked.get(k)
            )
            raise ValueError(
                f"{workdir} holds a study with another configuration ({config_path}; "
                f"{differ}); pass the saved values as flags to resume it, or use a new "
                "--workdir (a study saved before a field existed has it at its old default: "
                + old_defaults()
                + ")"
            )
    else:
        jsonl.write_atomic(config_path, json.dumps(cfg.to_dict(), indent=1))
    hosts.say(f"study {preset} in {workdir}: {cfg}")
    start = time.perf_counter()
    study = Study(workdir, cfg)
    results = study_experiments.run_all(study, jobs=jobs, selected=selected)
    path = report.write(workdir, results, preset)
    hosts.say(f"study finished in {time.perf_counter() - start:.0f}s: {path}")
    return path, results


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save and restore at INFO
        logging.set_verbosity(logging.WARNING)
    if _DISTRIBUTED.value and not _MESH.value:
        raise app.UsageError(
            "--distributed needs --mesh over the devices of all hosts (e.g. --mesh=data:-1): "
            "without one every host would train its own copy of the study"
        )
    host_flags.initialize(_DISTRIBUTED.value)
    workdir = pathlib.Path(_WORKDIR.value)
    seeds = None
    if _SEEDS.value is not None:
        if not _SEEDS.value:
            raise app.UsageError("--seeds is empty: give seeds like --seeds=0,1,2")
        if _SEED.value is not None:
            raise app.UsageError("give --seed or --seeds, not both")
        try:
            seeds = [int(s) for s in _SEEDS.value]
        except ValueError:
            raise app.UsageError(f"--seeds must be integers, got {_SEEDS.value}") from None
        runner = functools.partial(run_seeds, seeds=seeds)
    else:
        runner = functools.partial(run, seed=_SEED.value)
    jobs = default_jobs(_MESH.value) if _JOBS.value is None else _JOBS.value
    runner(
        workdir,
        _PRESET.value,
        jobs=jobs,
        selected=_EXPERIMENTS.value,
        task=_TASK.value,
        data_dir=_DATA_DIR.value,
        skip_bad_records=_SKIP_BAD.value,
        tokenizer_model=_TOKENIZER.value,
        policy_checkpoint=_POLICY_CKPT.value,
        golden_checkpoint=_GOLDEN_CKPT.value,
        scaling_models=_SCALING.value,
        checkpoint_every=_CKPT_EVERY.value,
        mesh=_MESH.value,
        compute_dtype=_COMPUTE.value,
        remat=_REMAT.value,
    )
    if _DOCS.value:
        first = workdir / f"seed_{seeds[0]}" if seeds else workdir
        if hosts.is_writer():  # one copy per job, as every other study file
            shutil.copy(first / "figures" / "fig1_online_vs_offline.png", _DOCS.value)


def only(*selected: str) -> None:
    """The entry point of a per-figure binary: this job with --experiments defaulting to
    `selected` (the same flags, the same --workdir layout: stages are shared with the main
    job, which reuses them)."""
    flags.FLAGS.set_default("experiments", list(selected))
    app.run(main)


if __name__ == "__main__":
    app.run(main)
