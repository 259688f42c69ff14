"""The study on a real dataset's format with pretrained (Hugging Face) starts.

No download is needed: a hand-made HH-RLHF file (gzip JSON lines {chosen, rejected}, dialogues
built from the embedded task's texts), a SentencePiece model trained on it and saved as a file,
and randomly initialised presets written as Hugging Face T5 directories (`save_hf_t5`) stand
in for the user's downloads, so every line of the real-data path runs here. The unit tests
check what the configuration and the starting models are; the end-to-end test (slow) runs the
whole micro study on them and checks the artefacts. With ../shared/data present, a last test
loads the real HH helpful records through the study's task loader.
"""

import dataclasses
import gzip
import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest
from conftest import SHARED_DATA

from ipo_gap import checkpoint, study
from ipo_gap.configs import model_preset
from ipo_gap.data import embedded_task, preference_data
from ipo_gap.study_runs import Study
from ipo_gap.t5 import model as t5
from ipo_gap.tokenizer import Tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))


def write_hh(path: pathlib.Path, n: int, seed: int = 0) -> None:
    """n HH-format records whose prompts are distinct embedded-task prompts."""
    task = embedded_task.make_task(
        seed, num_train=n, num_valid=0, num_test=0, num_rl_prompts=0, num_eval_prompts=0
    )
    lines = []
    for r in task.pairs["train"]:
        prompt = f"\n\nHuman: {r['prompt']}\n\nAssistant:"
        lines.append(
            json.dumps(
                {"chosen": f"{prompt} {r['chosen']}", "rejected": f"{prompt} {r['rejected']}"}
            )
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same text gives the same bytes (gzip's header stamps the current second).
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), mtime=0))


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    """What a user would download: data, a SentencePiece model, two T5 sizes, a golden T5."""
    root = tmp_path_factory.mktemp("downloads")
    write_hh(root / "hh" / "train.jsonl.gz", 900)
    from ipo_gap.data import preference_data

    pairs, _ = preference_data.load_task_pairs("hh_helpful", root / "hh")
    texts = [t for p in pairs for t in (p.prompt, p.chosen, p.rejected)]
    # Like T5's spiece.model: trained without the reserved PM pieces (ids 3 and 4 ordinary).
    import io

    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=proto,
        vocab_size=400,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    tok = Tokenizer.from_proto(proto.getvalue())
    assert not tok.reserves_pm_markers
    tok.save(root / "spiece.model")
    dirs = {}
    for name, preset, seed in (
        ("policy", "toy-s", 1),
        ("policy_m", "toy-m", 2),
        ("golden", "toy-s", 3),
    ):
        cfg = model_preset(preset, vocab_size=tok.vocab_size + 28)  # like T5: a few spare rows
        checkpoint.save_hf_t5(root / name, t5.init(cfg, key=jax.random.key(seed)), cfg)
        dirs[name] = root / name
    return root, dirs


def _flags(downloads) -> dict:
    """The main job's flags for the downloads: HH data, tokenizer, policy and golden starts."""
    root, dirs = downloads
    return {
        "task": "hh_helpful",
        "data_dir": str(root / "hh"),
        "tokenizer_model": str(root / "spiece.model"),
        "policy_checkpoint": str(dirs["policy"]),
        "golden_checkpoint": str(dirs["golden"]),
    }


def _cfg(downloads, **kw):
    import reproduce

    return reproduce.config("micro", **_flags(downloads), **kw)


def test_config_for_a_real_task(downloads):
    root, dirs = downloads
    cfg = _cfg(downloads)
    assert cfg.task == "hh_helpful" and cfg.data_dir == str((root / "hh").resolve())
    # Real texts get the real-task windows of the preset; the embedded task keeps its own.
    for k, v in study.REAL_TASK_OVERRIDES["micro"].items():
        assert getattr(cfg, k) == v
    assert study.for_task(study.PRESETS["micro"], "embedded").prompt_len == 16
    # With a pretrained policy the scaling study defaults to that checkpoint alone.
    assert cfg.scaling_models == (str(dirs["policy"].resolve()),)
    two = _cfg(downloads, scaling_models=[str(dirs["policy"]), str(dirs["policy_m"])])
    assert two.scaling_models == tuple(str(dirs[k].resolve()) for k in ("policy", "policy_m"))


