"""The embedded task: determinism, the hidden preference, behaviour generators' quality order."""

import math
import random

import numpy as np
import pytest

from ipo_gap.data import embedded_task as et

SIZES = {
    "num_train": 300,
    "num_valid": 20,
    "num_test": 20,
    "num_rl_prompts": 50,
    "num_eval_prompts": 30,
}


def test_same_seed_same_task_other_seed_differs(tmp_path):
    a, b, c = et.make_task(3, **SIZES), et.make_task(3, **SIZES), et.make_task(4, **SIZES)
    assert a.to_json() == b.to_json()
    assert a.pairs["train"] != c.pairs["train"]
    cached = et.load_or_make(tmp_path / "task.json", 3, **SIZES)
    assert cached.to_json() == a.to_json()
    again = et.load_or_make(tmp_path / "task.json", 3, **SIZES)  # read back from the cache
    assert again.to_json() == a.to_json()


def test_splits_sizes_and_disjoint_prompts():
    task = et.make_task(0, **SIZES)
    assert len(task.pairs["train"]) == 300 and len(task.prompts["eval"]) == 30
    seen = {}
    for split, rows in task.pairs.items():
        for r in rows:
            seen.setdefault(r["prompt"], set()).add(split)
    for split, texts in task.prompts.items():
        for t in texts:
            seen.setdefault(t, set()).add(split)
    assert all(len(s) == 1 for s in seen.values())
    assert len(task.lexicon) == 300 and len(set(task.lexicon)) == 300


def test_human_preference_is_a_probability():
    for r1, r2 in [(0.0, 0.0), (3.0, -2.0), (-50.0, 60.0), (1e3, -1e3)]:
        p, q = et.human_preference(r1, r2), et.human_preference(r2, r1)
        assert 0.0 <= p <= 1.0 and math.isclose(p + q, 1.0, abs_tol=1e-12)
    assert et.human_preference(1.0, 1.0) == 0.5
    assert math.isclose(et.human_preference(1.0, 0.0), 1 / (1 + math.exp(-1 / et.TEMPERATURE)))
    task = et.make_task(0, **SIZES)
    for r in task.pairs["train"]:
        p = et.human_preference(
            task.reward(r["prompt"], r["chosen"]), task.reward(r["prompt"], r["rejected"])
        )
        assert math.isclose(p, r["p_human"], rel_tol=1e-12)


def test_labels_follow_the_hidden_preference():
    task = et.make_task(1, **dict(SIZES, num_train=3000))
    p = np.array([r["p_human"] for r in task.pairs["train"]])
    # P(chosen) = p for the drawn order: E[p_chosen] = E[p^2 + (1-p)^2] over pairs > 1/2.
    assert p.mean() > 0.75
    wins = [
        task.reward(r["prompt"], r["chosen"]) >= task.reward(r["prompt"], r["rejected"])
        for r in task.pairs["train"]
    ]
    assert np.mean(wins) > 0.8


def test_hidden_reward_features():
    lex = frozenset(et.make_lexicon(0))
    words = sorted(lex)[:3]
    prompt = et.Prompt("list", tuple(words))
    opener, liked, disliked = et.STYLE["list"]
    best = " ".join([opener, *words])
    assert et.hidden_reward(prompt, best, lex) > et.hidden_reward(prompt, " ".join(words), lex)
    assert et.hidden_reward(prompt, " ".join([opener, *words[::-1]]), lex) < et.hidden_reward(
        prompt, best, lex
    )
    assert et.hidden_reward(prompt, best + " " + words[0], lex) < et.hidden_reward(
        prompt, best, lex
    )
    assert et.hidden_reward(prompt, best + " " + disliked[0], lex) < et.hidden_reward(
        prompt, best + " " + liked[0], lex
    )
    with pytest.raises(ValueError, match="not an embedded-task prompt"):
        et.Prompt.parse("hello world")


