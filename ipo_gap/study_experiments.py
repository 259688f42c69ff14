"""The study's experiments, one function per figure group of the paper (NOTES.md).

Each function runs (or loads, when done) its policy runs through `Study.policy_run` and returns
their summaries: dicts with "name", "method", "evals" (list of evaluation dicts by step) and
"losses". `run_all` runs every group in the order the report uses them.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from ipo_gap import eval as evaluation
from ipo_gap import sharding
from ipo_gap.data import ref_cache, sources
from ipo_gap.data.order_log import OrderLog
from ipo_gap.determinism import tree_max_abs_diff
from ipo_gap.study import load_model, relabel, stage
from ipo_gap.study_runs import Study
from ipo_gap.train import trainers


def _offline(study: Study, data: dict, name: str) -> callable:
    """An offline source over `data` whose rows carry the SFT reference's log-probs.

    The reference log-probs are computed once per dataset and policy size and cached beside
    the study (`ref_cache<tag>/<name>.npz`, keyed by the reference's and the data's hashes,
    `ipo_gap.data.ref_cache`), so the runs of a sweep skip the reference forward pass.
    """

    def build():
        pairs = {k: v for k, v in data.items() if k in sources.PAIR_FIELDS}
        ref_w, ref_l = ref_cache.load_or_compute(
            study.workdir / f"ref_cache{study.tag}",
            study.sft(),
            pairs,
            tokenizer_sha256=study.prep.tokenizer.sha256,
            batch_size=study.cfg.eval_batch,
            name=name,
        )
        return ref_cache.with_refs(pairs, ref_w, ref_l)

    return lambda: sources.OfflineSource(
        study._memo(f"offline_{name}", build), batch_size=study.cfg.rl_batch, seed=study.cfg.seed
    )


def _online(study: Study, loss: str, name: str) -> dict:
    """An online run against the proxy PM with its data-order log (and mid-run snapshot)."""
    _, proxy = study.proxy_pm()
    return study.policy_run(
        name,
        method=f"online {loss}",
        loss=loss,
        log=True,
        source_fn=lambda: study.online_source(proxy),
        save_at=(mid_step(study),),
    )


def mid_step(study: Study) -> int:
    """The paper's 800-of-4k step, scaled: a fifth of the online run."""
    return max(1, study.cfg.rl_steps // 5)


def _replay(study: Study, online_name: str, name: str, method: str, loss: str, window=None):
    """Offline training on the online run's logged stream (exact order, or shuffled)."""
    log_dir = study.runs_dir / online_name / "log"
    online = study.runs_dir / online_name

    def source_fn():
        log = OrderLog.open(log_dir)
        log.check_tokenizer(study.prep.tokenizer.sha256)
        if window is None:
            return sources.LogReplay(log)
        return sources.ShuffledReplay(log, window=window, seed=study.cfg.seed)

    def extra(model, hist):
        ref = load_model(online, study.policy_cfg)
        online_losses = json.loads((online / "done.json").read_text())["losses"]
        dev = [abs(a - h["loss"]) for a, h in zip(online_losses, hist, strict=True)]
        return {
            "max_param_diff_to_online": tree_max_abs_diff(model, ref),
            "max_loss_dev_to_online": max(dev),
            "mean_loss_dev_to_online": float(np.mean(dev)),
        }

    return study.policy_run(name, method=method, loss=loss, source_fn=source_fn, extra=extra)


def fig1(study: Study) -> list[dict]:
    """Online IPO and the offline IPO sweep on D_golden (lr x beta, run 5x longer)."""
    out = [_online(study, "ipo", "online_ipo")]
    d = study.d_golden()["train"]
    n = study.cfg.rl_steps * study.cfg.offline_steps_factor
    for lr in study.cfg.offline_lrs:
        for beta in study.cfg.offline_betas:
            out.append(
                study.policy_run(
                    f"offline_ipo_lr{lr:g}_b{beta:g}",
                    method="offline ipo",
                    lr=lr,
                    beta=beta,
                    num_steps=n,
                    source_fn=_offline(study, d, "d_golden"),
                )
            )
    return out


def fig4(study: Study) -> list[dict]:
    """Exact-order replay (tandem), uniform shuffle and shuffle levels of the online stream."""
    out = [_replay(study, "online_ipo", "tandem_ipo", "offline ipo (exact order)", "ipo")]
    windows = [*study.cfg.shuffle_levels, study.cfg.rl_steps]
    for w in windows:
        label = "uniform" if w == study.cfg.rl_steps else f"w{w}"
        out.append(
            _replay(
                study,
                "online_ipo",
                f"shuffled_ipo_{label}",
                f"offline ipo (shuffled {label})",
                "ipo",
                window=w,
            )
        )
    return out


def fig9(study: Study) -> list[dict]:
    """Best-of-2: online, offline on D_golden, and the tandem replay of the online stream."""
    d = study.d_golden()["train"]
    return [
        _online(study, "bo2", "online_bo2"),
        study.policy_run(
            "offline_bo2",
            method="offline bo2",
            loss="bo2",
            source_fn=_offline(study, d, "d_golden"),
        ),
        _replay(study, "online_bo2", "tandem_bo2", "offline bo2 (exact order)", "bo2"),
    ]


def beyond(study: Study) -> list[dict]:
    """Semi-online IPO (refresh every s steps; 0 = never) and HyPO on D_golden."""
    _, proxy = study.proxy_pm()
    out = []
    for s in study.cfg.semi_online_refresh:
        label = "inf" if s == 0 else str(s)
        out.append(
            study.policy_run(
                f"semi_online_ipo_s{label}",
                method=f"semi-online ipo (s={label})",
                source_fn=lambda s=s: sources.SemiOnlineSource(
                    study.online_source(proxy), refresh_every=s or None
                ),
            )
        )
    d = study.d_golden()["train"]
    out.append(
        study.policy_run(
            "hypo",
            method="hypo",
            loss="dpo",
            hypo=True,
            source_fn=lambda: sources.HypoSource(
                _offline(study, d, "d_golden")(),
                key=study.key("hypo"),
                max_len=study.cfg.target_len,
            ),
        )
    )
    return out


def _sampled_dataset(study: Study, name: str, policy_a, policy_b) -> dict:
    """Prompts of D_golden's train split, y1 ~ policy_a, y2 ~ policy_b, golden labels.

    As many prompts as the offline run on it consumes (rl_steps x rl_batch: one epoch), the
    first ones of D_golden's train split.
    """
    path = study.workdir / f"{name}.npz"
    if not path.exists():
        d = study.d_golden()["train"]
        n = min(len(d["prompt"]), study.cfg.rl_steps * study.cfg.rl_batch)
        x, xm = d["prompt"][:n], d["prompt_mask"][:n]
        k1, k2 = jax.random.split(jax.random.fold_in(study.key("datasets"), hash_name(name)))
        kw = {"max_len": study.cfg.target_len, "batch_size": study.cfg.eval_batch}
        y1, m1 = evaluation.sample_rows(policy_a, x, xm, key=k1, **kw)
        y2, m2 = evaluation.sample_rows(policy_b, x, xm, key=k2, **kw)
        judged = trainers.judge_rows(study.golden_pm()[1], x, xm, y1, m1, y2, m2)
        pairs = {
            "prompt": x,
            "prompt_mask": xm,
            "y_w": y1,
            "y_w_mask": m1,
            "y_l": y2,
            "y_l_mask": m2,
        }
        np.savez(path, **relabel(pairs, judged))  # y_w = the golden PM's winner
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def hash_name(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % (2**31)


def fig5(study: Study) -> list[dict]:
    """Offline IPO on datasets of online-policy samples (D_4k-vs-4k, D_sft-vs-800, D_800-vs-4k)."""
    _online(study, "ipo", "online_ipo")
    run = study.runs_dir / "online_ipo"
    final = load_model(run, study.policy_cfg)
    mid = load_model(run / f"step_{mid_step(study)}", study.policy_cfg)
    sft = study.sft()
    specs = {
        "d_final_vs_final": (final, final),
        "d_sft_vs_mid": (sft, mid),
        "d_mid_vs_final": (mid, final),
    }
    out = []
    for name, (a, b) in specs.items():
        data = _sampled_dataset(study, name, a, b)
        out.append(
            study.policy_run(
                f"offline_ipo_{name}",
                method=f"offline ipo on {name}",
                source_fn=_offline(study, data, name),
            )
        )
    return out


def fig10(study: Study) -> list[dict]:
    """Policy sizes (Fig. 10, 11, 14): online IPO and offline IPO on D_golden per size.

    The main size reuses Fig. 1's runs (the whole sweep); other sizes run online IPO and the
    offline betas at the online learning rate. Returns per size: the runs and the parameter
    count; the report takes the 90% quantile of win rates over each method's checkpoints.
    """
    out = []
    d = study.d_golden()["train"]
    n = study.cfg.rl_steps * study.cfg.offline_steps_factor
    for model in study.cfg.scaling_models:
        if model in (study.cfg.policy_model, study.cfg.policy_checkpoint):
            s = study
            runs = fig1(study)
            online, offline = runs[0], runs[1:]
        else:
            s = study.variant(model)
            online = _online(s, "ipo", "online_ipo")
            offline = [
                s.policy_run(
                    f"offline_ipo_lr{s.cfg.rl_lr:g}_b{beta:g}",
                    method="offline ipo",
                    beta=beta,
                    num_steps=n,
                    source_fn=_offline(s, d, "d_golden"),
                )
                for beta in s.cfg.offline_betas
            ]
        out.append(
            {
                "model": model,
                "params": s.policy_cfg.num_params(),
                "sft_loss": json.loads((s.workdir / f"sft{s.tag}" / "done.json").read_text())[
                    "final_loss"
                ],
                "online": [online],
                "offline": offline,
            }
        )
    return out


def pipeline_summary(study: Study) -> dict:
    """Accuracies of the golden and proxy PMs, and the SFT evaluation."""

    def fn(d):
        golden, _ = study.golden_pm()
        proxy, _ = study.proxy_pm()
        return {
            "golden_pm": golden,
            "proxy_pm": proxy,
            "sft": study.sft_eval(),
            "truncated": study.prep.truncated,
            "prompt_width": study.prep.prompt_width,
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind} visible",
            "mesh": study.cfg.mesh or "none (one device)",
            "task": study.cfg.task,
            "data": getattr(study.prep.task, "report", None),
            "d_golden_agreement_with_human_labels": float(
                study.d_golden()["train"]["agree_human"].mean()
            ),
        }

    return stage(study.workdir / "pipeline", fn)


def run_all(study: Study) -> dict[str, list[dict]]:
    """Every stage of the study, on `study.mesh` (the config's `mesh`) when it has one."""
    with sharding.use_mesh(study.mesh):
        study.baseline()
        summary = pipeline_summary(study)
        return {
            "pipeline": summary,
            "fig1": fig1(study),
            "fig4": fig4(study),
            "fig5": fig5(study),
            "fig9": fig9(study),
            "beyond": beyond(study),
            "fig10": fig10(study),
        }