def test_pretrained_starts_are_the_checkpoints(downloads, tmp_path):
    root, dirs = downloads
    s = Study(tmp_path, _cfg(downloads))
    assert s.prep.tokenizer.sha256 == Tokenizer.load(root / "spiece.model").sha256
    assert not (tmp_path / "tokenizer.model").exists()  # the given model is used, not trained
    # The tokenizer's ids 3 and 4 are ordinary pieces: the PMs mark with the first two
    # embedding rows past its pieces, which no text encodes to.
    V = s.prep.tokenizer.vocab_size  # noqa: N806
    for which, d in (("policy", dirs["policy"]), ("golden", dirs["golden"])):
        _, want = checkpoint.load_hf_t5(d, pm_ids=(V, V + 1))
        got = s.init_model(which, "sft")
        assert got.cfg.pm_ids == (V, V + 1)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    assert s.policy_cfg.vocab_size == V + 28
    assert s.golden_cfg.pm_ids == s.proxy_cfg.pm_ids == (V, V + 1)
    # A scaling size must be a checkpoint too when the policy is pretrained.
    with pytest.raises(ValueError, match="Hugging Face T5 directory"):
        s.variant("toy-m")
    m = s.variant(str(dirs["policy_m"]))
    assert m.policy_cfg.d_model == model_preset("toy-m").d_model and m.tag == "_policy_m"
    _, want = checkpoint.load_hf_t5(dirs["policy_m"], pm_ids=(V, V + 1))
    jax.tree.map(np.testing.assert_array_equal, m.init_model("policy", "sft"), want)


def test_the_compute_dtype_reaches_every_model(downloads, tmp_path):
    """--compute_dtype=bfloat16: every model of the study (pretrained starts, their scaling
    variants, and the presets of the embedded task) computes in bf16 and keeps float32
    parameters; the default is float32."""
    s = Study(tmp_path / "hh", _cfg(downloads, compute_dtype="bfloat16"))
    m = s.variant(str(downloads[1]["policy_m"]))
    for cfg in (s.policy_cfg, s.golden_cfg, m.policy_cfg):
        assert cfg.compute_dtype == "bfloat16" and cfg.param_dtype == "float32"
    for model in (s.init_model("policy", "sft"), s.init_model("golden", "golden_pm")):
        assert model.cfg.compute_dtype == "bfloat16"
        assert model.encoder.layers.sa.q.dtype == np.float32
    import reproduce

    cfg = reproduce.config("micro", compute_dtype="bfloat16")
    assert cfg.model("policy", 100).compute_dtype == "bfloat16"
    assert cfg.preset_model("toy-m", 100).compute_dtype == "bfloat16"
    assert reproduce.config("micro").model("golden", 100).compute_dtype == "float32"


def test_a_study_config_saved_before_compute_dtype_resumes_as_float32(tmp_path):
    """study_config.json of a study started before the field existed reads as float32 (what
    that code ran), so the study resumes instead of being refused as another config."""
    cfg = study.PRESETS["micro"]
    saved = json.loads(json.dumps(cfg.to_dict()))  # as written to the file
    del saved["compute_dtype"], saved["remat"]  # both added later
    (tmp_path / "study_config.json").write_text(json.dumps(saved))
    assert study.study_config(tmp_path) == cfg
    assert study.with_new_defaults(saved) == json.loads(json.dumps(cfg.to_dict()))  # as compared
    bf16 = dataclasses.replace(cfg, compute_dtype="bfloat16").to_dict()
    assert study.with_new_defaults(bf16)["compute_dtype"] == "bfloat16"  # a saved value wins


def test_remat_reaches_every_model_of_a_study(downloads, tmp_path):
    """--remat (on in the paper preset) reaches the preset models, which then scan their
    layers (remat needs it), and the pretrained starts; off, the models are as before."""
    import reproduce

    assert study.PRESETS["paper"].remat and not study.PRESETS["standard"].remat
    on = reproduce.config("micro", remat=True)
    for m in ("toy-s", "toy-m"):
        assert on.preset_model(m, 100).remat and on.preset_model(m, 100).scan_layers
    off = reproduce.config("micro").preset_model("toy-s", 100)
    assert not off.remat and not off.scan_layers  # the toy presets unroll their layers
    s = Study(tmp_path / "w", _cfg(downloads, remat=True))
    for cfg in (s.policy_cfg, s.golden_cfg):  # from the (two-layer) HF checkpoints
        assert cfg.remat and cfg.scan_layers
    _, model = checkpoint.load_hf_t5(downloads[1]["golden"], remat=True)
    assert model.cfg.remat and model.cfg.scan_layers


