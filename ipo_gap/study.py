"""The controlled pipeline of the study (Fig. 2) as resumable stages, and its presets.

SFT on all responses pooled -> golden PM (the largest model of the preset) trained on the human
labels of D_initial -> D_golden = the train split relabelled by the golden PM -> proxy PM
(policy-sized) trained on D_golden -> golden baseline policy (online IPO against the golden
PM) and its samples on the evaluation prompts. `ipo_gap.study_runs` runs the experiments on
top, and `experiments/reproduce.py` is the main job.

Every stage writes into its own directory of the workdir and finishes by writing `done.json`
(its summary); a stage whose `done.json` exists is loaded instead of re-run, so a killed job
continues from the first unfinished stage. Models are saved as orbax checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable

import equinox as eqx
import jax
import numpy as np

from ipo_gap import hosts, jsonl, sharding
from ipo_gap.configs import MODEL_PRESETS, T5Config, model_preset
from ipo_gap.data import embedded_task, preference_data
from ipo_gap.t5 import model as t5
from ipo_gap.tokenizer import Tokenizer
from ipo_gap.train_state_io import CheckpointManager


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Sizes and hyper-parameters of one study; presets below (`PRESETS`).

    Learning rates are the paper's scaled to tiny models (the paper's 1e-5 moves a 0.5M-param
    T5 too slowly); the offline grid keeps the paper's ratios: lr x {0.3, 1, 3}, beta in
    {0.1, 0.5, 1}, steps x {1, 5} of the online run (4k vs 20k).
    """

    name: str
    seed: int = 0
    # The data (`ipo_gap.data.preference_data.TASKS`, or "embedded") and where its files are.
    task: str = "embedded"
    data_dir: str | None = None
    skip_bad_records: bool = False
    # Pretrained starts (Hugging Face T5 directories) and a SentencePiece model; None = a
    # tokenizer trained on the task's text and randomly initialised preset models.
    tokenizer_model: str | None = None
    policy_checkpoint: str | None = None  # the policy, and the proxy PM (policy-sized)
    golden_checkpoint: str | None = None
    num_train: int = 20000
    num_valid: int = 1000
    num_test: int = 1000
    num_rl_prompts: int = 4000
    num_eval_prompts: int = 2048  # win-rate prompts
    num_kl_prompts: int = 256
    num_acc_pairs: int = 256
    vocab_size: int = 512
    prompt_len: int = 16
    target_len: int = 16
    policy_model: str = "toy-s"
    golden_model: str = "toy-l"
    sft_steps: int = 1500
    sft_batch: int = 64
    sft_lr: float = 3e-3
    pm_steps: int = 2000
    pm_batch_golden: int = 32
    pm_batch_proxy: int = 32
    pm_lr: float = 1e-3
    # The golden PM's learning rate (None: pm_lr). Measured on the embedded task (quick's 8k
    # pairs, toy-m, 2,000 steps): at 1e-3 its training loss stayed near log 2 and validation
    # accuracy at 0.56-0.63; at 3e-4 it fell to 0.46-0.58 and validation reached 0.65-0.69.
    # Within quick's own 400 steps 3e-4 is no better (2026-12-05, one core: test accuracy
    # against the human labels 0.613, still rising at step 400, against 0.621 at 1e-3), so
    # quick keeps 1e-3; micro and standard set 3e-4.
    pm_lr_golden: float | None = None
    pm_warmup: int = 100
    pm_eval_every: int = 200
    pm_patience: int = 3
    rl_steps: int = 400
    rl_batch: int = 32
    rl_lr: float = 3e-4
    rl_beta: float = 0.1
    offline_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    offline_betas: tuple[float, ...] = (0.1, 0.5, 1.0)
    offline_steps_factor: int = 5
    num_evals: int = 8
    # SFT, the PMs and the policy runs save their train state every this many steps and a
    # killed stage resumes from it (0: no train states; a killed stage restarts from step 0,
    # finished stages are unaffected).
    checkpoint_every: int = 0
    shuffle_levels: tuple[int, ...] = (2, 8, 32)  # windows in steps; the uniform shuffle is added
    semi_online_refresh: tuple[int, ...] = (10, 100, 0)  # 0 = never refreshed (s = infinity)
    hypo_lam: float = 0.1
    scaling_models: tuple[str, ...] = ("toy-s", "toy-m", "toy-l")
    eval_batch: int = 256
    # Device mesh of every model and batch, e.g. "data:4,model:2" (`sharding.make_mesh`;
    # None: one device). Part of the config because sharding changes the order of float
    # sums: a sharded run agrees with an unsharded one to ~1e-5, not to the bit.
    mesh: str | None = None
    # What every model's matrix products read ("float32" or "bfloat16"; they accumulate in
    # float32, t5/layers.py `product`); parameters and optimizer state stay float32. bf16 is
    # for accelerators and CPUs with bf16 matrix units (AMX); its numbers are not float32's.
    compute_dtype: str = "float32"
    # Recompute each model block's activations in the backward pass (`T5Config.remat`): the
    # paper's sizes at 1024-token prompts do not fit an accelerator's memory without it
    # (`experiments/memory_plan.py`). The same values to rounding, not the same bits.
    remat: bool = False

    def __post_init__(self):
        if self.num_acc_pairs > self.num_valid:
            raise ValueError(
                f"StudyConfig {self.name!r}: num_acc_pairs={self.num_acc_pairs} > "
                f"num_valid={self.num_valid}: the accuracy pairs are the first num_acc_pairs "
                "pairs of the valid split, so only num_valid of them would be used; set "
                "num_acc_pairs <= num_valid"
            )
        if self.rl_steps < self.num_evals:
            raise ValueError(
                f"StudyConfig {self.name!r}: rl_steps={self.rl_steps} < num_evals="
                f"{self.num_evals}: the online run's evaluation steps would repeat, and every "
                "run's k-th evaluation reads the online stream's k-th window; set num_evals <= "
                "rl_steps"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model(self, which: str, vocab_size: int) -> T5Config:
        return self.preset_model(
            self.golden_model if which == "golden" else self.policy_model, vocab_size
        )

    def preset_model(self, preset: str, vocab_size: int) -> T5Config:
        """A model preset with this study's vocabulary size and compute dtype."""
        cfg = model_preset(preset, vocab_size=vocab_size)
        # remat needs scanned layers (`T5Config.remat`); the toy presets unroll theirs.
        scan = cfg.scan_layers or self.remat
        return cfg.replace(compute_dtype=self.compute_dtype, remat=self.remat, scan_layers=scan)


PRESETS = {
    # For tests: every stage and experiment with tiny counts (about a minute or two on CPU).
    "micro": StudyConfig(
        name="micro",
        num_train=600,
        num_valid=64,
        num_test=64,
        num_rl_prompts=128,
        num_eval_prompts=64,
        num_kl_prompts=32,
        num_acc_pairs=32,
        vocab_size=384,
        golden_model="toy-s",
        sft_steps=40,
        sft_batch=32,
        pm_steps=40,
        pm_eval_every=20,
        pm_warmup=5,
        pm_lr_golden=3e-4,
        rl_steps=6,
        rl_batch=8,
        offline_lrs=(3e-4,),
        offline_betas=(0.1,),
        offline_steps_factor=2,
        num_evals=2,
        shuffle_levels=(2,),
        semi_online_refresh=(3,),
        scaling_models=("toy-s", "toy-m"),
        eval_batch=64,
    ),
    # The whole study on the embedded task in <= 15 minutes on a 2-core CPU.
    "quick": StudyConfig(
        name="quick",
        num_train=8000,
        num_valid=500,
        num_test=500,
        num_rl_prompts=2000,
        num_eval_prompts=512,
        num_kl_prompts=128,
        num_acc_pairs=256,
        golden_model="toy-m",
        sft_steps=600,
        pm_steps=400,
        pm_eval_every=100,
        rl_steps=150,
        rl_batch=16,
        rl_lr=5e-4,
        offline_lrs=(1.5e-4, 5e-4, 1.5e-3),
        num_evals=5,
        shuffle_levels=(4, 16),
        semi_online_refresh=(10, 50, 0),
        scaling_models=("toy-s", "toy-m"),
    ),
    # The paper's full grid and evaluation counts at toy sizes: 99 minutes end to end on a 2-core
    # Xeon (README).
    "standard": StudyConfig(name="standard", pm_lr_golden=3e-4),
    # The paper's counts and sizes, for accelerators (T5 Large policy, XXL golden PM).
    "paper": StudyConfig(
        name="paper",
        num_train=92000,
        num_valid=2000,
        num_test=2000,
        num_rl_prompts=20000,
        vocab_size=32128,
        prompt_len=1024,
        target_len=128,
        policy_model="large",
        golden_model="xxl",
        sft_steps=4000,
        sft_batch=128,
        sft_lr=3e-5,
        pm_steps=20000,
        pm_batch_golden=16,
        pm_batch_proxy=32,
        pm_lr=1e-4,
        pm_warmup=1000,
        pm_eval_every=1000,
        rl_steps=4000,
        # Every scaling size trains at this batch; the paper used 16 for XL and 8 for XXL.
        rl_batch=32,
        rl_lr=1e-5,
        offline_lrs=(3e-6, 1e-5, 3e-5),
        shuffle_levels=(8, 64, 512),
        semi_online_refresh=(10, 100, 0),
        scaling_models=("large", "xl", "xxl"),
        num_evals=10,
        checkpoint_every=500,
        remat=True,
    ),
}


# Real datasets on the CPU presets: their texts are far longer than the embedded task's (an HH
# dialogue runs to hundreds of tokens), so prompts and responses get longer windows and a larger
# vocabulary, and the step counts shrink to keep the time budget (quick: <= 30 minutes on a
# 2-core CPU). The paper preset keeps its own (1024 / 128 tokens, T5's vocabulary).
REAL_TASK_OVERRIDES = {
    "micro": {"prompt_len": 48, "target_len": 24, "vocab_size": 512},
    "quick": {
        "prompt_len": 48,
        "target_len": 24,
        "vocab_size": 1024,
        "num_valid": 200,
        "num_test": 300,
        "num_eval_prompts": 256,
        "num_kl_prompts": 64,
        "num_acc_pairs": 200,  # the accuracy pairs are valid pairs: at most num_valid
        "sft_steps": 300,
        "pm_steps": 300,
        "pm_eval_every": 50,
        "pm_batch_golden": 16,
        "rl_steps": 100,
        "offline_steps_factor": 3,
    },
    "standard": {"prompt_len": 128, "target_len": 64, "vocab_size": 2048},
    "paper": {},
}


def is_hf_dir(path: str) -> bool:
    """Whether `path` is a Hugging Face T5 directory (it holds config.json)."""
    return (pathlib.Path(path) / "config.json").is_file()


def scaling_tag(model: str) -> str:
    """A policy size's name in its directories (`sft_<tag>/`, `runs_<tag>/`): a preset's
    name, or a Hugging Face directory's folder name."""
    return pathlib.Path(model).resolve().name if is_hf_dir(model) else model


def _check_task(cfg: StudyConfig) -> None:
    """A known task, and a real one with its --data_dir."""
    if cfg.task == "embedded":
        return
    if cfg.task not in preference_data.TASKS:
        raise ValueError(
            f"unknown task {cfg.task!r}: one of embedded, {', '.join(preference_data.TASKS)}"
        )
    if not cfg.data_dir:
        spec = preference_data.TASKS[cfg.task]
        raise ValueError(
            f"task {cfg.task} needs --data_dir, a folder with {' or '.join(spec.patterns)} "
            f"({spec.format}; download from {spec.url})"
        )


def check_inputs(cfg: StudyConfig) -> None:
    """Refuses, naming the flag, a config whose inputs cannot be used: an unknown task, a
    real task without --data_dir, a path that is not there, a scaling model that is neither
    a preset nor a Hugging Face T5 directory. `reproduce` calls it before it records the
    config in the workdir, so a mistyped flag does not bind the workdir to it."""
    _check_task(cfg)
    if cfg.data_dir and not pathlib.Path(cfg.data_dir).is_dir():
        raise ValueError(f"--data_dir={cfg.data_dir}: not a directory")
    if cfg.tokenizer_model and not pathlib.Path(cfg.tokenizer_model).is_file():
        raise ValueError(f"--tokenizer_model={cfg.tokenizer_model}: no such file")
    for flag, path in (
        ("policy_checkpoint", cfg.policy_checkpoint),
        ("golden_checkpoint", cfg.golden_checkpoint),
    ):
        if path and not is_hf_dir(path):
            raise ValueError(
                f"--{flag}={path}: not a Hugging Face T5 directory (no config.json there)"
            )
    tags: dict[str, str] = {}
    for m in cfg.scaling_models:
        is_dir = is_hf_dir(m)
        if m not in MODEL_PRESETS and not is_dir:
            raise ValueError(
                f"--scaling_models: {m!r} is neither a model preset ({', '.join(MODEL_PRESETS)})"
                " nor a Hugging Face T5 directory (no config.json there)"
            )
        if cfg.policy_checkpoint and not is_dir:
            raise ValueError(
                f"--scaling_models: {m!r} is a preset, but the study starts from the pretrained "
                f"policy {cfg.policy_checkpoint}: every size must be a Hugging Face T5 "
                "directory (a randomly initialised size is not comparable)"
            )
        tag = scaling_tag(m)
        if tag in tags:
            raise ValueError(
                f"--scaling_models: {tags[tag]!r} and {m!r} would share the directories "
                f"sft_{tag}/ and runs_{tag}/ (rename one of the checkpoint folders)"
            )
        tags[tag] = m


def study_config(workdir: pathlib.Path) -> StudyConfig:
    """The config a study in `workdir` was started with (`workdir/study_config.json`)."""
    path = workdir / "study_config.json"
    saved = with_new_defaults(json.loads(path.read_text()))
    fields = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise ValueError(f"{path}: unknown StudyConfig fields {unknown}")
    return StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def with_new_defaults(saved: dict) -> dict:
    """A saved study config (JSON) with the fields added to StudyConfig since it was written,
    at their defaults (which keep the behaviour of the code that wrote it), so such a study
    resumes."""
    fields = StudyConfig.__dataclass_fields__
    return {**{k: fields[k].default for k in _ADDED_FIELDS if k not in saved}, **saved}


# StudyConfig fields added after studies were first saved, in order (`with_new_defaults`).
_ADDED_FIELDS = ("compute_dtype", "remat")


def old_defaults() -> str:
    """The fields `with_new_defaults` fills, with their values, in words."""
    fields = StudyConfig.__dataclass_fields__
    return ", ".join(f"{k} {fields[k].default!r}" for k in _ADDED_FIELDS)


def savez_atomic(path: pathlib.Path, **arrays: np.ndarray) -> None:
    """np.savez through a temporary file and a rename: a kill never leaves half a file."""
    jsonl.write_file_atomic(path, lambda f: np.savez(f, **arrays))


def for_task(cfg: StudyConfig, task: str) -> StudyConfig:
    """The preset `cfg` adapted to `task` (`REAL_TASK_OVERRIDES` for real datasets)."""
    if task == "embedded":
        return dataclasses.replace(cfg, task=task)
    return dataclasses.replace(cfg, task=task, **REAL_TASK_OVERRIDES.get(cfg.name, {}))


# ------------------------------------------------------------------------------------------
# Stage bookkeeping.


TRAIN_STATE = "train_state"  # a stage's train states (resume inside it), dropped when done


def stage(directory: pathlib.Path, fn: Callable[[pathlib.Path], dict]) -> dict:
    """Runs fn(directory) unless `directory/done.json` exists; returns the stage summary.

    The stage's train states (`directory/TRAIN_STATE`) are removed only after done.json is
    written, so a kill at any moment leaves either a finished stage or one that resumes.
    """
    done = directory / "done.json"
    if hosts.exists(done):
        summary = json.loads(done.read_text())
        hosts.say(f"[{directory.name}] done already: skipped")
    else:
        directory.mkdir(parents=True, exist_ok=True)
        summary = fn(directory)
        jsonl.write_atomic(done, json.dumps(summary, indent=1, default=float))
    if hosts.exists(directory / TRAIN_STATE):  # also one left by a kill right after done.json
        hosts.remove(directory / TRAIN_STATE)
    return summary


def save_model(directory: pathlib.Path, model, cfg: T5Config) -> None:
    with CheckpointManager(directory / "ckpt") as mngr:
        if 0 not in mngr.all_steps():
            mngr.save(0, model, metadata={"config": cfg.to_dict()}, force=True)


def load_model(directory: pathlib.Path, cfg: T5Config):
    """The model saved by `save_model`, sharded over `sharding.active_mesh()` when there is one.

    The template is abstract (shapes only): no second copy of the model is initialised."""
    like = eqx.filter_eval_shape(t5.init, cfg, key=jax.random.key(0))
    mesh = sharding.active_mesh()
    shardings = None if mesh is None else sharding.model_shardings(like, mesh)
    with CheckpointManager(directory / "ckpt") as mngr:
        saved = mngr.restore_metadata(0).get("config") or {}
        ids = tuple(saved.get("pm_ids", T5Config.pm_ids))  # older configs: the default
        if ids != tuple(cfg.pm_ids):  # a PM reads its score from these rows
            raise ValueError(
                f"{directory}: its model was trained with preference-model ids {ids}, but this "
                f"study's config gives {tuple(cfg.pm_ids)} (a study begun by older code on a "
                "loaded tokenizer): its PM would read untrained logits. Use a new --workdir"
            )
        return mngr.restore(0, like, shardings=shardings)


# ------------------------------------------------------------------------------------------
# Data preparation: task -> tokenizer -> arrays.


@dataclasses.dataclass
class Prepared:
    """The task, its tokenizer and the encoded arrays every stage uses."""

    task: embedded_task.TaskData | preference_data.PreferenceTask
    tokenizer: Tokenizer
    pairs: dict[str, dict[str, np.ndarray]]  # split -> prompt/y_w/y_l (+ masks), human labels
    prompts: dict[str, dict[str, np.ndarray]]  # "rl", "eval" -> prompt, prompt_mask
    truncated: dict[str, int]

    @property
    def prompt_width(self) -> int:
        """The width of every prompt array (<= the config's prompt_len; see `prepare`)."""
        return next(iter(self.prompts.values()))["prompt"].shape[1]


def _trim_prompts(arrays: list[dict[str, np.ndarray]]) -> int:
    """Cuts every prompt array to the longest prompt's width (columns past it are padding).

    The encoder and the PM's packing then do no work on columns that are padding in every row
    of the study; the result is the same up to floating-point reassociation, since masked
    positions contribute nothing. Returns the width.
    """
    width = 1
    for a in arrays:
        m = a["prompt_mask"]
        if (np.diff(m, axis=1) > 0).any():  # a 0 before a 1: not right-padded
            raise ValueError("prompt masks must be right-padded (ones, then zeros)")
        width = max(width, int(m.sum(1).max(initial=0)))
    for a in arrays:
        a["prompt"], a["prompt_mask"] = a["prompt"][:, :width], a["prompt_mask"][:, :width]
    return width


def encode_pairs(tok: Tokenizer, rows: list[dict], S: int, T: int, counts: dict, split: str):
    x = tok.encode([r["prompt"] for r in rows], S, truncate="left")
    w = tok.encode([r["chosen"] for r in rows], T)
    lo = tok.encode([r["rejected"] for r in rows], T)
    counts[split] = x.num_truncated + w.num_truncated + lo.num_truncated
    return {
        "prompt": x.ids,
        "prompt_mask": x.mask,
        "y_w": w.ids,
        "y_w_mask": w.mask,
        "y_l": lo.ids,
        "y_l_mask": lo.mask,
    }


def load_task(workdir: pathlib.Path, cfg: StudyConfig):
    """The study's task: the embedded one, or a real dataset (`preference_data`), cached as
    `workdir/task.json`. A real dataset's files that no longer give the cached split (a file
    added, removed or edited) are refused (`preference_data.TaskChangedError`), not re-split
    under the stages already trained on the old split."""
    sizes = {
        "num_train": cfg.num_train,
        "num_valid": cfg.num_valid,
        "num_test": cfg.num_test,
        "num_rl_prompts": cfg.num_rl_prompts,
        "num_eval_prompts": cfg.num_eval_prompts,
    }
    if cfg.task == "embedded":
        return embedded_task.load_or_make(workdir / "task.json", cfg.seed, **sizes)
    _check_task(cfg)
    return preference_data.load_or_make_task(
        workdir / "task.json",
        cfg.task,
        cfg.data_dir,
        seed=cfg.seed,
        skip_bad_records=cfg.skip_bad_records,
        refuse_changes=True,  # finished stages were trained on the cached split
        **sizes,
    )


def prepare(workdir: pathlib.Path, cfg: StudyConfig) -> Prepared:
    """The task (cached as task.json) and its tokenizer: the SentencePiece model given by
    `cfg.tokenizer_model`, or one trained on the task's text (`workdir/tokenizer.model`).

    Prompts are truncated on the left (a dialogue's last turn and "TL;DR:" matter most),
    responses on the right; `Prepared.truncated` counts truncated rows per split. Prompt
    arrays are then cut to the longest prompt of the study (`Prepared.prompt_width` <=
    cfg.prompt_len): the embedded task's prompts take at most 12 of 16 tokens, and the encoder
    and every PM would otherwise spend a quarter of their work on columns of padding.
    """
    task = load_task(workdir, cfg)
    tok_path = workdir / "tokenizer.model"
    if cfg.tokenizer_model:
        tok = Tokenizer.load(cfg.tokenizer_model)
    elif hosts.exists(tok_path):
        tok = Tokenizer.load(tok_path)
    else:
        # Trained once (process 0 of a multi-host job); every process loads the saved file,
        # so all of them hold the same bytes.
        trained = (
            Tokenizer.train(task.corpus(), vocab_size=cfg.vocab_size) if hosts.is_writer() else None
        )
        jsonl.write_file_atomic(tok_path, lambda f: f.write(trained.proto))
        tok = Tokenizer.load(tok_path)
    S, T = cfg.prompt_len, cfg.target_len
    counts: dict[str, int] = {}
    pairs = {s: encode_pairs(tok, rows, S, T, counts, s) for s, rows in task.pairs.items()}
    prompts = {}
    for split, texts in task.prompts.items():
        e = tok.encode(texts, S, truncate="left")
        counts[split] = e.num_truncated
        prompts[split] = {"prompt": e.ids, "prompt_mask": e.mask}
    _trim_prompts([*pairs.values(), *prompts.values()])
    return Prepared(task, tok, pairs, prompts, counts)


def pm_rows(pairs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The PM trainer's field names (x, y_w, y_l) for a pair dict (prompt, y_w, y_l)."""
    return {
        "x": pairs["prompt"],
        "x_mask": pairs["prompt_mask"],
        "y_w": pairs["y_w"],
        "y_w_mask": pairs["y_w_mask"],
        "y_l": pairs["y_l"],
        "y_l_mask": pairs["y_l_mask"],
    }


def sft_rows(pairs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All responses pooled (both sides of every pair) as SFT targets."""
    cat = np.concatenate
    return {
        "src": cat([pairs["prompt"]] * 2),
        "src_mask": cat([pairs["prompt_mask"]] * 2),
        "tgt": cat([pairs["y_w"], pairs["y_l"]]),
        "tgt_mask": cat([pairs["y_w_mask"], pairs["y_l_mask"]]),
    }


def relabel(pairs: dict[str, np.ndarray], judged: np.ndarray) -> dict[str, np.ndarray]:
    """Pairs re-ordered so y_w is the judge's winner (judged = P(current y_w wins))."""
    swap = judged < 0.5
    out = dict(pairs)
    for a, b in (("y_w", "y_l"), ("y_w_mask", "y_l_mask")):
        out[a] = np.where(swap[:, None], pairs[b], pairs[a])
        out[b] = np.where(swap[:, None], pairs[a], pairs[b])
    return out
