"""The study's stages and experiments over `ipo_gap.study`'s pipeline (NOTES.md, Fig. 1-13).

`Study(workdir, cfg)` exposes each stage as a method that loads the stage when it is done and
runs it otherwise: `sft`, `golden_pm`, `d_golden`, `proxy_pm`, `baseline`, `evaluator`, and
`run_all()` for the experiments. Every experiment is one policy run from the SFT start with
the SFT policy as reference, evaluated (`ipo_gap.eval`) at `cfg.num_evals` evenly spaced
checkpoints; its summary (`runs/<name>/done.json`) holds the evaluations and per-step losses.

Keys: the root key jax.random.key(seed) is folded with a fixed number per purpose
(`PURPOSES`), so every stage's JAX randomness (initialisations, samples) is its own stream,
whatever the run order. (Before 2026-12-06 the evaluator's key was jax.random.key(seed + 6),
the root key of study seed + 6, whose golden PM it shared a key with: its self-classification
samples drew the bits that initialised that PM.)

Data orders are separated by purpose the same way. Every stage that reads rows in seeded epoch
order (`sources.epoch_permutation`) gets the seed `data_seed(seed, purpose)`, a 31-bit hash of
(seed, the purpose's number): SFT, the golden PM, the proxy PM, the golden baseline's and the
online runs' prompt schedules, the offline runs (every offline run, HyPO's pairs included,
reads its dataset in one order, so they differ in their settings only) and the shuffled
replays' windows. Runs of one purpose share an order on purpose: online IPO, Bo2 and the
semi-online runs draw the same prompts at each step, and a size's runs read the order of every
other size's. Before ccf5c32 (2026-12-06) all of them read in order `epoch_permutation(seed,
...)`: the golden PM (human labels), the proxy PM and offline IPO on D_golden (golden labels)
read the same train pairs in the same batches when their batch sizes agreed (the standard
preset's 32).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pathlib

import jax
import numpy as np

from ipo_gap import checkpoint, hosts, jsonl, sharding
from ipo_gap import eval as evaluation
from ipo_gap.configs import T5Config
from ipo_gap.data import embedded_task, ref_cache, sources
from ipo_gap.data.order_log import OrderLog, pair_schema
from ipo_gap.study import (
    TRAIN_STATE,
    StudyConfig,
    is_hf_dir,
    load_model,
    pm_rows,
    prepare,
    relabel,
    save_model,
    savez_atomic,
    scaling_tag,
    sft_rows,
    stage,
    with_new_defaults,
)
from ipo_gap.train import loop, steps, trainers
from ipo_gap.train_state_io import CheckpointManager

# What a policy run's train states record of its settings, and a resume must match.
_RUN_SETTINGS = ("run", "loss", "lr", "beta", "hypo", "hypo_lam")


def _check_log_meta(log: OrderLog, want: dict) -> None:
    """Refuses to resume a run on an order log that another run wrote: one whose meta.json
    names another tokenizer, run, loss, learning rate, beta, policy config or study config
    than this run's (`want`; its step count is not compared: a run may be extended). Keys a
    log of older code lacks are not compared; the study and model configs are completed with
    the fields added since, at their defaults (`with_new_defaults`)."""
    got = dict(log.meta)
    if isinstance(got.get("study"), dict):
        got["study"] = with_new_defaults(got["study"])
    want = json.loads(json.dumps(want))
    # T5Config fields added since, or left out of `to_dict` at their defaults (pm_ids): both
    # sides complete at the defaults.
    fields = [f for f in dataclasses.fields(T5Config) if f.default is not dataclasses.MISSING]
    defaults = json.loads(json.dumps({f.name: f.default for f in fields}))
    for side in (got, want):
        if isinstance(side.get("model"), dict):
            side["model"] = {**defaults, **side["model"]}
    keys = (want.keys() & got.keys()) - {"num_steps"}
    diffs = loop.differences(got, want, keys, words=("in the log", "in this run"))
    if diffs:
        raise ValueError(
            f"{log.directory}/meta.json: the order log was written by another run "
            f"({'; '.join(diffs)}): resuming would append this run's batches to it. Use a "
            f"new --workdir; deleting the run directory {os.path.dirname(log.directory)} "
            "restarts this run only, and the finished stages that read its stream or its "
            "policy (replays, Fig. 5's datasets, other runs' stream accuracies) would stay "
            "those of the old run"
        )


def _resume_point(
    d: pathlib.Path, every: int, name: str, meta: dict, log: bool = False
) -> int | None:
    """Prepares a run directory: the step to resume at (its latest train state), or None.

    Without a train state the directory is emptied (a killed attempt restarts the run). With
    one, a resume under other run settings (`meta`'s `_RUN_SETTINGS`: `loop.check_resume_meta`)
    or on an order log another run wrote (`_check_log_meta`) is refused first, with the
    directory unchanged; then the evaluations after its step and the snapshots taken after
    it are dropped (the loop cuts the metrics back itself); the train state and the
    data-order log are kept (the loop re-checks logged steps it regenerates).
    """
    latest = None
    if every and hosts.exists(d / TRAIN_STATE):
        with CheckpointManager(d / TRAIN_STATE) as mngr:
            latest = mngr.latest_step()
            if latest is not None:
                now = {k: meta[k] for k in _RUN_SETTINGS}
                loop.check_resume_meta(name, mngr, latest, mngr.restore_metadata(latest), now)
    if latest is None:
        for child in hosts.listed(d.iterdir()):
            hosts.remove(child)
        return None
    if log and hosts.exists(d / "log"):
        _check_log_meta(OrderLog.open(d / "log"), meta)
    # The loop cuts metrics.jsonl back to `latest` (`loop.metrics_before`). A kill during an
    # append cuts at most the last line; its step is after `latest`.
    evals = jsonl.read_rows(d / "evals.jsonl", cut_tail_ok=True)
    jsonl.write_rows(d / "evals.jsonl", [e for e in evals if e["step"] <= latest])
    for snap in hosts.listed(d.glob("step_*")):
        if int(snap.name.split("_")[1]) > latest:
            hosts.remove(snap)
    hosts.say(f"[{name}] resuming from its train state at step {latest}")
    return latest


STREAM_PAIRS = 64  # Fig. 6: online-stream pairs near each checkpoint (as in the paper)

PURPOSES = {
    "sft": 1,
    "golden_pm": 2,
    "proxy_pm": 3,
    "baseline": 4,
    "online": 5,
    "eval": 6,
    "baseline_samples": 7,
    "datasets": 8,
    "hypo": 9,
    "init": 10,
    "offline": 11,
    "shuffle": 12,
}


def purpose_key(seed: int, purpose: str) -> jax.Array:
    """The key of one purpose of study `seed` (`PURPOSES`): the root key folded with it."""
    return jax.random.fold_in(jax.random.key(seed), PURPOSES[purpose])


def data_seed(seed: int, purpose: str) -> int:
    """The seed of one purpose's data order in study `seed` (`PURPOSES`; see the module's
    docstring): 31 bits of numpy's SeedSequence([seed, the purpose's number]), so it is a
    valid seed of numpy and of `jax.random.key` alike."""
    return int(np.random.SeedSequence([seed, PURPOSES[purpose]]).generate_state(1)[0] >> 1)


class Study:
    def __init__(self, workdir: str | pathlib.Path, cfg: StudyConfig):
        self.workdir, self.cfg = pathlib.Path(workdir), cfg
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prep = prepare(self.workdir, cfg)
        self.tag = ""
        self._variant_checkpoint = None
        self.sft_lr = cfg.sft_lr  # a variant of another width scales it (see `variant`)
        vocab = self.prep.tokenizer.vocab_size
        self.policy_cfg = self._model_cfg("policy", vocab)
        self.proxy_cfg = self.policy_cfg  # the proxy PM is policy-sized (of the main policy)
        self.golden_cfg = self._model_cfg("golden", vocab)
        self._cache: dict = {}
        # Entered by `study_experiments.run_all` (`sharding.use_mesh`); methods called
        # directly run unsharded unless the caller enters `sharding.use_mesh(study.mesh)`.
        self.mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh else None

    def _checkpoint(self, which: str) -> str | None:
        if which == "golden":
            return self.cfg.golden_checkpoint
        return self._variant_checkpoint or self.cfg.policy_checkpoint

    def _model_cfg(self, which: str, vocab: int):
        """The preset's config, or the pretrained checkpoint's (its vocabulary must cover the
        tokenizer's ids)."""
        path = self._checkpoint(which)
        if not path:
            model_cfg = self.cfg.model(which, self._init_rows(vocab))
        else:
            model_cfg = checkpoint.hf_t5_config(
                path, compute_dtype=self.cfg.compute_dtype, remat=self.cfg.remat
            )
            if model_cfg.vocab_size < vocab:
                raise ValueError(
                    f"{which} checkpoint {path} has {model_cfg.vocab_size} embeddings but the "
                    f"tokenizer ({self.cfg.tokenizer_model or 'trained on the task'}) has "
                    f"{vocab} pieces: use the checkpoint's own SentencePiece model "
                    "(--tokenizer_model)"
                )
        # Markers no text encodes to, for the PMs (the proxy's config is the policy's).
        return model_cfg.replace(pm_ids=self.prep.tokenizer.pm_ids_for(model_cfg.vocab_size))

    def _init_rows(self, vocab: int) -> int:
        """The embedding rows of a randomly initialised model: the tokenizer's pieces, plus
        two rows for the PMs' markers when the tokenizer does not reserve ids 3 and 4 (a
        loaded one, such as T5's `spiece.model`), as T5's checkpoints have spare rows."""
        return vocab + (0 if self.prep.tokenizer.reserves_pm_markers else 2)

    def init_model(self, which: str, purpose: str):
        """A starting model: the pretrained checkpoint when one is given (policy and proxy PM
        from `policy_checkpoint`, golden PM from `golden_checkpoint`), else a random init of
        the preset with the purpose's key. Sharded over `sharding.active_mesh()` if any: a
        checkpoint goes to the mesh tensor by tensor, a random init is drawn shard by shard
        (`sharding.init_model`: the same values as on one device); no device holds a whole
        model."""
        path = self._checkpoint(which)
        cfg = self.golden_cfg if which == "golden" else self.policy_cfg
        if path:
            return checkpoint.load_hf_t5(
                path,
                mesh=sharding.active_mesh(),
                compute_dtype=self.cfg.compute_dtype,
                remat=self.cfg.remat,
                pm_ids=cfg.pm_ids,
            )[1]
        return sharding.init_model(cfg, key=self.key(purpose))

    def variant(self, policy_model: str) -> Study:
        """The same study with a policy of another size (Fig. 10-11): its own SFT, SFT
        evaluation and runs (`sft_<model>/`, `runs_<model>/`); task, golden PM, D_golden,
        proxy PM and golden baseline are this study's (run or loaded by it when first used).

        `policy_model` is a preset name, or a Hugging Face T5 directory (a pretrained start);
        a study that starts from a pretrained policy takes only directories here, since a
        randomly initialised size would not be comparable.
        """
        is_dir = is_hf_dir(policy_model)
        if self.cfg.policy_checkpoint and not is_dir:
            raise ValueError(
                f"scaling model {policy_model!r}: the study starts from the pretrained "
                f"policy {self.cfg.policy_checkpoint}, so every scaling size must be a "
                f"Hugging Face T5 directory too, not a preset"
            )
        other = copy.copy(self)
        vocab = self.prep.tokenizer.vocab_size
        if is_dir:
            other._variant_checkpoint = policy_model
            other.policy_cfg = other._model_cfg("policy", vocab)
        else:
            other.policy_cfg = self.cfg.preset_model(policy_model, self._init_rows(vocab))
        other.tag = f"_{scaling_tag(policy_model)}"
        other._cache = {}
        # A randomly initialised size: Adam's step size per weight is about the learning
        # rate, so wider models need a smaller one (1/width, as muP prescribes for hidden
        # weights). Measured on the quick preset: toy-m (d_model 128) at toy-s's 3e-3 stays
        # at the unigram loss (3.55 after 300 steps); at 1.5e-3 it reaches 3.21, at 1e-3
        # 3.12. A pretrained size fine-tunes at the study's rate, as the paper's sizes do.
        scale = 1.0 if is_dir else self.policy_cfg.d_model / other.policy_cfg.d_model
        other.sft_lr = self.cfg.sft_lr * scale
        for shared in ("golden_pm", "d_golden", "proxy_pm", "baseline"):  # this study's, lazily
            setattr(other, shared, getattr(self, shared))
        return other

    @property
    def runs_dir(self) -> pathlib.Path:
        return self.workdir / f"runs{self.tag}"

    def key(self, purpose: str) -> jax.Array:
        return purpose_key(self.cfg.seed, purpose)

    def data_seed(self, purpose: str) -> int:
        return data_seed(self.cfg.seed, purpose)

    def _memo(self, name, fn):
        if name not in self._cache:
            self._cache[name] = fn()
        return self._cache[name]

    # ---- the pipeline (Fig. 2) -----------------------------------------------------------

    def sft(self):
        def fn(d):
            model = self.init_model("policy", "sft")
            model, hist = trainers.train_sft(
                model,
                sft_rows(self.prep.pairs["train"]),
                num_steps=self.cfg.sft_steps,
                batch_size=self.cfg.sft_batch,
                learning_rate=self.sft_lr,
                seed=self.data_seed("sft"),
                name="sft",
                metrics_path=d / "metrics.jsonl",
                checkpoint_dir=d / TRAIN_STATE,
                checkpoint_every=self.cfg.checkpoint_every,
            )
            save_model(d, model, self.policy_cfg)
            return {
                "final_loss": float(np.mean(hist[-20:])),
                "steps": len(hist),
                "learning_rate": self.sft_lr,
                "data_seed": self.data_seed("sft"),
            }

        return self._memo(
            "sft",
            lambda: (
                stage(self.workdir / f"sft{self.tag}", fn),
                load_model(self.workdir / f"sft{self.tag}", self.policy_cfg),
            )[1],
        )

    def _train_pm(self, name, cfg_model, train, valid, batch, lr, measure=None):
        """The PM stage `name`; `measure(model) -> dict` adds fields to its summary (done.json)."""

        def fn(d):
            init = self.init_model("golden" if name == "golden_pm" else "policy", name)
            res = trainers.train_pm(
                init,
                pm_rows(train),
                pm_rows(valid),
                num_steps=self.cfg.pm_steps,
                batch_size=batch,
                learning_rate=lr,
                seed=self.data_seed(name),
                warmup_steps=self.cfg.pm_warmup,
                eval_every=self.cfg.pm_eval_every,
                patience=self.cfg.pm_patience,
                name=name,
                metrics_path=d / "metrics.jsonl",
                kind="pairwise-both",
                checkpoint_dir=d / TRAIN_STATE,
                checkpoint_every=self.cfg.checkpoint_every,
            )
            save_model(d, res.model, cfg_model)
            return {
                "best_step": res.best_step,
                "valid_accuracy": res.best_valid_accuracy,
                "stopped_early": res.stopped_early,
                "learning_rate": lr,
                "data_seed": self.data_seed(name),
                "model": cfg_model.name,
                "params": cfg_model.num_params(),
                **(measure(res.model) if measure else {}),
            }

        summary = stage(self.workdir / name, fn)
        return summary, load_model(self.workdir / name, cfg_model)

    def golden_pm(self):
        """The golden PM on the human labels; its accuracy against the hidden humans."""

        def test_accuracy(pm) -> dict:
            judged = self._golden_relabelled("test", pm)["agree_human"]
            out = {"test_accuracy_vs_human_labels": float(judged.mean()), "test_pairs": len(judged)}
            rows = self.prep.task.pairs["test"]
            if rows and "p_human" in rows[0]:  # the embedded task knows its hidden humans
                out["test_accuracy_vs_hidden_reward"] = embedded_task.accuracy_vs_hidden_reward(
                    np.array([r["p_human"] for r in rows]), judged
                )
                out["bayes_accuracy_vs_human_labels"] = float(
                    np.mean([max(r["p_human"], 1 - r["p_human"]) for r in rows])
                )
            return out

        def build():
            p = self.prep.pairs
            # The test accuracies are measured once, in the stage, and kept in its done.json:
            # every process that needs the golden PM (each worker's runs judge with it) then
            # loads them instead of judging the test split again (~1 s per process at quick).
            summary, pm = self._train_pm(
                "golden_pm",
                self.golden_cfg,
                p["train"],
                p["valid"],
                self.cfg.pm_batch_golden,
                self.cfg.pm_lr if self.cfg.pm_lr_golden is None else self.cfg.pm_lr_golden,
                measure=test_accuracy,
            )
            if "test_accuracy_vs_human_labels" not in summary:  # a study of older code
                summary = dict(summary, **test_accuracy(pm))
            return summary, pm

        return self._memo("golden_pm", build)

    def d_golden(self) -> dict[str, dict[str, np.ndarray]]:
        """Train and valid splits relabelled by the golden PM."""

        def build():
            _, pm = self.golden_pm()
            return {split: self._golden_relabelled(split, pm) for split in ("train", "valid")}

        return self._memo("d_golden", build)

    def _golden_relabelled(self, split: str, pm) -> dict[str, np.ndarray]:
        """The `split` pairs relabelled by the golden PM `pm`, with its judgement of the
        human-ordered pair (`agree_human`: P(the human winner wins)). Judged once and kept in
        d_golden_<split>.npz: the test split's judgement serves both the golden PM's and the
        proxy PM's test accuracy."""
        path = self.workdir / f"d_golden_{split}.npz"
        if not hosts.exists(path):
            pairs = self.prep.pairs[split]
            judged = trainers.judge_rows(pm, *pm_rows(pairs).values())
            savez_atomic(path, **relabel(pairs, judged), agree_human=judged)
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    def proxy_pm(self):
        """The proxy PM on D_golden. Its accuracy against the golden labels is measured on the
        held-out test split (relabelled by the golden PM): the valid split chose its
        checkpoint, so its best valid accuracy is an optimistic estimate."""

        def test_accuracy(pm) -> dict:
            test = self._golden_relabelled("test", self.golden_pm()[1])
            test.pop("agree_human")
            judged = trainers.judge_rows(pm, *pm_rows(test).values())
            return {
                "test_accuracy_vs_golden_labels": float(judged.mean()),
                "test_pairs": len(judged),
            }

        def build():
            d = self.d_golden()
            strip = lambda p: {k: v for k, v in p.items() if k != "agree_human"}  # noqa: E731
            summary, pm = self._train_pm(
                "proxy_pm",
                self.proxy_cfg,
                strip(d["train"]),
                strip(d["valid"]),
                self.cfg.pm_batch_proxy,
                self.cfg.pm_lr,
                measure=test_accuracy,
            )
            if "test_accuracy_vs_golden_labels" not in summary:  # a study of older code
                summary = dict(summary, **test_accuracy(pm))
            return summary, pm

        return self._memo("proxy_pm", build)

    def online_source(self, pm, purpose="online"):
        rl = self.prep.prompts["rl"]
        return sources.OnlineSource(
            rl["prompt"],
            rl["prompt_mask"],
            pm,
            batch_size=self.cfg.rl_batch,
            seed=self.data_seed(purpose),
            key=self.key(purpose),
            max_len=self.cfg.target_len,
        )

    def baseline(self):
        """The golden policy baseline (online IPO against the golden PM) and its eval samples."""

        def fn(d):
            sft = self.sft()
            _, golden = self.golden_pm()
            every = self.cfg.checkpoint_every
            # A killed job resumes it (its batches are a function of seed, step and
            # parameters; the loop records its loss and hyper-parameters).
            ckpt = {"checkpoint_dir": d / TRAIN_STATE, "checkpoint_every": every} if every else {}
            source = self.online_source(golden, "baseline")
            model, _, _ = loop.train_policy(
                model=sources.copy_arrays(sft),
                ref_model=sft,
                source=source,
                num_steps=self.cfg.rl_steps,
                hparams=steps.Hparams.make(self.cfg.rl_lr, self.cfg.rl_beta),
                loss="ipo",
                metrics_path=d / "metrics.jsonl",
                name="golden-baseline",
                checkpoint_keep=2,
                **ckpt,
            )
            save_model(d, model, self.policy_cfg)
            ev = self.prep.prompts["eval"]
            y, ym = evaluation.sample_rows(
                model,
                ev["prompt"],
                ev["prompt_mask"],
                key=self.key("baseline_samples"),
                max_len=self.cfg.target_len,
            )
            savez_atomic(d / "samples.npz", y=y, y_mask=ym)
            hist = jsonl.read_rows(d / "metrics.jsonl")  # every step, also across a resume
            return {
                "final_loss": hist[-1]["loss"],
                "steps": len(hist),
                "data": sources.source_identity(source),
            }

        def build():
            stage(self.workdir / "baseline", fn)
            with np.load(self.workdir / "baseline" / "samples.npz") as z:
                return z["y"], z["y_mask"]

        return self._memo("baseline", build)

    def evaluator(self) -> evaluation.Evaluator:
        def build():
            y, ym = self.baseline()
            ev, rl = self.prep.prompts["eval"], self.prep.prompts["rl"]
            n_kl, n_acc = self.cfg.num_kl_prompts, self.cfg.num_acc_pairs
            d_golden = self.d_golden()
            pairs = {k: v[:n_acc] for k, v in d_golden["valid"].items()}  # held out
            # As many of D_golden's own training pairs, the set the paper's Fig. 8 reads: the
            # first ones the offline runs on D_golden read (`train_pairs_order`), so every
            # checkpoint after their first few steps has trained on all of them.
            first = self.train_pairs_order()[:n_acc]
            train_pairs = {k: v[first] for k, v in d_golden["train"].items()}
            return evaluation.Evaluator(
                ref=self.sft(),
                golden_pm=self.golden_pm()[1],
                eval_x=ev["prompt"],
                eval_xm=ev["prompt_mask"],
                base_y=y,
                base_ym=ym,
                kl_x=rl["prompt"][:n_kl],
                kl_xm=rl["prompt_mask"][:n_kl],
                pairs=pairs,
                train_pairs=train_pairs,
                max_len=self.cfg.target_len,
                key=self.key("eval"),
                batch_size=self.cfg.eval_batch,
                hidden=self.hidden_judge(),
            )

        return self._memo("evaluator", build)

    def hidden_judge(self) -> embedded_task.HiddenJudge | None:
        """The embedded task's hidden humans judging the win-rate samples against the golden
        baseline's on the evaluation prompts (None on a real dataset: no hidden humans),
        built once: it decodes and scores the baseline's samples."""
        task = self.prep.task
        if not isinstance(task, embedded_task.TaskData):
            return None

        def build():
            base_y, _ = self.baseline()
            decode = self.prep.tokenizer.decode
            return embedded_task.HiddenJudge.against(task, task.prompts["eval"], base_y, decode)

        return self._memo("hidden_judge", build)

    def train_pairs_order(self) -> np.ndarray:
        """The order in which every offline run on D_golden reads its training pairs in the
        first epoch (`study_experiments._offline`'s source: the "offline" data seed)."""
        n = len(self.d_golden()["train"]["prompt"])
        return sources.epoch_permutation(self.data_seed("offline"), 0, n)

    def proxy_evaluator(self) -> evaluation.Evaluator:
        """`evaluator` that also judges the win-rate samples with the proxy PM (the online runs'
        judge): "proxy_win_rate" beside the golden "win_rate" shows over-optimisation."""
        return self._memo(
            "proxy_evaluator",
            lambda: dataclasses.replace(
                self.evaluator(), other_judges={"proxy": self.proxy_pm()[1]}
            ),
        )

    def sft_eval(self) -> dict:
        def fn(d):
            return dict(self.evaluator()(self.sft()), step=0)

        return self._memo("sft_eval", lambda: stage(self.workdir / f"eval_sft{self.tag}", fn))

    # ---- the online stream (Fig. 6) -------------------------------------------------------

    def stream_pairs(self, k: int, log: OrderLog | None = None) -> dict[str, np.ndarray] | None:
        """Fig. 6's pairs near the k-th evaluation: the last `STREAM_PAIRS` pairs of this
        study's online IPO stream before that run's k-th evaluation step, relabelled by the
        golden PM (y_w = golden winner), with "proxy_accuracy" = how often the proxy PM's
        logged order agrees with the golden PM. `log`: the online run's log while it is
        being written; otherwise the finished run's log is read (None before it exists).
        Every run's k-th checkpoint (runs share `num_evals`) is measured on window k.
        """
        name = f"stream_{k}"
        if name in self._cache:
            return self._cache[name]
        if log is None:
            online = self.runs_dir / "online_ipo"
            if not hosts.exists(online / "done.json"):
                return None
            log = OrderLog.open(online / "log")
            log.check_tokenizer(self.prep.tokenizer.sha256)
        t = self.eval_steps(self.cfg.rl_steps)[k]
        w = -(-STREAM_PAIRS // self.cfg.rl_batch)
        batches = [b for _, b in log.iter_steps(max(0, t - w), t)]
        pairs = {
            f: np.concatenate([b[f] for b in batches])[-STREAM_PAIRS:] for f in sources.PAIR_FIELDS
        }
        _, golden = self.golden_pm()
        judged = trainers.judge_rows(
            golden, *pm_rows(pairs).values(), batch_size=self.cfg.eval_batch
        )
        out = dict(relabel(pairs, judged))
        out["proxy_accuracy"] = float(judged.mean())
        self._cache[name] = out
        return out

    def stream_metrics(self, k: int, model, log: OrderLog | None = None) -> dict:
        """Accuracy of `model` as a classifier on `stream_pairs(k)` (Fig. 6), and the proxy
        PM's on the same pairs; {} when the stream does not exist yet."""
        pairs = self.stream_pairs(k, log)
        if pairs is None:
            return {}
        rows = {f: pairs[f] for f in sources.PAIR_FIELDS}
        ref_name = f"stream_ref_{k}"  # every run's k-th checkpoint is measured on window k
        if ref_name not in self._cache:
            self._cache[ref_name] = ref_cache.compute_reference_logprobs(
                self.sft(), rows, batch_size=self.cfg.eval_batch
            )
        acc, _ = evaluation.pair_metrics(
            model,
            self.sft(),
            rows,
            batch_size=self.cfg.eval_batch,
            ref_logps=self._cache[ref_name],
        )
        return {
            "stream_accuracy": acc,
            "stream_proxy_accuracy": pairs["proxy_accuracy"],
            # The online step that ends window k: a run longer than the online one (the offline
            # sweep) has its k-th checkpoint at a later step of its own, on this same window.
            "stream_step": self.eval_steps(self.cfg.rl_steps)[k],
        }

    # ---- experiments ---------------------------------------------------------------------

    def _checkpoint_every(self, source) -> int:
        """Steps between a policy run's train-state checkpoints (0: none; a killed run then
        restarts). A semi-online source is checkpointed only at its refresh boundaries (the
        batch after a resume comes from the snapshot taken there); one never refreshed gets
        its step-0 snapshot, the SFT policy, up front."""
        every = self.cfg.checkpoint_every
        if every and isinstance(source, sources.SemiOnlineSource):
            if source.refresh_every is None:
                source.restore(self.sft(), 0)
            else:
                every = math.lcm(every, source.refresh_every)
        return every

    def eval_steps(self, num_steps: int) -> list[int]:
        n = self.cfg.num_evals
        return sorted({max(1, round(num_steps * i / n)) for i in range(1, n + 1)})

    def policy_run(
        self,
        name: str,
        *,
        method: str,
        source_fn,
        loss: str = "ipo",
        lr: float | None = None,
        beta: float | None = None,
        num_steps=None,
        log: bool = False,
        hypo: bool = False,
        save_at=(),
        extra=None,
        proxy_judged: bool = False,
    ) -> dict:
        """One evaluated policy run from the SFT start (a resumable stage `runs/<name>`)."""
        lr = self.cfg.rl_lr if lr is None else lr
        beta = self.cfg.rl_beta if beta is None else beta
        num_steps = num_steps or self.cfg.rl_steps

        def fn(d):
            source = source_fn()
            every = self._checkpoint_every(source)
            log_meta = {
                "tokenizer_sha256": self.prep.tokenizer.sha256,
                "run": name,
                "loss": loss,
                "lr": lr,
                "beta": beta,
                "num_steps": num_steps,
                "hypo": hypo,
                "hypo_lam": self.cfg.hypo_lam,
                "model": self.policy_cfg.to_dict(),
                "study": self.cfg.to_dict(),
            }
            resume_at = _resume_point(d, every, name, log_meta, log)
            sft = self.sft()
            evaluate = self.proxy_evaluator() if proxy_judged else self.evaluator()
            at = set(self.eval_steps(num_steps))
            evals = [self.sft_eval()] + jsonl.read_rows(d / "evals.jsonl")

            def on_step(step, model, metrics):
                if (step + 1 in at or step + 1 in save_at) and not np.isfinite(
                    float(metrics["loss"])
                ):  # the loop checks a step's loss one step later: neither evaluate nor keep it
                    raise loop.NonFiniteLossError(
                        f"[{name}] loss is {float(metrics['loss'])} at step {step}; stopped "
                        "before evaluating or saving that step's policy",
                        step=step,
                    )
                if step + 1 in at:
                    e = dict(evaluate(model), step=step + 1)
                    k = sorted(at).index(step + 1)
                    e.update(
                        self.stream_metrics(k, model, order_log if name == "online_ipo" else None)
                    )
                    evals.append(e)
                    jsonl.append_row(d / "evals.jsonl", e)
                if step + 1 in save_at:
                    save_model(d / f"step_{step + 1}", model, self.policy_cfg)

            order_log = None
            if log and resume_at is not None and hosts.exists(d / "log"):
                order_log = OrderLog.open(d / "log")  # may be ahead: the loop re-checks it
            elif log:
                if hosts.is_writer():  # process 0 creates it, the others open it after the barrier
                    order_log = OrderLog.create(
                        d / "log",
                        schema=pair_schema(self.prep.prompt_width, self.cfg.target_len),
                        batch_size=self.cfg.rl_batch,
                        overwrite=True,
                        meta=log_meta,
                    )
                hosts.sync(f"create {d / 'log'}")
                if order_log is None:  # (an empty log is falsy: test for None)
                    order_log = OrderLog.open(d / "log")
            common = {
                "model": sources.copy_arrays(sft),
                "ref_model": sft,
                "source": source,
                "num_steps": num_steps,
                "metrics_path": d / "metrics.jsonl",
                "name": name,
                "on_step": on_step,
            }
            if every:
                # Only the newest two states: one survives a kill during the other's save.
                common.update(
                    checkpoint_dir=d / TRAIN_STATE,
                    checkpoint_every=every,
                    checkpoint_keep=2,
                    # a resume under other settings is refused (`loop.check_resume_meta`)
                    checkpoint_meta={k: log_meta[k] for k in _RUN_SETTINGS},
                )
            hp = steps.Hparams.make(lr, beta, lam=self.cfg.hypo_lam)
            if hypo:
                model, _, _ = loop.train_hypo(hparams=hp, **common)
            else:
                model, _, _ = loop.train_policy(
                    hparams=hp, loss=loss, order_log=order_log, **common
                )
            save_model(d, model, self.policy_cfg)
            hist = jsonl.read_rows(d / "metrics.jsonl")  # every step, also across a resume
            if [h["step"] for h in hist] != list(range(num_steps)):
                raise RuntimeError(f"[{name}] {d / 'metrics.jsonl'} does not hold every step")
            if [e["step"] for e in evals] != [0, *sorted(at)]:
                raise RuntimeError(
                    f"[{name}] {d / 'evals.jsonl'} holds the evaluations of steps "
                    f"{[e['step'] for e in evals[1:]]}, not of {sorted(at)}"
                )
            out = {
                "name": name,
                "method": method,
                "loss": loss,
                "lr": lr,
                "beta": beta,
                "steps": num_steps,
                "evals": evals,
                "losses": [h["loss"] for h in hist],
                "data": sources.source_identity(source),  # its stream: kind, seed, data hash
            }
            return dict(out, **(extra(model, hist) if extra else {}))

        return stage(self.runs_dir / name, fn)