def test_accuracy_pairs_fit_in_the_valid_split():
    """The accuracy pairs are the first num_acc_pairs pairs of the valid split: every preset,
    on every task, asks for at most num_valid of them (quick on real data asked for 256 of
    200 valid pairs and silently used 200), and a config asking for more is refused, naming
    both fields, whether built from a preset or by the main job's flags."""
    for name, preset in study.PRESETS.items():
        for task in ("embedded", *preference_data.TASKS):
            cfg = study.for_task(preset, task)
            assert cfg.num_acc_pairs <= cfg.num_valid, (name, task)
    quick = study.for_task(study.PRESETS["quick"], "hh_helpful")
    assert quick.num_acc_pairs == quick.num_valid == 200
    with pytest.raises(ValueError, match=r"'micro': num_acc_pairs=65 > num_valid=64"):
        dataclasses.replace(study.PRESETS["micro"], num_acc_pairs=65)
    import reproduce

    with pytest.raises(ValueError, match=r"'quick': num_acc_pairs=256 > num_valid=100"):
        reproduce.config("quick", num_valid=100)


def test_a_run_has_at_least_as_many_steps_as_evaluations():
    """Every run's k-th evaluation reads the online stream's k-th window; with fewer online
    steps than evaluations the steps repeat, and a longer (offline) run's later evaluations
    had no window (an IndexError deep in a stage). Refused up front, naming both fields."""
    for name, preset in study.PRESETS.items():
        assert preset.rl_steps >= preset.num_evals, name
    with pytest.raises(ValueError, match=r"'micro': rl_steps=3 < num_evals=5"):
        dataclasses.replace(study.PRESETS["micro"], rl_steps=3, num_evals=5)
    dataclasses.replace(study.PRESETS["micro"], rl_steps=5, num_evals=5)  # equal: fine


