"""Tandem check: offline training on the online run's logged stream IS the online run.

Trains (or reuses from --workdir) a tiny SFT policy and a proxy pairwise PM on the toy task,
runs online IPO for --steps steps from the SFT start with every batch appended to a
hash-chained data-order log, then replays the log offline from the same start with the same
compiled step. Prints the per-step loss deviation, the max parameter difference and a final
PASS/FAIL line: on CPU the replay must be bit-identical (difference exactly 0).
With --shuffle_levels it also replays with the examples of each window of w steps shuffled
together ('all' = uniform shuffle) and reports how far each drifts from the online run, step
by step (the max parameter difference to the online run after the same step, and both
losses): in tandem_report.json and in tandem_shuffle.png.

--sft_dir / --pm_dir start from a given SFT policy and proxy PM (directories written by
`ipo_gap.study.save_model` for --model at this check's toy vocabulary, e.g. the sft_* and pm_*
directories of an earlier run) instead of training them.

  python experiments/tandem_check.py --workdir=/tmp/tandem
"""

from __future__ import annotations

import json
import pathlib
import random

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from ipo_gap import preference
from ipo_gap.configs import model_preset
from ipo_gap.data import sources, toy_task
from ipo_gap.data.order_log import OrderLog, pair_schema
from ipo_gap.determinism import tree_bit_differences, tree_max_abs_diff
from ipo_gap.study import load_model, save_model, stage
from ipo_gap.t5 import model as t5
from ipo_gap.tokenizer import Tokenizer
from ipo_gap.train import loop, steps

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Online IPO steps.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts per step.")
_LR = flags.DEFINE_float("learning_rate", 3e-4, "Policy learning rate.")
_BETA = flags.DEFINE_float("beta", 0.1, "IPO beta.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_MODEL = flags.DEFINE_string("model", "toy-s", "Model preset of policy and PM.")
_SHUFFLE = flags.DEFINE_list("shuffle_levels", [], "Replay shuffle windows, e.g. 2,5,all.")
_PREP_STEPS = flags.DEFINE_integer("prep_steps", 150, "SFT and PM training steps.")
_SFT_DIR = flags.DEFINE_string("sft_dir", None, "A saved SFT policy to start from (not trained).")
_PM_DIR = flags.DEFINE_string("pm_dir", None, "A saved proxy PM to judge with (not trained).")

for _name in ("steps", "batch_size", "prep_steps"):
    flags.register_validator(_name, lambda v: v >= 1, message=f"--{_name} must be >= 1")
flags.register_validator(
    "shuffle_levels",
    lambda levels: all(w == "all" or (w.isdigit() and int(w) >= 1) for w in levels),
    message="--shuffle_levels: each level is a window of >= 1 steps or 'all', e.g. 2,5,all",
)
for _name in ("sft_dir", "pm_dir"):
    flags.register_validator(
        _name,
        lambda d: d is None or (pathlib.Path(d) / "ckpt").is_dir(),
        message=f"--{_name} must be a directory written by ipo_gap.study.save_model (with ckpt/)",
    )

S, T = 16, 16


def prepare(workdir: pathlib.Path, seed: int):
    """Tokenizer, SFT policy and proxy PM for the toy task (deterministic; cached in workdir)."""
    rng = random.Random(seed)
    train = toy_task.make_examples(rng, 4000)
    tok = Tokenizer.train((t for pair in train for t in pair), vocab_size=64)
    cfg = model_preset(_MODEL.value, vocab_size=tok.vocab_size)
    key_sft, key_pm, key_online = jax.random.split(jax.random.key(seed), 3)
    src = tok.encode([p for p, _ in train], S)
    tgt = tok.encode([r for _, r in train], T)
    B = 32
    opt = optax.adam(3e-3)

    def train_sft(d):  # SFT on the reference responses
        sft = t5.init(cfg, key=key_sft)
        opt_state = opt.init(eqx.filter(sft, eqx.is_array))
        sft_step = steps.make_sft_step(opt)
        for i in range(_PREP_STEPS.value):
            idx = sources.schedule_indices(seed, i, B, len(train))
            batch = steps.SeqBatch(
                *(jnp.asarray(a[idx]) for a in (src.ids, src.mask, tgt.ids, tgt.mask))
            )
            sft, opt_state, m = sft_step(sft, opt_state, batch)
        print(f"SFT: {_PREP_STEPS.value} steps, final loss {float(m['loss']):.3f}", flush=True)
        save_model(d, sft, cfg)
        return {"steps": _PREP_STEPS.value, "final_loss": float(m["loss"])}

    def train_pm(d):  # proxy PM on (reference, corrupted) pairs labelled by the hidden score
        pm_rng = random.Random(seed + 1)
        worse = [toy_task.corrupt(pm_rng, r) for _, r in train]
        lo = tok.encode(worse, T)
        pm = t5.init(cfg, key=key_pm)
        opt_state = opt.init(eqx.filter(pm, eqx.is_array))
        pm_step = preference.make_pm_train_step(opt)
        arrays = (src.ids, src.mask, tgt.ids, tgt.mask, lo.ids, lo.mask)
        for i in range(_PREP_STEPS.value):
            idx = sources.schedule_indices(seed + 1, i, B, len(train))
            batch = preference.PreferenceBatch(*(jnp.asarray(a[idx]) for a in arrays))
            pm, opt_state, m = pm_step(pm, opt_state, batch, jax.random.fold_in(key_pm, i))
        print(
            f"proxy PM: {_PREP_STEPS.value} steps, final loss {float(m['loss']):.3f}, "
            f"accuracy {float(m['accuracy']):.3f}",
            flush=True,
        )
        save_model(d, pm, cfg)
        return {"steps": _PREP_STEPS.value, "final_loss": float(m["loss"])}

    # Given, or reused from --workdir when a previous run finished them (with the same flags).
    tag = f"{_MODEL.value}_seed{seed}_prep{_PREP_STEPS.value}"
    dirs = {}
    for which, given, fn in (("sft", _SFT_DIR.value, train_sft), ("pm", _PM_DIR.value, train_pm)):
        dirs[which] = pathlib.Path(given) if given else workdir / f"{which}_{tag}"
        if not given:
            stage(dirs[which], fn)
    models = {}
    for which, d in dirs.items():
        try:
            models[which] = load_model(d, cfg)
        except Exception as e:  # orbax names the first mismatching array
            raise ValueError(
                f"{d}: not a {_MODEL.value} model at this check's vocabulary "
                f"({tok.vocab_size}): {e}"
            ) from e
    return tok, cfg, models["sft"], models["pm"], src, key_online


def run(workdir: pathlib.Path) -> bool:
    workdir.mkdir(parents=True, exist_ok=True)
    tok, cfg, sft, pm, src, key_online = prepare(workdir, _SEED.value)
    hp = steps.Hparams.make(_LR.value, _BETA.value)
    n = _STEPS.value
    online_src = sources.OnlineSource(
        src.ids, src.mask, pm, batch_size=_BATCH.value, seed=_SEED.value, key=key_online, max_len=T
    )
    log = OrderLog.create(
        workdir / "online_log",
        schema=pair_schema(S, T),
        batch_size=_BATCH.value,
        overwrite=True,
        meta={
            "tokenizer_sha256": tok.sha256,
            "model": cfg.to_dict(),
            "seed": _SEED.value,
            "loss": "ipo",
            "steps": n,
        },
    )
    # Host copies of the online parameters after every step, for the shuffled replays' drift.
    online_params = []

    def keep_online(step, model, metrics):
        if _SHUFFLE.value:
            online_params.append(jax.device_get(eqx.filter(model, eqx.is_array)))

    online, _, hist_on = loop.train_policy(
        model=sources.copy_arrays(sft),
        ref_model=sft,
        source=online_src,
        num_steps=n,
        hparams=hp,
        loss="ipo",
        order_log=log,
        metrics_path=workdir / "online_metrics.jsonl",
        name="online",
        on_step=keep_online,
    )
    replay = OrderLog.open(workdir / "online_log")
    offline, _, hist_off = loop.train_policy(
        model=sources.copy_arrays(sft),
        ref_model=sft,
        source=sources.LogReplay(replay, tokenizer=tok),
        num_steps=n,
        hparams=hp,
        loss="ipo",
        metrics_path=workdir / "replay_metrics.jsonl",
        name="replay",
    )
    loss_dev = [abs(a["loss"] - b["loss"]) for a, b in zip(hist_on, hist_off, strict=True)]
    diff = tree_max_abs_diff(online, offline)
    differing = tree_bit_differences(online, offline)  # -0 against +0 too
    report = {
        "steps": n,
        "max_loss_deviation": max(loss_dev),
        "max_param_diff": diff,
        "param_leaves_differing_in_bits": len(differing),
        "param_leaves_differing": differing,
        "per_step_loss_deviation": loss_dev,
    }
    for level in _SHUFFLE.value:
        window = n if level == "all" else int(level)
        drift = []

        def track(step, model, metrics, drift=drift):
            drift.append(tree_max_abs_diff(online_params[step], model))

        shuffled, _, hist = loop.train_policy(
            model=sources.copy_arrays(sft),
            ref_model=sft,
            source=sources.ShuffledReplay(replay, window=window, seed=_SEED.value, tokenizer=tok),
            num_steps=n,
            hparams=hp,
            loss="ipo",
            name=f"shuffle-{level}",
            on_step=track,
        )
        report[f"shuffle_{level}"] = {
            "param_distance_to_online": tree_max_abs_diff(online, shuffled),
            "final_loss": hist[-1]["loss"],
            "online_final_loss": hist_on[-1]["loss"],
            "mean_abs_loss_deviation": float(
                np.mean([abs(a["loss"] - b["loss"]) for a, b in zip(hist_on, hist, strict=True)])
            ),
            "per_step_param_distance_to_online": drift,
            "per_step_loss": [h["loss"] for h in hist],
        }
    if _SHUFFLE.value:
        report["online_per_step_loss"] = [h["loss"] for h in hist_on]
        plot_shuffles(report, _SHUFFLE.value, workdir / "tandem_shuffle.png")
    (workdir / "tandem_report.json").write_text(json.dumps(report, indent=1))
    for i, d in enumerate(loss_dev):
        print(
            f"step {i}: online loss {hist_on[i]['loss']:.6f}  replay loss "
            f"{hist_off[i]['loss']:.6f}  |dev| {d:.3g}"
        )
    for level in _SHUFFLE.value:
        print(f"shuffle window {level}: {report[f'shuffle_{level}']}")
    ok = not differing and max(loss_dev) == 0.0
    print(
        f"max parameter difference {diff:.3g}, max loss deviation {max(loss_dev):.3g}, "
        f"parameters differing in bits: {', '.join(differing) or 'none'}"
    )
    print(
        "PASS: the offline replay is bit-identical to the online run"
        if ok
        else "FAIL: the offline replay differs from the online run"
    )
    return ok


def plot_shuffles(report: dict, levels, path: pathlib.Path) -> None:
    """Loss per step (online and each shuffled replay) and each replay's parameter distance
    to the online run after the same step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dist) = plt.subplots(1, 2, figsize=(10, 4))
    steps_axis = np.arange(report["steps"])
    ax_loss.plot(steps_axis, report["online_per_step_loss"], "k-", label="online")
    for level in levels:
        r = report[f"shuffle_{level}"]
        label = "uniform shuffle" if level == "all" else f"window {level}"
        ax_loss.plot(steps_axis, r["per_step_loss"], label=label)
        ax_dist.plot(steps_axis, r["per_step_param_distance_to_online"], label=label)
    ax_loss.set(xlabel="step", ylabel="IPO loss", title="loss per step")
    ax_dist.set(
        xlabel="step", ylabel="max |param - online param|", title="drift from the online run"
    )
    ax_loss.legend()
    ax_dist.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    del argv
    if not run(pathlib.Path(_WORKDIR.value)):
        raise SystemExit(1)


if __name__ == "__main__":
    app.run(main)