def test_the_hidden_reward_is_its_weights_times_its_text_features():
    task = et.make_task(1, **SIZES)
    lex = frozenset(task.lexicon)
    prompt = et.Prompt("expand", tuple(task.lexicon[:3]))
    _, liked, disliked = et.STYLE["expand"]
    # Every feature non-zero at once, and each as hidden_reward's docstring counts it.
    y = f"thanks {prompt.topics[1]} {prompt.topics[2]} {liked[0]} {disliked[0]} {disliked[0]} "
    y += f"{task.lexicon[5]} {prompt.topics[1]}"
    f = et.reward_features(prompt, y, lex)
    np.testing.assert_array_equal(f, [2 / 3, 2 / 3, 1, 2, 1, 1, 1, 2])
    rows = [(r["prompt"], z) for r in task.pairs["train"] for z in (r["chosen"], r["rejected"])]
    for text, z in [*rows, (prompt.text, y)]:
        p = et.Prompt.parse(text)
        got = float(np.dot(et.REWARD_WEIGHTS, et.reward_features(p, z, lex)))
        assert got == pytest.approx(et.hidden_reward(p, z, lex), abs=1e-12), (text, z)


def test_the_feature_judge_learns_the_reward_weights_over_the_temperature():
    """The human labels are Bernoulli(sigmoid(dR / T)) with dR linear in the features, so the
    logistic fit is the maximum-likelihood estimate of REWARD_WEIGHTS / T: each weight must
    lie within 4 standard errors (the inverse Fisher information's diagonal) of it. With
    the right features, the judge is Bayes-correct on nearly every test pair."""
    task = et.make_task(2, **dict(SIZES, num_train=6000, num_test=1000))
    out = et.feature_judge(task)
    assert out["features"] == list(et.REWARD_FEATURES) and out["train_pairs"] == 6000
    w, true = np.array(out["weights"]), np.array(et.REWARD_WEIGHTS) / et.TEMPERATURE
    x, _ = et._pair_features(task, "train")
    s = 1 / (1 + np.exp(-(x @ w)))
    se = np.sqrt(np.diag(np.linalg.inv((x * (s * (1 - s))[:, None]).T @ x)))
    assert np.all(np.abs(w - true) < 4 * se), (w, true, se)
    assert np.all(se < 0.25 * np.abs(true))  # a test that could tell a wrong weight
    assert out["test_accuracy_vs_hidden_reward"] > 0.97
    rows = task.pairs["test"]
    bayes = np.mean([max(r["p_human"], 1 - r["p_human"]) for r in rows])
    assert abs(out["test_accuracy_vs_human_labels"] - bayes) < 0.03
    assert et.feature_judge(task) == out  # deterministic


def test_accuracy_vs_the_hidden_reward_counts_agreement_with_its_preference():
    # Pairs whose labelled winner the hidden reward prefers (p > 1/2), does not (p < 1/2),
    # or is indifferent to (p = 1/2, counted as not preferring it); verdicts win, tie, lose.
    p = np.array([0.9, 0.9, 0.9, 0.2, 0.2, 0.5])
    judged = np.array([1.0, 0.5, 0.0, 0.0, 1.0, 0.0])
    assert et.accuracy_vs_hidden_reward(p, judged) == pytest.approx((1 + 0.5 + 0 + 1 + 0 + 1) / 6)


def test_fit_logistic_finds_the_maximum_of_the_likelihood():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 3))
    x *= np.where(rng.random(2000) < 1 / (1 + np.exp(-(x @ [1.0, -2.0, 0.5]))), 1, -1)[:, None]
    w = et.fit_logistic(x, ridge=0.0)
    grad = x.T @ (1 / (1 + np.exp(x @ w)))  # the log-likelihood's gradient
    assert np.max(np.abs(grad)) < 1e-8
    np.testing.assert_allclose(w, [1.0, -2.0, 0.5], atol=0.25)