def test_a_resumed_study_refuses_a_changed_data_folder(tmp_path):
    """study.load_task (run by `prepare` whenever a study starts or resumes) reads its cached
    task.json while the data files' bytes are the same (a touched file included), and refuses
    a data folder with a file added, naming task.json and the file, where it used to re-split
    the pairs silently under the stages already trained on the old split."""
    data = tmp_path / "hh"
    write_hh(data / "train.jsonl.gz", 900)
    cfg = dataclasses.replace(
        study.for_task(study.PRESETS["micro"], "hh_helpful"), data_dir=str(data)
    )
    work = tmp_path / "work"
    task = study.load_task(work, cfg)
    cached = (work / "task.json").read_bytes()
    st = (data / "train.jsonl.gz").stat()
    os.utime(data / "train.jsonl.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert study.load_task(work, cfg) == task
    write_hh(data / "test.jsonl.gz", 50, seed=1)
    with pytest.raises(preference_data.TaskChangedError) as info:
        study.load_task(work, cfg)
    assert str(info.value).startswith(f"{work / 'task.json'}: ")
    assert f"files added: {data / 'test.jsonl.gz'}" in str(info.value)
    assert (work / "task.json").read_bytes() == cached


def test_real_data_flags_are_refused_on_the_embedded_task():
    import reproduce

    # Ignored silently, they would still be written into the study's config.
    with pytest.raises(ValueError, match="--data_dir applies to a real dataset"):
        reproduce.config("micro", data_dir="/tmp")
    with pytest.raises(ValueError, match="--data_dir and --skip_bad_records apply"):
        reproduce.config("micro", task="embedded", data_dir="/tmp", skip_bad_records=True)
    assert reproduce.config("micro", skip_bad_records=False).task == "embedded"


def test_mistyped_inputs_are_refused_before_the_workdir_records_them(tmp_path):
    """A flag naming a path that is not there (or a task without --data_dir) stops the job
    before study_config.json is written: fixing the flag and running again works, where the
    recorded config used to refuse the workdir as "another configuration"; a mesh axis no
    sharding rule maps onto (a typo of data/model) is refused, not silently replicated."""
    import reproduce

    work = tmp_path / "w"
    bad = {
        "task": ("hh_helpful", "needs --data_dir"),
        "data_dir": (str(tmp_path / "nowhere"), "--data_dir=.*nowhere: not a directory"),
        "tokenizer_model": (str(tmp_path / "sp.model"), "--tokenizer_model=.*: no such file"),
        "policy_checkpoint": (str(tmp_path), "--policy_checkpoint=.*no config.json"),
        "scaling_models": (("toy-s", "toy-xl"), "--scaling_models: 'toy-xl' is neither"),
    }
    for flag, (value, message) in bad.items():
        extra = {"task": "hh_helpful"} if flag == "data_dir" else {}
        with pytest.raises(ValueError, match=message):
            reproduce.run(work, "micro", **{flag: value, **extra})
        assert not (work / "study_config.json").exists(), flag
    # Two checkpoint folders of one name would share sft_<name>/ and runs_<name>/; a preset
    # beside a pretrained start would be a randomly initialised size (or be dropped).
    for parent in ("a", "b"):
        (tmp_path / parent / "t5-base").mkdir(parents=True)
        (tmp_path / parent / "t5-base" / "config.json").write_text("{}")
    two = tuple(str(tmp_path / p / "t5-base") for p in ("a", "b"))
    with pytest.raises(ValueError, match="would share the directories sft_t5-base/"):
        study.check_inputs(reproduce.config("micro", scaling_models=two))
    with pytest.raises(ValueError, match="'toy-s' is a preset, but the study starts from"):
        study.check_inputs(
            reproduce.config("micro", policy_checkpoint=two[0], scaling_models=("toy-s", two[0]))
        )
    with pytest.raises(ValueError, match="--mesh=dat:1: axis 'dat' is not one the study"):
        reproduce.config("micro", mesh="dat:1")
    assert reproduce.config("micro", mesh="data:1").mesh == "data:1"


def test_every_start_records_its_mode_before_any_stage_runs(tmp_path):
    """A start's --jobs is recorded when it begins, so a start killed after training some
    stages in one process still makes the report say the study is mixed."""
    import types

    from ipo_gap import study_experiments

    s = types.SimpleNamespace(workdir=tmp_path)
    study_experiments._record_execution(s, 0)  # killed later: nothing else is written
    study_experiments._record_execution(s, 2)
    assert study_experiments._execution(s).startswith(
        "in one process, then 2 one-core worker processes (mixed"
    )


def test_a_start_that_computes_nothing_does_not_make_the_study_mixed(tmp_path, monkeypatch):
    """A rerun of a finished study (to rebuild its report) under another --jobs writes no
    result: its row is marked `ran: false` and not counted; a start that wrote a stage's
    done.json, or any cache, counts."""
    import os
    import types

    from ipo_gap import study_experiments as se

    s = types.SimpleNamespace(workdir=tmp_path)
    clock = iter([1000.0, 2000.0, 3000.0, 4000.0])
    # Only study_experiments' clock: patching time.time itself would feed every caller in
    # the process (logging's record stamps too) from this finite iterator.
    monkeypatch.setattr(se, "time", types.SimpleNamespace(time=lambda: next(clock)))

    def write(rel, at):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
        os.utime(path, (at, at))

    write("old/done.json", 100.0)  # a file of long before
    se._close_execution(s, se._record_execution(s, 0))  # t=1000: found everything done
    first = se._record_execution(s, 2)  # t=2000
    write("sft/done.json", 2000.5)  # a stage it ran
    se._close_execution(s, first)
    rerun = se._record_execution(s, 0)  # t=3000
    write("REPORT.md", 3000.5)  # the report's outputs are not results
    write("figures/fig1.png", 3000.5)
    se._close_execution(s, rerun)
    rows = [json.loads(line) for line in (tmp_path / "execution.jsonl").read_text().splitlines()]
    assert [r["ran"] for r in rows] == [False, True, False]
    assert se._execution(s) == "2 one-core worker processes"
    later = se._record_execution(s, 0)  # t=4000
    write("d_golden_train.npz", 4000.5)  # a cache recomputed in one process
    se._close_execution(s, later)
    assert se._execution(s).startswith("2 one-core worker processes, then in one process (mixed")


def test_the_report_names_the_code_that_computed_the_results(tmp_path, monkeypatch):
    """Each start records its code version; the report names the versions of the starts that
    computed results, and calls a study resumed under other code mixed. A start that only
    rebuilt the report, or a row of older code without a record, is named as such."""
    import os
    import types

    from ipo_gap import study_experiments as se

    s = types.SimpleNamespace(workdir=tmp_path)
    (tmp_path / "execution.jsonl").write_text(json.dumps({"jobs": 2, "started": 1.0}) + "\n")
    assert se._code(s) == "not recorded (a start of older code)"
    (tmp_path / "execution.jsonl").unlink()
    clock = iter([1000.0, 2000.0, 3000.0])
    # Only study_experiments' clock: patching time.time itself would feed every caller in
    # the process (logging's record stamps too) from this finite iterator.
    monkeypatch.setattr(se, "time", types.SimpleNamespace(time=lambda: next(clock)))
    version = {"ipo_gap": "0.1.0", "git_commit": "a" * 40, "git_dirty": False}
    monkeypatch.setattr(se, "code_version", lambda: dict(version))

    def start(result: str | None, at: float):
        started = se._record_execution(s, 0)
        if result:
            (tmp_path / result).write_text("x")
            os.utime(tmp_path / result, (at, at))
        se._close_execution(s, started)

    start("sft.json", 1000.5)
    assert se._code(s) == f"ipo_gap 0.1.0 at commit {'a' * 10}"
    version.update(git_commit="b" * 40, git_dirty=True)
    start(None, 0)  # a rerun under new code that computes nothing
    assert se._code(s) == f"ipo_gap 0.1.0 at commit {'a' * 10}"
    start("runs.json", 3000.5)
    assert se._code(s) == (
        f"ipo_gap 0.1.0 at commit {'a' * 10}, then ipo_gap 0.1.0 at commit {'b' * 10} with "
        "uncommitted changes (mixed: each stage was computed by the code of the start that "
        "ran it, and a later start reuses finished stages)"
    )


def test_the_report_counts_sampled_responses_that_contain_a_pm_marker(tmp_path):
    """A marker id sampled inside a response (only sampling can produce one) is counted over
    every online run's log, the scaling sizes' included; ids under the mask only."""
    import types

    from ipo_gap import study_experiments as se
    from ipo_gap.data.order_log import OrderLog, pair_schema

    def cfg(ids):
        return types.SimpleNamespace(pm_ids=ids)

    s = types.SimpleNamespace(workdir=tmp_path, proxy_cfg=cfg((3, 4)), golden_cfg=cfg((3, 4)))
    assert se._markers_sampled(s) == "no online run logged"
    meta = {"tokenizer_sha256": "0" * 64}
    for run, plant in (("runs/online_ipo", True), ("runs_toy-m/online_bo2", False)):
        log = OrderLog.create(
            tmp_path / run / "log", schema=pair_schema(3, 4), batch_size=2, meta=meta
        )
        for step in range(2):
            y = np.full((2, 4), 7, np.int32)
            mask = np.ones((2, 4), np.int32)
            if plant and step == 1:
                y[0, 2] = 4  # a marker inside y_w of row 0
            y[1, 3], mask[1, 3] = 3, 0  # past the response's end: not counted
            batch = dict.fromkeys(("prompt", "prompt_mask"), np.ones((2, 3), np.int32))
            batch.update(y_w=y, y_w_mask=mask, y_l=np.full((2, 4), 5, np.int32), y_l_mask=mask)
            batch.update(dict.fromkeys(("judge_prob", "logp_w", "logp_l"), np.zeros(2, np.float32)))
            log.append(step, batch)
    assert se._markers_sampled(s) == "1 of 16 responses (6.25%), in 2 online runs' logs"
    s.golden_cfg = cfg((5, 6))  # the golden PM's ids count too: every y_l holds 5
    assert se._markers_sampled(s) == "9 of 16 responses (56.25%), in 2 online runs' logs"


def test_coordinator_flags_without_distributed_are_refused(tmp_path):
    """Without --distributed the coordinator flags did nothing: each host ran its own
    single-process study into the shared workdir."""
    import subprocess

    from conftest import REPO

    cmd = [sys.executable, "experiments/reproduce.py", f"--workdir={tmp_path / 'w'}"]
    got = subprocess.run(
        [*cmd, "--coordinator_address=h0:1234", "--num_processes=2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert got.returncode != 0
    assert "--coordinator_address, --num_processes without --distributed" in got.stderr
    assert not (tmp_path / "w").exists()


def test_random_inits_with_a_loaded_tokenizer_get_rows_for_the_pm_markers(downloads, tmp_path):
    """A loaded tokenizer has ordinary pieces at 3 and 4; a randomly initialised study gives
    its models two rows past the pieces for the PMs' markers (it fell back to 3 and 4, which
    a response's text can contain). A trained tokenizer reserves 3 and 4: no extra rows."""
    V = Tokenizer.load(downloads[0] / "spiece.model").vocab_size
    cfg = dataclasses.replace(_cfg(downloads), policy_checkpoint=None, golden_checkpoint=None)
    s = Study(tmp_path / "w", dataclasses.replace(cfg, scaling_models=("toy-s", "toy-m")))
    for model_cfg in (s.policy_cfg, s.proxy_cfg, s.golden_cfg, s.variant("toy-m").policy_cfg):
        assert model_cfg.vocab_size == V + 2
    for model_cfg in (s.proxy_cfg, s.golden_cfg):
        assert model_cfg.pm_ids == (V, V + 1)
    trained = Study(tmp_path / "t", study.PRESETS["micro"])
    assert trained.prep.tokenizer.reserves_pm_markers
    assert trained.policy_cfg.vocab_size == trained.prep.tokenizer.vocab_size
    assert trained.golden_cfg.pm_ids == (3, 4)


def test_bad_real_task_inputs_are_named(downloads, tmp_path):
    root, dirs = downloads
    # A checkpoint whose vocabulary is smaller than the tokenizer's.
    small = model_preset("toy-s", vocab_size=64)
    checkpoint.save_hf_t5(tmp_path / "small", t5.init(small, key=jax.random.key(0)), small)
    cfg = dataclasses.replace(_cfg(downloads), policy_checkpoint=str(tmp_path / "small"))
    with pytest.raises(ValueError, match="64 embeddings.*--tokenizer_model"):
        Study(tmp_path / "w1", cfg)
    with pytest.raises(ValueError, match="needs --data_dir.*jsonl.gz.*github.com/anthropics"):
        Study(tmp_path / "w2", dataclasses.replace(_cfg(downloads), data_dir=None))
    with pytest.raises(FileNotFoundError, match="hh_helpful"):
        Study(tmp_path / "w3", dataclasses.replace(_cfg(downloads), data_dir=str(tmp_path)))


@pytest.mark.slow
def test_micro_study_on_hh_format_from_pretrained_starts(downloads, tmp_path):
    import reproduce

    root, dirs = downloads
    report_path = reproduce.run(
        tmp_path,
        "micro",
        **_flags(downloads),
        scaling_models=[str(dirs["policy"]), str(dirs["policy_m"])],
    )
    text = report_path.read_text()
    assert "hh_helpful" in text and "**Verdict:**" in text
    assert "Bayes" not in text  # a real dataset has no hidden reward to compare with
    pipe = json.loads((tmp_path / "pipeline" / "done.json").read_text())
    assert pipe["task"] == "hh_helpful"
    assert pipe["data"]["obtained"]["test"] == 64 and pipe["data"]["loader"]["records"] == 900
    assert "bayes_accuracy_vs_human_labels" not in pipe["golden_pm"]
    assert "feature_judge" not in pipe and "reference: logistic regression" not in text
    V = Tokenizer.load(root / "spiece.model").vocab_size  # noqa: N806
    assert pipe["pm_markers"].startswith(f"ids {V}, {V + 1}: embedding rows past the tokenizer")
    assert f"| PM segment markers and readout ids | ids {V}, {V + 1}" in text
    assert (tmp_path / "runs_policy_m" / "online_ipo" / "done.json").exists()
    from test_study import FIGURES  # every figure, the Goodhart one and Fig. 10's included

    # Every figure but the hidden humans' (a real dataset has none, nor their fields).
    want = sorted(f for f in FIGURES if f != "hidden_humans.png")
    assert sorted(p.name for p in (tmp_path / "figures").glob("*.png")) == want
    assert "hidden humans" not in text
    online = json.loads((tmp_path / "runs" / "online_ipo" / "done.json").read_text())
    assert not [k for e in online["evals"] for k in e if k.startswith("hidden")]


@pytest.mark.skipif(not (SHARED_DATA / "hh_rlhf_helpful_base").exists(), reason="no shared data")
def test_real_hh_helpful_through_the_study_loader(tmp_path):
    cfg = dataclasses.replace(
        study.for_task(study.PRESETS["quick"], "hh_helpful"),
        data_dir=str(SHARED_DATA / "hh_rlhf_helpful_base"),
    )
    task = study.load_task(tmp_path, cfg)
    sizes = {s: len(v) for s, v in task.pairs.items()}
    # 2,352 usable pairs: test and valid are filled first, train takes the rest.
    assert sizes["test"] == cfg.num_test and sizes["valid"] == cfg.num_valid
    assert sum(sizes.values()) + task.report["pairs_dropped_at_split_boundaries"] == 2352
    assert len(task.prompts["eval"]) == cfg.num_eval_prompts
    train_prompts = {r["prompt"] for r in task.pairs["train"]}
    assert not train_prompts & {r["prompt"] for r in task.pairs["test"]}
    assert set(task.prompts["rl"]) <= train_prompts
    assert all(p.endswith("\n\nAssistant:") for p in task.prompts["eval"])


@pytest.mark.skipif(
    not (SHARED_DATA / "summarize_from_feedback_comparisons").exists(), reason="no shared data"
)
def test_real_tldr_through_the_study_loader(tmp_path):
    cfg = dataclasses.replace(
        study.for_task(study.PRESETS["micro"], "tldr"),
        data_dir=str(SHARED_DATA / "summarize_from_feedback_comparisons"),
    )
    task = study.load_task(tmp_path, cfg)
    assert task.report["loader"]["records"] == 1097 + 674
    assert {len(v) for k, v in task.pairs.items() if k != "train"} == {64}
    for split in ("train", "test"):
        for r in task.pairs[split]:
            assert r["prompt"].startswith("SUBREDDIT: r/") and r["prompt"].endswith("TL;DR:")
    # The prompt's end survives truncation: left-truncated prompts keep "TL;DR:".
    prep = study.prepare(tmp_path, cfg)
    tok = prep.tokenizer
    tail = tok.encode_as_ids("TL;DR:")
    x = prep.pairs["test"]["prompt"]
    lengths = prep.pairs["test"]["prompt_mask"].sum(1)
    assert prep.truncated["test"] > 0
    for row, n in zip(x, lengths, strict=True):
        assert list(row[n - 1 - len(tail) : n - 1]) == tail  # ... TL;DR: EOS


def test_a_saved_pm_is_not_read_with_other_marker_ids(tmp_path):
    """A PM stage finished by older code on a loaded tokenizer learnt to read ids 3 and 4;
    this code gives such a study's PMs the rows past the tokenizer: loading it under the new
    ids would read untrained logits, so it is refused, naming the directory."""
    cfg = model_preset("toy-s", vocab_size=64)
    study.save_model(tmp_path / "golden_pm", t5.init(cfg, key=jax.random.key(0)), cfg)
    assert study.load_model(tmp_path / "golden_pm", cfg).cfg.pm_ids == (3, 4)
    with pytest.raises(ValueError, match=r"golden_pm: its model was trained with .*\(3, 4\)"):
        study.load_model(tmp_path / "golden_pm", cfg.replace(pm_ids=(60, 61)))


def test_a_study_of_older_code_names_the_fields_a_resume_must_pass(tmp_path):
    """A paper study saved before `remat` existed resumes with it off (its old behaviour),
    while the paper preset now turns it on: the refusal names the field and both values
    (it said only "another configuration"), and passing the saved value resumes."""
    import json

    import reproduce

    saved = reproduce.config("paper").to_dict()
    del saved["remat"]
    (tmp_path / "study_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"remat: saved False, asked True\); pass the saved"):
        reproduce.run(tmp_path, "paper")
    assert study.with_new_defaults(saved) == reproduce.config("paper", remat=False).to_dict()