def test_generators_differ_in_quality_as_intended():
    lexicon = et.make_lexicon(0)
    lex = frozenset(lexicon)
    rng = random.Random(0)
    prompts = [et.random_prompt(rng, lexicon) for _ in range(400)]
    means = {}
    for g in et.GENERATORS:
        rewards = [et.hidden_reward(p, et.generate(rng, g, p, lexicon), lex) for p in prompts]
        means[g.name] = float(np.mean(rewards))
    order = [g.name for g in et.GENERATORS]  # listed from careless to careful
    assert [means[n] for n in order] == sorted(means.values()), means
    assert means["careful"] - means["careless"] > 2.0
    # The best responses are reachable but rare: few careful outputs reach the optimum's reward.
    opt = [
        et.hidden_reward(
            p, " ".join([et.hidden_opener(p), *p.topics, *et.STYLE[p.instruction][1]]), lex
        )
        for p in prompts
    ]
    careful = [
        et.hidden_reward(p, et.generate(rng, et.GENERATORS[-1], p, lexicon), lex) for p in prompts
    ]
    assert np.mean(np.array(careful) >= np.array(opt)) < 0.1  # measured: 0.04


def test_the_lexicon_holds_none_of_the_task_words():
    """Seed 48's lexicon drew "sure" (su+re), the summarize prompts' preferred opener: the
    hidden reward charged it as a stray word. Reserved words are skipped; the other seeds'
    lexicons are the draws they were (seed 0's first words pinned)."""
    reserved = {*et.OPENERS, *et.FILLERS, *et.INSTRUCTIONS}
    for seed in (0, 48, 54, 58):
        lexicon = et.make_lexicon(seed)
        assert len(set(lexicon)) == 300 and not reserved & set(lexicon), seed
    assert et.make_lexicon(0)[:3] == ["bafa", "bani", "besa"]


def test_a_cut_task_file_is_named(tmp_path):
    path = tmp_path / "task.json"
    sizes = {**SIZES, "num_train": 20}
    et.load_or_make(path, 0, **sizes)
    path.write_text(path.read_text()[:50])
    with pytest.raises(ValueError, match=r"task.json: not a task file .*delete it to regenerate"):
        et.load_or_make(path, 0, **sizes)


def test_toy_task_corruption_always_changes_the_response():
    """The tandem check's PM pairs (reference, corrupted): a corruption equal to its input
    (a word replaced by itself, two equal words swapped) made a pair of identical texts."""
    import random

    from ipo_gap.data import toy_task

    rng = random.Random(0)
    w = toy_task.WORDS
    for response in [f"{w[0]} {w[0]} {w[1]}", f"{w[2]} {w[2]}", w[3], f"{w[1]} {w[2]}"] * 200:
        assert toy_task.corrupt(rng, response) != response


def test_the_hidden_judge_is_the_humans_preference_against_the_baseline():
    """Token rows decode (here through a lookup of whole responses) to texts; per prompt the
    judge gives sigmoid((R(x, y) - R(x, y_base)) / T) and R(x, y): 1/2 on the baseline's own
    responses, above 1/2 exactly where the response's hidden reward is the higher."""
    task = et.make_task(3, **SIZES)
    prompts = task.prompts["eval"][:8]
    parsed = [et.Prompt.parse(x) for x in prompts]
    careful = [" ".join((et.hidden_opener(p), *p.topics)) for p in parsed]
    careless = ["maybe maybe the the" for _ in parsed]
    pool = careless + careful

    def decode(y):
        return [pool[int(row[0])] for row in np.asarray(y)]

    base = np.arange(8)[:, None]  # the careless responses
    judge = et.HiddenJudge.against(task, prompts, base, decode)
    p, r = judge(base)
    assert np.all(p == 0.5)
    base_r = [task.reward(x, y) for x, y in zip(prompts, careless, strict=True)]
    np.testing.assert_array_equal(r, base_r)
    p, r = judge(base + 8)  # the careful responses against the careless ones
    want_r = np.array([task.reward(x, y) for x, y in zip(prompts, careful, strict=True)])
    np.testing.assert_array_equal(r, want_r)
    assert judge.base == tuple(base_r)
    np.testing.assert_array_equal(
        p, [et.human_preference(a, b) for a, b in zip(want_r, base_r, strict=True)]
    )
    assert np.all(want_r > np.array(base_r)) and np.all(p > 0.5)
    with pytest.raises(ValueError, match="7 responses for 8 prompts"):
        judge(base[:7])
